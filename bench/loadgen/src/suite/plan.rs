//! What the suite runs: its command line, and the plan made from it (quick-mode defaults
//! applied).

use std::{path::PathBuf, time::Duration};

use serde::Serialize;

#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Smoke mode (~1 minute): one short round, fewer samples.
    #[arg(long)]
    pub quick: bool,
    /// Rounds of the load scenarios (the report shows medians) [default: 3, quick 1].
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Seconds per load measurement [default: 10, quick 2].
    #[arg(long)]
    pub secs: Option<f64>,
    /// Load time of the swap models [default: 2s, quick 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub swap_load_time: Option<Duration>,
    /// Swaps measured per flavor [default: 4, quick 2].
    #[arg(long)]
    pub swap_samples: Option<usize>,
    /// Stops measured per case [default: 3, quick 1].
    #[arg(long)]
    pub stop_samples: Option<usize>,
    /// Concurrent slow streams for the gateway's memory check.
    #[arg(long, default_value_t = 1000)]
    pub scale_streams: usize,
    /// Seconds of the scale measurement [default: 10, quick 5].
    #[arg(long)]
    pub scale_secs: Option<f64>,
    /// Bytes of log output the flooding backend writes.
    #[arg(long, default_value_t = 100_000_000)]
    pub flood_bytes: u64,
    /// Where the gpuswap binaries are [default: next to this one].
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    #[arg(long, default_value = "nginx")]
    pub nginx: String,
    /// The `litellm` program (from its venv).
    #[arg(long, default_value = "bench/.venv/bin/litellm")]
    pub litellm: String,
    /// llama.cpp's `llama-server`: with `--router-models`, its router mode is raced against
    /// gpuswap (bench/run.sh builds it with e2e/real/setup.sh).
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// Two GGUF models for the router race (made by bench/run.sh).
    #[arg(long, value_delimiter = ',')]
    pub router_models: Vec<PathBuf>,
    /// Swaps measured per proxy in the router race [default: 6, quick 2].
    #[arg(long)]
    pub router_swaps: Option<usize>,
    /// Leave out targets: any of nginx, litellm, gpuswap, router.
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Only the proxy-overhead scenarios (no swap, stop, scale or flood
    /// sections): for quick A/B runs; the table goes to OUT/RESULTS.md.
    #[arg(long)]
    pub load_only: bool,
    /// Only the llama-server router race (with gpuswap; no other target or section): the
    /// table goes to OUT/RESULTS.md.
    #[arg(long)]
    pub router_only: bool,
    /// Raw JSON, logs and a copy of the table go here.
    #[arg(long, default_value = "bench/out")]
    pub out: PathBuf,
    /// The results table [default: bench/RESULTS.md; quick: OUT/RESULTS.md].
    #[arg(long)]
    pub results: Option<PathBuf>,
    /// The command line to print as "how to reproduce".
    #[arg(long, default_value = "bench/run.sh")]
    pub reproduce: String,
}

/// The settings after applying the quick-mode defaults.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub rounds: usize,
    pub secs: f64,
    #[serde(with = "millis")]
    pub swap_load_time: Duration,
    pub swap_samples: usize,
    pub stop_samples: usize,
    pub scale_streams: usize,
    pub scale_secs: f64,
    pub scale_tokens_per_second: f64,
    pub scale_max_tokens: u32,
    pub flood_bytes: u64,
    pub router_swaps: usize,
    /// Small chats per target for the router race's proxy overhead.
    pub router_requests: u64,
    pub reproduce: String,
}

mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}

impl Plan {
    pub fn new(args: &SuiteArgs) -> Self {
        let q = args.quick;
        let pick = |given: Option<f64>, full: f64, quick: f64| {
            given.unwrap_or(if q { quick } else { full })
        };
        Self {
            quick: q,
            rounds: args.rounds.unwrap_or(if q { 1 } else { 3 }).max(1),
            secs: pick(args.secs, 10.0, 2.0),
            swap_load_time: args.swap_load_time.unwrap_or(Duration::from_secs(if q {
                1
            } else {
                2
            })),
            swap_samples: args.swap_samples.unwrap_or(if q { 2 } else { 4 }),
            stop_samples: args.stop_samples.unwrap_or(if q { 1 } else { 3 }).max(1),
            scale_streams: args.scale_streams,
            scale_secs: pick(args.scale_secs, 10.0, 5.0),
            scale_tokens_per_second: 5.0,
            scale_max_tokens: 25,
            flood_bytes: args.flood_bytes,
            router_swaps: args.router_swaps.unwrap_or(if q { 2 } else { 6 }).max(1),
            router_requests: if q { 5 } else { 20 },
            reproduce: args.reproduce.clone(),
        }
    }
}
