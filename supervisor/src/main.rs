//! gpuswap-supervisor: see the crate docs in lib.rs. (owner: scheduler layer, except the
//! `guard` dispatch below which belongs to the process layer)

fn main() -> anyhow::Result<()> {
    // `gpuswap-supervisor guard ...` is the parent of one backend (see guard.rs); it must not
    // start a tokio runtime or parse the daemon's flags.
    if std::env::args_os().nth(1).is_some_and(|a| a == "guard") {
        gpuswap_supervisor::guard::main();
    }
    Ok(())
}
