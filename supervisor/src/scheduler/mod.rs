//! The scheduler actor: the one owner of model state, and the hands of the policy.
//!
//! Every decision (who waits, which model is drained, stopped or started) is taken by the
//! pure state machine in [`policy`] (placement rules in [`placement`]); this actor feeds it
//! events (commands from the gRPC service, reports from its own tasks, timers) and carries
//! out the actions it returns: spawning and stopping backends, sending events on the
//! clients' Activate streams, answering deactivations. Slow work (readiness probes, stops,
//! watching a client's stream) runs in small spawned tasks that report back as messages,
//! each tagged with the generation it belongs to so that a late report about an older
//! process is ignored.
//!
//! The files, one seam each:
//! - [`handle`]: [`Scheduler`], the handle the gRPC service calls; each call is a message.
//! - `actor`: the actor's state and loop (one message at a time, then the policy's pump).
//! - `actions`: the policy's hands: carries out its actions, sends what it tells streams.
//! - `lifecycle`: starting and stopping backends, and the tasks that report back.
//! - `commands`, `reports`: the two kinds of messages (from the service, from own tasks).
//! - `progress`, `streams`, `log_forward`: load progress, clients' streams, their log lines.
//! - `reload`, `shutdown`, `status`: a new configuration, the end, what Status and Watch show.
//! - `sleep`: putting a model to sleep and waking it (its process and port kept).

mod actions;
mod actor;
mod commands;
mod handle;
mod lifecycle;
mod log_forward;
pub mod placement;
pub mod policy;
mod progress;
mod reload;
mod reports;
mod requirements;
mod shutdown;
mod sleep;
mod status;
mod streams;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use gpuswap::{
    config::{Config, ConfigLoader},
    pb,
};
use gpuswap_telemetry::SupervisorMetrics;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tonic::Status;

use crate::backend::{
    Backend, ExitInfo, StartError, gpu, load_progress::LoadProgress, logs::LogBuffer,
    state_file::StateFile,
};
pub use actions::client_address;
pub use handle::Scheduler;
pub use log_forward::LostLines;
pub use streams::recv_until;

/// The sending half of one Activate stream.
pub type EventSender = mpsc::Sender<Result<pb::ActivateEvent, Status>>;

/// Capacity of an Activate stream. Log lines are only sent while more than
/// [`CONTROL_RESERVE`] slots are free, so control events nearly always fit at once; one
/// that does not waits for room, in order (see [`ClientStream::send`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 64;
const CONTROL_RESERVE: usize = 16;

/// What the scheduler needs besides the configuration.
#[derive(Clone)]
pub struct SchedulerOptions {
    /// Where Reload reads the configuration again: the file, and the flags on top of it
    /// (a flag outlives a reload); None: reload is refused.
    pub config_loader: Option<ConfigLoader>,
    /// The supervisor's own executable, run as `guard` to parent every backend.
    pub guard_exe: PathBuf,
    /// Records live process groups for a successor after a crash.
    pub state_file: Option<Arc<StateFile>>,
    /// Where swaps, phases, model states and failures are counted.
    pub metrics: SupervisorMetrics,
}

/// An Activate request as the actor sees it.
#[derive(Clone, Debug)]
pub struct ActivateArgs {
    pub model: String,
    pub hold: bool,
    pub force: bool,
    pub client: String,
    /// The activation's span, not entered yet (its parent may be the caller's remote trace).
    /// It lives until Ready or Failed; the phases of a swap it causes are its children.
    pub span: tracing::Span,
}

/// Requests from the gRPC service.
enum Command {
    Activate {
        args: ActivateArgs,
        received: Instant,
        events: EventSender,
        accepted: oneshot::Sender<Result<(), Status>>,
    },
    Deactivate {
        model: Option<String>,
        force: bool,
        /// Put it to sleep instead of stopping it.
        sleep: bool,
        /// Only if the model is still idle in this generation (an idle unload).
        if_idle_generation: Option<u64>,
        reply: oneshot::Sender<Result<Vec<String>, Status>>,
    },
    Status {
        reply: oneshot::Sender<pb::StatusResponse>,
    },
    Watch {
        reply: oneshot::Sender<(pb::StatusResponse, broadcast::Receiver<pb::WatchEvent>)>,
    },
    Logs {
        model: Option<String>,
        reply: oneshot::Sender<Result<Vec<LogBuffer>, Status>>,
    },
    Reload {
        config: Box<Config>,
        reply: oneshot::Sender<Result<pb::ReloadResponse, Status>>,
    },
    /// When a client's models were last used.
    ReportUse {
        uses: Vec<pb::ModelUse>,
        received: Instant,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Reports from the actor's own tasks.
enum Internal {
    /// A spawn (off the actor) is over.
    Spawned(Spawned),
    StartFinished {
        model: String,
        generation: u64,
        result: Result<(), StartError>,
    },
    Exited {
        model: String,
        generation: u64,
        info: ExitInfo,
    },
    StopFinished {
        model: String,
        generation: u64,
        info: ExitInfo,
    },
    /// The stop is over but these processes of the tree still run: the GPUs stay taken.
    StopStuck {
        model: String,
        generation: u64,
        pids: Vec<i32>,
    },
    /// The client closed an Activate stream (a waiter gave up, or a hold was released).
    StreamClosed { id: u64 },
    /// NVML's reading of the GPUs' memory.
    GpuMemory(BTreeMap<u32, gpu::MemoryReading>),
    /// A sleep ended: Ok with how long it took (the backend says it sleeps, its GPU memory is
    /// free), or why it failed.
    SleepFinished {
        model: String,
        generation: u64,
        result: Result<std::time::Duration, String>,
    },
    /// A wake ended: Ok once the backend is ready again, or why it failed.
    WakeFinished {
        model: String,
        generation: u64,
        result: Result<(), String>,
    },
    /// A starting backend printed a progress line (`parsed`), or it is time to refresh the
    /// estimate of the time left (None).
    Progress {
        model: String,
        generation: u64,
        parsed: Option<LoadProgress>,
    },
}

/// The outcome of a spawn, with the spans its later phases belong to.
struct Spawned {
    model: String,
    generation: u64,
    result: Result<Backend, StartError>,
    took: std::time::Duration,
    start_span: tracing::Span,
    cause_span: tracing::Span,
}

enum Message {
    Command(Command),
    Internal(Internal),
}
