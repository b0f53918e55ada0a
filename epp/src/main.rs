//! `gpuswap-epp --config FILE [--listen ADDR]`

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use gpuswap::config::{ConfigLoader, Flags};

/// The Endpoint Picker in front of many gpuswap boxes: an Envoy ext_proc server that sends
/// each request to the box where its model is loaded, or to the box that should load it.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration file (its [epp] and [telemetry] sections are read).
    #[arg(long, env = "GPUSWAP_CONFIG")]
    config: PathBuf,
    /// Address to listen on (overrides epp.listen, and is checked like it).
    #[arg(long)]
    listen: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let flags = Flags {
        epp_listen: args.listen,
        ..Flags::default()
    };
    let config = ConfigLoader::new(args.config, flags).load_or_exit("gpuswap-epp");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let _runtime_context = runtime.enter();
    let _telemetry = gpuswap_telemetry::init("gpuswap-epp", &config.telemetry)?;
    runtime.block_on(gpuswap_epp::run(config.epp, gpuswap::shutdown::signal()))
}
