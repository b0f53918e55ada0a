//! `/upstream/{model}/{path}`: the backend's own API, behind the gateway's rules.

use std::sync::Arc;

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use http::{Request, Uri};
use tracing::Span;

use super::{
    body::{closing, read_request_body},
    dispatch::dispatch,
    forward::{BodyShape, Held, Upstream},
    probe::Probed,
    request::resolve_granted,
};
use crate::{Gateway, error::ApiError};

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
pub(super) fn percent_decode(text: &str) -> String {
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
