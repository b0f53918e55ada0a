//! Making room for a waiter's model: what is in its way drains, then sleeps or stops.

use gpuswap::{
    config::format_bytes,
    pb::{self, activate_event::Event},
};
use tokio::time::Instant;

use super::{
    super::placement::{Candidate, Placement, choose_evictions},
    Action, Notice, Policy, Slot, State, millis,
    queue::Pass,
    transitions::WaiterFate,
};

/// What keeps a ready model in the way of a waiter a while longer.
#[derive(Clone, Copy)]
enum Keeps {
    /// Its `min_residency`, which ends then.
    Residency(Instant),
    /// Its holders, asked to let go by this deadline.
    Holders(Instant),
}

impl Policy {
    /// The target is not running: drain and stop what is in its way, then start it.
    pub(super) fn make_room_or_start(&mut self, index: usize, pass: &mut Pass<'_>) -> bool {
        let now = pass.now;
        let target = self.queue[index].model.clone();
        if let Some(why) = (pass.unavailable)(&target) {
            self.fail_waiter(index, format!("model {target} is unavailable: {why}"));
            return false;
        }
        let slot = &self.models[&target];
        if let Some(retry_at) = slot.retry_at
            && retry_at > now
        {
            let line = format!(
                "restarting {target} in {:.1}s after {} consecutive failure(s): {}",
                (retry_at - now).as_secs_f64(),
                slot.failures,
                slot.last_error
            );
            let key = format!("backoff:{}", slot.failures);
            self.out.push(Action::WakeAt(retry_at));
            self.notice_once(index, key, Notice::Line(line));
            return true;
        }
        let capacity = &self.settings.capacity;
        let placement = slot.awake();
        let occupants: Vec<(&String, &Slot)> = self
            .models
            .iter()
            .filter(|(name, other)| **name != target && other.run.is_some())
            .collect();
        let mut members = vec![(target.as_str(), placement)];
        members.extend(occupants.iter().map(|(n, s)| (n.as_str(), s.occupied())));
        if capacity.fits(&members) {
            if let Some((gpu, missing)) = self.memory_shortfall(&target) {
                // Look again now (the reading may predate the last stop), then on each poll.
                if !self.measuring {
                    self.measuring = true;
                    self.out.push(Action::MeasureGpus);
                }
                let line = format!("waiting for {} to free on GPU {gpu}", format_bytes(missing));
                self.notice_once(index, format!("memory:{gpu}"), Notice::Line(line));
                return true;
            }
            if slot.state == State::Sleeping {
                self.wake(index, now);
            } else {
                self.start(index, now);
            }
            return true;
        }
        // A sleeper in the way (by its port) is stopped like a running model.
        let movable = |s: &Slot| s.live() || s.state == State::Sleeping;
        // Already going away (or to sleep): they free their room by themselves.
        let going: Vec<String> = occupants
            .iter()
            .filter(|(_, s)| !movable(s))
            .map(|(n, _)| (*n).clone())
            .collect();
        // Never stopped for this waiter: pinned models, and those earlier waiters wait for.
        let staying: Vec<(&str, &Placement)> = occupants
            .iter()
            .filter(|(n, s)| movable(s) && (s.occupied().pinned || pass.reserved.contains(n)))
            .map(|(n, s)| (n.as_str(), s.occupied()))
            .collect();
        let candidates: Vec<Candidate> = occupants
            .iter()
            .filter(|(n, s)| movable(s) && !s.occupied().pinned && !pass.reserved.contains(n))
            .map(|(n, s)| Candidate {
                name: (*n).clone(),
                placement: s.occupied().clone(),
                held: !s.holds.is_empty(),
                last_use: s.last_use,
                load_time: s.last_startup,
            })
            .collect();
        let evict = choose_evictions(capacity, (&target, placement), &staying, &candidates);
        for name in &going {
            self.notice_leaving(index, name);
        }
        self.out.push(Action::MakingRoom {
            model: target.clone(),
        });
        // None: only models that earlier waiters want are in the way; they go first.
        let force = self.queue[index].force;
        for name in evict.unwrap_or_default() {
            self.make_room(index, &name, force, pass);
        }
        true
    }

    /// Stops `name` because the waiter at `index` needs its room.
    pub(super) fn stop_for_waiter(&mut self, index: usize, name: &str, now: Instant) {
        self.stop_for_waiter_because(index, name, "", now);
    }

    /// Stops `name` because the waiter at `index` needs its room (`more`: why not sleep).
    pub(super) fn stop_for_waiter_because(
        &mut self,
        index: usize,
        name: &str,
        more: &str,
        now: Instant,
    ) {
        let waiter = &self.queue[index];
        let (stream, target) = (waiter.stream, waiter.model.clone());
        self.notice(
            index,
            format!("stopping:{name}"),
            Event::Stopping(pb::Stopping {
                model: name.to_owned(),
            }),
        );
        self.begin_stop(
            name,
            &format!("{target} needs the GPUs{more}"),
            WaiterFate::Requeue,
            Some(stream),
            now,
        );
    }

    /// Moves the model `name` in the way one step towards stopped, for the waiter at `index`.
    fn make_room(&mut self, index: usize, name: &str, force: bool, pass: &mut Pass<'_>) {
        let now = pass.now;
        let target = self.queue[index].model.clone();
        let wanted_elsewhere = self.queue.iter().any(|w| w.model == name);
        let Some(slot) = self.models.get(name) else {
            return;
        };
        match slot.state {
            State::Stopping | State::Failed | State::Stopped | State::FallingAsleep => {
                self.notice_leaving(index, name);
            }
            // In the way by its port: asleep it holds no GPU memory.
            State::Sleeping => self.stop_for_waiter(index, name, now),
            State::Starting | State::Waking => {
                // Only a start nobody waits for can be in the way (a later waiter of it
                // waits behind this one): cancel it.
                if !wanted_elsewhere {
                    self.stop_for_waiter(index, name, now);
                }
            }
            State::Ready => {
                let ready_at = slot.ready_at.unwrap_or(now);
                let residency_end = ready_at + self.settings.min_residency;
                if residency_end > now {
                    return self.in_the_way_until(
                        index,
                        name,
                        Keeps::Residency(residency_end),
                        now,
                    );
                }
                pass.needed.insert(name.to_owned());
                if !slot.holds.is_empty() {
                    let deadline = match &slot.drain {
                        Some(drain) => drain.deadline,
                        None => {
                            let deadline = now + self.settings.drain_timeout;
                            let swap = self.queue[index].stream;
                            self.begin_drain(name, deadline, now, Some(swap));
                            deadline
                        }
                    };
                    self.request_drain(name, &target, deadline, now);
                    if force || now >= deadline {
                        let reason = if force {
                            format!("revoked: {target} was activated with force")
                        } else {
                            format!("revoked: drain_timeout passed while {target} waited")
                        };
                        self.revoke_holds(name, &reason);
                    } else {
                        return self.in_the_way_until(index, name, Keeps::Holders(deadline), now);
                    }
                }
                self.sleep_or_stop_for_waiter(index, name, now);
            }
        }
    }

    /// The ready model `name` stays in the way of the waiter at `index` until the time
    /// `keeps` says: the waiter is told (once), the policy looks again then.
    fn in_the_way_until(&mut self, index: usize, name: &str, keeps: Keeps, now: Instant) {
        let (key, until, deadline_ms, residency_ms) = match keeps {
            Keeps::Residency(end) => (format!("residency:{name}"), end, 0, millis(end - now)),
            Keeps::Holders(deadline) => (
                format!("draining:{name}"),
                deadline,
                millis(deadline - now),
                0,
            ),
        };
        let holders = self.models[name].holds.len() as u32;
        self.out.push(Action::WakeAt(until));
        self.notice(
            index,
            key,
            Event::Draining(pb::Draining {
                model: name.to_owned(),
                holders,
                deadline_ms,
                residency_ms,
            }),
        );
    }

    /// Tells the waiter at `index` (once) that `name` is going away or to sleep.
    pub(super) fn notice_leaving(&mut self, index: usize, name: &str) {
        if self
            .models
            .get(name)
            .is_some_and(|s| s.state == State::FallingAsleep)
        {
            let line = format!("putting {name} to sleep");
            return self.notice_once(index, format!("sleeping:{name}"), Notice::Line(line));
        }
        self.notice(
            index,
            format!("stopping:{name}"),
            Event::Stopping(pb::Stopping {
                model: name.to_owned(),
            }),
        );
    }

    /// Memory `target` still waits for on one of its GPUs, by NVML's last reading: the
    /// GPU's size less what is used (at least what gpuswap's live models reserve, which may
    /// still be loading) must hold its `vram`. Another program may use the card.
    fn memory_shortfall(&self, target: &str) -> Option<(u32, u64)> {
        let placement = &self.models[target].placement;
        let vram = placement.vram?;
        let capacity = &self.settings.capacity;
        let live: Vec<(&str, &Placement)> = self
            .models
            .iter()
            .filter(|(name, slot)| *name != target && slot.run.is_some())
            .map(|(name, slot)| (name.as_str(), slot.occupied()))
            .collect();
        let reserved = capacity.reservations(&live);
        capacity
            .gpus_known_of(placement)
            .into_iter()
            .find_map(|gpu| {
                let used = *self.gpu_used.get(&gpu)?;
                let size = capacity.of(gpu)?;
                let ours = reserved
                    .iter()
                    .find(|r| r.gpu == gpu)
                    .map_or(0, |r| r.reserved);
                let free = size.saturating_sub(used.max(ours));
                (free < vram).then(|| (gpu, vram - free))
            })
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use gpuswap::config::GpuMemory;

    use super::{
        super::{super::placement::Capacity, Settings},
        *,
    };

    const GIB: u64 = 1 << 30;

    /// Another program holds 60 of the 96 GiB: a 40 GiB model waits, saying for how much,
    /// until NVML shows the memory free.
    #[test]
    fn a_start_waits_for_the_memory_another_program_holds() {
        let settings = Settings {
            drain_timeout: Duration::from_secs(10),
            min_residency: Duration::ZERO,
            capacity: Capacity::new(Some(GpuMemory::Every(96 * GIB)), BTreeMap::new()),
            host_memory: u64::MAX,
        };
        let mut policy = Policy::new(settings, 1);
        policy.add_model(
            "m",
            Placement {
                gpus: Some(vec![0]),
                port: 1,
                host: "127.0.0.1".into(),
                vram: Some(40 * GIB),
                pinned: false,
                sleep: None,
            },
        );
        let now = Instant::now();
        policy.gpu_memory(BTreeMap::from([(0, 60 * GIB)]));
        policy.activate(7, "m", false, false);
        policy.pump(now, &|_| None);
        let actions = policy.take_actions();
        assert!(actions.contains(&Action::MeasureGpus), "{actions:?}");
        assert!(
            actions.contains(&Action::Send {
                stream: 7,
                model: "m".into(),
                notice: Notice::Line("waiting for 4 GiB to free on GPU 0".into()),
            }),
            "{actions:?}"
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Spawn { .. })));
        policy.gpu_memory(BTreeMap::from([(0, 50 * GIB)]));
        policy.pump(now, &|_| None);
        let actions = policy.take_actions();
        assert!(
            actions.iter().any(|a| matches!(a, Action::Spawn { .. })),
            "{actions:?}"
        );
    }
}
