//! `gpuswap-gateway --config FILE [--listen ADDR] [--log-format text|json]`

use gpuswap::config::{Daemon, DaemonArgs};

/// What `--help` says first.
const ABOUT: &str = "The OpenAI-compatible front of gpuswap: routes requests to the model they \
                     name, asking the supervisor to swap models in as needed";

fn main() -> anyhow::Result<()> {
    // The file's [gateway] and [telemetry] sections are read.
    let config = DaemonArgs::parse_for(Daemon::Gateway, ABOUT)
        .loader(Daemon::Gateway)
        .load_or_exit(Daemon::Gateway.program());
    let fd_limit = raise_fd_limit();
    gpuswap_telemetry::run_with_telemetry(
        Daemon::Gateway.program(),
        &config.telemetry,
        || async move {
            match fd_limit {
                Ok((before, after)) if before != after => {
                    tracing::debug!(before, after, "open file limit raised");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot raise the open file limit"),
            }
            tokio::select! {
                result = gpuswap_gateway::run(config.gateway) => result,
                _ = gpuswap::shutdown::signal() => {
                    tracing::info!("stopping");
                    Ok(())
                }
            }
        },
    )
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
