//! OpenAI-shaped errors: every error the gateway answers, and the conversion
//! of the backends' own error bodies (SGLang's flat form, FastAPI's `detail`).

use std::borrow::Cow;

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde::Serialize;

/// An error answered as `{"error":{"message","type","param","code"}}`.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Cow<'static, str>,
    pub message: String,
    /// The backend's last log lines, when a start failed (and
    /// `gateway.expose_log_tail` lets clients see them).
    pub log_tail: Vec<String>,
    /// Seconds for a `Retry-After` header (the client should come back later).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code: code.into(),
            message: message.into(),
            log_tail: Vec::new(),
            retry_after: None,
        }
    }

    pub fn invalid_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{model}` does not exist"),
        )
    }

    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is larger than the limit of {limit} bytes"),
        )
    }

    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Missing or incorrect API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
        )
    }

    pub fn supervisor_unavailable(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "supervisor_unavailable",
            format!("The gpuswap supervisor is unreachable, so no model can be started: {detail}"),
        )
    }

    pub fn backend_unavailable(model: &str, detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "backend_unavailable",
            format!("The backend of model `{model}` is unreachable: {detail}"),
        )
    }

    /// A failed start, in one line and where its log is; the log lines go in
    /// only when given (`gateway.expose_log_tail`): they can hold command
    /// lines, paths and whatever the backend printed.
    pub fn start_failed(model: &str, reason: &str, log_tail: Vec<String>) -> Self {
        let reason = truncate(reason.lines().next().unwrap_or("").trim(), REASON_LIMIT);
        let mut message = format!(
            "Model `{model}` failed to start: {reason} (its log: `gpuswapctl logs {model}`)"
        );
        if !log_tail.is_empty() {
            message.push_str("\nLast log lines:\n");
            message.push_str(&log_tail.join("\n"));
        }
        Self {
            log_tail,
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_start_failed",
                message,
            )
        }
    }

    /// `max_queued` requests already wait.
    pub fn queue_full(limit: usize) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_S),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "queue_full",
                format!("Too many requests are waiting for models (at most {limit}): retry later"),
            )
        }
    }

    /// The bodies of the requests being read or waiting hold `queue_memory`.
    pub fn queue_memory(limit: u64) -> Self {
        Self {
            retry_after: Some(RETRY_AFTER_S),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "queue_memory_full",
                format!(
                    "The requests waiting for models hold the gateway's limit of {limit} bytes: retry later"
                ),
            )
        }
    }

    /// The body did not arrive within `body_timeout`.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "body_timeout",
            format!("The request body did not arrive within {}", humanize(limit)),
        )
    }

    /// A browser request from an origin not in `gateway.cors_origins`.
    pub fn origin_not_allowed(origin: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "origin_not_allowed",
            format!(
                "Requests from origin {origin:?} are not allowed (the gateway's operator can list it in gateway.cors_origins)"
            ),
        )
    }

    /// A `Host` header not in `gateway.allowed_hosts`.
    pub fn host_not_allowed(host: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "host_not_allowed",
            format!("This gateway does not serve the host {host:?} (see gateway.allowed_hosts)"),
        )
    }

    pub fn queue_timeout(model: &str, waited: std::time::Duration) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "queue_timeout",
            format!(
                "Model `{model}` did not become ready within the queue timeout of {}",
                humanize(waited)
            ),
        )
    }

    /// The JSON body, `{"error":{...}}`.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<()>,
            code: &'a str,
            #[serde(skip_serializing_if = "<[String]>::is_empty")]
            log_tail: &'a [String],
        }
        let envelope = Envelope {
            error: Inner {
                message: &self.message,
                kind: self.kind,
                param: None,
                code: &self.code,
                log_tail: &self.log_tail,
            },
        };
        // Serializing plain strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
    }

    /// The error as one SSE event in the API's own shape: Anthropic's `event: error` on
    /// `/v1/messages` (`anthropic`), else OpenAI's.
    pub fn sse_event_for(&self, anthropic: bool) -> Bytes {
        if !anthropic {
            return self.sse_event();
        }
        let body = anthropic_error(self.status, &self.message);
        let mut event = b"event: error\ndata: ".to_vec();
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    /// The error as one SSE event, for failures after a 200 stream started.
    pub fn sse_event(&self) -> Bytes {
        let body = self.body();
        let mut event = Vec::with_capacity(body.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = json_response(self.status, self.body());
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Anthropic's error type for an HTTP status (docs.anthropic.com, "Errors").
fn anthropic_error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`, Anthropic's error body.
pub fn anthropic_error(status: StatusCode, message: &str) -> Bytes {
    let body = serde_json::json!({
        "type": "error",
        "error": { "type": anthropic_error_type(status), "message": message },
    });
    Bytes::from(body.to_string())
}

/// An OpenAI-shaped error body (the gateway's own, or a backend's it converted) in
/// Anthropic's shape; None when it is not one (already Anthropic's, or not JSON).
pub fn openai_error_to_anthropic(status: StatusCode, body: &[u8]) -> Option<Bytes> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if value.get("type").and_then(|t| t.as_str()) == Some("error") {
        return None;
    }
    let message = value.get("error")?.get("message")?.as_str()?;
    Some(anthropic_error(status, message))
}

/// What a refused client is told to wait: a swap takes seconds to minutes,
/// and waiting requests leave the queue as their model comes up.
const RETRY_AFTER_S: u32 = 10;
/// The longest start-failure reason told to HTTP clients.
const REASON_LIMIT: usize = 300;

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: Bytes) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn humanize(d: std::time::Duration) -> String {
    let secs = d.as_secs_f64();
    if secs >= 1.0 {
        format!("{secs:.0} s")
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Converts a backend's non-2xx body into the OpenAI error shape, keeping the
/// status. `None` when the body already has that shape (forward it as is).
pub fn convert_backend_error(status: StatusCode, body: &[u8]) -> Option<ApiError> {
    #[derive(serde::Deserialize)]
    struct Loose {
        error: Option<serde_json::Value>,
        message: Option<serde_json::Value>,
        detail: Option<serde_json::Value>,
        #[serde(rename = "type")]
        kind: Option<String>,
        code: Option<serde_json::Value>,
        param: Option<serde_json::Value>,
    }
    let parsed: Option<Loose> = serde_json::from_slice(body).ok();
    let (message, kind, code, param) = match parsed {
        // OpenAI-shaped already; vLLM and llama-server put the status in `code`.
        Some(Loose {
            error: Some(serde_json::Value::Object(error)),
            ..
        }) => {
            let code_is_text = matches!(
                error.get("code"),
                None | Some(serde_json::Value::String(_)) | Some(serde_json::Value::Null)
            );
            if code_is_text && error.get("message").is_some_and(|m| m.is_string()) {
                return None;
            }
            let message = error
                .get("message")
                .map(text_of)
                .unwrap_or_else(|| format!("The backend answered {status}"));
            let kind = error
                .get("type")
                .and_then(|t| t.as_str())
                .map(str::to_owned);
            (
                message,
                kind,
                error.get("code").cloned(),
                error.get("param").cloned(),
            )
        }
        // SGLang / vLLM: {"object":"error","message":...,"type":...,"code":400}
        Some(Loose {
            message: Some(message),
            kind,
            code,
            param,
            ..
        }) => (text_of(&message), kind, code, param),
        // TabbyAPI / FastAPI: {"detail": "..."} or a list of validation errors.
        Some(Loose {
            detail: Some(detail),
            ..
        }) => (text_of(&detail), None, None, None),
        // llama-server sometimes: {"error": "text"}
        Some(Loose {
            error: Some(error), ..
        }) => (text_of(&error), None, None, None),
        _ => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let message = if text.is_empty() {
                format!("The backend answered {status}")
            } else {
                truncate(text, 4096).to_owned()
            };
            (message, None, None, None)
        }
    };
    let code = match code {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Cow::Owned(s),
        // vLLM answers a model it does not serve with 404, `param: "model"` and its status as
        // the code: OpenAI's contract (and clients) call that `model_not_found`.
        _ if status == StatusCode::NOT_FOUND
            && param.as_ref().and_then(|p| p.as_str()) == Some("model") =>
        {
            Cow::Borrowed("model_not_found")
        }
        _ => Cow::Borrowed(code_for_status(status)),
    };
    let kind = match kind.as_deref() {
        Some("invalid_request_error") | Some("BadRequestError") => "invalid_request_error",
        Some("authentication_error") => "authentication_error",
        Some("rate_limit_error") => "rate_limit_error",
        _ => kind_for_status(status),
    };
    Some(ApiError {
        status,
        kind,
        code,
        message,
        log_tail: Vec::new(),
        retry_after: None,
    })
}

fn text_of(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn kind_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 403 => "authentication_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 422 => "invalid_request",
        401 => "invalid_api_key",
        403 => "forbidden",
        404 => "not_found",
        413 => "request_too_large",
        429 => "rate_limit_exceeded",
        503 => "backend_overloaded",
        _ => "backend_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_json(e: &ApiError) -> serde_json::Value {
        serde_json::from_slice(&e.body()).unwrap()
    }

    #[test]
    fn sglang_flat_error_becomes_openai_shaped() {
        let body = br#"{"object":"error","message":"bad temperature","type":"BadRequestError","param":null,"code":400}"#;
        let e = convert_backend_error(StatusCode::BAD_REQUEST, body).unwrap();
        let v = error_json(&e);
        assert_eq!(v["error"]["message"], "bad temperature");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_request");
    }

    #[test]
    fn fastapi_detail_becomes_openai_shaped() {
        let e = convert_backend_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"detail":"no model loaded"}"#,
        )
        .unwrap();
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(error_json(&e)["error"]["message"], "no model loaded");
        let e = convert_backend_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"detail":[{"loc":["body"],"msg":"x"}]}"#,
        )
        .unwrap();
        assert!(e.message.contains("\"msg\":\"x\""), "{}", e.message);
    }

    #[test]
    fn openai_shaped_errors_pass_and_text_is_wrapped() {
        assert!(
            convert_backend_error(
                StatusCode::BAD_REQUEST,
                br#"{"error":{"message":"m","type":"t","code":null}}"#
            )
            .is_none()
        );
        let e = convert_backend_error(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}"#,
        )
        .unwrap();
        assert_eq!(
            (e.message.as_str(), e.kind, &*e.code),
            ("Loading model", "server_error", "backend_overloaded")
        );
        let e = convert_backend_error(StatusCode::INTERNAL_SERVER_ERROR, b"Internal Server Error")
            .unwrap();
        assert_eq!(e.message, "Internal Server Error");
        assert_eq!(e.kind, "server_error");
        let e = convert_backend_error(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"Loading model"}"#,
        )
        .unwrap();
        assert_eq!(e.message, "Loading model");
    }

    #[test]
    fn a_real_vllm_unknown_model_becomes_model_not_found() {
        // vLLM 0.32's own body for a model it does not serve (seen in e2e/tests/it/real_servers.rs).
        let body = br#"{"error":{"message":"The model `nope` does not exist. Valid aliases: tiny.","type":"NotFoundError","param":"model","code":404}}"#;
        let e = convert_backend_error(StatusCode::NOT_FOUND, body).unwrap();
        let v = error_json(&e);
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("`nope`"));
        // A 404 about something else stays a plain not_found.
        let e = convert_backend_error(StatusCode::NOT_FOUND, br#"{"detail":"Not Found"}"#).unwrap();
        assert_eq!(&*e.code, "not_found");
    }

    #[test]
    fn start_failure_carries_the_log_tail_only_when_given() {
        let e = ApiError::start_failed("a", "exited with status 1", vec!["boom".into()]);
        let v = error_json(&e);
        assert_eq!(v["error"]["code"], "model_start_failed");
        assert!(v["error"]["message"].as_str().unwrap().contains("boom"));
        assert_eq!(v["error"]["log_tail"][0], "boom");
        assert!(e.sse_event().starts_with(b"data: {\"error\""));
        let anthropic = e.sse_event_for(true);
        assert!(
            anthropic.starts_with(b"event: error\ndata: {"),
            "{anthropic:?}"
        );
        let body: serde_json::Value =
            serde_json::from_slice(&anthropic[b"event: error\ndata: ".len()..]).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["message"], e.message);
        let converted = openai_error_to_anthropic(e.status, &e.body()).unwrap();
        let converted: serde_json::Value = serde_json::from_slice(&converted).unwrap();
        assert_eq!(converted["error"]["type"], body["error"]["type"]);
        assert!(openai_error_to_anthropic(e.status, &anthropic_error(e.status, "x")).is_none());
        let e = ApiError::start_failed("a", "exited with status 1\nmore\nlines", Vec::new());
        let v = error_json(&e);
        assert_eq!(
            v["error"]["message"],
            "Model `a` failed to start: exited with status 1 (its log: `gpuswapctl logs a`)"
        );
        assert!(v["error"].get("log_tail").is_none(), "{v}");
    }
}
