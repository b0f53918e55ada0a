//! The operator's view: the status API (`/api/*`), llama-server's router API (`/models*`,
//! which OpenWebUI uses to show and control what is loaded) and the status page (`/ui/`).
//!
//! Everything here goes through the supervisor's API as any client would: loads are the
//! gateway's own activations (the scheduler's, like traffic), unloads are Deactivate calls,
//! logs are the Logs stream, and states come from the catalog's Watch stream.

use std::{
    collections::{HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    body::Body,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, stream};
use gpuswap::pb;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use crate::{
    Gateway,
    access::Grant,
    catalog::{Event, EventKind, ModelInfo},
    error::{ApiError, json_response},
    proxy::add_event_stream_headers,
};

/// The address of the client of a connection (set by the accept loop).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// SSE comments sent this often on idle event streams (proxies close silent connections).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// The window over which tokens per second are averaged.
const RATE_WINDOW: Duration = Duration::from_secs(10);

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/api/status", get(api_status))
        .route("/api/events", get(api_events))
        .route("/api/models/{model}/logs", get(api_logs))
        .route("/api/models/{model}/load", post(api_load))
        .route("/api/models/{model}/unload", post(api_unload))
        .route("/api/models/{model}/sleep", post(api_sleep))
        .route("/models", get(router_models))
        .route("/models/load", post(router_load))
        .route("/models/unload", post(router_unload))
        .route("/models/sse", get(router_sse))
        .route("/ui", get(ui_redirect))
        .route("/ui/", get(ui_page))
        .route("/ui/app.js", get(ui_script))
        .route("/ui/style.css", get(ui_style))
}

// ---- access ----

fn admit(gateway: &Gateway, headers: &HeaderMap) -> Result<Grant, ApiError> {
    gateway
        .access
        .grant(headers)
        .ok_or_else(ApiError::invalid_api_key)
}

fn admit_admin(
    gateway: &Gateway,
    headers: &HeaderMap,
    peer: Option<Extension<Peer>>,
) -> Result<Grant, ApiError> {
    let grant = admit(gateway, headers)?;
    let ip = peer.map(|Extension(Peer(addr))| addr.ip());
    if gateway.access.may_administer(&grant, ip) {
        Ok(grant)
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "admin_required",
            "This action needs an admin key (gateway.admin_keys, or a key with admin = true); \
             with none configured, it is allowed from loopback only",
        ))
    }
}

/// The model a name or alias names, if the grant may see it.
fn visible_model(gateway: &Gateway, grant: &Grant, name: &str) -> Result<Arc<ModelInfo>, ApiError> {
    let catalog = gateway.catalog.load();
    match catalog.resolve(name) {
        Some(model) if grant.allows(model) => Ok(Arc::clone(model)),
        _ => Err(ApiError::model_not_found(name)),
    }
}

/// The model an admin action names: the caller must be an admin and allowed to see it.
fn admin_model(
    gateway: &Gateway,
    headers: &HeaderMap,
    peer: Option<Extension<Peer>>,
    name: &str,
) -> Result<Arc<ModelInfo>, ApiError> {
    let grant = admit_admin(gateway, headers, peer)?;
    visible_model(gateway, &grant, name)
}

// ---- the status API ----

fn state_name(state: pb::ModelState) -> &'static str {
    use pb::ModelState as S;
    match state {
        S::Stopped | S::Unspecified => "stopped",
        S::Starting => "starting",
        S::Ready => "ready",
        S::Stopping => "stopping",
        S::Failed => "failed",
        S::Unavailable => "unavailable",
        S::Sleeping => "sleeping",
    }
}

/// One model as `/api/status` and `/api/events` show it.
pub fn model_json(gateway: &Gateway, model: &ModelInfo) -> Value {
    let s = &model.status;
    let counts = gateway.gw_metrics.model_counts(&model.name);
    let route = gateway.routes.get(&model.name);
    let uptime_ms = if s.pid != 0 {
        s.uptime_ms + model.received.elapsed().as_millis() as u64
    } else {
        0
    };
    let state = match &route {
        // The gateway stopped sending to it: a swap waits for its requests to finish.
        Some(route)
            if model.state == pb::ModelState::Ready
                && !route.accepting.load(std::sync::atomic::Ordering::SeqCst) =>
        {
            "draining"
        }
        _ => state_name(model.state),
    };
    json!({
        "id": &*model.name,
        "aliases": model.aliases,
        "kind": s.kind,
        "state": state,
        "status": router_status(model),
        "pid": s.pid,
        "uptime_ms": uptime_ms,
        "restarts": s.restarts,
        "last_error": s.last_error,
        "detail": s.detail,
        "gpus": s.gpus,
        "host": s.host,
        "port": s.port,
        "served_name": s.served_name,
        "generation": s.generation,
        "holders": s.holders,
        "last_startup_ms": s.last_startup_ms,
        "idle_ttl_ms": s.idle_ttl_ms,
        "vram_bytes": s.vram_bytes,
        "pinned": s.pinned,
        "can_sleep": s.can_sleep,
        "last_used_ms": s.last_used_ms,
        "queued": counts.queued,
        "in_flight": counts.in_flight,
        "generated_tokens": counts.generated_tokens,
        "tokens_per_second": gateway.token_rates.rate(&model.name),
    })
}

/// The memory of each GPU as the supervisor last reported it: `capacity_bytes` (configured
/// or NVML's total), `reserved_bytes` (the vram of gpuswap's live models on it), `used_bytes`
/// (NVML's; null without NVML), `free_bytes` (what another model could still take: the
/// capacity less the larger of reserved and used) and the live models on it that `grant`
/// may see.
pub fn gpus_json(gateway: &Gateway, grant: &Grant) -> Vec<Value> {
    let catalog = gateway.catalog.load();
    gateway
        .catalog
        .gpus()
        .iter()
        .map(|gpu| {
            let taken = gpu.reserved_bytes.max(gpu.used_bytes.unwrap_or(0));
            let models: Vec<&str> = gpu
                .models
                .iter()
                .filter(|name| catalog.resolve(name).is_some_and(|m| grant.allows(m)))
                .map(String::as_str)
                .collect();
            json!({
                "index": gpu.index,
                "capacity_bytes": gpu.capacity_bytes,
                "reserved_bytes": gpu.reserved_bytes,
                "used_bytes": gpu.used_bytes,
                "free_bytes": gpu.capacity_bytes.map(|c| c.saturating_sub(taken)),
                "models": models,
            })
        })
        .collect()
}

fn status_json(gateway: &Gateway, grant: &Grant, admin: bool) -> Value {
    let catalog = gateway.catalog.load();
    let models: Vec<Value> = catalog
        .models
        .values()
        .filter(|m| grant.allows(m))
        .map(|m| model_json(gateway, m))
        .collect();
    let connected = gateway.catalog.connected();
    json!({
        "gateway": { "version": env!("CARGO_PKG_VERSION"), "started_unix": gateway.started_unix },
        "supervisor": {
            "endpoint": gateway.supervisor_endpoint,
            "connected": connected,
            "error": if connected { None } else { Some(gateway.catalog.last_error()) },
        },
        "admin": admin,
        "models": models,
        "gpus": gpus_json(gateway, grant),
        "swaps": gateway.swaps.recent(grant),
    })
}

async fn api_status(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let grant = match admit(&gateway, &headers) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let ip = peer.map(|Extension(Peer(a))| a.ip());
    let admin = gateway.access.may_administer(&grant, ip);
    json_response(
        StatusCode::OK,
        status_json(&gateway, &grant, admin).to_string().into(),
    )
}

fn sse_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn sse_response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut response = Response::new(Body::from_stream(body.map(Ok::<_, Infallible>)));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    add_event_stream_headers(headers);
    response
}

/// The grant's events from the catalog's feed, with keep-alive comments while idle and a
/// fresh start (`None`) after the subscriber fell too far behind.
fn grant_events(
    gateway: Arc<Gateway>,
    grant: Grant,
) -> impl Stream<Item = Option<Result<Event, ()>>> + Send {
    let events = gateway.catalog.subscribe();
    stream::unfold(events, move |mut events| {
        let gateway = Arc::clone(&gateway);
        let grant = grant.clone();
        async move {
            loop {
                match tokio::time::timeout(KEEPALIVE, events.recv()).await {
                    Err(_) => return Some((Some(Err(())), events)),
                    Ok(Err(RecvError::Lagged(_))) => return Some((None, events)),
                    Ok(Err(RecvError::Closed)) => return None,
                    Ok(Ok(event)) => {
                        let visible = match &event.kind {
                            EventKind::Status(model) => grant.allows(model),
                            // Rendered per grant (names of hidden models left out).
                            EventKind::Gpus => true,
                            _ => gateway
                                .catalog
                                .load()
                                .resolve(&event.model)
                                .is_some_and(|m| grant.allows(m)),
                        };
                        if visible {
                            return Some((Some(Ok(event)), events));
                        }
                    }
                }
            }
        }
    })
}

/// `GET /api/events`: a `snapshot` (as `/api/status`), then `model` (one model's new
/// status), `progress` (`{model, phase, text}`) and `removed` events as they happen.
async fn api_events(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let grant = match admit(&gateway, &headers) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let ip = peer.map(|Extension(Peer(a))| a.ip());
    let admin = gateway.access.may_administer(&grant, ip);
    let first = sse_event("snapshot", &status_json(&gateway, &grant, admin));
    let g = Arc::clone(&gateway);
    let grant2 = grant.clone();
    let rest = grant_events(Arc::clone(&gateway), grant).map(move |item| match item {
        None => sse_event("snapshot", &status_json(&g, &grant2, admin)),
        Some(Err(())) => Bytes::from_static(b": keep-alive\n\n"),
        Some(Ok(event)) => match event.kind {
            EventKind::Status(model) => sse_event("model", &model_json(&g, &model)),
            EventKind::Progress { phase, text } => sse_event(
                "progress",
                &json!({ "model": &*event.model, "phase": phase, "text": text }),
            ),
            EventKind::Removed => sse_event("removed", &json!({ "model": &*event.model })),
            EventKind::Gpus => sse_event("gpus", &json!({ "gpus": gpus_json(&g, &grant2) })),
        },
    });
    sse_response(stream::once(async move { first }).chain(rest))
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Past lines sent first.
    tail: Option<u32>,
}

/// `GET /api/models/{model}/logs?follow=true&tail=N`: the backend's captured lines as SSE
/// `data: {"stream","line","time_ms"}` events (admin).
async fn api_logs(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(query): Query<LogsQuery>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let model = match admin_model(&gateway, &headers, peer, &name) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let mut client = gateway.supervisor.clone();
    let request = pb::LogsRequest {
        model: model.name.to_string(),
        tail: query.tail.unwrap_or(200),
        follow: query.follow,
    };
    let lines = match client.logs(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            return ApiError::supervisor_unavailable(crate::catalog::describe_status(&status))
                .into_response();
        }
    };
    let body = stream::unfold(lines, |mut lines| async move {
        let next = tokio::time::timeout(KEEPALIVE, lines.message()).await;
        let chunk = match next {
            Err(_) => Bytes::from_static(b": keep-alive\n\n"),
            Ok(Ok(Some(line))) => {
                let stream = match line.stream() {
                    pb::LogStream::Stdout => "stdout",
                    pb::LogStream::Stderr => "stderr",
                    pb::LogStream::Supervisor => "supervisor",
                    pb::LogStream::Unspecified => "",
                };
                let data = json!({
                    "stream": stream,
                    "line": line.line,
                    "time_ms": line.time_ms,
                    "dropped": line.dropped,
                });
                Bytes::from(format!("data: {data}\n\n"))
            }
            Ok(_) => return None,
        };
        Some((chunk, lines))
    });
    sse_response(body)
}

#[derive(Deserialize)]
struct LoadQuery {
    /// Answer once the model is ready (or failed) instead of at once.
    #[serde(default)]
    wait: bool,
}

/// Starts the gateway's activation of `model` (it then holds the model like after traffic):
/// the returned receiver tells how it ended.
fn start_load(
    gateway: &Arc<Gateway>,
    model: Arc<str>,
) -> tokio::sync::oneshot::Receiver<Result<(), ApiError>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ticket = gateway.scheduler.wait(Arc::clone(&model), None);
    let timeout = gateway.queue_timeout;
    // Its own task: a load goes on when the caller leaves (a page that reloads, a script
    // that does not wait).
    tokio::spawn(async move {
        let result = match tokio::time::timeout(timeout, ticket).await {
            Ok(Ok(_in_flight)) => Ok(()),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(ApiError::queue_timeout(&model, timeout)),
        };
        let _ = tx.send(result);
    });
    rx
}

/// `POST /api/models/{model}/load[?wait=true]` (admin): 202 at once, or the outcome.
async fn api_load(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    Query(query): Query<LoadQuery>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    let model = match admin_model(&gateway, &headers, peer, &name) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let outcome = start_load(&gateway, Arc::clone(&model.name));
    if !query.wait {
        let body = json!({ "model": &*model.name, "state": "starting" });
        return json_response(StatusCode::ACCEPTED, body.to_string().into());
    }
    match outcome.await {
        Ok(Ok(())) => {
            let body = json!({ "model": &*model.name, "state": "ready" });
            json_response(StatusCode::OK, body.to_string().into())
        }
        Ok(Err(error)) => error.into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "scheduler_stopped",
            "The gateway's scheduler stopped",
        )
        .into_response(),
    }
}

/// Stops `model` through the supervisor (its holders drain first).
async fn unload(gateway: &Gateway, model: &str) -> Result<Vec<String>, ApiError> {
    deactivate(gateway, model, false).await
}

/// Stops `model` (with `sleep`: puts it to sleep) through the supervisor, its holders
/// draining first. A model that cannot sleep is a 409 saying why.
async fn deactivate(gateway: &Gateway, model: &str, sleep: bool) -> Result<Vec<String>, ApiError> {
    let mut client = gateway.supervisor.clone();
    let request = pb::DeactivateRequest {
        model: model.to_owned(),
        all: false,
        force: false,
        if_idle_generation: None,
        sleep,
    };
    match client.deactivate(request).await {
        Ok(response) => Ok(response.into_inner().stopped),
        Err(status) if sleep && status.code() == tonic::Code::FailedPrecondition => {
            Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                "cannot_sleep",
                status.message().to_owned(),
            ))
        }
        Err(status) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            if sleep {
                "sleep_failed"
            } else {
                "unload_failed"
            },
            format!(
                "The supervisor could not {} model `{model}`: {}",
                if sleep { "put to sleep" } else { "stop" },
                crate::catalog::describe_status(&status)
            ),
        )),
    }
}

/// `POST /api/models/{model}/unload` (admin): answers once the backend is gone.
async fn api_unload(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    admin_deactivate(&gateway, &name, peer, &headers, false).await
}

/// `POST /api/models/{model}/sleep` (admin): answers once the model is asleep (409 when it
/// has no sleep protocol or the host memory budget does not allow it). `load` wakes it.
async fn api_sleep(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
) -> Response {
    admin_deactivate(&gateway, &name, peer, &headers, true).await
}

async fn admin_deactivate(
    gateway: &Gateway,
    name: &str,
    peer: Option<Extension<Peer>>,
    headers: &HeaderMap,
    sleep: bool,
) -> Response {
    let model = match admin_model(gateway, headers, peer, name) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    match deactivate(gateway, &model.name, sleep).await {
        Ok(stopped) => {
            let state = if sleep { "sleeping" } else { "stopped" };
            let body = json!({ "model": &*model.name, "state": state, "stopped": stopped });
            json_response(StatusCode::OK, body.to_string().into())
        }
        Err(error) => error.into_response(),
    }
}

// ---- llama-server's router API ----

/// `status` as llama-server's router reports it: `{"value": "loaded" | "loading" |
/// "unloaded"}`, plus `"failed": true` for a model whose last start failed.
pub fn router_status(model: &ModelInfo) -> Value {
    let mut status = json!({ "value": model.router_state() });
    if model.state == pb::ModelState::Failed {
        status["failed"] = json!(true);
    }
    status
}

/// `GET /models`: the same list as `/v1/models` (llama-server serves one list on both).
async fn router_models(state: State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    crate::server::list_models(state, headers).await
}

#[derive(Deserialize)]
struct RouterModel {
    #[serde(default)]
    model: String,
}

/// llama-server's router errors: `{"error": {"code", "message", "type"}}`.
fn router_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "error": { "code": status.as_u16(), "message": message, "type": kind } });
    json_response(status, body.to_string().into())
}

fn router_ok() -> Response {
    json_response(StatusCode::OK, Bytes::from_static(br#"{"success":true}"#))
}

/// Whether a backend process runs for the model (starting, ready or asleep): what the router
/// API calls running (llama-server's router does not load a sleeping child again; it unloads it).
fn router_running(model: &ModelInfo) -> bool {
    matches!(
        model.state,
        pb::ModelState::Ready | pb::ModelState::Starting | pb::ModelState::Sleeping
    )
}

/// The model a router API action (`/models/load`, `/models/unload`) names, once the caller
/// proved it may administer; else the answer to send. llama-server answers an unknown model
/// with `unknown_status` (404 on load, 400 on unload). (The answer is boxed: a `Response` is
/// large for an `Err`.)
fn router_target(
    gateway: &Gateway,
    peer: Option<Extension<Peer>>,
    headers: &HeaderMap,
    body: Option<Json<RouterModel>>,
    unknown_status: StatusCode,
) -> Result<Arc<ModelInfo>, Box<Response>> {
    let grant = admit_admin(gateway, headers, peer).map_err(|e| Box::new(e.into_response()))?;
    let name = body.map(|Json(b)| b.model).unwrap_or_default();
    visible_model(gateway, &grant, &name).map_err(|_| {
        let kind = if unknown_status == StatusCode::NOT_FOUND {
            "not_found_error"
        } else {
            "invalid_request_error"
        };
        Box::new(router_error(unknown_status, kind, "model is not found"))
    })
}

/// `POST /models/load {"model"}` (admin): `{"success": true}` once the load started.
async fn router_load(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Option<Json<RouterModel>>,
) -> Response {
    let model = match router_target(&gateway, peer, &headers, body, StatusCode::NOT_FOUND) {
        Ok(model) => model,
        Err(answer) => return *answer,
    };
    if router_running(&model) {
        return router_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model is already running",
        );
    }
    drop(start_load(&gateway, Arc::clone(&model.name)));
    router_ok()
}

/// `POST /models/unload {"model"}` (admin): `{"success": true}` once the unload started.
async fn router_unload(
    State(gateway): State<Arc<Gateway>>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Option<Json<RouterModel>>,
) -> Response {
    let model = match router_target(&gateway, peer, &headers, body, StatusCode::BAD_REQUEST) {
        Ok(model) => model,
        Err(answer) => return *answer,
    };
    if !router_running(&model) {
        return router_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "model is not running",
        );
    }
    let name = Arc::clone(&model.name);
    tokio::spawn(async move {
        if let Err(error) = unload(&gateway, &name).await {
            tracing::warn!(model = %name, "unload failed: {error}");
        }
    });
    router_ok()
}

/// `GET /models/sse`: `data: {"model", "event": "status_change", "data": {"status"}}` for
/// every change of a model's router state, as llama-server's router sends them.
async fn router_sse(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let grant = match admit(&gateway, &headers) {
        Ok(g) => g,
        Err(e) => return e.into_response(),
    };
    let mut last: HashMap<Arc<str>, &'static str> = gateway
        .catalog
        .load()
        .models
        .values()
        .map(|m| (Arc::clone(&m.name), m.router_state()))
        .collect();
    let body = grant_events(Arc::clone(&gateway), grant).filter_map(move |item| {
        let chunk = match item {
            Some(Err(())) => Some(Bytes::from_static(b": keep-alive\n\n")),
            Some(Ok(Event {
                kind: EventKind::Status(model),
                ..
            })) => {
                let state = model.router_state();
                let changed = last.insert(Arc::clone(&model.name), state) != Some(state);
                changed.then(|| {
                    let event = json!({
                        "model": &*model.name,
                        "event": "status_change",
                        "data": { "status": state },
                    });
                    Bytes::from(format!("data: {event}\n\n"))
                })
            }
            // Progress lines have no router event; a lag only loses intermediate states.
            _ => None,
        };
        std::future::ready(chunk)
    });
    sse_response(body)
}

// ---- tokens per second and the last swaps ----

/// A model's token counter over the window: when sampled, the count then.
type Samples = VecDeque<(Instant, u64)>;

/// Completion tokens per second per model, from the gateway's own counters sampled each
/// second over [`RATE_WINDOW`].
pub struct TokenRates {
    samples: Mutex<HashMap<Arc<str>, Samples>>,
    /// When the counters were 0.
    started: Instant,
}

impl Default for TokenRates {
    fn default() -> Self {
        Self {
            samples: Mutex::default(),
            started: Instant::now(),
        }
    }
}

impl TokenRates {
    pub fn rate(&self, model: &str) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let Some(window) = samples.get(model) else {
            return 0.0;
        };
        match (window.front(), window.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => {
                (n1 - n0) as f64 / t1.duration_since(*t0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    /// Samples every model's counter each second, for ever.
    pub async fn sample(gateway: Arc<Gateway>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let started = gateway.token_rates.started;
        loop {
            tick.tick().await;
            let now = Instant::now();
            let catalog = gateway.catalog.load();
            let mut samples = gateway
                .token_rates
                .samples
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for name in catalog.models.keys() {
                let count = gateway.gw_metrics.model_counts(name).generated_tokens;
                // Counters start at 0 with the gateway: a model first sampled after its
                // first tokens (the catalog came later) has that as its first sample.
                let window = samples
                    .entry(Arc::clone(name))
                    .or_insert_with(|| VecDeque::from([(started, 0)]));
                window.push_back((now, count));
                while window
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
                {
                    window.pop_front();
                }
            }
        }
    }
}

/// The last swaps the gateway saw, from the catalog's events: when each model started
/// loading and how long it took to be ready (or why it failed).
#[derive(Default)]
pub struct Swaps {
    recent: Mutex<VecDeque<Value>>,
}

const SWAPS_KEPT: usize = 20;

/// A start in progress: when it was first seen, and when each of its phases began.
type OpenSwap = (Instant, Vec<(&'static str, Instant)>);

impl Swaps {
    fn recent(&self, grant: &Grant) -> Vec<Value> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .iter()
            .filter(|swap| {
                let aliases = swap["aliases"].as_array().into_iter().flatten();
                swap["model"]
                    .as_str()
                    .is_some_and(|name| grant.allows_names(name, aliases.filter_map(Value::as_str)))
            })
            .cloned()
            .collect()
    }

    /// Follows the events for ever and records each start that ended (ready or failed),
    /// with the time spent in each phase of it.
    pub async fn follow(gateway: Arc<Gateway>) {
        let mut events = gateway.catalog.subscribe();
        // Per model: when the first step was seen and when each phase began.
        let mut open: HashMap<Arc<str>, OpenSwap> = HashMap::new();
        loop {
            let event = match events.recv().await {
                Ok(event) => event,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            };
            let now = Instant::now();
            match event.kind {
                EventKind::Progress { phase, .. } => {
                    let (_, phases) = open
                        .entry(Arc::clone(&event.model))
                        .or_insert((now, vec![]));
                    if phases.last().map(|(p, _)| *p) != Some(phase) {
                        phases.push((phase, now));
                    }
                }
                EventKind::Status(model) => {
                    let ended = match model.state {
                        pb::ModelState::Ready => "ready",
                        pb::ModelState::Failed => "failed",
                        // Another client's start (no progress of ours): timed from here.
                        pb::ModelState::Starting => {
                            open.entry(Arc::clone(&model.name))
                                .or_insert_with(|| (now, vec![("starting", now)]));
                            continue;
                        }
                        _ => continue,
                    };
                    let Some((began, phases)) = open.remove(&model.name) else {
                        continue;
                    };
                    let mut durations = serde_json::Map::new();
                    for (i, (phase, at)) in phases.iter().enumerate() {
                        let until = phases.get(i + 1).map(|(_, t)| *t).unwrap_or(now);
                        let ms = until.duration_since(*at).as_millis() as u64;
                        durations.insert((*phase).to_owned(), json!(ms));
                    }
                    let unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let swap = json!({
                        "model": &*model.name,
                        "aliases": model.aliases,
                        "outcome": ended,
                        "total_ms": now.duration_since(began).as_millis() as u64,
                        "phases_ms": durations,
                        "error": model.last_error,
                        "finished_unix_ms": unix_ms,
                    });
                    let mut recent = gateway
                        .swaps
                        .recent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    recent.push_front(swap);
                    recent.truncate(SWAPS_KEPT);
                }
                EventKind::Removed => {
                    open.remove(&event.model);
                }
                EventKind::Gpus => {}
            }
        }
    }
}

// ---- the page ----

async fn ui_redirect() -> Response {
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/ui/")]).into_response()
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The page is open (it holds no data): it asks for a key when the API wants one.
async fn ui_page() -> Response {
    asset("text/html; charset=utf-8", include_str!("ui/index.html"))
}

async fn ui_script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("ui/app.js"))
}

async fn ui_style() -> Response {
    asset("text/css; charset=utf-8", include_str!("ui/style.css"))
}
