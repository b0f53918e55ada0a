//! The upstream request (the model renamed, hop-by-hop headers and the client's credentials
//! left out, the backend's key in), sent over the route's pool, and its answer passed back:
//! an error converted, a stream guarded to its end.

use std::sync::Arc;

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use gpuswap::error_chain;
use gpuswap_telemetry::RequestMetrics;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri, header, request::Parts};
use http_body_util::{BodyExt, Full, Limited};
use tracing::Span;

use super::{
    ERROR_BODY_LIMIT,
    dispatch::{MAX_REFUSALS, route_replaced},
    guarded::GuardedBody,
    probe::{Probed, splice},
    request::is_anthropic,
};
use crate::{
    Gateway,
    error::{ApiError, convert_backend_error},
    limits::{BodyReservation, QueueSlot},
    route::{InFlight, Route},
    upstream::UpstreamBody,
};

/// A request ready to go upstream once a route is granted.
pub struct Upstream {
    pub(super) parts: Parts,
    pub(super) body: Bytes,
    pub(super) probed: Probed,
    /// The request's trace span (disabled when no spans are exported).
    pub(super) span: Span,
    /// Counted against `queue_memory` and `max_queued` until forwarded.
    pub(super) held: Option<Held>,

    pub(super) shape: BodyShape,
}

/// What a request holds of the gateway's limits until it is forwarded.
pub(super) struct Held {
    pub(super) _body: BodyReservation,
    /// Taken when the request has to wait for its model.
    pub(super) place: Option<QueueSlot>,
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

/// An event stream of the gateway's own (a waiting request's progress, the status feeds):
/// 200, `text/event-stream`, not buffered by proxies on the way.
pub fn event_stream_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    add_event_stream_headers(headers);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
