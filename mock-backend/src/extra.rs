//! Endpoints beyond the chat API, for the gateway's pass-through tests: llama-server's
//! `/props`, an echo of any request, a multipart transcription (OpenAI's audio API) and
//! Anthropic's `/v1/messages` (llama-server and vLLM serve it), streaming included.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request as HttpRequest, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use crate::{
    generate::{self, Answer, Endpoint},
    state::Shared,
};

type AppState = State<Arc<Shared>>;

pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/props", get(props))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/v1/audio/transcriptions", post(transcription))
        .route("/v1/audio/translations", post(transcription))
        .route("/v1/messages", post(messages))
}

/// llama-server's `/props` (a few of its fields).
async fn props(State(shared): AppState) -> Json<Value> {
    Json(json!({
        "model_alias": shared.model(),
        "total_slots": 1,
        "role": "model",
        "is_sleeping": shared.memory.borrow().asleep(),
    }))
}

/// Any method: what arrived (method, path, query, a few headers, the body's size and text),
/// after `delay_ms` (a query parameter) when given: a request that stays in flight.
async fn echo(State(shared): AppState, request: HttpRequest) -> Json<Value> {
    let (parts, body) = request.into_parts();
    let delay_ms = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("delay_ms="))
        .and_then(|ms| ms.parse().ok());
    if let Some(ms) = delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Json(json!({
        "model": shared.model(),
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "authorization": header("authorization"),
        "x_test": header("x-test"),
        "body_len": body.len(),
        "body": String::from_utf8_lossy(&body),
    }))
}

/// The value of a form field and the size of the file part, from a multipart body.
fn multipart_fields(headers: &HeaderMap, body: &[u8]) -> Option<(String, usize)> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let text = body;
    let mut model = None;
    let mut file_len = 0;
    let mut rest = text;
    while let Some(start) = find(rest, delimiter.as_bytes()) {
        rest = &rest[start + delimiter.len()..];
        let Some(head_end) = find(rest, b"\r\n\r\n") else {
            break;
        };
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let content = &rest[head_end + 4..];
        let end = find(content, delimiter.as_bytes()).unwrap_or(content.len());
        let value = content[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&content[..end]);
        if head.contains("name=\"model\"") {
            model = Some(String::from_utf8_lossy(value).to_string());
        } else if head.contains("filename=") {
            file_len = value.len();
        }
        rest = &content[end..];
    }
    Some((model?, file_len))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// OpenAI's transcription: `{"text"}` naming the model asked for and the file's size.
async fn transcription(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    match multipart_fields(&headers, &body) {
        Some((model, _)) if model != shared.model() => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"message": format!("model {model} not served"), "type": "invalid_request_error"}})),
        )
            .into_response(),
        Some((model, file_len)) => Json(json!({
            "text": format!("[served by {}] {model}: {file_len} bytes", shared.model()),
        }))
        .into_response(),
        None => (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "not a multipart body with a model field", "type": "invalid_request_error"}})),
        )
            .into_response(),
    }
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response()
}

/// Anthropic's Messages API: the mock's answer as one message, or as its event stream.
async fn messages(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    if headers.get("anthropic-version").is_none() {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "anthropic-version header is required",
        );
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid JSON",
        );
    };
    if value["model"].as_str() != Some(shared.model()) {
        return anthropic_error(StatusCode::NOT_FOUND, "not_found_error", "model not found");
    }
    let request = match generate::Request::parse(Endpoint::Chat, &value) {
        Ok(request) => request,
        Err(_) => {
            return anthropic_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "bad request",
            );
        }
    };
    let answer = Answer::new(&shared, request);
    let id = format!("msg_mock_{}", shared.pid);
    let (input, output) = (answer.request.prompt_tokens, answer.request.max_tokens);
    if !answer.request.stream {
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": shared.model(),
            "content": [{"type": "text", "text": answer.text()}],
            "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": output},
        }))
        .into_response();
    }
    let event = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": shared.model(),
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": input, "output_tokens": 0}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for i in 0..output {
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta",
            "index": 0, "delta": {"type": "text_delta", "text": answer.token(i)}}),
        ));
    }
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    let interval = shared.args.token_interval();
    let body = futures_util::stream::iter(events).then(move |chunk| async move {
        tokio::time::sleep(interval.min(Duration::from_millis(50))).await;
        Ok::<_, Infallible>(chunk)
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
