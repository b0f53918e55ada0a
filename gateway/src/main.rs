//! `gpuswap-gateway --config FILE [--listen ADDR]`

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// The OpenAI-compatible front of gpuswap: routes requests to the model they
/// name, asking the supervisor to swap models in as needed.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The shared configuration file (only its [gateway] section is read).
    #[arg(long, env = "GPUSWAP_CONFIG")]
    config: PathBuf,
    /// Address to listen on (overrides gateway.listen).
    #[arg(long)]
    listen: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = gpuswap::config::Config::load(&args.config)?.gateway;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async move {
        tokio::select! {
            result = gpuswap_gateway::run(config, args.listen) => result,
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                Ok(())
            }
        }
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
