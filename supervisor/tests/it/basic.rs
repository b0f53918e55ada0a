//! Activate, swap, deactivate, conflicts, Status, Watch and Logs over a real socket.

use crate::common::{Mock, Supervisor, http};
use gpuswap::pb::{self, ModelState, activate_event::Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_starts_the_model_and_its_address_answers() {
    let sup = Supervisor::start(
        "activate",
        &[],
        vec![
            Mock::new("alpha")
                .args(&["--api-key", "sekret-key"])
                .toml("api_key = \"sekret-key\"")
                .toml("aliases = [\"a\"]"),
        ],
    )
    .await;
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);

    // By alias.
    let mut activation = sup.activate("a", false).await;
    let ready = activation.ready().await;
    assert_eq!(ready.model, "alpha");
    assert_eq!(ready.address, sup.mock("alpha").address());
    assert_eq!(ready.served_name, "alpha");
    assert_eq!(ready.api_key, "sekret-key");
    assert!(ready.generation > 0);
    let starting = activation
        .seen
        .iter()
        .find_map(|e| match e {
            Event::Starting(s) => Some(s.clone()),
            _ => None,
        })
        .expect("a Starting event before Ready");
    assert_eq!(starting.generation, ready.generation);
    assert!(starting.pid > 0);
    // Without hold the stream ends after Ready.
    assert!(activation.next().await.is_none());

    let (code, body) = http(&ready.address, "GET", "/health", None)
        .await
        .expect("backend answers");
    assert_eq!(code, 200, "{body}");

    let status = sup.model("alpha").await;
    assert_eq!(status.state(), ModelState::Ready);
    assert_eq!(status.generation, ready.generation);
    assert_eq!(status.pid, starting.pid);
    assert_eq!(status.holders, 0);
    assert!(status.last_startup_ms > 0);
    let everything = format!("{:?}", sup.status().await);
    assert!(
        !everything.contains("sekret-key"),
        "Status leaks the api key: {everything}"
    );
    let lines = sup.log_lines("", 10_000).await;
    for line in &lines {
        assert!(
            !line.line.contains("sekret-key"),
            "Logs leak the api key: {line:?}"
        );
    }
    assert!(!lines.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_is_not_found() {
    let sup = Supervisor::start("unknown", &[], vec![Mock::new("alpha")]).await;
    let error = sup
        .activate_with(pb::ActivateRequest {
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("NotFound");
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    assert!(error.message().contains("nope"));
    let mut client = sup.client.clone();
    let error = client
        .deactivate(pb::DeactivateRequest {
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("NotFound");
    assert_eq!(error.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_between_conflicting_models_then_deactivate() {
    let mut sup = Supervisor::start("swap", &[], vec![Mock::new("alpha"), Mock::new("beta")]).await;
    let alpha = sup.activate("alpha", false).await.ready().await;

    let mut beta_activation = sup.activate("beta", false).await;
    let beta = beta_activation.ready().await;
    assert!(
        beta_activation.saw(|e| matches!(e, Event::Stopping(s) if s.model == "alpha")),
        "beta's activation reports alpha stopping: {:?}",
        beta_activation.seen
    );
    assert!(beta.generation > alpha.generation);
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
    assert_eq!(sup.state("beta").await, ModelState::Ready);
    assert!(
        http(&alpha.address, "GET", "/health", None).await.is_err(),
        "alpha is gone"
    );
    assert_eq!(
        http(&beta.address, "GET", "/health", None)
            .await
            .expect("beta answers")
            .0,
        200
    );

    // And back.
    let alpha_again = sup.activate("alpha", false).await.ready().await;
    assert!(alpha_again.generation > beta.generation);
    assert_eq!(sup.state("beta").await, ModelState::Stopped);

    let stopped = sup.deactivate("alpha", false).await;
    assert_eq!(stopped, vec!["alpha".to_string()]);
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
    sup.wait_no_backends().await;
    assert!(
        sup.deactivate("", false).await.is_empty(),
        "nothing left to stop"
    );
    sup.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_activations_share_one_start_and_activate_is_idempotent() {
    let sup = Supervisor::start("join", &[], vec![Mock::new("alpha").load_time("800ms")]).await;
    let mut activations = Vec::new();
    for _ in 0..3 {
        activations.push(sup.activate("alpha", false).await);
    }
    let mut readies = Vec::new();
    for activation in &mut activations {
        readies.push(activation.ready().await);
    }
    let generation = readies[0].generation;
    assert!(
        readies.iter().all(|r| r.generation == generation),
        "{readies:?}"
    );
    let pids: std::collections::HashSet<u32> = activations
        .iter()
        .flat_map(|a| a.seen.iter())
        .filter_map(|e| match e {
            Event::Starting(s) => Some(s.pid),
            _ => None,
        })
        .collect();
    assert_eq!(pids.len(), 1, "one process for all: {pids:?}");

    let again = sup.activate("alpha", false).await.ready().await;
    assert_eq!(again.generation, generation);
    assert_eq!(again.startup_ms, 0, "already ready");
    assert_eq!(sup.model("alpha").await.restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disjoint_gpus_run_together_overlapping_gpus_do_not() {
    let sup = Supervisor::start(
        "gpus",
        &[],
        vec![
            Mock::new("zero").gpus(&[0]),
            Mock::new("one").gpus(&[1]),
            Mock::new("both").gpus(&[0, 1]),
        ],
    )
    .await;
    sup.activate("zero", false).await.ready().await;
    sup.activate("one", false).await.ready().await;
    assert_eq!(
        sup.state("zero").await,
        ModelState::Ready,
        "disjoint GPUs run together"
    );
    assert_eq!(sup.state("one").await, ModelState::Ready);

    sup.activate("both", false).await.ready().await;
    assert_eq!(sup.state("zero").await, ModelState::Stopped);
    assert_eq!(sup.state("one").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_on_the_same_port_do_not_run_together() {
    let port = testkit::free_port();
    let sup = Supervisor::start(
        "port",
        &[],
        vec![
            Mock::new("zero").gpus(&[0]).port(port),
            Mock::new("one").gpus(&[1]).port(port),
        ],
    )
    .await;
    sup.activate("zero", false).await.ready().await;
    let one = sup.activate("one", false).await.ready().await;
    assert_eq!(sup.state("zero").await, ModelState::Stopped);
    let (code, body) = http(&one.address, "GET", "/v1/models", None)
        .await
        .expect("one answers");
    assert_eq!(code, 200);
    assert!(body.contains("\"one\""), "served by one: {body}");
}

/// `127.0.0.1` and `localhost` are one address: the models swap, the second does not fail
/// on a port its neighbour holds (nor reach it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_at_two_spellings_of_one_address_do_not_run_together() {
    let port = testkit::free_port();
    let sup = Supervisor::start(
        "spelling",
        &[],
        vec![
            Mock::new("numeric").gpus(&[0]).port(port),
            Mock::new("named")
                .gpus(&[1])
                .port(port)
                .toml("host = \"localhost\""),
        ],
    )
    .await;
    sup.activate("numeric", false).await.ready().await;
    let named = sup.activate("named", false).await.ready().await;
    assert_eq!(sup.state("numeric").await, ModelState::Stopped);
    let (code, body) = http(&format!("127.0.0.1:{port}"), "GET", "/v1/models", None)
        .await
        .expect("named answers");
    assert_eq!(code, 200, "{named:?}");
    assert!(body.contains("\"named\""), "served by named: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_a_snapshot_then_changes() {
    let sup = Supervisor::start("watch", &[], vec![Mock::new("alpha")]).await;
    let mut client = sup.client.clone();
    let mut watch = client
        .watch(pb::WatchRequest {})
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.message().await.expect("snapshot").expect("an event");
    match first.event {
        Some(pb::watch_event::Event::Snapshot(snapshot)) => {
            assert_eq!(snapshot.models.len(), 1);
            assert_eq!(snapshot.models[0].state(), ModelState::Stopped);
        }
        other => panic!("first event is not a snapshot: {other:?}"),
    }
    sup.activate("alpha", false).await.ready().await;
    let mut states = Vec::new();
    let mut progress = Vec::new();
    while states.last() != Some(&ModelState::Ready) {
        let event = tokio::time::timeout(testkit::DEADLINE, watch.message())
            .await
            .expect("change in time")
            .expect("Watch stream")
            .expect("an event");
        match event.event {
            Some(pb::watch_event::Event::Changed(model)) => {
                assert_eq!(model.name, "alpha");
                if model.state() == ModelState::Starting && states.last() == Some(&model.state()) {
                    // Only the load's progress moves while it starts (the mock prints shard lines).
                    progress.push(
                        model
                            .progress
                            .clone()
                            .expect("a repeated Starting has progress"),
                    );
                    continue;
                }
                states.push(model.state());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(states, vec![ModelState::Starting, ModelState::Ready]);
    let percents: Vec<Option<f32>> = progress.iter().map(|p| p.percent).collect();
    assert!(
        percents.windows(2).all(|w| w[0] != w[1]),
        "each repeated change says something new: {percents:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tail_and_follow() {
    let sup = Supervisor::start("logs", &[], vec![Mock::new("alpha")]).await;
    sup.activate("alpha", false).await.ready().await;
    let lines = sup.log_lines("alpha", 1000).await;
    assert!(
        lines
            .iter()
            .any(|l| l.stream() == pb::LogStream::Supervisor && l.line.contains("starting")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.stream() != pb::LogStream::Supervisor),
        "backend output: {lines:?}"
    );

    let mut follow = sup
        .client
        .clone()
        .logs(pb::LogsRequest {
            model: String::new(),
            tail: 0,
            follow: true,
        })
        .await
        .expect("Logs")
        .into_inner();
    sup.deactivate("alpha", false).await;
    let stopped = tokio::time::timeout(testkit::DEADLINE, async {
        loop {
            let line = follow
                .message()
                .await
                .expect("Logs stream")
                .expect("a line");
            if line.line.contains("stopped") {
                return line;
            }
        }
    })
    .await
    .expect("a followed line about the stop");
    assert_eq!(stopped.model, "alpha");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_reads_the_next_models_weights_into_the_page_cache_while_the_old_one_stops() {
    let weights = tempfile::tempdir().expect("tempdir");
    let shard = weights.path().join("model-00001-of-00001.safetensors");
    std::fs::write(&shard, vec![1u8; 8 << 20]).expect("write the weights");
    let shard_arg = shard.to_str().expect("utf-8 path");
    let sup = Supervisor::start(
        "warm",
        &[],
        vec![
            // Its stop takes a second: the time the swap spends freeing the GPU.
            Mock::new("old").args(&["--stop-delay", "1s"]),
            Mock::new("new")
                .args(&["--load-file", shard_arg])
                .toml(&format!(
                    "weights = [\"{}/*.safetensors\"]",
                    weights.path().display()
                )),
        ],
    )
    .await;
    sup.activate("old", false).await.ready().await;
    sup.activate("new", false).await.ready().await;
    let lines = sup.log_text("new", 10_000).await;
    let position = |what: &str| {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line with {what:?} in {lines:#?}"))
    };
    let warmed = position("weights warmed: 8.0 MiB in 1 file(s)");
    assert!(position("warming 1 weight file(s)") < warmed, "{lines:#?}");
    // Warmed while the old model stopped, before the new one was started.
    assert!(warmed < position("starting generation"), "{lines:#?}");
    assert!(
        position("Read 8388608 bytes of weights") > warmed,
        "{lines:#?}"
    );
}
