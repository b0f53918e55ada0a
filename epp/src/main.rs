//! `gpuswap-epp --config FILE [--listen ADDR] [--log-format text|json]`

use gpuswap::config::{Daemon, DaemonArgs};

/// What `--help` says first.
const ABOUT: &str = "The Endpoint Picker in front of many gpuswap boxes: an Envoy ext_proc server \
                     that sends each request to the box where its model is loaded, or to the box \
                     that should load it";

fn main() -> anyhow::Result<()> {
    // The file's [epp] and [telemetry] sections are read.
    let config = DaemonArgs::parse_for(Daemon::Epp, ABOUT)
        .loader(Daemon::Epp)
        .load_or_exit(Daemon::Epp.program());
    gpuswap_telemetry::run_with_telemetry(Daemon::Epp.program(), &config.telemetry, || {
        gpuswap_epp::run(config.epp, gpuswap::shutdown::signal())
    })
}
