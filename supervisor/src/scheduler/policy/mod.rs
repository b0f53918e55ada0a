//! The scheduling policy as a pure state machine: events in, actions out, no I/O.
//!
//! The actor ([`super`]) owns the processes, the client streams, the logs and the clock;
//! it tells the policy what happened (an activation arrived, a start finished, a process
//! exited, a stream closed, time passed) and carries out what the policy asks for (spawn,
//! stop, send an event to a stream, close it, wake me at). Everything the policy decides is
//! therefore testable without processes: see the property tests in `props`.
//!
//! After every event the actor calls [`Policy::pump`], which walks the waiting activations
//! in arrival order and moves each as far as it can go:
//! - a waiter whose model cannot run next to the model of an earlier waiter waits behind it
//!   (no starvation: earlier waiters go first);
//! - a model that can never run (bigger than its GPU, or in the way of a pinned model)
//!   fails at once;
//! - otherwise the running models in the way are chosen by [`choose_evictions`](super::placement::choose_evictions) (the
//!   fewest, unpinned, unheld first, then least recently used), each is drained (its holders
//!   are asked to let go, until `drain_timeout`) after its `min_residency`, and stopped;
//!   then the target starts.
//!
//! A model with `sleep` is put to sleep instead of stopped when it is in the way by GPU
//! memory only: its process lives and keeps its port, its GPU memory is freed, and it holds
//! host memory. All sleepers together hold at most `host_memory`; the least recently used
//! are stopped when another must sleep. A waiter for a sleeping model waits for its wake as
//! for a start; a wake that fails stops it and starts it cold, a sleep that fails stops it.

//! The files, one job each:
//! - this one: the [`Policy`] itself, its settings and what it remembers of the clients;
//! - `slot`: one configured model ([`Slot`]), its [`State`] and its live process ([`Run`]);
//! - `action`: what the actor is asked to do ([`Action`]) and what a stream is told
//!   ([`Notice`]);
//! - `events`: what the actor reports (configuration, clients, process results);
//! - `queue`: [`Policy::pump`], the walk over the waiting activations;
//! - `room`: making room for a waiter's model (what is in the way drains, sleeps or stops);
//! - `sleep`: putting a model to sleep and waking it, within the host memory budget;
//! - `drain`: holds and their drains;
//! - `deactivation`: the operator's deactivations;
//! - `transitions`: the steps the others take (grant, fail, stop) and the crash backoff.

mod action;
mod deactivation;
mod drain;
mod events;
#[cfg(test)]
mod props;
mod queue;
mod room;
mod sleep;
mod slot;
mod transitions;

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    time::Duration,
};

use tokio::time::Instant;

use super::placement::Capacity;
pub use action::{Action, Notice};
pub use slot::{Drain, Hold, Run, Slot, State};
pub use transitions::{FailureKind, HEALTHY_AFTER, MAX_BACKOFF, crash_backoff};

/// Identifies one client's Activate stream (a waiter, later maybe a hold).
pub type StreamId = u64;

/// The settings the policy decides with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub drain_timeout: Duration,
    pub min_residency: Duration,
    pub capacity: Capacity,
    /// Host memory that sleeping models may hold in all.
    pub host_memory: u64,
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

/// A pending deactivation.
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
}

/// A duration in whole milliseconds, as the events carry it.
fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}
