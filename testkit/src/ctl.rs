//! gpuswapctl, run by tests the way an operator runs it.

use std::process::{Output, Stdio};

use crate::DEADLINE;

/// Runs `gpuswapctl --endpoint ENDPOINT --no-color ARGS...` to its end; panics when it
/// runs past [`DEADLINE`] (it is killed then).
pub async fn run_ctl(endpoint: &str, args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(crate::bin("gpuswapctl"));
    command
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--no-color")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("gpuswapctl {args:?} did not end within {DEADLINE:?}"))
        .expect("run gpuswapctl")
}
