//! What the actor tells the policy: the configuration, the clients' requests, and what
//! became of the processes (spawned, ready, failed, asleep, awake, stopped, exited).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    super::placement::Placement, Action, FailureKind, Notice, Policy, Slot, State, StreamId,
    Waiter, transitions::WaiterFate,
};

impl Policy {
    // ----- configuration ----------------------------------------------------------------

    /// A new model (at start or by a reload).
    pub fn add_model(&mut self, name: &str, placement: Placement) {
        self.models.insert(name.to_owned(), Slot::new(placement));
    }

    /// A reload changed the model: a running one restarts with the new configuration
    /// (its waiters stay queued).
    pub fn change_model(&mut self, name: &str, placement: Placement, now: Instant) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        slot.removed = false;
        slot.placement = placement;
        if slot.run.is_some() {
            self.begin_stop(
                name,
                "configuration changed",
                WaiterFate::Requeue,
                None,
                now,
            );
        }
    }

    /// A reload removed the model: it stops, and is gone once its process is.
    pub fn remove_model(&mut self, name: &str, now: Instant) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        slot.removed = true;
        if slot.run.is_some() {
            self.begin_stop(
                name,
                "removed from the configuration",
                WaiterFate::Fail("removed"),
                None,
                now,
            );
        } else {
            self.models.remove(name);
            self.out.push(Action::Removed {
                model: name.to_owned(),
            });
        }
    }

    // ----- events -----------------------------------------------------------------------

    /// A client asks for `model` (a configured, not removed id).
    pub fn activate(&mut self, stream: StreamId, model: &str, hold: bool, force: bool) {
        self.queue.push_back(Waiter {
            stream,
            model: model.to_owned(),
            hold,
            force,
            joined: None,
            notices: HashSet::new(),
        });
    }

    /// A client's stream closed: a waiter gave up, or a hold was released.
    pub fn stream_closed(&mut self, stream: StreamId, now: Instant) {
        if let Some(index) = self.queue.iter().position(|w| w.stream == stream) {
            self.queue.remove(index);
            return;
        }
        for slot in self.models.values_mut() {
            if slot.holds.remove(&stream).is_some() {
                slot.last_use = Some(now);
                return;
            }
        }
    }

    /// A client reports that `model` was in use until `at` (the end of its last request).
    pub fn used(&mut self, model: &str, at: Instant) {
        if let Some(slot) = self.models.get_mut(model) {
            slot.last_use = slot.last_use.max(Some(at));
        }
    }

    /// NVML's reading of the GPUs: memory in use by index (a GPU absent: not read).
    pub fn gpu_memory(&mut self, used: BTreeMap<u32, u64>) {
        self.gpu_used = used;
        self.measuring = false;
    }

    /// The backend of `generation` passed its readiness check.
    pub fn start_succeeded(&mut self, name: &str, generation: u64, now: Instant) {
        let Some(slot) = self.current_in(name, generation, State::Starting) else {
            return;
        };
        slot.state = State::Ready;
        slot.ready_at = Some(now);
        slot.retry_at = None;
        let took = slot
            .run
            .as_ref()
            .map_or(Duration::ZERO, |r| now - r.spawned_at);
        slot.last_startup = Some(took);
        self.out.push(Action::Ready {
            model: name.to_owned(),
            generation,
            took,
        });
    }

    /// The start of `generation` failed (`cause`: a fixed word for metrics; `kind`: a
    /// backend that died right after passing its readiness check crashed).
    pub fn start_failed(
        &mut self,
        name: &str,
        generation: u64,
        reason: String,
        cause: &'static str,
        kind: FailureKind,
        now: Instant,
    ) {
        if self
            .current(name, generation)
            .is_some_and(|s| s.state == State::Starting)
        {
            self.fail(name, reason, kind, cause, now);
        }
    }

    /// The process of `generation` exists now: a stop asked for meanwhile goes out.
    pub fn spawned(&mut self, name: &str, generation: u64) {
        let Some(run) = self
            .current(name, generation)
            .and_then(|slot| slot.run.as_mut())
        else {
            return;
        };
        run.spawning = false;
        if let Some((reason, swap)) = run.deferred_stop.take() {
            self.out.push(Action::Stop {
                model: name.to_owned(),
                generation,
                reason,
                swap,
            });
        }
    }

    /// The spawn of `generation` failed at once: there is no process to stop.
    pub fn spawn_failed(
        &mut self,
        name: &str,
        generation: u64,
        reason: String,
        cause: &'static str,
        now: Instant,
    ) {
        let Some(slot) = self.current(name, generation) else {
            return;
        };
        if slot.state == State::Stopping {
            // It was to be stopped once spawned: nothing to stop, the stop is over.
            slot.last_error = reason;
            return self.stop_finished(name, generation);
        }
        if let Some(run) = slot.run.as_mut() {
            run.stop_requested = true;
        }
        self.fail(name, reason, FailureKind::Start, cause, now);
        if let Some(slot) = self.models.get_mut(name) {
            slot.run = None;
        }
    }

    /// The process of `generation` exited by itself.
    pub fn exited(&mut self, name: &str, generation: u64, reason: String, now: Instant) {
        // A start reports its own failure; a stop reports its own end.
        match self.current(name, generation).map(|s| s.state) {
            Some(State::Ready | State::Sleeping) => {
                self.fail(name, reason, FailureKind::Crash, "exited", now)
            }
            Some(State::FallingAsleep) => self.sleep_failed(name, generation, reason, now),
            Some(State::Waking) => self.wake_failed(name, generation, reason, now),
            _ => {}
        }
    }

    /// The model of `generation` sleeps: its GPU memory was seen released.
    pub fn sleep_finished(&mut self, name: &str, generation: u64) {
        let Some(slot) = self.current(name, generation) else {
            return;
        };
        if slot.state == State::FallingAsleep {
            slot.state = State::Sleeping;
            slot.ready_at = None;
        }
    }

    /// The sleep of `generation` failed (or did not release the GPU memory): it is stopped.
    pub fn sleep_failed(&mut self, name: &str, generation: u64, reason: String, now: Instant) {
        let Some(slot) = self.current_in(name, generation, State::FallingAsleep) else {
            return;
        };
        slot.last_error = format!("sleep failed: {reason}");
        self.begin_stop(
            name,
            &format!("sleep failed: {reason}"),
            WaiterFate::Requeue,
            None,
            now,
        );
    }

    /// The wake of `generation` succeeded: it is ready again (the same process).
    pub fn wake_succeeded(&mut self, name: &str, generation: u64, now: Instant) {
        let Some(slot) = self.current_in(name, generation, State::Waking) else {
            return;
        };
        slot.state = State::Ready;
        slot.ready_at = Some(now);
        let run = slot.run.as_mut().expect("current");
        run.host_held = false;
        let took = run.waking_since.take().map_or(Duration::ZERO, |t| now - t);
        slot.last_wake = Some(took);
        self.out.push(Action::Woke {
            model: name.to_owned(),
            generation,
            took,
        });
    }

    /// The wake of `generation` failed: it is stopped, and its waiters wait for a cold start.
    pub fn wake_failed(&mut self, name: &str, generation: u64, reason: String, now: Instant) {
        let Some(slot) = self.current_in(name, generation, State::Waking) else {
            return;
        };
        slot.last_error = format!("wake failed: {reason}");
        let line = format!("waking {name} failed ({reason}): stopping it to start it cold");
        for stream in self.followers(name, generation) {
            self.send(stream, name, Notice::Line(line.clone()));
        }
        self.begin_stop(
            name,
            &format!("wake failed: {reason}"),
            WaiterFate::Requeue,
            None,
            now,
        );
    }

    /// The stop of `generation` left processes running: the model keeps its room until they
    /// are gone ([`Policy::stop_finished`]); the deactivations waiting for it fail now.
    pub fn stop_stuck(&mut self, name: &str, generation: u64, reason: String) {
        let Some(slot) = self.current(name, generation) else {
            return;
        };
        slot.last_error = reason.clone();
        let (failed, kept) = std::mem::take(&mut self.deactivations)
            .into_iter()
            .partition(|d| d.models.iter().any(|m| m == name));
        self.deactivations = kept;
        for deactivation in failed {
            self.out.push(Action::DeactivationFailed {
                id: deactivation.id,
                model: name.to_owned(),
                reason: reason.clone(),
            });
        }
    }

    /// Why `name` is no longer idle as it was in generation `seen`, or None if it still is
    /// (Ready in that generation, no holder, nobody waiting for it).
    pub fn in_use_since(&self, name: &str, seen: u64) -> Option<&'static str> {
        let slot = self.models.get(name)?;
        if slot.state != State::Ready {
            Some("not ready")
        } else if slot.generation != seen {
            Some("another generation")
        } else if !slot.holds.is_empty() {
            Some("held")
        } else if self.queue.iter().any(|w| w.model == name) {
            Some("wanted")
        } else {
            None
        }
    }

    /// The process tree of `generation` is gone (and its GPU memory released).
    pub fn stop_finished(&mut self, name: &str, generation: u64) {
        let Some(slot) = self.current(name, generation) else {
            return;
        };
        slot.run = None;
        if slot.state == State::Stopping {
            slot.state = State::Stopped;
            slot.failures = 0;
        }
        slot.ready_at = None;
        if slot.removed {
            self.models.remove(name);
            self.out.push(Action::Removed {
                model: name.to_owned(),
            });
        }
    }

    /// Ends every waiter and hold: the supervisor stops. The actor stops the processes.
    pub fn shutdown(&mut self) {
        const WHY: &str = "the supervisor is shutting down";
        for waiter in std::mem::take(&mut self.queue) {
            self.finish(
                waiter,
                Notice::Failed {
                    reason: WHY.into(),
                    log_tail: false,
                },
            );
        }
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            self.revoke_holds(&name, WHY);
            let slot = self.models.get_mut(&name).expect("listed above");
            if slot.run.take().is_some() {
                slot.state = State::Stopped;
            }
        }
        for deactivation in std::mem::take(&mut self.deactivations) {
            self.out.push(Action::Deactivated {
                id: deactivation.id,
                stopped: deactivation.stopped,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::{super::placement::Capacity, Settings},
        *,
    };

    /// A stop asked for while the actor spawns goes out once the process exists; if the
    /// spawn fails instead, there is nothing to stop and the deactivation is answered.
    #[test]
    fn a_stop_during_a_spawn_waits_for_the_process() {
        let settings = Settings {
            drain_timeout: Duration::from_secs(10),
            min_residency: Duration::ZERO,
            capacity: Capacity::new(None, BTreeMap::new()),
            host_memory: u64::MAX,
        };
        let placement = Placement {
            gpus: Some(vec![0]),
            port: 1,
            host: "127.0.0.1".into(),
            vram: None,
            pinned: false,
            sleep: None,
        };
        let now = Instant::now();
        for spawn_works in [true, false] {
            let mut policy = Policy::new(settings.clone(), 1);
            policy.add_model("m", placement.clone());
            policy.activate(7, "m", false, false);
            policy.pump(now, &|_| None);
            let generation = policy.slot("m").expect("m").generation;
            policy.take_actions();
            policy.deactivate(1, vec!["m".into()], true, false, now);
            policy.pump(now, &|_| None);
            let actions = policy.take_actions();
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Stop { .. })),
                "{actions:?}"
            );
            if spawn_works {
                policy.spawned("m", generation);
                let actions = policy.take_actions();
                assert!(
                    actions.iter().any(|a| matches!(a, Action::Stop { .. })),
                    "{actions:?}"
                );
                policy.stop_finished("m", generation);
            } else {
                policy.spawn_failed("m", generation, "no".into(), "spawn_failed", now);
            }
            policy.pump(now, &|_| None);
            let actions = policy.take_actions();
            assert!(
                actions.contains(&Action::Deactivated {
                    id: 1,
                    stopped: vec!["m".into()]
                }),
                "{actions:?}"
            );
            assert_eq!(policy.slot("m").expect("m").state, State::Stopped);
        }
    }
}
