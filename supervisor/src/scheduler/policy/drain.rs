//! Holds and their drains: holders are asked to let go before their model is taken away.

use gpuswap::pb::{self, activate_event::Event};
use tokio::time::Instant;

use super::{Action, Drain, Notice, Policy, StreamId, millis};

impl Policy {
    /// Ends every hold of `name` with HoldLost.
    pub(super) fn revoke_holds(&mut self, name: &str, reason: &str) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        for (stream, _) in std::mem::take(&mut slot.holds) {
            self.send(
                stream,
                name,
                Notice::Event(Event::HoldLost(pb::HoldLost {
                    model: name.to_owned(),
                    reason: reason.to_owned(),
                })),
            );
            self.out.push(Action::Close { stream });
        }
    }

    /// Asks every holder of `name` (once each) to finish its requests and let go.
    pub(super) fn request_drain(
        &mut self,
        name: &str,
        wanted_by: &str,
        deadline: Instant,
        now: Instant,
    ) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        let mut asked = Vec::new();
        for (stream, hold) in &mut slot.holds {
            if !hold.drain_requested {
                hold.drain_requested = true;
                asked.push(*stream);
            }
        }
        for stream in asked {
            self.send(
                stream,
                name,
                Notice::Event(Event::DrainRequested(pb::DrainRequested {
                    model: name.to_owned(),
                    wanted_by: wanted_by.to_owned(),
                    deadline_ms: millis(deadline.saturating_duration_since(now)),
                })),
            );
        }
    }

    /// The drain of `name` is over (its holds are gone, or its backend failed).
    pub(super) fn end_drain(&mut self, name: &str, now: Instant) {
        if let Some(drain) = self.models.get_mut(name).and_then(|s| s.drain.take()) {
            self.out.push(Action::DrainEnded {
                model: name.to_owned(),
                swap_took: drain.for_swap.then(|| now - drain.started),
            });
        }
    }

    pub(super) fn begin_drain(
        &mut self,
        name: &str,
        deadline: Instant,
        now: Instant,
        swap: Option<StreamId>,
    ) {
        if let Some(slot) = self.models.get_mut(name) {
            slot.drain = Some(Drain {
                deadline,
                started: now,
                for_swap: swap.is_some(),
            });
            self.out.push(Action::DrainBegan {
                model: name.to_owned(),
                swap,
            });
        }
    }
}
