//! Stopping a backend: SIGTERM to the group, SIGKILL after stop_timeout, reap, end the
//! orphans of a guard killed from outside, then wait for the port and the GPU memory.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use gpuswap::pb::LogStream;
use nix::{
    errno::Errno,
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use tokio::sync::watch;

use super::{Backend, ExitInfo, UNKNOWN_EXIT, gpu, handle::wait_for_exit, ports, process_tree};

/// Extra time the guard gets, after stop_timeout, to SIGKILL the tree itself.
const ESCALATION_MARGIN: Duration = Duration::from_secs(2);
/// After the supervisor's own SIGKILL, how long to wait for the guard to be reaped.
const BACKSTOP_WAIT: Duration = Duration::from_secs(10);
/// How long a stop waits for the port to be bindable again.
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

impl Backend {
    /// SIGTERM to the group, SIGKILL after stop_timeout, reap, then wait (bounded) until the
    /// port is free and the GPU memory released. Idempotent; concurrent calls share one stop.
    pub async fn stop(&self) -> ExitInfo {
        let done = {
            let mut slot = self.inner.stop.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(done) => done.clone(),
                None => {
                    let (tx, done) = watch::channel(None);
                    let backend = self.clone();
                    // A task of its own: a caller that gives up waiting does not cancel the stop.
                    tokio::spawn(async move {
                        let info = backend.run_stop().await;
                        let _ = tx.send(Some(info));
                    });
                    *slot = Some(done.clone());
                    done
                }
            }
        };
        match wait_for_exit(done).await {
            Some(info) => info,
            None => self.exited().await,
        }
    }

    async fn run_stop(&self) -> ExitInfo {
        let inner = &self.inner;
        let stop_timeout = inner.config.stop_timeout;
        // Who may hold GPU memory: known now, gone (and unknowable) after the stop.
        self.remember_tree();
        let tree: Vec<i32> = inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        if self.exit_info().is_none() {
            inner.logs.push(
                LogStream::Supervisor,
                format!("stopping (SIGTERM, SIGKILL after {stop_timeout:?})"),
            );
            let signalled = Instant::now();
            self.signal_group(Signal::SIGTERM);
            let graceful = tokio::time::timeout(stop_timeout, self.exited()).await;
            // The guard escalates by itself at about the same moment (its clock may win).
            if graceful.is_err() || signalled.elapsed() >= stop_timeout {
                inner.logs.push(
                    LogStream::Supervisor,
                    format!("stop escalated to SIGKILL after {stop_timeout:?}"),
                );
            }
            if graceful.is_err()
                && tokio::time::timeout(ESCALATION_MARGIN, self.exited())
                    .await
                    .is_err()
            {
                inner.logs.push(
                    LogStream::Supervisor,
                    "the guard did not exit: killing its group and every descendant".into(),
                );
                self.kill_everything();
            }
        }
        let info = match tokio::time::timeout(BACKSTOP_WAIT, self.exited()).await {
            Ok(info) => info,
            Err(_) => {
                inner.logs.push(
                    LogStream::Supervisor,
                    format!("the guard was not reaped {BACKSTOP_WAIT:?} after SIGKILL"),
                );
                UNKNOWN_EXIT
            }
        };
        // The guard ends every descendant before it exits; one killed from outside leaves
        // them orphaned (to init, not to us): end those we know, by pid and start time.
        let orphans = self.survivors();
        if !orphans.is_empty() {
            inner.logs.push(
                LogStream::Supervisor,
                format!("processes {orphans:?} outlived the guard: killing them"),
            );
            for pid in orphans {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let deadline = Instant::now() + BACKSTOP_WAIT;
            let mut pause = Duration::from_millis(1);
            while !self.survivors().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
        if !ports::wait_port_free(&inner.config.host, inner.config.port, PORT_RELEASE_TIMEOUT).await
        {
            inner.logs.push(
                LogStream::Supervisor,
                format!(
                    "port {} is still in use {PORT_RELEASE_TIMEOUT:?} after the stop",
                    inner.config.port
                ),
            );
        }
        gpu::wait_released(&tree, inner.gpu_release_timeout, &inner.logs).await;
        info
    }

    fn signal_group(&self, signal: Signal) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        match killpg(Pid::from_raw(self.inner.guard_pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(model = %self.inner.model, "killpg({signal}): {e}"),
        }
    }

    /// The supervisor's own backstop when the guard does not answer.
    fn kill_everything(&self) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        for pid in process_tree::descendants(self.inner.guard_pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.signal_group(Signal::SIGKILL);
    }
}
