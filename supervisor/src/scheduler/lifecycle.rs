//! Starting and stopping backends: the start and its readiness and exit reports, the stop
//! (and one that leaves processes behind), warming the next model's weights.

use std::time::Duration;

use gpuswap_telemetry::SwapPhase;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    Internal, Spawned,
    actor::{Actor, Run},
    policy::{Notice, StreamId},
    progress::track_progress,
};
use crate::backend::{Backend, LaunchSpec, StartError, warm};

/// How often a stop that left processes alive looks again whether they are gone.
const STUCK_RECHECK: Duration = Duration::from_secs(1);

/// A phase of a swap (start, ready, stop) of one generation, in the swap's trace.
pub(super) fn swap_phase_span(
    parent: &tracing::Span,
    phase: &'static str,
    model: &str,
    generation: u64,
) -> tracing::Span {
    tracing::info_span!(parent: parent, "swap", phase, model, generation)
}

impl Actor {
    /// Spawns `name` for the activation `cause` on a blocking thread (a user lookup, the port
    /// check, the state file and the guard's report may each take a while): the actor goes
    /// on answering meanwhile, and [`Actor::spawned`] takes the outcome. The start and ready
    /// phases are traced under the activation's span.
    pub(super) fn spawn(&mut self, name: &str, generation: u64, cause: StreamId, restart: bool) {
        let cause_span = self.span_of(cause);
        let Some(tx) = self.sender() else {
            let reason = "the supervisor is shutting down".to_owned();
            self.policy
                .spawn_failed(name, generation, reason, "spawn_failed", Instant::now());
            return;
        };
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let spec = LaunchSpec {
            model: name.to_owned(),
            config: model.config.clone(),
            guard_exe: self.guard_exe.clone(),
            gpu_release_timeout: self.gpu_release_timeout,
            state_file: self.state_file.clone(),
        };
        self.metrics.swap_started(name);
        if restart {
            self.metrics.backend_restarted(name);
        }
        // The command line itself is logged by the process layer (with the API key masked).
        model.note(format!("starting generation {generation}"));
        model.spawning = Some(generation);
        let start_span = swap_phase_span(&cause_span, "start", name, generation);
        let (logs, model) = (model.logs.clone(), name.to_owned());
        tokio::spawn(async move {
            let began = Instant::now();
            let span = start_span.clone();
            let spawned = tokio::task::spawn_blocking(move || {
                span.in_scope(|| {
                    tracing::info!(model = spec.model, generation, "starting");
                    Backend::spawn(&spec, logs)
                })
            })
            .await
            .unwrap_or_else(|e| {
                Err(StartError::Spawn {
                    program: String::new(),
                    source: std::io::Error::other(format!("the spawn did not finish: {e}")),
                })
            });
            let spawned = Internal::Spawned(Spawned {
                model,
                generation,
                result: spawned,
                took: began.elapsed(),
                start_span,
                cause_span,
            });
            Self::report(&tx, spawned);
        });
    }

    /// A spawn is over: the backend's readiness and exit are watched and the waiters that
    /// follow the start are told Starting; or the start failed.
    pub(super) fn spawned(&mut self, spawned: Spawned) {
        let Spawned {
            model: name,
            generation,
            result,
            took,
            start_span,
            cause_span,
        } = spawned;
        // None only once the actor is gone; a backend dropped unwatched is stopped.
        let Some(tx) = self.sender() else { return };
        let Some(model) = self
            .models
            .get_mut(&name)
            .filter(|m| m.spawning == Some(generation))
        else {
            return;
        };
        model.spawning = None;
        let backend = match result {
            Ok(backend) => backend,
            Err(error) => {
                let reason = error.to_string();
                let cause = start_failure_reason(&error);
                start_span.in_scope(|| tracing::warn!(model = name, %reason, "spawn failed"));
                self.policy
                    .spawn_failed(&name, generation, reason, cause, Instant::now());
                return;
            }
        };
        drop(start_span);
        self.metrics.phase_finished(SwapPhase::Start, took);
        model.progress = None;
        let progress_tracker = track_progress(
            model.logs.subscribe(),
            model.config.kind,
            tx.clone(),
            name.clone(),
            generation,
        );
        model.run = Some(Run {
            backend: backend.clone(),
            generation,
            progress_tracker: Some(progress_tracker),
        });
        {
            let (tx, backend, model) = (tx.clone(), backend.clone(), name.clone());
            let ready_span = swap_phase_span(&cause_span, "ready", &name, generation);
            tokio::spawn(async move {
                let result = backend.wait_ready().instrument(ready_span).await;
                Self::report(
                    &tx,
                    Internal::StartFinished {
                        model,
                        generation,
                        result,
                    },
                );
            });
        }
        {
            let model = name.clone();
            tokio::spawn(async move {
                let info = backend.exited().await;
                Self::report(
                    &tx,
                    Internal::Exited {
                        model,
                        generation,
                        info,
                    },
                );
            });
        }
        for stream in self.policy.followers(&name, generation) {
            self.send_notice(stream, &name, Notice::Starting { generation });
        }
        self.policy.spawned(&name, generation);
    }

    /// Stops the process tree of `name` in a task; StopFinished reports the end. For a swap
    /// (`swap`: the waiting activation) the stop is traced and timed as its phase.
    pub(super) fn stop(
        &mut self,
        name: &str,
        generation: u64,
        reason: Option<String>,
        swap: Option<StreamId>,
    ) {
        let swap_span = swap.map(|stream| self.span_of(stream));
        let Some(model) = self.models.get(name) else {
            return;
        };
        if let Some(reason) = &reason {
            model.note(format!("stopping: {reason}"));
            tracing::info!(model = name, reason, "stopping");
        }
        let backend = match &model.run {
            Some(run) if run.generation == generation => run.backend.clone(),
            // Nothing left to stop.
            _ => return self.policy.stop_finished(name, generation),
        };
        let Some(tx) = self.sender() else { return };
        let phase = swap_span.map(|parent| {
            let span = swap_phase_span(&parent, "stop", name, generation);
            (span, self.metrics.clone())
        });
        let model = name.to_owned();
        tokio::spawn(async move {
            let info = match phase {
                // From the SIGTERM until the port and the GPU memory are free again.
                Some((span, metrics)) => {
                    let began = Instant::now();
                    let info = backend.stop().instrument(span).await;
                    metrics.phase_finished(SwapPhase::Stop, began.elapsed());
                    info
                }
                None => backend.stop().await,
            };
            // Processes the stop could not end (stuck in the kernel) may hold the GPUs: the
            // stop is reported failed, and finishes (freeing the GPUs) only once they are gone.
            let mut stuck_reported = false;
            loop {
                let pids = backend.survivors();
                if pids.is_empty() {
                    break;
                }
                if !stuck_reported {
                    stuck_reported = true;
                    let (model, pids) = (model.clone(), pids);
                    let stuck = Internal::StopStuck {
                        model,
                        generation,
                        pids,
                    };
                    Self::report(&tx, stuck);
                }
                tokio::time::sleep(STUCK_RECHECK).await;
            }
            Self::report(
                &tx,
                Internal::StopFinished {
                    model,
                    generation,
                    info,
                },
            );
        });
    }

    /// Reads `name`'s weight files into the page cache while its swap frees the GPUs (once
    /// per swap; the warming ends with the start it prepared).
    pub(super) fn warm_weights(&mut self, name: &str) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if model.warming.as_ref().is_some_and(|w| !w.finished()) {
            return;
        }
        model.warming = Some(warm::start(model.config.clone(), model.logs.clone()));
    }
}

/// The `reason` label of `backend_failures_total` for a failed start (a fixed word).
pub(super) fn start_failure_reason(error: &StartError) -> &'static str {
    match error {
        StartError::PortBusy { .. }
        | StartError::PortTaken { .. }
        | StartError::Spawn { .. }
        | StartError::NoSuchUser(_) => "spawn_failed",
        StartError::Exited(_) | StartError::ExitedAfterReady(_) => "exited",
        // It listened, but its health check never passed in time.
        StartError::Timeout(_) => "startup_timeout",
        // Nothing ever listened on its port.
        StartError::NotListening { .. } => "never_ready",
    }
}
