//! gpuswap-supervisor: see the crate docs in lib.rs. (owner: scheduler layer, except the
//! `guard` dispatch below which belongs to the process layer)

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use gpuswap::{Endpoint, config::Config};
use gpuswap_supervisor::{
    scheduler::{Scheduler, SchedulerOptions},
    server,
    state_file::StateFile,
};
use tokio::signal::unix::{SignalKind, signal};

/// Exit status for a configuration that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

/// How long open calls get to finish after every backend has been stopped.
const SERVER_DRAIN: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "gpuswap-supervisor",
    version,
    about = "Owns the inference backends of one GPU box and swaps them on demand"
)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, env = "GPUSWAP_CONFIG")]
    config: PathBuf,
    /// Overrides supervisor.listen: unix:///path.sock or https://ip:port.
    #[arg(long)]
    listen: Option<String>,
    /// Overrides telemetry.log_format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // `gpuswap-supervisor guard ...` is the parent of one backend (see guard.rs); it must not
    // start a tokio runtime or parse the daemon's flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "guard") {
        gpuswap_supervisor::guard::main();
    }
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("gpuswap-supervisor: {error:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let format = match (args.log_format, config.telemetry.log_format.as_deref()) {
        (Some(format), _) => format,
        (None, Some("json")) => LogFormat::Json,
        (None, Some("text") | None) => LogFormat::Text,
        (None, Some(other)) => {
            eprintln!(
                "gpuswap-supervisor: invalid configuration: telemetry.log_format: {other:?} is not text or json"
            );
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    init_tracing(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("gpuswap-supervisor: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args.config, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("gpuswap-supervisor: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = Config::load(&args.config)?;
    if let Some(listen) = &args.listen {
        config.supervisor.listen = listen.clone();
        config.validate().context("--listen")?;
    }
    Ok(config)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let endpoint: Endpoint = config.supervisor.listen.parse()?;
    // Bind first: a second supervisor must not clean up the processes of a live one.
    let listener = server::bind(&config.supervisor, &endpoint).await?;
    let state_path = config.supervisor.state_file.clone();
    let state_file = Arc::new(StateFile::open(&state_path).with_context(|| {
        format!(
            "supervisor.state_file: cannot open {}",
            state_path.display()
        )
    })?);
    let cleaner = state_file.clone();
    let cleaned = tokio::task::spawn_blocking(move || cleaner.cleanup_leftovers())
        .await
        .context("leftover cleanup")?;
    for leftover in cleaned {
        tracing::warn!("ended a previous supervisor's leftover: {leftover}");
    }
    let guard_exe =
        std::env::current_exe().context("cannot find the supervisor's own executable")?;
    let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
    let (scheduler, actor) = Scheduler::spawn(
        config,
        SchedulerOptions {
            config_path: Some(config_path),
            guard_exe,
            state_file: Some(state_file),
        },
    );

    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(listen = %listener.describe(), pid = std::process::id(), "serving");
    let mut server = tokio::spawn(listener.serve(scheduler.clone(), async {
        let _ = serving_stopped.await;
    }));

    let server_result = loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break None; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break None; }
            _ = hangup.recv() => match scheduler.reload().await {
                Ok(r) => tracing::info!(added = ?r.added, removed = ?r.removed, changed = ?r.changed, "SIGHUP: configuration reloaded"),
                Err(status) => tracing::error!("SIGHUP: reload refused, keeping the running configuration: {}", status.message()),
            },
            result = &mut server => break Some(result),
        }
    };
    scheduler.shutdown().await;
    let _ = actor.await;
    let result = match server_result {
        Some(result) => result.context("server task")?,
        None => {
            let _ = stop_serving.send(());
            match tokio::time::timeout(SERVER_DRAIN, &mut server).await {
                Ok(result) => result.context("server task")?,
                Err(_) => {
                    server.abort();
                    Ok(())
                }
            }
        }
    };
    if let Endpoint::Unix(path) = &endpoint {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    result
}
