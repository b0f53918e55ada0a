//! `init` against a real OTLP/gRPC receiver. A process can install its global
//! subscriber once, so each test re-runs this test binary as a child (the
//! role in an environment variable) that calls `init`, and checks the child
//! from outside: what the receiver got, what it printed and logged.

use std::{process::Output, time::Duration};

use gpuswap::config::TelemetryConfig;
use gpuswap_telemetry::testing::OtlpReceiver;
use tokio::process::Command;

/// Which child body to run; unset in the parent.
const ROLE_ENV: &str = "GPUSWAP_TELEMETRY_TEST_ROLE";
/// The remote parent the child's request span continues.
const INCOMING_TRACEPARENT_ENV: &str = "GPUSWAP_TELEMETRY_TEST_TRACEPARENT";

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const REMOTE_SPAN_ID: &str = "00f067aa0ba902b7";
const SERVICE: &str = "gpuswap-telemetry-test";

fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// Runs this test binary again with only `test_name`, in `role`.
async fn run_child(test_name: &str, role: &str, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(std::env::current_exe().expect("current_exe"));
    command
        .arg(testkit::test_name(module_path!(), test_name))
        .args(["--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env_remove("RUST_LOG")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("GPUSWAP_LOG_FORMAT")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::time::timeout(testkit::DEADLINE, command.output())
        .await
        .expect("the child test finished in time")
        .expect("run the child test");
    testkit::assert_success(&output, &format!("child {role}"));
    output
}

/// The value of a `key=value` line the child printed (libtest may have
/// started the line with the test's name).
fn printed(output: &Output, key: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let marker = format!("{key}=");
    stdout
        .lines()
        .find_map(|line| Some(&line[line.find(&marker)? + marker.len()..]))
        .unwrap_or_else(|| panic!("the child printed no {key}=...:\n{stdout}"))
        .to_owned()
}

/// The daemons' pattern: `init` on the main thread with the runtime entered;
/// the guard is dropped there too, before the runtime.
#[test]
fn spans_reach_the_collector_from_a_daemon_style_main() {
    const NAME: &str = "spans_reach_the_collector_from_a_daemon_style_main";
    if role().as_deref() == Some("export") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _entered = runtime.enter();
        return export_child();
    }
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(export_and_check(NAME));
}

/// `init` and the guard's drop inside an async task on a runtime worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_from_a_runtime_worker() {
    const NAME: &str = "spans_reach_the_collector_from_a_runtime_worker";
    if role().as_deref() == Some("export") {
        return export_child();
    }
    export_and_check(NAME).await;
}

/// Runs `test_name` as the exporting child against a receiver and checks its
/// span: service name, remote parent, and the context it injected.
async fn export_and_check(test_name: &str) {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let incoming = format!("00-{TRACE_ID}-{REMOTE_SPAN_ID}-01");
    let output = run_child(
        test_name,
        "export",
        &[
            // The environment variable, not the config, names the collector here.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint()),
            (INCOMING_TRACEPARENT_ENV, &incoming),
        ],
    )
    .await;

    // No waiting: dropping the guard flushed the batch before the child exited
    // (the batch delay alone would hold it for seconds).
    let spans = receiver.spans();
    let span = spans
        .iter()
        .find(|s| s.name == "handle_request")
        .unwrap_or_else(|| panic!("the child's span was not flushed at exit; received {spans:#?}"));
    assert_eq!(span.service_name, SERVICE);
    assert_eq!(
        span.trace_id, TRACE_ID,
        "the span continues the remote trace"
    );
    assert_eq!(span.parent_span_id, REMOTE_SPAN_ID);
    assert_eq!(span.attribute("model"), Some("llama"));

    let child_traceparent = format!("00-{TRACE_ID}-{}-01", span.span_id);
    assert_eq!(printed(&output, "injected-http"), child_traceparent);
    assert_eq!(printed(&output, "injected-grpc"), child_traceparent);
}

fn export_child() {
    use gpuswap_telemetry::{extract_http, init, inject_grpc, inject_http, set_parent};

    let guard = init(SERVICE, &TelemetryConfig::default()).expect("init");
    assert!(guard.exporting());

    let mut incoming = http::HeaderMap::new();
    let traceparent = std::env::var(INCOMING_TRACEPARENT_ENV).expect("traceparent");
    incoming.insert("traceparent", traceparent.parse().expect("header value"));
    let span = tracing::info_span!("handle_request", model = "llama");
    set_parent(&span, extract_http(&incoming));
    {
        let _entered = span.enter();
        let mut outgoing = http::HeaderMap::new();
        inject_http(&mut outgoing);
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_grpc(&mut metadata);
        let text = |value: Option<&str>| value.unwrap_or("<none>").to_owned();
        println!(
            "injected-http={}",
            text(outgoing.get("traceparent").and_then(|v| v.to_str().ok()))
        );
        println!(
            "injected-grpc={}",
            text(metadata.get("traceparent").and_then(|v| v.to_str().ok()))
        );
    }
    drop(span);
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_logs_are_json() {
    if role().as_deref() == Some("plain") {
        return plain_child();
    }
    let output = run_child(
        "without_an_endpoint_nothing_is_exported_and_logs_are_json",
        "plain",
        &[("GPUSWAP_LOG_FORMAT", "json")],
    )
    .await;
    assert_eq!(printed(&output, "exporting"), "false");
    assert_eq!(printed(&output, "injected-headers"), "0");
    assert_eq!(printed(&output, "extracted-remote-parent"), "false");

    let stderr = String::from_utf8_lossy(&output.stderr);
    let event = stderr
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["fields"]["message"] == "hello from the child")
        .unwrap_or_else(|| panic!("no JSON log line with the message in:\n{stderr}"));
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["fields"]["model"], "llama");
    assert!(
        !stderr.contains("filtered out"),
        "debug events are filtered by the default `info`:\n{stderr}"
    );
}

fn plain_child() {
    use opentelemetry::trace::TraceContextExt as _;

    let guard = gpuswap_telemetry::init(SERVICE, &TelemetryConfig::default()).expect("init");
    println!("exporting={}", guard.exporting());
    let span = tracing::info_span!("handle_request");
    let _entered = span.enter();
    let mut outgoing = http::HeaderMap::new();
    gpuswap_telemetry::inject_http(&mut outgoing);
    println!("injected-headers={}", outgoing.len());
    let mut incoming = http::HeaderMap::new();
    let traceparent = format!("00-{TRACE_ID}-{REMOTE_SPAN_ID}-01");
    incoming.insert("traceparent", traceparent.parse().expect("header value"));
    let remote = gpuswap_telemetry::extract_http(&incoming);
    println!("extracted-remote-parent={}", remote.has_active_span());
    tracing::info!(model = "llama", "hello from the child");
    tracing::debug!("filtered out");
}

#[tokio::test]
async fn the_receiver_times_out_with_what_it_got() {
    let receiver = OtlpReceiver::start().await.expect("receiver");
    let error = receiver
        .wait_for_span(Duration::from_millis(50), |_| true)
        .await
        .expect_err("nothing was sent");
    assert!(error.to_string().contains("no matching span"), "{error}");
}
