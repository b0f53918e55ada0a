//! The actor itself: its state, its loop, and the plumbing its other files share.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use gpuswap::{
    config::{Config, ModelConfig},
    pb,
};
use gpuswap_telemetry::{ModelState as MetricState, SupervisorMetrics};
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::DropGuard;
use tonic::Status;

use super::{
    Command, Internal, Message, SchedulerOptions,
    log_forward::LogForward,
    placement::{Capacity, Placement},
    policy::{Policy, Settings, StreamId},
    requirements::Requirements,
    streams::ClientStream,
};
use crate::backend::{
    Backend, gpu,
    load_progress::{LoadHistory, LoadProgress},
    logs::LogBuffer,
    state_file::StateFile,
    warm::WarmGuard,
};

const WATCH_CHANNEL_CAPACITY: usize = 256;

/// How often NVML's reading of the GPUs' memory is refreshed (a start waiting for memory
/// asks for one at once).
pub(super) const GPU_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for one NVML reading.
pub(super) const GPU_READ_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The first generation this supervisor hands out (each start takes the next): the wall
/// clock in microseconds, so that a restarted supervisor never hands out a generation its
/// predecessor used (a gateway would take the new backend for the old one). That holds
/// unless the clock steps back by more than the predecessor lived.
pub(super) fn first_generation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros().min(u128::from(u64::MAX / 2)) as u64)
        .max(1)
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// One client's Activate stream as the actor keeps it: a waiter, then maybe a hold.
pub(super) struct Stream {
    pub(super) stream: ClientStream,
    /// The configured model id (aliases resolved).
    pub(super) model: String,
    pub(super) client: String,
    /// Stops the forwarding of start-up log lines.
    pub(super) log_forward: Option<LogForward>,
    /// The activation's span; it ends with Ready or Failed. The phases of a swap the
    /// activation causes are its children.
    pub(super) span: tracing::Span,
}

/// A live process tree of a model.
pub(super) struct Run {
    pub(super) backend: Backend,
    pub(super) generation: u64,
    /// Reads the backend's load progress while it starts (see [`track_progress`]).
    pub(super) progress_tracker: Option<DropGuard>,
}

pub(super) struct Model {
    pub(super) config: ModelConfig,
    pub(super) run: Option<Run>,
    pub(super) logs: LogBuffer,
    /// The last progress the starting backend printed.
    pub(super) progress: Option<LoadProgress>,
    /// The generation being spawned (off the actor), until the spawn reports.
    pub(super) spawning: Option<u64>,
    /// Its weight files being read into the page cache for a swap to it.
    pub(super) warming: Option<WarmGuard>,
}

impl Model {
    pub(super) fn new(name: &str, config: ModelConfig, log_lines: usize) -> Self {
        let logs = LogBuffer::new(name, log_lines);
        logs.set_secrets(config.secrets().iter().map(String::as_str));
        Model {
            config,
            run: None,
            logs,
            progress: None,
            spawning: None,
            warming: None,
        }
    }

    pub(super) fn note(&self, line: String) {
        self.logs.push(pb::LogStream::Supervisor, line);
    }
}

#[derive(PartialEq)]
pub(super) enum Flow {
    Continue,
    Stop,
}

/// The policy's settings from the configuration (and what NVML measured).
pub(super) fn settings(config: &Config, measured: &BTreeMap<u32, u64>) -> Settings {
    let supervisor = &config.supervisor;
    Settings {
        drain_timeout: supervisor.drain_timeout,
        min_residency: supervisor.min_residency,
        capacity: Capacity::new(supervisor.gpu_memory.clone(), measured.clone()),
        host_memory: supervisor.host_memory_budget(),
    }
}

pub(super) struct Actor {
    pub(super) guard_exe: PathBuf,
    pub(super) state_file: Option<Arc<StateFile>>,
    pub(super) log_lines: usize,
    pub(super) gpu_release_timeout: Duration,
    pub(super) policy: Policy,
    pub(super) models: BTreeMap<String, Model>,
    pub(super) streams: HashMap<StreamId, Stream>,
    pub(super) deactivations: HashMap<u64, oneshot::Sender<Result<Vec<String>, Status>>>,
    /// The drain phase's span of each draining model; it ends with the drain.
    pub(super) drain_spans: HashMap<String, tracing::Span>,
    pub(super) next_stream_id: u64,
    pub(super) next_deactivation: u64,
    pub(super) me: mpsc::WeakUnboundedSender<Message>,
    pub(super) watch: broadcast::Sender<pb::WatchEvent>,
    pub(super) published: HashMap<String, pb::ModelStatus>,
    pub(super) timers: BTreeSet<Instant>,
    pub(super) started: Instant,
    pub(super) metrics: SupervisorMetrics,
    /// The state each model last showed in `model_state`.
    pub(super) recorded_states: HashMap<String, MetricState>,
    /// GPU sizes NVML reported (empty without NVML).
    pub(super) measured: BTreeMap<u32, u64>,
    /// GPU memory in use as NVML last reported it (empty without NVML).
    pub(super) gpu_used: BTreeMap<u32, u64>,
    /// Unix time of `started`, in milliseconds.
    pub(super) started_unix_ms: u64,
    /// The GPUs' memory as last published on Watch (NVML's use in whole GiB).
    pub(super) published_gpus: Vec<pb::GpuStatus>,
    /// Wakes the NVML poller for a reading now.
    pub(super) measure_now: Arc<tokio::sync::Notify>,
    /// Recent load durations per model, for the estimate of the time left.
    pub(super) history: LoadHistory,
    /// Looks at `requires` paths without stalling on a hung mount.
    pub(super) requirements: Requirements,
}

impl Actor {
    pub(super) fn new(
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
                policy.add_model(name, Placement::of(name, model));
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
            requirements: Requirements::default(),
        };
        actor.published = actor
            .models
            .keys()
            .map(|name| (name.clone(), actor.comparable_status(name)))
            .collect();
        actor.record_states();
        actor
    }

    pub(super) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
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
                        self.shutdown(&mut rx).await;
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

    pub(super) fn sender(&self) -> Option<mpsc::UnboundedSender<Message>> {
        self.me.upgrade()
    }

    pub(super) fn report(tx: &mpsc::UnboundedSender<Message>, internal: Internal) {
        let _ = tx.send(Message::Internal(internal));
    }

    /// The configured model a name or alias refers to.
    pub(super) fn resolve(&self, name: &str) -> Option<String> {
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
    pub(super) fn span_of(&self, stream: StreamId) -> tracing::Span {
        self.streams
            .get(&stream)
            .map_or_else(tracing::Span::none, |s| s.span.clone())
    }
}

/// Reads the GPUs' memory every [`GPU_POLL_INTERVAL`] (or at once when asked) for as long as
/// the actor lives; without NVML it stops after the first try.
pub(super) async fn poll_gpu_memory(
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

/// The options of an actor under test: `guard_exe` parents its backends, nothing recorded.
#[cfg(test)]
pub(super) fn test_options(guard_exe: PathBuf) -> SchedulerOptions {
    SchedulerOptions {
        config_loader: None,
        guard_exe,
        state_file: None,
        metrics: gpuswap_telemetry::Metrics::new().supervisor(),
    }
}

/// An actor with one vLLM-kind model `m` running `command` (a TOML array), activated and
/// spawned (a spawn runs off the actor: its outcome is taken from the reports). The sender
/// keeps the actor's report channel open; the receiver gets its later reports.
#[cfg(test)]
pub(super) async fn actor_with_spawned_model(
    command: &str,
) -> (
    Actor,
    mpsc::UnboundedSender<Message>,
    mpsc::UnboundedReceiver<Message>,
) {
    let port = testkit::free_port();
    let text = format!("[models.m]\nkind = \"vllm\"\ncommand = {command}\nport = {port}\n");
    let options = test_options(testkit::bin("gpuswap-supervisor"));
    let (tx, mut reports) = mpsc::unbounded_channel();
    let config = gpuswap::config::Config::from_toml(&text).expect("config");
    let mut actor = Actor::new(config, options, tx.downgrade());
    actor.policy.activate(1, "m", false, false);
    actor.pump();
    loop {
        if let Message::Internal(Internal::Spawned(spawned)) =
            reports.recv().await.expect("a report")
        {
            actor.internal(Internal::Spawned(spawned));
            return (actor, tx, reports);
        }
    }
}
