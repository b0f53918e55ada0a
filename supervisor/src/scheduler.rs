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

pub mod placement;
pub mod policy;
#[cfg(test)]
mod policy_props;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
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
    gpu,
    load_progress::{self, LoadHistory, LoadProgress, Operation},
    logs::{LogBuffer, LogEntry},
    process::{Backend, ExitInfo, LaunchSpec, StartError},
    state_file::StateFile,
    warm::{self, WarmGuard},
};
use placement::{Capacity, Placement};
use policy::{Action, FailureKind, Notice, Policy, Settings, Slot, State, StreamId};

/// The sending half of one Activate stream.
pub type EventSender = mpsc::Sender<Result<pb::ActivateEvent, Status>>;

/// Capacity of an Activate stream. Log lines are only sent while more than
/// [`CONTROL_RESERVE`] slots are free, so control events nearly always fit at once; one
/// that does not waits for room, in order (see [`ClientStream::send`]).
pub const EVENT_CHANNEL_CAPACITY: usize = 64;
const CONTROL_RESERVE: usize = 16;

/// Lines of the backend's output sent with a `Failed` event.
const FAILURE_TAIL_LINES: usize = 20;

const WATCH_CHANNEL_CAPACITY: usize = 256;

/// How often a stop that left processes alive looks again whether they are gone.
const STUCK_RECHECK: Duration = Duration::from_secs(1);

/// How often NVML's reading of the GPUs' memory is refreshed (a start waiting for memory
/// asks for one at once).
const GPU_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for one NVML reading.
const GPU_READ_TIMEOUT: Duration = Duration::from_secs(5);

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

    /// Records when models were last used (they are then the last to be stopped).
    pub fn report_use(&self, uses: Vec<pb::ModelUse>) -> Result<(), Status> {
        self.send(Command::ReportUse {
            uses,
            received: Instant::now(),
        })
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

/// One client's Activate stream as the actor keeps it: a waiter, then maybe a hold.
struct Stream {
    stream: ClientStream,
    /// The configured model id (aliases resolved).
    model: String,
    client: String,
    /// Stops the forwarding of start-up log lines.
    log_forward: Option<LogForward>,
    /// The activation's span; it ends with Ready or Failed. The phases of a swap the
    /// activation causes are its children.
    span: tracing::Span,
}

/// A live process tree of a model.
struct Run {
    backend: Backend,
    generation: u64,
    /// Reads the backend's load progress while it starts (see [`track_progress`]).
    progress_tracker: Option<DropGuard>,
}

struct Model {
    config: ModelConfig,
    run: Option<Run>,
    logs: LogBuffer,
    /// The last progress the starting backend printed.
    progress: Option<LoadProgress>,
    /// Its weight files being read into the page cache for a swap to it.
    warming: Option<WarmGuard>,
}

impl Model {
    fn new(name: &str, config: ModelConfig, log_lines: usize) -> Self {
        let logs = LogBuffer::new(name, log_lines);
        logs.set_secrets(config.secrets().iter().map(String::as_str));
        Model {
            config,
            run: None,
            logs,
            progress: None,
            warming: None,
        }
    }

    fn note(&self, line: String) {
        self.logs.push(pb::LogStream::Supervisor, line);
    }
}

#[derive(PartialEq)]
enum Flow {
    Continue,
    Stop,
}

/// The policy's settings from the configuration (and what NVML measured).
fn settings(config: &Config, measured: &BTreeMap<u32, u64>) -> Settings {
    let supervisor = &config.supervisor;
    Settings {
        drain_timeout: supervisor.drain_timeout,
        min_residency: supervisor.min_residency,
        capacity: Capacity::new(supervisor.gpu_memory.clone(), measured.clone()),
    }
}

struct Actor {
    guard_exe: PathBuf,
    state_file: Option<Arc<StateFile>>,
    log_lines: usize,
    gpu_release_timeout: Duration,
    policy: Policy,
    models: BTreeMap<String, Model>,
    streams: HashMap<StreamId, Stream>,
    deactivations: HashMap<u64, oneshot::Sender<Result<Vec<String>, Status>>>,
    /// The drain phase's span of each draining model; it ends with the drain.
    drain_spans: HashMap<String, tracing::Span>,
    next_stream_id: u64,
    next_deactivation: u64,
    me: mpsc::WeakUnboundedSender<Message>,
    watch: broadcast::Sender<pb::WatchEvent>,
    published: HashMap<String, pb::ModelStatus>,
    timers: BTreeSet<Instant>,
    started: Instant,
    metrics: SupervisorMetrics,
    /// The state each model last showed in `model_state`.
    recorded_states: HashMap<String, MetricState>,
    /// GPU sizes NVML reported (empty without NVML).
    measured: BTreeMap<u32, u64>,
    /// GPU memory in use as NVML last reported it (empty without NVML).
    gpu_used: BTreeMap<u32, u64>,
    /// Unix time of `started`, in milliseconds.
    started_unix_ms: u64,
    /// The GPUs' memory as last published on Watch (NVML's use in whole GiB).
    published_gpus: Vec<pb::GpuStatus>,
    /// Wakes the NVML poller for a reading now.
    measure_now: Arc<tokio::sync::Notify>,
    /// Recent load durations per model, for the estimate of the time left.
    history: LoadHistory,
}

impl Actor {
    fn new(
        config: Config,
        options: SchedulerOptions,
        me: mpsc::WeakUnboundedSender<Message>,
    ) -> Self {
        let measured = BTreeMap::new();
        let mut policy = Policy::new(settings(&config, &measured), first_generation());
        let supervisor = &config.supervisor;
        let models = config
            .models
            .iter()
            .map(|(name, model)| {
                policy.add_model(name, Placement::of(model));
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
            log_lines: supervisor.log_lines,
            gpu_release_timeout: supervisor.gpu_release_timeout,
            policy,
            models,
            streams: HashMap::new(),
            deactivations: HashMap::new(),
            drain_spans: HashMap::new(),
            next_stream_id: 1,
            next_deactivation: 1,
            me,
            watch,
            published: HashMap::new(),
            timers: BTreeSet::new(),
            started: Instant::now(),
            metrics: options.metrics,
            recorded_states: HashMap::new(),
            measured,
            gpu_used: BTreeMap::new(),
            started_unix_ms: unix_millis(),
            published_gpus: Vec::new(),
            measure_now: Arc::default(),
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
        tokio::spawn(poll_gpu_memory(
            self.me.clone(),
            Arc::clone(&self.measure_now),
        ));
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
        let policy = &self.policy;
        let live = |key: &String| policy.slot(key).is_some_and(|s| !s.removed);
        if let Some((key, _)) = self.models.get_key_value(name).filter(|(k, _)| live(k)) {
            return Some(key.clone());
        }
        self.models
            .iter()
            .filter(|(key, _)| live(key))
            .find(|(_, m)| m.config.aliases.iter().any(|a| a == name))
            .map(|(key, _)| key.clone())
    }

    /// The span of a stream's activation (none once it is over).
    fn span_of(&self, stream: StreamId) -> tracing::Span {
        self.streams
            .get(&stream)
            .map_or_else(tracing::Span::none, |s| s.span.clone())
    }

    // ----- the policy -----------------------------------------------------------------

    /// Lets the policy walk the queue, and carries out what it decided.
    fn pump(&mut self) {
        let models = &self.models;
        let unavailable = |name: &str| {
            let model = models.get(name)?;
            missing_requirement(&model.config).map(|path| format!("missing {}", path.display()))
        };
        self.policy.pump(Instant::now(), &unavailable);
        self.carry_out();
    }

    /// Carries out the actions the policy decided so far (and those they lead to).
    fn carry_out(&mut self) {
        loop {
            let actions = self.policy.take_actions();
            if actions.is_empty() {
                return;
            }
            for action in actions {
                self.apply(action);
            }
        }
    }

    fn apply(&mut self, action: Action) {
        match action {
            Action::Send {
                stream,
                model,
                notice,
            } => self.send_notice(stream, &model, notice),
            Action::Close { stream } => {
                self.streams.remove(&stream);
            }
            Action::Unjoin { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.log_forward = None;
                }
            }
            Action::Spawn {
                model,
                generation,
                cause,
                restart,
            } => self.spawn(&model, generation, cause, restart),
            Action::Stop {
                model,
                generation,
                reason,
                swap,
            } => self.stop(&model, generation, reason, swap),
            Action::Ready {
                model,
                generation,
                took,
            } => {
                if let Some(m) = self.models.get_mut(&model) {
                    m.progress = None;
                    if let Some(run) = m.run.as_mut() {
                        run.progress_tracker = None;
                    }
                }
                self.history.record(&model, Operation::Load, took);
                self.metrics.phase_finished(SwapPhase::Ready, took);
                if let Some(m) = self.models.get(&model) {
                    m.note(format!(
                        "ready after {} ms (generation {generation})",
                        millis(took)
                    ));
                }
                tracing::info!(model, generation, startup_ms = millis(took), "ready");
            }
            Action::Failed {
                model,
                reason,
                cause,
            } => {
                if let Some(m) = self.models.get(&model) {
                    m.note(format!("failed: {reason}"));
                }
                let failures = self.policy.slot(&model).map_or(0, |s| s.failures);
                tracing::warn!(model, %reason, failures, "failed");
                self.metrics.backend_failed(&model, cause);
            }
            Action::DrainBegan { model, swap } => {
                let span = match swap {
                    Some(stream) => {
                        let parent = self.span_of(stream);
                        tracing::info_span!(parent: &parent, "swap", phase = "drain", model)
                    }
                    None => tracing::Span::none(),
                };
                self.drain_spans.insert(model, span);
            }
            Action::DrainEnded { model, swap_took } => {
                self.drain_spans.remove(&model);
                if let Some(took) = swap_took {
                    self.metrics.phase_finished(SwapPhase::Drain, took);
                }
            }
            Action::Deactivated { id, stopped } => {
                if let Some(reply) = self.deactivations.remove(&id) {
                    let _ = reply.send(Ok(stopped));
                }
            }
            Action::DeactivationFailed { id, model, reason } => {
                if let Some(reply) = self.deactivations.remove(&id) {
                    let _ = reply.send(Err(Status::internal(format!("{model}: {reason}"))));
                }
            }
            Action::Removed { model } => {
                self.models.remove(&model);
                self.published.remove(&model);
                let _ = self.watch.send(pb::WatchEvent {
                    event: Some(pb::watch_event::Event::Removed(model)),
                });
            }
            Action::WakeAt(at) => {
                self.timers.insert(at);
            }
            Action::MeasureGpus => self.measure_now.notify_one(),
            Action::MakingRoom { model } => self.warm_weights(&model),
        }
    }

    /// Sends what the policy says to one stream, filling in what only the actor knows.
    fn send_notice(&mut self, id: StreamId, name: &str, notice: Notice) {
        let Some(model) = self.models.get(name) else {
            return;
        };
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        match notice {
            Notice::Event(event) => {
                if let Event::HoldLost(lost) = &event {
                    tracing::info!(
                        model = name,
                        client = stream.client,
                        reason = lost.reason,
                        "hold lost"
                    );
                }
                stream.stream.send(event);
            }
            Notice::Starting { generation } => {
                let Some(run) = model.run.as_ref().filter(|r| r.generation == generation) else {
                    return;
                };
                stream.stream.send(Event::Starting(pb::Starting {
                    model: name.to_owned(),
                    pid: run.backend.pid(),
                    generation,
                }));
                stream.log_forward = Some(forward_logs(
                    model.logs.subscribe(),
                    stream.stream.events.clone(),
                    stream.stream.pending.clone(),
                    stream.stream.received,
                    LostLines {
                        metrics: self.metrics.clone(),
                        model: name.to_owned(),
                    },
                ));
            }
            Notice::Ready {
                generation,
                startup_ms,
                hold,
            } => {
                stream.log_forward = None;
                stream.stream.send(Event::Ready(pb::Ready {
                    model: name.to_owned(),
                    address: client_address(&model.config),
                    served_name: model.config.served_name(name).to_owned(),
                    generation,
                    api_key: model.config.api_key.clone().unwrap_or_default(),
                    startup_ms,
                }));
                let span = std::mem::replace(&mut stream.span, tracing::Span::none());
                let _in_activation = span.enter();
                tracing::debug!(model = name, generation, startup_ms, "activation ready");
                if hold {
                    tracing::info!(model = name, client = stream.client, "hold granted");
                }
            }
            Notice::Failed { reason, log_tail } => {
                stream.log_forward = None;
                let log_tail = if log_tail {
                    model.logs.tail_lines(FAILURE_TAIL_LINES)
                } else {
                    Vec::new()
                };
                stream.span.in_scope(|| {
                    tracing::info!(model = name, reason, "activation failed");
                });
                stream.stream.send(Event::Failed(pb::Failed {
                    model: name.to_owned(),
                    reason,
                    log_tail,
                }));
            }
            Notice::Line(line) => stream.stream.send(Event::Log(pb::LogLine {
                model: name.to_owned(),
                stream: pb::LogStream::Supervisor as i32,
                line,
                time_ms: unix_millis(),
                dropped: 0,
            })),
        }
    }

    /// Spawns `name` for the activation `cause` and the tasks that report readiness and
    /// exit. The start and ready phases are traced under the activation's span.
    fn spawn(&mut self, name: &str, generation: u64, cause: StreamId, restart: bool) {
        let cause_span = self.span_of(cause);
        let Some(tx) = self.sender() else {
            let reason = "the supervisor is shutting down".to_owned();
            self.policy
                .spawn_failed(name, generation, reason, "spawn_failed", Instant::now());
            return;
        };
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        let spec = LaunchSpec {
            model: name.to_owned(),
            config: model.config.clone(),
            guard_exe: self.guard_exe.clone(),
            gpu_release_timeout: self.gpu_release_timeout,
            state_file: self.state_file.clone(),
        };
        self.metrics.swap_started(name);
        if restart {
            self.metrics.backend_restarted(name);
        }
        // The command line itself is logged by the process layer (with the API key masked).
        model.note(format!("starting generation {generation}"));
        let start_span = swap_phase_span(&cause_span, "start", name, generation);
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
                self.policy
                    .spawn_failed(name, generation, reason, cause, Instant::now());
                return;
            }
        };
        self.metrics
            .phase_finished(SwapPhase::Start, began.elapsed());
        drop(start_span);
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
            generation,
            progress_tracker: Some(progress_tracker),
        });
        {
            let (tx, backend, model) = (tx.clone(), backend.clone(), name.to_owned());
            let ready_span = swap_phase_span(&cause_span, "ready", name, generation);
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
        {
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
        }
        self.send_notice(cause, name, Notice::Starting { generation });
    }

    /// Stops the process tree of `name` in a task; StopFinished reports the end. For a swap
    /// (`swap`: the waiting activation) the stop is traced and timed as its phase.
    fn stop(
        &mut self,
        name: &str,
        generation: u64,
        reason: Option<String>,
        swap: Option<StreamId>,
    ) {
        let swap_span = swap.map(|stream| self.span_of(stream));
        let Some(model) = self.models.get(name) else {
            return;
        };
        if let Some(reason) = &reason {
            model.note(format!("stopping: {reason}"));
            tracing::info!(model = name, reason, "stopping");
        }
        let backend = match &model.run {
            Some(run) if run.generation == generation => run.backend.clone(),
            // Nothing left to stop.
            _ => return self.policy.stop_finished(name, generation),
        };
        let Some(tx) = self.sender() else { return };
        let phase = swap_span.map(|parent| {
            let span = swap_phase_span(&parent, "stop", name, generation);
            (span, self.metrics.clone())
        });
        let model = name.to_owned();
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
                let id = stream.id;
                self.policy.activate(id, &model, args.hold, args.force);
                self.streams.insert(
                    id,
                    Stream {
                        stream,
                        model,
                        client: args.client,
                        log_forward: None,
                        span: args.span,
                    },
                );
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
                    && let Some(busy) = models
                        .iter()
                        .find_map(|name| self.policy.in_use_since(name, seen))
                {
                    tracing::info!(?models, seen, busy, "idle deactivation skipped");
                    let _ = reply.send(Ok(Vec::new()));
                    return Flow::Continue;
                }
                tracing::info!(?models, force, "deactivate");
                let id = self.next_deactivation;
                self.next_deactivation += 1;
                self.deactivations.insert(id, reply);
                self.policy.deactivate(id, models, force, Instant::now());
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
                        .iter()
                        .filter(|(name, _)| self.policy.slot(name).is_some_and(|s| !s.removed))
                        .map(|(_, m)| m.logs.clone())
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
            Command::ReportUse { uses, received } => {
                for usage in uses {
                    if let Some(model) = self.resolve(&usage.model) {
                        let ended = received
                            .checked_sub(Duration::from_millis(usage.idle_ms))
                            .unwrap_or(received);
                        self.policy.used(&model, ended);
                    }
                }
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
        Flow::Continue
    }

    // ----- reports from tasks ---------------------------------------------------------

    fn internal(&mut self, internal: Internal) {
        let now = Instant::now();
        match internal {
            Internal::StartFinished {
                model,
                generation,
                result,
            } => {
                // A backend that passed its readiness check and died at once (a 200 then a
                // crash) is a crash, never Ready: its Exited report may have come first, and
                // was ignored while Starting.
                if let Some(m) = self.models.get_mut(&model) {
                    m.warming = None;
                }
                let leader_gone = self
                    .models
                    .get(&model)
                    .and_then(|m| m.run.as_ref())
                    .filter(|r| r.generation == generation)
                    .and_then(|r| r.backend.leader_gone());
                let result = result.and(match leader_gone {
                    Some(why) => Err(StartError::ExitedAfterReady(why)),
                    None => Ok(()),
                });
                match result {
                    Ok(()) => self.policy.start_succeeded(&model, generation, now),
                    Err(error) => {
                        let (cause, kind) = match error {
                            StartError::ExitedAfterReady(_) => ("exited", FailureKind::Crash),
                            _ => (start_failure_reason(&error), FailureKind::Start),
                        };
                        let reason = error.to_string();
                        self.policy
                            .start_failed(&model, generation, reason, cause, kind, now);
                    }
                }
            }
            Internal::Exited {
                model,
                generation,
                info,
            } => {
                if self
                    .policy
                    .slot(&model)
                    .is_some_and(|s| s.state == State::Ready && s.generation == generation)
                {
                    tracing::warn!(model, generation, %info, "backend exited on its own");
                }
                self.policy
                    .exited(&model, generation, format!("exited: {info}"), now);
            }
            Internal::StopFinished {
                model,
                generation,
                info,
            } => {
                if let Some(m) = self.models.get_mut(&model)
                    && m.run.as_ref().is_some_and(|r| r.generation == generation)
                {
                    m.run = None;
                    m.note(format!("stopped generation {generation} ({info})"));
                    tracing::info!(model, generation, %info, "stopped");
                }
                self.policy.stop_finished(&model, generation);
            }
            Internal::StopStuck {
                model,
                generation,
                pids,
            } => self.stop_stuck(&model, generation, &pids),
            Internal::StreamClosed { id } => {
                if let Some(stream) = self.streams.get(&id) {
                    let what = if self.policy.is_waiting(id) {
                        "activation abandoned"
                    } else {
                        "hold released"
                    };
                    tracing::info!(model = stream.model, client = stream.client, "{what}");
                }
                self.policy.stream_closed(id, now);
                self.streams.remove(&id);
            }
            Internal::Progress {
                model,
                generation,
                parsed,
            } => self.load_progressed(&model, generation, parsed),
            Internal::GpuMemory(readings) => {
                let totals: BTreeMap<u32, u64> =
                    readings.iter().map(|(gpu, r)| (*gpu, r.total)).collect();
                if totals != self.measured {
                    self.measured = totals;
                    let mut settings = self.policy.settings().clone();
                    settings.capacity = settings.capacity.with_measured(self.measured.clone());
                    self.policy.set_settings(settings);
                }
                self.gpu_used = readings.iter().map(|(gpu, r)| (*gpu, r.used)).collect();
                self.policy.gpu_memory(self.gpu_used.clone());
            }
        }
        self.carry_out();
    }

    /// Keeps the starting model's progress for Status and Watch and tells every waiter that
    /// follows this start.
    fn load_progressed(&mut self, name: &str, generation: u64, parsed: Option<LoadProgress>) {
        let starting = self
            .policy
            .slot(name)
            .is_some_and(|s| s.state == State::Starting && s.generation == generation);
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if !starting
            || model
                .run
                .as_ref()
                .is_none_or(|r| r.generation != generation)
        {
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
        for id in self.policy.followers(name, generation) {
            if let Some(stream) = self.streams.get(&id) {
                stream.stream.send(Event::Progress(progress.clone()));
            }
        }
    }

    /// Where the start of `name` stands: the backend's own words and an estimate of the time
    /// left from its percentage or from its recent loads. None unless it is starting.
    fn load_progress(&self, name: &str) -> Option<pb::LoadProgress> {
        let model = &self.models[name];
        let run = self
            .policy
            .slot(name)
            .filter(|s| s.state == State::Starting)?
            .run
            .as_ref()?;
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

    /// Reads `name`'s weight files into the page cache while its swap frees the GPUs (once
    /// per swap; the warming ends with the start it prepared).
    fn warm_weights(&mut self, name: &str) {
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
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

    /// A stop left processes alive: say so, and fail the deactivations waiting for it (the
    /// model keeps its GPUs until StopFinished, once the processes are gone).
    fn stop_stuck(&mut self, name: &str, generation: u64, pids: &[i32]) {
        let Some(model) = self.models.get(name) else {
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
        self.policy.stop_stuck(name, generation, reason);
    }

    // ----- reload -------------------------------------------------------------------------

    fn reload(&mut self, config: Config) -> pb::ReloadResponse {
        // Fault injection for the tests, in debug builds only: a bug in the actor.
        #[cfg(debug_assertions)]
        if std::env::var_os("GPUSWAP_TEST_FAULT").is_some_and(|f| f == "actor-panic-on-reload") {
            panic!("injected fault: actor-panic-on-reload");
        }
        let supervisor = &config.supervisor;
        self.policy.set_settings(settings(&config, &self.measured));
        self.log_lines = supervisor.log_lines;
        self.gpu_release_timeout = supervisor.gpu_release_timeout;
        let now = Instant::now();
        let mut response = pb::ReloadResponse::default();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let removed = self.policy.slot(&name).is_none_or(|s| s.removed);
            let model = self.models.get_mut(&name).expect("listed above");
            match config.models.get(&name) {
                None if removed => {}
                None => {
                    response.removed.push(name.clone());
                    self.policy.remove_model(&name, now);
                }
                Some(new) if removed || *new != model.config => {
                    model.config = new.clone();
                    model
                        .logs
                        .set_secrets(new.secrets().iter().map(String::as_str));
                    response.changed.push(name.clone());
                    self.policy.change_model(&name, Placement::of(new), now);
                }
                Some(_) => {}
            }
        }
        for (name, new) in &config.models {
            if !self.models.contains_key(name) {
                self.models
                    .insert(name.clone(), Model::new(name, new.clone(), self.log_lines));
                self.policy.add_model(name, Placement::of(new));
                response.added.push(name.clone());
            }
        }
        self.carry_out();
        tracing::info!(added = ?response.added, removed = ?response.removed, changed = ?response.changed, "configuration reloaded");
        response
    }

    // ----- shutdown -----------------------------------------------------------------------

    async fn shutdown(&mut self) {
        tracing::info!("stopping every backend");
        self.policy.shutdown();
        // Deactivations are answered once the processes are gone.
        let (answers, others): (Vec<Action>, Vec<Action>) = self
            .policy
            .take_actions()
            .into_iter()
            .partition(|a| matches!(a, Action::Deactivated { .. }));
        for action in others {
            self.apply(action);
        }
        let mut stops = Vec::new();
        for (name, model) in &mut self.models {
            if let Some(run) = model.run.take() {
                let name = name.clone();
                stops.push(async move {
                    let info = run.backend.stop().await;
                    tracing::info!(model = name, %info, "stopped");
                });
            }
        }
        futures_util::future::join_all(stops).await;
        for action in answers {
            self.apply(action);
        }
    }

    // ----- status -------------------------------------------------------------------------

    fn model_status(&self, name: &str) -> pb::ModelStatus {
        let model = &self.models[name];
        let slot = self
            .policy
            .slot(name)
            .expect("the policy knows every model");
        let config = &model.config;
        let mut state = match slot.state {
            State::Stopped => pb::ModelState::Stopped,
            State::Starting => pb::ModelState::Starting,
            State::Ready => pb::ModelState::Ready,
            State::Stopping => pb::ModelState::Stopping,
            State::Failed => pb::ModelState::Failed,
        };
        let mut detail = String::new();
        if slot.run.is_none()
            && let Some(path) = missing_requirement(config)
        {
            state = pb::ModelState::Unavailable;
            detail = format!("missing {}", path.display());
        } else if let Some(drain) = &slot.drain {
            detail = format!(
                "draining: holds revoked in {} ms",
                millis(drain.deadline.saturating_duration_since(Instant::now()))
            );
        }
        let run = slot.run.as_ref();
        pb::ModelStatus {
            name: name.to_owned(),
            aliases: config.aliases.clone(),
            kind: config.kind.as_str().to_owned(),
            state: state as i32,
            pid: model.run.as_ref().map_or(0, |r| r.backend.pid()),
            uptime_ms: run.map_or(0, |r| millis(r.spawned_at.elapsed())),
            restarts: slot.restarts,
            last_error: slot.last_error.clone(),
            gpus: config.gpus.clone().unwrap_or_default(),
            port: u32::from(config.port),
            host: config.host.clone(),
            served_name: config.served_name(name).to_owned(),
            generation: slot.generation,
            holders: slot.holds.len() as u32,
            detail,
            last_startup_ms: slot.last_startup.map_or(0, millis),
            idle_ttl_ms: config.idle_ttl.map(millis),
            progress: self.load_progress(name),
            vram_bytes: config.vram,
            pinned: config.pinned,
            last_used_ms: slot.last_use.map(|at| self.unix_ms(at)),
        }
    }

    /// The status without the fields that change by themselves (uptime, countdowns) or with
    /// every request (the last use, which a busy gateway reports ten times a second): a
    /// change of those alone is not published on Watch.
    fn comparable_status(&self, name: &str) -> pb::ModelStatus {
        let mut status = self.model_status(name);
        status.uptime_ms = 0;
        status.last_used_ms = None;
        if let Some(progress) = status.progress.as_mut() {
            progress.elapsed_ms = 0;
            progress.eta_ms = None;
        }
        if status.detail.starts_with("draining") {
            status.detail = "draining".into();
        }
        status
    }

    /// The Unix time of `at`, in milliseconds (stable: from the actor's own start).
    fn unix_ms(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.started) {
            Some(after) => self.started_unix_ms.saturating_add(millis(after)),
            None => self
                .started_unix_ms
                .saturating_sub(millis(self.started - at)),
        }
    }

    /// The memory of every GPU of known size (configured, or seen by NVML).
    fn gpu_status(&self) -> Vec<pb::GpuStatus> {
        let live: Vec<(&str, &Placement)> = self
            .policy
            .slots()
            .filter(|(_, slot)| slot.run.is_some())
            .map(|(name, slot)| (name.as_str(), slot.occupied()))
            .collect();
        self.policy
            .settings()
            .capacity
            .reservations(&live)
            .into_iter()
            .filter(|r| r.capacity.is_some() || self.gpu_used.contains_key(&r.gpu))
            .map(|r| pb::GpuStatus {
                index: r.gpu,
                capacity_bytes: r.capacity,
                reserved_bytes: r.reserved,
                used_bytes: self.gpu_used.get(&r.gpu).copied(),
                models: r.models,
            })
            .collect()
    }

    /// The models a client sees: not those a reload removed.
    fn listed(&self) -> Vec<String> {
        self.models
            .keys()
            .filter(|name| self.policy.slot(name).is_some_and(|s| !s.removed))
            .cloned()
            .collect()
    }

    fn status_response(&self) -> pb::StatusResponse {
        pb::StatusResponse {
            models: self
                .listed()
                .iter()
                .map(|name| self.model_status(name))
                .collect(),
            supervisor: Some(pb::SupervisorInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                uptime_ms: millis(self.started.elapsed()),
                queue: self.policy.queue().map(str::to_owned).collect(),
            }),
            gpus: self.gpu_status(),
        }
    }

    /// Brings `model_state` up to date. Called after every message, like
    /// [`Actor::publish_changes`], so no assignment of a state can be missed; a state that
    /// lasted less than one message (a spawn that failed at once) is never visible.
    fn record_states(&mut self) {
        for (name, slot) in self.policy.slots() {
            let state = metric_state(slot);
            if self.recorded_states.get(name) != Some(&state) {
                self.metrics.set_model_state(name, state);
                self.recorded_states.insert(name.clone(), state);
            }
        }
        // A model removed by a reload is gone: it is no longer in any live state.
        let policy = &self.policy;
        let metrics = &self.metrics;
        self.recorded_states.retain(|name, state| {
            let kept = policy.slot(name).is_some();
            if !kept && *state != MetricState::Stopped {
                metrics.set_model_state(name, MetricState::Stopped);
            }
            kept
        });
    }

    /// Sends one `changed` per model whose state, holders or the like changed, and the GPUs'
    /// memory when it changed (NVML's use by a GiB or more).
    fn publish_changes(&mut self) {
        let gpus = self.gpu_status();
        let comparable: Vec<pb::GpuStatus> = gpus
            .iter()
            .map(|g| pb::GpuStatus {
                used_bytes: g.used_bytes.map(|used| used >> 30),
                ..g.clone()
            })
            .collect();
        if comparable != self.published_gpus {
            self.published_gpus = comparable;
            let _ = self.watch.send(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Gpus(pb::GpuMemory { gpus })),
            });
        }
        for name in self.listed() {
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

/// Reads the GPUs' memory every [`GPU_POLL_INTERVAL`] (or at once when asked) for as long as
/// the actor lives; without NVML it stops after the first try.
async fn poll_gpu_memory(
    actor: mpsc::WeakUnboundedSender<Message>,
    measure_now: Arc<tokio::sync::Notify>,
) {
    loop {
        let Some(readings) = gpu::memory(GPU_READ_TIMEOUT).await else {
            return;
        };
        let Some(tx) = actor.upgrade() else { return };
        if tx
            .send(Message::Internal(Internal::GpuMemory(readings)))
            .is_err()
        {
            return;
        }
        drop(tx);
        tokio::select! {
            _ = tokio::time::sleep(GPU_POLL_INTERVAL) => {}
            _ = measure_now.notified() => {}
        }
    }
}

/// The `model_state` of a model: a Ready model whose holders are asked to let go is draining.
fn metric_state(slot: &Slot) -> MetricState {
    match slot.state {
        State::Stopped => MetricState::Stopped,
        State::Starting => MetricState::Starting,
        State::Ready if slot.drain.is_some() && !slot.holds.is_empty() => MetricState::Draining,
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
        actor.policy.activate(1, "m", false, false);
        actor.pump();
        let generation = actor.models["m"].run.as_ref().expect("spawned").generation;
        let (reply, answer) = oneshot::channel();
        actor.command(Command::Deactivate {
            model: Some("m".into()),
            force: true,
            if_idle_generation: None,
            reply,
        });
        actor.pump();
        actor.stop_stuck("m", generation, &[4242]);
        actor.carry_out();
        let status = answer.await.expect("answered").expect_err("a failed stop");
        assert!(status.message().contains("4242"), "{status:?}");
        assert!(actor.models["m"].run.is_some(), "the GPUs stay reserved");
        let slot = actor.policy.slot("m").expect("model");
        assert!(slot.run.is_some(), "the GPUs stay reserved");
        assert!(
            slot.last_error.contains("stay reserved"),
            "{}",
            slot.last_error
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
        actor.policy.activate(1, "m", false, false);
        actor.pump();
        let run = actor.models["m"].run.as_ref().expect("spawned");
        let (backend, generation) = (run.backend.clone(), run.generation);
        backend.exited().await;
        actor.internal(Internal::StartFinished {
            model: "m".into(),
            generation,
            result: Ok(()),
        });
        let slot = actor.policy.slot("m").expect("model");
        assert_eq!(slot.state, State::Failed);
        assert!(
            slot.last_error
                .contains("right after passing its readiness check"),
            "{}",
            slot.last_error
        );
        assert!(slot.retry_at.is_some(), "restarted after a backoff");
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
