//! Requests that wait: keep-alives and progress during a load, failed starts,
//! queue timeouts, clients that go away while queued or mid-stream, and a
//! supervisor that goes away.

use std::time::{Duration, Instant};

use crate::common::{Model, Stack, read_stream};
use futures_util::StreamExt;
use gpuswap::pb::ModelState;
use serde_json::Value;
use testkit::{sse_data, stream_content};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_and_progress_flow_while_a_slow_model_loads() {
    let stack = Stack::builder("keepalive")
        .model(Model::new("slow").load_time("2s"))
        .start()
        .await;
    let response = stack.post_chat("slow", true, 3).await;
    // The 200 comes at once, long before the model is ready.
    assert_eq!(response.status(), 200);
    assert_ne!(stack.status("slow").await.state(), ModelState::Ready);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = read_stream(response).await;
    let answer_at = text.find("[served by slow]").expect("the answer");
    let line_start = text[..answer_at].rfind("data: ").unwrap();
    let before = &text[..line_start];
    let keepalives = before.matches(": keep-alive\n\n").count();
    assert!(keepalives >= 3, "{keepalives} keep-alives in {text}");
    let progress: Vec<Value> = sse_data(before)
        .iter()
        .map(|d| testkit::json(d))
        .filter(|v| v["id"] == "gpuswap-progress")
        .collect();
    assert!(progress.len() >= 3, "{text}");
    for chunk in &progress {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "slow");
        assert!(chunk["choices"][0]["delta"]["content"].is_null(), "{chunk}");
        let reasoning = chunk["choices"][0]["delta"]["reasoning_content"]
            .as_str()
            .unwrap();
        assert!(reasoning.contains("slow"), "{chunk}");
        assert_eq!(chunk["gpuswap_progress"]["model"], "slow");
        assert!(chunk["gpuswap_progress"]["elapsed_ms"].is_u64());
    }
    assert!(
        progress
            .iter()
            .any(|c| c["gpuswap_progress"]["phase"] == "starting"),
        "{text}"
    );
    assert!(stream_content(&text).starts_with("[served by slow]"));
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Text completions get only comments: a chat chunk would not parse there.
    let (s, _) = stack
        .post(
            "/v1/completions",
            &serde_json::json!({"model": "slow", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(s, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_chunks_can_be_turned_off() {
    let stack = Stack::builder("no-progress")
        .gateway("stream_progress = false")
        .model(Model::new("slow").load_time("1s"))
        .start()
        .await;
    let text = stack.stream_chat("slow", 2).await;
    assert!(text.starts_with(": keep-alive\n\n"), "{text}");
    assert!(!text.contains("gpuswap-progress"), "{text}");
    assert!(
        stream_content(&text).starts_with("[served by slow]"),
        "{text}"
    );
}

/// Secrets of a model that fails to start: values of a secret-named flag
/// and of a secret-named variable; neither is the model's `api_key`.
const ARG_KEYS: &str = "sk-arg-one,sk-arg-two";
const ENV_TOKEN: &str = "hf_env_secret_value";

fn broken_model() -> Model {
    Model::new("broken")
        .args(&["--api-key", ARG_KEYS, "--fault", "exit-during-load"])
        .env("HF_TOKEN", ENV_TOKEN)
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in ["sk-arg-one", "sk-arg-two", ENV_TOKEN] {
        assert!(!text.contains(secret), "{secret} leaks in {what}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_answers_503_in_one_line_and_the_log_stays_with_the_operator() {
    let stack = Stack::builder("failed")
        .model(broken_model())
        .model(Model::new("fine").gpus(&[1]))
        .start()
        .await;
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("broken", false, 2))
        .await;
    assert_eq!(s, 503, "{t}{}", stack.logs());
    let error = &testkit::json(&t)["error"];
    assert_eq!(error["code"], "model_start_failed", "{t}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("broken"), "{t}");
    assert!(message.contains("`gpuswapctl logs broken`"), "{t}");
    assert!(!message.contains('\n'), "more than one line: {t}");
    assert!(
        !message.contains("out of memory"),
        "the log tail is sent: {t}"
    );
    assert!(error.get("log_tail").is_none(), "{t}");
    assert_no_secret("the 503", &t);

    // Anthropic's route gets the same one line, in Anthropic's shape.
    let (s, t) = stack
        .post(
            "/v1/messages",
            &serde_json::json!({"model": "broken", "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(s, 503, "{t}");
    let anthropic = testkit::json(&t);
    assert_eq!(anthropic["type"], "error", "{t}");
    let message = anthropic["error"]["message"].as_str().unwrap();
    assert!(message.contains("`gpuswapctl logs broken`"), "{t}");
    assert!(!message.contains("out of memory"), "{t}");
    assert_no_secret("the Anthropic-shaped 503", &t);

    // Streamed: the 200 went out before the failure, so it is an error event.
    let response = stack.post_chat("broken", true, 2).await;
    assert_eq!(response.status(), 200);
    let text = read_stream(response).await;
    assert!(!text.contains("[DONE]"), "{text}");
    let last = testkit::json(sse_data(&text).last().unwrap());
    assert_eq!(last["error"]["code"], "model_start_failed", "{text}");
    assert!(!text.contains("out of memory"), "{text}");

    // Where the message points, the operator finds the log, secrets masked.
    let endpoint = format!("unix://{}", stack.socket.display());
    let output = testkit::run_ctl(&endpoint, &["logs", "broken"]).await;
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(logs.contains("out of memory"), "{logs}");
    assert!(logs.contains("--api-key ***"), "{logs}");
    assert_no_secret("gpuswapctl logs", &logs);

    // Other models are not affected.
    stack.chat_ok("fine", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_log_tail_and_a_line_cut_inside_a_secret_keep_it_masked() {
    // The supervisor keeps 16 KiB of a line: the token starts 5 bytes before the cut.
    let long_line = format!("{}{ENV_TOKEN}", "x".repeat(16 * 1024 - 5));
    let stack = Stack::builder("exposed-tail")
        .gateway("expose_log_tail = true")
        .model(broken_model())
        .model(
            Model::new("cut")
                .gpus(&[1])
                .args(&["--ready-log-line", &long_line])
                .env("HF_TOKEN", ENV_TOKEN),
        )
        .start()
        .await;
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("broken", false, 2))
        .await;
    assert_eq!(s, 503, "{t}{}", stack.logs());
    let error = &testkit::json(&t)["error"];
    assert!(
        error["message"].as_str().unwrap().contains("out of memory"),
        "{t}"
    );
    let tail: Vec<&str> = error["log_tail"]
        .as_array()
        .expect("the tail, as asked")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(tail.iter().any(|l| l.contains("--api-key ***")), "{tail:?}");
    assert_no_secret("the exposed tail", &t);

    stack.chat_ok("cut", 2).await;
    let endpoint = format!("unix://{}", stack.socket.display());
    let output = testkit::run_ctl(&endpoint, &["logs", "cut"]).await;
    let logs = String::from_utf8_lossy(&output.stdout);
    let cut = logs
        .lines()
        .find(|l| l.starts_with("xxxx"))
        .unwrap_or_else(|| panic!("no long line in {logs}"));
    assert!(cut.contains("x***"), "{}", &cut[cut.len() - 60..]);
    assert!(!cut.contains("xhf_"), "{}", &cut[cut.len() - 60..]);
    assert_no_secret("gpuswapctl logs", &logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_the_queue_timeout_gets_504() {
    let stack = Stack::builder("timeout")
        .gateway("queue_timeout = \"1s\"")
        .model(Model::new("glacial").load_time("20s"))
        .start()
        .await;
    let started = Instant::now();
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("glacial", false, 2))
        .await;
    let error = &testkit::json(&t)["error"];
    assert_eq!(s, 504, "{t}");
    assert_eq!(error["code"], "queue_timeout", "{t}");
    assert!(started.elapsed() >= Duration::from_secs(1));

    let response = stack.post_chat("glacial", true, 2).await;
    assert_eq!(response.status(), 200);
    let text = read_stream(response).await;
    let last = testkit::json(sse_data(&text).last().unwrap());
    assert_eq!(last["error"]["code"], "queue_timeout", "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_client_that_goes_away_leaves_the_queue() {
    let stack = Stack::builder("queued-disconnect")
        .model(Model::new("alpha").tokens_per_second(20))
        .model(Model::new("beta"))
        .start()
        .await;
    // A long answer keeps alpha busy ...
    let long = stack.post_chat("alpha", true, 60).await;
    let long = tokio::spawn(read_stream(long));
    stack.wait_state("alpha", ModelState::Ready).await;
    // ... while a request for beta queues behind it and gives up.
    let impatient = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .json(&Stack::chat("beta", false, 2))
        .timeout(Duration::from_millis(800))
        .send()
        .await;
    assert!(impatient.unwrap_err().is_timeout());
    // Its activation is withdrawn: the supervisor's queue empties, alpha finishes
    // its answer, and beta is never started.
    testkit::wait_for(
        "the supervisor's queue to empty",
        testkit::DEADLINE,
        || async {
            let mut client = stack.client.clone();
            let status = client
                .status(gpuswap::pb::StatusRequest {})
                .await
                .ok()?
                .into_inner();
            status.supervisor?.queue.is_empty().then_some(())
        },
    )
    .await;
    let text = long.await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    stack.chat_ok("alpha", 2).await;
    assert_eq!(stack.starts(), ["alpha"], "{}", stack.logs());
    assert_eq!(stack.status("beta").await.state(), ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_frees_the_model_for_the_next_swap() {
    let stack = Stack::builder("stream-disconnect")
        .model(Model::new("alpha").tokens_per_second(5))
        .model(Model::new("beta"))
        .start()
        .await;
    stack.chat_ok("alpha", 1).await;
    // An answer of 1000 tokens at 5 per second would hold alpha for 200 s.
    let response = stack.post_chat("alpha", true, 1000).await;
    let mut body = response.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data: "));
    drop(body);
    let started = Instant::now();
    stack.chat_ok("beta", 2).await;
    assert!(
        started.elapsed() < Duration::from_secs(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(stack.starts(), ["alpha", "beta"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rides_out_a_supervisor_restart() {
    let mut stack = Stack::builder("supervisor-restart")
        .model(Model::new("alpha").alias("a"))
        .start()
        .await;
    stack.chat_ok("a", 2).await;
    stack.kill_supervisor();
    testkit::wait_for("the gateway to notice", testkit::DEADLINE, || async {
        let health = stack.get_json("/health").await?;
        (health["supervisor"]["connected"] == false).then_some(())
    })
    .await;
    // The list still answers from the last catalog.
    let list = stack
        .get_json("/v1/models")
        .await
        .expect("/v1/models answers");
    assert_eq!(testkit::listed_ids(&list), ["alpha", "a"]);
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("a", false, 2))
        .await;
    assert_eq!(s, 503, "{t}");
    assert_eq!(
        testkit::json(&t)["error"]["code"],
        "supervisor_unavailable",
        "{t}"
    );

    stack.start_supervisor().await;
    testkit::wait_for("the gateway to reconnect", testkit::DEADLINE, || async {
        let health = stack.get_json("/health").await?;
        (health["supervisor"]["connected"] == true).then_some(())
    })
    .await;
    stack.chat_ok("a", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_models_are_released_and_stopped() {
    let stack = Stack::builder("idle")
        .model(Model::new("brief").gpus(&[0]).toml("idle_ttl = \"300ms\""))
        .model(Model::new("lasting").gpus(&[1]))
        .start()
        .await;
    for model in ["brief", "lasting"] {
        stack.chat_ok(model, 2).await;
    }
    // brief has its own idle_ttl; the gateway's default is 0 (never).
    stack.wait_state("brief", ModelState::Stopped).await;
    let lasting = stack.status("lasting").await;
    assert_eq!(lasting.state(), ModelState::Ready);
    assert_eq!(lasting.holders, 1);
    // And it comes back on demand.
    stack.chat_ok("brief", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preloaded_models_are_held_from_the_start() {
    let stack = Stack::builder("preload")
        .gateway("preload = [\"warm\"]")
        .model(Model::new("warm").alias("w"))
        .model(Model::new("cold").gpus(&[1]))
        .start()
        .await;
    let warm = stack.wait_state("warm", ModelState::Ready).await;
    testkit::wait_for("the gateway's hold", testkit::DEADLINE, || async {
        (stack.status("warm").await.holders == 1).then_some(())
    })
    .await;
    assert!(warm.generation > 0);
    assert_eq!(stack.status("cold").await.state(), ModelState::Stopped);
    stack.chat_ok("w", 2).await;
    assert_eq!(stack.starts(), ["warm"]);
}

/// The reasoning text and `gpuswap_progress` of every progress chunk before the answer.
fn progress_chunks(text: &str) -> Vec<Value> {
    sse_data(text)
        .iter()
        .filter(|d| **d != "[DONE]")
        .map(|d| testkit::json(d))
        .filter(|v| v["id"] == "gpuswap-progress")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_own_load_progress_and_past_load_times_reach_the_client() {
    // vLLM-like: one "Loading safetensors checkpoint shards: NN% Completed | n/4" line per shard.
    let stack = Stack::builder("load-progress")
        .model(
            Model::new("sharded")
                .flavor("vllm")
                .load_time("2s")
                .args(&["--shards", "4"]),
        )
        .start()
        .await;
    let text = stack.stream_chat("sharded", 2).await;
    let progress = progress_chunks(&text);
    let percents: Vec<f64> = progress
        .iter()
        .filter_map(|c| c["gpuswap_progress"]["percent"].as_f64())
        .collect();
    assert!(
        percents.iter().any(|p| *p > 0.0 && *p < 100.0),
        "a percentage between 0 and 100 from the backend's lines: {percents:?}\n{text}"
    );
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "the percentage only grows: {percents:?}"
    );
    let said: Vec<&str> = progress
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert!(
        said.iter()
            .any(|s| s.contains("Loading sharded: ") && s.contains("/4 shards)")),
        "the shard count in words: {said:#?}"
    );
    assert!(
        stream_content(&text).starts_with("[served by sharded]"),
        "{text}"
    );

    // Stopped and asked for again: the estimate now comes from the first load too.
    stack
        .client
        .clone()
        .deactivate(gpuswap::pb::DeactivateRequest {
            model: "sharded".into(),
            ..Default::default()
        })
        .await
        .expect("deactivate");
    let text = stack.stream_chat("sharded", 2).await;
    let said: Vec<String> = progress_chunks(&text)
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .map(str::to_owned)
        .collect();
    assert!(
        said.iter()
            .any(|s| s.contains("s left") && s.contains("last loads took")),
        "an estimate from the last load: {said:#?}"
    );
}
