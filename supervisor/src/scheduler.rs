//! The scheduler actor: the one owner of model state.
//!
//! Every decision (who waits, which model is drained, stopped or started) is taken by one
//! task that owns all model state; everything else talks to it over a channel. Slow work
//! (readiness probes, stops, watching a client's stream) runs in small spawned tasks that
//! report back as messages, each tagged with the generation it belongs to so that a late
//! report about an older process is ignored.
//!
//! After every message the actor walks the queue of waiting activations in arrival order
//! ([`Actor::pump`]); a waiter whose model conflicts with an earlier waiter's model waits,
//! so no waiter starves.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use gpuswap::{
    config::{Config, ModelConfig, SupervisorConfig},
    pb::{self, activate_event::Event},
};
use gpuswap_telemetry::{ModelState as MetricState, SupervisorMetrics, SwapPhase};
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::Status;
use tracing::Instrument as _;

use crate::{
    load_progress::{self, LoadHistory, LoadProgress, Operation},
    logs::{LogBuffer, LogEntry},
    process::{Backend, ExitInfo, LaunchSpec, StartError},
    state_file::StateFile,
    warm::{self, WarmGuard},
};

/// The sending half of one Activate stream.
pub type EventSender = mpsc::Sender<Result<pb::ActivateEvent, Status>>;

/// Capacity of an Activate stream. Log lines are only sent while more than
/// [`CONTROL_RESERVE`] slots are free, so control events nearly always fit at once; one
/// that does not waits for room, in order (see [`ClientStream::send`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 64;
const CONTROL_RESERVE: usize = 16;

/// Lines of the backend's output sent with a `Failed` event.
const FAILURE_TAIL_LINES: usize = 20;

/// A backend that stayed ready this long is considered healthy: a crash after that starts
/// the crash-loop backoff from the beginning again.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);

/// Longest wait before restarting a model that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

const WATCH_CHANNEL_CAPACITY: usize = 256;

/// How often a stop that left processes alive looks again whether they are gone.
const STUCK_RECHECK: Duration = Duration::from_secs(1);

/// The wait before restart number `failures` (1-based) of a model that keeps failing.
pub fn crash_backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let exponent = (failures - 1).min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_BACKOFF)
}

/// A phase of a swap (start, ready, stop) of one generation, in the swap's trace.
fn swap_phase_span(
    parent: &tracing::Span,
    phase: &'static str,
    model: &str,
    generation: u64,
) -> tracing::Span {
    tracing::info_span!(parent: parent, "swap", phase, model, generation)
}

/// `host:port` a client connects to; wildcard listen addresses mean this host.
pub fn client_address(config: &ModelConfig) -> String {
    let host = match config.host.as_str() {
        "0.0.0.0" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    };
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", config.port)
    } else {
        format!("{host}:{}", config.port)
    }
}

/// The first file in `requires` that does not exist.
fn missing_requirement(config: &ModelConfig) -> Option<&Path> {
    config
        .requires
        .iter()
        .map(PathBuf::as_path)
        .find(|path| !path.exists())
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first generation this supervisor hands out (each start takes the next): the wall
/// clock in microseconds, so that a restarted supervisor never hands out a generation its
/// predecessor used (a gateway would take the new backend for the old one). That holds
/// unless the clock steps back by more than the predecessor lived.
fn first_generation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros().min(u128::from(u64::MAX / 2)) as u64)
        .max(1)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// What the scheduler needs besides the configuration.
#[derive(Clone)]
pub struct SchedulerOptions {
    /// The file Reload re-reads; None: reload is refused.
    pub config_path: Option<PathBuf>,
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
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Reports from the actor's own tasks.
enum Internal {
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
    /// A starting backend printed a progress line (`parsed`), or it is time to refresh the
    /// estimate of the time left (None).
    Progress {
        model: String,
        generation: u64,
        parsed: Option<LoadProgress>,
    },
}

enum Message {
    Command(Command),
    Internal(Internal),
}

/// A handle to the scheduler actor. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Message>,
    metrics: SupervisorMetrics,
    /// The file Reload re-reads (here, not on the actor: reading it may block).
    config_path: Option<PathBuf>,
    /// The `[supervisor]` section the daemon started with: what a reload cannot change.
    started_with: Arc<SupervisorConfig>,
}

fn gone() -> Status {
    Status::unavailable("the supervisor is shutting down")
}

impl Scheduler {
    /// Starts the actor on the current tokio runtime.
    pub fn spawn(
        config: Config,
        options: SchedulerOptions,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = options.metrics.clone();
        let config_path = options.config_path.clone();
        let started_with = Arc::new(config.supervisor.clone());
        let actor = Actor::new(config, options, tx.downgrade());
        let task = tokio::spawn(actor.run(rx));
        (
            Scheduler {
                tx,
                metrics,
                config_path,
                started_with,
            },
            task,
        )
    }

    /// The supervisor's metrics (the service counts the log lines its followers lose).
    pub fn metrics(&self) -> &SupervisorMetrics {
        &self.metrics
    }

    fn send(&self, command: Command) -> Result<(), Status> {
        self.tx.send(Message::Command(command)).map_err(|_| gone())
    }

    /// Queues an activation; events arrive on `events`. Fails at once for an unknown model.
    pub async fn activate(&self, args: ActivateArgs, events: EventSender) -> Result<(), Status> {
        let (accepted, answer) = oneshot::channel();
        self.send(Command::Activate {
            args,
            received: Instant::now(),
            events,
            accepted,
        })?;
        answer.await.map_err(|_| gone())?
    }

    /// Drains and stops `model` (None: every model); returns the names that were stopped.
    /// With `if_idle_generation`, stops nothing unless the model is still Ready in that
    /// generation with no holder and no waiter.
    pub async fn deactivate(
        &self,
        model: Option<String>,
        force: bool,
        if_idle_generation: Option<u64>,
    ) -> Result<Vec<String>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Deactivate {
            model,
            force,
            if_idle_generation,
            reply,
        })?;
        answer.await.map_err(|_| gone())?
    }

    pub async fn status(&self) -> Result<pb::StatusResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status { reply })?;
        answer.await.map_err(|_| gone())
    }

    /// A snapshot and the changes after it (no change falls between the two).
    pub async fn watch(
        &self,
    ) -> Result<(pb::StatusResponse, broadcast::Receiver<pb::WatchEvent>), Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Watch { reply })?;
        answer.await.map_err(|_| gone())
    }

    /// The log buffers of `model` (None: every model).
    pub async fn logs(&self, model: Option<String>) -> Result<Vec<LogBuffer>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Logs { model, reply })?;
        answer.await.map_err(|_| gone())?
    }

    /// Re-reads the configuration file (on a blocking thread: the actor never waits for
    /// a slow disk) and hands the new configuration to the actor.
    pub async fn reload(&self) -> Result<pb::ReloadResponse, Status> {
        let Some(path) = self.config_path.clone() else {
            return Err(Status::failed_precondition(
                "no configuration file to reload",
            ));
        };
        let config = tokio::task::spawn_blocking(move || Config::load(&path))
            .await
            .map_err(|e| Status::internal(format!("reading the configuration: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let needs_restart: Vec<String> = self
            .started_with
            .keys_needing_restart(&config.supervisor)
            .into_iter()
            .map(|key| format!("supervisor.{key}"))
            .collect();
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reload {
            config: Box::new(config),
            reply,
        })?;
        let mut response = answer.await.map_err(|_| gone())??;
        if !needs_restart.is_empty() {
            tracing::warn!(keys = ?needs_restart, "reload: these changes take effect only after a restart");
        }
        response.needs_restart = needs_restart;
        Ok(response)
    }

    /// Ends every stream, stops every backend (in parallel) and ends the actor.
    pub async fn shutdown(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Shutdown { reply }).is_ok() {
            let _ = answer.await;
        }
    }
}

/// One client's Activate stream. Dropping it ends the stream once every control event sent
/// on it has reached the client's channel (and the log forwarding, if any, has stopped).
struct ClientStream {
    id: u64,
    events: EventSender,
    /// Control events that found the channel full, in order, to the task that waits for room.
    queued: mpsc::UnboundedSender<Result<pb::ActivateEvent, Status>>,
    /// How many of them have not reached the channel yet: log lines wait behind them.
    pending: Arc<AtomicUsize>,
    received: Instant,
}

impl ClientStream {
    fn event(&self, event: Event) -> pb::ActivateEvent {
        pb::ActivateEvent {
            elapsed_ms: millis(self.received.elapsed()),
            event: Some(event),
        }
    }

    /// Sends a control event. It is never dropped: when the client reads slowly it waits (in
    /// order) for room; a client that went away is reported separately.
    fn send(&self, event: Event) {
        let mut event = Ok(self.event(event));
        if self.pending.load(Ordering::SeqCst) == 0 {
            match self.events.try_send(event) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(back)) => event = back,
            }
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let _ = self.queued.send(event);
    }
}

struct Waiter {
    stream: ClientStream,
    /// The configured model id (aliases resolved).
    model: String,
    hold: bool,
    force: bool,
    client: String,
    /// The generation whose start this waiter follows.
    joined: Option<u64>,
    /// Progress notices already sent, so each is sent once.
    notices: HashSet<String>,
    /// Stops the forwarding of start-up log lines.
    log_forward: Option<LogForward>,
    /// The activation's span; it ends when the waiter leaves the queue.
    span: tracing::Span,
}

impl Waiter {
    /// Ends the waiter with a last event (Failed): log forwarding stops first.
    fn finish(mut self, event: Event) {
        self.log_forward = None;
        if let Event::Failed(failed) = &event {
            self.span.in_scope(|| {
                tracing::info!(
                    model = failed.model,
                    reason = failed.reason,
                    "activation failed"
                );
            });
        }
        self.stream.send(event);
    }

    fn notice(&mut self, key: String, event: Event) {
        if self.notices.insert(key) {
            self.stream.send(event);
        }
    }
}

struct Hold {
    stream: ClientStream,
    client: String,
    drain_requested: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Stopped,
    Starting,
    Ready,
    Stopping,
    Failed,
}

/// A live process tree of a model.
struct Run {
    backend: Backend,
    /// The configuration it was started with (a reload may have changed the model's since).
    config: ModelConfig,
    generation: u64,
    spawned_at: Instant,
    stop_requested: bool,
    /// Reads the backend's load progress while it starts (see [`track_progress`]).
    progress_tracker: Option<DropGuard>,
}

/// Holders of a model are being asked to let go.
struct Drain {
    deadline: Instant,
    started: Instant,
    /// Asked for by an activation (a swap's drain phase), not by a deactivation.
    for_swap: bool,
    /// The drain phase's span; it ends with the drain.
    _span: tracing::Span,
}

impl Drain {
    fn new(deadline: Instant, now: Instant, swap: Option<&tracing::Span>, model: &str) -> Self {
        let span = match swap {
            Some(parent) => tracing::info_span!(parent: parent, "swap", phase = "drain", model),
            None => tracing::Span::none(),
        };
        Drain {
            deadline,
            started: now,
            for_swap: swap.is_some(),
            _span: span,
        }
    }
}

struct Model {
    config: ModelConfig,
    state: State,
    run: Option<Run>,
    logs: LogBuffer,
    holds: BTreeMap<u64, Hold>,
    ready_at: Option<Instant>,
    generation: u64,
    restarts: u32,
    /// Consecutive failed starts and crashes: drives the restart backoff.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
    last_startup_ms: u64,
    /// The last progress the starting backend printed.
    progress: Option<LoadProgress>,
    /// Its weight files being read into the page cache for a swap to it.
    warming: Option<WarmGuard>,
    drain: Option<Drain>,
    /// Removed by a reload; dropped once its process is gone.
    removed: bool,
}

impl Model {
    fn new(name: &str, config: ModelConfig, log_lines: usize) -> Self {
        let logs = LogBuffer::new(name, log_lines);
        logs.set_secrets(config.secrets().iter().map(String::as_str));
        Model {
            config,
            state: State::Stopped,
            run: None,
            logs,
            holds: BTreeMap::new(),
            ready_at: None,
            generation: 0,
            restarts: 0,
            failures: 0,
            retry_at: None,
            last_error: String::new(),
            last_startup_ms: 0,
            progress: None,
            warming: None,
            drain: None,
            removed: false,
        }
    }

    fn note(&self, line: String) {
        self.logs.push(pb::LogStream::Supervisor, line);
    }

    /// The configuration that decides which GPUs and port the model occupies now.
    fn occupied_config(&self) -> &ModelConfig {
        self.run.as_ref().map_or(&self.config, |run| &run.config)
    }
}

struct PendingDeactivation {
    models: Vec<String>,
    stopped: Vec<String>,
    force: bool,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<String>, Status>>,
}

/// What to do with the waiters of a start that is cancelled.
enum WaiterFate<'a> {
    Fail(&'a str),
    /// Keep them queued: the model starts again (a reload changed it).
    Requeue,
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    Stop,
}

struct Actor {
    guard_exe: PathBuf,
    state_file: Option<Arc<StateFile>>,
    drain_timeout: Duration,
    min_residency: Duration,
    log_lines: usize,
    gpu_release_timeout: Duration,
    models: BTreeMap<String, Model>,
    queue: VecDeque<Waiter>,
    deactivations: Vec<PendingDeactivation>,
    next_generation: u64,
    next_stream_id: u64,
    me: mpsc::WeakUnboundedSender<Message>,
    watch: broadcast::Sender<pb::WatchEvent>,
    published: HashMap<String, pb::ModelStatus>,
    timers: BTreeSet<Instant>,
    started: Instant,
    metrics: SupervisorMetrics,
    /// The state each model last showed in `model_state`.
    recorded_states: HashMap<String, MetricState>,
    /// Recent load durations per model, for the estimate of the time left.
    history: LoadHistory,
}

impl Actor {
    fn new(
        config: Config,
        options: SchedulerOptions,
        me: mpsc::WeakUnboundedSender<Message>,
    ) -> Self {
        let supervisor = &config.supervisor;
        let models = config
            .models
            .iter()
            .map(|(name, model)| {
                (
                    name.clone(),
                    Model::new(name, model.clone(), supervisor.log_lines),
                )
            })
            .collect();
        let (watch, _) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        let history = LoadHistory::open(options.state_file.as_deref().map(StateFile::path));
        let mut actor = Actor {
            guard_exe: options.guard_exe,
            state_file: options.state_file,
            drain_timeout: supervisor.drain_timeout,
            min_residency: supervisor.min_residency,
            log_lines: supervisor.log_lines,
            gpu_release_timeout: supervisor.gpu_release_timeout,
            models,
            queue: VecDeque::new(),
            deactivations: Vec::new(),
            next_generation: first_generation(),
            next_stream_id: 1,
            me,
            watch,
            published: HashMap::new(),
            timers: BTreeSet::new(),
            started: Instant::now(),
            metrics: options.metrics,
            recorded_states: HashMap::new(),
            history,
        };
        actor.published = actor
            .models
            .keys()
            .map(|name| (name.clone(), actor.comparable_status(name)))
            .collect();
        actor.record_states();
        actor
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
        loop {
            let next_timer = self.timers.first().copied();
            let message = tokio::select! {
                message = rx.recv() => match message {
                    Some(message) => Some(message),
                    None => break,
                },
                _ = tokio::time::sleep_until(next_timer.unwrap_or_else(Instant::now)), if next_timer.is_some() => None,
            };
            let now = Instant::now();
            self.timers.retain(|t| *t > now);
            if let Some(message) = message {
                let flow = match message {
                    Message::Command(Command::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        Flow::Stop
                    }
                    Message::Command(command) => self.command(command),
                    Message::Internal(internal) => {
                        self.internal(internal);
                        Flow::Continue
                    }
                };
                if flow == Flow::Stop {
                    break;
                }
            }
            self.pump();
            self.publish_changes();
            self.record_states();
        }
    }

    // ----- plumbing -------------------------------------------------------------------

    fn sender(&self) -> Option<mpsc::UnboundedSender<Message>> {
        self.me.upgrade()
    }

    fn report(tx: &mpsc::UnboundedSender<Message>, internal: Internal) {
        let _ = tx.send(Message::Internal(internal));
    }

    fn wake_at(&mut self, at: Instant) {
        self.timers.insert(at);
    }

    /// Wraps a client's stream. Its task moves the control events that found the channel
    /// full into it as room appears, and reports when the client closes the stream.
    fn client_stream(&mut self, events: EventSender, received: Instant) -> ClientStream {
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        let (queued, mut waiting) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let report = self.sender();
        let (channel, in_queue) = (events.clone(), pending.clone());
        tokio::spawn(async move {
            let closed = || {
                if let Some(tx) = &report {
                    Self::report(tx, Internal::StreamClosed { id });
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    next = waiting.recv() => next,
                    () = channel.closed() => return closed(),
                };
                // None: the stream's owner let go, and everything it sent is delivered.
                let Some(event) = next else { return };
                if channel.send(event).await.is_err() {
                    return closed();
                }
                in_queue.fetch_sub(1, Ordering::SeqCst);
            }
        });
        ClientStream {
            id,
            events,
            queued,
            pending,
            received,
        }
    }

    /// The configured model a name or alias refers to.
    fn resolve(&self, name: &str) -> Option<String> {
        let live = |(_, m): &(&String, &Model)| !m.removed;
        if let Some((key, _)) = self.models.get_key_value(name).filter(|(_, m)| !m.removed) {
            return Some(key.clone());
        }
        self.models
            .iter()
            .filter(live)
            .find(|(_, m)| m.config.aliases.iter().any(|a| a == name))
            .map(|(key, _)| key.clone())
    }

    // ----- commands -------------------------------------------------------------------

    fn command(&mut self, command: Command) -> Flow {
        match command {
            Command::Activate {
                args,
                received,
                events,
                accepted,
            } => {
                let Some(model) = self.resolve(&args.model) else {
                    args.span
                        .in_scope(|| tracing::info!(model = args.model, "unknown model"));
                    let _ = accepted.send(Err(Status::not_found(format!(
                        "unknown model {}",
                        args.model
                    ))));
                    return Flow::Continue;
                };
                let stream = self.client_stream(events, received);
                args.span.in_scope(|| {
                    tracing::info!(
                        model,
                        client = %args.client,
                        hold = args.hold,
                        force = args.force,
                        "activate"
                    );
                });
                self.queue.push_back(Waiter {
                    stream,
                    model,
                    hold: args.hold,
                    force: args.force,
                    client: args.client,
                    joined: None,
                    notices: HashSet::new(),
                    log_forward: None,
                    span: args.span,
                });
                let _ = accepted.send(Ok(()));
            }
            Command::Deactivate {
                model,
                force,
                if_idle_generation,
                reply,
            } => {
                let models: Vec<String> = match model {
                    None => self.models.keys().cloned().collect(),
                    Some(name) => match self.resolve(&name) {
                        Some(model) => vec![model],
                        None => {
                            let _ =
                                reply.send(Err(Status::not_found(format!("unknown model {name}"))));
                            return Flow::Continue;
                        }
                    },
                };
                if let Some(seen) = if_idle_generation
                    && let Some(busy) = models.iter().find_map(|name| self.in_use_since(name, seen))
                {
                    tracing::info!(?models, seen, busy, "idle deactivation skipped");
                    let _ = reply.send(Ok(Vec::new()));
                    return Flow::Continue;
                }
                let stopped = models
                    .iter()
                    .filter(|name| {
                        self.models
                            .get(*name)
                            .is_some_and(|m| m.run.is_some() && m.state != State::Failed)
                    })
                    .cloned()
                    .collect();
                tracing::info!(?models, force, "deactivate");
                let deadline = Instant::now() + self.drain_timeout;
                self.deactivations.push(PendingDeactivation {
                    models,
                    stopped,
                    force,
                    deadline,
                    reply,
                });
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status_response());
            }
            Command::Watch { reply } => {
                // Publish first so the snapshot and the stream of changes line up.
                self.publish_changes();
                let receiver = self.watch.subscribe();
                let _ = reply.send((self.status_response(), receiver));
            }
            Command::Logs { model, reply } => {
                let result = match model {
                    None => Ok(self
                        .models
                        .values()
                        .filter(|m| !m.removed)
                        .map(|m| m.logs.clone())
                        .collect()),
                    Some(name) => match self.resolve(&name) {
                        Some(model) => Ok(vec![self.models[&model].logs.clone()]),
                        None => Err(Status::not_found(format!("unknown model {name}"))),
                    },
                };
                let _ = reply.send(result);
            }
            Command::Reload { config, reply } => {
                let _ = reply.send(Ok(self.reload(*config)));
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
        Flow::Continue
    }

    /// Why `name` is no longer idle as it was in generation `seen`, or None if it still is
    /// (Ready in that generation, no holder, nobody waiting for it).
    fn in_use_since(&self, name: &str, seen: u64) -> Option<&'static str> {
        let model = self.models.get(name)?;
        if model.state != State::Ready {
            Some("not ready")
        } else if model.generation != seen {
            Some("another generation")
        } else if !model.holds.is_empty() {
            Some("held")
        } else if self.queue.iter().any(|w| w.model == name) {
            Some("wanted")
        } else {
            None
        }
    }

    // ----- reports from tasks ---------------------------------------------------------

    fn internal(&mut self, internal: Internal) {
        match internal {
            Internal::StartFinished {
                model,
                generation,
                result,
            } => self.start_finished(&model, generation, result),
            Internal::Exited {
                model,
                generation,
                info,
            } => self.exited(&model, generation, info),
            Internal::StopFinished {
                model,
                generation,
                info,
            } => self.stop_finished(&model, generation, info),
            Internal::StopStuck {
                model,
                generation,
                pids,
            } => self.stop_stuck(&model, generation, &pids),
            Internal::StreamClosed { id } => self.stream_closed(id),
            Internal::Progress {
                model,
                generation,
                parsed,
            } => self.load_progressed(&model, generation, parsed),
        }
    }

    /// A stop left processes alive: say so, and fail the deactivations waiting for it (the
    /// model keeps its GPUs until StopFinished, once the processes are gone).
    fn stop_stuck(&mut self, name: &str, generation: u64, pids: &[i32]) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if model
            .run
            .as_ref()
            .is_none_or(|r| r.generation != generation)
        {
            return;
        }
        let reason = format!(
            "the stop left processes {pids:?} running (stuck in the kernel?): its GPUs stay \
             reserved until they are gone"
        );
        model.note(reason.clone());
        tracing::error!(
            model = name,
            generation,
            ?pids,
            "stop failed: processes left"
        );
        model.last_error = reason.clone();
        let failed = Status::internal(format!("{name}: {reason}"));
        self.deactivations.retain_mut(|deactivation| {
            if !deactivation.models.iter().any(|m| m == name) {
                return true;
            }
            let (reply, _) = oneshot::channel();
            let reply = std::mem::replace(&mut deactivation.reply, reply);
            let _ = reply.send(Err(failed.clone()));
            false
        });
    }

    /// Keeps the starting model's progress for Status and Watch and tells every waiter that
    /// follows this start.
    fn load_progressed(&mut self, name: &str, generation: u64, parsed: Option<LoadProgress>) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let current = model
            .run
            .as_ref()
            .is_some_and(|r| r.generation == generation);
        if !current || model.state != State::Starting {
            return;
        }
        if let Some(parsed) = parsed {
            if model.progress.as_ref() == Some(&parsed) {
                return;
            }
            model.progress = Some(parsed);
        }
        let Some(progress) = self.load_progress(name) else {
            return;
        };
        for waiter in &self.queue {
            if waiter.model == name && waiter.joined == Some(generation) {
                waiter.stream.send(Event::Progress(progress.clone()));
            }
        }
    }

    /// Where the start of `name` stands: the backend's own words and an estimate of the time
    /// left from its percentage or from its recent loads. None unless it is starting.
    fn load_progress(&self, name: &str) -> Option<pb::LoadProgress> {
        let model = &self.models[name];
        let run = model
            .run
            .as_ref()
            .filter(|_| model.state == State::Starting)?;
        let elapsed = run.spawned_at.elapsed();
        let typical = self.history.typical(name, Operation::Load);
        let percent = model.progress.as_ref().and_then(|p| p.percent);
        Some(pb::LoadProgress {
            model: name.to_owned(),
            phase: "loading".into(),
            percent,
            detail: model
                .progress
                .as_ref()
                .map(|p| p.detail.clone())
                .unwrap_or_default(),
            elapsed_ms: millis(elapsed),
            eta_ms: load_progress::time_left(elapsed, percent, typical).map(millis),
            typical_ms: typical.map_or(0, millis),
        })
    }

    fn start_finished(&mut self, name: &str, generation: u64, result: Result<(), StartError>) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let current = model
            .run
            .as_ref()
            .is_some_and(|r| r.generation == generation);
        if !current || model.state != State::Starting {
            return;
        }
        // A backend that passed its readiness check and died at once (a 200 then a crash)
        // is a crash, never Ready: its Exited report may have come first, and was ignored
        // while Starting.
        let result =
            result.and_then(
                |()| match model.run.as_ref().and_then(|r| r.backend.leader_gone()) {
                    Some(why) => Err(StartError::ExitedAfterReady(why)),
                    None => Ok(()),
                },
            );
        model.warming = None;
        match result {
            Ok(()) => {
                let now = Instant::now();
                model.state = State::Ready;
                model.ready_at = Some(now);
                model.retry_at = None;
                let took = model
                    .run
                    .as_ref()
                    .map_or(Duration::ZERO, |r| now - r.spawned_at);
                model.last_startup_ms = millis(took);
                model.progress = None;
                if let Some(run) = model.run.as_mut() {
                    run.progress_tracker = None;
                }
                self.history.record(name, Operation::Load, took);
                self.metrics.phase_finished(SwapPhase::Ready, took);
                model.note(format!(
                    "ready after {} ms (generation {generation})",
                    millis(took)
                ));
                tracing::info!(model = name, generation, startup_ms = millis(took), "ready");
            }
            Err(error) => {
                let (cause, kind) = match error {
                    StartError::ExitedAfterReady(_) => ("exited", FailureKind::Crash),
                    _ => (start_failure_reason(&error), FailureKind::Start),
                };
                self.fail(name, error.to_string(), kind, cause);
            }
        }
    }

    fn exited(&mut self, name: &str, generation: u64, info: ExitInfo) {
        let Some(model) = self.models.get(name) else {
            return;
        };
        let current = model
            .run
            .as_ref()
            .is_some_and(|r| r.generation == generation);
        if !current {
            return;
        }
        match model.state {
            State::Ready => {
                tracing::warn!(model = name, generation, %info, "backend exited on its own");
                self.fail(
                    name,
                    format!("exited: {info}"),
                    FailureKind::Crash,
                    "exited",
                );
            }
            // A start reports its own failure (and start_finished looks again at the leader,
            // in case the exit came right after a passed check); a stop reports its own end.
            State::Starting | State::Stopping | State::Failed | State::Stopped => {}
        }
    }

    fn stop_finished(&mut self, name: &str, generation: u64, info: ExitInfo) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if model
            .run
            .as_ref()
            .is_none_or(|r| r.generation != generation)
        {
            return;
        }
        model.run = None;
        model.note(format!("stopped generation {generation} ({info})"));
        tracing::info!(model = name, generation, %info, "stopped");
        if model.state == State::Stopping {
            model.state = State::Stopped;
            model.failures = 0;
        }
        model.ready_at = None;
        if model.removed {
            self.models.remove(name);
            self.published.remove(name);
            let _ = self.watch.send(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Removed(name.to_owned())),
            });
        }
    }

    fn stream_closed(&mut self, id: u64) {
        if let Some(index) = self.queue.iter().position(|w| w.stream.id == id) {
            if let Some(waiter) = self.queue.remove(index) {
                tracing::info!(
                    model = waiter.model,
                    client = waiter.client,
                    "activation abandoned"
                );
            }
            return;
        }
        for (name, model) in &mut self.models {
            if let Some(hold) = model.holds.remove(&id) {
                tracing::info!(model = name, client = hold.client, "hold released");
                return;
            }
        }
    }

    // ----- state transitions -----------------------------------------------------------

    /// Starts `name` for the activation whose span is `cause`: spawns it and the tasks that
    /// report readiness and exit. The start and ready phases are traced under `cause`.
    fn start(&mut self, name: &str, cause: &tracing::Span) -> Result<u64, String> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(tx) = self.sender() else {
            return Err("the supervisor is shutting down".into());
        };
        let spec = {
            let model = &self.models[name];
            LaunchSpec {
                model: name.to_owned(),
                config: model.config.clone(),
                guard_exe: self.guard_exe.clone(),
                gpu_release_timeout: self.gpu_release_timeout,
                state_file: self.state_file.clone(),
            }
        };
        let model = self
            .models
            .get_mut(name)
            .expect("start of a configured model");
        self.metrics.swap_started(name);
        if model.failures > 0 {
            model.restarts += 1;
            self.metrics.backend_restarted(name);
        }
        // The command line itself is logged by the process layer (with the API key masked).
        model.note(format!("starting generation {generation}"));
        let start_span = swap_phase_span(cause, "start", name, generation);
        let began = Instant::now();
        let spawned = start_span.in_scope(|| {
            tracing::info!(model = name, generation, "starting");
            Backend::spawn(&spec, model.logs.clone())
        });
        let backend = match spawned {
            Ok(backend) => backend,
            Err(error) => {
                let reason = error.to_string();
                let cause = start_failure_reason(&error);
                start_span.in_scope(|| tracing::warn!(model = name, %reason, "spawn failed"));
                self.fail(name, reason.clone(), FailureKind::Start, cause);
                return Err(reason);
            }
        };
        self.metrics
            .phase_finished(SwapPhase::Start, began.elapsed());
        drop(start_span);
        model.state = State::Starting;
        model.generation = generation;
        model.ready_at = None;
        model.progress = None;
        let progress_tracker = track_progress(
            model.logs.subscribe(),
            spec.config.kind,
            tx.clone(),
            name.to_owned(),
            generation,
        );
        model.run = Some(Run {
            backend: backend.clone(),
            config: spec.config,
            generation,
            spawned_at: Instant::now(),
            stop_requested: false,
            progress_tracker: Some(progress_tracker),
        });
        {
            let (tx, backend, model) = (tx.clone(), backend.clone(), name.to_owned());
            let ready_span = swap_phase_span(cause, "ready", name, generation);
            tokio::spawn(async move {
                let result = backend.wait_ready().instrument(ready_span).await;
                Self::report(
                    &tx,
                    Internal::StartFinished {
                        model,
                        generation,
                        result,
                    },
                );
            });
        }
        let model = name.to_owned();
        tokio::spawn(async move {
            let info = backend.exited().await;
            Self::report(
                &tx,
                Internal::Exited {
                    model,
                    generation,
                    info,
                },
            );
        });
        Ok(generation)
    }

    /// A start failed or a ready backend exited: every waiter of this start and every hold
    /// learns why, and whatever is left of the process tree is stopped. `cause` is the
    /// fixed word counted in `backend_failures_total{reason}`.
    fn fail(&mut self, name: &str, reason: String, kind: FailureKind, cause: &'static str) {
        let now = Instant::now();
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let healthy_for = model.ready_at.map(|t| now - t);
        model.failures = match (kind, healthy_for) {
            (FailureKind::Crash, Some(up)) if up >= HEALTHY_AFTER => 1,
            _ => model.failures.saturating_add(1),
        };
        model.retry_at = Some(now + crash_backoff(model.failures));
        model.state = State::Failed;
        model.ready_at = None;
        model.last_error = reason.clone();
        end_drain(model, &self.metrics);
        model.note(format!("failed: {reason}"));
        tracing::warn!(model = name, %reason, failures = model.failures, "failed");
        self.metrics.backend_failed(name, cause);
        let log_tail = model.logs.tail_lines(FAILURE_TAIL_LINES);
        for (_, hold) in std::mem::take(&mut model.holds) {
            hold.stream.send(Event::HoldLost(pb::HoldLost {
                model: name.to_owned(),
                reason: reason.clone(),
            }));
        }
        let generation = model.run.as_ref().map(|r| r.generation);
        let failed = pb::Failed {
            model: name.to_owned(),
            reason,
            log_tail,
        };
        self.queue.retain_mut(|w| {
            let joined = w.model == name && (w.joined.is_some() && w.joined == generation);
            if joined {
                w.log_forward = None;
                w.span
                    .in_scope(|| tracing::warn!(model = name, reason = failed.reason, "failed"));
                w.stream.send(Event::Failed(failed.clone()));
            }
            !joined
        });
        self.stop_process(name, None);
    }

    /// Takes a Ready or Starting model down: holds are lost, the process is stopped. `swap`
    /// is the span of the activation that needs the GPUs, if one does: the drain that ends
    /// here and the stop are then phases of its swap.
    fn begin_stop(
        &mut self,
        name: &str,
        reason: &str,
        waiters: WaiterFate<'_>,
        swap: Option<&tracing::Span>,
    ) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if model.run.is_none() || matches!(model.state, State::Stopping | State::Failed) {
            return;
        }
        let generation = model.run.as_ref().map(|r| r.generation);
        for (_, hold) in std::mem::take(&mut model.holds) {
            hold.stream.send(Event::HoldLost(pb::HoldLost {
                model: name.to_owned(),
                reason: reason.to_owned(),
            }));
        }
        model.state = State::Stopping;
        end_drain(model, &self.metrics);
        model.note(format!("stopping: {reason}"));
        tracing::info!(model = name, reason, "stopping");
        let log_tail = model.logs.tail_lines(FAILURE_TAIL_LINES);
        let mut index = 0;
        while index < self.queue.len() {
            let waiter = &mut self.queue[index];
            if waiter.model == name && waiter.joined.is_some() && waiter.joined == generation {
                match waiters {
                    WaiterFate::Fail(why) => {
                        let waiter = self.queue.remove(index).expect("index in range");
                        waiter.finish(Event::Failed(pb::Failed {
                            model: name.to_owned(),
                            reason: format!("start cancelled: {why}"),
                            log_tail: log_tail.clone(),
                        }));
                        continue;
                    }
                    WaiterFate::Requeue => {
                        waiter.joined = None;
                        waiter.log_forward = None;
                    }
                }
            }
            index += 1;
        }
        self.stop_process(name, swap);
    }

    /// Stops the process tree of `name` in a task (once); StopFinished reports the end.
    /// For a swap (`swap`: the activation's span) the stop is traced and timed as its phase.
    fn stop_process(&mut self, name: &str, swap: Option<&tracing::Span>) {
        let Some(tx) = self.sender() else { return };
        let Some(run) = self.models.get_mut(name).and_then(|m| m.run.as_mut()) else {
            return;
        };
        if run.stop_requested {
            return;
        }
        run.stop_requested = true;
        let (backend, generation, model) = (run.backend.clone(), run.generation, name.to_owned());
        let phase = swap.map(|parent| {
            let span = swap_phase_span(parent, "stop", name, generation);
            (span, self.metrics.clone())
        });
        tokio::spawn(async move {
            let info = match phase {
                // From the SIGTERM until the port and the GPU memory are free again.
                Some((span, metrics)) => {
                    let began = Instant::now();
                    let info = backend.stop().instrument(span).await;
                    metrics.phase_finished(SwapPhase::Stop, began.elapsed());
                    info
                }
                None => backend.stop().await,
            };
            // Processes the stop could not end (stuck in the kernel) may hold the GPUs: the
            // stop is reported failed, and finishes (freeing the GPUs) only once they are gone.
            let mut stuck_reported = false;
            loop {
                let pids = backend.survivors();
                if pids.is_empty() {
                    break;
                }
                if !stuck_reported {
                    stuck_reported = true;
                    let (model, pids) = (model.clone(), pids);
                    let stuck = Internal::StopStuck {
                        model,
                        generation,
                        pids,
                    };
                    Self::report(&tx, stuck);
                }
                tokio::time::sleep(STUCK_RECHECK).await;
            }
            Self::report(
                &tx,
                Internal::StopFinished {
                    model,
                    generation,
                    info,
                },
            );
        });
    }

    /// Sends Ready to the waiter at `index` and either ends its stream or keeps it as a hold.
    fn grant(&mut self, index: usize) {
        let Some(mut waiter) = self.queue.remove(index) else {
            return;
        };
        let Some(model) = self.models.get_mut(&waiter.model) else {
            return;
        };
        waiter.log_forward = None;
        let startup_ms = if waiter.joined == Some(model.generation) {
            model.last_startup_ms
        } else {
            0
        };
        waiter.stream.send(Event::Ready(pb::Ready {
            model: waiter.model.clone(),
            address: client_address(&model.config),
            served_name: model.config.served_name(&waiter.model).to_owned(),
            generation: model.generation,
            api_key: model.config.api_key.clone().unwrap_or_default(),
            startup_ms,
        }));
        let _in_activation = waiter.span.enter();
        tracing::debug!(
            model = waiter.model,
            generation = model.generation,
            startup_ms,
            "activation ready"
        );
        if waiter.hold {
            tracing::info!(model = waiter.model, client = waiter.client, "hold granted");
            model.holds.insert(
                waiter.stream.id,
                Hold {
                    stream: waiter.stream,
                    client: waiter.client,
                    drain_requested: false,
                },
            );
        }
    }

    // ----- the queue --------------------------------------------------------------------

    /// Walks the waiters in arrival order and moves each as far as it can go.
    fn pump(&mut self) {
        let now = Instant::now();
        // Models somebody currently needs stopped (their drains stay armed).
        let mut needed: HashSet<String> = HashSet::new();
        self.pump_deactivations(now, &mut needed);
        let mut reserved: Vec<String> = Vec::new();
        let mut index = 0;
        while index < self.queue.len() {
            let target = self.queue[index].model.clone();
            // Only a waiter that is still waiting reserves its model against later ones.
            if self.advance(index, &reserved, now, &mut needed) {
                if !reserved.contains(&target) {
                    reserved.push(target);
                }
                index += 1;
            }
        }
        // Holds are sticky: once nobody waits for a model's GPUs its drain is called off.
        for (name, model) in &mut self.models {
            if !needed.contains(name) {
                model.drain = None;
            }
        }
    }

    /// Moves the waiter at `index` forward. Returns false when it left the queue.
    fn advance(
        &mut self,
        index: usize,
        reserved: &[String],
        now: Instant,
        needed: &mut HashSet<String>,
    ) -> bool {
        let target = self.queue[index].model.clone();
        let Some(model) = self.models.get(&target) else {
            let waiter = self.queue.remove(index).expect("index in range");
            waiter.finish(Event::Failed(pb::Failed {
                model: target.clone(),
                reason: format!("model {target} was removed from the configuration"),
                log_tail: Vec::new(),
            }));
            return false;
        };
        if model.removed {
            let waiter = self.queue.remove(index).expect("index in range");
            waiter.finish(Event::Failed(pb::Failed {
                model: target.clone(),
                reason: format!("model {target} was removed from the configuration"),
                log_tail: Vec::new(),
            }));
            return false;
        }
        // An earlier waiter wants a model that cannot run next to this one: wait behind it.
        let blocker = reserved.iter().find(|other| {
            **other != target
                && self
                    .models
                    .get(*other)
                    .is_some_and(|o| o.config.conflicts_with(&model.config))
        });
        if let Some(blocker) = blocker {
            let position = index as u32 + 1;
            let behind = blocker.clone();
            self.queue[index].notice(
                format!("queued:{position}:{behind}"),
                Event::Queued(pb::Queued { position, behind }),
            );
            return true;
        }
        if self
            .deactivations
            .iter()
            .any(|d| d.models.contains(&target))
        {
            let position = index as u32 + 1;
            self.queue[index].notice(
                format!("queued:{position}:deactivate"),
                Event::Queued(pb::Queued {
                    position,
                    behind: target.clone(),
                }),
            );
            return true;
        }
        let (state, has_process) = (model.state, model.run.is_some());
        match state {
            State::Ready => {
                self.grant(index);
                false
            }
            State::Starting => {
                self.join_start(index);
                true
            }
            // The target's own process is still going away.
            State::Stopping => true,
            State::Failed if has_process => true,
            State::Stopped | State::Failed => self.make_room_or_start(index, now, needed),
        }
    }

    /// The waiter follows the start of its model: Starting once, then its log lines.
    fn join_start(&mut self, index: usize) {
        let waiter = &mut self.queue[index];
        let Some(model) = self.models.get(&waiter.model) else {
            return;
        };
        let Some(run) = &model.run else { return };
        if waiter.joined == Some(run.generation) {
            return;
        }
        waiter.joined = Some(run.generation);
        waiter.stream.send(Event::Starting(pb::Starting {
            model: waiter.model.clone(),
            pid: run.backend.pid(),
            generation: run.generation,
        }));
        waiter.log_forward = Some(forward_logs(
            model.logs.subscribe(),
            waiter.stream.events.clone(),
            waiter.stream.pending.clone(),
            waiter.stream.received,
            LostLines {
                metrics: self.metrics.clone(),
                model: waiter.model.clone(),
            },
        ));
    }

    /// The target is not running: drain and stop what conflicts with it, then start it.
    fn make_room_or_start(
        &mut self,
        index: usize,
        now: Instant,
        needed: &mut HashSet<String>,
    ) -> bool {
        let target = self.queue[index].model.clone();
        let model = &self.models[&target];
        if let Some(path) = missing_requirement(&model.config) {
            let waiter = self.queue.remove(index).expect("index in range");
            waiter.finish(Event::Failed(pb::Failed {
                model: target.clone(),
                reason: format!("model {target} is unavailable: missing {}", path.display()),
                log_tail: Vec::new(),
            }));
            return false;
        }
        if let Some(retry_at) = model.retry_at
            && retry_at > now
        {
            let wait = retry_at - now;
            let line = format!(
                "restarting {target} in {:.1}s after {} consecutive failure(s): {}",
                wait.as_secs_f64(),
                model.failures,
                model.last_error
            );
            let key = format!("backoff:{}", model.failures);
            self.wake_at(retry_at);
            let waiter = &mut self.queue[index];
            if waiter.notices.insert(key) {
                waiter.stream.send(Event::Log(pb::LogLine {
                    model: target.clone(),
                    stream: pb::LogStream::Supervisor as i32,
                    line,
                    time_ms: unix_millis(),
                    dropped: 0,
                }));
            }
            return true;
        }
        let conflicting: Vec<String> = self
            .models
            .iter()
            .filter(|(name, other)| {
                **name != target
                    && other.run.is_some()
                    && other.occupied_config().conflicts_with(&model.config)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if conflicting.is_empty() {
            self.queue[index].joined = None;
            let cause = self.queue[index].span.clone();
            return match self.start(&target, &cause) {
                Ok(_) => {
                    self.join_start(index);
                    true
                }
                // start() failed the model; this waiter had not joined yet.
                Err(reason) => {
                    let waiter = self.queue.remove(index).expect("index in range");
                    let log_tail = self.models[&target].logs.tail_lines(FAILURE_TAIL_LINES);
                    waiter.finish(Event::Failed(pb::Failed {
                        model: target,
                        reason,
                        log_tail,
                    }));
                    false
                }
            };
        }
        let force = self.queue[index].force;
        self.warm_weights(&target);
        for name in conflicting {
            self.make_room(index, &name, force, now, needed);
        }
        true
    }

    /// Reads `name`'s weight files into the page cache while its swap frees the GPUs (once
    /// per swap; the warming ends with the start it prepared).
    fn warm_weights(&mut self, name: &str) {
        let model = self.models.get_mut(name).expect("a configured model");
        if model.warming.as_ref().is_some_and(|w| !w.finished()) {
            return;
        }
        let files = warm::weight_files(&model.config);
        if files.is_empty() {
            return;
        }
        model.note(format!(
            "warming {} weight file(s) into the page cache while the GPUs are freed",
            files.len()
        ));
        let logs = model.logs.clone();
        model.warming = Some(warm::start(files, move |warmed| {
            logs.push(
                pb::LogStream::Supervisor,
                format!(
                    "weights warmed: {} in {} file(s) in {:.2} s ({} left cold)",
                    warm::human_bytes(warmed.bytes),
                    warmed.files,
                    warmed.took.as_secs_f64(),
                    warm::human_bytes(warmed.skipped),
                ),
            );
        }));
    }

    /// Stops `name` because the waiter at `index` (for `target`) needs its GPUs: tells the
    /// waiter, and times the stop inside that waiter's swap span.
    fn stop_for_waiter(&mut self, index: usize, name: &str, target: &str) {
        self.queue[index].notice(
            format!("stopping:{name}"),
            Event::Stopping(pb::Stopping {
                model: name.to_owned(),
            }),
        );
        let swap = self.queue[index].span.clone();
        self.begin_stop(
            name,
            &format!("{target} needs the GPUs"),
            WaiterFate::Requeue,
            Some(&swap),
        );
    }

    /// Moves the conflicting model `name` one step towards stopped, for the waiter at `index`.
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
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        match model.state {
            State::Stopping | State::Failed | State::Stopped => {
                self.queue[index].notice(
                    format!("stopping:{name}"),
                    Event::Stopping(pb::Stopping {
                        model: name.to_owned(),
                    }),
                );
            }
            State::Starting => {
                // Only a start nobody waits for can be in the way (a later waiter of it
                // waits behind this one): cancel it.
                if !wanted_elsewhere {
                    self.stop_for_waiter(index, name, &target);
                }
            }
            State::Ready => {
                let ready_at = model.ready_at.unwrap_or(now);
                let residency_end = ready_at + self.min_residency;
                if residency_end > now {
                    let holders = model.holds.len() as u32;
                    self.timers.insert(residency_end);
                    self.queue[index].notice(
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
                if !model.holds.is_empty() {
                    let deadline = match &model.drain {
                        Some(drain) => drain.deadline,
                        None => {
                            let deadline = now + self.drain_timeout;
                            let swap = &self.queue[index].span;
                            model.drain = Some(Drain::new(deadline, now, Some(swap), name));
                            deadline
                        }
                    };
                    request_drain(name, model, &target, deadline, now);
                    if force || now >= deadline {
                        let reason = if force {
                            format!("revoked: {target} was activated with force")
                        } else {
                            format!("revoked: drain_timeout passed while {target} waited")
                        };
                        revoke_holds(name, model, &reason);
                    } else {
                        let holders = model.holds.len() as u32;
                        self.timers.insert(deadline);
                        self.queue[index].notice(
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
                self.stop_for_waiter(index, name, &target);
            }
        }
    }

    /// Moves every pending Deactivate forward; answers those whose models are all stopped.
    fn pump_deactivations(&mut self, now: Instant, needed: &mut HashSet<String>) {
        let mut pending = std::mem::take(&mut self.deactivations);
        for deactivation in &pending {
            for name in &deactivation.models {
                let Some(model) = self.models.get_mut(name) else {
                    continue;
                };
                if model.run.is_none() || !matches!(model.state, State::Ready | State::Starting) {
                    continue;
                }
                needed.insert(name.clone());
                if !model.holds.is_empty() {
                    let deadline = model
                        .drain
                        .get_or_insert_with(|| Drain::new(deactivation.deadline, now, None, name))
                        .deadline
                        .min(deactivation.deadline);
                    request_drain(name, model, "deactivate", deadline, now);
                    if deactivation.force || now >= deadline {
                        revoke_holds(name, model, "deactivated");
                    } else {
                        self.timers.insert(deadline);
                        continue;
                    }
                }
                self.begin_stop(name, "deactivated", WaiterFate::Fail("deactivated"), None);
            }
        }
        pending.retain_mut(|deactivation| {
            let done = deactivation
                .models
                .iter()
                .all(|name| self.models.get(name).is_none_or(|m| m.run.is_none()));
            if done {
                let (reply, _) = oneshot::channel();
                let reply = std::mem::replace(&mut deactivation.reply, reply);
                let _ = reply.send(Ok(std::mem::take(&mut deactivation.stopped)));
            }
            !done
        });
        self.deactivations = pending;
    }

    // ----- reload -------------------------------------------------------------------------

    fn reload(&mut self, config: Config) -> pb::ReloadResponse {
        // Fault injection for the tests, in debug builds only: a bug in the actor.
        #[cfg(debug_assertions)]
        if std::env::var_os("GPUSWAP_TEST_FAULT").is_some_and(|f| f == "actor-panic-on-reload") {
            panic!("injected fault: actor-panic-on-reload");
        }
        let supervisor = &config.supervisor;
        self.drain_timeout = supervisor.drain_timeout;
        self.min_residency = supervisor.min_residency;
        self.log_lines = supervisor.log_lines;
        self.gpu_release_timeout = supervisor.gpu_release_timeout;
        let mut response = pb::ReloadResponse::default();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let model = self.models.get_mut(&name).expect("listed above");
            match config.models.get(&name) {
                None if model.removed => {}
                None => {
                    model.removed = true;
                    response.removed.push(name.clone());
                    if model.run.is_some() {
                        self.begin_stop(
                            &name,
                            "removed from the configuration",
                            WaiterFate::Fail("removed"),
                            None,
                        );
                    } else {
                        self.models.remove(&name);
                        self.published.remove(&name);
                        let _ = self.watch.send(pb::WatchEvent {
                            event: Some(pb::watch_event::Event::Removed(name.clone())),
                        });
                    }
                }
                Some(new) if model.removed || *new != model.config => {
                    model.removed = false;
                    model.config = new.clone();
                    model
                        .logs
                        .set_secrets(new.secrets().iter().map(String::as_str));
                    response.changed.push(name.clone());
                    if model.run.is_some() {
                        self.begin_stop(&name, "configuration changed", WaiterFate::Requeue, None);
                    }
                }
                Some(_) => {}
            }
        }
        for (name, new) in &config.models {
            if !self.models.contains_key(name) {
                self.models
                    .insert(name.clone(), Model::new(name, new.clone(), self.log_lines));
                response.added.push(name.clone());
            }
        }
        tracing::info!(added = ?response.added, removed = ?response.removed, changed = ?response.changed, "configuration reloaded");
        response
    }

    // ----- shutdown -----------------------------------------------------------------------

    async fn shutdown(&mut self) {
        tracing::info!("stopping every backend");
        for waiter in std::mem::take(&mut self.queue) {
            let model = waiter.model.clone();
            waiter.finish(Event::Failed(pb::Failed {
                model,
                reason: "the supervisor is shutting down".into(),
                log_tail: Vec::new(),
            }));
        }
        let mut stops = Vec::new();
        for (name, model) in &mut self.models {
            revoke_holds(name, model, "the supervisor is shutting down");
            if let Some(run) = model.run.take() {
                model.state = State::Stopped;
                let name = name.clone();
                stops.push(async move {
                    let info = run.backend.stop().await;
                    tracing::info!(model = name, %info, "stopped");
                });
            }
        }
        futures_util::future::join_all(stops).await;
        for deactivation in std::mem::take(&mut self.deactivations) {
            let _ = deactivation.reply.send(Ok(deactivation.stopped));
        }
    }

    // ----- status -------------------------------------------------------------------------

    fn model_status(&self, name: &str) -> pb::ModelStatus {
        let model = &self.models[name];
        let config = &model.config;
        let mut state = match model.state {
            State::Stopped => pb::ModelState::Stopped,
            State::Starting => pb::ModelState::Starting,
            State::Ready => pb::ModelState::Ready,
            State::Stopping => pb::ModelState::Stopping,
            State::Failed => pb::ModelState::Failed,
        };
        let mut detail = String::new();
        if model.run.is_none()
            && let Some(path) = missing_requirement(config)
        {
            state = pb::ModelState::Unavailable;
            detail = format!("missing {}", path.display());
        } else if let Some(drain) = &model.drain {
            detail = format!(
                "draining: holds revoked in {} ms",
                millis(drain.deadline.saturating_duration_since(Instant::now()))
            );
        }
        let run = model.run.as_ref();
        pb::ModelStatus {
            name: name.to_owned(),
            aliases: config.aliases.clone(),
            kind: config.kind.as_str().to_owned(),
            state: state as i32,
            pid: run.map_or(0, |r| r.backend.pid()),
            uptime_ms: run.map_or(0, |r| millis(r.spawned_at.elapsed())),
            restarts: model.restarts,
            last_error: model.last_error.clone(),
            gpus: config.gpus.clone().unwrap_or_default(),
            port: u32::from(config.port),
            host: config.host.clone(),
            served_name: config.served_name(name).to_owned(),
            generation: model.generation,
            holders: model.holds.len() as u32,
            detail,
            last_startup_ms: model.last_startup_ms,
            idle_ttl_ms: config.idle_ttl.map(millis),
            progress: self.load_progress(name),
        }
    }

    /// The status without the fields that change by themselves (uptime, countdowns).
    fn comparable_status(&self, name: &str) -> pb::ModelStatus {
        let mut status = self.model_status(name);
        status.uptime_ms = 0;
        if let Some(progress) = status.progress.as_mut() {
            progress.elapsed_ms = 0;
            progress.eta_ms = None;
        }
        if status.detail.starts_with("draining") {
            status.detail = "draining".into();
        }
        status
    }

    fn status_response(&self) -> pb::StatusResponse {
        pb::StatusResponse {
            models: self
                .models
                .iter()
                .filter(|(_, m)| !m.removed)
                .map(|(name, _)| self.model_status(name))
                .collect(),
            supervisor: Some(pb::SupervisorInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                uptime_ms: millis(self.started.elapsed()),
                queue: self.queue.iter().map(|w| w.model.clone()).collect(),
            }),
        }
    }

    /// Brings `model_state` up to date. Called after every message, like
    /// [`Actor::publish_changes`], so no assignment of a state can be missed; a state that
    /// lasted less than one message (a spawn that failed at once) is never visible.
    fn record_states(&mut self) {
        for (name, model) in &self.models {
            let state = metric_state(model);
            if self.recorded_states.get(name) != Some(&state) {
                self.metrics.set_model_state(name, state);
                self.recorded_states.insert(name.clone(), state);
            }
        }
        // A model removed by a reload is gone: it is no longer in any live state.
        let models = &self.models;
        let metrics = &self.metrics;
        self.recorded_states.retain(|name, state| {
            let kept = models.contains_key(name);
            if !kept && *state != MetricState::Stopped {
                metrics.set_model_state(name, MetricState::Stopped);
            }
            kept
        });
    }

    /// Sends one `changed` per model whose state, holders or the like changed.
    fn publish_changes(&mut self) {
        let names: Vec<String> = self
            .models
            .iter()
            .filter(|(_, m)| !m.removed)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let status = self.comparable_status(&name);
            if self.published.get(&name) == Some(&status) {
                continue;
            }
            self.published.insert(name.clone(), status);
            let _ = self.watch.send(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Changed(self.model_status(&name))),
            });
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FailureKind {
    Start,
    Crash,
}

/// The `model_state` of a model: a Ready model whose holders are asked to let go is draining.
fn metric_state(model: &Model) -> MetricState {
    match model.state {
        State::Stopped => MetricState::Stopped,
        State::Starting => MetricState::Starting,
        State::Ready if model.drain.is_some() && !model.holds.is_empty() => MetricState::Draining,
        State::Ready => MetricState::Ready,
        State::Stopping => MetricState::Stopping,
        State::Failed => MetricState::Failed,
    }
}

/// The `reason` label of `backend_failures_total` for a failed start (a fixed word).
fn start_failure_reason(error: &StartError) -> &'static str {
    match error {
        StartError::PortBusy { .. }
        | StartError::PortTaken { .. }
        | StartError::Spawn { .. }
        | StartError::NoSuchUser(_) => "spawn_failed",
        StartError::Exited(_) | StartError::ExitedAfterReady(_) => "exited",
        // It listened, but its health check never passed in time.
        StartError::Timeout(_) => "startup_timeout",
        // Nothing ever listened on its port.
        StartError::NotListening { .. } => "never_ready",
    }
}

/// Asks every holder of `model` (once each) to finish its requests and let go.
fn request_drain(name: &str, model: &mut Model, wanted_by: &str, deadline: Instant, now: Instant) {
    for hold in model.holds.values_mut() {
        if !hold.drain_requested {
            hold.drain_requested = true;
            hold.stream.send(Event::DrainRequested(pb::DrainRequested {
                model: name.to_owned(),
                wanted_by: wanted_by.to_owned(),
                deadline_ms: millis(deadline.saturating_duration_since(now)),
            }));
        }
    }
}

/// The drain of `model` is over (its holds are gone, or its backend failed); the drain
/// phase of a swap is timed.
fn end_drain(model: &mut Model, metrics: &SupervisorMetrics) {
    if let Some(drain) = model.drain.take()
        && drain.for_swap
    {
        metrics.phase_finished(SwapPhase::Drain, drain.started.elapsed());
    }
}

/// Ends every hold of `model` with HoldLost.
fn revoke_holds(name: &str, model: &mut Model, reason: &str) {
    for (_, hold) in std::mem::take(&mut model.holds) {
        tracing::info!(model = name, client = hold.client, reason, "hold lost");
        hold.stream.send(Event::HoldLost(pb::HoldLost {
            model: name.to_owned(),
            reason: reason.to_owned(),
        }));
    }
}

/// Forwards a starting model's output to one waiter while it lives. Dropping it closes the
/// sender slot under its lock, so no line can follow the Ready or Failed the actor sends next.
struct LogForward {
    slot: Arc<std::sync::Mutex<Option<EventSender>>>,
    _stop: DropGuard,
}

impl Drop for LogForward {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Starts forwarding `lines` to `events`. Lines are skipped (and counted as dropped) when
/// the client reads slowly, so control events always find room.
fn forward_logs(
    mut lines: broadcast::Receiver<LogEntry>,
    events: EventSender,
    control_pending: Arc<AtomicUsize>,
    received: Instant,
    lost: LostLines,
) -> LogForward {
    let token = CancellationToken::new();
    let slot = Arc::new(std::sync::Mutex::new(Some(events)));
    let forward = LogForward {
        slot: slot.clone(),
        _stop: token.clone().drop_guard(),
    };
    tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                _ = token.cancelled() => break,
                entry = lines.recv() => entry,
            };
            let entry = match entry {
                Ok(entry) => entry,
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    lost.count(skipped);
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            let Some(events) = slot.as_ref() else { break };
            // A line never overtakes a control event that waits for room.
            if events.capacity() <= CONTROL_RESERVE || control_pending.load(Ordering::SeqCst) > 0 {
                lost.count(1);
                continue;
            }
            let event = pb::ActivateEvent {
                elapsed_ms: millis(received.elapsed()),
                event: Some(Event::Log(pb::LogLine {
                    model: entry.model.to_string(),
                    stream: entry.stream as i32,
                    line: entry.line,
                    time_ms: entry.time_ms,
                    dropped: 0,
                })),
            };
            match events.try_send(Ok(event)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lost.count(1),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });
    forward
}

/// How often a start's estimate of the time left is refreshed when the backend prints nothing.
const PROGRESS_REFRESH: Duration = Duration::from_secs(5);

/// Reads a starting backend's output for progress lines and reports them to the actor, plus a
/// refresh every [`PROGRESS_REFRESH`] (the first at once); ends when the guard is dropped.
fn track_progress(
    mut lines: broadcast::Receiver<LogEntry>,
    kind: gpuswap::config::BackendKind,
    tx: mpsc::UnboundedSender<Message>,
    model: String,
    generation: u64,
) -> DropGuard {
    let token = CancellationToken::new();
    let guard = token.clone().drop_guard();
    tokio::spawn(async move {
        let mut refresh = tokio::time::interval(PROGRESS_REFRESH);
        loop {
            let parsed = tokio::select! {
                _ = token.cancelled() => break,
                _ = refresh.tick() => None,
                entry = lines.recv() => match entry {
                    Ok(entry) => match load_progress::parse_line(kind, &entry.line) {
                        Some(parsed) => Some(parsed),
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            let report = Internal::Progress {
                model: model.clone(),
                generation,
                parsed,
            };
            if tx.send(Message::Internal(report)).is_err() {
                break;
            }
        }
    });
    guard
}

/// Counts the log lines a reader of `model`'s output did not get.
pub struct LostLines {
    pub metrics: SupervisorMetrics,
    pub model: String,
}

impl LostLines {
    pub fn count(&self, lines: u64) {
        self.metrics.log_lines_dropped(&self.model, lines);
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

    fn model(host: &str, port: u16) -> ModelConfig {
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = {port}\nhost = \"{host}\"\n"
        );
        Config::from_toml(&text).unwrap().models["m"].clone()
    }

    fn options(guard_exe: PathBuf) -> SchedulerOptions {
        SchedulerOptions {
            config_path: None,
            guard_exe,
            state_file: None,
            metrics: gpuswap_telemetry::Metrics::new().supervisor(),
        }
    }

    /// A client that does not read its Activate stream gets every control event, in order,
    /// once it reads: none is dropped because the stream's channel was full.
    #[tokio::test]
    async fn control_events_wait_for_a_slow_reader_instead_of_being_dropped() {
        let (tx, _reports) = mpsc::unbounded_channel();
        let config = Config::from_toml("").unwrap();
        let mut actor = Actor::new(config, options(PathBuf::new()), tx.downgrade());
        let (events, mut rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let stream = actor.client_stream(events, Instant::now());
        let total = 2 * EVENT_CHANNEL_CAPACITY as u32;
        for position in 1..=total {
            stream.send(Event::Queued(pb::Queued {
                position,
                behind: "other".into(),
            }));
        }
        drop(stream);
        let mut positions = Vec::new();
        while let Some(event) = rx.recv().await {
            match event.expect("an event").event {
                Some(Event::Queued(queued)) => positions.push(queued.position),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(positions, (1..=total).collect::<Vec<_>>());
        drop(tx);
    }

    /// A stop that left processes alive fails the Deactivate waiting for it and keeps the
    /// model's process (its GPUs) in place until they are gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_stop_fails_its_deactivation_and_keeps_the_gpus() {
        let port = testkit::free_port();
        let text =
            format!("[models.m]\nkind = \"vllm\"\ncommand = [\"sleep\", \"30\"]\nport = {port}\n");
        let options = options(testkit::bin("gpuswap-supervisor"));
        let (tx, _reports) = mpsc::unbounded_channel();
        let mut actor = Actor::new(Config::from_toml(&text).unwrap(), options, tx.downgrade());
        let generation = actor.start("m", &tracing::Span::none()).expect("spawned");
        let (reply, answer) = oneshot::channel();
        actor.command(Command::Deactivate {
            model: Some("m".into()),
            force: true,
            if_idle_generation: None,
            reply,
        });
        actor.stop_stuck("m", generation, &[4242]);
        let status = answer.await.expect("answered").expect_err("a failed stop");
        assert!(status.message().contains("4242"), "{status:?}");
        let model = &actor.models["m"];
        assert!(model.run.is_some(), "the GPUs stay reserved");
        assert!(
            model.last_error.contains("stay reserved"),
            "{}",
            model.last_error
        );
        drop(tx);
    }

    /// The readiness check passed, then the leader died before the actor took the report in
    /// (its Exited came first and was ignored while Starting): that is a crash, not Ready.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_reported_ready_after_the_leader_died_is_a_crash() {
        let port = testkit::free_port();
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"sh\", \"-c\", \"exit 3\"]\nport = {port}\n"
        );
        let options = options(testkit::bin("gpuswap-supervisor"));
        let (tx, _reports) = mpsc::unbounded_channel();
        let mut actor = Actor::new(Config::from_toml(&text).unwrap(), options, tx.downgrade());
        let generation = actor.start("m", &tracing::Span::none()).expect("spawned");
        let backend = actor.models["m"].run.as_ref().expect("run").backend.clone();
        backend.exited().await;
        actor.start_finished("m", generation, Ok(()));
        let model = &actor.models["m"];
        assert_eq!(model.state, State::Failed);
        assert!(
            model
                .last_error
                .contains("right after passing its readiness check"),
            "{}",
            model.last_error
        );
        assert!(model.retry_at.is_some(), "restarted after a backoff");
        drop(tx);
    }

    #[test]
    fn client_address_maps_wildcards_to_this_host() {
        assert_eq!(client_address(&model("127.0.0.1", 8000)), "127.0.0.1:8000");
        assert_eq!(client_address(&model("0.0.0.0", 8000)), "127.0.0.1:8000");
        assert_eq!(client_address(&model("::", 8000)), "[::1]:8000");
        assert_eq!(client_address(&model("::1", 8000)), "[::1]:8000");
    }
}
