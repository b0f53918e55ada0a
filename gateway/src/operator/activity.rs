//! Tokens per second per model and the last swaps, shown by the status API.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gpuswap::pb;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::{Gateway, access::Grant, catalog::EventKind};

/// The window over which tokens per second are averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A model's token counter over the window: when sampled, the count then.
type Samples = VecDeque<(Instant, u64)>;

/// Completion tokens per second per model, from the gateway's own counters sampled each
/// second over [`RATE_WINDOW`].
pub struct TokenRates {
    samples: Mutex<HashMap<Arc<str>, Samples>>,
    /// When the counters were 0.
    started: Instant,
}

impl Default for TokenRates {
    fn default() -> Self {
        Self {
            samples: Mutex::default(),
            started: Instant::now(),
        }
    }
}

impl TokenRates {
    pub fn rate(&self, model: &str) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let Some(window) = samples.get(model) else {
            return 0.0;
        };
        match (window.front(), window.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Samples every model's counter each second, for ever.
    pub async fn sample(gateway: Arc<Gateway>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let started = gateway.token_rates.started;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let catalog = gateway.catalog.load();
            let mut samples = gateway
                .token_rates
                .samples
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for name in catalog.models.keys() {
                let count = gateway.gw_metrics.model_counts(name).generated_tokens;
                // Counters start at 0 with the gateway: a model first sampled after its
                // first tokens (the catalog came later) has that as its first sample.
                let window = samples
                    .entry(Arc::clone(name))
                    .or_insert_with(|| VecDeque::from([(started, 0)]));
                window.push_back((now, count));
                while window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
                {
                    window.pop_front();
                }
            }
        }
    }
}

/// The last swaps the gateway saw, from the catalog's events: when each model started
/// loading and how long it took to be ready (or why it failed).
#[derive(Default)]
pub struct Swaps {
    recent: Mutex<VecDeque<Value>>,
}

const SWAPS_KEPT: usize = 20;

/// A start in progress: when it was first seen, and when each of its phases began.
type OpenSwap = (Instant, Vec<(&'static str, Instant)>);

impl Swaps {
    pub(super) fn recent(&self, grant: &Grant) -> Vec<Value> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .filter(|swap| {
                let aliases = swap["aliases"].as_array().into_iter().flatten();
                swap["model"]
                    .as_str()
                    .is_some_and(|name| grant.allows_names(name, aliases.filter_map(Value::as_str)))
            })
            .cloned()
            .collect()
    }

    /// Follows the events for ever and records each start that ended (ready or failed),
    /// with the time spent in each phase of it.
    pub async fn follow(gateway: Arc<Gateway>) {
        let mut events = gateway.catalog.subscribe();
        // Per model: when the first step was seen and when each phase began.
        let mut open: HashMap<Arc<str>, OpenSwap> = HashMap::new();
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let now = Instant::now();
            match event.kind {
                EventKind::Progress { phase, .. } => {
                    let (_, phases) = open
                        .entry(Arc::clone(&event.model))
                        .or_insert((now, vec![]));
                    if phases.last().map(|(p, _)| *p) != Some(phase) {
                        phases.push((phase, now));
                    }
                }
                EventKind::Status(model) => {
                    let ended = match model.state {
                        pb::ModelState::Ready => "ready",
                        pb::ModelState::Failed => "failed",
                        // Another client's start (no progress of ours): timed from here.
                        pb::ModelState::Starting => {
                            open.entry(Arc::clone(&model.name))
                                .or_insert_with(|| (now, vec![("starting", now)]));
                            continue;
                        }
                        _ => continue,
                    };
                    let Some((began, phases)) = open.remove(&model.name) else {
                        continue;
                    };
                    let mut durations = serde_json::Map::new();
                    for (i, (phase, at)) in phases.iter().enumerate() {
                        let until = phases.get(i + 1).map(|(_, t)| *t).unwrap_or(now);
                        let ms = until.duration_since(*at).as_millis() as u64;
                        durations.insert((*phase).to_owned(), json!(ms));
                    }
                    let unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let swap = json!({
                        "model": &*model.name,
                        "aliases": model.aliases,
                        "outcome": ended,
                        "total_ms": now.duration_since(began).as_millis() as u64,
                        "phases_ms": durations,
                        "error": model.last_error,
                        "finished_unix_ms": unix_ms,
                    });
                    let mut recent = gateway
                        .swaps
                        .recent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    recent.push_front(swap);
                    recent.truncate(SWAPS_KEPT);
                }
                EventKind::Removed => {
                    open.remove(&event.model);
                }
                EventKind::Gpus => {}
            }
        }
    }
}
