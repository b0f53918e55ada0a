//! The EPP protocol: through a real Envoy (its body modes, streaming, `/v1/models`, refusals)
//! and spoken directly to the picker over gRPC (chunking, fallbacks, subset hint, health).

use std::time::Duration;

use crate::common::{self, Front, GpuBox};
use envoy_types::pb::envoy::{
    config::core::v3::{HeaderMap, HeaderValue, Metadata},
    extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
    service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse, ProtocolConfiguration,
        body_mutation, external_processor_client::ExternalProcessorClient,
        processing_request::Request as Message, processing_response::Response as Answer,
    },
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use serde_json::Value as Json;
use testkit::{MockModel, listed, listed_ids};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn two_boxes(test: &str) -> Vec<GpuBox> {
    vec![
        GpuBox::start(
            test,
            "gpu2",
            "127.0.0.2",
            vec![
                MockModel::new("a").alias("alpha"),
                MockModel::new("b").tokens_per_second(20),
            ],
        )
        .await,
        GpuBox::start(
            test,
            "gpu3",
            "127.0.0.3",
            vec![
                MockModel::new("c"),
                MockModel::new("b").tokens_per_second(20),
            ],
        )
        .await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_through_envoy_are_the_union_of_the_boxes() {
    let front = Front::start(two_boxes("models").await, &[], |t| t).await;
    let body: Json = testkit::http::client()
        .get(front.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed_ids(&body), ["a", "alpha", "b", "c"], "{body}");
    let b = listed(&body, "b");
    let boxes: Vec<&str> = b["gpuswap"]["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["box"].as_str().unwrap())
        .collect();
    assert_eq!(boxes, ["gpu2", "gpu3"]);
    assert_eq!(b["gpuswap"]["boxes"][0]["state"], "stopped");
    assert_eq!(listed(&body, "alpha")["gpuswap"]["alias_of"], "a");
}

/// Chunk arrival times of a 20-token stream at 20 tokens/s: spread over about a second, not
/// all at the end (what a buffering proxy would do).
fn assert_unbuffered(times: &[Duration], text: &str) {
    assert!(text.contains("[DONE]"), "{text}");
    assert!(times.len() >= 10, "{} chunks: {times:?}", times.len());
    let first = times[0];
    let last = *times.last().unwrap();
    assert!(
        last - first >= Duration::from_millis(600),
        "chunks came together: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_through_envoy_is_unbuffered() {
    let front = Front::start(two_boxes("stream").await, &[], |t| t).await;
    front.chat("b", false, 1).await;
    let (by, times, text) = common::stream_timed(&front, "b", 20).await;
    assert!(by.starts_with("gpu"), "{by}");
    assert_unbuffered(&times, &text.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_echoed_by_the_picker_stay_unbuffered() {
    // FULL_DUPLEX_STREAMED responses: every chunk goes through the picker and back.
    let duplex = |t: String| {
        t.replace(
            "response_body_mode: NONE",
            "response_body_mode: FULL_DUPLEX_STREAMED",
        )
    };
    let front = Front::start(two_boxes("echo").await, &[], duplex).await;
    front.chat("b", false, 1).await;
    let (_, times, text) = common::stream_timed(&front, "b", 20).await;
    assert_unbuffered(&times, &text.unwrap());
    let (_, text) = front.chat_ok("a", 3).await;
    assert!(text.contains("[served by a]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_are_routed_too() {
    let buffered = |t: String| {
        t.replace(
            "request_body_mode: FULL_DUPLEX_STREAMED",
            "request_body_mode: BUFFERED",
        )
        .replace("request_trailer_mode: SEND", "request_trailer_mode: SKIP")
    };
    let front = Front::start(two_boxes("buffered").await, &[], buffered).await;
    for (model, expected) in [("a", "gpu2"), ("alpha", "gpu2"), ("c", "gpu3")] {
        front.assert_served_by(model, 3, expected).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unknown_model_no_box_and_shedding() {
    let mut front = Front::start(two_boxes("refuse").await, &["max_in_flight = 1"], |t| t).await;
    let (status, _, text) = front.chat("nope", false, 3).await;
    assert_eq!(status, 404, "{text}");
    assert_eq!(testkit::json(&text)["error"]["code"], "model_not_found");
    // One slow stream of a fills gpu2 (max_in_flight = 1): a second request for a is shed.
    let stream = common::stream_timed(&front, "a", 20);
    let second = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        front.chat("alpha", false, 3).await
    };
    let ((_, _, streamed), (status, _, text)) = tokio::join!(stream, second);
    streamed.unwrap();
    assert_eq!(status, 429, "{text}");
    // a lives only on gpu2: without its gateway no box can serve it.
    front.gpu_box_mut("gpu2").kill_gateway();
    testkit::wait_for("a to be refused with 503", testkit::DEADLINE, || async {
        let (status, _, text) = front.chat("a", false, 3).await;
        (status == 503).then_some(text)
    })
    .await;
    front.assert_served_by("c", 3, "gpu3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_liveness_readiness_and_ext_proc() {
    let front = Front::start(two_boxes("health").await, &[], |t| t).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", front.picker_port))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = HealthClient::new(channel);
    for service in [
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
}

fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> Message {
    Message::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: pairs
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: k.to_string(),
                    raw_value: v.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        }),
        end_of_stream,
        ..Default::default()
    })
}

fn body(bytes: &[u8], end_of_stream: bool) -> Message {
    Message::RequestBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    })
}

fn destination(response: &ProcessingResponse) -> (String, String) {
    let common = match &response.response {
        Some(Answer::RequestHeaders(h)) => h.response.clone(),
        Some(Answer::RequestBody(b)) => b.response.clone(),
        other => panic!("not a routing answer: {other:?}"),
    }
    .unwrap();
    let header = common.header_mutation.unwrap().set_headers[0]
        .header
        .clone()
        .unwrap();
    assert_eq!(header.key, "x-gateway-destination-endpoint");
    let lb = &response.dynamic_metadata.as_ref().unwrap().fields["envoy.lb"];
    let Some(Kind::StructValue(lb)) = &lb.kind else {
        panic!("{lb:?}")
    };
    let Some(Kind::StringValue(meta)) = &lb.fields["x-gateway-destination-endpoint"].kind else {
        panic!()
    };
    (String::from_utf8(header.raw_value).unwrap(), meta.clone())
}

/// One ext_proc exchange spoken directly: `messages` in, every answer out until `expect`
/// answers came.
async fn exchange(
    port: u16,
    messages: Vec<ProcessingRequest>,
    expect: usize,
) -> Vec<ProcessingResponse> {
    let mut client = ExternalProcessorClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    let mut answers = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while out.len() < expect {
        let next = tokio::time::timeout(testkit::DEADLINE, answers.message())
            .await
            .expect("answer in time");
        out.push(next.unwrap().expect("an answer"));
    }
    drop(tx);
    out
}

fn message(
    request: Message,
    mode: Option<BodySendMode>,
    subset: Option<&[&str]>,
) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(request),
        protocol_config: mode.map(|m| ProtocolConfiguration {
            request_body_mode: m as i32,
            ..Default::default()
        }),
        metadata_context: subset.map(|list| Metadata {
            filter_metadata: [(
                "envoy.lb.subset_hint".to_string(),
                Struct {
                    fields: [(
                        "x-gateway-destination-endpoint-subset".to_string(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: list
                                    .iter()
                                    .map(|s| Value {
                                        kind: Some(Kind::StringValue(s.to_string())),
                                    })
                                    .collect(),
                            })),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

const CHAT: &[(&str, &str)] = &[(":method", "POST"), (":path", "/v1/chat/completions")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_duplex_bodies_come_back_in_chunks_with_fallbacks_and_subsets() {
    let front = Front::start(two_boxes("duplex").await, &["fallbacks = 1"], |t| t).await;
    let (gpu2, gpu3) = (front.boxes[0].gateway_addr(), front.boxes[1].gateway_addr());
    // A 150 kB body (a long prompt) in three pieces: held until complete, then sent back in
    // chunks of at most 62,000 bytes after the headers' answer.
    let mut chat = testkit::chat_body("b", false, 3);
    chat["messages"][0]["content"] = Json::from("x".repeat(150_000));
    let text = chat.to_string().into_bytes();
    let pieces: Vec<&[u8]> = text.chunks(50_000).collect();
    let mut messages = vec![message(
        headers(CHAT, false),
        Some(BodySendMode::FullDuplexStreamed),
        None,
    )];
    for (i, piece) in pieces.iter().enumerate() {
        messages.push(message(body(piece, i == pieces.len() - 1), None, None));
    }
    let answers = exchange(front.picker_port, messages, 4).await;
    let (header, meta) = destination(&answers[0]);
    let mut listed: Vec<&str> = header.split(',').collect();
    listed.sort();
    assert_eq!(
        listed,
        [gpu2.as_str(), gpu3.as_str()],
        "b is on both: one chosen, one fallback"
    );
    assert_eq!(meta, header);
    let mut echoed = Vec::new();
    for (i, answer) in answers[1..].iter().enumerate() {
        let Some(Answer::RequestBody(b)) = &answer.response else {
            panic!("{answer:?}")
        };
        let Some(body_mutation::Mutation::StreamedResponse(s)) =
            b.response.clone().unwrap().body_mutation.unwrap().mutation
        else {
            panic!()
        };
        assert!(s.body.len() <= 62_000);
        assert_eq!(s.end_of_stream, i == 2);
        echoed.extend_from_slice(&s.body);
    }
    assert_eq!(echoed, text);

    // The proxy's subset hint: only gpu2 may be picked, even for a model of gpu3.
    let subset = [gpu2.as_str()];
    let messages = vec![
        message(
            headers(CHAT, false),
            Some(BodySendMode::Buffered),
            Some(&subset),
        ),
        message(
            body(
                testkit::chat_body("b", false, 1).to_string().as_bytes(),
                true,
            ),
            None,
            None,
        ),
    ];
    let answers = exchange(front.picker_port, messages, 2).await;
    assert!(matches!(
        answers[0].response,
        Some(Answer::RequestHeaders(_))
    ));
    assert_eq!(destination(&answers[1]).0, gpu2);
    // An empty subset leaves nothing to pick: 503.
    let messages = vec![message(
        headers(CHAT, true),
        Some(BodySendMode::None),
        Some(&[]),
    )];
    let answers = exchange(front.picker_port, messages, 1).await;
    let Some(Answer::ImmediateResponse(refused)) = &answers[0].response else {
        panic!("{answers:?}")
    };
    assert_eq!(refused.status.unwrap().code, 503);
    // Headers only: the model header decides.
    let with_model = [
        (":method", "POST"),
        (":path", "/v1/completions"),
        ("x-gateway-model-name", "a"),
    ];
    let answers = exchange(
        front.picker_port,
        vec![message(headers(&with_model, true), None, None)],
        1,
    )
    .await;
    assert_eq!(
        destination(&answers[0]).0,
        gpu2,
        "a is on gpu2 only: no fallback"
    );
}
