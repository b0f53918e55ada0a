//! The whole benchmark: starts the mock backends, nginx, LiteLLM and gpuswap,
//! runs interleaved rounds of load against each, then gpuswap's own swap, stop
//! and scale measurements, and writes the raw JSON and the results table.
//!
//! Something that fails to run is recorded and makes the suite exit non-zero;
//! a missed target does not.

/// gpuswap under test: its mock models, configuration, supervisor and gateway.
mod gpuswap;
/// The peers: nginx and LiteLLM in front of the same mock backends.
mod peers;
/// The command line, and the plan made from it.
mod plan;
/// The processes the suite starts, and waiting for them.
mod procs;
/// The proxy-overhead rounds over every target.
mod proxy_load;
/// The results table.
mod report;
/// What was measured.
mod results;
/// The race against llama-server's router mode.
mod router;
/// The load scenarios and their metrics.
mod scenarios;
/// gpuswap's own swap, stop, scale and log-flood measurements.
mod sections;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::procfs;
use gpuswap::Settings;
use peers::Upstream;
use plan::Plan;
pub use plan::SuiteArgs;
use procs::Proc;
use proxy_load::Target;
use results::Results;
use router::RouterSetup;

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
        match proxy_load::smoke(plan, &target).await {
            Ok(()) => usable.push(target),
            Err(e) => results.failed(&format!("first requests through {}", target.key), e),
        }
    }
    eprintln!(
        "bench: targets ready: {}",
        usable.iter().map(|t| t.key).collect::<Vec<_>>().join(", ")
    );

    if !args.router_only {
        proxy_load::load_rounds(plan, &usable, raw, results).await;
    }

    if let Some(mut g) = gpuswap {
        let gateway_ok = usable.iter().any(|t| t.key == "gpuswap");
        let sections = !args.load_only && !args.router_only;
        if sections && gateway_ok {
            sections::swap(plan, &g, results).await;
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
            sections::stop(plan, &g, bin_dir, results).await;
            if gateway_ok {
                sections::scale(plan, &g, results).await;
            }
            sections::flood(plan, &g, results).await;
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
    let ready = procs::wait_answering(
        &format!("mock {model} healthy"),
        &mut proc,
        Duration::from_secs(30),
        port,
        "/health",
    )
    .await;
    procs.push(proc);
    ready.map(|()| port)
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
