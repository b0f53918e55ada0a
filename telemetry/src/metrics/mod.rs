//! Prometheus metrics of the two daemons over `prometheus-client`.
//!
//! Model names are interned: each model's instruments are looked up once and
//! kept behind an `Arc<str>` key, so recording on the hot path is a map read
//! and a few atomic adds, without allocation.
//!
//! Label values must come from the configuration (model ids, fixed reasons),
//! never from raw client input, or a client could grow the label sets without bound.
//!
//! [`Metrics`] (here) is the one registry of a daemon and its text exposition; the
//! instruments are in `gateway.rs` and `supervisor.rs`.

mod gateway;
mod supervisor;

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, histogram::Histogram},
    registry::{Metric, Registry, Unit},
};

pub use gateway::{
    GatewayMetrics, ModelCounts, OpenConnection, Refusal, RequestMetrics, STATUS_CLIENT_CLOSED,
};
pub use supervisor::{ModelState, SupervisorMetrics, SwapPhase};

/// The `Content-Type` of [`Metrics::encode`]'s output: the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every metric name starts with this (`gpuswap_gateway_...`, `gpuswap_supervisor_...`).
const PREFIX: &str = "gpuswap";

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: Arc<str>,
}

/// One instrument as `/metrics` declares it: its name (under the daemon's prefix), its help
/// text, its unit, and the family (or metric) it records into.
type Instrument<'a> = (
    &'static str,
    &'static str,
    Option<Unit>,
    &'a dyn Registrable,
);

/// A metric the registry keeps a handle of; the daemon records into its own clone.
trait Registrable {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>);
}

impl<M: Metric + Clone> Registrable for M {
    fn register_in(&self, registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) {
        match unit {
            Some(unit) => registry.register_with_unit(name, help, unit, self.clone()),
            None => registry.register(name, help, self.clone()),
        }
    }
}

/// Registers a daemon's instruments, in the order `/metrics` lists them.
fn register_all(registry: &mut Registry, instruments: &[Instrument<'_>]) {
    for (name, help, unit, metric) in instruments {
        metric.register_in(registry, name, help, unit.clone());
    }
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

    /// The instruments of `model`, made by `create` from the model's labels the first time.
    fn get_or_create(&self, model: &str, create: impl FnOnce(ModelLabels) -> T) -> Arc<T> {
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
            .or_insert_with_key(|key| Arc::new(create(ModelLabels { model: key.clone() })))
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(text: &str, name_and_labels: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no sample {name_and_labels} in\n{text}"))
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Asserts each sample's value in the exposition `text`.
    pub(crate) fn assert_samples(text: &str, expected: &[(&str, f64)]) {
        for (name_and_labels, value) in expected {
            assert_eq!(sample(text, name_and_labels), *value, "{name_and_labels}");
        }
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
