//! The supervisor SIGKILLed while a stream is in flight: every backend process, workers and
//! grandchildren that left the group included, is gone within a second; the gateway answers
//! 503 meanwhile; a new supervisor on the same configuration serves again through the same
//! gateway.

use std::time::{Duration, Instant};

use crate::e2e_common;
use crate::e2e_common::{Model, Stack, openai_error};
use serde_json::Value;
use testkit::sse_data;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_leaves_no_process_and_a_new_one_serves_again() {
    let mut stack = Stack::builder("e2e-sup-kill")
        // SGLang-like: a server with two worker processes in its group.
        .model(
            Model::new("alpha")
                .flavor("sglang")
                .tokens_per_second(20)
                .args(&["--workers", "2"]),
        )
        // A worker that calls setsid(): it leaves the process group and the session.
        .model(Model::new("beta").flavor("sglang").gpus(&[1]).args(&[
            "--workers",
            "1",
            "--worker-escape",
        ]))
        .start()
        .await;
    stack.served_chat("beta", false, 2).await;
    // A long answer (200 tokens at 20 per second) in flight on alpha.
    let (stream, head) = stack.stream_served("alpha", 200).await;
    let before = stack.backend_processes();
    let mocks = e2e_common::scan_mocks(&stack.marker);
    assert_eq!(
        mocks.iter().filter(|p| p.worker).count(),
        3,
        "two workers of alpha, one of beta: {mocks:?}"
    );
    assert!(before.len() >= 7, "guards, servers, workers: {before:?}");

    let killed = stack.kill_supervisor();
    let gone = testkit::wait_for(
        "every backend process to end",
        testkit::DEADLINE,
        || async { stack.backend_processes().is_empty().then(Instant::now) },
    )
    .await;
    let took = gone.duration_since(killed);
    eprintln!(
        "{} backend processes ended {took:?} after the kill",
        before.len()
    );
    assert!(
        took <= Duration::from_secs(1),
        "backend processes outlived the supervisor by {took:?}"
    );

    // The stream in flight ends with an error event, not a hang and not [DONE].
    let rest = stream.read_timed().await;
    let text = format!("{head}{}", rest.text());
    assert!(rest.error.is_none(), "{:?}: {text}", rest.error);
    assert!(!text.contains("[DONE]"), "{text}");
    let last: Value = serde_json::from_str(sse_data(&text).last().unwrap()).expect("JSON");
    let (code, message) = openai_error(&last).unwrap_or_else(|| panic!("{text}"));
    assert_eq!(code, "backend_unavailable", "{message}");

    // Meanwhile the gateway says why nothing can be served, streamed or not.
    testkit::wait_for("the gateway to notice", testkit::DEADLINE, || async {
        let health = stack.health().await?;
        (health["supervisor"]["connected"] == false).then_some(())
    })
    .await;
    for stream in [false, true] {
        let reply = stack.chat("alpha", stream, 2).await;
        assert_eq!(reply.status, 503, "{reply:?}");
        let body: Value = serde_json::from_str(&reply.text).expect("JSON");
        let (code, message) = openai_error(&body).unwrap_or_else(|| panic!("{reply:?}"));
        assert_eq!(code, "supervisor_unavailable");
        assert!(message.contains("supervisor"), "{message}");
    }

    // A new supervisor on the same configuration: the same gateway reconnects and serves.
    stack.start_supervisor().await;
    testkit::wait_for("the gateway to reconnect", testkit::DEADLINE, || async {
        let health = stack.health().await?;
        (health["supervisor"]["connected"] == true).then_some(())
    })
    .await;
    for (model, stream) in [("alpha", true), ("beta", false)] {
        stack.served_chat(model, stream, 3).await;
    }
    let leaders = stack.leaders();
    assert_eq!(
        leaders.values().map(Vec::len).collect::<Vec<_>>(),
        [1, 1],
        "{leaders:?}"
    );
}
