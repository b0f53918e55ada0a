//! Prometheus metrics of the two daemons over `prometheus-client`.
//!
//! Model names are interned: each model's instruments are looked up once and
//! kept behind an `Arc<str>` key, so recording on the hot path is a map read
//! and a few atomic adds, without allocation.
//!
//! Label values must come from the configuration (model ids, fixed reasons),
//! never from raw client input, or a client could grow the label sets without bound.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

/// The `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric name starts with this (`gpuswap_gateway_...`, `gpuswap_supervisor_...`).
const PREFIX: &str = "gpuswap";

/// Seconds from a request's arrival to its first byte, or of a whole request:
/// a swap can take minutes, a warm answer milliseconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
const TOKENS_PER_SECOND_BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0, 2000.0,
];
const PHASE_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Recorded for a request dropped before [`RequestMetrics::finish`]: the
/// client went away (nginx's "client closed request").
pub const STATUS_CLIENT_CLOSED: u16 = 499;

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}
fn tokens_per_second_histogram() -> Histogram {
    Histogram::new(TOKENS_PER_SECOND_BUCKETS)
}
fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    model: Arc<str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// Why the gateway refused a request before it reached a backend, in
/// `refused_total{reason}`: each guards the gateway against one way to be
/// exhausted or misused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// `max_queued` requests already wait (429).
    QueueFull,
    /// The bodies of waiting requests would pass `queue_memory` (429).
    QueueMemory,
    /// The body did not arrive within `body_timeout` (408).
    BodyTimeout,
    /// An `Origin` not in `cors_origins` (403).
    Origin,
    /// A `Host` not in `allowed_hosts` (403).
    Host,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::QueueFull,
        Refusal::QueueMemory,
        Refusal::BodyTimeout,
        Refusal::Origin,
        Refusal::Host,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::QueueMemory => "queue_memory",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::Origin => "origin",
            Refusal::Host => "host",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    model: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    model: Arc<str>,
    state: &'static str,
}

/// Per-model instruments, resolved once per model name.
struct ModelCache<T> {
    entries: RwLock<HashMap<Arc<str>, Arc<T>>>,
}

impl<T> ModelCache<T> {
    fn new() -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn get_or_create(&self, model: &str, create: impl FnOnce(Arc<str>) -> T) -> Arc<T> {
        // A panic elsewhere cannot leave the map half-updated: recover it.
        if let Some(found) = self
            .entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(model)
        {
            return found.clone();
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries
            .entry(Arc::from(model))
            .or_insert_with_key(|key| Arc::new(create(key.clone())))
            .clone()
    }
}

/// The registry of one daemon. Create it once, take [`Metrics::gateway`] or
/// [`Metrics::supervisor`] from it, then share it (`Arc<Metrics>`) with the
/// code that serves `GET /metrics`.
pub struct Metrics {
    registry: Registry,
    gateway: Option<GatewayMetrics>,
    supervisor: Option<SupervisorMetrics>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            registry: Registry::with_prefix(PREFIX),
            gateway: None,
            supervisor: None,
        }
    }

    /// The gateway's metrics (`gpuswap_gateway_*`), registered on the first call.
    pub fn gateway(&mut self) -> GatewayMetrics {
        if self.gateway.is_none() {
            let sub = self.registry.sub_registry_with_prefix("gateway");
            self.gateway = Some(GatewayMetrics::register(sub));
        }
        self.gateway.clone().expect("registered above")
    }

    /// The supervisor's metrics (`gpuswap_supervisor_*`), registered on the first call.
    pub fn supervisor(&mut self) -> SupervisorMetrics {
        if self.supervisor.is_none() {
            let sub = self.registry.sub_registry_with_prefix("supervisor");
            self.supervisor = Some(SupervisorMetrics::register(sub));
        }
        self.supervisor.clone().expect("registered above")
    }

    /// The Prometheus text exposition (serve it with [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut openmetrics = String::new();
        // Writing into a String cannot fail, and every label value here encodes.
        if let Err(error) =
            prometheus_client::encoding::text::encode(&mut openmetrics, &self.registry)
        {
            tracing::error!(%error, "cannot encode metrics");
        }
        openmetrics_to_prometheus_text(&openmetrics)
    }
}

/// prometheus-client writes OpenMetrics, whose counter families are named
/// without `_total` and which has `# UNIT` and `# EOF` lines. The classic
/// Prometheus text format (0.0.4) is the one every scraper and `promtool`
/// read, so counters get their sample name in `# HELP`/`# TYPE` and the
/// OpenMetrics-only lines go. Gauges and histograms read the same in both.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|keyword| {
            let rest = line.strip_prefix(keyword)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(&name)
                .then(|| format!("{keyword}{name}_total {tail}"))
        });
        match descriptor {
            Some(renamed) => text.push_str(renamed.trim_end()),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

/// A gauge raised while the guard lives.
struct GaugeGuard(Option<Gauge>);

impl GaugeGuard {
    fn raise(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(Some(gauge.clone()))
    }

    fn lower(&mut self) {
        if let Some(gauge) = self.0.take() {
            gauge.dec();
        }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.lower();
    }
}

/// Counts one client connection in `connections_open` while it lives.
pub struct OpenConnection {
    _open: GaugeGuard,
}

/// The gateway's metrics; cheap to clone (all clones record into one registry).
#[derive(Clone)]
pub struct GatewayMetrics {
    inner: Arc<GatewayFamilies>,
}

struct GatewayFamilies {
    requests: Family<RequestLabels, Counter>,
    queue_depth: Family<ModelLabels, Gauge>,
    in_flight: Family<ModelLabels, Gauge>,
    time_to_first_byte: HistogramFamily<ModelLabels>,
    request_duration: HistogramFamily<ModelLabels>,
    generated_tokens: Family<ModelLabels, Counter>,
    tokens_per_second: HistogramFamily<ModelLabels>,
    swaps: Family<ModelLabels, Counter>,
    refused: Family<RefusalLabels, Counter>,
    connections_open: Gauge,
    connection_limit_reached: Counter,
    models: ModelCache<GatewayModel>,
}

/// One model's gateway instruments.
struct GatewayModel {
    model: Arc<str>,
    queue_depth: Gauge,
    in_flight: Gauge,
    time_to_first_byte: Histogram,
    request_duration: Histogram,
    generated_tokens: Counter,
    tokens_per_second: Histogram,
}

impl GatewayMetrics {
    fn register(registry: &mut Registry) -> Self {
        let families = GatewayFamilies {
            requests: Family::default(),
            queue_depth: Family::default(),
            in_flight: Family::default(),
            time_to_first_byte: Family::new_with_constructor(latency_histogram),
            request_duration: Family::new_with_constructor(latency_histogram),
            generated_tokens: Family::default(),
            tokens_per_second: Family::new_with_constructor(tokens_per_second_histogram),
            swaps: Family::default(),
            refused: Family::default(),
            connections_open: Gauge::default(),
            connection_limit_reached: Counter::default(),
            models: ModelCache::new(),
        };
        // Every reason shows from the start (at 0), so an alert on one is not "no data".
        for reason in Refusal::ALL {
            let _ = families.refused.get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            });
        }
        registry.register(
            "requests",
            "Requests answered, by model and HTTP status (499: the client went away)",
            families.requests.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for their model to be ready",
            families.queue_depth.clone(),
        );
        registry.register(
            "in_flight",
            "Requests forwarded to a backend and not yet finished",
            families.in_flight.clone(),
        );
        registry.register_with_unit(
            "time_to_first_byte",
            "From a request's arrival (queueing and swaps included) to its first response byte",
            Unit::Seconds,
            families.time_to_first_byte.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "From a request's arrival to its last response byte",
            Unit::Seconds,
            families.request_duration.clone(),
        );
        registry.register(
            "generated_tokens",
            "Completion tokens generated (from usage, else counted stream chunks)",
            families.generated_tokens.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Per request: completion tokens over the time since it was forwarded",
            families.tokens_per_second.clone(),
        );
        registry.register(
            "swaps",
            "Requests that had to wait for their model to be started",
            families.swaps.clone(),
        );
        registry.register(
            "refused",
            "Requests refused before reaching a backend, by reason (queue_full, queue_memory, \
             body_timeout, origin, host)",
            families.refused.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections being served",
            families.connections_open.clone(),
        );
        registry.register(
            "connection_limit_reached",
            "Times max_connections client connections were open, so new ones waited in the \
             listen backlog until one closed",
            families.connection_limit_reached.clone(),
        );
        Self {
            inner: Arc::new(families),
        }
    }

    fn model(&self, model: &str) -> Arc<GatewayModel> {
        let f = &*self.inner;
        f.models.get_or_create(model, |model| {
            let labels = ModelLabels {
                model: model.clone(),
            };
            GatewayModel {
                queue_depth: f.queue_depth.get_or_create_owned(&labels),
                in_flight: f.in_flight.get_or_create_owned(&labels),
                time_to_first_byte: f.time_to_first_byte.get_or_create_owned(&labels),
                request_duration: f.request_duration.get_or_create_owned(&labels),
                generated_tokens: f.generated_tokens.get_or_create_owned(&labels),
                tokens_per_second: f.tokens_per_second.get_or_create_owned(&labels),
                model,
            }
        })
    }

    /// Starts recording one request for `model` (its configured id). It
    /// counts in `queue_depth` until [`RequestMetrics::forwarding`].
    pub fn request(&self, model: &str) -> RequestMetrics {
        let instruments = self.model(model);
        let queued = GaugeGuard::raise(&instruments.queue_depth);
        RequestMetrics {
            gateway: self.clone(),
            instruments,
            arrived: Instant::now(),
            queued,
            in_flight: GaugeGuard(None),
            forwarded: None,
            first_byte_seen: false,
            tokens: 0,
            finished: false,
        }
    }

    /// What the status page shows of `model`: requests queued and in flight now, and
    /// the completion tokens generated so far.
    pub fn model_counts(&self, model: &str) -> ModelCounts {
        let instruments = self.model(model);
        ModelCounts {
            queued: instruments.queue_depth.get(),
            in_flight: instruments.in_flight.get(),
            generated_tokens: instruments.generated_tokens.get(),
        }
    }

    /// The gateway refused a request for `reason`.
    pub fn refused(&self, reason: Refusal) {
        self.inner
            .refused
            .get_or_create(&RefusalLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// A client connection is served until the returned guard is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        OpenConnection {
            _open: GaugeGuard::raise(&self.inner.connections_open),
        }
    }

    /// `max_connections` were open: new connections wait to be accepted.
    pub fn connection_limit_reached(&self) {
        self.inner.connection_limit_reached.inc();
    }

    /// A request had to wait for `model` to be started (it was not ready).
    pub fn swap_waited(&self, model: &str) {
        let model = self.model(model).model.clone();
        self.inner.swaps.get_or_create(&ModelLabels { model }).inc();
    }
}

/// A model's live counts, from the gateway's instruments.
#[derive(Clone, Copy, Debug, Default)]
pub struct ModelCounts {
    pub queued: i64,
    pub in_flight: i64,
    pub generated_tokens: u64,
}

/// One request's measurements; finish it with [`RequestMetrics::finish`].
/// Dropped unfinished (the client went away), it counts as status 499.
pub struct RequestMetrics {
    gateway: GatewayMetrics,
    instruments: Arc<GatewayModel>,
    arrived: Instant,
    queued: GaugeGuard,
    in_flight: GaugeGuard,
    forwarded: Option<Instant>,
    first_byte_seen: bool,
    tokens: u64,
    finished: bool,
}

impl RequestMetrics {
    /// The request leaves the queue and goes to the backend: it moves from
    /// `queue_depth` to `in_flight`, and its generation clock starts.
    pub fn forwarding(&mut self) {
        if self.forwarded.is_some() {
            return;
        }
        self.queued.lower();
        self.in_flight = GaugeGuard::raise(&self.instruments.in_flight);
        self.forwarded = Some(Instant::now());
    }

    /// The first response byte goes to the client (only the first call counts).
    pub fn first_byte(&mut self) {
        if !self.first_byte_seen {
            self.first_byte_seen = true;
            self.instruments
                .time_to_first_byte
                .observe(self.arrived.elapsed().as_secs_f64());
        }
    }

    /// Tokens counted from stream chunks as they pass (one per content chunk
    /// is a fair count for OpenAI streams).
    pub fn add_tokens(&mut self, tokens: u64) {
        self.tokens += tokens;
        self.instruments.generated_tokens.inc_by(tokens);
    }

    /// The backend's own count (`usage.completion_tokens`): it replaces the
    /// counted chunks (the counter only ever grows, by the difference).
    pub fn usage_tokens(&mut self, completion_tokens: u64) {
        if completion_tokens > self.tokens {
            self.instruments
                .generated_tokens
                .inc_by(completion_tokens - self.tokens);
        }
        self.tokens = completion_tokens;
    }

    /// The response is complete (or failed) with this HTTP status.
    pub fn finish(mut self, status: u16) {
        self.record(status);
    }

    fn record(&mut self, status: u16) {
        self.finished = true;
        let now = Instant::now();
        let instruments = &self.instruments;
        self.gateway
            .inner
            .requests
            .get_or_create(&RequestLabels {
                model: instruments.model.clone(),
                status,
            })
            .inc();
        instruments
            .request_duration
            .observe(now.duration_since(self.arrived).as_secs_f64());
        if let Some(forwarded) = self.forwarded {
            let generating = now.duration_since(forwarded).as_secs_f64();
            if self.tokens > 0 && generating > 0.0 {
                instruments
                    .tokens_per_second
                    .observe(self.tokens as f64 / generating);
            }
        }
        self.queued.lower();
        self.in_flight.lower();
    }
}

impl Drop for RequestMetrics {
    fn drop(&mut self) {
        if !self.finished {
            self.record(STATUS_CLIENT_CLOSED);
        }
    }
}

/// The phases of a swap, each timed in `swap_phase_duration_seconds{phase}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwapPhase {
    /// Waiting for the holds of the models in the way to be released.
    Drain,
    /// Stopping the backends in the way (until their GPU memory is free).
    Stop,
    /// Spawning the new backend until its process runs.
    Start,
    /// From spawn until the backend's health check passes.
    Ready,
}

impl SwapPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            SwapPhase::Drain => "drain",
            SwapPhase::Stop => "stop",
            SwapPhase::Start => "start",
            SwapPhase::Ready => "ready",
        }
    }
}

/// A model's state in `model_state{model,state}`: the current one is 1, the others 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelState {
    Stopped,
    Starting,
    Ready,
    Draining,
    Stopping,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 6] = [
        ModelState::Stopped,
        ModelState::Starting,
        ModelState::Ready,
        ModelState::Draining,
        ModelState::Stopping,
        ModelState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Stopped => "stopped",
            ModelState::Starting => "starting",
            ModelState::Ready => "ready",
            ModelState::Draining => "draining",
            ModelState::Stopping => "stopping",
            ModelState::Failed => "failed",
        }
    }
}

/// The supervisor's metrics; cheap to clone.
#[derive(Clone)]
pub struct SupervisorMetrics {
    inner: Arc<SupervisorFamilies>,
}

struct SupervisorFamilies {
    swaps: Family<ModelLabels, Counter>,
    swap_phase_duration: HistogramFamily<PhaseLabels>,
    backend_restarts: Family<ModelLabels, Counter>,
    backend_failures: Family<FailureLabels, Counter>,
    model_state: Family<StateLabels, Gauge>,
    log_lines_dropped: Family<ModelLabels, Counter>,
    models: ModelCache<SupervisorModel>,
}

struct SupervisorModel {
    model: Arc<str>,
    swaps: Counter,
    backend_restarts: Counter,
    log_lines_dropped: Counter,
    states: [(ModelState, Gauge); ModelState::ALL.len()],
}

impl SupervisorMetrics {
    fn register(registry: &mut Registry) -> Self {
        let families = SupervisorFamilies {
            swaps: Family::default(),
            swap_phase_duration: Family::new_with_constructor(phase_histogram),
            backend_restarts: Family::default(),
            backend_failures: Family::default(),
            model_state: Family::default(),
            log_lines_dropped: Family::default(),
            models: ModelCache::new(),
        };
        registry.register(
            "swaps",
            "Swaps started, by the model swapped in",
            families.swaps.clone(),
        );
        registry.register_with_unit(
            "swap_phase_duration",
            "Duration of each phase of a swap (drain, stop, start, ready)",
            Unit::Seconds,
            families.swap_phase_duration.clone(),
        );
        registry.register(
            "backend_restarts",
            "Backends started again after they exited or failed",
            families.backend_restarts.clone(),
        );
        registry.register(
            "backend_failures",
            "Backend failures, by model and reason",
            families.backend_failures.clone(),
        );
        registry.register(
            "model_state",
            "1 for each model's current state, 0 for the others",
            families.model_state.clone(),
        );
        registry.register(
            "log_lines_dropped",
            "Backend log lines dropped (too long, or a follower too slow)",
            families.log_lines_dropped.clone(),
        );
        Self {
            inner: Arc::new(families),
        }
    }

    fn model(&self, model: &str) -> Arc<SupervisorModel> {
        let f = &*self.inner;
        f.models.get_or_create(model, |model| {
            let labels = ModelLabels {
                model: model.clone(),
            };
            let states = ModelState::ALL.map(|state| {
                let gauge = f.model_state.get_or_create_owned(&StateLabels {
                    model: model.clone(),
                    state: state.as_str(),
                });
                (state, gauge)
            });
            SupervisorModel {
                swaps: f.swaps.get_or_create_owned(&labels),
                backend_restarts: f.backend_restarts.get_or_create_owned(&labels),
                log_lines_dropped: f.log_lines_dropped.get_or_create_owned(&labels),
                states,
                model,
            }
        })
    }

    /// A swap to `model` begins (it was not running).
    pub fn swap_started(&self, model: &str) {
        self.model(model).swaps.inc();
    }

    /// One phase of a swap took `took`.
    pub fn phase_finished(&self, phase: SwapPhase, took: Duration) {
        self.inner
            .swap_phase_duration
            .get_or_create(&PhaseLabels {
                phase: phase.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// `model`'s backend is started again after it exited or failed.
    pub fn backend_restarted(&self, model: &str) {
        self.model(model).backend_restarts.inc();
    }

    /// `model`'s backend failed; `reason` is a fixed word such as
    /// `exited`, `startup_timeout`, `spawn_failed`, `crashed`.
    pub fn backend_failed(&self, model: &str, reason: &'static str) {
        let model = self.model(model).model.clone();
        self.inner
            .backend_failures
            .get_or_create(&FailureLabels { model, reason })
            .inc();
    }

    /// `model` is now in `state`.
    pub fn set_model_state(&self, model: &str, state: ModelState) {
        for (each, gauge) in &self.model(model).states {
            gauge.set(i64::from(*each == state));
        }
    }

    /// `lines` of `model`'s log output were dropped.
    pub fn log_lines_dropped(&self, model: &str, lines: u64) {
        self.model(model).log_lines_dropped.inc_by(lines);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name_and_labels: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {name_and_labels} in\n{text}"))
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn a_request_moves_from_queue_to_in_flight_and_is_counted() {
        let mut metrics = Metrics::new();
        let gateway = metrics.gateway();
        let mut request = gateway.request("llama");
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "gpuswap_gateway_queue_depth{model=\"llama\"}"),
            1.0
        );
        assert_eq!(
            sample(&text, "gpuswap_gateway_in_flight{model=\"llama\"}"),
            0.0
        );

        request.forwarding();
        request.first_byte();
        request.add_tokens(3);
        request.usage_tokens(10);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "gpuswap_gateway_queue_depth{model=\"llama\"}"),
            0.0
        );
        assert_eq!(
            sample(&text, "gpuswap_gateway_in_flight{model=\"llama\"}"),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_gateway_generated_tokens_total{model=\"llama\"}"
            ),
            10.0
        );

        request.finish(200);
        gateway.request("llama").finish(503);
        drop(gateway.request("llama"));
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "gpuswap_gateway_in_flight{model=\"llama\"}"),
            0.0
        );
        assert_eq!(
            sample(&text, "gpuswap_gateway_queue_depth{model=\"llama\"}"),
            0.0
        );
        for status in ["200", "503", "499"] {
            let name =
                format!("gpuswap_gateway_requests_total{{model=\"llama\",status=\"{status}\"}}");
            assert_eq!(sample(&text, &name), 1.0, "{name}");
        }
        assert_eq!(
            sample(
                &text,
                "gpuswap_gateway_time_to_first_byte_seconds_count{model=\"llama\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_gateway_request_duration_seconds_count{model=\"llama\"}"
            ),
            3.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_gateway_tokens_per_second_count{model=\"llama\"}"
            ),
            1.0
        );
    }

    #[test]
    fn usage_below_the_counted_chunks_never_lowers_the_counter() {
        let mut metrics = Metrics::new();
        let gateway = metrics.gateway();
        let mut request = gateway.request("m");
        request.forwarding();
        request.add_tokens(5);
        request.usage_tokens(4);
        request.finish(200);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "gpuswap_gateway_generated_tokens_total{model=\"m\"}"),
            5.0
        );
    }

    #[test]
    fn model_state_has_exactly_one_current_state() {
        let mut metrics = Metrics::new();
        let supervisor = metrics.supervisor();
        supervisor.set_model_state("a", ModelState::Starting);
        supervisor.set_model_state("a", ModelState::Ready);
        let text = metrics.encode();
        for state in ModelState::ALL {
            let expected = if state == ModelState::Ready { 1.0 } else { 0.0 };
            let name = format!(
                "gpuswap_supervisor_model_state{{model=\"a\",state=\"{}\"}}",
                state.as_str()
            );
            assert_eq!(sample(&text, &name), expected, "{name}");
        }
    }

    #[test]
    fn supervisor_counters_and_phases() {
        let mut metrics = Metrics::new();
        let supervisor = metrics.supervisor();
        supervisor.swap_started("a");
        supervisor.phase_finished(SwapPhase::Drain, Duration::from_millis(30));
        supervisor.backend_failed("a", "startup_timeout");
        supervisor.backend_restarted("a");
        supervisor.log_lines_dropped("a", 7);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "gpuswap_supervisor_swaps_total{model=\"a\"}"),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_supervisor_swap_phase_duration_seconds_bucket{le=\"0.05\",phase=\"drain\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_supervisor_backend_failures_total{model=\"a\",reason=\"startup_timeout\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_supervisor_backend_restarts_total{model=\"a\"}"
            ),
            1.0
        );
        assert_eq!(
            sample(
                &text,
                "gpuswap_supervisor_log_lines_dropped_total{model=\"a\"}"
            ),
            7.0
        );
    }

    #[test]
    fn counters_are_declared_by_their_sample_name() {
        let openmetrics = "# HELP a_swaps Swaps.\n# TYPE a_swaps counter\na_swaps_total 1\n\
            # HELP a_ttfb_seconds T.\n# TYPE a_ttfb_seconds histogram\n# UNIT a_ttfb_seconds seconds\n\
            a_ttfb_seconds_count 0\n# EOF\n";
        assert_eq!(
            openmetrics_to_prometheus_text(openmetrics),
            "# HELP a_swaps_total Swaps.\n# TYPE a_swaps_total counter\na_swaps_total 1\n\
             # HELP a_ttfb_seconds T.\n# TYPE a_ttfb_seconds histogram\na_ttfb_seconds_count 0\n"
        );
    }

    #[test]
    fn taking_the_same_metrics_twice_registers_them_once() {
        let mut metrics = Metrics::new();
        metrics.gateway().swap_waited("a");
        metrics.gateway().swap_waited("a");
        let text = metrics.encode();
        assert_eq!(
            text.matches("# TYPE gpuswap_gateway_swaps_total counter")
                .count(),
            1
        );
        assert_eq!(
            sample(&text, "gpuswap_gateway_swaps_total{model=\"a\"}"),
            2.0
        );
    }
}
