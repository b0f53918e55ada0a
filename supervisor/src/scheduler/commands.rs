//! Requests from the gRPC service.

use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::{
    Command,
    actor::{Actor, Flow, Stream},
};

impl Actor {
    pub(super) fn command(&mut self, command: Command) -> Flow {
        match command {
            Command::Activate {
                args,
                received,
                events,
                accepted,
            } => {
                let Some(model) = self.resolve(&args.model) else {
                    args.span
                        .in_scope(|| tracing::info!(model = args.model, "unknown model"));
                    let _ = accepted.send(Err(Status::not_found(format!(
                        "unknown model {}",
                        args.model
                    ))));
                    return Flow::Continue;
                };
                let stream = self.client_stream(events, received);
                args.span.in_scope(|| {
                    tracing::info!(
                        model,
                        client = %args.client,
                        hold = args.hold,
                        force = args.force,
                        "activate"
                    );
                });
                let id = stream.id;
                self.policy.activate(id, &model, args.hold, args.force);
                self.streams.insert(
                    id,
                    Stream {
                        stream,
                        model,
                        client: args.client,
                        log_forward: None,
                        span: args.span,
                    },
                );
                let _ = accepted.send(Ok(()));
            }
            Command::Deactivate {
                model,
                force,
                sleep,
                if_idle_generation,
                reply,
            } => {
                let models: Vec<String> = match model {
                    None => self.models.keys().cloned().collect(),
                    Some(name) => match self.resolve(&name) {
                        Some(model) => vec![model],
                        None => {
                            let _ =
                                reply.send(Err(Status::not_found(format!("unknown model {name}"))));
                            return Flow::Continue;
                        }
                    },
                };
                if let Some(seen) = if_idle_generation
                    && let Some(busy) = models
                        .iter()
                        .find_map(|name| self.policy.in_use_since(name, seen))
                {
                    tracing::info!(?models, seen, busy, "idle deactivation skipped");
                    let _ = reply.send(Ok(Vec::new()));
                    return Flow::Continue;
                }
                if sleep && let Some(why) = models.iter().find_map(|m| self.policy.sleep_refusal(m))
                {
                    let _ = reply.send(Err(Status::failed_precondition(why)));
                    return Flow::Continue;
                }
                tracing::info!(?models, force, sleep, "deactivate");
                let id = self.next_deactivation;
                self.next_deactivation += 1;
                self.deactivations.insert(id, reply);
                self.policy
                    .deactivate(id, models, force, sleep, Instant::now());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status_response());
            }
            Command::Watch { reply } => {
                // Publish first so the snapshot and the stream of changes line up.
                self.publish_changes();
                let receiver = self.watch.subscribe();
                let _ = reply.send((self.status_response(), receiver));
            }
            Command::Logs { model, reply } => {
                let result = match model {
                    None => Ok(self
                        .models
                        .iter()
                        .filter(|(name, _)| self.policy.slot(name).is_some_and(|s| !s.removed))
                        .map(|(_, m)| m.logs.clone())
                        .collect()),
                    Some(name) => match self.resolve(&name) {
                        Some(model) => Ok(vec![self.models[&model].logs.clone()]),
                        None => Err(Status::not_found(format!("unknown model {name}"))),
                    },
                };
                let _ = reply.send(result);
            }
            Command::Reload { config, reply } => {
                let _ = reply.send(Ok(self.reload(*config)));
            }
            Command::ReportUse { uses, received } => {
                for usage in uses {
                    if let Some(model) = self.resolve(&usage.model) {
                        let ended = received
                            .checked_sub(Duration::from_millis(usage.idle_ms))
                            .unwrap_or(received);
                        self.policy.used(&model, ended);
                    }
                }
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
        Flow::Continue
    }
}
