//! gpuswap's own measurements, after the load rounds: swaps, stops, the gateway under many
//! slow streams, and the supervisor under a log flood.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};

use super::{
    Plan,
    gpuswap::{self, Gpuswap, SWAP_FLAVORS},
    procs,
    results::{FloodReport, Results, StopRun, SwapRun},
};
use crate::{
    load::{self, LoadSpec},
    procfs::{self, Sampler},
    stop as stopping, swap,
};

pub async fn swap(plan: &Plan, g: &Gpuswap, results: &mut Results) {
    for flavor in SWAP_FLAVORS {
        let a = format!("swap-{}-a", flavor.flavor);
        let b = format!("swap-{}-b", flavor.flavor);
        // The first request swaps from whatever held the GPU (or nothing): a
        // start, measured the same way; the rest swap within the pair.
        for i in 0..=plan.swap_samples {
            let model = if i % 2 == 0 { &a } else { &b };
            let Some(config) = g.model(model) else {
                results.failed("swap", anyhow!("{model} is not configured"));
                break;
            };
            eprintln!("bench: swap to {model}");
            let measured = swap::measure(
                &g.url(),
                model,
                &format!("\"model\":\"{model}\""),
                None,
                config.probe(),
                Duration::from_secs(60),
            )
            .await;
            match measured {
                Ok(sample) => results.swap.push(SwapRun {
                    flavor: flavor.flavor,
                    sample,
                }),
                Err(e) => {
                    results.failed(&format!("swap to {model}"), e);
                    break;
                }
            }
        }
    }
}

pub async fn stop(plan: &Plan, g: &Gpuswap, bin_dir: &Path, results: &mut Results) {
    let client = match stopping::client(&g.endpoints.supervisor) {
        Ok(c) => c,
        Err(e) => return results.failed("supervisor client", e),
    };
    for case in gpuswap::stop_cases() {
        let Some(model) = g.model(case.model) else {
            continue;
        };
        let mut run = StopRun {
            case: case.model,
            title: case.title,
            stop_timeout_ms: case.stop_timeout.as_millis(),
            own_exit: Vec::new(),
            deactivate: Vec::new(),
        };
        // The baseline runs the same mock alone, on a port of its own.
        let own_port = match procs::free_port() {
            Ok(p) => p,
            Err(e) => return results.failed("port", e),
        };
        let own_command = gpuswap::mock_command(
            bin_dir,
            case.flavor,
            own_port,
            case.model,
            Duration::ZERO,
            0.0,
            case.extra,
        );
        let own_probe = swap::ReadyProbe {
            addr: ([127, 0, 0, 1], own_port).into(),
            ..model.probe()
        };
        for _ in 0..plan.stop_samples {
            eprintln!("bench: stop {} alone", case.model);
            match stopping::measure_own_exit(&own_command, &own_probe, case.stop_timeout).await {
                Ok(sample) => run.own_exit.push(sample),
                Err(e) => results.failed(&format!("own exit of {}", case.model), e),
            }
            eprintln!("bench: stop {} through the supervisor", case.model);
            let mut client = client.clone();
            match stopping::measure_deactivate(&mut client, case.model).await {
                Ok(sample) => run.deactivate.push(sample),
                Err(e) => results.failed(&format!("Deactivate {}", case.model), e),
            }
        }
        results.stop.push(run);
    }
}

pub async fn scale(plan: &Plan, g: &Gpuswap, results: &mut Results) {
    eprintln!(
        "bench: {} concurrent slow streams through the gateway",
        plan.scale_streams
    );
    let spec = LoadSpec {
        url: g.url(),
        model: "scale-slow".into(),
        stream: true,
        max_tokens: plan.scale_max_tokens,
        concurrency: plan.scale_streams,
        duration: Some(Duration::from_secs_f64(plan.scale_secs)),
        requests: None,
        grace: Duration::from_secs(30),
        bearer: None,
        watch: vec![("gateway".into(), g.gateway.pid)],
    };
    // Load the model first so that the window measures streaming, not a start.
    let warm = LoadSpec {
        duration: None,
        requests: Some(1),
        concurrency: 1,
        max_tokens: 1,
        watch: Vec::new(),
        ..spec.clone()
    };
    if let Err(e) = load::run(warm).await {
        return results.failed("warming scale-slow", e);
    }
    match load::run(spec).await {
        Ok(report) => results.scale = Some(report),
        Err(e) => results.failed("scale", e),
    }
}

pub async fn flood(plan: &Plan, g: &Gpuswap, results: &mut Results) {
    eprintln!(
        "bench: supervisor memory while a backend writes {} bytes of logs",
        plan.flood_bytes
    );
    let outcome = async {
        let mut client = stopping::client(&g.endpoints.supervisor)?;
        // The flood may be over in a fraction of a second: sample often.
        let sampler = Sampler::every(
            &[("supervisor".into(), g.supervisor.pid)],
            Duration::from_millis(5),
        );
        let started = Instant::now();
        let mut activation = {
            let mut client = client.clone();
            tokio::spawn(async move {
                stopping::activate(&mut client, "flood", Duration::from_secs(120)).await
            })
        };
        let deadline = started + Duration::from_secs(if plan.quick { 30 } else { 60 });
        let mut pid = None;
        let mut written = 0;
        while Instant::now() < deadline {
            if pid.is_none() {
                pid = stopping::backend_pid(&mut client, "flood").await.ok();
            }
            if let Some(p) = pid {
                match procfs::written_bytes(p) {
                    Some(w) => written = written.max(w),
                    None => break,
                }
                if written >= plan.flood_bytes {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        // A moment more: the supervisor may still be reading what was written.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let usage = sampler.finish().await.into_iter().next();
        activation.abort();
        let _ = (&mut activation).await;
        client
            .deactivate(::gpuswap::pb::DeactivateRequest {
                model: "flood".into(),
                all: false,
                force: true,
                if_idle_generation: None,
                sleep: false,
            })
            .await?;
        if pid.is_none() {
            bail!("the flooding backend never showed up in Status");
        }
        Ok(FloodReport {
            bytes_written: written,
            secs,
            supervisor: usage,
        })
    };
    match outcome.await {
        Ok(report) => results.flood = Some(report),
        Err(e) => results.failed("log flood", e),
    }
}
