//! What the policy decides: actions for the actor, notices for the clients' streams.

use std::time::Duration;

use gpuswap::pb::activate_event::Event;
use tokio::time::Instant;

use super::StreamId;

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
    ///
    /// [`Policy::spawned`]: super::Policy::spawned
    /// [`Policy::spawn_failed`]: super::Policy::spawn_failed
    Spawn {
        model: String,
        generation: u64,
        cause: StreamId,
        restart: bool,
    },
    /// Put the model of this generation to sleep (its GPU memory freed, its process kept),
    /// then call [`Policy::sleep_finished`] or [`Policy::sleep_failed`]. Like a stop's.
    ///
    /// [`Policy::sleep_finished`]: super::Policy::sleep_finished
    /// [`Policy::sleep_failed`]: super::Policy::sleep_failed
    Sleep {
        model: String,
        generation: u64,
        reason: String,
        swap: Option<StreamId>,
    },
    /// Wake the sleeping model of this generation for `cause` (told Starting), then call
    /// [`Policy::wake_succeeded`] or [`Policy::wake_failed`].
    ///
    /// [`Policy::wake_succeeded`]: super::Policy::wake_succeeded
    /// [`Policy::wake_failed`]: super::Policy::wake_failed
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
    ///
    /// [`Policy::stop_finished`]: super::Policy::stop_finished
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
    ///
    /// [`Policy::gpu_memory`]: super::Policy::gpu_memory
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
