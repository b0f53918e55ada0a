//! The policy's hands: lets the policy walk the queue, and carries out the actions it returns.

use gpuswap::{
    config::ModelConfig,
    pb::{self, activate_event::Event},
};
use gpuswap_telemetry::SwapPhase;
use tokio::time::Instant;
use tonic::Status;

use super::{
    actor::{Actor, millis, unix_millis},
    log_forward::{LostLines, forward_logs},
    policy::{Action, Notice, StreamId},
};
use crate::backend::load_progress::Operation;

/// Lines of the backend's output sent with a `Failed` event.
const FAILURE_TAIL_LINES: usize = 20;

/// `host:port` a client connects to; wildcard listen addresses mean this host.
pub fn client_address(config: &ModelConfig) -> String {
    let host = match config.host.as_str() {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", config.port)
    } else {
        format!("{host}:{}", config.port)
    }
}

impl Actor {
    /// Lets the policy walk the queue, and carries out what it decided.
    pub(super) fn pump(&mut self) {
        let (models, requirements) = (&self.models, &self.requirements);
        let unavailable = |name: &str| {
            let model = models.get(name)?;
            requirements
                .unmet(&model.config)
                .map(|unmet| unmet.to_string())
        };
        self.policy.pump(Instant::now(), &unavailable);
        self.carry_out();
    }

    /// Carries out the actions the policy decided so far (and those they lead to).
    pub(super) fn carry_out(&mut self) {
        loop {
            let actions = self.policy.take_actions();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                self.apply(action);
            }
        }
    }

    pub(super) fn apply(&mut self, action: Action) {
        match action {
            Action::Send {
                stream,
                model,
                notice,
            } => self.send_notice(stream, &model, notice),
            Action::Close { stream } => {
                self.streams.remove(&stream);
            }
            Action::Unjoin { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.log_forward = None;
                }
            }
            Action::Spawn {
                model,
                generation,
                cause,
                restart,
            } => self.spawn(&model, generation, cause, restart),
            Action::Stop {
                model,
                generation,
                reason,
                swap,
            } => self.stop(&model, generation, reason, swap),
            Action::Ready {
                model,
                generation,
                took,
            } => {
                if let Some(m) = self.models.get_mut(&model) {
                    m.progress = None;
                    if let Some(run) = m.run.as_mut() {
                        run.progress_tracker = None;
                    }
                }
                self.history.record(&model, Operation::Load, took);
                self.metrics.phase_finished(SwapPhase::Ready, took);
                if let Some(m) = self.models.get(&model) {
                    m.note(format!(
                        "ready after {} ms (generation {generation})",
                        millis(took)
                    ));
                }
                tracing::info!(model, generation, startup_ms = millis(took), "ready");
            }
            Action::Failed {
                model,
                reason,
                cause,
            } => {
                if let Some(m) = self.models.get(&model) {
                    m.note(format!("failed: {reason}"));
                }
                let failures = self.policy.slot(&model).map_or(0, |s| s.failures);
                tracing::warn!(model, %reason, failures, "failed");
                self.metrics.backend_failed(&model, cause);
            }
            Action::DrainBegan { model, swap } => {
                let span = match swap {
                    Some(stream) => {
                        let parent = self.span_of(stream);
                        tracing::info_span!(parent: &parent, "swap", phase = "drain", model)
                    }
                    None => tracing::Span::none(),
                };
                self.drain_spans.insert(model, span);
            }
            Action::DrainEnded { model, swap_took } => {
                self.drain_spans.remove(&model);
                if let Some(took) = swap_took {
                    self.metrics.phase_finished(SwapPhase::Drain, took);
                }
            }
            Action::Deactivated { id, stopped } => {
                if let Some(reply) = self.deactivations.remove(&id) {
                    let _ = reply.send(Ok(stopped));
                }
            }
            Action::DeactivationFailed { id, model, reason } => {
                if let Some(reply) = self.deactivations.remove(&id) {
                    let _ = reply.send(Err(Status::internal(format!("{model}: {reason}"))));
                }
            }
            Action::Removed { model } => {
                self.models.remove(&model);
                self.published.remove(&model);
                let _ = self.watch.send(pb::WatchEvent {
                    event: Some(pb::watch_event::Event::Removed(model)),
                });
            }
            Action::WakeAt(at) => {
                self.timers.insert(at);
            }
            Action::MeasureGpus => self.measure_now.notify_one(),
            Action::MakingRoom { model } => self.warm_weights(&model),
            Action::Sleep {
                model,
                generation,
                reason,
                swap,
            } => self.sleep(&model, generation, reason, swap),
            Action::Wake {
                model,
                generation,
                cause,
            } => self.wake(&model, generation, cause),
            Action::Woke {
                model,
                generation,
                took,
            } => self.woke(&model, generation, took),
        }
    }

    /// Sends what the policy says to one stream, filling in what only the actor knows.
    pub(super) fn send_notice(&mut self, id: StreamId, name: &str, notice: Notice) {
        // A waiter of a wake learns at once that it is one ("Waking X").
        let waking = match notice {
            Notice::Starting { .. } => self
                .load_progress(name)
                .filter(|progress| progress.phase == "waking"),
            _ => None,
        };
        let Some(model) = self.models.get(name) else {
            return;
        };
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        match notice {
            Notice::Event(event) => {
                if let Event::HoldLost(lost) = &event {
                    tracing::info!(
                        model = name,
                        client = stream.client,
                        reason = lost.reason,
                        "hold lost"
                    );
                }
                stream.stream.send(event);
            }
            Notice::Starting { generation } => {
                let Some(run) = model.run.as_ref().filter(|r| r.generation == generation) else {
                    return;
                };
                stream.stream.send(Event::Starting(pb::Starting {
                    model: name.to_owned(),
                    pid: run.backend.pid(),
                    generation,
                }));
                if let Some(progress) = waking {
                    stream.stream.send(Event::Progress(progress));
                }
                stream.log_forward = Some(forward_logs(
                    model.logs.subscribe(),
                    stream.stream.events.clone(),
                    stream.stream.pending.clone(),
                    stream.stream.received,
                    LostLines {
                        metrics: self.metrics.clone(),
                        model: name.to_owned(),
                    },
                ));
            }
            Notice::Ready {
                generation,
                startup_ms,
                hold,
            } => {
                stream.log_forward = None;
                stream.stream.send(Event::Ready(pb::Ready {
                    model: name.to_owned(),
                    address: client_address(&model.config),
                    served_name: model.config.served_name(name).to_owned(),
                    generation,
                    api_key: model.config.api_key.clone().unwrap_or_default(),
                    startup_ms,
                }));
                let span = std::mem::replace(&mut stream.span, tracing::Span::none());
                let _in_activation = span.enter();
                tracing::debug!(model = name, generation, startup_ms, "activation ready");
                if hold {
                    tracing::info!(model = name, client = stream.client, "hold granted");
                }
            }
            Notice::Failed { reason, log_tail } => {
                stream.log_forward = None;
                let log_tail = if log_tail {
                    model.logs.tail_lines(FAILURE_TAIL_LINES)
                } else {
                    Vec::new()
                };
                stream.span.in_scope(|| {
                    tracing::info!(model = name, reason, "activation failed");
                });
                stream.stream.send(Event::Failed(pb::Failed {
                    model: name.to_owned(),
                    reason,
                    log_tail,
                }));
            }
            Notice::Line(line) => stream.stream.send(Event::Log(pb::LogLine {
                model: name.to_owned(),
                stream: pb::LogStream::Supervisor as i32,
                line,
                time_ms: unix_millis(),
                dropped: 0,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use gpuswap::config::Config;

    use super::*;

    fn model(host: &str, port: u16) -> ModelConfig {
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = {port}\nhost = \"{host}\"\n"
        );
        Config::from_toml(&text).unwrap().models["m"].clone()
    }

    #[test]
    fn client_address_maps_wildcards_to_this_host() {
        assert_eq!(client_address(&model("127.0.0.1", 8000)), "127.0.0.1:8000");
        assert_eq!(client_address(&model("0.0.0.0", 8000)), "127.0.0.1:8000");
        assert_eq!(client_address(&model("::", 8000)), "[::1]:8000");
        assert_eq!(client_address(&model("::1", 8000)), "[::1]:8000");
    }
}
