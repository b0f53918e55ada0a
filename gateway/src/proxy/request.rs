//! `POST /v1/*`: the key, the body, the model it names, then dispatch; on
//! `/v1/messages`, errors in Anthropic's shape.

use std::sync::Arc;

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{Request, header};
use http_body_util::{BodyExt, Limited};
use tracing::{Instrument as _, Span};

use super::{
    ERROR_BODY_LIMIT,
    body::{closing, read_request_body},
    dispatch::dispatch,
    forward::{BodyShape, Held, Upstream},
    probe::{multipart_boundary, probe, probe_form},
};
use crate::{Gateway, access::Grant, error::ApiError};

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
pub(super) fn resolve_granted(
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

/// Anthropic's Messages API: its errors are shaped like Anthropic's.
pub(super) fn is_anthropic(path: &str) -> bool {
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
