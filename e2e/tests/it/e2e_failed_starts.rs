//! Backends that fail through the gateway: one that exits while loading, one that never
//! becomes ready, one that ignores SIGTERM. The client gets a clean 503 with the reason
//! (and the log tail when `expose_log_tail` is on; else where the operator finds it) at the
//! right time (not at some later timeout), nothing of the failed backend is left, and the
//! next model is served.

use std::time::{Duration, Instant};

use crate::e2e_common;
use crate::e2e_common::{Model, Stack, Verdict, judge, openai_error};
use gpuswap::pb::ModelState;
use serde_json::Value;

/// The `error` object of a 503 `model_start_failed`, with its message.
fn start_failure(reply: &e2e_common::Reply, logs: &str) -> (Value, String) {
    assert_eq!(reply.status, 503, "{reply:?}{logs}");
    let body: Value = serde_json::from_str(&reply.text).expect("JSON");
    let (code, message) = openai_error(&body).unwrap_or_else(|| panic!("{reply:?}"));
    assert_eq!(code, "model_start_failed", "{message}");
    (body["error"].clone(), message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_exits_while_loading_fails_at_once_and_its_log_says_why() {
    let stack = Stack::builder("e2e-exit-load")
        // Exits with a CUDA OOM half-way through a 1 s load, long before its startup_timeout.
        .model(
            Model::new("broken")
                .flavor("sglang")
                .load_time("1s")
                .args(&["--fault", "exit-during-load"])
                .toml("startup_timeout = \"60s\""),
        )
        .model(Model::new("fine"))
        .start()
        .await;
    let asked = Instant::now();
    let reply = stack.chat("broken", false, 2).await;
    let took = asked.elapsed();
    let (error, message) = start_failure(&reply, &stack.logs());
    assert!(message.contains("broken"), "{message}");
    assert!(message.contains("exited"), "the reason: {message}");
    assert!(
        message.contains("gpuswapctl logs broken"),
        "where to look: {message}"
    );
    assert!(error.get("log_tail").is_none(), "{error}");
    let logs = stack.ctl(&["logs", "broken"]).await;
    assert!(logs.stdout.contains("out of memory"), "{logs:?}");
    assert!(
        took < Duration::from_secs(20),
        "the failure took {took:?}: it waited for a timeout"
    );
    testkit::wait_for("nothing of broken left", testkit::DEADLINE, || async {
        stack.model_processes("broken").is_empty().then_some(())
    })
    .await;

    // The GPU is free for the next model.
    let reply = stack.chat("fine", true, 3).await;
    assert_eq!(
        judge("fine", true, &reply),
        Verdict::Served,
        "{reply:?}{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_becomes_ready_fails_at_its_startup_timeout() {
    let startup_timeout = Duration::from_millis(1500);
    let stack = Stack::builder("e2e-never-ready")
        .gateway("expose_log_tail = true")
        .model(
            Model::new("stuck")
                .load_time("200ms")
                .args(&["--fault", "never-ready"])
                .toml("startup_timeout = \"1500ms\""),
        )
        .model(Model::new("fine"))
        .start()
        .await;
    let asked = Instant::now();
    let reply = stack.chat("stuck", false, 2).await;
    let took = asked.elapsed();
    let (error, message) = start_failure(&reply, &stack.logs());
    assert!(message.contains("startup_timeout"), "the reason: {message}");
    let tail = error["log_tail"].as_array().expect("a log tail");
    assert!(
        tail.iter()
            .any(|line| line.as_str().unwrap_or("").contains("Loading is taking")),
        "{tail:?}"
    );
    assert!(
        took >= startup_timeout,
        "failed after {took:?}, before the startup_timeout"
    );
    assert!(
        took < startup_timeout + Duration::from_secs(10),
        "failed only after {took:?}"
    );
    // The stuck process is ended, not left loading for ever.
    testkit::wait_for("nothing of stuck left", testkit::DEADLINE, || async {
        stack.model_processes("stuck").is_empty().then_some(())
    })
    .await;
    assert_eq!(stack.status("stuck").await.state(), ModelState::Failed);

    let reply = stack.chat("fine", false, 3).await;
    assert_eq!(
        judge("fine", false, &reply),
        Verdict::Served,
        "{reply:?}{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ignoring_sigterm_is_killed_at_stop_timeout_and_the_next_model_serves() {
    let stop_timeout = Duration::from_millis(1500);
    let stack = Stack::builder("e2e-stubborn")
        .model(
            Model::new("stubborn")
                .args(&["--fault", "ignore-sigterm"])
                .toml("stop_timeout = \"1500ms\""),
        )
        .model(Model::new("fine"))
        .start()
        .await;
    let sampler = stack.sampler(&[("stubborn", "fine")]);
    let reply = stack.chat("stubborn", false, 2).await;
    assert_eq!(
        judge("stubborn", false, &reply),
        Verdict::Served,
        "{reply:?}"
    );
    let server = stack.status("stubborn").await.pid;
    let death = e2e_common::watch_death(server, testkit::DEADLINE);

    // "fine" needs the GPU: stubborn is drained (nothing in flight), told to stop, ignores
    // it, and is killed at its stop_timeout; then fine starts and answers.
    let asked = Instant::now();
    let reply = stack.chat("fine", true, 3).await;
    let served = Instant::now();
    assert_eq!(
        judge("fine", true, &reply),
        Verdict::Served,
        "{reply:?}{}",
        stack.logs()
    );
    let died = death.join().expect("the watcher").expect("stubborn died");
    let lived = died.duration_since(asked);
    eprintln!(
        "stubborn killed {lived:?} after the request for fine, which was served after {:?}",
        served.duration_since(asked)
    );
    assert!(
        lived >= stop_timeout,
        "stubborn died {lived:?} after the stop began, before its stop_timeout"
    );
    assert!(
        lived < stop_timeout + Duration::from_secs(5),
        "stubborn died only {lived:?} after the stop began"
    );
    assert!(served >= died, "fine answered while stubborn still ran");
    sampler.finish().assert_clean(&stack.logs());
    assert!(stack.model_processes("stubborn").is_empty());

    let logs = stack.ctl(&["logs", "stubborn", "-n", "50"]).await;
    assert_eq!(logs.code, Some(0), "{logs:?}");
    assert!(
        logs.stdout.contains("Received SIGTERM; ignoring it"),
        "{}",
        logs.stdout
    );
    assert!(logs.stdout.contains("SIGKILL"), "{}", logs.stdout);
}
