//! Readiness: probe the backend (or watch for its ready line) until it is ready, exits or
//! runs out of startup_timeout; then check that the port's listener is its own.

use std::time::Duration;

use gpuswap::pb::LogStream;

use super::{
    Backend, StartError, ports,
    probe::{self, ProbeOutcome, ReadinessProbe},
};

const PROBE_FIRST_PAUSE: Duration = Duration::from_millis(5);
const PROBE_MAX_PAUSE: Duration = Duration::from_millis(15);

impl Backend {
    /// Probes readiness for the model's kind until ready. Fails at once when the process
    /// exits, or after startup_timeout.
    pub async fn wait_ready(&self) -> Result<(), StartError> {
        let config = &self.inner.config;
        let timeout = config.startup_timeout;
        let deadline = tokio::time::Instant::from_std(self.inner.spawned_at + timeout);
        let probe = ReadinessProbe::new(config);
        // Atomic and Mutex (not Cell/RefCell) keep this future Send: the scheduler spawns it.
        let ever_listened = std::sync::atomic::AtomicBool::new(false);
        let last_outcome = std::sync::Mutex::new(None::<ProbeOutcome>);
        // A server prints a line at the moment it starts to listen or finishes warming up
        // ("Uvicorn running on", "Application startup complete", "fired up"): probe at once
        // then instead of waiting out the pause.
        let mut lines = self.inner.logs.subscribe();
        let probing = async {
            let mut pause = PROBE_FIRST_PAUSE;
            let mut addr = None;
            loop {
                if addr.is_none() {
                    match probe.resolve().await {
                        Ok(a) => addr = Some(a),
                        Err(e) => {
                            *last_outcome.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(ProbeOutcome::NoAnswer(e.to_string()))
                        }
                    }
                }
                if let Some(addr) = addr {
                    let outcome = probe.probe(addr).await;
                    if outcome.is_ready() {
                        return;
                    }
                    if outcome.listening() {
                        ever_listened.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    *last_outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => pause = (pause * 2).min(PROBE_MAX_PAUSE),
                    line = lines.recv() => {
                        // A burst of lines (a log flood) must not turn into a burst of probes.
                        lines = lines.resubscribe();
                        if matches!(line, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            tokio::time::sleep(pause).await;
                        } else {
                            tokio::time::sleep(PROBE_FIRST_PAUSE / 5).await;
                        }
                    }
                }
            }
        };
        let mut ready_log_seen = self.inner.ready_log_seen.clone();
        let ready_log = async {
            if config.ready_log.as_deref().is_some_and(|s| !s.is_empty())
                && ready_log_seen.wait_for(|seen| *seen).await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await
        };
        let outcome = tokio::select! {
            biased;
            info = self.exited() => Err(StartError::Exited(info)),
            () = ready_log => Ok(()),
            () = probing => Ok(()),
            () = tokio::time::sleep_until(deadline) => {
                let last = last_outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Err(self.not_ready(&probe, ever_listened.load(std::sync::atomic::Ordering::Relaxed), last).await)
            }
        };
        if outcome.is_ok() {
            // The workers exist by now (servers fork them while loading).
            self.remember_tree();
            self.check_port_owner(&probe).await?;
        }
        outcome
    }

    /// Ready only when the socket that answered is the model's own: a 200 from whatever
    /// holds the port (another model, a stray server) would route its clients elsewhere.
    async fn check_port_owner(&self, probe: &ReadinessProbe) -> Result<(), StartError> {
        let port = self.inner.config.port;
        let addr = probe.resolve().await.ok();
        let backend = self.clone();
        let owner = tokio::task::spawn_blocking(move || {
            let tree = backend.tree_pids();
            ports::owner(addr, port, &tree)
        })
        .await
        .unwrap_or_else(|e| ports::Owner::Unknown(e.to_string()));
        match owner {
            ports::Owner::Tree => Ok(()),
            ports::Owner::Unknown(why) => {
                self.inner.logs.push(
                    LogStream::Supervisor,
                    format!("cannot tell which process listens on port {port} ({why}): taking the answer as the model's"),
                );
                Ok(())
            }
            ports::Owner::Foreign(holder) => {
                let error = StartError::PortTaken { port, holder };
                self.inner
                    .logs
                    .push(LogStream::Supervisor, error.to_string());
                Err(error)
            }
        }
    }

    async fn not_ready(
        &self,
        probe: &ReadinessProbe,
        ever_listened: bool,
        last: Option<ProbeOutcome>,
    ) -> StartError {
        let config = &self.inner.config;
        let timeout = config.startup_timeout;
        if ever_listened {
            let last = match last {
                Some(ProbeOutcome::Status(code)) => format!("HTTP {code}"),
                Some(ProbeOutcome::NoAnswer(why)) => why,
                Some(ProbeOutcome::Refused) => "connection refused".into(),
                None => "nothing".into(),
            };
            self.inner.logs.push(
                LogStream::Supervisor,
                format!(
                    "not ready after {timeout:?}: the last probe of {} answered {last}",
                    probe.path()
                ),
            );
            return StartError::Timeout(timeout);
        }
        let next = config.port.checked_add(1);
        let next_listens = match next {
            Some(next) => match probe::resolve(&config.host, next).await {
                Ok(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
                Err(_) => false,
            },
            None => false,
        };
        let hint = match next {
            Some(next) if next_listens => format!(
                "; something listens on port {next}: TabbyAPI moves to port+1 when its port is busy"
            ),
            _ => String::new(),
        };
        let error = StartError::NotListening {
            port: config.port,
            timeout,
            hint,
        };
        self.inner
            .logs
            .push(LogStream::Supervisor, error.to_string());
        error
    }
}
