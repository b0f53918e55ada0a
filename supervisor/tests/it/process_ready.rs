//! Readiness per backend kind, against a tiny HTTP server that plays each kind's sequence.

use std::time::Duration;

use crate::process_support::{assert_logged, http_server, logs, model, python3, spec};
use gpuswap_supervisor::backend::{Backend, StartError, logs::LogBuffer};
use serde_json::json;
use testkit::{DEADLINE, free_port, short_tempdir};

/// Spawns the server for `kind`, waits for readiness and for the server's logged 200 on
/// `path`; returns the backend, its log and the statuses the server answered on `path`.
async fn probed(
    kind: &str,
    path: &str,
    key: &str,
    phases: &[&str],
    extra: serde_json::Value,
) -> (Backend, LogBuffer, Vec<u16>) {
    let dir = short_tempdir();
    let port = free_port();
    let command = http_server(dir.path(), port, path, key, phases);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let logs = logs(kind);
    let backend = Backend::spawn(
        &spec(kind, model(kind, &command, port, extra)),
        logs.clone(),
    )
    .expect("spawn");
    let result = tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns");
    if let Err(e) = result {
        panic!("{kind} not ready: {e}; log: {:?}", logs.tail_lines(30));
    }
    wait_logged_200(&logs, path).await;
    let codes = answered(&logs, path);
    (backend, logs, codes)
}

/// Waits until the server logged its answer 200 on `path` (the log reader may trail the
/// probe that saw it).
async fn wait_logged_200(logs: &LogBuffer, path: &str) {
    testkit::wait_for("the logged 200", DEADLINE, || async {
        answered(logs, path).contains(&200).then_some(())
    })
    .await;
}

/// The statuses the server answered on `path`, in order.
fn answered(logs: &LogBuffer, path: &str) -> Vec<u16> {
    logs.tail_lines(usize::MAX)
        .iter()
        .filter_map(|l| l.strip_prefix(&format!("probe {path} ")))
        .filter_map(|code| code.trim().parse().ok())
        .collect()
}

#[tokio::test]
async fn sglang_is_ready_after_refused_then_503_then_200() {
    let (backend, logs, codes) = probed(
        "sglang",
        "/health",
        "-",
        &["refuse=0.3", "503*3", "200"],
        json!({}),
    )
    .await;
    assert_logged(&logs, "loading");
    assert!(codes.contains(&503), "probed while warming: {codes:?}");
    assert_eq!(codes.last(), Some(&200), "ready only on 200: {codes:?}");
    backend.stop().await;
}

#[tokio::test]
async fn vllm_is_ready_after_refused_then_200() {
    let (backend, _, codes) =
        probed("vllm", "/health", "-", &["refuse=0.3", "200"], json!({})).await;
    assert_eq!(codes, [200], "the first answer is the ready one");
    backend.stop().await;
}

#[tokio::test]
async fn llama_server_is_ready_after_503_then_200() {
    let (backend, _, codes) =
        probed("llama-server", "/health", "-", &["503*3", "200"], json!({})).await;
    assert!(codes.contains(&503), "probed while loading: {codes:?}");
    assert_eq!(codes.last(), Some(&200), "{codes:?}");
    backend.stop().await;
}

#[tokio::test]
async fn tabbyapi_is_probed_on_v1_model_with_its_key() {
    let (backend, _, codes) = probed(
        "tabbyapi",
        "/v1/model",
        "sekrit",
        &["refuse=0.3", "503*3", "200"],
        json!({ "api_key": "sekrit" }),
    )
    .await;
    assert!(
        !codes.contains(&401),
        "the probe carries the key: {codes:?}"
    );
    assert_eq!(codes.last(), Some(&200), "{codes:?}");
    backend.stop().await;
}

#[tokio::test]
async fn openai_uses_its_health_path() {
    let (backend, _, codes) = probed(
        "openai",
        "/ping",
        "-",
        &["503*3", "200"],
        json!({ "health_path": "/ping" }),
    )
    .await;
    assert_eq!(codes.last(), Some(&200));
    backend.stop().await;
}

#[tokio::test]
async fn a_ready_log_line_proves_readiness() {
    let port = free_port();
    let command = [
        "sh",
        "-c",
        "echo 'loading weights'; echo 'The server is fired up and ready to roll!'; exec sleep 1000",
    ];
    let config = model(
        "sglang",
        &command,
        port,
        json!({ "ready_log": "fired up and ready to roll" }),
    );
    let backend = Backend::spawn(&spec("ready-log", config), logs("ready-log")).expect("spawn");
    tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns")
        .expect("ready from the log line, with nothing listening");
    backend.stop().await;
}

#[tokio::test]
async fn an_exit_while_loading_fails_at_once() {
    let config = model(
        "vllm",
        &["sh", "-c", "echo 'CUDA out of memory' >&2; exit 3"],
        free_port(),
        json!({}),
    );
    let logs = logs("crash");
    let backend = Backend::spawn(&spec("crash", config), logs.clone()).expect("spawn");
    let error = tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns")
        .expect_err("not ready");
    match error {
        StartError::Exited(info) => assert_eq!(info.code, Some(3), "{info}"),
        e => panic!("unexpected error: {e}"),
    }
    // The failure report has the last words.
    assert_logged(&logs, "CUDA out of memory");
}

#[tokio::test]
async fn a_backend_that_never_listens_times_out_and_says_so() {
    let port = free_port();
    // Like TabbyAPI finding its port busy: it serves on port+1 instead.
    let moved = std::net::TcpListener::bind(("127.0.0.1", port + 1));
    let config = model(
        "tabbyapi",
        &["sleep", "1000"],
        port,
        json!({ "startup_timeout": "1s" }),
    );
    let logs = logs("never");
    let backend = Backend::spawn(&spec("never", config), logs.clone()).expect("spawn");
    let error = tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns")
        .expect_err("never ready");
    match &error {
        StartError::NotListening {
            port: p,
            timeout,
            hint,
        } => {
            assert_eq!((*p, *timeout), (port, Duration::from_secs(1)));
            if moved.is_ok() {
                assert!(hint.contains(&format!("port {}", port + 1)), "{hint}");
            }
        }
        e => panic!("unexpected error: {e}"),
    }
    assert!(
        error.to_string().contains("nothing ever listened"),
        "{error}"
    );
    assert_logged(&logs, "nothing ever listened");
    backend.stop().await;
}

#[tokio::test]
async fn a_backend_stuck_warming_times_out() {
    let dir = short_tempdir();
    let port = free_port();
    let command = http_server(dir.path(), port, "/health", "-", &["503"]);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let config = model("sglang", &command, port, json!({ "startup_timeout": "2s" }));
    let logs = logs("stuck");
    let backend = Backend::spawn(&spec("stuck", config), logs.clone()).expect("spawn");
    let error = tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns")
        .expect_err("never ready");
    // Python may take most of the 2 s to start on a loaded machine: then it never listened.
    assert!(
        matches!(
            error,
            StartError::Timeout(_) | StartError::NotListening { .. }
        ),
        "{error}"
    );
    if matches!(error, StartError::Timeout(_)) {
        assert_logged(&logs, "answered HTTP 503");
    }
    backend.stop().await;
    let _ = python3();
}

/// A server that answers every connection with `200 OK`, on a thread of this test process.
fn foreign_server(port: u16) -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("take the port");
    let serving = listener.try_clone().expect("clone the listener");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in serving.incoming().flatten() {
            let _ = stream.read(&mut [0u8; 1024]);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        }
    });
    listener
}

#[tokio::test]
async fn a_200_from_another_process_on_the_port_is_not_readiness() {
    let port = free_port();
    // Loads forever without listening, like SGLang loading its weights.
    let config = model("vllm", &["sleep", "1000"], port, json!({}));
    let logs = logs("taken");
    let backend = Backend::spawn(&spec("taken", config), logs.clone()).expect("spawn");
    // The port was free when the model started; another server takes it while it loads.
    let _foreign = foreign_server(port);
    let error = tokio::time::timeout(DEADLINE, backend.wait_ready())
        .await
        .expect("wait_ready returns")
        .expect_err("a stranger's 200 is not the model's readiness");
    match &error {
        StartError::PortTaken { port: p, holder } => {
            assert_eq!(*p, port);
            assert!(
                holder.contains(&format!("pid {}", std::process::id())),
                "names the holder: {holder}"
            );
        }
        e => panic!("unexpected error: {e}"),
    }
    assert_logged(&logs, "not by the model's processes");
    backend.stop().await;
}
