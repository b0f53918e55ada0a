//! The queue: [`Policy::pump`] walks the waiting activations in arrival order.

use std::collections::HashSet;

use gpuswap::pb::{self, activate_event::Event};
use tokio::time::Instant;

use super::{super::placement::Placement, Action, Notice, Policy, Run, State};

/// One walk over the queue: what the waiters seen so far decided, for the next ones.
pub(super) struct Pass<'a> {
    pub(super) now: Instant,
    /// The models of the earlier waiters that still wait: later ones wait behind them, and
    /// they are never stopped for a later one.
    pub(super) reserved: Vec<String>,
    /// Models somebody currently needs stopped (their drains stay armed).
    pub(super) needed: HashSet<String>,
    /// Why a model cannot start now (a required file is missing).
    pub(super) unavailable: &'a dyn Fn(&str) -> Option<String>,
}

impl Policy {
    /// Walks the waiters in arrival order and moves each as far as it can go.
    /// `unavailable` says why a model cannot start now (a required file is missing).
    pub fn pump(&mut self, now: Instant, unavailable: &dyn Fn(&str) -> Option<String>) {
        let mut pass = Pass {
            now,
            reserved: Vec::new(),
            needed: HashSet::new(),
            unavailable,
        };
        self.pump_deactivations(&mut pass);
        let mut index = 0;
        while index < self.queue.len() {
            let target = self.queue[index].model.clone();
            // Only a waiter that is still waiting reserves its model against later ones.
            if self.advance(index, &mut pass) {
                if !pass.reserved.contains(&target) {
                    pass.reserved.push(target);
                }
                index += 1;
            }
        }
        // Holds are sticky: once nobody waits for a model's room its drain is called off.
        let names: Vec<String> = self
            .models
            .iter()
            .filter(|(name, slot)| slot.drain.is_some() && !pass.needed.contains(*name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            if let Some(slot) = self.models.get_mut(&name) {
                slot.drain = None;
                self.out.push(Action::DrainEnded {
                    model: name,
                    swap_took: None,
                });
            }
        }
    }

    /// Why `target` can never start now: bigger than a GPU, or in the way of a pinned model
    /// (which is never stopped to make room).
    fn cannot_run(&self, target: &str) -> Option<String> {
        let placement = &self.models[target].placement;
        let capacity = &self.settings.capacity;
        if let Some(why) = capacity.too_big(target, placement) {
            return Some(why);
        }
        let pinned: Vec<(&str, &Placement)> = self
            .models
            .iter()
            .filter(|(name, slot)| *name != target && slot.live() && slot.occupied().pinned)
            .map(|(name, slot)| (name.as_str(), slot.occupied()))
            .collect();
        let mut members = vec![(target, placement)];
        members.extend(pinned.iter().copied());
        let clash = capacity.clash(&members)?;
        let blockers: Vec<&str> = pinned
            .iter()
            .filter(|p| !capacity.fits(&[(target, placement), **p]))
            .map(|(name, _)| *name)
            .collect();
        let blockers = if blockers.is_empty() {
            pinned.iter().map(|(name, _)| *name).collect()
        } else {
            blockers
        };
        let plural = if blockers.len() > 1 { "s" } else { "" };
        Some(format!(
            "{target} cannot run next to pinned model{plural} {} ({clash}); a pinned model is \
             never stopped to make room (deactivate it first)",
            blockers.join(", ")
        ))
    }

    /// Moves the waiter at `index` forward. Returns false when it left the queue.
    fn advance(&mut self, index: usize, pass: &mut Pass<'_>) -> bool {
        let target = self.queue[index].model.clone();
        let Some(slot) = self.models.get(&target).filter(|s| !s.removed) else {
            self.fail_waiter(
                index,
                format!("model {target} was removed from the configuration"),
            );
            return false;
        };
        if (slot.run.is_none() || slot.state == State::Sleeping)
            && let Some(why) = self.cannot_run(&target)
        {
            self.fail_waiter(index, why);
            return false;
        }
        if let Some(blocker) = self.blocker(&target, &pass.reserved) {
            self.queued(index, &blocker.clone(), blocker);
            return true;
        }
        if self
            .deactivations
            .iter()
            .any(|d| d.models.contains(&target))
        {
            self.queued(index, "deactivate", target);
            return true;
        }
        let slot = &self.models[&target];
        match slot.state {
            State::Ready => {
                self.grant(index, pass.now);
                false
            }
            State::Starting | State::Waking => {
                self.join_start(index);
                true
            }
            // The target's own process is still going away (or to sleep: it wakes after).
            State::Stopping | State::FallingAsleep => true,
            State::Failed if slot.run.is_some() => true,
            State::Stopped | State::Failed | State::Sleeping => {
                self.make_room_or_start(index, pass)
            }
        }
    }

    /// Tells the waiter at `index` (once per place and `why`) that it waits behind `behind`.
    fn queued(&mut self, index: usize, why: &str, behind: String) {
        let position = index as u32 + 1;
        self.notice(
            index,
            format!("queued:{position}:{why}"),
            Event::Queued(pb::Queued { position, behind }),
        );
    }

    /// The earlier waiter's model `target` waits behind: the first one (in arrival order)
    /// that cannot run together with `target` and the earlier ones that can.
    fn blocker(&self, target: &str, reserved: &[String]) -> Option<String> {
        let capacity = &self.settings.capacity;
        // A sleeping model an earlier waiter wants takes its GPU memory again.
        let mut group: Vec<(&str, &Placement)> = vec![(target, self.models[target].awake())];
        for other in reserved.iter().filter(|o| *o != target) {
            let Some(slot) = self.models.get(other) else {
                continue;
            };
            let member = (other.as_str(), slot.awake());
            group.push(member);
            if capacity.fits(&group) {
                continue;
            }
            group.pop();
            // Only in the way if it would fit with the others without the target: else it
            // waits itself, and is not what keeps the target waiting.
            let mut without_target: Vec<(&str, &Placement)> = group[1..].to_vec();
            without_target.push(member);
            if capacity.fits(&without_target) {
                return Some(other.clone());
            }
        }
        None
    }

    /// The waiter follows the start of its model: Starting once, then its log lines.
    fn join_start(&mut self, index: usize) {
        let waiter = &mut self.queue[index];
        let Some(run) = self.models.get(&waiter.model).and_then(|m| m.run.as_ref()) else {
            return;
        };
        if waiter.joined == Some(run.generation) {
            return;
        }
        waiter.joined = Some(run.generation);
        let (stream, model, generation) = (waiter.stream, waiter.model.clone(), run.generation);
        self.send(stream, &model, Notice::Starting { generation });
    }

    /// Starts the target for the waiter at `index`, which follows the start.
    pub(super) fn start(&mut self, index: usize, now: Instant) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let waiter = &mut self.queue[index];
        waiter.joined = Some(generation);
        let (stream, target) = (waiter.stream, waiter.model.clone());
        let slot = self.models.get_mut(&target).expect("a configured model");
        let restart = slot.failures > 0;
        if restart {
            slot.restarts += 1;
        }
        slot.state = State::Starting;
        slot.generation = generation;
        slot.ready_at = None;
        slot.last_wake = None;
        slot.run = Some(Run::new(generation, slot.placement.clone(), now));
        self.out.push(Action::Spawn {
            model: target,
            generation,
            cause: stream,
            restart,
        });
    }
}
