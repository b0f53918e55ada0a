//! A backend that crashes mid-stream: the client gets an error event and the end of its
//! stream within a second of the crash, the workers the crash orphaned are ended, and the
//! next request starts the model again and is served.

use std::time::Duration;

use crate::e2e_common;
use crate::e2e_common::{Model, Stack, openai_error};
use gpuswap::pb::ModelState;
use serde_json::Value;
use testkit::{partial_stream_content, sse_data};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_ends_the_stream_with_an_error_and_the_next_request_restarts() {
    let stack = Stack::builder("e2e-crash")
        // Answers longer than 5 tokens kill the server after the 5th (a segfault), leaving
        // its two workers behind; 20 tokens per second.
        .model(
            Model::new("alpha")
                .flavor("sglang")
                .tokens_per_second(20)
                .args(&["--workers", "2", "--fault", "crash-after:5"]),
        )
        .start()
        .await;
    stack.served_chat("alpha", false, 2).await;
    let first = stack.status("alpha").await;
    assert_eq!(first.state(), ModelState::Ready);
    let first_processes = stack.model_processes("alpha");
    assert_eq!(first_processes.len(), 4, "guard, server, two workers");
    let death = e2e_common::watch_death(first.pid, testkit::DEADLINE);

    let stream = stack.open_chat("alpha", true, 40).await;
    assert_eq!(stream.status, 200);
    let body = stream.read_timed().await;
    let crashed = death
        .join()
        .expect("the watcher")
        .expect("the server crashed");
    let text = body.text();
    assert!(body.error.is_none(), "{:?}: {text}", body.error);
    assert!(
        partial_stream_content(&text).starts_with("[served by alpha]"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let last: Value = serde_json::from_str(sse_data(&text).last().unwrap()).expect("JSON");
    let (code, message) = openai_error(&last).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(code, "backend_unavailable", "{message}");
    // The error event is the last piece, and the body ended right after it.
    let (error_at, _) = body
        .pieces
        .iter()
        .rev()
        .find(|(_, piece)| String::from_utf8_lossy(piece).contains("\"error\""))
        .expect("the error piece");
    let after = body.ended.saturating_duration_since(crashed);
    eprintln!(
        "error event {:?} and end {after:?} after the crash",
        error_at.saturating_duration_since(crashed)
    );
    assert!(
        after <= Duration::from_secs(1),
        "the stream ended {after:?} after the crash{}",
        stack.logs()
    );

    // The workers the crash left behind are ended with their guard.
    testkit::wait_for("the crashed tree to be gone", testkit::DEADLINE, || async {
        first_processes
            .iter()
            .all(|pid| !testkit::alive(*pid))
            .then_some(())
    })
    .await;

    // The next request starts alpha again and is served.
    stack.served_chat("alpha", true, 3).await;
    let second = stack.status("alpha").await;
    assert!(second.generation > first.generation, "{second:?}");
    assert_ne!(second.pid, first.pid);
    testkit::wait_for("the second start on Watch", testkit::DEADLINE, || async {
        (stack.starts().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(stack.starts(), ["alpha", "alpha"]);
}
