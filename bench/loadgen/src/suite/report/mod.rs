//! The results table (Markdown): environment, targets with MET / NOT MET, and
//! the figures behind them.

mod environment;
mod pasted;
mod router;

use std::{fmt::Write as _, time::Duration};

use super::{
    Plan,
    gpuswap::SWAP_FLAVORS,
    proxy_load::TARGET_ORDER,
    results::Results,
    scenarios::{Metric, SCENARIOS},
};
use crate::stats::median;
pub use environment::{Environment, load_average};
pub use pasted::keep_pasted_sections;

/// Gateway and supervisor memory goal.
const RSS_GOAL_MIB: f64 = 64.0;
const SWAP_GOAL_MS: f64 = 50.0;
const STOP_GOAL_MS: f64 = 20.0;
/// gpuswap's load figures should be within this fraction of nginx's.
const NGINX_PARITY: f64 = 0.10;
/// A first token slower than this from a backend with no token delay is a stall.
const STALLED_FIRST_TOKEN_MS: f64 = 20.0;

const ROUTER_HEADING: &str = "## A real swapper: llama-server's router mode";
/// The sections [`render`] writes, by heading. Any other `## ` section of the results file
/// was pasted in from a bench the suite does not run (warm weights, the endpoint picker):
/// [`keep_pasted_sections`] carries those over when the file is rewritten.
const OWN_SECTIONS: [&str; 7] = [
    "## Targets",
    "## Proxy overhead",
    "## Swap overhead",
    ROUTER_HEADING,
    "## Stop",
    "## Scale",
    "## Failed to run",
];

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "NOT MET" }
}

fn label(target: &str) -> &'static str {
    match target {
        "direct" => "direct",
        "nginx" => "nginx",
        "gpuswap" => "gpuswap",
        "litellm" => "LiteLLM",
        _ => "?",
    }
}

/// A figure with sensible precision.
fn fig(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The median over rounds of one metric for one scenario and target.
fn load_median(results: &Results, scenario: &str, target: &str, metric: &Metric) -> Option<f64> {
    let values: Vec<f64> = results
        .load
        .iter()
        .filter(|r| r.scenario == scenario && r.target == target)
        .filter_map(|r| (metric.read)(&r.report))
        .collect();
    median(&values)
}

fn load_errors(results: &Results, scenario: &str, target: &str) -> (u64, u64) {
    results
        .load
        .iter()
        .filter(|r| r.scenario == scenario && r.target == target)
        .fold((0, 0), |(e, i), r| {
            (e + r.report.errors, i + r.report.incomplete)
        })
}

pub fn render(plan: &Plan, results: &Results, env: &Environment, took: Duration) -> String {
    let mut md = String::new();
    let targets: Vec<&str> = TARGET_ORDER
        .iter()
        .copied()
        .filter(|t| results.load.iter().any(|r| r.target == *t))
        .collect();
    let _ = writeln!(md, "# gpuswap benchmark results\n");
    let _ = writeln!(
        md,
        "- Date: {}; {} ({:.1} min)\n- Machine: {} cores, {}, Linux {}; load average {} before \
         the run, {} after\n\
         - Versions: gpuswap {}, nginx {}, LiteLLM {}, {}\n\
         - Reproduce: `{}`{}\n\
         - Load: closed loop over keep-alive HTTP/1.1 (`gpuswap-loadgen`, one thread), {} round(s) \
         of {} s per measurement, targets interleaved within each round (LiteLLM, ×100–×1000 \
         slower, gets a fixed number of requests per worker instead); figures are medians \
         over rounds, ratios are against the backend measured directly. Proxy CPU is the \
         user+system time of the proxy's own processes (nginx workers, the gateway, LiteLLM) \
         per completed request. Both nginx and gpuswap keep idle upstream connections for \
         300 s (nginx `keepalive_timeout`, gpuswap `upstream_idle_timeout`).\n\
         - Everything runs on the same machine over loopback: the load generator, the proxy \
         and the mock backend (`gpuswap-mock-backend`, vLLM-like, no load time) compete for \
         the cores, so only ratios carry over to other machines.\n",
        env.date,
        if plan.quick {
            "quick smoke run"
        } else {
            "full run"
        },
        took.as_secs_f64() / 60.0,
        env.cores,
        env.cpu,
        env.kernel,
        env.load.0,
        env.load.1,
        env.gpuswap,
        env.nginx,
        env.litellm,
        env.rustc,
        plan.reproduce,
        if plan.quick {
            " (quick mode: one short round; figures are indicative only)"
        } else {
            ""
        },
        plan.rounds,
        fig(plan.secs),
    );

    let mut goals = String::new();
    let mut missed = Vec::new();
    let mut goal = |what: String, figure: String, target: String, met: Option<bool>| {
        let v = met.map_or("NOT MEASURED", verdict);
        let _ = writeln!(goals, "| {what} | {figure} | {target} | **{v}** |");
        if met == Some(false) {
            missed.push(what);
        }
    };

    // Swap overhead per flavor.
    let mut swap_rows = String::new();
    for flavor in SWAP_FLAVORS {
        let samples: Vec<_> = results
            .swap
            .iter()
            .filter(|s| s.flavor == flavor.flavor)
            .map(|s| &s.sample)
            .collect();
        let overheads: Vec<f64> = samples.iter().map(|s| s.overhead_ms).collect();
        let med = median(&overheads);
        let max = overheads.iter().copied().fold(f64::NAN, f64::max);
        let ready: Vec<f64> = samples.iter().map(|s| s.backend_ready_ms).collect();
        let first: Vec<f64> = samples.iter().map(|s| s.first_text_ms).collect();
        let wrong = samples.iter().filter(|s| !s.served_by_expected).count();
        if let Some(m) = med {
            let _ = writeln!(
                swap_rows,
                "| {} | {} | {} | {} | **{}** | {} |{}",
                flavor.flavor,
                samples.len(),
                median(&ready).map_or("-".into(), fig),
                median(&first).map_or("-".into(), fig),
                fig(m),
                fig(max),
                if wrong > 0 {
                    format!(" {wrong} answer(s) from the wrong model!")
                } else {
                    String::new()
                }
            );
        }
        goal(
            format!("swap overhead, {}-like readiness", flavor.flavor),
            med.map_or("-".into(), |m| {
                format!(
                    "median {} ms, max {} ms ({} swaps)",
                    fig(m),
                    fig(max),
                    samples.len()
                )
            }),
            format!("≤ {SWAP_GOAL_MS} ms"),
            med.map(|m| m <= SWAP_GOAL_MS && wrong == 0),
        );
    }

    // The llama-server router race.
    let router_md = results.router.as_ref().map(|r| {
        let (md, gpuswap_ms, router_ms) = router::section(r);
        if let (Some(g), Some(rt)) = (gpuswap_ms, router_ms) {
            goal(
                "swap between two real llama-server models: gpuswap vs llama-server's router \
                 (request → first token)"
                    .into(),
                format!("median gpuswap {} ms vs router {} ms", fig(g), fig(rt)),
                "≤ router".into(),
                Some(g <= rt),
            );
        }
        md
    });

    // Stops.
    let mut stop_rows = String::new();
    for run in &results.stop {
        let own: Vec<f64> = run.own_exit.iter().map(|s| s.leader_exit_ms).collect();
        let rpc: Vec<f64> = run.deactivate.iter().map(|s| s.rpc_ms).collect();
        let gone: Vec<f64> = run
            .deactivate
            .iter()
            .filter_map(|s| s.tree_gone_ms)
            .collect();
        let left: usize = run.deactivate.iter().map(|s| s.left_alive).sum();
        let procs = run.deactivate.first().map_or(0, |s| s.processes);
        let (own_m, rpc_m) = (median(&own), median(&rpc));
        if let (Some(o), Some(r)) = (own_m, rpc_m) {
            let _ = writeln!(
                stop_rows,
                "| {} | {} | {} | {} | **{}** | {} | {} |",
                run.title,
                procs,
                run.stop_timeout_ms,
                fig(o),
                fig(r),
                median(&gone).map_or("-".into(), fig),
                left
            );
        }
        goal(
            format!("stop: {}", run.title),
            match (own_m, rpc_m) {
                (Some(o), Some(r)) => format!(
                    "Deactivate {} ms vs the backend's own exit {} ms ({:+.1} ms){}",
                    fig(r),
                    fig(o),
                    r - o,
                    if left > 0 {
                        format!(", {left} process(es) alive at return")
                    } else {
                        String::new()
                    }
                ),
                _ => "-".into(),
            },
            format!("≤ own exit + {STOP_GOAL_MS} ms, tree gone at return"),
            own_m
                .zip(rpc_m)
                .map(|(o, r)| r <= o + STOP_GOAL_MS && left == 0),
        );
    }

    // Scale.
    let gateway_usage = results
        .scale
        .as_ref()
        .and_then(|r| r.processes.iter().find(|p| p.name == "gateway"));
    goal(
        format!(
            "gateway memory, {} concurrent slow streams",
            plan.scale_streams
        ),
        match (&results.scale, gateway_usage) {
            (Some(r), Some(u)) => format!(
                "peak RSS {} MiB (idle {} MiB), CPU {}% of a core, {} streams done, {} errors",
                fig(u.rss_peak_mib),
                fig(u.rss_start_mib),
                fig(u.cpu_pct),
                r.requests_ok,
                r.errors
            ),
            _ => "-".into(),
        },
        format!("≤ {RSS_GOAL_MIB} MiB"),
        gateway_usage.map(|u| u.rss_peak_mib <= RSS_GOAL_MIB),
    );
    let supervisor_usage = results.flood.as_ref().and_then(|f| f.supervisor.as_ref());
    goal(
        format!(
            "supervisor memory while a backend floods {} MB of logs",
            plan.flood_bytes / 1_000_000
        ),
        match (&results.flood, supervisor_usage) {
            (Some(f), Some(u)) => format!(
                "peak RSS {} MiB (before {} MiB, after {} MiB); {} MB read in {} s, CPU {}%",
                fig(u.rss_peak_mib),
                fig(u.rss_start_mib),
                fig(u.rss_end_mib),
                fig(f.bytes_written as f64 / 1e6),
                fig(f.secs),
                fig(u.cpu_pct)
            ),
            _ => "-".into(),
        },
        format!("bounded: ≤ {RSS_GOAL_MIB} MiB"),
        supervisor_usage.map(|u| u.rss_peak_mib <= RSS_GOAL_MIB),
    );

    // Load tables, and gpuswap against nginx.
    let mut load_md = String::new();
    for scenario in &SCENARIOS {
        let _ = writeln!(load_md, "\n### {} (`{}`)\n", scenario.title, scenario.key);
        let _ = write!(load_md, "| metric |");
        for t in &targets {
            let _ = write!(load_md, " {} |", label(t));
        }
        let _ = writeln!(load_md, "\n|---|{}", "---|".repeat(targets.len()));
        for metric in scenario.metrics {
            let direct = load_median(results, scenario.key, "direct", metric);
            let _ = write!(load_md, "| {} |", metric.name);
            for t in &targets {
                let value = load_median(results, scenario.key, t, metric);
                let cell = match (value, direct) {
                    (Some(v), Some(d)) if *t != "direct" && d > 0.0 && metric.goal => {
                        format!("{} (×{:.2})", fig(v), v / d)
                    }
                    (Some(v), _) => fig(v),
                    (None, _) => "-".into(),
                };
                let _ = write!(load_md, " {cell} |");
            }
            let _ = writeln!(load_md);
            let ours = load_median(results, scenario.key, "gpuswap", metric);
            let nginx = load_median(results, scenario.key, "nginx", metric);
            if let (Some(g), Some(n), true) = (ours, nginx, metric.goal) {
                let met = if metric.lower_is_better {
                    g <= n * (1.0 + NGINX_PARITY)
                } else {
                    g >= n * (1.0 - NGINX_PARITY)
                };
                goal(
                    format!("{}: {}", scenario.key, metric.name),
                    format!("gpuswap {} vs nginx {}", fig(g), fig(n)),
                    format!(
                        "{} nginx {}10%",
                        if metric.lower_is_better { "≤" } else { "≥" },
                        if metric.lower_is_better { "+" } else { "−" }
                    ),
                    Some(met),
                );
            }
        }
        let mut notes = Vec::new();
        for t in &targets {
            let (errors, incomplete) = load_errors(results, scenario.key, t);
            if errors + incomplete > 0 {
                notes.push(format!(
                    "{}: {errors} failed, {incomplete} cut off at the end",
                    label(t)
                ));
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(
                load_md,
                "\nRequests that did not complete: {}.",
                notes.join("; ")
            );
        }
    }

    let _ = writeln!(
        md,
        "## Targets\n\n| what | figure | goal | verdict |\n|---|---|---|---|\n{goals}\n\
         The load goals (gpuswap on par with nginx, a plain streaming reverse proxy) are the \
         bench's own yardstick; the swap, stop and memory goals are gpuswap's.\n"
    );
    if !missed.is_empty() {
        let _ = writeln!(
            md,
            "**Gaps in this run:** {}. What limits them, with profiles and figures: \
             [docs/performance.md](../docs/performance.md).\n",
            missed.join("; ")
        );
    }
    let _ = writeln!(md, "## Proxy overhead\n{load_md}");
    // A backend without TCP_NODELAY holds each stream's second write until the
    // client's delayed ACK (~40 ms): then every streaming figure measures that.
    let direct_ttft: Vec<f64> = results
        .load
        .iter()
        .filter(|r| r.scenario == "stream256-c16" && r.target == "direct")
        .filter_map(|r| r.report.ttft_ms.map(|s| s.p50))
        .collect();
    if let Some(ttft) = median(&direct_ttft).filter(|t| *t > STALLED_FIRST_TOKEN_MS) {
        let _ = writeln!(
            md,
            "**Warning:** the backend alone takes {} ms to its first token with no token delay: \
             it stalls (probably Nagle's algorithm against delayed ACKs: no TCP_NODELAY), so the \
             streaming figures above measure that stall more than the proxies.\n",
            fig(ttft)
        );
    }
    let _ = writeln!(
        md,
        "## Swap overhead\n\n\
         Two conflicting mock models per readiness flavor (load time {} ms); each request names the \
         model that is not loaded, so the gateway drains and stops the other one and starts it. \
         *Backend ready* is when the backend's own readiness endpoint (`/health`, or `/v1/model` \
         for TabbyAPI) first answered 200, as seen by an independent poller that asks it over a \
         fresh connection every millisecond; *first token* is when the first generated text \
         arrived through the gateway. Overhead = first token − backend ready: the gateway's and \
         supervisor's cost beyond the backend's own load time (the poller can be up to ~1–2 ms \
         late, which slightly flatters the figure). Milliseconds from sending the request.\n\n\
         | flavor | swaps | backend ready | first token | overhead (median) | overhead (max) |\n\
         |---|---|---|---|---|---|\n{swap_rows}\n\
         For comparison, llama-swap (documented behaviour; it cannot be built here) polls \
         readiness once a second after a 250 ms wait: its overhead is 0–1000 ms, ~500 ms on \
         average.\n",
        plan.swap_load_time.as_millis()
    );
    if let Some(router_md) = router_md {
        let _ = writeln!(md, "{router_md}");
    }
    let _ = writeln!(
        md,
        "## Stop\n\n\
         *Own exit*: the same mock started alone, SIGTERM to its process group, until the leader \
         is reaped (for the one that ignores SIGTERM: SIGKILL at the stop timeout, as a \
         supervisor would). *Deactivate*: the supervisor's Deactivate RPC on the loaded model, \
         until it returns; *tree gone*: until no process of the backend's tree was left (polled \
         every 0.5 ms). Medians of {} stop(s), milliseconds.\n\n\
         | backend | processes | stop_timeout | own exit | Deactivate | tree gone | alive at return |\n\
         |---|---|---|---|---|---|---|\n{stop_rows}",
        plan.stop_samples
    );
    if let Some(scale) = &results.scale {
        let _ = writeln!(
            md,
            "## Scale\n\n{} closed-loop streams ({} tokens at {} tokens/s each) through the gateway \
             for {} s; gateway memory is VmRSS sampled every 50 ms, CPU is user+system time \
             over the window. Time to first token p50 {} ms, p99 {} ms; {} chunks/s.\n",
            plan.scale_streams,
            plan.scale_max_tokens,
            plan.scale_tokens_per_second,
            fig(plan.scale_secs),
            scale.ttft_ms.map_or("-".into(), |s| fig(s.p50)),
            scale.ttft_ms.map_or("-".into(), |s| fig(s.p99)),
            fig(scale.chunks_per_s),
        );
    }
    if !results.failures.is_empty() {
        let _ = writeln!(md, "## Failed to run\n");
        for f in &results.failures {
            let _ = writeln!(md, "- {}", f.replace('\n', " "));
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "Raw figures of every measurement: `bench/out/results.json` and `bench/out/raw/` \
         (not committed); process logs in `bench/out/logs/`."
    );
    md
}
