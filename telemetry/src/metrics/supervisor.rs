//! The supervisor's instruments (`gpuswap_supervisor_*`): swaps and their phases, failures,
//! restarts, model states, lost log lines.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use super::{HistogramFamily, ModelCache, ModelLabels, register_all};

const PHASE_BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

fn phase_histogram() -> Histogram {
    Histogram::new(PHASE_BUCKETS)
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
    Sleeping,
}

impl ModelState {
    pub const ALL: [ModelState; 7] = [
        ModelState::Stopped,
        ModelState::Starting,
        ModelState::Ready,
        ModelState::Draining,
        ModelState::Stopping,
        ModelState::Failed,
        ModelState::Sleeping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Stopped => "stopped",
            ModelState::Starting => "starting",
            ModelState::Ready => "ready",
            ModelState::Draining => "draining",
            ModelState::Stopping => "stopping",
            ModelState::Failed => "failed",
            ModelState::Sleeping => "sleeping",
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
    pub(super) fn register(registry: &mut Registry) -> Self {
        let families = SupervisorFamilies {
            swaps: Family::default(),
            swap_phase_duration: Family::new_with_constructor(phase_histogram),
            backend_restarts: Family::default(),
            backend_failures: Family::default(),
            model_state: Family::default(),
            log_lines_dropped: Family::default(),
            models: ModelCache::new(),
        };
        register_all(
            registry,
            &[
                (
                    "swaps",
                    "Swaps started, by the model swapped in",
                    None,
                    &families.swaps,
                ),
                (
                    "swap_phase_duration",
                    "Duration of each phase of a swap (drain, stop, start, ready)",
                    Some(Unit::Seconds),
                    &families.swap_phase_duration,
                ),
                (
                    "backend_restarts",
                    "Backends started again after they exited or failed",
                    None,
                    &families.backend_restarts,
                ),
                (
                    "backend_failures",
                    "Backend failures, by model and reason",
                    None,
                    &families.backend_failures,
                ),
                (
                    "model_state",
                    "1 for each model's current state, 0 for the others",
                    None,
                    &families.model_state,
                ),
                (
                    "log_lines_dropped",
                    "Backend log lines dropped (too long, or a follower too slow)",
                    None,
                    &families.log_lines_dropped,
                ),
            ],
        );
        Self {
            inner: Arc::new(families),
        }
    }

    fn model(&self, model: &str) -> Arc<SupervisorModel> {
        let f = &*self.inner;
        f.models.get_or_create(model, |labels| {
            let states = ModelState::ALL.map(|state| {
                let gauge = f.model_state.get_or_create_owned(&StateLabels {
                    model: labels.model.clone(),
                    state: state.as_str(),
                });
                (state, gauge)
            });
            SupervisorModel {
                swaps: f.swaps.get_or_create_owned(&labels),
                backend_restarts: f.backend_restarts.get_or_create_owned(&labels),
                log_lines_dropped: f.log_lines_dropped.get_or_create_owned(&labels),
                states,
                model: labels.model,
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
    use super::{
        super::{
            Metrics,
            tests::{assert_samples, sample},
        },
        *,
    };

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
        assert_samples(
            &text,
            &[
                ("gpuswap_supervisor_swaps_total{model=\"a\"}", 1.0),
                (
                    "gpuswap_supervisor_swap_phase_duration_seconds_bucket{le=\"0.05\",phase=\"drain\"}",
                    1.0,
                ),
                (
                    "gpuswap_supervisor_backend_failures_total{model=\"a\",reason=\"startup_timeout\"}",
                    1.0,
                ),
                (
                    "gpuswap_supervisor_backend_restarts_total{model=\"a\"}",
                    1.0,
                ),
                (
                    "gpuswap_supervisor_log_lines_dropped_total{model=\"a\"}",
                    7.0,
                ),
            ],
        );
    }
}
