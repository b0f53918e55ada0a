//! One configured model as the policy sees it: its state, its live process, its holds.

use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use super::{super::placement::Placement, StreamId};

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
    ///
    /// [`Policy::spawned`]: super::Policy::spawned
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
    pub(super) fn new(generation: u64, placement: Placement, now: Instant) -> Self {
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
    pub(super) fn new(placement: Placement) -> Self {
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
    pub(super) fn live(&self) -> bool {
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
