//! The operator's deactivations: named models drain, then stop (or sleep).

use tokio::time::Instant;

use super::{
    Action, Deactivation, Policy, State, queue::Pass, sleep::SleepRoom, transitions::WaiterFate,
};

impl Policy {
    /// Drain and stop `models` (with `sleep`: put them to sleep, see [`Self::sleep_refusal`]);
    /// [`Action::Deactivated`] answers once all are stopped (or asleep).
    pub fn deactivate(
        &mut self,
        id: u64,
        models: Vec<String>,
        force: bool,
        sleep: bool,
        now: Instant,
    ) {
        let stopped = models
            .iter()
            .filter(|name| {
                self.models
                    .get(*name)
                    .is_some_and(|m| m.run.is_some() && m.state != State::Failed)
            })
            .cloned()
            .collect();
        self.deactivations.push(Deactivation {
            id,
            models,
            stopped,
            force,
            sleep,
            deadline: now + self.settings.drain_timeout,
        });
    }

    /// Moves every pending deactivation forward; answers those whose models are all stopped.
    pub(super) fn pump_deactivations(&mut self, pass: &mut Pass<'_>) {
        let now = pass.now;
        let pending = std::mem::take(&mut self.deactivations);
        for deactivation in &pending {
            for name in &deactivation.models {
                let Some(slot) = self.models.get(name) else {
                    continue;
                };
                if deactivation.sleep {
                    if !matches!(slot.state, State::Ready | State::Starting | State::Waking) {
                        continue;
                    }
                } else if slot.state == State::Sleeping {
                    self.stop_deactivated(name, "deactivated", now);
                    continue;
                }
                if slot.run.is_none() || !slot.live() {
                    continue;
                }
                pass.needed.insert(name.clone());
                if !slot.holds.is_empty() {
                    let deadline = match &slot.drain {
                        Some(drain) => drain.deadline.min(deactivation.deadline),
                        None => {
                            self.begin_drain(name, deactivation.deadline, now, None);
                            deactivation.deadline
                        }
                    };
                    self.request_drain(name, "deactivate", deadline, now);
                    if deactivation.force || now >= deadline {
                        self.revoke_holds(name, "deactivated");
                    } else {
                        self.out.push(Action::WakeAt(deadline));
                        continue;
                    }
                }
                if deactivation.sleep {
                    // Ready and drained: sleeps as it would to make room (a start or wake
                    // in progress is waited for; the next pump comes with its end).
                    if self.models[name].state == State::Ready {
                        match self.make_sleep_room(name, None, &format!("{name} sleeps"), now) {
                            SleepRoom::Now => self.begin_sleep(name, "deactivated", None, now),
                            SleepRoom::Later => {}
                            SleepRoom::Refused(why) => self.stop_deactivated(
                                name,
                                &format!("deactivated; it does not sleep: {why}"),
                                now,
                            ),
                        }
                    }
                    continue;
                }
                self.stop_deactivated(name, "deactivated", now);
            }
        }
        for deactivation in pending {
            let done = deactivation.models.iter().all(|name| {
                self.models.get(name).is_none_or(|m| {
                    m.run.is_none() || (deactivation.sleep && m.state == State::Sleeping)
                })
            });
            if done {
                self.out.push(Action::Deactivated {
                    id: deactivation.id,
                    stopped: deactivation.stopped,
                });
            } else {
                self.deactivations.push(deactivation);
            }
        }
    }

    /// Stops `name` for a deactivation (`reason`: why, for its holders and its stop); the
    /// waiters of its start fail.
    fn stop_deactivated(&mut self, name: &str, reason: &str, now: Instant) {
        self.begin_stop(name, reason, WaiterFate::Fail("deactivated"), None, now);
    }
}
