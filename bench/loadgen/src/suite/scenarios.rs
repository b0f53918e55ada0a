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
    pub metrics: &'static [Metric],
}

#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub lower_is_better: bool,
    pub read: fn(&LoadReport) -> Option<f64>,
}

const LATENCY_P50: Metric = Metric {
    name: "p50 latency (ms)",
    lower_is_better: true,
    read: |r| r.latency_ms.map(|s| s.p50),
};
const LATENCY_P99: Metric = Metric {
    name: "p99 latency (ms)",
    lower_is_better: true,
    read: |r| r.latency_ms.map(|s| s.p99),
};
const RPS: Metric = Metric {
    name: "req/s",
    lower_is_better: false,
    read: |r| Some(r.rps),
};
const TTLB_P50: Metric = Metric {
    name: "time to last byte p50 (ms)",
    lower_is_better: true,
    read: |r| r.latency_ms.map(|s| s.p50),
};
const CHUNKS_PER_S: Metric = Metric {
    name: "chunks/s",
    lower_is_better: false,
    read: |r| Some(r.chunks_per_s),
};
const TTFT_P50: Metric = Metric {
    name: "time to first token p50 (ms)",
    lower_is_better: true,
    read: |r| r.ttft_ms.map(|s| s.p50),
};
const TTFT_P99: Metric = Metric {
    name: "time to first token p99 (ms)",
    lower_is_better: true,
    read: |r| r.ttft_ms.map(|s| s.p99),
};

pub const SCENARIOS: [Scenario; 4] = [
    Scenario {
        key: "chat-c1",
        title: "non-streaming small chat, concurrency 1",
        stream: false,
        max_tokens: 16,
        concurrency: 1,
        paced: false,
        metrics: &[LATENCY_P50, LATENCY_P99, RPS],
    },
    Scenario {
        key: "chat-c64",
        title: "non-streaming small chat, concurrency 64",
        stream: false,
        max_tokens: 16,
        concurrency: 64,
        paced: false,
        metrics: &[LATENCY_P50, LATENCY_P99, RPS],
    },
    Scenario {
        key: "stream256-c16",
        title: "streaming 256 tokens without delay, concurrency 16",
        stream: true,
        max_tokens: 256,
        concurrency: 16,
        paced: false,
        metrics: &[TTLB_P50, CHUNKS_PER_S],
    },
    Scenario {
        key: "paced-c64",
        title: "streaming 16 tokens at 25 tokens/s, concurrency 64",
        stream: true,
        max_tokens: 16,
        concurrency: 64,
        paced: true,
        metrics: &[TTFT_P50, TTFT_P99],
    },
];
