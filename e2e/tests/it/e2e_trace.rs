//! One chat request is one trace across both daemons: a client's `traceparent` reaches the
//! gateway's spans, the gateway carries it on Activate, and the supervisor's activation and
//! the phases of the swap it causes join the same trace. Real supervisor, gateway and mock
//! backends; spans go to an in-process OTLP receiver.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use gpuswap::{ClientOptions, Endpoint, pb};
use gpuswap_telemetry::testing::{OtlpReceiver, ReceivedSpan};
use serde_json::{Value, json};
use testkit::{DEADLINE, Proc};

const TRACE_ID: &str = "5b8aa5a2d2c872e8321cf37308d69df2";
const CLIENT_SPAN_ID: &str = "051581bf3cb55c13";

const GATEWAY: &str = "gpuswap-gateway";
const SUPERVISOR: &str = "gpuswap-supervisor";

/// A mock vLLM on GPU 0 (so the two models of this test swap), loading in 300 ms.
fn model_table(name: &str, port: u16) -> String {
    let command = [
        testkit::bin("gpuswap-mock-backend").display().to_string(),
        "--flavor".into(),
        "vllm".into(),
        "--port".into(),
        port.to_string(),
        "--model".into(),
        name.into(),
        "--load-time".into(),
        "300ms".into(),
        "--tokens-per-second".into(),
        "0".into(),
    ];
    let command: Vec<String> = command.iter().map(|arg| format!("{arg:?}")).collect();
    format!(
        "\n[models.{name}]\nkind = \"vllm\"\ncommand = [{}]\nport = {port}\ngpus = [0]\n\
         startup_timeout = \"30s\"\nstop_timeout = \"10s\"\n",
        command.join(", ")
    )
}

/// A daemon exporting its spans to `collector` at once (not every 5 s), logging to `log`.
fn daemon(binary: &str, args: &[&str], collector: &str, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    let mut command = Command::new(testkit::bin(binary));
    command
        .args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(command)
}

struct Logs(Vec<PathBuf>);

impl std::fmt::Display for Logs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for path in &self.0 {
            writeln!(
                f,
                "\n--- {} ---\n{}",
                path.display(),
                testkit::read_lossy(path)
            )?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_request_is_one_trace_across_gateway_and_supervisor() {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    let dir = testkit::short_tempdir();
    let socket = dir.path().join("s.sock");
    let gateway_port = testkit::free_port();
    let mut config = format!(
        "[supervisor]\nlisten = \"unix://{}\"\nstate_file = \"{}\"\nmin_residency = \"0s\"\n\
         drain_timeout = \"60s\"\n\n[gateway]\nsupervisor = \"unix://{}\"\n",
        socket.display(),
        dir.path().join("state.json").display(),
        socket.display()
    );
    config.push_str(&model_table("alpha", testkit::free_port()));
    config.push_str(&model_table("beta", testkit::free_port()));
    let config_path = dir.path().join("gpuswap.toml");
    std::fs::write(&config_path, config).expect("write config");
    let config_arg = config_path.to_str().expect("utf-8 path");
    let logs = Logs(vec![
        dir.path().join("supervisor.log"),
        dir.path().join("gateway.log"),
    ]);

    let _supervisor = daemon(
        SUPERVISOR,
        &["--config", config_arg],
        &receiver.endpoint(),
        &logs.0[0],
    );
    let client = gpuswap::connect(&Endpoint::Unix(socket.clone()), &ClientOptions::default())
        .expect("client");
    testkit::wait_for("the supervisor to answer", DEADLINE, || {
        let mut client = client.clone();
        async move { client.status(pb::StatusRequest {}).await.ok() }
    })
    .await;
    let listen = format!("127.0.0.1:{gateway_port}");
    let _gateway = daemon(
        GATEWAY,
        &["--config", config_arg, "--listen", &listen],
        &receiver.endpoint(),
        &logs.0[1],
    );
    let http = testkit::http::client();
    let url = |path: &str| format!("http://{listen}{path}");
    testkit::http::wait_gateway_connected(&url("/health")).await;

    let chat = |model: &str| {
        json!({
            "model": model,
            "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}],
        })
    };
    // alpha runs first, outside the traced request.
    let response = http
        .post(url("/v1/chat/completions"))
        .json(&chat("alpha"))
        .send()
        .await
        .expect("alpha's request");
    assert_eq!(response.status(), 200, "{logs}");

    // beta must be started, and alpha swapped out for it: inside the client's trace.
    let response = http
        .post(url("/v1/chat/completions"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"))
        .json(&chat("beta"))
        .send()
        .await
        .expect("beta's request");
    assert_eq!(response.status(), 200, "{logs}");
    let body: Value = response.json().await.expect("JSON answer");
    assert_eq!(body["model"], "beta", "{body}");

    let in_trace = |service: &'static str, name: &'static str| {
        move |span: &ReceivedSpan| {
            span.service_name == service && span.name == name && span.trace_id == TRACE_ID
        }
    };

    // The gateway continues the client's trace...
    let request = span_where(&receiver, &logs, in_trace(GATEWAY, "request")).await;
    assert_eq!(request.parent_span_id, CLIENT_SPAN_ID, "{request:?}");
    // ...and so does the supervisor, under a span of the gateway.
    let activate = span_where(&receiver, &logs, in_trace(SUPERVISOR, "activate")).await;
    assert_eq!(activate.attribute("model"), Some("beta"), "{activate:?}");
    let caller = span_where(&receiver, &logs, |span| {
        span.span_id == activate.parent_span_id
    })
    .await;
    assert_eq!(caller.service_name, GATEWAY, "{caller:?}");
    assert_eq!(caller.trace_id, TRACE_ID, "{caller:?}");

    // The swap's phases are children of the supervisor's activation.
    for (phase, model) in [
        ("drain", "alpha"),
        ("stop", "alpha"),
        ("start", "beta"),
        ("ready", "beta"),
    ] {
        let span = span_where(&receiver, &logs, |span| {
            in_trace(SUPERVISOR, "swap")(span) && span.attribute("phase") == Some(phase)
        })
        .await;
        assert_eq!(span.parent_span_id, activate.span_id, "{phase}: {span:?}");
        assert_eq!(span.attribute("model"), Some(model), "{phase}: {span:?}");
    }
}

/// The first span received that `matches` (waiting for it); the daemons' logs otherwise.
async fn span_where(
    receiver: &OtlpReceiver,
    logs: &Logs,
    matches: impl Fn(&ReceivedSpan) -> bool,
) -> ReceivedSpan {
    receiver
        .wait_for_span(DEADLINE, matches)
        .await
        .unwrap_or_else(|e| panic!("{e}{logs}"))
}
