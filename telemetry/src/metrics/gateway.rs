//! The gateway's instruments (`gpuswap_gateway_*`): requests, queue, tokens, refusals,
//! connections.

use std::{sync::Arc, time::Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{HistogramFamily, ModelCache, ModelLabels, register_all};

/// Seconds from a request's arrival to its first byte, or of a whole request:
/// a swap can take minutes, a warm answer milliseconds.
const LATENCY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
const TOKENS_PER_SECOND_BUCKETS: [f64; 15] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0, 1000.0, 2000.0,
];

/// Recorded for a request dropped before [`RequestMetrics::finish`]: the
/// client went away (nginx's "client closed request").
pub const STATUS_CLIENT_CLOSED: u16 = 499;

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}
fn tokens_per_second_histogram() -> Histogram {
    Histogram::new(TOKENS_PER_SECOND_BUCKETS)
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
    pub(super) fn register(registry: &mut Registry) -> Self {
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
        register_all(
            registry,
            &[
                (
                    "requests",
                    "Requests answered, by model and HTTP status (499: the client went away)",
                    None,
                    &families.requests,
                ),
                (
                    "queue_depth",
                    "Requests waiting for their model to be ready",
                    None,
                    &families.queue_depth,
                ),
                (
                    "in_flight",
                    "Requests forwarded to a backend and not yet finished",
                    None,
                    &families.in_flight,
                ),
                (
                    "time_to_first_byte",
                    "From a request's arrival (queueing and swaps included) to its first response byte",
                    Some(Unit::Seconds),
                    &families.time_to_first_byte,
                ),
                (
                    "request_duration",
                    "From a request's arrival to its last response byte",
                    Some(Unit::Seconds),
                    &families.request_duration,
                ),
                (
                    "generated_tokens",
                    "Completion tokens generated (from usage, else counted stream chunks)",
                    None,
                    &families.generated_tokens,
                ),
                (
                    "tokens_per_second",
                    "Per request: completion tokens over the time since it was forwarded",
                    None,
                    &families.tokens_per_second,
                ),
                (
                    "swaps",
                    "Requests that had to wait for their model to be started",
                    None,
                    &families.swaps,
                ),
                (
                    "refused",
                    "Requests refused before reaching a backend, by reason (queue_full, queue_memory, \
                     body_timeout, origin, host)",
                    None,
                    &families.refused,
                ),
                (
                    "connections_open",
                    "Client connections being served",
                    None,
                    &families.connections_open,
                ),
                (
                    "connection_limit_reached",
                    "Times max_connections client connections were open, so new ones waited in the \
                     listen backlog until one closed",
                    None,
                    &families.connection_limit_reached,
                ),
            ],
        );
        Self {
            inner: Arc::new(families),
        }
    }

    fn model(&self, model: &str) -> Arc<GatewayModel> {
        let f = &*self.inner;
        f.models.get_or_create(model, |labels| GatewayModel {
            queue_depth: f.queue_depth.get_or_create_owned(&labels),
            in_flight: f.in_flight.get_or_create_owned(&labels),
            time_to_first_byte: f.time_to_first_byte.get_or_create_owned(&labels),
            request_duration: f.request_duration.get_or_create_owned(&labels),
            generated_tokens: f.generated_tokens.get_or_create_owned(&labels),
            tokens_per_second: f.tokens_per_second.get_or_create_owned(&labels),
            model: labels.model,
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

#[cfg(test)]
mod tests {
    use super::super::{
        Metrics,
        tests::{assert_samples, sample},
    };

    #[test]
    fn a_request_moves_from_queue_to_in_flight_and_is_counted() {
        let mut metrics = Metrics::new();
        let gateway = metrics.gateway();
        let mut request = gateway.request("llama");
        let text = metrics.encode();
        assert_samples(
            &text,
            &[
                ("gpuswap_gateway_queue_depth{model=\"llama\"}", 1.0),
                ("gpuswap_gateway_in_flight{model=\"llama\"}", 0.0),
            ],
        );

        request.forwarding();
        request.first_byte();
        request.add_tokens(3);
        request.usage_tokens(10);
        let text = metrics.encode();
        assert_samples(
            &text,
            &[
                ("gpuswap_gateway_queue_depth{model=\"llama\"}", 0.0),
                ("gpuswap_gateway_in_flight{model=\"llama\"}", 1.0),
                (
                    "gpuswap_gateway_generated_tokens_total{model=\"llama\"}",
                    10.0,
                ),
            ],
        );

        request.finish(200);
        gateway.request("llama").finish(503);
        drop(gateway.request("llama"));
        let text = metrics.encode();
        assert_samples(
            &text,
            &[
                ("gpuswap_gateway_in_flight{model=\"llama\"}", 0.0),
                ("gpuswap_gateway_queue_depth{model=\"llama\"}", 0.0),
            ],
        );
        for status in ["200", "503", "499"] {
            let name =
                format!("gpuswap_gateway_requests_total{{model=\"llama\",status=\"{status}\"}}");
            assert_eq!(sample(&text, &name), 1.0, "{name}");
        }
        assert_samples(
            &text,
            &[
                (
                    "gpuswap_gateway_time_to_first_byte_seconds_count{model=\"llama\"}",
                    1.0,
                ),
                (
                    "gpuswap_gateway_request_duration_seconds_count{model=\"llama\"}",
                    3.0,
                ),
                (
                    "gpuswap_gateway_tokens_per_second_count{model=\"llama\"}",
                    1.0,
                ),
            ],
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
}
