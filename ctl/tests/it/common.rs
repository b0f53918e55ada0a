//! What both suites do with gpuswapctl: run it clear of the test's own environment and
//! read what it printed.

use std::process::Command;

/// `gpuswapctl ARGS...` with none of the test's own `GPUSWAP_*` variables: only what a
/// test sets picks the endpoint, the token or the CA.
pub fn gpuswapctl(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gpuswapctl"));
    command
        .args(args)
        .env_remove("GPUSWAP_ENDPOINT")
        .env_remove("GPUSWAP_TOKEN_FILE")
        .env_remove("GPUSWAP_CA_FILE");
    command
}

/// One of gpuswapctl's output streams as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that an output stream of gpuswapctl (its stdout or stderr) says `needle`;
/// shows the whole stream otherwise.
#[track_caller]
pub fn assert_says(stream: &[u8], needle: &str) {
    let text = text(stream);
    assert!(text.contains(needle), "{text}");
}
