//! The HTTP front: routes, the catalog endpoints, CORS and allowed hosts,
//! and the accept loop (hyper directly, for the header read timeout).

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Path, Request, State},
    response::{IntoResponse, Response},
    routing::get,
};
use gpuswap_telemetry::Refusal;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::{net::TcpListener, sync::Semaphore};
use tower::Service;

use crate::{
    Gateway,
    browser::same_origin,
    catalog::ModelInfo,
    error::{ApiError, json_response},
    operator::{self, Peer},
    proxy,
};

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .merge(operator::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

async fn not_found(request: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("No route for {} {}", request.method(), request.uri().path()),
    )
    .into_response()
}

async fn method_not_allowed(request: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!(
            "{} is not allowed on {}",
            request.method(),
            request.uri().path()
        ),
    )
    .into_response()
}

fn model_entry(
    id: &str,
    model: &ModelInfo,
    created: u64,
    alias_of: Option<&str>,
) -> serde_json::Value {
    let status = &model.status;
    let mut gpuswap = json!({
        "state": model.public_state(),
        "vram_bytes": status.vram_bytes,
        "pinned": status.pinned,
        "last_used_ms": status.last_used_ms,
    });
    if let Some(of) = alias_of {
        gpuswap["alias_of"] = json!(of);
    }
    json!({
        "id": id,
        "object": "model",
        "created": created,
        "owned_by": "gpuswap",
        // llama-server's router field: OpenWebUI shows what is loaded from it.
        "status": operator::router_status(model),
        "gpuswap": gpuswap,
    })
}

/// Every model and every alias, from the catalog: this must answer during
/// swaps and supervisor outages alike (OpenWebUI drops models whose list fails).
pub async fn list_models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let Some(grant) = gateway.access.grant(&headers) else {
        return ApiError::invalid_api_key().into_response();
    };
    let catalog = gateway.catalog.load();
    let mut data = Vec::new();
    for model in catalog.models.values().filter(|m| grant.allows(m)) {
        data.push(model_entry(&model.name, model, gateway.started_unix, None));
        for alias in &model.aliases {
            data.push(model_entry(
                alias,
                model,
                gateway.started_unix,
                Some(&model.name),
            ));
        }
    }
    // The GPUs' memory next to the OpenAI list (clients ignore what they do not know).
    let gpus = operator::gpus_json(&gateway, &grant);
    let body = json!({ "object": "list", "data": data, "gpuswap": { "gpus": gpus } });
    json_response(StatusCode::OK, body.to_string().into())
}

async fn get_model(
    State(gateway): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let Some(grant) = gateway.access.grant(&headers) else {
        return ApiError::invalid_api_key().into_response();
    };
    let catalog = gateway.catalog.load();
    match catalog.resolve(&id) {
        Some(model) if grant.allows(model) => {
            let alias_of = (*model.name != *id).then_some(&*model.name);
            let body = model_entry(&id, model, gateway.started_unix, alias_of);
            json_response(StatusCode::OK, body.to_string().into())
        }
        _ => ApiError::model_not_found(&id).into_response(),
    }
}

/// Prometheus metrics, open like `/health`: they name configured models only.
async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, gpuswap_telemetry::CONTENT_TYPE)],
        gateway.metrics.encode(),
    )
        .into_response()
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let catalog = gateway.catalog.load();
    let routes = gateway.routes.snapshot();
    let models: Vec<_> = catalog
        .models
        .values()
        .map(|m| {
            let route = routes.get(&m.name);
            json!({
                "id": &*m.name,
                "state": m.public_state(),
                "routed": route.is_some(),
                "in_flight": route.map(|r| r.in_flight.load(std::sync::atomic::Ordering::Relaxed)).unwrap_or(0),
                "generation": route.map(|r| r.generation),
            })
        })
        .collect();
    let connected = gateway.catalog.connected();
    let body = json!({
        "status": "ok",
        "supervisor": {
            "endpoint": gateway.supervisor_endpoint,
            "connected": connected,
            "error": if connected { None } else { Some(gateway.catalog.last_error()) },
        },
        "models": models,
    });
    json_response(StatusCode::OK, body.to_string().into())
}

/// Answers a CORS preflight from an allowed origin (`allow_origin`).
fn preflight(headers: &HeaderMap, allow_origin: HeaderValue) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    let allow_headers = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static(
            "authorization, content-type, x-api-key",
        ));
    out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    out.insert(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// Routes one request after the access checks: a `Host` not in
/// `allowed_hosts` (a DNS-rebinding page) and a browser `Origin` not in
/// `cors_origins` are refused before anything runs, since a page can send a
/// simple POST (and so force a swap) without a preflight, even when it may
/// not read the answer. Model requests (`POST /v1/*` but the catalog) skip
/// the router: they are the hot path.
async fn serve_request(
    gateway: Arc<Gateway>,
    mut router: Router,
    request: Request<hyper::body::Incoming>,
) -> Result<Response, Infallible> {
    let headers = request.headers();
    if !gateway.browser.host_allowed(headers.get(header::HOST)) {
        gateway.gw_metrics.refused(Refusal::Host);
        let host = headers
            .get(header::HOST)
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .unwrap_or_default();
        return Ok(refused(ApiError::host_not_allowed(&host)));
    }
    let allow_origin = match headers.get(header::ORIGIN) {
        None => None,
        // The gateway's own pages (`/ui/`): not cross-origin, nothing to allow.
        Some(origin) if same_origin(origin, headers.get(header::HOST)) => None,
        Some(origin) => match gateway.browser.allow_origin(origin) {
            Some(allowed) => Some(allowed),
            None => {
                gateway.gw_metrics.refused(Refusal::Origin);
                let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
                return Ok(refused(ApiError::origin_not_allowed(&origin)));
            }
        },
    };
    if request.method() == Method::OPTIONS
        && let Some(allow_origin) = allow_origin.clone()
    {
        return Ok(preflight(request.headers(), allow_origin));
    }
    let path = request.uri().path();
    // Everything under /v1/ but the model list (the router's) is the proxy's, POST only.
    let inference =
        path.starts_with("/v1/") && path != "/v1/models" && !path.starts_with("/v1/models/");
    let mut response = if inference && request.method() == Method::POST {
        proxy::handle(gateway, request.map(Body::new)).await
    } else if inference {
        method_not_allowed(request.map(Body::new)).await
    } else if path.starts_with(proxy::PASSTHROUGH_PREFIX) {
        proxy::handle_passthrough(gateway, request.map(Body::new)).await
    } else {
        router.call(request.map(Body::new)).await?
    };
    if let Some(allow_origin) = allow_origin {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
    Ok(response)
}

/// A refusal answered before the body was read: the connection closes after it.
fn refused(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Accepts connections for ever, serving at most `max_connections` at once:
/// past that, the loop stops accepting, and new connections wait in the
/// kernel's listen backlog (their clients see a slow connect, not an error)
/// until a served one closes.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    header_timeout: Duration,
    max_connections: usize,
) {
    let router = router(Arc::clone(&gateway));
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                gateway.gw_metrics.connection_limit_reached();
                tracing::debug!(max_connections, "connection limit reached: not accepting");
                match Arc::clone(&slots).acquire_owned().await {
                    Ok(slot) => slot,
                    Err(_) => return, // never closed
                }
            }
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off, do not spin.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (router, gateway) = (router.clone(), Arc::clone(&gateway));
        tokio::spawn(async move {
            let _open = (slot, gateway.gw_metrics.connection_opened());
            let service = hyper::service::service_fn(move |mut request: Request<_>| {
                // Admin actions from loopback need no key when no admin key is configured.
                request.extensions_mut().insert(Peer(peer));
                serve_request(Arc::clone(&gateway), router.clone(), request)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            if !header_timeout.is_zero() {
                builder.header_read_timeout(header_timeout);
            }
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_routes_do_not_conflict() {
        // Router construction panics on conflicting routes.
        let gateway = crate::tests::test_gateway();
        let _ = router(gateway);
    }
}
