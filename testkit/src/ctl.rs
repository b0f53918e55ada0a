//! gpuswapctl, run by tests the way an operator runs it.

use std::{
    process::{Output, Stdio},
    time::Duration,
};

use crate::DEADLINE;

/// Runs `gpuswapctl --endpoint ENDPOINT --no-color ARGS...` to its end; panics when it
/// runs past [`DEADLINE`] (it is killed then).
pub async fn run_ctl(endpoint: &str, args: &[&str]) -> Output {
    run_ctl_within(endpoint, args, DEADLINE).await
}

/// As [`run_ctl`], bounded by `deadline` (a real server's start may take minutes).
pub async fn run_ctl_within(endpoint: &str, args: &[&str], deadline: Duration) -> Output {
    let mut all = vec!["--endpoint", endpoint, "--no-color"];
    all.extend_from_slice(args);
    run_ctl_args(&all, deadline).await
}

/// Runs a command line as a person types it, `gpuswapctl ARGS...` (words split at
/// whitespace, no quoting), to its end, as [`run_ctl`] does.
pub async fn run_ctl_line(line: &str) -> Output {
    let mut words = line.split_whitespace();
    assert_eq!(
        words.next(),
        Some("gpuswapctl"),
        "not a gpuswapctl command: {line}"
    );
    run_ctl_args(&words.collect::<Vec<_>>(), DEADLINE).await
}

async fn run_ctl_args(args: &[&str], deadline: Duration) -> Output {
    let mut command = tokio::process::Command::new(crate::bin("gpuswapctl"));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(deadline, command.output())
        .await
        .unwrap_or_else(|_| panic!("gpuswapctl {args:?} did not end within {deadline:?}"))
        .expect("run gpuswapctl")
}
