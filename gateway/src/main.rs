//! `gpuswap-gateway --config FILE [--listen ADDR] [--log-format text|json]`

use anyhow::Context as _;
use clap::Parser;
use gpuswap::config::{Daemon, DaemonArgs};

/// The OpenAI-compatible front of gpuswap: routes requests to the model they
/// name, asking the supervisor to swap models in as needed.
#[derive(Parser)]
#[command(version)]
struct Args {
    // The file's [gateway] and [telemetry] sections are read.
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args
        .daemon
        .loader(Daemon::Gateway)
        .load_or_exit("gpuswap-gateway");
    let fd_limit = raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let _runtime_context = runtime.enter();
    // Declared after the runtime, so it is dropped first: its last spans are
    // flushed while the runtime still drives the exporter.
    let _telemetry = gpuswap_telemetry::init("gpuswap-gateway", &config.telemetry)?;
    match fd_limit {
        Ok((before, after)) if before != after => {
            tracing::debug!(before, after, "open file limit raised");
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
    runtime.block_on(async move {
        tokio::select! {
            result = gpuswap_gateway::run(config.gateway) => result,
            _ = gpuswap::shutdown::signal() => {
                tracing::info!("stopping");
                Ok(())
            }
        }
    })
}

/// Raises the soft limit of open files to the hard limit: every client
/// connection and every upstream connection is a descriptor, and the usual
/// soft limit of 1024 is far below what a busy front needs.
fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}
