//! The hot path: read the body once, find the model without building a JSON
//! tree, take a route from the lock-free table, forward over a pooled
//! keep-alive connection and stream the answer back untouched.

use std::{
    ops::Range,
    pin::Pin,
    sync::{Arc, atomic::Ordering::SeqCst},
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use gpuswap::error_chain;
use gpuswap_telemetry::{Refusal, RequestMetrics};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header, request::Parts};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::value::RawValue;
use tracing::{Instrument as _, Span};

use crate::{
    Gateway,
    access::Grant,
    error::{ApiError, convert_backend_error},
    limits::{BodyReservation, QueueSlot},
    route::{InFlight, Route},
    tokens::{Counting, TokenCounter},
    upstream::UpstreamBody,
    waiting::WaitingStream,
};

/// How much of a backend's error body is read to convert it.
const ERROR_BODY_LIMIT: usize = 1 << 20;

/// The two fields the gateway needs; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    stream: Option<bool>,
}

/// What the gateway learned from a request body.
#[derive(Debug, PartialEq)]
pub struct Probed {
    /// The model as requested (unescaped).
    pub model: String,
    /// Where the model's JSON string literal sits in the body.
    pub span: Range<usize>,
    pub stream: bool,
}

pub fn probe(body: &[u8]) -> Result<Probed, ApiError> {
    // serde would also read a struct from an array: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body must be a JSON object",
        ));
    }
    // serde_json skips the fields it does not read without checking their
    // UTF-8; JSON is UTF-8, and a backend would fail on it less clearly.
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body is not valid UTF-8: {e}"),
        )
    })?;
    let probe: Probe = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body must be a JSON object: {e}"),
        )
    })?;
    let raw = probe.model.ok_or_else(|| {
        ApiError::invalid_request("missing_model", "You must provide a model parameter")
    })?;
    let text = raw.get();
    let model = match serde_json::from_str::<&str>(text) {
        Ok(s) => s.to_owned(),
        Err(_) => serde_json::from_str::<String>(text).map_err(|_| {
            ApiError::invalid_request("missing_model", "The model parameter must be a string")
        })?,
    };
    // The raw value borrows from the body, so its offset is its position there.
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    Ok(Probed {
        model,
        span: start..start + text.len(),
        stream: probe.stream.unwrap_or(false),
    })
}

/// The body with the model literal at `span` replaced: the one copy a rename costs.
pub fn splice(body: &Bytes, span: Range<usize>, literal: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() - span.len() + literal.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(literal);
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// Reads a request body once, bounded by `max_body`, counting its bytes in
/// `reservation` (`queue_memory`) as they arrive.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    max_body: u64,
    reservation: &mut BodyReservation,
) -> Result<Bytes, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_body) {
        return Err(BodyError::Invalid(ApiError::too_large(max_body)));
    }
    let limit = usize::try_from(max_body).unwrap_or(usize::MAX);
    let mut body = Limited::new(body, limit);
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                return Err(BodyError::Invalid(ApiError::too_large(max_body)));
            }
            Err(e) => {
                return Err(BodyError::Invalid(ApiError::invalid_request(
                    "invalid_body",
                    format!("Could not read the request body: {e}"),
                )));
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if !reservation.grow(data.len() as u64) {
            return Err(BodyError::QueueMemory);
        }
        // One frame (the common case) is kept as is: no copy.
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            None => joined.extend_from_slice(&data),
            Some(previous) => {
                joined.extend_from_slice(&previous);
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| joined.freeze()))
}

/// Why a request body was not read.
#[derive(Debug)]
pub enum BodyError {
    /// Too large or unreadable: the client's error.
    Invalid(ApiError),
    /// The bodies held by the gateway would pass `queue_memory`.
    QueueMemory,
}

/// Reads a request's body within `max_body`, `body_timeout` and `queue_memory`;
/// the refusal to answer otherwise (the connection closes after it).
async fn read_request_body(
    gateway: &Gateway,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Bytes, BodyReservation), Response> {
    let mut reservation = gateway.limits.body();
    let reading = read_body(headers, body, gateway.max_body, &mut reservation);
    match tokio::time::timeout(gateway.body_timeout, reading).await {
        Ok(Ok(body)) => Ok((body, reservation)),
        Ok(Err(BodyError::Invalid(e))) => Err(closing(e.into_response())),
        Ok(Err(BodyError::QueueMemory)) => {
            gateway.gw_metrics.refused(Refusal::QueueMemory);
            let limit = gateway.limits.max_bytes();
            Err(closing(ApiError::queue_memory(limit).into_response()))
        }
        Err(_) => {
            gateway.gw_metrics.refused(Refusal::BodyTimeout);
            Err(closing(
                ApiError::body_timeout(gateway.body_timeout).into_response(),
            ))
        }
    }
}

/// A `POST /v1/*` request.
pub async fn handle(gateway: Arc<Gateway>, request: Request<Body>) -> Response {
    // Without an exporter no span is built at all: spans would cost the hot
    // path an allocation each (the log layer formats their fields).
    let anthropic = is_anthropic(request.uri().path());
    if !gpuswap_telemetry::exporting() {
        let response = handle_in(gateway, request, Span::none()).await;
        return anthropic_errors(anthropic, response).await;
    }
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        url.path = request.uri().path(),
        model = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    gpuswap_telemetry::set_parent(&span, gpuswap_telemetry::extract_http(request.headers()));
    let response = handle_in(gateway, request, span.clone())
        .instrument(span.clone())
        .await;
    let response = anthropic_errors(anthropic, response).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn handle_in(gateway: Arc<Gateway>, request: Request<Body>, span: Span) -> Response {
    let (parts, body) = request.into_parts();
    let Some(grant) = gateway.access.grant(&parts.headers) else {
        return closing(ApiError::invalid_api_key().into_response());
    };
    let (body, reservation) = match read_request_body(&gateway, &parts.headers, body).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let form = multipart_boundary(&parts.headers);
    let probed = match &form {
        Some(boundary) => probe_form(&body, boundary),
        None => probe(&body),
    };
    let probed = match probed {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let model = match resolve_granted(&gateway, &grant, &probed.model) {
        Ok(model) => model,
        Err(e) => return e.into_response(),
    };
    span.record("model", &*model);
    let upstream = Upstream {
        parts,
        body,
        probed,
        span,
        shape: if form.is_some() {
            BodyShape::Form
        } else {
            BodyShape::Json
        },
        held: Some(Held {
            _body: reservation,
            place: None,
        }),
    };
    dispatch(gateway, model, upstream).await
}

/// The configured model a request names, if its key may use it; else the same 404 as
/// for a model that does not exist.
fn resolve_granted(
    gateway: &Gateway,
    grant: &Grant,
    requested: &str,
) -> Result<Arc<str>, ApiError> {
    let catalog = gateway.catalog.load();
    match catalog.resolve(requested) {
        Some(info) if grant.allows(info) => Ok(Arc::clone(&info.name)),
        None if !gateway.catalog.connected() && catalog.models.is_empty() => Err(
            ApiError::supervisor_unavailable(gateway.catalog.last_error()),
        ),
        _ => Err(ApiError::model_not_found(requested)),
    }
}

/// `/upstream/{model}/{path}`, any method: the request goes to the backend's own `/{path}`
/// (query kept, body untouched, the backend's answer passed back as it is), once the model
/// is ready and held like for any request, with the same access rules.
pub async fn handle_passthrough(gateway: Arc<Gateway>, request: Request<Body>) -> Response {
    let (parts, body) = request.into_parts();
    let Some(grant) = gateway.access.grant(&parts.headers) else {
        return closing(ApiError::invalid_api_key().into_response());
    };
    let rest = parts
        .uri
        .path()
        .strip_prefix(PASSTHROUGH_PREFIX)
        .unwrap_or("");
    let (segment, path) = rest.split_once('/').unwrap_or((rest, ""));
    let requested = percent_decode(segment);
    let target = match parts.uri.query() {
        Some(query) => format!("/{path}?{query}"),
        None => format!("/{path}"),
    };
    let Ok(target) = target.parse::<Uri>() else {
        return ApiError::invalid_request("invalid_path", "The backend path is not a valid URI")
            .into_response();
    };
    let (body, reservation) = match read_request_body(&gateway, &parts.headers, body).await {
        Ok(read) => read,
        Err(refused) => return refused,
    };
    let model = match resolve_granted(&gateway, &grant, &requested) {
        Ok(model) => model,
        Err(e) => return e.into_response(),
    };
    let upstream = Upstream {
        parts,
        body,
        probed: Probed {
            model: requested,
            span: 0..0,
            stream: false,
        },
        span: Span::none(),
        held: Some(Held {
            _body: reservation,
            place: None,
        }),
        shape: BodyShape::Opaque(target),
    };
    dispatch(gateway, model, upstream).await
}

/// Where the backend pass-through is served.
pub const PASSTHROUGH_PREFIX: &str = "/upstream/";

/// `%XX` escapes decoded (a model id may hold a `/`, sent as `%2F`); invalid ones kept.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The boundary of a `multipart/form-data` request (the audio and image-edit endpoints).
fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Finds the `model` form field of a multipart body in place (the file parts are skipped
/// unread): the model and where its value sits, for a rename without parsing the rest.
pub fn probe_form(body: &[u8], boundary: &str) -> Result<Probed, ApiError> {
    let delimiter = format!("\r\n--{boundary}");
    let missing =
        || ApiError::invalid_request("missing_model", "You must provide a model form field");
    // The first delimiter may open the body without the CRLF before it.
    let mut at = memchr::memmem::find(body, &delimiter.as_bytes()[2..]).ok_or_else(missing)?;
    at += delimiter.len() - 2;
    loop {
        // After a delimiter: `--` ends the body, else CRLF and the part's headers.
        if body[at..].starts_with(b"--") {
            return Err(missing());
        }
        let head_start = at + 2;
        let after = body.get(head_start..).ok_or_else(missing)?;
        let head_len = memchr::memmem::find(after, b"\r\n\r\n").ok_or_else(missing)?;
        let head = &body[head_start..head_start + head_len];
        let value_start = head_start + head_len + 4;
        let value_len =
            memchr::memmem::find(&body[value_start..], delimiter.as_bytes()).ok_or_else(missing)?;
        if is_model_field(head) {
            let value = &body[value_start..value_start + value_len];
            let model = std::str::from_utf8(value).map_err(|_| {
                ApiError::invalid_request("missing_model", "The model form field must be UTF-8")
            })?;
            return Ok(Probed {
                model: model.to_owned(),
                span: value_start..value_start + value_len,
                stream: false,
            });
        }
        at = value_start + value_len + delimiter.len();
    }
}

/// True for the headers of the part `Content-Disposition: form-data; name="model"`.
fn is_model_field(head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else {
        return false;
    };
    head.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').any(|param| {
                param.split_once('=').is_some_and(|(k, v)| {
                    k.trim() == "name" && v.trim().trim_matches('"') == "model"
                })
            })
    })
}

/// Queues a request for its model's route (or streams progress while it waits), forwards
/// it and retries it when the backend died before answering.
async fn dispatch(gateway: Arc<Gateway>, model: Arc<str>, mut upstream: Upstream) -> Response {
    let mut metrics = gateway.gw_metrics.request(&model);
    let deadline = tokio::time::Instant::now() + gateway.queue_timeout;
    let mut refusals = 0;
    // The generation that may have read the request, and why it did not answer.
    let mut read_by: Option<(u64, String)> = None;
    loop {
        // Fast path: a live route that accepts. No message, no lock, no copy.
        let fast = gateway.routes.get(&model).and_then(|r| r.try_enter());
        let guard = match fast {
            Some(guard) => guard,
            None => {
                if !gateway.catalog.connected() {
                    let error = ApiError::supervisor_unavailable(gateway.catalog.last_error());
                    return failed(metrics, error);
                }
                if let Some(held) = &mut upstream.held
                    && held.place.is_none()
                {
                    match gateway.limits.enter_queue() {
                        Some(place) => held.place = Some(place),
                        None => {
                            gateway.gw_metrics.refused(Refusal::QueueFull);
                            let limit = gateway.limits.max_queued();
                            return failed(metrics, ApiError::queue_full(limit));
                        }
                    }
                }
                if upstream.probed.stream {
                    return WaitingStream::start(gateway, model, upstream, metrics).into_response();
                }
                let ticket = gateway.scheduler.wait(Arc::clone(&model), None);
                match tokio::time::timeout_at(deadline, ticket).await {
                    Ok(Ok(guard)) => guard,
                    Ok(Err(e)) => return failed(metrics, e),
                    Err(_) => {
                        return failed(
                            metrics,
                            ApiError::queue_timeout(&model, gateway.queue_timeout),
                        );
                    }
                }
            }
        };
        if let Some((generation, error)) = &read_by
            && guard.route().generation == *generation
        {
            return failed(metrics, ApiError::backend_unavailable(&model, error));
        }
        upstream.forwarding();
        match forward(&upstream, guard, metrics).await {
            Forwarded::Response(response) => return response,
            Forwarded::Unanswered {
                generation,
                error,
                delivered,
                metrics: returned,
            } => {
                metrics = returned;
                // The backend died before it answered and the supervisor has
                // not told yet: retry once the route is replaced (a live
                // backend keeps its route, and the client gets the 502).
                refusals += 1;
                if refusals > MAX_REFUSALS || !route_replaced(&gateway, &model, generation).await {
                    return failed(metrics, ApiError::backend_unavailable(&model, error));
                }
                // A backend that may have read the request may be running it
                // still: only a new one (its predecessor is gone) gets it again.
                if delivered {
                    read_by = Some((generation, error));
                }
                tracing::debug!(%model, generation, "the backend failed before answering: retrying");
            }
        }
    }
}

/// Anthropic's Messages API: its errors are shaped like Anthropic's.
fn is_anthropic(path: &str) -> bool {
    path == "/v1/messages"
}

/// On `/v1/messages`, an error answer (the gateway's, or a backend's in OpenAI's shape) in
/// Anthropic's shape `{"type":"error","error":{"type","message"}}`.
async fn anthropic_errors(anthropic: bool, response: Response) -> Response {
    if !anthropic || response.status().is_success() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let body = Limited::new(body, ERROR_BODY_LIMIT)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    match crate::error::openai_error_to_anthropic(parts.status, &body) {
        Some(converted) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(converted))
        }
        None => Response::from_parts(parts, Body::from(body)),
    }
}

/// An answer given before the request body was read to its end. hyper may
/// close such a connection after the answer, and a client that did not see
/// it coming would send its next request into the closing connection: say so.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The gateway's own error answer to a request that named a known model.
fn failed(metrics: RequestMetrics, error: ApiError) -> Response {
    metrics.finish(error.status.as_u16());
    error.into_response()
}

/// Retries of a request whose backend failed before answering.
const MAX_REFUSALS: u32 = 3;
/// How long such a request waits for the supervisor to report the dead backend.
const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// Waits until the route of `generation` is no longer the accepting route of `model`.
async fn route_replaced(gateway: &Gateway, model: &str, generation: u64) -> bool {
    let deadline = tokio::time::Instant::now() + REFUSAL_GRACE;
    loop {
        let current = gateway.routes.get(model);
        let stale = current.is_some_and(|r| r.generation == generation && r.accepting.load(SeqCst));
        if !stale {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A request ready to go upstream once a route is granted.
pub struct Upstream {
    parts: Parts,
    body: Bytes,
    probed: Probed,
    /// The request's trace span (disabled when no spans are exported).
    span: Span,
    /// Counted against `queue_memory` and `max_queued` until forwarded.
    held: Option<Held>,

    shape: BodyShape,
}

/// What a request holds of the gateway's limits until it is forwarded.
struct Held {
    _body: BodyReservation,
    /// Taken when the request has to wait for its model.
    place: Option<QueueSlot>,
}

/// What the body is, which says how the model is renamed for the backend.
pub enum BodyShape {
    /// JSON with `model` (its span is a string literal).
    Json,
    /// multipart/form-data with a `model` field (its span is the raw value).
    Form,
    /// A pass-through to this backend path: the body goes as it came.
    Opaque(Uri),
}

impl Upstream {
    /// The request goes to its backend: its body and place no longer count
    /// as waiting (the backend takes it at its own pace from here).
    pub fn forwarding(&mut self) {
        self.held = None;
    }

    pub fn is_chat(&self) -> bool {
        self.parts.uri.path().ends_with("/chat/completions")
    }

    /// An Anthropic Messages request: its errors are Anthropic-shaped.
    pub fn anthropic(&self) -> bool {
        is_anthropic(self.parts.uri.path())
    }

    pub fn requested_model(&self) -> &str {
        &self.probed.model
    }

    /// The upstream request for `route`: same method, path, query and headers
    /// (less hop-by-hop and the client's credentials), the backend's key, and
    /// the body with the model renamed when the backend serves another name.
    fn to_request(&self, route: &Route) -> Request<Full<Bytes>> {
        let renamed: Option<&[u8]> = match &self.shape {
            _ if self.probed.model == route.served_name => None,
            BodyShape::Json => Some(&route.served_name_json[..]),
            BodyShape::Form => Some(route.served_name.as_bytes()),
            BodyShape::Opaque(_) => None,
        };
        let body = match renamed {
            Some(name) => splice(&self.body, self.probed.span.clone(), name),
            None => self.body.clone(),
        };
        // Origin form: the connection is already the backend's.
        let uri = match &self.shape {
            BodyShape::Opaque(target) => target.clone(),
            _ => self
                .parts
                .uri
                .path_and_query()
                .cloned()
                .map(Uri::from)
                .unwrap_or_else(|| Uri::from_static("/")),
        };
        let mut headers = HeaderMap::with_capacity(self.parts.headers.len() + 2);
        let hop_by_hop = named_by_connection(&self.parts.headers);
        for (name, value) in &self.parts.headers {
            if !STRIPPED_REQUEST_HEADERS.contains(&name.as_str()) && !hop_by_hop.contains(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(header::HOST, route.host.clone());
        if let Some((bearer, key)) = &route.api_key {
            headers.insert(header::AUTHORIZATION, bearer.clone());
            headers.insert(X_API_KEY, key.clone());
        }
        // After the copy: the gateway's span replaces the client's `traceparent`.
        if gpuswap_telemetry::exporting() {
            self.span
                .in_scope(|| gpuswap_telemetry::inject_http(&mut headers));
        }
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = self.parts.method.clone();
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        request
    }
}

const X_API_KEY: header::HeaderName = header::HeaderName::from_static("x-api-key");

/// Hop-by-hop headers, the client's credentials for the gateway, and what
/// the client sets from the new body and URI.
static STRIPPED_REQUEST_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "authorization",
    "x-api-key",
];

static STRIPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "trailer",
    "upgrade",
];

/// What came of forwarding a request.
pub enum Forwarded {
    Response(Response),
    /// The connection failed before any answer (refused, reset, closed).
    Unanswered {
        generation: u64,
        error: String,
        /// The request was written whole: it must not be sent again.
        delivered: bool,
        /// Still recording: the request may be retried.
        metrics: RequestMetrics,
    },
}

/// Forwards a granted request and streams the answer back.
pub async fn forward(
    upstream: &Upstream,
    guard: InFlight,
    mut metrics: RequestMetrics,
) -> Forwarded {
    let route = Arc::clone(guard.route());
    metrics.forwarding();
    let response = match route.pool.send(|| upstream.to_request(&route)).await {
        Ok(r) => r,
        Err(e) => {
            return Forwarded::Unanswered {
                generation: route.generation,
                error: error_chain(&e),
                delivered: e.delivered(),
                metrics,
            };
        }
    };
    let (mut parts, incoming) = response.into_parts();
    let passthrough = matches!(upstream.shape, BodyShape::Opaque(_));
    if !parts.status.is_success() && !passthrough {
        let body = read_error_body(incoming).await;
        drop(guard);
        metrics.first_byte();
        let response = match convert_backend_error(parts.status, &body) {
            Some(error) => error.into_response(),
            None => {
                strip_response_headers(&mut parts.headers);
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Body::from(body))
            }
        };
        metrics.finish(response.status().as_u16());
        return Forwarded::Response(response);
    }
    strip_response_headers(&mut parts.headers);
    let sse = is_event_stream(&parts.headers);
    if sse {
        add_event_stream_headers(&mut parts.headers);
    }
    let body = GuardedBody::new(
        incoming,
        guard,
        sse,
        upstream.anthropic(),
        parts.status,
        metrics,
        upstream.span.clone(),
    );
    Forwarded::Response(Response::from_parts(parts, Body::new(body)))
}

/// For a streaming request whose 200 already went out: the upstream body, or
/// the SSE event that reports why there is none.
pub async fn forward_stream(
    gateway: Arc<Gateway>,
    mut upstream: Upstream,
    guard: InFlight,
    mut metrics: RequestMetrics,
) -> Result<GuardedBody, Bytes> {
    upstream.forwarding();
    match open_stream(&gateway, &upstream, guard, &mut metrics).await {
        Ok((status, incoming, guard)) => Ok(GuardedBody::new(
            incoming,
            guard,
            true,
            upstream.anthropic(),
            status,
            metrics,
            upstream.span.clone(),
        )),
        Err((status, event)) => {
            metrics.finish(status.as_u16());
            Err(event)
        }
    }
}

/// The upstream answer of a streaming request, or the status and SSE event of its failure.
async fn open_stream(
    gateway: &Gateway,
    upstream: &Upstream,
    mut guard: InFlight,
    metrics: &mut RequestMetrics,
) -> Result<(StatusCode, UpstreamBody, InFlight), (StatusCode, Bytes)> {
    let anthropic = upstream.anthropic();
    let as_event = |e: ApiError| (e.status, e.sse_event_for(anthropic));
    let model = Arc::clone(&guard.route().model);
    let mut refusals = 0;
    let response = loop {
        let route = Arc::clone(guard.route());
        metrics.forwarding();
        match route.pool.send(|| upstream.to_request(&route)).await {
            Ok(response) => break response,
            Err(e) if refusals < MAX_REFUSALS => {
                refusals += 1;
                drop(guard);
                if !route_replaced(gateway, &model, route.generation).await {
                    return Err(as_event(ApiError::backend_unavailable(
                        &model,
                        error_chain(&e),
                    )));
                }
                guard = regrant(gateway, &model).await.map_err(as_event)?;
                // Read whole by a backend that may be running it still: only
                // a new one (its predecessor is gone) gets it again.
                if e.delivered() && guard.route().generation == route.generation {
                    return Err(as_event(ApiError::backend_unavailable(
                        &model,
                        error_chain(&e),
                    )));
                }
            }
            Err(e) => {
                return Err(as_event(ApiError::backend_unavailable(
                    &model,
                    error_chain(&e),
                )));
            }
        }
    };
    let (parts, incoming) = response.into_parts();
    if !parts.status.is_success() {
        let body = read_error_body(incoming).await;
        metrics.first_byte();
        return Err(match convert_backend_error(parts.status, &body) {
            Some(error) => as_event(error),
            None => {
                let mut event = b"data: ".to_vec();
                event.extend(body.iter().filter(|b| **b != b'\n' && **b != b'\r'));
                event.extend_from_slice(b"\n\n");
                (parts.status, Bytes::from(event))
            }
        });
    }
    Ok((parts.status, incoming, guard))
}

/// A route for a request whose first route went away: at once or after a wait.
async fn regrant(gateway: &Gateway, model: &Arc<str>) -> Result<InFlight, ApiError> {
    if let Some(guard) = gateway.routes.get(model).and_then(|r| r.try_enter()) {
        return Ok(guard);
    }
    let ticket = gateway.scheduler.wait(Arc::clone(model), None);
    match tokio::time::timeout(gateway.queue_timeout, ticket).await {
        Ok(granted) => granted,
        Err(_) => Err(ApiError::queue_timeout(model, gateway.queue_timeout)),
    }
}

async fn read_error_body(incoming: UpstreamBody) -> Bytes {
    match Limited::new(incoming, ERROR_BODY_LIMIT).collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    }
}

fn strip_response_headers(headers: &mut HeaderMap) {
    for name in named_by_connection(headers) {
        headers.remove(name);
    }
    for name in STRIPPED_RESPONSE_HEADERS {
        headers.remove(*name);
    }
}

/// The headers a message's `Connection` names (RFC 9110 7.6.1): they are
/// for this hop only, and a proxy removes them with `Connection` itself.
fn named_by_connection(headers: &HeaderMap) -> Vec<header::HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| header::HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect()
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

pub fn add_event_stream_headers(headers: &mut HeaderMap) {
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

/// The upstream body, passed through frame by frame, holding the request's
/// in-flight count until it ends or the client goes away (dropping it drops
/// the upstream body, which cancels the upstream request).
pub struct GuardedBody {
    inner: UpstreamBody,
    guard: Option<InFlight>,
    /// An event stream reports a broken upstream as a final error event.
    sse: bool,
    /// That event in Anthropic's shape (`/v1/messages`).
    anthropic: bool,
    done: bool,
    /// The upstream status, recorded when the body ends.
    status: StatusCode,
    /// Until the body ends; dropped earlier (the client went away), it records a 499.
    metrics: Option<RequestMetrics>,
    tokens: TokenCounter,
    /// Keeps the request's span open until the last byte.
    _span: Span,
}

/// Recorded for a stream that broke after its 200 went out.
const BROKEN_STREAM: u16 = 502;

impl GuardedBody {
    pub fn new(
        inner: UpstreamBody,
        guard: InFlight,
        sse: bool,
        anthropic: bool,
        status: StatusCode,
        metrics: RequestMetrics,
        span: Span,
    ) -> Self {
        Self {
            inner,
            guard: Some(guard),
            sse,
            anthropic,
            done: false,
            status,
            metrics: Some(metrics),
            tokens: TokenCounter::new(if sse {
                Counting::Stream
            } else {
                Counting::Usage
            }),
            _span: span,
        }
    }

    fn count(&mut self, frame: &Frame<Bytes>) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        metrics.first_byte();
        if let Some(data) = frame.data_ref() {
            let counted = self.tokens.scan(data);
            if counted.chunks > 0 {
                metrics.add_tokens(counted.chunks);
            }
            if let Some(usage) = counted.usage {
                metrics.usage_tokens(usage);
            }
        }
    }

    fn finish(&mut self, status: u16) {
        if let Some(metrics) = self.metrics.take() {
            metrics.finish(status);
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // A body of known length may be dropped after its last frame without
        // being polled to its end: that is a complete answer, not a client gone.
        if self.inner.is_end_stream() {
            let status = self.status.as_u16();
            self.finish(status);
        }
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                self.count(&frame);
                if self.inner.is_end_stream() {
                    let status = self.status.as_u16();
                    self.finish(status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.done = true;
                self.finish(BROKEN_STREAM);
                let guard = self.guard.take();
                if self.sse {
                    let model = guard
                        .as_ref()
                        .map(|g| Arc::clone(&g.route().model))
                        .unwrap_or_default();
                    let error = ApiError::backend_unavailable(
                        &model,
                        format!("the stream broke: {}", error_chain(&e)),
                    );
                    let mut event = b"\n\n".to_vec();
                    event.extend_from_slice(&error.sse_event_for(self.anthropic));
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
            None => {
                self.done = true;
                self.guard = None;
                let status = self.status.as_u16();
                self.finish(status);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn probe_finds_the_model_span_and_stream_flag() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\""}], "model" : "a-b", "stream":true}"#;
        let p = probe(body).unwrap();
        assert_eq!(p.model, "a-b");
        assert!(p.stream);
        assert_eq!(&body[p.span.clone()], br#""a-b""#);
        let spliced = splice(&Bytes::from_static(body), p.span, br#""served""#);
        let v: serde_json::Value = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(v["model"], "served");
        assert_eq!(v["messages"][0]["content"], "hi \"model\"");
    }

    #[test]
    fn the_model_form_field_is_found_in_place() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n\
                     name=\"model\"\r\n--Xy\r\n--XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\n\
                     whisper-1\r\n--XyZ--\r\n";
        let p = probe_form(body, "XyZ").unwrap();
        assert_eq!(p.model, "whisper-1");
        assert_eq!(&body[p.span.clone()], b"whisper-1");
        let renamed = splice(&Bytes::from_static(body), p.span, b"served");
        assert!(renamed.windows(10).any(|w| w == b"\r\nserved\r\n"));
        let none =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--XyZ--\r\n";
        assert_eq!(probe_form(none, "XyZ").unwrap_err().code, "missing_model");
        assert_eq!(
            probe_form(b"garbage", "XyZ").unwrap_err().code,
            "missing_model"
        );
        assert_eq!(
            probe_form(b"--XyZ\r\nno end", "XyZ").unwrap_err().code,
            "missing_model"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=\"XyZ\""),
        );
        assert_eq!(multipart_boundary(&headers).as_deref(), Some("XyZ"));
        assert_eq!(percent_decode("org%2Fmodel%zz"), "org/model%zz");
        // Cut anywhere: refused until the model's value is closed by a delimiter, never a panic.
        let closed = memchr::memmem::find(body, b"whisper-1\r\n--XyZ").unwrap() + 16;
        for end in 0..body.len() {
            assert_eq!(
                probe_form(&body[..end], "XyZ").is_ok(),
                end >= closed,
                "{end}"
            );
        }
    }

    #[test]
    fn headers_named_by_connection_are_hop_by_hop() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Hop"),
        );
        headers.append(header::CONNECTION, HeaderValue::from_static("x-other ,"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        headers.insert("x-end-to-end", HeaderValue::from_static("1"));
        strip_response_headers(&mut headers);
        let left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-end-to-end"]);
    }

    #[test]
    fn probe_unescapes_and_refuses_bad_bodies() {
        let p = probe(br#"{"model":"a\u002fb"}"#).unwrap();
        assert_eq!(p.model, "a/b");
        assert!(!p.stream);
        let code = |b: &[u8]| probe(b).unwrap_err().code;
        assert_eq!(code(b"{not json"), "invalid_json");
        assert_eq!(code(b"[1,2]"), "invalid_json");
        assert_eq!(code(br#"["a",true]"#), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(b"\"model\""), "invalid_json");
        assert_eq!(code(br#"{"model":"a","stream":"yes"}"#), "invalid_json");
        assert_eq!(code(br#"{"messages":[]}"#), "missing_model");
        assert_eq!(code(br#"{"model":7}"#), "missing_model");
        assert_eq!(code(br#"{"model":null}"#), "missing_model");
        assert_eq!(code(br#"{"model":["a"]}"#), "missing_model");
        assert_eq!(code(br#"{"model":{"id":"a"}}"#), "missing_model");
        assert_eq!(code(b"42"), "invalid_json");
        assert_eq!(code(b"null"), "invalid_json");
        // Invalid UTF-8 in a field the probe skips, and in the model itself.
        assert_eq!(
            code(b"{\"model\":\"a\",\"messages\":[{\"content\":\"\xff\"}]}"),
            "invalid_json"
        );
        assert_eq!(code(b"{\"model\":\"a\xc3\"}"), "invalid_json");
        assert_eq!(
            probe(b"{not json").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
