//! Reports from the actor's own tasks: a start's outcome, an exit, a stop, a closed stream,
//! NVML's readings.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{
    Internal,
    actor::Actor,
    lifecycle::start_failure_reason,
    policy::{FailureKind, State},
};
use crate::backend::StartError;

impl Actor {
    pub(super) fn internal(&mut self, internal: Internal) {
        let now = Instant::now();
        match internal {
            Internal::Spawned(spawned) => self.spawned(spawned),
            Internal::StartFinished {
                model,
                generation,
                result,
            } => {
                // A backend that passed its readiness check and died at once (a 200 then a
                // crash) is a crash, never Ready: its Exited report may have come first, and
                // was ignored while Starting.
                if let Some(m) = self.models.get_mut(&model) {
                    m.warming = None;
                }
                let leader_gone = self
                    .models
                    .get(&model)
                    .and_then(|m| m.run.as_ref())
                    .filter(|r| r.generation == generation)
                    .and_then(|r| r.backend.leader_gone());
                let result = result.and(match leader_gone {
                    Some(why) => Err(StartError::ExitedAfterReady(why)),
                    None => Ok(()),
                });
                match result {
                    Ok(()) => self.policy.start_succeeded(&model, generation, now),
                    Err(error) => {
                        let (cause, kind) = match error {
                            StartError::ExitedAfterReady(_) => ("exited", FailureKind::Crash),
                            _ => (start_failure_reason(&error), FailureKind::Start),
                        };
                        let reason = error.to_string();
                        self.policy
                            .start_failed(&model, generation, reason, cause, kind, now);
                    }
                }
            }
            Internal::Exited {
                model,
                generation,
                info,
            } => {
                if self
                    .policy
                    .slot(&model)
                    .is_some_and(|s| s.state == State::Ready && s.generation == generation)
                {
                    tracing::warn!(model, generation, %info, "backend exited on its own");
                }
                self.policy
                    .exited(&model, generation, format!("exited: {info}"), now);
            }
            Internal::StopFinished {
                model,
                generation,
                info,
            } => {
                if let Some(m) = self.models.get_mut(&model)
                    && m.run.as_ref().is_some_and(|r| r.generation == generation)
                {
                    m.run = None;
                    m.note(format!("stopped generation {generation} ({info})"));
                    tracing::info!(model, generation, %info, "stopped");
                }
                self.policy.stop_finished(&model, generation);
            }
            Internal::StopStuck {
                model,
                generation,
                pids,
            } => self.stop_stuck(&model, generation, &pids),
            Internal::StreamClosed { id } => {
                if let Some(stream) = self.streams.get(&id) {
                    let what = if self.policy.is_waiting(id) {
                        "activation abandoned"
                    } else {
                        "hold released"
                    };
                    tracing::info!(model = stream.model, client = stream.client, "{what}");
                }
                self.policy.stream_closed(id, now);
                self.streams.remove(&id);
            }
            Internal::SleepFinished {
                model,
                generation,
                result,
            } => self.sleep_finished(&model, generation, result, now),
            Internal::WakeFinished {
                model,
                generation,
                result,
            } => self.wake_finished(&model, generation, result, now),
            Internal::Progress {
                model,
                generation,
                parsed,
            } => self.load_progressed(&model, generation, parsed),
            Internal::GpuMemory(readings) => {
                let totals: BTreeMap<u32, u64> =
                    readings.iter().map(|(gpu, r)| (*gpu, r.total)).collect();
                if totals != self.measured {
                    self.measured = totals;
                    let mut settings = self.policy.settings().clone();
                    settings.capacity = settings.capacity.with_measured(self.measured.clone());
                    self.policy.set_settings(settings);
                }
                self.gpu_used = readings.iter().map(|(gpu, r)| (*gpu, r.used)).collect();
                self.policy.gpu_memory(self.gpu_used.clone());
            }
        }
        self.carry_out();
    }

    /// A stop left processes alive: say so, and fail the deactivations waiting for it (the
    /// model keeps its GPUs until StopFinished, once the processes are gone).
    pub(super) fn stop_stuck(&mut self, name: &str, generation: u64, pids: &[i32]) {
        let Some(model) = self.models.get(name) else {
            return;
        };
        if model
            .run
            .as_ref()
            .is_none_or(|r| r.generation != generation)
        {
            return;
        }
        let reason = format!(
            "the stop left processes {pids:?} running (stuck in the kernel?): its GPUs stay \
             reserved until they are gone"
        );
        model.note(reason.clone());
        tracing::error!(
            model = name,
            generation,
            ?pids,
            "stop failed: processes left"
        );
        self.policy.stop_stuck(name, generation, reason);
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot;

    use super::*;
    use crate::scheduler::{Command, actor::actor_with_spawned_model};

    /// A stop that left processes alive fails the Deactivate waiting for it and keeps the
    /// model's process (its GPUs) in place until they are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_stop_fails_its_deactivation_and_keeps_the_gpus() {
        let (mut actor, tx, _reports) = actor_with_spawned_model(r#"["sleep", "30"]"#).await;
        let generation = actor.models["m"].run.as_ref().expect("spawned").generation;
        let (reply, answer) = oneshot::channel();
        actor.command(Command::Deactivate {
            model: Some("m".into()),
            force: true,
            sleep: false,
            if_idle_generation: None,
            reply,
        });
        actor.pump();
        actor.stop_stuck("m", generation, &[4242]);
        actor.carry_out();
        let status = answer.await.expect("answered").expect_err("a failed stop");
        assert!(status.message().contains("4242"), "{status:?}");
        assert!(actor.models["m"].run.is_some(), "the GPUs stay reserved");
        let slot = actor.policy.slot("m").expect("model");
        assert!(slot.run.is_some(), "the GPUs stay reserved");
        assert!(
            slot.last_error.contains("stay reserved"),
            "{}",
            slot.last_error
        );
        drop(tx);
    }

    /// The readiness check passed, then the leader died before the actor took the report in
    /// (its Exited came first and was ignored while Starting): that is a crash, not Ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_reported_ready_after_the_leader_died_is_a_crash() {
        let (mut actor, tx, _reports) = actor_with_spawned_model(r#"["sh", "-c", "exit 3"]"#).await;
        let run = actor.models["m"].run.as_ref().expect("spawned");
        let (backend, generation) = (run.backend.clone(), run.generation);
        backend.exited().await;
        actor.internal(Internal::StartFinished {
            model: "m".into(),
            generation,
            result: Ok(()),
        });
        let slot = actor.policy.slot("m").expect("model");
        assert_eq!(slot.state, State::Failed);
        assert!(
            slot.last_error
                .contains("right after passing its readiness check"),
            "{}",
            slot.last_error
        );
        assert!(slot.retry_at.is_some(), "restarted after a backoff");
        drop(tx);
    }
}
