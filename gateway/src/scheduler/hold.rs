//! The end of a hold: a drain the supervisor asks for, the release once the last request
//! finished, a hold lost or a stream broken; and the backoffs before the next activation.

use std::{
    sync::{Arc, atomic::Ordering::SeqCst},
    time::{Duration, Instant},
};

use gpuswap::pb;

use super::actor::{Actor, fail_waiters};
use crate::{catalog::describe_status, error::ApiError};

/// A hold that lived this long was healthy: the next loss starts backoff afresh.
const HEALTHY_HOLD: Duration = Duration::from_secs(10);

impl Actor {
    pub(super) fn on_drain_requested(&mut self, model: Arc<str>, drain: pb::DrainRequested) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        tracing::info!(%model, wanted_by = %drain.wanted_by, "drain requested");
        match &slot.route {
            Some(route) => {
                route.accepting.store(false, SeqCst);
                self.routes.unpublish(&model, route.generation);
                if route.in_flight.load(SeqCst) == 0 {
                    self.release(&model);
                }
            }
            None => self.release(&model),
        }
    }

    pub(super) fn on_drained(&mut self, model: &Arc<str>, generation: u64) {
        let Some(slot) = self.slots.get(model) else {
            return;
        };
        let done = slot.route.as_ref().is_some_and(|r| {
            r.generation == generation && !r.accepting.load(SeqCst) && r.in_flight.load(SeqCst) == 0
        });
        if done {
            self.release(model);
        }
    }

    /// Lets go of a hold whose requests all finished (drain or idle); waiters
    /// that queued meanwhile get a new activation behind the other model.
    pub(super) fn release(&mut self, model: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        tracing::debug!(%model, waiters = slot.waiters.len(), "releasing the hold");
        slot.activation = None;
        slot.churn = 0;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(model, route.generation);
        }
        self.ensure_activation(model);
    }

    pub(super) fn on_ended(
        &mut self,
        model: &Arc<str>,
        activation: u64,
        error: Option<tonic::Status>,
    ) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        if slot.activation.as_ref().map(|a| a.id) != Some(activation) {
            return;
        }
        let was_ready = slot
            .activation
            .as_ref()
            .is_some_and(|a| a.ready_at.is_some());
        if let Some(status) = &error
            && !was_ready
        {
            let api_error = if status.code() == tonic::Code::NotFound {
                ApiError::model_not_found(model)
            } else {
                ApiError::supervisor_unavailable(describe_status(status))
            };
            tracing::warn!(%model, "activation failed: {}", describe_status(status));
            fail_waiters(slot, &api_error);
        }
        self.on_hold_ended(model, error.as_ref());
    }

    /// The supervisor ended a hold (lost, crashed, or the stream broke):
    /// forget the route at once; waiters get a new activation after a backoff
    /// that grows while holds keep ending early.
    pub(super) fn on_hold_ended(&mut self, model: &Arc<str>, error: Option<&tonic::Status>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        let lived = slot
            .activation
            .as_ref()
            .and_then(|a| a.ready_at)
            .map(|t| t.elapsed());
        slot.activation = None;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(model, route.generation);
        }
        if lived.is_some_and(|l| l >= HEALTHY_HOLD) {
            slot.churn = 0;
        } else {
            slot.churn += 1;
        }
        let mut delay = churn_backoff(slot.churn);
        if error.is_some() {
            delay = delay.max(Duration::from_millis(200));
        }
        slot.retry_at = (!delay.is_zero()).then(|| Instant::now() + delay);
        self.ensure_activation(model);
    }
}

/// 1 s, 2 s, 4 s ... 30 s after consecutive start failures.
pub(super) fn failure_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(5);
    (Duration::from_secs(1) * (1 << shift)).min(Duration::from_secs(30))
}

/// 0, 100 ms, 200 ms ... 5 s after consecutive early hold losses.
fn churn_backoff(churn: u32) -> Duration {
    if churn <= 1 {
        return Duration::ZERO;
    }
    let shift = (churn - 2).min(6);
    (Duration::from_millis(100) * (1 << shift)).min(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_and_cap() {
        assert_eq!(failure_backoff(1), Duration::from_secs(1));
        assert_eq!(failure_backoff(3), Duration::from_secs(4));
        assert_eq!(failure_backoff(50), Duration::from_secs(30));
        assert_eq!(churn_backoff(1), Duration::ZERO);
        assert_eq!(churn_backoff(2), Duration::from_millis(100));
        assert_eq!(churn_backoff(60), Duration::from_secs(5));
    }
}
