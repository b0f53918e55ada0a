//! Observability of the gateway: Prometheus metrics on `GET /metrics`, and
//! trace context from the client through the gateway's spans to the backend.

use crate::common::{Model, Stack, metrics_when, read_stream, sample};
use gpuswap_telemetry::testing::OtlpReceiver;
use serde_json::{Value, json};
use testkit::stream_content;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_tokens_and_time_to_first_byte() {
    let stack = Stack::builder("metrics")
        .model(Model::new("alpha").alias("a"))
        .model(Model::new("slow").gpus(&[1]).tokens_per_second(5))
        .start()
        .await;
    let chat = "/v1/chat/completions";

    // Non-stream, by alias, while alpha must be started: usage says 5 tokens.
    stack.chat_ok("a", 5).await;
    // A stream without usage: its 6 content chunks are counted.
    let text = stack.stream_chat("alpha", 6).await;
    assert!(
        stream_content(&text).starts_with("[served by alpha]"),
        "{text}"
    );
    // A stream with usage (4): the usage replaces the count.
    let mut with_usage = Stack::chat("alpha", true, 4);
    with_usage["stream_options"] = json!({"include_usage": true});
    let response = stack
        .http
        .post(stack.url(chat))
        .json(&with_usage)
        .send()
        .await
        .unwrap();
    let text = read_stream(response).await;
    assert!(text.contains("\"completion_tokens\":4"), "{text}");
    // A text completion stream: 3 `text` chunks.
    let response = stack
        .http
        .post(stack.url("/v1/completions"))
        .json(&json!({"model": "alpha", "prompt": "hi", "max_tokens": 3, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    read_stream(response).await;
    // The backend refuses: counted with its status.
    let (status, text) = stack
        .post("/v1/embeddings", &json!({"model": "alpha"}))
        .await;
    assert_eq!(status, 400, "{text}");

    let text = metrics_when(&stack, "alpha's requests recorded", |text| {
        sample(
            text,
            r#"gpuswap_gateway_requests_total{model="alpha",status="200"}"#,
        ) == Some(4.0)
            && sample(
                text,
                r#"gpuswap_gateway_requests_total{model="alpha",status="400"}"#,
            ) == Some(1.0)
    })
    .await;
    let alpha = |name: &str| {
        sample(&text, &format!("gpuswap_gateway_{name}{{model=\"alpha\"}}"))
            .unwrap_or_else(|| panic!("no {name} for alpha:\n{text}"))
    };
    assert_eq!(
        alpha("generated_tokens_total"),
        5.0 + 6.0 + 4.0 + 3.0,
        "{text}"
    );
    assert_eq!(alpha("time_to_first_byte_seconds_count"), 5.0, "{text}");
    assert_eq!(alpha("request_duration_seconds_count"), 5.0, "{text}");
    assert_eq!(alpha("tokens_per_second_count"), 4.0, "{text}");
    assert_eq!(alpha("swaps_total"), 1.0, "{text}");
    assert_eq!(alpha("queue_depth"), 0.0, "{text}");
    assert_eq!(alpha("in_flight"), 0.0, "{text}");
    assert!(alpha("time_to_first_byte_seconds_sum") > 0.0, "{text}");
    assert!(
        !text.contains("model=\"a\""),
        "aliases are not labels:\n{text}"
    );

    // A client that leaves mid-stream: in flight while it reads, then 499.
    let response = stack.post_chat("slow", true, 200).await;
    let mut chunks = response.bytes_stream();
    use futures_util::StreamExt as _;
    let first = chunks.next().await.expect("a first chunk").expect("chunk");
    assert!(!first.is_empty());
    metrics_when(&stack, "slow in flight", |text| {
        sample(text, r#"gpuswap_gateway_in_flight{model="slow"}"#) == Some(1.0)
    })
    .await;
    drop(chunks);
    let text = metrics_when(&stack, "the abandoned stream recorded as 499", |text| {
        sample(
            text,
            r#"gpuswap_gateway_requests_total{model="slow",status="499"}"#,
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(&text, r#"gpuswap_gateway_in_flight{model="slow"}"#),
        Some(0.0),
        "{text}"
    );
    testkit::promtool_check(&text);
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// The `traceparent` of a client's sampled span (`CLIENT_SPAN_ID` in trace `TRACE_ID`).
fn client_traceparent() -> String {
    format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01")
}

/// A chat request for alpha that carries [`client_traceparent`]: asserts 200; the body.
async fn chat_in_client_trace(stack: &Stack, max_tokens: u32) -> Value {
    let response = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .header("traceparent", client_traceparent())
        .json(&Stack::chat("alpha", false, max_tokens))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_traceparent_continues_through_the_gateway_to_the_backend() {
    let receiver = OtlpReceiver::start().await.expect("OTLP receiver");
    let stack = Stack::builder("trace")
        .gateway_env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        // Export batches at once rather than every 5 s.
        .gateway_env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .model(Model::new("alpha"))
        .start()
        .await;
    // The first request starts alpha: the activation joins its trace.
    let body = chat_in_client_trace(&stack, 3).await;

    let of_trace = |name: &'static str| {
        move |span: &gpuswap_telemetry::testing::ReceivedSpan| {
            span.service_name == "gpuswap-gateway" && span.name == name && span.trace_id == TRACE_ID
        }
    };
    let request = receiver
        .wait_for_span(testkit::DEADLINE, of_trace("request"))
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    assert_eq!(request.parent_span_id, CLIENT_SPAN_ID, "{request:?}");
    assert_eq!(request.attribute("model"), Some("alpha"), "{request:?}");
    let activate = receiver
        .wait_for_span(testkit::DEADLINE, of_trace("activate"))
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    assert_eq!(activate.parent_span_id, request.span_id, "{activate:?}");
    assert_eq!(activate.attribute("outcome"), Some("ready"), "{activate:?}");

    // The backend got the gateway's span as its parent, in the client's trace.
    let forwarded = body["gpuswap_mock"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the backend got no traceparent: {body}"));
    assert_eq!(
        forwarded,
        format!("00-{TRACE_ID}-{}-01", request.span_id),
        "{body}"
    );

    // A request without trace context starts a trace of its own.
    let text = stack.chat_ok("alpha", 2).await;
    let own = testkit::json(&text)["gpuswap_mock"]["traceparent"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("the backend got no traceparent: {text}"));
    assert!(own.starts_with("00-") && !own.contains(TRACE_ID), "{own}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_the_client_traceparent_passes_untouched() {
    let stack = Stack::alpha_with("no-trace", &[]).await;
    let body = chat_in_client_trace(&stack, 2).await;
    assert_eq!(
        body["gpuswap_mock"]["traceparent"],
        client_traceparent().as_str()
    );
}
