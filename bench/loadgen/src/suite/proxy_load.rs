//! The proxy-overhead rounds: every target under each load scenario, interleaved.

use std::{path::Path, time::Duration};

use anyhow::{Result, anyhow, bail};

use super::{
    Plan,
    results::{LoadRun, Results},
    scenarios::{SCENARIOS, Scenario},
};
use crate::load::{self, LoadSpec};

/// One system under load.
#[derive(Debug, Clone)]
pub struct Target {
    pub key: &'static str,
    pub fast_url: String,
    pub paced_url: String,
    pub bearer: Option<String>,
    /// The proxy's own processes, whose CPU time is measured.
    pub proxy_pids: Vec<u32>,
}

pub const TARGET_ORDER: [&str; 4] = ["direct", "nginx", "gpuswap", "litellm"];

fn spec(plan: &Plan, target: &Target, scenario: &Scenario) -> LoadSpec {
    // LiteLLM gets a fixed number of requests instead of a duration: at its
    // pace, a duration would cut off most streams.
    let (duration, requests, grace) = if target.key == "litellm" {
        let (quick, full) = scenario.litellm_per_worker;
        let per_worker = if plan.quick { quick } else { full };
        let requests = per_worker * scenario.concurrency as u64;
        (None, Some(requests), Duration::from_secs(120))
    } else {
        (
            Some(Duration::from_secs_f64(plan.secs)),
            None,
            Duration::from_secs(10),
        )
    };
    LoadSpec {
        url: if scenario.paced {
            target.paced_url.clone()
        } else {
            target.fast_url.clone()
        },
        model: if scenario.paced {
            "bench-paced"
        } else {
            "bench"
        }
        .into(),
        stream: scenario.stream,
        max_tokens: scenario.max_tokens,
        concurrency: scenario.concurrency,
        duration,
        requests,
        grace,
        bearer: target.bearer.clone(),
        watch: target
            .proxy_pids
            .iter()
            .map(|&pid| (format!("{}-{pid}", target.key), pid))
            .collect(),
    }
}

/// One streaming and one plain request per model; both must succeed.
pub async fn smoke(plan: &Plan, target: &Target) -> Result<()> {
    for (paced, stream) in [(false, false), (false, true), (true, true)] {
        let scenario = Scenario {
            stream,
            paced,
            max_tokens: 4,
            concurrency: 1,
            ..SCENARIOS[0]
        };
        let mut spec = spec(plan, target, &scenario);
        spec.duration = None;
        spec.requests = Some(1);
        spec.grace = Duration::from_secs(60);
        let report = tokio::time::timeout(Duration::from_secs(60), load::run(spec))
            .await
            .map_err(|_| anyhow!("no answer within 60 s"))??;
        if report.requests_ok != 1 {
            bail!(
                "{} request (paced: {paced}) failed: {:?}",
                if stream { "a streaming" } else { "a plain" },
                report.error_samples
            );
        }
    }
    Ok(())
}

pub async fn load_rounds(plan: &Plan, targets: &[Target], raw: &Path, results: &mut Results) {
    for round in 0..plan.rounds {
        for scenario in &SCENARIOS {
            // Interleaved, and rotated each round so no target always runs first.
            let mut order: Vec<&Target> = targets.iter().collect();
            let shift = round % order.len().max(1);
            order.rotate_left(shift);
            for target in order {
                eprintln!(
                    "bench: round {}/{} {} via {}",
                    round + 1,
                    plan.rounds,
                    scenario.key,
                    target.key
                );
                let spec = spec(plan, target, scenario);
                match load::run(spec).await {
                    Ok(report) => {
                        let file =
                            raw.join(format!("r{round}-{}-{}.json", scenario.key, target.key));
                        if let Ok(json) = serde_json::to_vec_pretty(&report) {
                            let _ = std::fs::write(file, json);
                        }
                        if report.errors > 0 {
                            eprintln!(
                                "bench:   {} errors, e.g. {:?}",
                                report.errors, report.error_samples
                            );
                        }
                        results.load.push(LoadRun {
                            round,
                            scenario: scenario.key,
                            target: target.key,
                            report,
                        });
                    }
                    Err(e) => results.failed(&format!("{} via {}", scenario.key, target.key), e),
                }
                // Let the last connections close and background work settle.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}
