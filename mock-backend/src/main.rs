//! `gpuswap-mock-backend`: a fake inference server that behaves like SGLang,
//! TabbyAPI, vLLM or llama-server (start-up phases, health probes, logs,
//! worker processes, signals, errors, SSE quirks), with fault modes, for the
//! tests, the demo and the benchmarks of gpuswap.

mod api;
mod cli;
mod errors;
mod extra;
mod flood;
mod generate;
mod lifecycle;
mod log;
mod sleep;
mod state;
mod workers;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Worker processes are re-executions of this binary with a hidden subcommand.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == "worker")
    {
        let worker = cli::WorkerArgs::parse_from(std::env::args_os().skip(1));
        return workers::run_worker(worker);
    }
    let args = cli::Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(lifecycle::run(args))
}
