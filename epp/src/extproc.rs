//! The Endpoint Picker side of Envoy's `ext_proc` v3 protocol (GIE's
//! `004-endpoint-picker-protocol`): one bidirectional stream per HTTP request.
//!
//! The picker needs the request's `model`, which is in the body, so how it answers depends on
//! the body mode Envoy announces in `protocol_config`:
//! - no body (or mode NONE): it decides on the headers (`x-gateway-model-name` if set);
//! - BUFFERED / BUFFERED_PARTIAL: headers pass, the whole body comes in one message, and the
//!   destination is set by the body's answer (Envoy holds the headers until then);
//! - STREAMED: with `send_body_without_waiting_for_header_response` the chunks are held and
//!   answered after the headers once the body is complete; without it, it decides on the
//!   headers alone;
//! - FULL_DUPLEX_STREAMED: nothing is answered until the body is complete; then the headers
//!   answer carries the destination and the body goes back as streamed chunks of at most
//!   [`CHUNK`] bytes. Response bodies in this mode are echoed back chunk by chunk as they come.
//!
//! The destination is both the `x-gateway-destination-endpoint` header and the `envoy.lb`
//! dynamic metadata entry of the same name, with the same value (the protocol forbids them
//! to differ). `GET /v1/models` is answered here, with the union of the boxes' catalogs.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{HeaderValue, HeaderValueOption},
        extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode,
        service::ext_proc::v3::{
            BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse,
            HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse,
            StreamedBodyResponse, TrailersResponse, body_mutation,
            external_processor_server::ExternalProcessor, processing_request::Request as Message,
            processing_response::Response as Answer,
        },
        r#type::v3::HttpStatus,
    },
    google::protobuf::{Struct, Value, value::Kind},
};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    fleet::InFlight,
    picker::{Decision, Picker},
};

/// The header (and `envoy.lb` metadata key) that names the chosen endpoints.
pub const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The metadata namespace of the destination, and of the subset hint.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// A request header naming the model, for requests routed on headers alone.
pub const MODEL_HEADER: &str = "x-gateway-model-name";
/// Largest body chunk sent back in FULL_DUPLEX_STREAMED mode: under Envoy's default 64 KiB
/// buffer limit with room for the message around it (GIE uses the same 62,000).
pub const CHUNK: usize = 62_000;

/// The ext_proc service.
#[derive(Clone, Debug)]
pub struct ExtProc {
    picker: Arc<Picker>,
    max_body: usize,
}

impl ExtProc {
    pub fn new(picker: Arc<Picker>, max_body: u64) -> Self {
        ExtProc {
            picker,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        }
    }
}

type Answers = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProc {
    type ProcessStream = Answers;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(32);
        let exchange = Exchange::new(Arc::clone(&self.picker), self.max_body, tx);
        tokio::spawn(exchange.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// How the request body reaches the picker, from the first message's `protocol_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyPlan {
    /// Decide on the headers.
    Headers,
    /// Answer the headers, decide on the (whole) body's answer.
    Buffered,
    /// Hold every answer until the body is complete (STREAMED without waiting).
    HoldStreamed,
    /// Hold every answer until the body is complete, then send it back in chunks.
    FullDuplex,
}

struct Exchange {
    picker: Arc<Picker>,
    max_body: usize,
    tx: mpsc::Sender<Result<ProcessingResponse, Status>>,
    plan: BodyPlan,
    response_full_duplex: bool,
    /// The answer to the request headers is still owed (held until the body is read).
    headers_owed: bool,
    /// Request body chunks received and not answered (HoldStreamed).
    chunks_owed: usize,
    body: Vec<u8>,
    header_model: Option<String>,
    subset: Option<Vec<String>>,
    /// The decision was made (and sent): later body chunks just pass.
    decided: bool,
    in_flight: Option<InFlight>,
}

impl Exchange {
    fn new(
        picker: Arc<Picker>,
        max_body: usize,
        tx: mpsc::Sender<Result<ProcessingResponse, Status>>,
    ) -> Self {
        Exchange {
            picker,
            max_body,
            tx,
            plan: BodyPlan::Headers,
            response_full_duplex: false,
            headers_owed: false,
            chunks_owed: 0,
            body: Vec::new(),
            header_model: None,
            subset: None,
            decided: false,
            in_flight: None,
        }
    }

    async fn run(mut self, mut inbound: Streaming<ProcessingRequest>) {
        loop {
            let message = match inbound.message().await {
                Ok(Some(message)) => message,
                // Envoy closed the stream: the HTTP request is over (in_flight drops here).
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "ext_proc stream ended");
                    break;
                }
            };
            if let Some(config) = &message.protocol_config {
                self.response_full_duplex =
                    config.response_body_mode == BodySendMode::FullDuplexStreamed as i32;
                self.plan = match BodySendMode::try_from(config.request_body_mode) {
                    Ok(BodySendMode::Buffered | BodySendMode::BufferedPartial) => {
                        BodyPlan::Buffered
                    }
                    Ok(BodySendMode::FullDuplexStreamed) => BodyPlan::FullDuplex,
                    Ok(BodySendMode::Streamed)
                        if config.send_body_without_waiting_for_header_response =>
                    {
                        BodyPlan::HoldStreamed
                    }
                    _ => BodyPlan::Headers,
                };
            }
            if let Some(hint) = subset_hint(&message) {
                self.subset = Some(hint);
            }
            let Some(request) = message.request else {
                continue;
            };
            let sent = match request {
                Message::RequestHeaders(headers) => self.on_request_headers(headers).await,
                Message::RequestBody(body) => {
                    self.on_request_body(body.body, body.end_of_stream).await
                }
                Message::RequestTrailers(_) => self.on_request_trailers().await,
                Message::ResponseHeaders(_) => {
                    self.send(Answer::ResponseHeaders(HeadersResponse::default()), None)
                        .await
                }
                Message::ResponseBody(body) => {
                    if self.response_full_duplex {
                        self.send_chunks(body.body, body.end_of_stream, Answer::ResponseBody)
                            .await
                    } else {
                        self.send(Answer::ResponseBody(BodyResponse::default()), None)
                            .await
                    }
                }
                Message::ResponseTrailers(_) => {
                    self.send(Answer::ResponseTrailers(TrailersResponse::default()), None)
                        .await
                }
            };
            if !sent {
                break;
            }
        }
    }

    async fn on_request_headers(&mut self, headers: HttpHeaders) -> bool {
        let end_of_stream = headers.end_of_stream;
        let map = header_map(&headers);
        self.header_model = map.get(MODEL_HEADER).cloned();
        let method = map.get(":method").map(String::as_str).unwrap_or("");
        let path = map.get(":path").map(String::as_str).unwrap_or("");
        let path = path.split('?').next().unwrap_or("");
        if method == "GET" && (path == "/v1/models" || path == "/models") {
            let body = self.picker.models_json().to_string();
            return self.immediate(200, body.into_bytes(), "").await;
        }
        if end_of_stream || self.plan == BodyPlan::Headers {
            let model = self.header_model.clone();
            return self
                .decide_and_answer(model.as_deref(), HeadersOrBody::Headers)
                .await;
        }
        match self.plan {
            BodyPlan::Buffered => {
                self.send(Answer::RequestHeaders(HeadersResponse::default()), None)
                    .await
            }
            _ => {
                self.headers_owed = true;
                true
            }
        }
    }

    async fn on_request_body(&mut self, chunk: Vec<u8>, end_of_stream: bool) -> bool {
        if self.decided {
            return self
                .send(Answer::RequestBody(BodyResponse::default()), None)
                .await;
        }
        if self.body.len() + chunk.len() > self.max_body {
            let message = format!(
                "request body over the picker's limit of {} bytes",
                self.max_body
            );
            return self
                .immediate(413, error_body("request_too_large", &message), &message)
                .await;
        }
        self.body.extend_from_slice(&chunk);
        match self.plan {
            BodyPlan::Buffered => {
                let model = self.model();
                self.decide_and_answer(model.as_deref(), HeadersOrBody::Body)
                    .await
            }
            BodyPlan::HoldStreamed => {
                self.chunks_owed += 1;
                if end_of_stream {
                    self.flush_held(false).await
                } else {
                    true
                }
            }
            BodyPlan::FullDuplex | BodyPlan::Headers => {
                if end_of_stream {
                    self.flush_held(true).await
                } else {
                    true
                }
            }
        }
    }

    async fn on_request_trailers(&mut self) -> bool {
        // The body ended with trailers: what is held goes now (without end_of_stream: the
        // trailers end the stream).
        if !self.decided && self.headers_owed {
            let duplex = self.plan == BodyPlan::FullDuplex;
            if !self.flush_held_with(duplex, false).await {
                return false;
            }
        }
        self.send(Answer::RequestTrailers(TrailersResponse::default()), None)
            .await
    }

    /// The body is complete: decide, answer the held headers, then the held body.
    async fn flush_held(&mut self, duplex: bool) -> bool {
        self.flush_held_with(duplex, true).await
    }

    async fn flush_held_with(&mut self, duplex: bool, end_of_stream: bool) -> bool {
        let model = self.model();
        if !self
            .decide_and_answer(model.as_deref(), HeadersOrBody::Headers)
            .await
        {
            return false;
        }
        if !self.decided {
            // Refused with an immediate response: nothing more to send.
            return false;
        }
        if duplex {
            let body = std::mem::take(&mut self.body);
            if body.is_empty() && !end_of_stream {
                return true;
            }
            return self
                .send_chunks(body, end_of_stream, Answer::RequestBody)
                .await;
        }
        for _ in 0..std::mem::take(&mut self.chunks_owed) {
            if !self
                .send(Answer::RequestBody(BodyResponse::default()), None)
                .await
            {
                return false;
            }
        }
        true
    }

    /// The body's `model`, else the model header.
    fn model(&self) -> Option<String> {
        #[derive(serde::Deserialize)]
        struct ModelOnly {
            model: Option<String>,
        }
        serde_json::from_slice::<ModelOnly>(&self.body)
            .ok()
            .and_then(|m| m.model)
            .or_else(|| self.header_model.clone())
    }

    async fn decide_and_answer(&mut self, model: Option<&str>, on: HeadersOrBody) -> bool {
        let decision = self.picker.decide(model, self.subset.as_deref());
        match decision {
            Decision::Route {
                endpoints,
                in_flight,
                ..
            } => {
                self.decided = true;
                self.headers_owed = false;
                self.in_flight = Some(in_flight);
                let value = endpoints.join(",");
                let common = CommonResponse {
                    header_mutation: Some(HeaderMutation {
                        set_headers: vec![header(DESTINATION, &value)],
                        remove_headers: Vec::new(),
                    }),
                    ..Default::default()
                };
                let answer = match on {
                    HeadersOrBody::Headers => Answer::RequestHeaders(HeadersResponse {
                        response: Some(common),
                    }),
                    HeadersOrBody::Body => Answer::RequestBody(BodyResponse {
                        response: Some(common),
                    }),
                };
                self.send(answer, Some(destination_metadata(&value))).await
            }
            Decision::Refuse {
                status,
                code,
                message,
            } => {
                self.immediate(status, error_body(code, &message), &message)
                    .await
            }
        }
    }

    /// Sends `body` back as streamed chunks of at most [`CHUNK`] bytes.
    async fn send_chunks(
        &mut self,
        body: Vec<u8>,
        end_of_stream: bool,
        wrap: fn(BodyResponse) -> Answer,
    ) -> bool {
        let mut pieces: Vec<&[u8]> = body.chunks(CHUNK).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let response = BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::StreamedResponse(
                            StreamedBodyResponse {
                                body: piece.to_vec(),
                                end_of_stream: end_of_stream && i == last,
                                ..Default::default()
                            },
                        )),
                    }),
                    ..Default::default()
                }),
            };
            if !self.send(wrap(response), None).await {
                return false;
            }
        }
        true
    }

    async fn immediate(&mut self, status: u16, body: Vec<u8>, details: &str) -> bool {
        let response = ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers: Some(HeaderMutation {
                set_headers: vec![header("content-type", "application/json")],
                remove_headers: Vec::new(),
            }),
            body,
            grpc_status: None,
            details: details.to_owned(),
        };
        self.send(Answer::ImmediateResponse(response), None).await
    }

    /// False when Envoy has gone away.
    async fn send(&self, answer: Answer, dynamic_metadata: Option<Struct>) -> bool {
        let response = ProcessingResponse {
            response: Some(answer),
            dynamic_metadata,
            ..Default::default()
        };
        self.tx.send(Ok(response)).await.is_ok()
    }
}

#[derive(Clone, Copy)]
enum HeadersOrBody {
    Headers,
    Body,
}

/// Lower-case names to values (`raw_value` when set, as Envoy sends them).
fn header_map(headers: &HttpHeaders) -> HashMap<String, String> {
    headers
        .headers
        .iter()
        .flat_map(|map| &map.headers)
        .map(|h| {
            let value = if h.raw_value.is_empty() {
                h.value.clone()
            } else {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            };
            (h.key.to_ascii_lowercase(), value)
        })
        .collect()
}

fn header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn string_value(text: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(text.to_owned())),
    }
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": value}}`.
fn destination_metadata(value: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION.to_owned(), string_value(value))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// The endpoints the proxy allows (`envoy.lb.subset_hint` /
/// `x-gateway-destination-endpoint-subset` in the request's filter metadata), if it says.
fn subset_hint(message: &ProcessingRequest) -> Option<Vec<String>> {
    let metadata = message.metadata_context.as_ref()?;
    let hint = metadata.filter_metadata.get("envoy.lb.subset_hint")?;
    let list = hint.fields.get("x-gateway-destination-endpoint-subset")?;
    let Some(Kind::ListValue(list)) = &list.kind else {
        return Some(Vec::new());
    };
    Some(
        list.values
            .iter()
            .filter_map(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
    )
}

/// An OpenAI-style error body.
fn error_body(code: &str, message: &str) -> Vec<u8> {
    serde_json::json!({
        "error": { "message": message, "type": "gpuswap_epp", "code": code }
    })
    .to_string()
    .into_bytes()
}
