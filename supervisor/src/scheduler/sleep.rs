//! Sleeping models: the policy's Sleep and Wake carried out, and their reports.
//!
//! A sleep sends the model's sleep protocol to its backend, then checks (NVML, as after a
//! stop) that its processes freed the GPU memory: only then does the policy count the memory
//! free. A wake sends the protocol's wake requests and waits for the readiness probe; the
//! process (pid, port, generation) is the same throughout. A failed sleep stops the backend,
//! a failed wake stops it and starts it cold (the policy decides; this says why).

use std::time::Duration;

use tokio::time::Instant;
use tracing::Instrument as _;

use super::{
    Internal,
    actor::{Actor, millis},
    lifecycle::swap_phase_span,
    policy::{Notice, StreamId},
};
use crate::backend::{gpu, load_progress::Operation, sleep};

impl Actor {
    /// Puts `name` to sleep in a task; SleepFinished reports the end. For a swap (`swap`: the
    /// waiting activation) the sleep is traced as its phase.
    pub(super) fn sleep(
        &mut self,
        name: &str,
        generation: u64,
        reason: String,
        swap: Option<StreamId>,
    ) {
        let swap_span = swap.map(|stream| self.span_of(stream));
        let Some(model) = self.models.get(name) else {
            return;
        };
        let backend = match &model.run {
            Some(run) if run.generation == generation => run.backend.clone(),
            _ => return,
        };
        let Some(tx) = self.sender() else { return };
        model.note(format!("putting it to sleep: {reason}"));
        tracing::info!(model = name, generation, reason, "sleeping");
        let protocol = model.config.sleep_protocol(name);
        let (config, logs) = (model.config.clone(), model.logs.clone());
        let release_timeout = self.gpu_release_timeout;
        let span = swap_span.map_or_else(tracing::Span::none, |parent| {
            swap_phase_span(&parent, "sleep", name, generation)
        });
        let model = name.to_owned();
        tokio::spawn(async move {
            let began = Instant::now();
            let result = async {
                let protocol = protocol
                    .map_err(|e| e.to_string())?
                    .ok_or("sleep is off for this model")?;
                sleep::enter(&config, &protocol, sleep::REQUEST_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?;
                gpu::wait_sleep_released(&backend.survivors(), release_timeout, &logs)
                    .await
                    .map_err(|e| e.to_string())
            }
            .instrument(span)
            .await
            .map(|()| began.elapsed());
            Self::report(
                &tx,
                Internal::SleepFinished {
                    model,
                    generation,
                    result,
                },
            );
        });
    }

    /// Wakes the sleeping `name` in a task for the activation `cause` (told Starting, with
    /// the same pid and generation); WakeFinished reports the end.
    pub(super) fn wake(&mut self, name: &str, generation: u64, cause: StreamId) {
        let Some(model) = self.models.get(name) else {
            return;
        };
        let Some(run) = model.run.as_ref().filter(|r| r.generation == generation) else {
            return;
        };
        let Some(tx) = self.sender() else { return };
        model.note(format!(
            "waking generation {generation} (pid {})",
            run.backend.pid()
        ));
        tracing::info!(model = name, generation, "waking");
        let protocol = model.config.sleep_protocol(name);
        let config = model.config.clone();
        let deadline = Instant::now() + config.startup_timeout;
        let span = swap_phase_span(&self.span_of(cause), "wake", name, generation);
        let model = name.to_owned();
        tokio::spawn(async move {
            let result = async {
                let protocol = protocol
                    .map_err(|e| e.to_string())?
                    .ok_or("sleep is off for this model")?;
                sleep::leave(&config, &protocol, sleep::REQUEST_TIMEOUT, deadline)
                    .await
                    .map_err(|e| e.to_string())
            }
            .instrument(span)
            .await;
            Self::report(
                &tx,
                Internal::WakeFinished {
                    model,
                    generation,
                    result,
                },
            );
        });
        self.send_notice(cause, name, Notice::Starting { generation });
    }

    /// The wake of `generation` succeeded after `took`.
    pub(super) fn woke(&mut self, name: &str, generation: u64, took: Duration) {
        if let Some(m) = self.models.get_mut(name) {
            m.progress = None;
            m.note(format!(
                "awake after {} ms (generation {generation}, the same process)",
                millis(took)
            ));
        }
        self.history.record(name, Operation::Wake, took);
        tracing::info!(model = name, generation, wake_ms = millis(took), "awake");
    }

    pub(super) fn sleep_finished(
        &mut self,
        name: &str,
        generation: u64,
        result: Result<Duration, String>,
        now: Instant,
    ) {
        match result {
            Ok(took) => {
                if let Some(m) = self.models.get(name) {
                    m.note(format!(
                        "asleep after {} ms: its GPU memory is free",
                        millis(took)
                    ));
                }
                tracing::info!(model = name, generation, sleep_ms = millis(took), "asleep");
                self.policy.sleep_finished(name, generation);
            }
            Err(why) => {
                if let Some(m) = self.models.get(name) {
                    m.note(format!("sleep failed ({why}): stopping it instead"));
                }
                tracing::warn!(model = name, generation, reason = why, "sleep failed");
                self.policy.sleep_failed(name, generation, why, now);
            }
        }
    }

    pub(super) fn wake_finished(
        &mut self,
        name: &str,
        generation: u64,
        result: Result<(), String>,
        now: Instant,
    ) {
        match result {
            Ok(()) => self.policy.wake_succeeded(name, generation, now),
            Err(why) => {
                if let Some(m) = self.models.get(name) {
                    m.note(format!("wake failed ({why}): stopping it to start it cold"));
                }
                tracing::warn!(model = name, generation, reason = why, "wake failed");
                self.policy.wake_failed(name, generation, why, now);
            }
        }
    }
}
