//! The whole benchmark: starts the mock backends, nginx, LiteLLM and gpuswap,
//! runs interleaved rounds of load against each, then gpuswap's own swap, stop
//! and scale measurements, and writes the raw JSON and the results table.
//!
//! Something that fails to run is recorded and makes the suite exit non-zero;
//! a missed target does not.

mod gpuswap;
mod peers;
mod procs;
mod report;
mod router;
mod scenarios;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::{
    load::{self, LoadReport, LoadSpec},
    procfs::{self, ProcUsage, Sampler},
    stop::{self as stopping, DeactivateSample, OwnExitSample},
    swap::{self, SwapSample},
};
use gpuswap::{Gpuswap, SWAP_FLAVORS, Settings};
use peers::Upstream;
use procs::Proc;
use router::{RouterReport, RouterSetup};
use scenarios::{SCENARIOS, Scenario};

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
    fn new(args: &SuiteArgs) -> Self {
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

#[derive(Debug, Clone, Serialize)]
pub struct LoadRun {
    pub round: usize,
    pub scenario: &'static str,
    pub target: &'static str,
    pub report: LoadReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapRun {
    pub flavor: &'static str,
    pub sample: SwapSample,
}

#[derive(Debug, Clone, Serialize)]
pub struct StopRun {
    pub case: &'static str,
    pub title: &'static str,
    pub stop_timeout_ms: u128,
    pub own_exit: Vec<OwnExitSample>,
    pub deactivate: Vec<DeactivateSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub bytes_written: u64,
    pub secs: f64,
    pub supervisor: Option<ProcUsage>,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub load: Vec<LoadRun>,
    pub swap: Vec<SwapRun>,
    pub stop: Vec<StopRun>,
    pub scale: Option<LoadReport>,
    pub flood: Option<FloodReport>,
    /// llama-server's router mode against gpuswap (when given the server and models).
    pub router: Option<RouterReport>,
    /// What failed to run (not missed targets).
    pub failures: Vec<String>,
}

impl Results {
    fn failed(&mut self, what: &str, error: anyhow::Error) {
        let line = format!("{what}: {error:#}");
        eprintln!("bench: FAILED {line}");
        self.failures.push(line);
    }
}

/// One system under load.
#[derive(Debug, Clone)]
struct Target {
    key: &'static str,
    fast_url: String,
    paced_url: String,
    bearer: Option<String>,
    /// The proxy's own processes, whose CPU time is measured.
    proxy_pids: Vec<u32>,
}

pub const TARGET_ORDER: [&str; 4] = ["direct", "nginx", "gpuswap", "litellm"];

pub async fn run(args: SuiteArgs) -> Result<()> {
    let plan = Plan::new(&args);
    let started = Instant::now();
    // Other work on the machine skews every figure: say how busy it was.
    let load_before = report::load_average();
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or_else(|| anyhow!("no directory of the executable"))?
            .to_owned(),
    };
    for bin in [
        "gpuswap-mock-backend",
        "gpuswap-supervisor",
        "gpuswap-gateway",
    ] {
        if !bin_dir.join(bin).exists() {
            bail!("{} is missing: build it first", bin_dir.join(bin).display());
        }
    }
    let out = args.out.clone();
    let raw = out.join("raw");
    let logs = out.join("logs");
    std::fs::create_dir_all(&raw)?;
    std::fs::create_dir_all(&logs)?;
    let work = std::env::temp_dir().join(format!("gpuswap-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    raise_open_files_limit();

    let mut results = Results::default();
    let mut procs: Vec<Proc> = Vec::new();
    let outcome = tokio::select! {
        r = run_all(&plan, &args, &bin_dir, &work, &logs, &raw, &mut results, &mut procs) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = outcome {
        results.failed("the suite", e);
    }
    for proc in procs.iter_mut().rev() {
        proc.stop(Duration::from_secs(10)).await;
    }
    let _ = std::fs::remove_dir_all(&work);

    let summary = serde_json::json!({ "plan": &plan, "results": &results });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let environment = report::Environment::collect(&args.nginx, &args.litellm, load_before);
    let markdown = report::render(&plan, &results, &environment, started.elapsed());
    println!("{markdown}");
    let results_path = args.results.clone().unwrap_or_else(|| {
        if plan.quick || args.load_only || args.router_only {
            out.join("RESULTS.md")
        } else {
            PathBuf::from("bench/RESULTS.md")
        }
    });
    // Sections pasted in from other benches (warm weights, the endpoint picker) are kept.
    let written = match std::fs::read_to_string(&results_path) {
        Ok(old) => report::keep_pasted_sections(&markdown, &old),
        Err(_) => markdown.clone(),
    };
    std::fs::write(&results_path, &written)
        .with_context(|| format!("write {}", results_path.display()))?;
    if results_path != out.join("RESULTS.md") {
        std::fs::write(out.join("RESULTS.md"), &markdown)?;
    }
    eprintln!(
        "bench: results in {} and {} ({:.0} s)",
        results_path.display(),
        out.join("results.json").display(),
        started.elapsed().as_secs_f64()
    );
    if !results.failures.is_empty() {
        bail!("{} part(s) failed to run", results.failures.len());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_all(
    plan: &Plan,
    args: &SuiteArgs,
    bin_dir: &Path,
    work: &Path,
    logs: &Path,
    raw: &Path,
    results: &mut Results,
    procs: &mut Vec<Proc>,
) -> Result<()> {
    // --router-only races gpuswap and the router alone.
    let skip = |name: &str| {
        args.skip.iter().any(|s| s == name)
            || (args.router_only && matches!(name, "nginx" | "litellm"))
    };
    let router = if skip("router") || args.load_only {
        None
    } else {
        RouterSetup::new(&args.llama_server, &args.router_models)?
    };

    // The backends the peers and the direct baseline use (gpuswap starts its own
    // identical ones through the supervisor).
    let fast = start_mock(bin_dir, "bench", 0.0, logs, procs).await?;
    let paced = start_mock(bin_dir, "bench-paced", 25.0, logs, procs).await?;
    let upstreams = [
        Upstream {
            model: "bench".into(),
            port: fast,
        },
        Upstream {
            model: "bench-paced".into(),
            port: paced,
        },
    ];
    let chat = |port: u16| format!("http://127.0.0.1:{port}/v1/chat/completions");
    let mut targets = vec![Target {
        key: "direct",
        fast_url: chat(fast),
        paced_url: chat(paced),
        bearer: None,
        proxy_pids: Vec::new(),
    }];

    // LiteLLM starts slowly: start it first, wait for it last.
    let master_key = format!("sk-bench-{}", std::process::id());
    let mut litellm = None;
    if !skip("litellm") {
        match peers::start_litellm(&args.litellm, &master_key, &upstreams, work, logs) {
            Ok(started) => litellm = Some(started),
            Err(e) => results.failed("starting LiteLLM", e),
        }
    }
    if !skip("nginx") {
        match peers::start_nginx(&args.nginx, &upstreams, work, logs).await {
            Ok((proc, ports)) => {
                // The workers do the proxying; the master only supervises them.
                let workers = procfs::tree(proc.pid).into_iter().skip(1).collect();
                procs.push(proc);
                targets.push(Target {
                    key: "nginx",
                    fast_url: chat(ports[0]),
                    paced_url: chat(ports[1]),
                    bearer: None,
                    proxy_pids: workers,
                });
            }
            Err(e) => results.failed("starting nginx", e),
        }
    }
    let mut gpuswap = None;
    if !skip("gpuswap") {
        let settings = Settings {
            bin_dir,
            swap_load_time: plan.swap_load_time,
            scale_tokens_per_second: plan.scale_tokens_per_second,
            flood_bytes: plan.flood_bytes,
            router: router.as_ref(),
        };
        match gpuswap::start(&settings, work, logs).await {
            Ok(g) => {
                targets.push(Target {
                    key: "gpuswap",
                    fast_url: g.url(),
                    paced_url: g.url(),
                    bearer: None,
                    proxy_pids: vec![g.gateway.pid],
                });
                gpuswap = Some(g);
            }
            Err(e) => results.failed("starting gpuswap", e),
        }
    }
    if let Some((mut proc, port)) = litellm {
        match peers::wait_litellm(&mut proc, port, &master_key).await {
            Ok(()) => targets.push(Target {
                key: "litellm",
                fast_url: chat(port),
                paced_url: chat(port),
                bearer: Some(master_key.clone()),
                proxy_pids: procfs::tree(proc.pid),
            }),
            Err(e) => results.failed("starting LiteLLM", e),
        }
        procs.push(proc);
    }

    // Every target must answer both models before anything is measured.
    let mut usable = Vec::new();
    for target in targets {
        match smoke(plan, &target).await {
            Ok(()) => usable.push(target),
            Err(e) => results.failed(&format!("first requests through {}", target.key), e),
        }
    }
    eprintln!(
        "bench: targets ready: {}",
        usable.iter().map(|t| t.key).collect::<Vec<_>>().join(", ")
    );

    if !args.router_only {
        load_rounds(plan, &usable, raw, results).await;
    }

    if let Some(mut g) = gpuswap {
        let gateway_ok = usable.iter().any(|t| t.key == "gpuswap");
        let sections = !args.load_only && !args.router_only;
        if sections && gateway_ok {
            swap_section(plan, &g, results).await;
        }
        match &router {
            Some(setup) if gateway_ok => match router::section(plan, setup, &g, work, logs).await {
                Ok(report) => results.router = Some(report),
                Err(e) => results.failed("the llama-server router race", e),
            },
            _ if args.router_only => results.failed(
                "the llama-server router race",
                anyhow!("--router-only needs gpuswap, --llama-server and --router-models"),
            ),
            _ => {}
        }
        if sections {
            stop_section(plan, &g, bin_dir, results).await;
            if gateway_ok {
                scale_section(plan, &g, results).await;
            }
            flood_section(plan, &g, results).await;
        }
        gpuswap::stop_all(&mut g).await;
    }
    Ok(())
}

async fn start_mock(
    bin_dir: &Path,
    model: &str,
    tokens_per_second: f64,
    logs: &Path,
    procs: &mut Vec<Proc>,
) -> Result<u16> {
    let port = procs::free_port()?;
    let command = gpuswap::mock_command(
        bin_dir,
        "vllm",
        port,
        model,
        Duration::ZERO,
        tokens_per_second,
        &[],
    );
    let mut proc = procs::spawn(&format!("mock-{model}"), &command, &[], logs)?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let ready = procs::wait_until(
        &format!("mock {model} healthy"),
        &mut proc,
        Duration::from_secs(30),
        || async move { matches!(procs::http_get(addr, "/health", None).await, Some((200, _))) },
    )
    .await;
    procs.push(proc);
    ready.map(|()| port)
}

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
async fn smoke(plan: &Plan, target: &Target) -> Result<()> {
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

async fn load_rounds(plan: &Plan, targets: &[Target], raw: &Path, results: &mut Results) {
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

async fn swap_section(plan: &Plan, g: &Gpuswap, results: &mut Results) {
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

async fn stop_section(plan: &Plan, g: &Gpuswap, bin_dir: &Path, results: &mut Results) {
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

async fn scale_section(plan: &Plan, g: &Gpuswap, results: &mut Results) {
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

async fn flood_section(plan: &Plan, g: &Gpuswap, results: &mut Results) {
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

/// 1,000 streams need about 3,000 descriptors across the processes started here.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
