//! Fault modes and signals.

use std::time::{Duration, Instant};

use crate::common::{Mock, Reply, chat_stream_tokens, get};

/// A vLLM mock (no delay between tokens) that crashes after `crash_after` streamed tokens,
/// once it serves, and its reply to a streamed chat request for `max_tokens`.
async fn stream_from_crashing_vllm(crash_after: u32, max_tokens: u64) -> (Mock, Reply) {
    let mock = Mock::start(
        "vllm",
        &[
            "--load-time",
            "10ms",
            "--tokens-per-second",
            "0",
            "--fault",
            &format!("crash-after:{crash_after}"),
        ],
    );
    mock.wait_log("Application startup complete.").await;
    let reply = mock.chat(true, max_tokens).await;
    (mock, reply)
}

#[tokio::test]
async fn exit_during_load_exits_1_with_an_oom_line_and_kills_its_workers() {
    let mut mock = Mock::start(
        "sglang",
        &[
            "--load-time",
            "400ms",
            "--workers",
            "2",
            "--fault",
            "exit-during-load",
        ],
    );
    let status = mock.wait_exit();
    assert_eq!(status.code(), Some(1));
    mock.wait_log("CUDA out of memory").await;
    assert!(!mock.has_log("Load weight end"));
    testkit::wait_for("workers gone", testkit::DEADLINE, || async {
        testkit::processes_with_marker(&mock.marker)
            .is_empty()
            .then_some(())
    })
    .await;
}

/// A mock of `flavor` with the never-ready fault, once its output has `line`.
async fn never_ready(flavor: &str, line: &str) -> Mock {
    let mock = Mock::start(flavor, &["--load-time", "50ms", "--fault", "never-ready"]);
    mock.wait_log(line).await;
    mock
}

#[tokio::test]
async fn never_ready_sglang_never_listens() {
    let mock = never_ready("sglang", "Loading is taking a long time").await;
    assert_eq!(mock.probe("/health").await, None);
    assert!(testkit::alive(mock.pid()));
}

#[tokio::test]
async fn never_ready_llama_server_answers_503_forever() {
    let mock = never_ready("llama-server", "Loading is taking a long time").await;
    assert_eq!(mock.probe("/health").await, Some(503));
    assert!(!mock.has_log("main: model loaded"));
}

#[tokio::test]
async fn never_ready_tabbyapi_serves_without_a_model() {
    let mock = never_ready("tabbyapi", "Uvicorn running on").await;
    assert_eq!(mock.probe("/health").await, Some(200));
    assert_eq!(mock.probe("/v1/model").await, Some(503));
}

#[tokio::test]
async fn crash_after_cuts_the_stream_and_exits_139() {
    let (mut mock, reply) = stream_from_crashing_vllm(3, 10).await;
    assert_eq!(reply.status, 200);
    assert!(!reply.complete(), "the stream must be cut: {}", reply.text);
    assert!(!reply.sse_data().iter().any(|data| data == "[DONE]"));
    assert!(chat_stream_tokens(&reply.sse_chunks()).len() <= 3);
    assert_eq!(mock.wait_exit().code(), Some(139));
}

#[tokio::test]
async fn crash_after_leaves_shorter_answers_alone() {
    let (mock, reply) = stream_from_crashing_vllm(5, 5).await;
    assert!(reply.complete());
    assert_eq!(chat_stream_tokens(&reply.sse_chunks()).len(), 5);
    assert!(testkit::alive(mock.pid()));
}

#[tokio::test]
async fn ignore_sigterm_keeps_serving_until_sigkill() {
    let mock = Mock::start(
        "vllm",
        &["--load-time", "10ms", "--fault", "ignore-sigterm"],
    );
    mock.wait_log("Application startup complete.").await;
    mock.signal(libc::SIGTERM);
    mock.wait_log("ignoring").await;
    assert_eq!(mock.probe("/health").await, Some(200));
    assert!(testkit::alive(mock.pid()));
}

#[tokio::test]
async fn flood_writes_its_bytes_with_megabyte_lines_while_serving() {
    let budget: u64 = 3 << 20;
    let mock = Mock::start(
        "vllm",
        &["--load-time", "10ms", "--fault", &format!("flood:{budget}")],
    );
    mock.wait_log("flood done").await;
    assert!(
        mock.output_bytes() >= budget,
        "{} bytes",
        mock.output_bytes()
    );
    assert!(
        mock.longest_line() > 1 << 20,
        "longest line {}",
        mock.longest_line()
    );
    mock.wait_log("Application startup complete.").await;
    assert_eq!(mock.probe("/health").await, Some(200));
}

/// Starts `flavor` with `extra`, waits for `line`, sends `signal` and waits for the exit:
/// the mock (for its output), its exit code and how long it took to exit.
async fn exit_on(
    flavor: &str,
    extra: &[&str],
    line: &str,
    signal: libc::c_int,
) -> (Mock, Option<i32>, Duration) {
    let mut mock = Mock::start(flavor, extra);
    mock.wait_log(line).await;
    let start = Instant::now();
    mock.signal(signal);
    let code = mock.wait_exit().code();
    (mock, code, start.elapsed())
}

#[tokio::test]
async fn sigterm_exits_0_after_the_stop_delay() {
    let extra = ["--load-time", "10ms", "--stop-delay", "300ms"];
    let startup = "Application startup complete.";
    let (mock, code, took) = exit_on("vllm", &extra, startup, libc::SIGTERM).await;
    assert_eq!(code, Some(0));
    assert!(took.as_millis() >= 290, "{took:?}");
    mock.wait_log("Finished server process").await;
}

#[tokio::test]
async fn still_serving_during_the_stop_delay() {
    let mock = Mock::start(
        "sglang",
        &[
            "--load-time",
            "10ms",
            "--warmup",
            "0s",
            "--stop-delay",
            "600s",
        ],
    );
    mock.wait_log("fired up").await;
    mock.signal(libc::SIGTERM);
    mock.wait_log("shutting down").await;
    assert_eq!(get(mock.port, "/health").await.status, 200);
}

#[tokio::test]
async fn sigint_exits_0() {
    let (extra, listening) = (["--load-time", "10ms"], "llama_server: listening on");
    let (_, code, _) = exit_on("llama-server", &extra, listening, libc::SIGINT).await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn sigterm_during_load_exits_promptly() {
    let extra = ["--load-time", "600s"];
    let (_, code, _) = exit_on("tabbyapi", &extra, "Loading model", libc::SIGTERM).await;
    assert_eq!(code, Some(0));
}
