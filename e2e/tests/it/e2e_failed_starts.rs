//! Backends that fail through the gateway: one that exits while loading, one that never
//! becomes ready, one that ignores SIGTERM. The client gets a clean 503 with the reason
//! (and the log tail when `expose_log_tail` is on; else where the operator finds it) at the
//! right time (not at some later timeout), nothing of the failed backend is left, and the
//! next model is served.

use std::time::{Duration, Instant};

use crate::e2e_common;
use crate::e2e_common::{Model, Stack, StackBuilder, openai_error};
use gpuswap::pb::ModelState;
use serde_json::Value;

/// A stack of `name`, whose mock backend fails as `--fault FAULT` says (`tune` sets the
/// rest of it), and of "fine", a model that shares its GPU.
fn with_fault(
    test: &str,
    name: &str,
    fault: &str,
    tune: impl FnOnce(Model) -> Model,
) -> StackBuilder {
    let faulty = tune(Model::new(name).args(&["--fault", fault]));
    Stack::builder(test).model(faulty).model(Model::new("fine"))
}

/// Asks for `model`, whose start fails: the `error` object of the 503
/// `model_start_failed`, its message, and how long the answer took.
async fn start_failure(stack: &Stack, model: &str) -> (Value, String, Duration) {
    let asked = Instant::now();
    let reply = stack.chat(model, false, 2).await;
    let took = asked.elapsed();
    assert_eq!(reply.status, 503, "{reply:?}{}", stack.logs());
    let body: Value = serde_json::from_str(&reply.text).expect("JSON");
    let (code, message) = openai_error(&body).unwrap_or_else(|| panic!("{reply:?}"));
    assert_eq!(code, "model_start_failed", "{message}");
    (body["error"].clone(), message, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_exits_while_loading_fails_at_once_and_its_log_says_why() {
    // Exits with a CUDA OOM half-way through a 1 s load, long before its startup_timeout.
    let stack = with_fault("e2e-exit-load", "broken", "exit-during-load", |model| {
        model
            .flavor("sglang")
            .load_time("1s")
            .toml("startup_timeout = \"60s\"")
    })
    .start()
    .await;
    let (error, message, took) = start_failure(&stack, "broken").await;
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
    stack.served_chat("fine", true, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_never_becomes_ready_fails_at_its_startup_timeout() {
    let startup_timeout = Duration::from_millis(1500);
    let stack = with_fault("e2e-never-ready", "stuck", "never-ready", |model| {
        model
            .load_time("200ms")
            .toml("startup_timeout = \"1500ms\"")
    })
    .gateway("expose_log_tail = true")
    .start()
    .await;
    let (error, message, took) = start_failure(&stack, "stuck").await;
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

    stack.served_chat("fine", false, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ignoring_sigterm_is_killed_at_stop_timeout_and_the_next_model_serves() {
    let stop_timeout = Duration::from_millis(1500);
    let stack = with_fault("e2e-stubborn", "stubborn", "ignore-sigterm", |model| {
        model.toml("stop_timeout = \"1500ms\"")
    })
    .start()
    .await;
    let sampler = stack.sampler(&[("stubborn", "fine")]);
    stack.served_chat("stubborn", false, 2).await;
    let server = stack.status("stubborn").await.pid;
    let death = e2e_common::watch_death(server, testkit::DEADLINE);

    // "fine" needs the GPU: stubborn is drained (nothing in flight), told to stop, ignores
    // it, and is killed at its stop_timeout; then fine starts and answers.
    let asked = Instant::now();
    stack.served_chat("fine", true, 3).await;
    let served = Instant::now();
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
