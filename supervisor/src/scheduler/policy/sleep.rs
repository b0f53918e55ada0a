//! Sleep and wake: a model in the way by GPU memory only sleeps (its process and port
//! kept) when the host memory budget has room, made by stopping the least recently used
//! sleepers; a waiter for a sleeping model wakes it.

use gpuswap::config::format_bytes;
use tokio::time::Instant;

use super::{Action, Policy, Slot, State, StreamId, transitions::WaiterFate};

/// How host memory would be shared if a model slept.
struct SleepPlan {
    /// What the sleepers would hold once `dropped` are stopped.
    total: u64,
    /// What sleepers already stopping still hold.
    stopping: u64,
    /// The least recently used sleepers to stop first.
    dropped: Vec<String>,
    /// Why the model itself cannot sleep (it would have to be dropped).
    refused: Option<String>,
}

/// Whether a model can go to sleep now.
pub(super) enum SleepRoom {
    Now,
    /// Once the sleepers stopped for it are gone.
    Later,
    Refused(String),
}

impl Policy {
    /// The ready, drained model `name` is in the way of the waiter at `index`: it sleeps
    /// if it can (sleep on, not in the way by its port, room in the host memory budget,
    /// made by stopping the least recently used sleepers), else it stops.
    pub(super) fn sleep_or_stop_for_waiter(&mut self, index: usize, name: &str, now: Instant) {
        let target = self.queue[index].model.clone();
        let slot = &self.models[name];
        let asleep_fits = slot.occupied().sleep.is_some()
            && !slot
                .occupied()
                .shares_port_with(self.models[&target].awake());
        if !asleep_fits {
            return self.stop_for_waiter(index, name, now);
        }
        let cause = format!("{name} sleeps for {target}");
        match self.make_sleep_room(name, Some(&target), &cause, now) {
            SleepRoom::Refused(why) => self.stop_for_waiter_because(
                index,
                name,
                &format!("; it does not sleep: {why}"),
                now,
            ),
            SleepRoom::Later => {}
            SleepRoom::Now => {
                let stream = self.queue[index].stream;
                self.begin_sleep(name, &format!("{target} needs the GPUs"), Some(stream), now);
                self.notice_leaving(index, name);
            }
        }
    }

    /// How host memory would be shared if `name` slept: the least recently used sleepers
    /// (never `exempt`, a sleeping target that room is made for) to stop first.
    fn sleep_plan(&self, name: &str, exempt: Option<&str>) -> SleepPlan {
        let budget = self.settings.host_memory;
        // Sleepers that may be stopped for room in the budget, and `name` itself.
        let mut sleepers: Vec<(Option<Instant>, String, u64)> = self
            .models
            .iter()
            .filter(|(other, s)| {
                *other == name
                    || (Some(other.as_str()) != exempt
                        && s.run
                            .as_ref()
                            .is_some_and(|r| r.host_held && !r.stop_requested)
                        && matches!(s.state, State::Sleeping | State::FallingAsleep))
            })
            .map(|(other, s)| {
                let bytes = s.awake().sleep.unwrap_or(0);
                (s.last_use, other.clone(), bytes)
            })
            .collect();
        // Sleepers already stopping: their memory comes back by itself (stop_finished).
        let stopping: u64 = self
            .models
            .values()
            .filter(|s| s.run.as_ref().is_some_and(|r| r.stop_requested))
            .map(Slot::host_held)
            .sum();
        // What the others hold that is not theirs to give: the target, or waking.
        let fixed: u64 = self
            .models
            .iter()
            .filter(|(other, s)| {
                !sleepers.iter().any(|(_, n, _)| n == *other)
                    && s.run.as_ref().is_some_and(|r| !r.stop_requested)
            })
            .map(|(_, s)| s.host_held())
            .sum();
        sleepers.sort();
        let wanted: u64 = fixed + sleepers.iter().map(|(_, _, b)| b).sum::<u64>();
        let mut total = wanted;
        let mut dropped = Vec::new();
        for (_, other, bytes) in &sleepers {
            if total <= budget {
                break;
            }
            total -= bytes;
            dropped.push(other.clone());
        }
        let refused = dropped.iter().any(|d| d == name).then(|| {
            format!(
                "sleepers would hold {} of host_memory {}",
                format_bytes(wanted),
                format_bytes(budget)
            )
        });
        SleepPlan {
            total,
            stopping,
            dropped,
            refused,
        }
    }

    /// Why `name` cannot be put to sleep by a deactivation now (None: it can).
    pub fn sleep_refusal(&self, name: &str) -> Option<String> {
        let slot = self.models.get(name)?;
        if slot.awake().sleep.is_none() {
            return Some(format!("{name} has no sleep protocol (the `sleep` key)"));
        }
        if slot.state == State::Sleeping || slot.state == State::FallingAsleep {
            return None;
        }
        self.sleep_plan(name, None)
            .refused
            .map(|why| format!("{name} cannot sleep: {why}"))
    }

    /// Makes room in the host memory budget for `name`'s sleep by stopping the least
    /// recently used sleepers (`cause` says why in their stop reason).
    pub(super) fn make_sleep_room(
        &mut self,
        name: &str,
        exempt: Option<&str>,
        cause: &str,
        now: Instant,
    ) -> SleepRoom {
        let plan = self.sleep_plan(name, exempt);
        if let Some(why) = plan.refused {
            return SleepRoom::Refused(why);
        }
        let freeing = plan
            .dropped
            .iter()
            .map(|other| self.models[other].host_held())
            .sum::<u64>();
        for other in &plan.dropped {
            self.begin_stop(
                other,
                &format!("host memory for sleeping models is full: {cause}"),
                WaiterFate::Requeue,
                None,
                now,
            );
        }
        if plan.total + plan.stopping + freeing > self.settings.host_memory {
            // It sleeps once the stopped sleepers' processes are gone (stop_finished).
            return SleepRoom::Later;
        }
        SleepRoom::Now
    }

    /// Puts a drained, ready `name` to sleep: holds are lost, the actor sleeps it.
    pub(super) fn begin_sleep(
        &mut self,
        name: &str,
        reason: &str,
        swap: Option<StreamId>,
        now: Instant,
    ) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        let Some(run) = slot.run.as_mut() else {
            return;
        };
        run.host_held = true;
        let generation = run.generation;
        slot.state = State::FallingAsleep;
        self.revoke_holds(name, reason);
        self.end_drain(name, now);
        self.out.push(Action::Sleep {
            model: name.to_owned(),
            generation,
            reason: reason.to_owned(),
            swap,
        });
    }

    /// Wakes the sleeping target of the waiter at `index`, which follows the wake.
    pub(super) fn wake(&mut self, index: usize, now: Instant) {
        let waiter = &mut self.queue[index];
        let (stream, target) = (waiter.stream, waiter.model.clone());
        let slot = self.models.get_mut(&target).expect("a configured model");
        let Some(run) = slot.run.as_mut() else {
            return;
        };
        run.waking_since = Some(now);
        let generation = run.generation;
        slot.state = State::Waking;
        waiter.joined = Some(generation);
        self.out.push(Action::Wake {
            model: target,
            generation,
            cause: stream,
        });
    }
}
