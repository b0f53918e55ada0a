//! `gpuswap-loadgen`: a closed-loop HTTP/1.1 load generator for OpenAI-style
//! chat endpoints (plain and SSE streaming), swap and stop probes for gpuswap,
//! and `suite`, the whole benchmark against nginx and LiteLLM.

mod http;
mod load;
mod poller;
mod procfs;
mod sse;
mod stats;
mod stop;
mod suite;
mod swap;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "gpuswap-loadgen", version, about)]
struct Cli {
    /// Runtime threads (1 keeps the load generator on one core, leaving the rest to the system under test).
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop load: prints one JSON object.
    Load(LoadArgs),
    /// Time a swap: request a model that is not loaded while polling its backend's readiness.
    Swap(SwapArgs),
    /// Time the supervisor's Deactivate of a model (activated first).
    Stop(StopArgs),
    /// The whole benchmark (see bench/run.sh).
    Suite(suite::SuiteArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// e.g. http://127.0.0.1:8002/v1/chat/completions
    #[arg(long)]
    url: String,
    #[arg(long)]
    model: String,
    #[arg(long)]
    stream: bool,
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    #[arg(long, short = 'c', default_value_t = 1)]
    concurrency: usize,
    /// How long workers start new requests.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Total requests instead of a duration.
    #[arg(long)]
    requests: Option<u64>,
    /// How long requests in flight at the end may take [default: 10s]; with
    /// --requests, how long the whole run may take [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    grace: Option<Duration>,
    /// Sent as `Authorization: Bearer <token>`.
    #[arg(long, env = "LOADGEN_BEARER")]
    bearer: Option<String>,
    /// Sample memory and CPU of a process: NAME=PID (repeatable).
    #[arg(long, value_parser = parse_watch)]
    watch: Vec<(String, u32)>,
}

#[derive(clap::Args)]
struct SwapArgs {
    #[arg(long)]
    url: String,
    /// The model to swap to.
    #[arg(long)]
    model: String,
    /// Text the answer must contain (default: the model name).
    #[arg(long)]
    expect: Option<String>,
    /// The backend's readiness URL, e.g. http://127.0.0.1:30000/health
    #[arg(long)]
    ready_url: String,
    /// Extra header for the readiness probe ("Authorization: Bearer K"); repeatable.
    #[arg(long)]
    ready_header: Vec<String>,
    #[arg(long, env = "LOADGEN_BEARER")]
    bearer: Option<String>,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct StopArgs {
    /// Supervisor endpoint, e.g. unix:///run/gpuswap/supervisor.sock
    #[arg(long)]
    supervisor: String,
    #[arg(long)]
    model: String,
}

fn parse_watch(text: &str) -> Result<(String, u32), String> {
    let (name, pid) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=PID, got {text:?}"))?;
    let pid = pid.parse().map_err(|e| format!("{text}: {e}"))?;
    Ok((name.to_owned(), pid))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Load(args) => {
            let report = load::run(load::LoadSpec {
                url: args.url,
                model: args.model,
                stream: args.stream,
                max_tokens: args.max_tokens,
                concurrency: args.concurrency,
                duration: match (args.duration, args.requests) {
                    (None, None) => Some(Duration::from_secs(10)),
                    (d, _) => d,
                },
                requests: args.requests,
                grace: args
                    .grace
                    .unwrap_or(Duration::from_secs(if args.requests.is_some() {
                        600
                    } else {
                        10
                    })),
                bearer: args.bearer,
                watch: args.watch,
            })
            .await?;
            println!("{}", serde_json::to_string(&report)?);
        }
        Command::Swap(args) => {
            let target = http::Target::parse(&args.ready_url)?;
            let probe = swap::ReadyProbe {
                addr: target.addr,
                path: target.path,
                headers: args.ready_header,
            };
            let expect = args.expect.unwrap_or_else(|| args.model.clone());
            let sample = swap::measure(
                &args.url,
                &args.model,
                &expect,
                args.bearer.as_deref(),
                probe,
                args.timeout,
            )
            .await?;
            println!("{}", serde_json::to_string(&sample)?);
        }
        Command::Stop(args) => {
            let mut client = stop::client(&args.supervisor)?;
            let sample = stop::measure_deactivate(&mut client, &args.model)
                .await
                .context("stop")?;
            println!("{}", serde_json::to_string(&sample)?);
        }
        Command::Suite(args) => suite::run(args).await?,
    }
    Ok(())
}
