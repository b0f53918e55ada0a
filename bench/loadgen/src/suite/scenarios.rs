//! The load scenarios and the metrics the report shows for each.

use crate::load::LoadReport;

#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    pub key: &'static str,
    pub title: &'static str,
    pub stream: bool,
    pub max_tokens: u32,
    pub concurrency: usize,
    /// Served by the backend with a realistic per-token delay (25 tokens/s).
    pub paced: bool,
    /// LiteLLM is ×100-×1000 slower: it gets this many requests per worker
    /// (quick, full) instead of a duration.
    pub litellm_per_worker: (u64, u64),
    pub metrics: &'static [Metric],
}

#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub lower_is_better: bool,
    /// gpuswap is held to nginx's figure for this metric.
    pub goal: bool,
    pub read: fn(&LoadReport) -> Option<f64>,
}

impl Metric {
    /// A figure where less is better, held to nginx's.
    const fn lower(name: &'static str, read: fn(&LoadReport) -> Option<f64>) -> Self {
        Metric {
            name,
            lower_is_better: true,
            goal: true,
            read,
        }
    }

    /// A figure where more is better, held to nginx's.
    const fn higher(name: &'static str, read: fn(&LoadReport) -> Option<f64>) -> Self {
        Metric {
            lower_is_better: false,
            ..Metric::lower(name, read)
        }
    }

    /// Shown, but not held to nginx's figure.
    const fn without_goal(self) -> Self {
        Metric {
            goal: false,
            ..self
        }
    }
}

const LATENCY_P50: Metric = Metric::lower("p50 latency (ms)", |r| r.latency_ms.map(|s| s.p50));
const LATENCY_P99: Metric = Metric::lower("p99 latency (ms)", |r| r.latency_ms.map(|s| s.p99));
const RPS: Metric = Metric::higher("req/s", |r| Some(r.rps));
const TTLB_P50: Metric = Metric::lower("time to last byte p50 (ms)", |r| {
    r.latency_ms.map(|s| s.p50)
});
const CHUNKS_PER_S: Metric = Metric::higher("chunks/s", |r| Some(r.chunks_per_s));
const TTFT_P50: Metric =
    Metric::lower("time to first token p50 (ms)", |r| r.ttft_ms.map(|s| s.p50));
/// Time to first token where it is not the scenario's point (no goal).
const TTFT_P50_INFO: Metric = TTFT_P50.without_goal();
const TTFT_P99: Metric =
    Metric::lower("time to first token p99 (ms)", |r| r.ttft_ms.map(|s| s.p99));

/// CPU time of the proxy's processes (not the backend's, not the load
/// generator's) per completed request.
const PROXY_CPU: Metric = Metric::lower("proxy CPU per request (µs)", |r| {
    let proxy = || r.processes.iter().filter(|p| p.name != "loadgen");
    if proxy().next().is_none() || r.requests_ok == 0 {
        return None;
    }
    let cpu: f64 = proxy().map(|p| p.cpu_s).sum();
    Some(cpu * 1e6 / r.requests_ok as f64)
})
.without_goal();

/// Shows whether the load generator (one thread) was itself the limit.
const LOADGEN_CPU: Metric = Metric::lower("load generator CPU (% of a core)", |r| {
    r.processes
        .iter()
        .find(|p| p.name == "loadgen")
        .map(|p| p.cpu_pct)
})
.without_goal();

/// Near 100: every core was busy, so the figures are CPU-bound (other work
/// on the machine included).
const MACHINE_BUSY: Metric =
    Metric::lower("all cores busy (%)", |r| r.machine_busy_pct).without_goal();

/// What the non-streaming scenarios report.
const NON_STREAMING_METRICS: &[Metric] = &[
    LATENCY_P50,
    LATENCY_P99,
    RPS,
    PROXY_CPU,
    LOADGEN_CPU,
    MACHINE_BUSY,
];

pub const SCENARIOS: [Scenario; 4] = [
    Scenario {
        key: "chat-c1",
        title: "non-streaming small chat, concurrency 1",
        stream: false,
        max_tokens: 16,
        concurrency: 1,
        paced: false,
        litellm_per_worker: (20, 60),
        metrics: NON_STREAMING_METRICS,
    },
    Scenario {
        key: "chat-c64",
        title: "non-streaming small chat, concurrency 64",
        stream: false,
        max_tokens: 16,
        concurrency: 64,
        paced: false,
        litellm_per_worker: (1, 2),
        metrics: NON_STREAMING_METRICS,
    },
    Scenario {
        key: "stream256-c16",
        title: "streaming 256 tokens without delay, concurrency 16",
        stream: true,
        max_tokens: 256,
        concurrency: 16,
        paced: false,
        litellm_per_worker: (1, 1),
        metrics: &[
            TTLB_P50,
            CHUNKS_PER_S,
            TTFT_P50_INFO,
            PROXY_CPU,
            LOADGEN_CPU,
            MACHINE_BUSY,
        ],
    },
    Scenario {
        key: "paced-c64",
        title: "streaming 16 tokens at 25 tokens/s, concurrency 64",
        stream: true,
        max_tokens: 16,
        concurrency: 64,
        paced: true,
        litellm_per_worker: (1, 2),
        metrics: &[TTFT_P50, TTFT_P99, PROXY_CPU, LOADGEN_CPU, MACHINE_BUSY],
    },
];
