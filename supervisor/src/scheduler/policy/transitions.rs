//! The steps every decision is made of: a waiter is told, granted or failed; a model fails
//! (with the crash backoff) or is stopped.

use std::time::Duration;

use gpuswap::pb::activate_event::Event;
use tokio::time::Instant;

use super::{Action, Hold, Notice, Policy, State, StreamId, Waiter, millis};

/// A backend that stayed ready this long is considered healthy: a crash after that starts
/// the crash-loop backoff from the beginning again.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Longest wait before restarting a model that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The wait before restart number `failures` (1-based) of a model that keeps failing.
pub fn crash_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exponent = (failures - 1).min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF)
}

/// How a model failed: a crash restarts its backoff once it had been healthy long enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Start,
    Crash,
}

/// What to do with the waiters of a start that is cancelled.
#[derive(Clone, Copy)]
pub(super) enum WaiterFate<'a> {
    Fail(&'a str),
    /// Keep them queued: the model starts again (a reload changed it).
    Requeue,
}

impl Policy {
    pub(super) fn send(&mut self, stream: StreamId, model: &str, notice: Notice) {
        self.out.push(Action::Send {
            stream,
            model: model.to_owned(),
            notice,
        });
    }

    /// Ends a waiter with its last event.
    pub(super) fn finish(&mut self, waiter: Waiter, notice: Notice) {
        self.send(waiter.stream, &waiter.model, notice);
        self.out.push(Action::Close {
            stream: waiter.stream,
        });
    }

    pub(super) fn fail_waiter(&mut self, index: usize, reason: String) {
        let waiter = self.queue.remove(index).expect("index in range");
        self.finish(
            waiter,
            Notice::Failed {
                reason,
                log_tail: false,
            },
        );
    }

    /// Sends a progress event to the waiter at `index`, once per key.
    pub(super) fn notice(&mut self, index: usize, key: String, event: Event) {
        self.notice_once(index, key, Notice::Event(event));
    }

    /// Sends `notice` to the waiter at `index`, once per key.
    pub(super) fn notice_once(&mut self, index: usize, key: String, notice: Notice) {
        let waiter = &mut self.queue[index];
        if waiter.notices.insert(key) {
            let (stream, model) = (waiter.stream, waiter.model.clone());
            self.send(stream, &model, notice);
        }
    }

    /// A start failed or a ready backend exited: every waiter of this start and every hold
    /// learns why, and whatever is left of the process tree is stopped.
    pub(super) fn fail(
        &mut self,
        name: &str,
        reason: String,
        kind: FailureKind,
        cause: &'static str,
        now: Instant,
    ) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        let healthy_for = slot.ready_at.map(|t| now - t);
        slot.failures = match (kind, healthy_for) {
            (FailureKind::Crash, Some(up)) if up >= HEALTHY_AFTER => 1,
            _ => slot.failures.saturating_add(1),
        };
        slot.retry_at = Some(now + crash_backoff(slot.failures));
        slot.state = State::Failed;
        slot.ready_at = None;
        slot.last_error = reason.clone();
        let generation = slot.run.as_ref().map(|r| r.generation);
        self.end_drain(name, now);
        self.out.push(Action::Failed {
            model: name.to_owned(),
            reason: reason.clone(),
            cause,
        });
        self.revoke_holds(name, &reason);
        self.end_followers(name, generation, Some(&reason));
        self.stop_process(name, None, None);
    }

    /// Takes a Ready or Starting model down: holds are lost, the process is stopped. `swap`
    /// is the waiter that needs the room, if one does.
    pub(super) fn begin_stop(
        &mut self,
        name: &str,
        reason: &str,
        waiters: WaiterFate<'_>,
        swap: Option<StreamId>,
        now: Instant,
    ) {
        let Some(slot) = self.models.get_mut(name) else {
            return;
        };
        if slot.run.is_none() || matches!(slot.state, State::Stopping | State::Failed) {
            return;
        }
        let generation = slot.run.as_ref().map(|r| r.generation);
        slot.state = State::Stopping;
        self.revoke_holds(name, reason);
        self.end_drain(name, now);
        let failed = match waiters {
            WaiterFate::Fail(why) => Some(format!("start cancelled: {why}")),
            WaiterFate::Requeue => None,
        };
        self.end_followers(name, generation, failed.as_deref());
        self.stop_process(name, Some(reason.to_owned()), swap);
    }

    /// The waiters that follow the start of `generation` of `name` fail with `failed`
    /// (with the backend's last lines), or (None) stay queued for the model's next start.
    fn end_followers(&mut self, name: &str, generation: Option<u64>, failed: Option<&str>) {
        let mut index = 0;
        while index < self.queue.len() {
            let waiter = &mut self.queue[index];
            if waiter.model != name || waiter.joined.is_none() || waiter.joined != generation {
                index += 1;
                continue;
            }
            match failed {
                Some(reason) => {
                    let waiter = self.queue.remove(index).expect("index in range");
                    self.finish(
                        waiter,
                        Notice::Failed {
                            reason: reason.to_owned(),
                            log_tail: true,
                        },
                    );
                }
                None => {
                    waiter.joined = None;
                    let stream = waiter.stream;
                    self.out.push(Action::Unjoin { stream });
                    index += 1;
                }
            }
        }
    }

    /// Asks the actor to stop the process tree of `name` (once).
    fn stop_process(&mut self, name: &str, reason: Option<String>, swap: Option<StreamId>) {
        let Some(run) = self.models.get_mut(name).and_then(|m| m.run.as_mut()) else {
            return;
        };
        if run.stop_requested {
            return;
        }
        run.stop_requested = true;
        if run.spawning {
            run.deferred_stop = Some((reason, swap));
            return;
        }
        self.out.push(Action::Stop {
            model: name.to_owned(),
            generation: run.generation,
            reason,
            swap,
        });
    }

    /// Sends Ready to the waiter at `index` and either ends its stream or keeps it as a hold.
    pub(super) fn grant(&mut self, index: usize, now: Instant) {
        let waiter = self.queue.remove(index).expect("index in range");
        let Some(slot) = self.models.get_mut(&waiter.model) else {
            return;
        };
        let startup_ms = match slot.last_wake.or(slot.last_startup) {
            Some(took) if waiter.joined == Some(slot.generation) => millis(took),
            _ => 0,
        };
        slot.last_use = Some(now);
        let generation = slot.generation;
        if waiter.hold {
            slot.holds.insert(
                waiter.stream,
                Hold {
                    drain_requested: false,
                },
            );
        }
        let notice = Notice::Ready {
            generation,
            startup_ms,
            hold: waiter.hold,
        };
        if waiter.hold {
            self.send(waiter.stream, &waiter.model, notice);
        } else {
            self.finish(waiter, notice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(crash_backoff(0), Duration::ZERO);
        assert_eq!(crash_backoff(1), Duration::from_secs(1));
        assert_eq!(crash_backoff(2), Duration::from_secs(2));
        assert_eq!(crash_backoff(5), Duration::from_secs(16));
        assert_eq!(crash_backoff(6), MAX_BACKOFF);
        assert_eq!(crash_backoff(1000), MAX_BACKOFF);
    }
}
