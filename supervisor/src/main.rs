//! gpuswap-supervisor: see the crate docs in lib.rs. The same binary also runs as the
//! `guard` of each backend (the dispatch below).

use std::{process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use gpuswap::{
    Endpoint,
    config::{Config, ConfigLoader, Daemon, DaemonArgs, EXIT_BAD_CONFIG},
};
use gpuswap_supervisor::{
    backend::state_file::StateFile,
    scheduler::{Scheduler, SchedulerOptions},
    server,
};
use tokio::signal::unix::{SignalKind, signal};

/// How long open calls get to finish after every backend has been stopped.
const SERVER_DRAIN: Duration = Duration::from_secs(5);

#[derive(Parser, Debug)]
#[command(
    name = "gpuswap-supervisor",
    version,
    about = "Owns the inference backends of one GPU box and swaps them on demand"
)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Validate the configuration, print a summary and exit (0: valid, 2: invalid).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // `gpuswap-supervisor guard ...` is the parent of one backend (see backend/guard.rs); it must not
    // start a tokio runtime or parse the daemon's flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "guard") {
        gpuswap_supervisor::backend::guard::main();
    }
    let args = Args::parse();
    let mut loader = args.daemon.loader(Daemon::Supervisor);
    // Absolute: the reload reads it again.
    loader.path = std::path::absolute(&loader.path).unwrap_or_else(|_| loader.path.clone());
    let config = loader.load_or_exit("gpuswap-supervisor");
    if args.check {
        println!(
            "{}: valid ({} models: {})",
            args.daemon.config.display(),
            config.models.len(),
            config.models.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        return ExitCode::SUCCESS;
    }
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
    // The span exporter runs on this runtime; the guard, declared after it, is dropped
    // first and flushes the last spans while the runtime still drives the export.
    let _runtime_context = runtime.enter();
    let _telemetry = match gpuswap_telemetry::init("gpuswap-supervisor", &config.telemetry) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("gpuswap-supervisor: invalid configuration: {error:#}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match runtime.block_on(run(loader, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("gpuswap-supervisor: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config_loader: ConfigLoader, config: Config) -> anyhow::Result<()> {
    let endpoint: Endpoint = config.supervisor.listen.parse()?;
    // Bind first: a second supervisor must not clean up the processes of a live one.
    let listener = server::bind(&config.supervisor, &endpoint).await?;
    let mut metrics = gpuswap_telemetry::Metrics::new();
    let supervisor_metrics = metrics.supervisor();
    let metrics = Arc::new(metrics);
    let _metrics_server = match &config.supervisor.metrics_listen {
        Some(addr) => {
            let render: gpuswap_telemetry::Render = Arc::new({
                let metrics = metrics.clone();
                move || metrics.encode()
            });
            let addr = addr
                .parse()
                .with_context(|| format!("supervisor.metrics_listen: {addr:?} is not host:port"))?;
            let server = gpuswap_telemetry::serve_metrics(addr, render)
                .await
                .with_context(|| format!("supervisor.metrics_listen: cannot bind {addr}"))?;
            tracing::info!(metrics = %server.local_addr(), "serving /metrics");
            Some(server)
        }
        None => None,
    };
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
    let (scheduler, mut actor) = Scheduler::spawn(
        config,
        SchedulerOptions {
            config_loader: Some(config_loader),
            guard_exe,
            state_file: Some(state_file),
            metrics: supervisor_metrics,
        },
    );

    let mut terminate = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let (stop_serving, serving_stopped) = tokio::sync::oneshot::channel::<()>();
    tracing::info!(listen = %listener.describe(), pid = std::process::id(), "serving");
    let tokens = listener.tokens();
    let mut server = tokio::spawn(listener.serve(scheduler.clone(), async {
        let _ = serving_stopped.await;
    }));

    let server_result = loop {
        tokio::select! {
            _ = terminate.recv() => { tracing::info!("SIGTERM: shutting down"); break None; }
            _ = interrupt.recv() => { tracing::info!("SIGINT: shutting down"); break None; }
            _ = hangup.recv() => {
                // The token first, as the Reload call does: a refusal changes nothing.
                let tokens = tokens.as_deref().map_or(Ok(()), |t| t.reload());
                match tokens {
                    Err(error) => tracing::error!("SIGHUP: reload refused, keeping the running configuration and token: {error:#}"),
                    Ok(()) => match scheduler.reload().await {
                        Ok(r) => tracing::info!(added = ?r.added, removed = ?r.removed, changed = ?r.changed, "SIGHUP: configuration reloaded"),
                        Err(status) => tracing::error!("SIGHUP: reload refused, keeping the running configuration: {}", status.message()),
                    },
                }
            }
            result = &mut server => break Some(result),
            // The scheduler only ends when told to: a panic leaves nobody to answer but
            // "shutting down". Exit with a failure so that the service manager restarts us;
            // the backends die with us, their guards end them on our death.
            ended = &mut actor => {
                let how = match ended {
                    Err(error) if error.is_panic() => "panicked",
                    _ => "ended",
                };
                anyhow::bail!("the scheduler {how}: exiting so that a fresh supervisor takes over");
            }
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
