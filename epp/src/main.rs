//! `gpuswap-epp --config FILE [--listen ADDR] [--log-format text|json]`

use anyhow::Context as _;
use clap::Parser;
use gpuswap::config::{Daemon, DaemonArgs};

/// The Endpoint Picker in front of many gpuswap boxes: an Envoy ext_proc server that sends
/// each request to the box where its model is loaded, or to the box that should load it.
#[derive(Parser)]
#[command(version)]
struct Args {
    // The file's [epp] and [telemetry] sections are read.
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.daemon.loader(Daemon::Epp).load_or_exit("gpuswap-epp");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let _runtime_context = runtime.enter();
    let _telemetry = gpuswap_telemetry::init("gpuswap-epp", &config.telemetry)?;
    runtime.block_on(gpuswap_epp::run(config.epp, gpuswap::shutdown::signal()))
}
