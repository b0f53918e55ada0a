//! The scheduler: one actor task owns the gateway's model state.
//!
//! Requests for a model without an accepting route wait here in per-model FIFO
//! queues. The actor keeps at most one `Activate(hold = true)` stream per model;
//! when it reports Ready, a route is published and every waiter of that model
//! is released together (collation: A B A B arrivals run as A A B B). When the
//! supervisor asks for a drain, the route stops accepting, and the hold is
//! released once the last request in flight finished. Waiters left behind by a
//! released hold trigger a new activation, which the supervisor queues fairly.
//!
//! Named as in the supervisor: [`Scheduler`] is the handle request handlers hold, [`Actor`]
//! the task that owns the state, [`Message`] what the actor receives.
//!
//! The files, one seam each:
//! - `handle`: [`Scheduler`] and the [`WaitTicket`] a wait gives out.
//! - `actor`: the actor's state and loop: waiters queue, activations start, housekeeping.
//! - `stream`: the task that runs one Activate stream and reports its events back.
//! - `events`: what an activation's events do: progress for waiters, a route once Ready.
//! - `hold`: the end of a hold (drain, release, loss) and the backoffs before the next.
//! - `idle`: idle models let go, and their use reported to the supervisor.

mod actor;
mod events;
mod handle;
mod hold;
mod idle;
mod stream;

use std::{sync::Arc, time::Duration};

use gpuswap::pb;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use crate::{error::ApiError, route::InFlight};
pub use actor::Actor;
pub use handle::{Scheduler, WaitTicket};

/// What a waiting streaming client is told while its model loads.
#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub text: String,
    pub queue_position: Option<u32>,
    /// The backend's own load percentage, when it prints one.
    pub percent: Option<f32>,
}

/// One request waiting for its model.
#[derive(Debug)]
pub struct Waiter {
    id: u64,
    reply: oneshot::Sender<Result<InFlight, ApiError>>,
    progress: Option<mpsc::Sender<Progress>>,
    /// The request's span: an activation it triggers continues its trace.
    span: Span,
    /// Counted in `swaps_total` (its model was started while it waited).
    swap_counted: bool,
}

#[derive(Debug)]
pub enum Message {
    Wait {
        model: Arc<str>,
        waiter: Waiter,
    },
    /// The client of a waiter went away (or its queue timeout passed).
    WaiterGone {
        model: Arc<str>,
        id: u64,
    },
    Event {
        model: Arc<str>,
        activation: u64,
        event: pb::activate_event::Event,
    },
    /// An activation stream ended (error: the call itself failed).
    Ended {
        model: Arc<str>,
        activation: u64,
        error: Option<tonic::Status>,
    },
    /// The last request of a route that stopped accepting finished.
    Drained {
        model: Arc<str>,
        generation: u64,
    },
    /// After an idle release: no client holds the model any more (in `generation`).
    IdleUnheld {
        model: Arc<str>,
        generation: u64,
    },
}

/// Settings of the scheduler.
pub struct SchedulerOptions {
    /// Shown in the supervisor's status: `gateway@host:pid`.
    pub client_name: String,
    /// Idle time after which a model's hold is released (0: never); a model's own wins.
    pub idle_ttl: Duration,
    pub preload: Vec<String>,
    /// How long idle backend connections are kept.
    pub upstream_idle_timeout: Duration,
    /// Start failures carry the backend's last log lines to HTTP clients.
    pub expose_log_tail: bool,
}
