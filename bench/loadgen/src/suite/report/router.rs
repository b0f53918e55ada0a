//! The section of the llama-server router race.

use std::fmt::Write as _;

use super::{super::router::RouterReport, ROUTER_HEADING, fig};
use crate::stats::median;

/// The router race's section, and the median request-to-first-token of gpuswap and the router.
pub fn section(r: &RouterReport) -> (String, Option<f64>, Option<f64>) {
    let mib: Vec<String> = r
        .model_bytes
        .iter()
        .map(|b| fig(*b as f64 / (1024.0 * 1024.0)))
        .collect();
    let gpuswap_first: Vec<f64> = r.gpuswap_swaps.iter().map(|s| s.first_text_ms).collect();
    let gpuswap_overhead: Vec<f64> = r.gpuswap_swaps.iter().map(|s| s.overhead_ms).collect();
    let router_first: Vec<f64> = r.router_swaps.iter().map(|s| s.first_text_ms).collect();
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let (gpuswap_ms, router_ms) = (median(&gpuswap_first), median(&router_first));
    let wrong = r
        .gpuswap_swaps
        .iter()
        .filter(|s| !s.served_by_expected)
        .count();
    let mut md = format!(
        "{ROUTER_HEADING}\n\n\
         llama.cpp's `llama-server` ({}) in router mode (`--models-dir DIR --models-max 1`: a \
         child llama-server per loaded model, swapped on the request's `model`) against gpuswap \
         with the same two random-weight GGUF models ({} MiB, made at bench time by \
         e2e/real/make_models.py) as two `llama-server` models on one GPU. Requests alternate \
         between the two models, streamed; each is a swap (the first, a start from nothing). \
         *Request → first token* includes the real load of the weights. gpuswap's overhead is \
         first token − the backend's own `/health` 200 (as in the swap section); the router's \
         children listen on ports of its own, so its share cannot be split out. Milliseconds.\n\n\
         | proxy | swaps | request → first token (median) | (max) | overhead beyond backend ready (median) |\n\
         |---|---|---|---|---|\n\
         | gpuswap | {} | **{}** | {} | {} |\n\
         | llama-server router | {} | **{}** | {} | - |\n",
        if r.llama_server_version.is_empty() {
            "version unknown"
        } else {
            &r.llama_server_version
        },
        mib.join(" and "),
        r.gpuswap_swaps.len(),
        gpuswap_ms.map_or("-".into(), fig),
        fig(max(&gpuswap_first)),
        median(&gpuswap_overhead).map_or("-".into(), fig),
        r.router_swaps.len(),
        router_ms.map_or("-".into(), fig),
        fig(max(&router_first)),
    );
    if wrong > 0 {
        let _ = writeln!(md, "\n{wrong} gpuswap answer(s) from the wrong model!");
    }
    let direct = r
        .latency
        .iter()
        .find(|l| l.target == "direct")
        .and_then(|l| l.report.latency_ms);
    let _ = writeln!(
        md,
        "\nProxy overhead with the model loaded: 2-token chats, one at a time, to the same model \
         through each, and to a llama-server of the same file alone (latency in ms).\n\n\
         | target | requests | p50 latency | p99 latency |\n|---|---|---|---|"
    );
    for l in &r.latency {
        let Some(lat) = l.report.latency_ms else {
            continue;
        };
        let ratio = |v: f64, d: Option<f64>| match d {
            Some(d) if l.target != "direct" && d > 0.0 => format!(" (×{:.2})", v / d),
            _ => String::new(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {}{} |",
            match l.target {
                "router" => "llama-server router",
                "direct" => "llama-server alone",
                other => other,
            },
            l.report.requests_ok,
            fig(lat.p50),
            ratio(lat.p50, direct.map(|d| d.p50)),
            fig(lat.p99),
            ratio(lat.p99, direct.map(|d| d.p99)),
        );
    }
    (md, gpuswap_ms, router_ms)
}
