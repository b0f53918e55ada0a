//! The load generator against the real mock backend: what it counts must
//! match what the mock is known to send.

use std::{net::TcpStream, process::Command};

use testkit::{DEADLINE, Proc, free_port, json, wait_for_blocking};

/// A vLLM-like mock with no load time and no token delay.
fn mock(model: &str) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = Command::new(testkit::bin("gpuswap-mock-backend"));
    cmd.args([
        "--flavor",
        "vllm",
        "--port",
        &port.to_string(),
        "--model",
        model,
    ])
    .args(["--load-time", "0s", "--tokens-per-second", "0"])
    .stdout(std::process::Stdio::null());
    let proc = Proc::spawn(cmd);
    wait_for_blocking("the mock listening", DEADLINE, || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (proc, port)
}

fn loadgen(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gpuswap-loadgen"))
        .args(args)
        .output()
        .expect("run gpuswap-loadgen");
    testkit::assert_success(&out, &format!("gpuswap-loadgen {args:?}"));
    json(&String::from_utf8_lossy(&out.stdout))
}

/// `gpuswap-loadgen load` of `model` at the chat endpoint on `port`, with `extra` options.
fn load(port: u16, model: &str, extra: &[&str]) -> serde_json::Value {
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let args = ["load", "--url", &url, "--model", model];
    loadgen(&[&args[..], extra].concat())
}

#[test]
fn counts_plain_and_streamed_requests_and_their_chunks() {
    let (_mock, port) = mock("m1");

    let plain = load(port, "m1", &["-c", "2", "--requests", "7"]);
    assert_eq!(plain["requests_ok"], 7, "{plain}");
    assert_eq!(plain["errors"], 0, "{plain}");
    assert_eq!(plain["latency_ms"]["count"], 7, "{plain}");
    assert!(plain["ttft_ms"].is_null(), "{plain}");
    assert_eq!(plain["chunks"], 0, "{plain}");

    let streamed = load(
        port,
        "m1",
        &[
            "--stream",
            "--max-tokens",
            "8",
            "-c",
            "3",
            "--requests",
            "5",
        ],
    );
    assert_eq!(streamed["requests_ok"], 5, "{streamed}");
    assert_eq!(streamed["errors"], 0, "{streamed}");
    // Per stream: a role chunk, one chunk per token, a finish chunk.
    assert_eq!(streamed["chunks"], 5 * (8 + 2), "{streamed}");
    assert_eq!(streamed["ttft_ms"]["count"], 5, "{streamed}");
    let ttft = streamed["ttft_ms"]["p50"].as_f64().unwrap();
    let total = streamed["latency_ms"]["p50"].as_f64().unwrap();
    assert!(ttft > 0.0 && ttft <= total, "{streamed}");
    let loadgen_usage = streamed["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "loadgen");
    assert!(loadgen_usage.is_some(), "{streamed}");
}

#[test]
fn refused_requests_are_errors_with_the_backend_message() {
    let (_mock, port) = mock("m2");
    let report = load(port, "other", &["--requests", "3"]);
    assert_eq!(report["requests_ok"], 0, "{report}");
    assert_eq!(report["errors"], 3, "{report}");
    let sample = report["error_samples"][0].as_str().unwrap();
    assert!(sample.contains("404"), "{report}");

    let report = load(free_port(), "m2", &["--duration", "200ms"]);
    assert_eq!(report["requests_ok"], 0, "{report}");
    assert!(report["errors"].as_u64().unwrap() >= 1, "{report}");
}
