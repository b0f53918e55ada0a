//! The handle on one backend's process tree: its pids, its exit, the processes seen in it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuswap::{config::ModelConfig, pb::LogStream};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use tokio::sync::watch;

use super::{logs::LogBuffer, process_tree, state_file::StateFile};

/// How a backend process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown exit"),
        }
    }
}

/// Waits until `exit` holds the exit of a process tree; None when its sender is gone first.
pub(super) async fn wait_for_exit(mut exit: watch::Receiver<Option<ExitInfo>>) -> Option<ExitInfo> {
    let info = exit.wait_for(Option::is_some).await.ok()?.clone();
    Some(info.unwrap_or(UNKNOWN_EXIT))
}

pub(super) const UNKNOWN_EXIT: ExitInfo = ExitInfo {
    code: None,
    signal: None,
};

/// A running (or exited) backend. Cheap to clone: every clone refers to the same process tree.
#[derive(Clone)]
pub struct Backend {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) model: String,
    pub(super) config: ModelConfig,
    pub(super) gpu_release_timeout: Duration,
    pub(super) guard_pid: i32,
    pub(super) backend_pid: u32,
    pub(super) spawned_at: Instant,
    pub(super) logs: LogBuffer,
    /// Set by the owner task the moment the guard is reaped: its pgid may be reused after.
    pub(super) reaped: Arc<AtomicBool>,
    pub(super) exit: watch::Receiver<Option<ExitInfo>>,
    pub(super) ready_log_seen: watch::Receiver<bool>,
    /// The one stop in progress or done; later callers wait on it.
    pub(super) stop: Mutex<Option<watch::Receiver<Option<ExitInfo>>>>,
    /// Every pid seen in the tree (guard, backend, workers) with its start time (0:
    /// unknown): who may still hold GPU memory after a stop, even the workers of a backend
    /// that crashed before it, and who may be killed once the guard is gone.
    pub(super) seen_pids: Mutex<BTreeMap<i32, u64>>,
    /// Where the tree's processes are recorded for a successor's cleanup.
    pub(super) state_file: Option<Arc<StateFile>>,
}

impl Backend {
    /// The backend's pid (the guard's child).
    pub fn pid(&self) -> u32 {
        self.inner.backend_pid
    }

    /// The process group (the guard's pid).
    pub fn pgid(&self) -> i32 {
        self.inner.guard_pid
    }

    /// The model this backend serves.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.config
    }

    /// Resolves once the process tree has exited, by itself or by a stop. Cancel-safe.
    pub async fn exited(&self) -> ExitInfo {
        // None: the owner task is gone without a word (the runtime is shutting down).
        wait_for_exit(self.inner.exit.clone())
            .await
            .unwrap_or(UNKNOWN_EXIT)
    }

    /// The exit, if it already happened.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.inner.exit.borrow().clone()
    }

    /// Why the backend leader is gone, or None while it lives. The leader is the guard's
    /// child: its pid stays its own until the guard reaps it, and the guard exits (which
    /// `exit_info` shows) right after.
    pub fn leader_gone(&self) -> Option<String> {
        if let Some(info) = self.exit_info() {
            return Some(info.to_string());
        }
        (!process_tree::alive(self.inner.backend_pid as i32))
            .then(|| format!("process {} is gone", self.inner.backend_pid))
    }

    /// The guard and its live descendants; empty once the guard was reaped (its pid may
    /// name another process by then).
    pub(super) fn tree_pids(&self) -> Vec<i32> {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut tree = process_tree::descendants(self.inner.guard_pid);
        tree.push(self.inner.guard_pid);
        tree
    }

    /// Adds the tree's live pids to those seen. Not after the guard was reaped: its pid,
    /// and so the walk from it, may belong to another process by then.
    pub(super) fn remember_tree(&self) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        let live = process_tree::descendants(self.inner.guard_pid);
        if let Some(state) = &self.inner.state_file
            && let Err(e) = state.record_processes(self.inner.guard_pid, &live)
        {
            tracing::warn!(model = %self.inner.model, path = %state.path().display(), "cannot record the tree's processes: {e}");
        }
        let started: Vec<(i32, u64)> = live.iter().map(|&pid| (pid, start_of(pid))).collect();
        self.inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(started);
    }

    /// The processes seen in the tree that still run (same pid, same start time). After the
    /// guard was reaped these are orphans of a guard killed from outside, or processes stuck
    /// in the kernel (D state): they may still hold the GPUs.
    pub fn survivors(&self) -> Vec<i32> {
        let seen = self
            .inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|&(&pid, &start)| {
                start != 0
                    && process_tree::stat(pid).is_some_and(|s| s.alive() && s.starttime == start)
            })
            .map(|(&pid, _)| pid)
            .collect()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone while the tree still runs: nobody could stop it any more.
        // SIGTERM lets the guard do a normal stop, SIGKILL after stop_timeout included.
        if self.exit.borrow().is_none() && !self.reaped.load(Ordering::SeqCst) {
            self.logs.push(
                LogStream::Supervisor,
                "stopping: the supervisor dropped its last handle on this backend".into(),
            );
            tracing::warn!(model = %self.model, pgid = self.guard_pid, "backend handle dropped while running: stopping it");
            let _ = killpg(Pid::from_raw(self.guard_pid), Signal::SIGTERM);
        }
    }
}

/// The start time of `pid` (clock ticks after boot), 0 when it cannot be read.
pub(super) fn start_of(pid: i32) -> u64 {
    process_tree::stat(pid).map_or(0, |s| s.starttime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_info_reads_well() {
        assert_eq!(
            ExitInfo {
                code: Some(3),
                signal: None
            }
            .to_string(),
            "exit status 3"
        );
        assert_eq!(
            ExitInfo {
                code: None,
                signal: Some(9)
            }
            .to_string(),
            "killed by signal 9"
        );
    }
}
