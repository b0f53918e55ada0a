//! The scheduling policy as a pure state machine: events in, actions out, no I/O.
//!
//! The actor ([`super`]) owns the processes, the client streams, the logs and the clock;
//! it tells the policy what happened (an activation arrived, a start finished, a process
//! exited, a stream closed, time passed) and carries out what the policy asks for (spawn,
//! stop, send an event to a stream, close it, wake me at). Everything the policy decides is
//! therefore testable without processes: see the property tests in `policy_props.rs`.
//!
//! After every event the actor calls [`Policy::pump`], which walks the waiting activations
//! in arrival order and moves each as far as it can go:
//! - a waiter whose model cannot run next to the model of an earlier waiter waits behind it
//!   (no starvation: earlier waiters go first);
//! - a model that can never run (bigger than its GPU, or in the way of a pinned model)
//!   fails at once;
//! - otherwise the running models in the way are chosen by [`choose_evictions`] (the
//!   fewest, unpinned, unheld first, then least recently used), each is drained (its holders
//!   are asked to let go, until `drain_timeout`) after its `min_residency`, and stopped;
//!   then the target starts.
//!
//! A model with `sleep` is put to sleep instead of stopped when it is in the way by GPU
//! memory only: its process lives and keeps its port, its GPU memory is freed, and it holds
//! host memory. All sleepers together hold at most `host_memory`; the least recently used
//! are stopped when another must sleep. A waiter for a sleeping model waits for its wake as
//! for a start; a wake that fails stops it and starts it cold, a sleep that fails stops it.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    time::Duration,
};

use gpuswap::{
    config::format_bytes,
    pb::{self, activate_event::Event},
};
use tokio::time::Instant;

use super::placement::{Candidate, Capacity, Placement, choose_evictions};

/// Identifies one client's Activate stream (a waiter, later maybe a hold).
pub type StreamId = u64;

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

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// The settings the policy decides with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub drain_timeout: Duration,
    pub min_residency: Duration,
    pub capacity: Capacity,
    /// Host memory that sleeping models may hold in all.
    pub host_memory: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
    /// Asked to sleep: its GPU memory is not free yet.
    FallingAsleep,
    /// The process lives and keeps its port; its GPU memory is free.
    Sleeping,
    /// Asked to wake: it takes its GPU memory again, requests wait as for a start.
    Waking,
}

/// A live process tree of a model, as the policy sees it.
#[derive(Clone, Debug)]
pub struct Run {
    pub generation: u64,
    /// Where it was started (a reload may have changed the model's since).
    pub placement: Placement,
    pub spawned_at: Instant,
    pub stop_requested: bool,
    /// The actor spawns off its loop: until [`Policy::spawned`] there is no process to stop.
    pub spawning: bool,
    /// A stop asked for while spawning (its reason and swap), sent once the spawn is done.
    pub deferred_stop: Option<(Option<String>, Option<StreamId>)>,
    /// What it takes while asleep (its port only).
    pub asleep: Placement,
    /// It holds host memory (from its sleep until its wake ends or its process is gone).
    pub host_held: bool,
    /// When its current wake began.
    pub waking_since: Option<Instant>,
}

impl Run {
    fn new(generation: u64, placement: Placement, now: Instant) -> Self {
        Run {
            generation,
            asleep: placement.asleep(),
            placement,
            spawned_at: now,
            stop_requested: false,
            spawning: true,
            deferred_stop: None,
            host_held: false,
            waking_since: None,
        }
    }
}

/// Holders of a model are being asked to let go.
#[derive(Clone, Debug)]
pub struct Drain {
    pub deadline: Instant,
    pub started: Instant,
    /// Asked for by an activation (a swap's drain phase), not by a deactivation.
    pub for_swap: bool,
}

#[derive(Clone, Debug)]
pub struct Hold {
    pub drain_requested: bool,
}

/// One configured model.
#[derive(Clone, Debug)]
pub struct Slot {
    pub placement: Placement,
    pub state: State,
    pub run: Option<Run>,
    pub generation: u64,
    pub holds: BTreeMap<StreamId, Hold>,
    pub ready_at: Option<Instant>,
    pub restarts: u32,
    /// Consecutive failed starts and crashes: drives the restart backoff.
    pub failures: u32,
    pub retry_at: Option<Instant>,
    pub last_error: String,
    pub last_startup: Option<Duration>,
    /// How long its last wake took, since its last start (a Ready says so).
    pub last_wake: Option<Duration>,
    pub drain: Option<Drain>,
    /// The end of its last use: a grant, a released hold, or a client's report.
    pub last_use: Option<Instant>,
    /// Removed by a reload; dropped once its process is gone.
    pub removed: bool,
}

impl Slot {
    fn new(placement: Placement) -> Self {
        Slot {
            placement,
            state: State::Stopped,
            run: None,
            generation: 0,
            holds: BTreeMap::new(),
            ready_at: None,
            restarts: 0,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            last_startup: None,
            last_wake: None,
            drain: None,
            last_use: None,
            removed: false,
        }
    }

    /// What the model takes now (a sleeper: its port only), or would take started.
    pub fn occupied(&self) -> &Placement {
        match &self.run {
            Some(run) if self.state == State::Sleeping => &run.asleep,
            _ => self.awake(),
        }
    }

    /// What the model takes awake: its run's placement, or where it would start.
    pub fn awake(&self) -> &Placement {
        self.run.as_ref().map_or(&self.placement, |r| &r.placement)
    }

    /// Running, starting or waking, and not on its way out (nor to sleep).
    fn live(&self) -> bool {
        self.run.is_some() && matches!(self.state, State::Ready | State::Starting | State::Waking)
    }

    /// Host memory its process holds now.
    pub fn host_held(&self) -> u64 {
        match &self.run {
            Some(run) if run.host_held => run.placement.sleep.unwrap_or(0),
            _ => 0,
        }
    }
}

/// A waiting activation.
#[derive(Debug)]
struct Waiter {
    stream: StreamId,
    /// The configured model id (aliases resolved).
    model: String,
    hold: bool,
    force: bool,
    /// The generation whose start this waiter follows.
    joined: Option<u64>,
    /// Progress notices already sent, so each is sent once.
    notices: HashSet<String>,
}

#[derive(Debug)]
struct Deactivation {
    id: u64,
    models: Vec<String>,
    stopped: Vec<String>,
    force: bool,
    /// Put the models to sleep instead of stopping them.
    sleep: bool,
    deadline: Instant,
}

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
enum SleepRoom {
    Now,
    /// Once the sleepers stopped for it are gone.
    Later,
    Refused(String),
}

/// What a stream is told. Events the policy can fill in whole are sent as they are; the
/// others need what only the actor has (a pid, an address, log lines, the wall clock).
#[derive(Clone, Debug, PartialEq)]
pub enum Notice {
    Event(Event),
    /// The waiter follows this start: Starting (with the pid), then its log lines.
    Starting {
        generation: u64,
    },
    /// The activation succeeded; with `hold` the stream stays open as a hold.
    Ready {
        generation: u64,
        startup_ms: u64,
        hold: bool,
    },
    /// The activation failed; `log_tail`: with the backend's last lines.
    Failed {
        reason: String,
        log_tail: bool,
    },
    /// A supervisor log line for the waiter (a restart backoff, a wait for GPU memory).
    Line(String),
}

/// What the actor must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Send {
        stream: StreamId,
        model: String,
        notice: Notice,
    },
    /// The stream is done (after its last event): drop it, which ends it.
    Close {
        stream: StreamId,
    },
    /// The waiter no longer follows a start (it was cancelled; the model starts again).
    Unjoin {
        stream: StreamId,
    },
    /// Start the model, then call [`Policy::spawned`] (its followers are told Starting) or
    /// [`Policy::spawn_failed`]. The swap is traced under `cause`'s activation.
    Spawn {
        model: String,
        generation: u64,
        cause: StreamId,
        restart: bool,
    },
    /// Put the model of this generation to sleep (its GPU memory freed, its process kept),
    /// then call [`Policy::sleep_finished`] or [`Policy::sleep_failed`]. Like a stop's.
    Sleep {
        model: String,
        generation: u64,
        reason: String,
        swap: Option<StreamId>,
    },
    /// Wake the sleeping model of this generation for `cause` (told Starting), then call
    /// [`Policy::wake_succeeded`] or [`Policy::wake_failed`].
    Wake {
        model: String,
        generation: u64,
        cause: StreamId,
    },
    /// The wake of `generation` succeeded after `took` (its waiters are granted next).
    Woke {
        model: String,
        generation: u64,
        took: Duration,
    },
    /// Stop the process tree of this generation, then call [`Policy::stop_finished`].
    /// `reason`: why (none: after a failure, already reported); `swap`: the waiter whose
    /// swap this stop is a phase of.
    Stop {
        model: String,
        generation: u64,
        reason: Option<String>,
        swap: Option<StreamId>,
    },
    Ready {
        model: String,
        generation: u64,
        took: Duration,
    },
    /// A start failed or a ready backend died; `cause` is a fixed word for metrics.
    Failed {
        model: String,
        reason: String,
        cause: &'static str,
    },
    /// Holders of `model` are asked to let go; `swap`: for this waiter's swap.
    DrainBegan {
        model: String,
        swap: Option<StreamId>,
    },
    /// The drain ended: `swap_took` when it was a swap's drain phase that completed.
    DrainEnded {
        model: String,
        swap_took: Option<Duration>,
    },
    Deactivated {
        id: u64,
        stopped: Vec<String>,
    },
    /// A model removed by a reload is gone.
    Removed {
        model: String,
    },
    WakeAt(Instant),
    /// Read the GPUs' memory now and call [`Policy::gpu_memory`] (a start waits for it).
    MeasureGpus,
    /// Room is being made for `model` (a swap to it): its weights may be read ahead.
    MakingRoom {
        model: String,
    },
    /// A deactivation could not stop `model`: answer it with `reason`.
    DeactivationFailed {
        id: u64,
        model: String,
        reason: String,
    },
}

/// How a model failed: a crash restarts its backoff once it had been healthy long enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Start,
    Crash,
}

/// What to do with the waiters of a start that is cancelled.
#[derive(Clone, Copy)]
enum WaiterFate<'a> {
    Fail(&'a str),
    /// Keep them queued: the model starts again (a reload changed it).
    Requeue,
}

/// The policy: every model's state, the waiting activations and pending deactivations.
#[derive(Debug)]
pub struct Policy {
    settings: Settings,
    models: BTreeMap<String, Slot>,
    queue: VecDeque<Waiter>,
    deactivations: Vec<Deactivation>,
    next_generation: u64,
    /// GPU memory in use by index, as NVML last reported it (empty without NVML).
    gpu_used: BTreeMap<u32, u64>,
    /// A fresh reading was asked for and has not come yet.
    measuring: bool,
    out: Vec<Action>,
}

impl Policy {
    /// A policy whose first start gets `first_generation` (each next one the next number).
    pub fn new(settings: Settings, first_generation: u64) -> Self {
        Policy {
            settings,
            models: BTreeMap::new(),
            queue: VecDeque::new(),
            deactivations: Vec::new(),
            next_generation: first_generation,
            gpu_used: BTreeMap::new(),
            measuring: false,
            out: Vec::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// The actions decided since the last call, in order.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.out)
    }

    pub fn slot(&self, name: &str) -> Option<&Slot> {
        self.models.get(name)
    }

    pub fn slots(&self) -> impl Iterator<Item = (&String, &Slot)> {
        self.models.iter()
    }

    /// The models of the waiting activations, in order.
    pub fn queue(&self) -> impl Iterator<Item = &str> {
        self.queue.iter().map(|w| w.model.as_str())
    }

    /// The waiting streams that follow the start of `model`'s `generation`.
    pub fn followers(&self, model: &str, generation: u64) -> Vec<StreamId> {
        self.queue
            .iter()
            .filter(|w| w.model == model && w.joined == Some(generation))
            .map(|w| w.stream)
            .collect()
    }

    pub fn is_waiting(&self, stream: StreamId) -> bool {
        self.queue.iter().any(|w| w.stream == stream)
    }

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

    fn current(&mut self, name: &str, generation: u64) -> Option<&mut Slot> {
        self.models
            .get_mut(name)
            .filter(|s| s.run.as_ref().is_some_and(|r| r.generation == generation))
    }

    /// The slot of `generation` if it is still in `state`: a report about an earlier step
    /// (a sleep or wake that an operator's stop overtook) is ignored.
    fn current_in(&mut self, name: &str, generation: u64, state: State) -> Option<&mut Slot> {
        self.current(name, generation).filter(|s| s.state == state)
    }

    // ----- transitions ------------------------------------------------------------------

    fn send(&mut self, stream: StreamId, model: &str, notice: Notice) {
        self.out.push(Action::Send {
            stream,
            model: model.to_owned(),
            notice,
        });
    }

    /// Ends a waiter with its last event.
    fn finish(&mut self, waiter: Waiter, notice: Notice) {
        self.send(waiter.stream, &waiter.model, notice);
        self.out.push(Action::Close {
            stream: waiter.stream,
        });
    }

    fn fail_waiter(&mut self, index: usize, reason: String) {
        let waiter = self.queue.remove(index).expect("index in range");
        self.finish(
            waiter,
            Notice::Failed {
                reason,
                log_tail: false,
            },
        );
    }

    /// Sends a progress notice once per key.
    fn notice(&mut self, index: usize, key: String, event: Event) {
        let waiter = &mut self.queue[index];
        if waiter.notices.insert(key) {
            let (stream, model) = (waiter.stream, waiter.model.clone());
            self.send(stream, &model, Notice::Event(event));
        }
    }

    /// A start failed or a ready backend exited: every waiter of this start and every hold
    /// learns why, and whatever is left of the process tree is stopped.
    fn fail(
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
        let mut index = 0;
        while index < self.queue.len() {
            let waiter = &self.queue[index];
            if waiter.model == name && waiter.joined.is_some() && waiter.joined == generation {
                let waiter = self.queue.remove(index).expect("index in range");
                self.finish(
                    waiter,
                    Notice::Failed {
                        reason: reason.clone(),
                        log_tail: true,
                    },
                );
            } else {
                index += 1;
            }
        }
        self.stop_process(name, None, None);
    }

    /// Takes a Ready or Starting model down: holds are lost, the process is stopped. `swap`
    /// is the waiter that needs the room, if one does.
    fn begin_stop(
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
        let mut index = 0;
        while index < self.queue.len() {
            let waiter = &mut self.queue[index];
            if waiter.model == name && waiter.joined.is_some() && waiter.joined == generation {
                match waiters {
                    WaiterFate::Fail(why) => {
                        let waiter = self.queue.remove(index).expect("index in range");
                        self.finish(
                            waiter,
                            Notice::Failed {
                                reason: format!("start cancelled: {why}"),
                                log_tail: true,
                            },
                        );
                        continue;
                    }
                    WaiterFate::Requeue => {
                        waiter.joined = None;
                        let stream = waiter.stream;
                        self.out.push(Action::Unjoin { stream });
                    }
                }
            }
            index += 1;
        }
        self.stop_process(name, Some(reason.to_owned()), swap);
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

    /// Ends every hold of `name` with HoldLost.
    fn revoke_holds(&mut self, name: &str, reason: &str) {
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
    fn request_drain(&mut self, name: &str, wanted_by: &str, deadline: Instant, now: Instant) {
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
    fn end_drain(&mut self, name: &str, now: Instant) {
        if let Some(drain) = self.models.get_mut(name).and_then(|s| s.drain.take()) {
            self.out.push(Action::DrainEnded {
                model: name.to_owned(),
                swap_took: drain.for_swap.then(|| now - drain.started),
            });
        }
    }

    fn begin_drain(&mut self, name: &str, deadline: Instant, now: Instant, swap: Option<StreamId>) {
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

    /// Sends Ready to the waiter at `index` and either ends its stream or keeps it as a hold.
    fn grant(&mut self, index: usize, now: Instant) {
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

    // ----- the queue --------------------------------------------------------------------

    /// Walks the waiters in arrival order and moves each as far as it can go.
    /// `unavailable` says why a model cannot start now (a required file is missing).
    pub fn pump(&mut self, now: Instant, unavailable: &dyn Fn(&str) -> Option<String>) {
        // Models somebody currently needs stopped (their drains stay armed).
        let mut needed: HashSet<String> = HashSet::new();
        self.pump_deactivations(now, &mut needed);
        let mut reserved: Vec<String> = Vec::new();
        let mut index = 0;
        while index < self.queue.len() {
            let target = self.queue[index].model.clone();
            // Only a waiter that is still waiting reserves its model against later ones.
            if self.advance(index, &reserved, now, &mut needed, unavailable) {
                if !reserved.contains(&target) {
                    reserved.push(target);
                }
                index += 1;
            }
        }
        // Holds are sticky: once nobody waits for a model's room its drain is called off.
        let names: Vec<String> = self
            .models
            .iter()
            .filter(|(name, slot)| slot.drain.is_some() && !needed.contains(*name))
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
    fn advance(
        &mut self,
        index: usize,
        reserved: &[String],
        now: Instant,
        needed: &mut HashSet<String>,
        unavailable: &dyn Fn(&str) -> Option<String>,
    ) -> bool {
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
        if let Some(blocker) = self.blocker(&target, reserved) {
            let position = index as u32 + 1;
            self.notice(
                index,
                format!("queued:{position}:{blocker}"),
                Event::Queued(pb::Queued {
                    position,
                    behind: blocker,
                }),
            );
            return true;
        }
        if self
            .deactivations
            .iter()
            .any(|d| d.models.contains(&target))
        {
            let position = index as u32 + 1;
            self.notice(
                index,
                format!("queued:{position}:deactivate"),
                Event::Queued(pb::Queued {
                    position,
                    behind: target.clone(),
                }),
            );
            return true;
        }
        let slot = &self.models[&target];
        match slot.state {
            State::Ready => {
                self.grant(index, now);
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
                self.make_room_or_start(index, reserved, now, needed, unavailable)
            }
        }
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
    fn start(&mut self, index: usize, now: Instant) {
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

    /// The target is not running: drain and stop what is in its way, then start it.
    fn make_room_or_start(
        &mut self,
        index: usize,
        reserved: &[String],
        now: Instant,
        needed: &mut HashSet<String>,
        unavailable: &dyn Fn(&str) -> Option<String>,
    ) -> bool {
        let target = self.queue[index].model.clone();
        if let Some(why) = unavailable(&target) {
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
            let waiter = &mut self.queue[index];
            if waiter.notices.insert(key) {
                let stream = waiter.stream;
                self.send(stream, &target, Notice::Line(line));
            }
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
                let waiter = &mut self.queue[index];
                if waiter.notices.insert(format!("memory:{gpu}")) {
                    let stream = waiter.stream;
                    self.send(stream, &target, Notice::Line(line));
                }
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
            .filter(|(n, s)| movable(s) && (s.occupied().pinned || reserved.contains(n)))
            .map(|(n, s)| (n.as_str(), s.occupied()))
            .collect();
        let candidates: Vec<Candidate> = occupants
            .iter()
            .filter(|(n, s)| movable(s) && !s.occupied().pinned && !reserved.contains(n))
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
            self.make_room(index, &name, force, now, needed);
        }
        true
    }

    /// Stops `name` because the waiter at `index` needs its room.
    fn stop_for_waiter(&mut self, index: usize, name: &str, now: Instant) {
        self.stop_for_waiter_because(index, name, "", now);
    }

    /// Stops `name` because the waiter at `index` needs its room (`more`: why not sleep).
    fn stop_for_waiter_because(&mut self, index: usize, name: &str, more: &str, now: Instant) {
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
    fn make_room(
        &mut self,
        index: usize,
        name: &str,
        force: bool,
        now: Instant,
        needed: &mut HashSet<String>,
    ) {
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
                    let holders = slot.holds.len() as u32;
                    self.out.push(Action::WakeAt(residency_end));
                    self.notice(
                        index,
                        format!("residency:{name}"),
                        Event::Draining(pb::Draining {
                            model: name.to_owned(),
                            holders,
                            deadline_ms: 0,
                            residency_ms: millis(residency_end - now),
                        }),
                    );
                    return;
                }
                needed.insert(name.to_owned());
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
                        let holders = self.models[name].holds.len() as u32;
                        self.out.push(Action::WakeAt(deadline));
                        self.notice(
                            index,
                            format!("draining:{name}"),
                            Event::Draining(pb::Draining {
                                model: name.to_owned(),
                                holders,
                                deadline_ms: millis(deadline - now),
                                residency_ms: 0,
                            }),
                        );
                        return;
                    }
                }
                self.sleep_or_stop_for_waiter(index, name, now);
            }
        }
    }

    /// Tells the waiter at `index` (once) that `name` is going away or to sleep.
    fn notice_leaving(&mut self, index: usize, name: &str) {
        if self
            .models
            .get(name)
            .is_some_and(|s| s.state == State::FallingAsleep)
        {
            let waiter = &mut self.queue[index];
            if waiter.notices.insert(format!("sleeping:{name}")) {
                let (stream, target) = (waiter.stream, waiter.model.clone());
                let line = format!("putting {name} to sleep");
                self.send(stream, &target, Notice::Line(line));
            }
            return;
        }
        self.notice(
            index,
            format!("stopping:{name}"),
            Event::Stopping(pb::Stopping {
                model: name.to_owned(),
            }),
        );
    }

    /// The ready, drained model `name` is in the way of the waiter at `index`: it sleeps
    /// if it can (sleep on, not in the way by its port, room in the host memory budget,
    /// made by stopping the least recently used sleepers), else it stops.
    fn sleep_or_stop_for_waiter(&mut self, index: usize, name: &str, now: Instant) {
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
    fn make_sleep_room(
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
    fn begin_sleep(&mut self, name: &str, reason: &str, swap: Option<StreamId>, now: Instant) {
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
    fn wake(&mut self, index: usize, now: Instant) {
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

    /// Moves every pending deactivation forward; answers those whose models are all stopped.
    fn pump_deactivations(&mut self, now: Instant, needed: &mut HashSet<String>) {
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
                    self.begin_stop(
                        name,
                        "deactivated",
                        WaiterFate::Fail("deactivated"),
                        None,
                        now,
                    );
                    continue;
                }
                if slot.run.is_none() || !slot.live() {
                    continue;
                }
                needed.insert(name.clone());
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
                            SleepRoom::Refused(why) => self.begin_stop(
                                name,
                                &format!("deactivated; it does not sleep: {why}"),
                                WaiterFate::Fail("deactivated"),
                                None,
                                now,
                            ),
                        }
                    }
                    continue;
                }
                self.begin_stop(
                    name,
                    "deactivated",
                    WaiterFate::Fail("deactivated"),
                    None,
                    now,
                );
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
}

#[cfg(test)]
mod tests {
    use gpuswap::config::GpuMemory;

    use super::*;

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
