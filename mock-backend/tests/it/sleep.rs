//! Sleep and wake over the real binary: each server's protocol, what it does with requests
//! while asleep, the "GPU memory" it reports, and the sleep faults.

use std::time::Duration;

use crate::common::{Mock, Reply, chat_request, chat_stream_tokens, get, http, post};
use serde_json::{Value, json};
use testkit::DEADLINE;

const GIB: u64 = 1 << 30;

/// `--gpu-memory 8G`: weights 4 GiB, KV cache 4 GiB.
const MEMORY: &[&str] = &["--gpu-memory", "8G"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["--load-time", "200ms", "--wake-time", "100ms"];
    all.extend_from_slice(MEMORY);
    all.extend_from_slice(extra);
    all
}

async fn ready(mock: &Mock, path: &str, headers: &[(&str, &str)]) {
    testkit::wait_for("the mock to be ready", DEADLINE, || async {
        http(mock.port, "GET", path, headers, None)
            .await
            .ok()
            .filter(|reply| reply.status == 200)
    })
    .await;
}

async fn memory(port: u16) -> Value {
    get(port, "/gpuswap_mock/memory").await.json()
}

/// `POST path` with an empty JSON object, as the sleep and wake routes take it.
async fn control(port: u16, path: &str) -> Reply {
    post(port, path, &json!({})).await
}

/// What vLLM's `/is_sleeping` says.
async fn is_sleeping(port: u16) -> Value {
    get(port, "/is_sleeping").await.json()["is_sleeping"].clone()
}

async fn send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let body = body.map(Value::to_string);
    http(port, method, path, headers, body.as_deref())
        .await
        .expect("request")
}

async fn chat(mock: &Mock, headers: &[(&str, &str)]) -> Reply {
    let body = chat_request(&mock.model, false, 3);
    send(
        mock.port,
        "POST",
        "/v1/chat/completions",
        headers,
        Some(&body),
    )
    .await
}

fn vllm(extra: &[&str]) -> Mock {
    Mock::start_with_env("vllm", &args(extra), &[("VLLM_SERVER_DEV_MODE", "1")])
}

#[tokio::test]
async fn vllm_level_one_frees_the_gpu_keeps_the_weights_in_ram_and_holds_chats_until_woken() {
    let dir = testkit::short_tempdir();
    let report = dir.path().join("gpu.json");
    let report_arg = report.to_string_lossy().into_owned();
    let mock = vllm(&["--enable-sleep-mode", "--gpu-memory-file", &report_arg]);
    ready(&mock, "/health", &[]).await;
    assert_eq!(memory(mock.port).await["gpu_memory_bytes"], 8 * GIB);
    assert_eq!(
        get(mock.port, "/is_sleeping").await.json(),
        json!({"is_sleeping": false})
    );

    // The answers' bodies are vLLM 0.32's.
    assert_eq!(
        control(mock.port, "/sleep?level=1").await.json(),
        json!({"status": "sleeping", "level": 1})
    );
    assert_eq!(
        get(mock.port, "/is_sleeping").await.json(),
        json!({"is_sleeping": true})
    );
    let asleep = memory(mock.port).await;
    assert_eq!(
        (
            asleep["gpu_memory_bytes"].as_u64(),
            asleep["host_memory_bytes"].as_u64()
        ),
        (Some(0), Some(4 * GIB))
    );
    // Still healthy, as vLLM is while it sleeps.
    assert_eq!(mock.probe("/health").await, Some(200));
    mock.wait_log("Sleep mode freed 8.00 GiB memory").await;

    // A chat sent now is held, not refused: it answers once the model is woken.
    let pending = tokio::spawn({
        let (port, body) = (mock.port, chat_request(&mock.model, false, 3));
        async move { post(port, "/v1/chat/completions", &body).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a chat to a sleeping vLLM is held until the wake"
    );
    assert_eq!(control(mock.port, "/wake_up").await.status, 200);
    let reply = tokio::time::timeout(DEADLINE, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.text.contains("[served by mock-vllm-model]"));
    let after = memory(mock.port).await;
    assert_eq!(after["gpu_memory_bytes"], 8 * GIB);
    assert_eq!(
        (
            after["requests_while_asleep"].as_u64(),
            after["sleeps_while_busy"].as_u64()
        ),
        (Some(1), Some(0))
    );
    let written = testkit::json(&std::fs::read_to_string(&report).unwrap());
    assert_eq!(written, after, "the file says what the endpoint says");
    mock.wait_log("wake up the engine with tags: None").await;
}

#[tokio::test]
async fn vllm_level_two_needs_its_weights_reloaded_before_the_kv_cache_wakes() {
    let mock = vllm(&["--enable-sleep-mode"]);
    ready(&mock, "/health", &[]).await;
    assert_eq!(control(mock.port, "/sleep?level=2").await.status, 200);
    let asleep = memory(mock.port).await;
    assert_eq!(
        (
            asleep["gpu_memory_bytes"].as_u64(),
            asleep["host_memory_bytes"].as_u64()
        ),
        (Some(0), Some(0))
    );
    // Reloading into memory that still sleeps fails; the documented order works.
    let rpc = json!({"method": "reload_weights"});
    assert_eq!(post(mock.port, "/collective_rpc", &rpc).await.status, 500);
    assert_eq!(
        control(mock.port, "/wake_up?tags=weights").await.json(),
        json!({"status": "sleeping", "tags": ["weights"]}),
        "vLLM 0.32 answers the state after the wake"
    );
    assert_eq!(is_sleeping(mock.port).await, true);
    let reloaded = post(mock.port, "/collective_rpc", &rpc).await;
    assert_eq!(reloaded.json(), json!({"results": [null]}));
    assert_eq!(
        control(mock.port, "/wake_up?tags=kv_cache").await.status,
        200
    );
    assert_eq!(is_sleeping(mock.port).await, false);
    assert_eq!(chat(&mock, &[]).await.status, 200);

    // Woken without the reload: the weights are gone, and the mock says so.
    control(mock.port, "/sleep?level=2").await;
    control(mock.port, "/wake_up").await;
    let reply = chat(&mock, &[]).await;
    assert_eq!(reply.status, 500);
    assert!(reply.text.contains("reload_weights"), "{}", reply.text);
    let missing = control(mock.port, "/collective_rpc").await;
    assert_eq!(
        (missing.status, missing.json()["error"]["message"].as_str()),
        (400, Some("Missing 'method' in request body"))
    );
}

#[tokio::test]
async fn vllm_without_dev_mode_has_no_sleep_routes_and_without_sleep_mode_frees_nothing() {
    let plain = Mock::start("vllm", &args(&["--enable-sleep-mode"]));
    ready(&plain, "/health", &[]).await;
    assert_eq!(control(plain.port, "/sleep").await.status, 404);
    assert_eq!(plain.probe("/is_sleeping").await, Some(404));
    // As vLLM on CPU: the routes answer, it says it sleeps, and nothing is freed.
    let cpu = vllm(&[]);
    ready(&cpu, "/health", &[]).await;
    assert_eq!(control(cpu.port, "/sleep?level=1").await.status, 200);
    assert_eq!(is_sleeping(cpu.port).await, true);
    assert_eq!(memory(cpu.port).await["gpu_memory_bytes"], 8 * GIB);
}

#[tokio::test]
async fn sleep_faults_fail_the_sleep_the_wake_or_the_release() {
    let fails = vllm(&["--enable-sleep-mode", "--fault", "sleep-fails"]);
    let wake_fails = vllm(&["--enable-sleep-mode", "--fault", "wake-fails"]);
    let keeps = vllm(&["--enable-sleep-mode", "--fault", "sleep-keeps-memory"]);
    for mock in [&fails, &wake_fails, &keeps] {
        ready(mock, "/health", &[]).await;
    }
    assert_eq!(control(fails.port, "/sleep").await.status, 500);
    assert_eq!(is_sleeping(fails.port).await, false);
    assert_eq!(chat(&fails, &[]).await.status, 200);

    assert_eq!(control(wake_fails.port, "/sleep").await.status, 200);
    assert_eq!(control(wake_fails.port, "/wake_up").await.status, 500);
    assert_eq!(is_sleeping(wake_fails.port).await, true);

    assert_eq!(control(keeps.port, "/sleep").await.status, 200);
    assert_eq!(is_sleeping(keeps.port).await, true);
    assert_eq!(memory(keeps.port).await["gpu_memory_bytes"], 8 * GIB);
}

#[tokio::test]
async fn sglang_refuses_to_release_while_serving_and_reloads_weights_it_did_not_back_up() {
    let mock = Mock::start(
        "sglang",
        &args(&[
            "--enable-memory-saver",
            "--warmup",
            "0s",
            "--tokens-per-second",
            "5",
        ]),
    );
    ready(&mock, "/health", &[]).await;
    // A stream of 10 tokens at 5 a second is in flight for two seconds.
    let streaming = tokio::spawn({
        let (port, body) = (mock.port, chat_request(&mock.model, true, 10));
        async move { post(port, "/v1/chat/completions", &body).await }
    });
    let refused = testkit::wait_for(
        "a release refused while a request runs",
        DEADLINE,
        || async {
            let reply = control(mock.port, "/release_memory_occupation").await;
            (reply.status == 400).then_some(reply)
        },
    )
    .await;
    assert_eq!(
        refused.json()["message"],
        "release_memory_occupation should be called only when server is idle."
    );
    assert_eq!(streaming.await.unwrap().status, 200);
    assert!(memory(mock.port).await["sleeps_while_busy"].as_u64() >= Some(1));

    let released = control(mock.port, "/release_memory_occupation").await;
    assert_eq!(
        released.json(),
        json!({"success": true, "message": "Success"})
    );
    assert_eq!(memory(mock.port).await["gpu_memory_bytes"], 0);
    assert_eq!(
        chat(&mock, &[]).await.status,
        500,
        "SGLang does not guard requests while released"
    );
    assert_eq!(
        control(mock.port, "/resume_memory_occupation").await.status,
        200
    );
    assert_eq!(
        chat(&mock, &[]).await.status,
        500,
        "without a CPU backup the weights are gone"
    );
    let update = post(
        mock.port,
        "/update_weights_from_disk",
        &json!({"model_path": "/models/m"}),
    )
    .await;
    assert_eq!(update.json()["success"], true);
    assert_eq!(chat(&mock, &[]).await.status, 200);

    let backed_up = Mock::start(
        "sglang",
        &args(&[
            "--enable-memory-saver",
            "--enable-weights-cpu-backup",
            "--warmup",
            "0s",
        ]),
    );
    ready(&backed_up, "/health", &[]).await;
    control(backed_up.port, "/release_memory_occupation").await;
    assert_eq!(memory(backed_up.port).await["host_memory_bytes"], 4 * GIB);
    control(backed_up.port, "/resume_memory_occupation").await;
    assert_eq!(chat(&backed_up, &[]).await.status, 200);
}

#[tokio::test]
async fn tabbyapi_unloads_and_loads_its_model_with_the_admin_key_streaming_module_events() {
    let mock = Mock::start(
        "tabbyapi",
        &args(&[
            "--api-key",
            "user-key",
            "--admin-key",
            "admin-key",
            "--shards",
            "3",
        ]),
    );
    let user = [("authorization", "Bearer user-key")];
    let admin = [("x-admin-key", "admin-key")];
    ready(&mock, "/v1/model", &user).await;
    assert_eq!(
        send(mock.port, "POST", "/v1/model/unload", &user, None)
            .await
            .status,
        401
    );
    assert_eq!(
        send(mock.port, "POST", "/v1/model/unload", &admin, None)
            .await
            .status,
        200
    );
    assert_eq!(
        send(mock.port, "GET", "/v1/model", &user, None)
            .await
            .status,
        503
    );
    let refused = chat(&mock, &user).await;
    assert_eq!(
        (refused.status, refused.json()["detail"].as_str()),
        (503, Some("No models are currently loaded."))
    );
    assert_eq!(memory(mock.port).await["gpu_memory_bytes"], 0);

    let wrong = send(
        mock.port,
        "POST",
        "/v1/model/load",
        &admin,
        Some(&json!({"name": "other"})),
    )
    .await;
    assert_eq!(wrong.status, 400);
    // The admin key passes as a bearer token too.
    let bearer = [("authorization", "Bearer admin-key")];
    let load = send(
        mock.port,
        "POST",
        "/v1/model/load",
        &bearer,
        Some(&json!({"name": mock.model})),
    )
    .await;
    assert_eq!(load.status, 200);
    assert!(
        load.text.contains("\r\n\r\n"),
        "sse_starlette's CRLF framing"
    );
    let events: Vec<(u64, String)> = load
        .sse_chunks()
        .iter()
        .map(|e| {
            (
                e["module"].as_u64().unwrap(),
                e["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: Vec<(u64, String)> = [
        (1, "processing"),
        (2, "processing"),
        (3, "processing"),
        (3, "finished"),
    ]
    .into_iter()
    .map(|(m, s)| (m, s.to_owned()))
    .collect();
    assert_eq!(events, expected);
    assert_eq!(
        send(mock.port, "GET", "/v1/model", &user, None)
            .await
            .status,
        200
    );
    assert_eq!(
        chat(&mock, &admin).await.status,
        401,
        "x-admin-key alone is not an API key"
    );
    assert_eq!(
        chat(&mock, &bearer).await.status,
        200,
        "the admin key passes as an API key"
    );
}

#[tokio::test]
async fn a_failed_tabbyapi_load_is_an_error_event_in_a_200_stream() {
    let mock = Mock::start("tabbyapi", &args(&["--fault", "wake-fails"]));
    ready(&mock, "/v1/model", &[]).await;
    assert_eq!(
        send(mock.port, "POST", "/v1/model/unload", &[], None)
            .await
            .status,
        200
    );
    let load = send(
        mock.port,
        "POST",
        "/v1/model/load",
        &[],
        Some(&json!({"name": mock.model})),
    )
    .await;
    assert_eq!(load.status, 200);
    let events = load.sse_chunks();
    assert!(
        events.last().unwrap()["error"]["message"].is_string(),
        "{events:?}"
    );
    assert_eq!(mock.probe("/v1/model").await, Some(503));
}

#[tokio::test]
async fn llama_server_sleeps_when_idle_stays_healthy_and_the_next_request_reloads_it() {
    let file = testkit::short_tempdir();
    let report = file.path().join("gpu.json");
    let report_arg = report.to_string_lossy().into_owned();
    let mock = Mock::start(
        "llama-server",
        &args(&[
            "--sleep-idle-seconds",
            "1",
            "--gpu-memory-file",
            &report_arg,
        ]),
    );
    ready(&mock, "/health", &[]).await;
    assert_eq!(get(mock.port, "/props").await.json()["is_sleeping"], false);
    testkit::wait_for("llama-server to fall asleep", DEADLINE, || async {
        (get(mock.port, "/props").await.json()["is_sleeping"] == true).then_some(())
    })
    .await;
    assert_eq!(mock.probe("/health").await, Some(200));
    assert_eq!(memory(mock.port).await["gpu_memory_bytes"], 0);
    let written: Value = testkit::json(&std::fs::read_to_string(&report).unwrap());
    assert_eq!(
        (
            written["gpu_memory_bytes"].as_u64(),
            written["asleep"].as_bool()
        ),
        (Some(0), Some(true))
    );
    assert_eq!(written["pid"], mock.pid());

    // The request waits for the reload (it may fall asleep again a second later).
    let reply = chat(&mock, &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let (left, loaded) = (
        mock.log_position("leaving sleeping state")
            .expect("the wake is logged"),
        mock.log_position("srv  load_model: model loaded")
            .expect("the reload is logged"),
    );
    assert!(left < loaded);
    assert_eq!(
        memory(mock.port).await["requests_while_asleep"],
        0,
        "its own sleep is meant to be woken"
    );
}

/// Waits until `count` completion requests are being answered.
async fn in_flight(mock: &Mock, count: u64) {
    testkit::wait_for("requests in flight", DEADLINE, || async {
        (memory(mock.port).await["requests_in_flight"] == count).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_vllm_sleep_aborts_requests_in_flight_unless_told_to_wait() {
    let mock = vllm(&["--enable-sleep-mode", "--tokens-per-second", "10"]);
    ready(&mock, "/health", &[]).await;
    let start = |stream: bool| {
        let (port, body) = (mock.port, chat_request(&mock.model, stream, 40));
        tokio::spawn(async move { post(port, "/v1/chat/completions", &body).await })
    };
    let (streamed, whole) = (start(true), start(false));
    in_flight(&mock, 2).await;
    // The default mode=abort: both end at once, cut short, as vLLM 0.32 answered them.
    assert_eq!(control(mock.port, "/sleep").await.status, 200);
    let streamed = streamed.await.unwrap();
    let chunks = streamed.sse_chunks();
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "abort"
    );
    assert_eq!(
        streamed.sse_data().last().map(String::as_str),
        Some("[DONE]")
    );
    assert!(chat_stream_tokens(&chunks).len() < 40, "cut short");
    let whole = whole.await.unwrap().json();
    assert_eq!(whole["choices"][0]["finish_reason"], "abort");
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() < 40);
    assert_eq!(memory(mock.port).await["sleeps_while_busy"], 1);

    // mode=wait: the sleep answers once the request has finished whole.
    control(mock.port, "/wake_up").await;
    let streamed = start(true);
    in_flight(&mock, 1).await;
    assert_eq!(control(mock.port, "/sleep?mode=wait").await.status, 200);
    let chunks = streamed.await.unwrap().sse_chunks();
    assert_eq!(chat_stream_tokens(&chunks).len(), 40);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}
