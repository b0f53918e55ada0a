//! Idle models: a hold let go once its model was idle past its TTL (and unloaded when no
//! other client holds it), and the models' last use reported to the supervisor.

use std::{
    sync::{Arc, atomic::Ordering::SeqCst},
    time::{Duration, Instant},
};

use gpuswap::{SupervisorClient, pb};
use tokio::sync::mpsc;

use super::{Message, actor::Actor};
use crate::catalog::describe_status;

impl Actor {
    pub(super) fn on_idle_unheld(&mut self, model: Arc<str>, generation: u64) {
        let Some(slot) = self.slots.get(&model) else {
            return;
        };
        if slot.activation.is_some() || !slot.waiters.is_empty() {
            return; // wanted again meanwhile
        }
        let mut client = self.client.clone();
        tokio::spawn(async move {
            // Only if still idle as seen: a request from another client that came in since
            // the Status poll keeps its model (no drain, no reload).
            let request = pb::DeactivateRequest {
                model: model.to_string(),
                all: false,
                force: false,
                if_idle_generation: Some(generation),
                sleep: false,
            };
            match client.deactivate(request).await {
                Ok(response) if response.get_ref().stopped.is_empty() => {
                    tracing::info!(%model, generation, "idle: in use again, left running")
                }
                Ok(_) => tracing::info!(%model, "idle: deactivated"),
                Err(status) => {
                    tracing::warn!(%model, "idle deactivation failed: {}", describe_status(&status))
                }
            }
        });
    }

    /// Tells the supervisor when the models with a route were last used (requests in flight:
    /// now), so that the least recently used one is stopped to make room. One call at a
    /// time, only for models used since the last report.
    pub(super) fn report_use(&mut self) {
        if self.reporting.load(SeqCst) {
            return;
        }
        let mut uses = Vec::new();
        for (model, slot) in &self.slots {
            let Some(route) = &slot.route else { continue };
            let last_done = route.last_done.load(SeqCst);
            let busy = route.in_flight.load(SeqCst) > 0;
            if !busy && self.reported_use.get(model) == Some(&last_done) {
                continue;
            }
            self.reported_use.insert(Arc::clone(model), last_done);
            uses.push(pb::ModelUse {
                model: model.to_string(),
                idle_ms: if busy { 0 } else { millis(route.idle_for()) },
            });
        }
        if uses.is_empty() {
            return;
        }
        self.reporting.store(true, SeqCst);
        let (mut client, reporting) = (self.client.clone(), Arc::clone(&self.reporting));
        tokio::spawn(async move {
            if let Err(status) = client.report_use(pb::ReportUseRequest { uses }).await {
                tracing::debug!("reporting model use failed: {}", describe_status(&status));
            }
            reporting.store(false, SeqCst);
        });
    }

    pub(super) fn release_if_idle(&mut self, model: &Arc<str>) {
        let Some(slot) = self.slots.get(model) else {
            return;
        };
        let Some(route) = &slot.route else { return };
        if !slot.waiters.is_empty() || !route.accepting.load(SeqCst) {
            return;
        }
        let ttl = self
            .catalog
            .load()
            .resolve(model)
            .and_then(|m| m.idle_ttl)
            .unwrap_or(self.config.idle_ttl);
        if ttl.is_zero() || route.in_flight.load(SeqCst) != 0 || route.idle_for() < ttl {
            return;
        }
        // Stop admitting first, then look again: a request that entered in
        // between is seen here (or sees the flag and queues as a waiter).
        route.accepting.store(false, SeqCst);
        if route.in_flight.load(SeqCst) != 0 {
            route.accepting.store(true, SeqCst);
            return;
        }
        tracing::info!(%model, idle_s = route.idle_for().as_secs(), "idle: releasing the hold");
        self.release(model);
        tokio::spawn(report_when_unheld(
            self.client.clone(),
            Arc::clone(model),
            self.tx.clone(),
        ));
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// After an idle release, waits until the supervisor shows no holder of the
/// model (another client may hold it: then leave it running).
async fn report_when_unheld(
    mut client: SupervisorClient,
    model: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let Ok(status) = client.status(pb::StatusRequest {}).await else {
            return;
        };
        let Some(m) = status
            .into_inner()
            .models
            .into_iter()
            .find(|m| *m.name == *model)
        else {
            return;
        };
        if m.state() != pb::ModelState::Ready {
            return;
        }
        if m.holders == 0 {
            let generation = m.generation;
            let _ = tx.send(Message::IdleUnheld { model, generation });
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
