//! Each flavor's start-up sequence, as the real servers behave: refused while
//! loading (llama-server: 503), warm-up where it exists, then ready.

use crate::common::{Mock, Reply, get, http, probe};

/// Long enough that a phase cannot end while the test looks at it.
const FOREVER: &str = "600s";

/// The mock's answer to a small non-streamed chat request for its model.
async fn small_chat(mock: &Mock) -> Reply {
    mock.chat(false, 2).await
}

#[tokio::test]
async fn sglang_refuses_connections_while_loading_weights() {
    let mock = Mock::start("sglang", &["--load-time", FOREVER]);
    mock.wait_log("Load weight begin").await;
    assert_eq!(
        mock.probe("/health").await,
        None,
        "port must not listen while loading"
    );
    mock.wait_log("Scheduler process started").await;
}

#[tokio::test]
async fn sglang_warm_up_answers_models_but_health_503() {
    let mock = Mock::start("sglang", &["--load-time", "50ms", "--warmup", FOREVER]);
    mock.wait_listening().await;
    assert_eq!(mock.probe("/health").await, Some(503));
    let models = get(mock.port, "/v1/models").await;
    assert_eq!(models.status, 200, "{}", models.text);
    assert_eq!(models.json()["data"][0]["id"], mock.model.as_str());
    let chat = small_chat(&mock).await;
    assert_eq!(chat.status, 503);
    assert_eq!(
        chat.json()["object"],
        "error",
        "sglang errors are flat: {}",
        chat.text
    );
    assert!(!mock.has_log("fired up"));
}

#[tokio::test]
async fn sglang_becomes_ready_after_warm_up_with_its_log_line() {
    let mock = Mock::start("sglang", &["--load-time", "100ms", "--warmup", "100ms"]);
    mock.wait_log("The server is fired up and ready to roll!")
        .await;
    // The ready line is printed only once the server really is ready.
    assert_eq!(mock.probe("/health").await, Some(200));
    let order: Vec<_> = ["Load weight end", "Uvicorn running on", "fired up"]
        .iter()
        .map(|needle| {
            mock.log_position(needle)
                .unwrap_or_else(|| panic!("no {needle:?} in\n{}", mock.logs()))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "log order {order:?}:\n{}",
        mock.logs()
    );
}

#[tokio::test]
async fn vllm_refuses_while_loading_then_reports_startup_complete() {
    let loading = Mock::start("vllm", &["--load-time", FOREVER]);
    loading.wait_log("Starting to load model").await;
    assert_eq!(loading.probe("/health").await, None);

    let mock = Mock::start("vllm", &["--load-time", "100ms"]);
    mock.wait_log("Application startup complete.").await;
    assert_eq!(mock.probe("/health").await, Some(200));
    assert!(mock.has_log("Started server process"));
}

#[tokio::test]
async fn llama_server_listens_while_loading_with_503_loading_model() {
    let mock = Mock::start("llama-server", &["--load-time", FOREVER]);
    mock.wait_log("main: loading model").await;
    let health = get(mock.port, "/health").await;
    assert_eq!(health.status, 503);
    let body = health.json();
    assert_eq!(body["error"]["message"], "Loading model", "{body}");
    assert_eq!(body["error"]["code"], 503);
    assert_eq!(body["error"]["type"], "unavailable_error");
    let chat = small_chat(&mock).await;
    assert_eq!(chat.status, 503);
}

#[tokio::test]
async fn llama_server_health_ok_once_loaded() {
    let mock = Mock::start("llama-server", &["--load-time", "100ms"]);
    mock.wait_log("llama_server: listening on http://127.0.0.1:")
        .await;
    let health = get(mock.port, "/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), serde_json::json!({"status": "ok"}));
    assert!(mock.has_log("main: model loaded"));
}

#[tokio::test]
async fn tabbyapi_refuses_while_loading() {
    let mock = Mock::start("tabbyapi", &["--load-time", FOREVER]);
    mock.wait_log("Loading model").await;
    assert_eq!(mock.probe("/health").await, None);
}

#[tokio::test]
async fn tabbyapi_model_probe_needs_the_key_and_names_the_model() {
    let mock = Mock::start("tabbyapi", &["--load-time", "100ms", "--api-key", "sekret"]);
    mock.wait_log("Uvicorn running on").await;
    let health = get(mock.port, "/health").await;
    assert_eq!(health.status, 200, "/health needs no key");
    let keyless = get(mock.port, "/v1/model").await;
    assert_eq!(keyless.status, 401);
    assert!(
        keyless.json()["detail"].is_string(),
        "FastAPI error: {}",
        keyless.text
    );
    let wrong = http(
        mock.port,
        "GET",
        "/v1/model",
        &[("x-api-key", "nope")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(wrong.status, 401);
    for header in [("x-api-key", "sekret"), ("Authorization", "Bearer sekret")] {
        let model = http(mock.port, "GET", "/v1/model", &[header], None)
            .await
            .unwrap();
        assert_eq!(model.status, 200, "{header:?}: {}", model.text);
        assert_eq!(model.json()["id"], mock.model.as_str());
    }
}

#[tokio::test]
async fn tabbyapi_health_is_200_before_the_model_is_loaded() {
    let mock = Mock::start("tabbyapi", &["--load-time", "50ms", "--warmup", FOREVER]);
    mock.wait_log("Uvicorn running on").await;
    assert_eq!(mock.probe("/health").await, Some(200));
    assert_eq!(
        mock.probe("/v1/model").await,
        Some(503),
        "no model loaded yet"
    );
}

#[tokio::test]
async fn tabbyapi_moves_to_the_next_port_when_its_port_is_busy() {
    // Find a port whose successor is free too; hold the first one.
    let (busy, port) = loop {
        let port = testkit::free_port();
        if let Ok(next) = std::net::TcpListener::bind(("127.0.0.1", port + 1)) {
            drop(next);
            break (
                std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(),
                port,
            );
        }
    };
    let mock = Mock::start_on("tabbyapi", port, &["--load-time", "50ms"]);
    mock.wait_log("Uvicorn running on").await;
    assert!(
        mock.has_log(&format!("Switching to {}", port + 1)),
        "{}",
        mock.logs()
    );
    assert_eq!(probe(port + 1, "/health").await, Some(200));
    drop(busy);
}

#[tokio::test]
async fn vllm_exits_when_its_port_is_busy() {
    let port = testkit::free_port();
    let _busy = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut mock = Mock::start_on("vllm", port, &["--load-time", "10ms"]);
    let status = mock.wait_exit();
    assert_eq!(status.code(), Some(1));
}

#[tokio::test]
async fn ready_log_line_is_printed_when_ready() {
    let mock = Mock::start(
        "vllm",
        &["--load-time", "50ms", "--ready-log-line", "MOCK READY NOW"],
    );
    mock.wait_log("MOCK READY NOW").await;
    assert_eq!(mock.probe("/health").await, Some(200));
}
