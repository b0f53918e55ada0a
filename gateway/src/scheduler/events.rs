//! What an activation's events do: progress for the waiters (and the status page), a
//! published route once the model is ready, a remembered failure when it is not.

use std::{
    sync::{Arc, atomic::Ordering::SeqCst},
    time::Instant,
};

use gpuswap::pb;
use http::{HeaderValue, uri::Authority};

use super::{
    Progress,
    actor::{Actor, STARTING, fail_waiters},
    hold::failure_backoff,
};
use crate::{catalog::EventKind, error::ApiError, route::Route};

impl Actor {
    pub(super) fn on_event(
        &mut self,
        model: Arc<str>,
        activation: u64,
        event: pb::activate_event::Event,
    ) {
        use pb::activate_event::Event as E;
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        let Some(activation) = slot.activation.as_mut().filter(|a| a.id == activation) else {
            return; // a stream we already let go of
        };
        // A sleeping model wakes in its own process: much faster than a load.
        if matches!(&event, E::Progress(p) if p.phase == "waking") {
            activation.wakes = true;
        }
        let verb = if activation.wakes {
            "Waking"
        } else {
            "Loading"
        };
        let progress = match event {
            E::Queued(q) => Progress {
                phase: "queued",
                text: if q.behind.is_empty() {
                    format!("Waiting to load {model} (queue position {})", q.position)
                } else {
                    format!(
                        "Waiting to load {model}: queued behind {} (position {})",
                        q.behind, q.position
                    )
                },
                queue_position: Some(q.position),
                percent: None,
            },
            E::Draining(d) => Progress {
                phase: "draining",
                text: if d.residency_ms > 0 {
                    format!(
                        "{verb} {model}: {} keeps the GPU {} s more, then finishes its requests",
                        d.model,
                        d.residency_ms.div_ceil(1000)
                    )
                } else {
                    format!(
                        "{verb} {model}: waiting for {} to finish its requests",
                        d.model
                    )
                },
                queue_position: None,
                percent: None,
            },
            E::Stopping(s) => Progress {
                phase: "stopping",
                text: format!("{verb} {model} (stopping {})", s.model),
                queue_position: None,
                percent: None,
            },
            E::Starting(_) => {
                for waiter in slot.waiters.iter_mut().filter(|w| !w.swap_counted) {
                    self.metrics.swap_waited(&model);
                    waiter.swap_counted = true;
                }
                Progress {
                    phase: STARTING,
                    text: format!("{verb} {model}"),
                    queue_position: None,
                    percent: None,
                }
            }
            E::Progress(p) => {
                let said = gpuswap::progress_text(&p);
                Progress {
                    phase: STARTING,
                    text: if said.is_empty() {
                        format!("{verb} {model}")
                    } else {
                        format!("{verb} {model}: {said}")
                    },
                    queue_position: None,
                    percent: p.percent,
                }
            }
            E::Log(line) => {
                // The status page shows what a loading backend prints.
                self.catalog.publish(
                    model,
                    EventKind::Progress {
                        phase: STARTING,
                        text: line.line,
                    },
                );
                return;
            }
            E::Ready(ready) => return self.on_ready(model, ready),
            E::Failed(failed) => return self.on_failed(model, failed),
            E::DrainRequested(d) => return self.on_drain_requested(model, d),
            E::HoldLost(lost) => {
                tracing::info!(%model, reason = %lost.reason, "hold lost");
                return self.on_hold_ended(&model, None);
            }
        };
        for waiter in &slot.waiters {
            if let Some(tx) = &waiter.progress {
                let _ = tx.try_send(progress.clone());
            }
        }
        self.catalog.publish(
            Arc::clone(&model),
            EventKind::Progress {
                phase: progress.phase,
                text: progress.text.clone(),
            },
        );
        slot.progress = Some(progress);
    }

    fn on_ready(&mut self, model: Arc<str>, ready: pb::Ready) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        let upstream = match upstream_authority(&ready.address) {
            Ok(a) => a,
            Err(why) => {
                let error = ApiError::backend_unavailable(&model, gpuswap::error_chain(&why));
                fail_waiters(slot, &error);
                slot.activation = None;
                return;
            }
        };
        let served_name = if ready.served_name.is_empty() {
            model.to_string()
        } else {
            ready.served_name
        };
        let api_key = backend_key_headers(&ready.api_key);
        let route = Arc::new(Route::new(
            Arc::clone(&model),
            upstream,
            served_name,
            api_key,
            ready.generation,
            self.tx.clone(),
            self.config.upstream_idle_timeout,
        ));
        if let Some(old) = slot.route.take() {
            old.accepting.store(false, SeqCst);
            self.routes.unpublish(&model, old.generation);
        }
        tracing::info!(
            %model,
            generation = ready.generation,
            address = %ready.address,
            startup_ms = ready.startup_ms,
            waiters = slot.waiters.len(),
            "ready"
        );
        self.routes.publish(Arc::clone(&route));
        if let Some(a) = slot.activation.as_mut() {
            a.ready_at = Some(Instant::now());
        }
        slot.route = Some(Arc::clone(&route));
        slot.failure = None;
        slot.failures = 0;
        slot.progress = None;
        slot.keep = false;
        // Every waiter gets its request counted in before the grant, so a drain
        // that starts between the grant and the forward waits for it.
        while let Some(waiter) = slot.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            let _ = waiter.reply.send(Ok(route.enter_unchecked()));
        }
    }

    fn on_failed(&mut self, model: Arc<str>, failed: pb::Failed) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        tracing::warn!(%model, reason = %failed.reason, "start failed");
        let log_tail = if self.config.expose_log_tail {
            failed.log_tail
        } else {
            Vec::new()
        };
        let error = ApiError::start_failed(&model, &failed.reason, log_tail);
        fail_waiters(slot, &error);
        slot.failures += 1;
        let backoff = failure_backoff(slot.failures);
        let until = Instant::now() + backoff;
        slot.failure = Some((error, until));
        slot.retry_at = Some(until);
        slot.activation = None;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(&model, route.generation);
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the supervisor reported an invalid address {address:?}")]
struct InvalidAddress {
    address: String,
    source: http::uri::InvalidUri,
}

/// The authority to connect to; a wildcard bind address means this host.
fn upstream_authority(address: &str) -> Result<Authority, InvalidAddress> {
    let address = if let Some(port) = address.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = address.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        address.to_owned()
    };
    address
        .parse::<Authority>()
        .map_err(|source| InvalidAddress { address, source })
}

fn backend_key_headers(key: &str) -> Option<(HeaderValue, HeaderValue)> {
    if key.is_empty() {
        return None;
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    let mut plain = HeaderValue::from_str(key).ok()?;
    bearer.set_sensitive(true);
    plain.set_sensitive(true);
    Some((bearer, plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_become_loopback() {
        assert_eq!(
            upstream_authority("0.0.0.0:30000").unwrap().as_str(),
            "127.0.0.1:30000"
        );
        assert_eq!(upstream_authority("[::]:1").unwrap().as_str(), "[::1]:1");
        assert_eq!(
            upstream_authority("10.0.0.1:5").unwrap().port_u16(),
            Some(5)
        );
        assert!(upstream_authority("not an address").is_err());
    }
}
