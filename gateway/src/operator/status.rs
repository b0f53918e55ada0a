//! What the operator reads: `/api/status`, `/api/events` and a model's logs.

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{StreamExt as _, stream};
use gpuswap::pb;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AdminModel, Caller,
    events::{KEEPALIVE, grant_events, sse_event, sse_response},
    router::router_status,
};
use crate::{
    Gateway,
    access::Grant,
    catalog::{EventKind, ModelInfo},
    error::{ApiError, json_response},
};

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
        // Not reported on yet: the status page shows it stopped (the CLI says "unknown").
        _ if model.state == pb::ModelState::Unspecified => "stopped",
        _ => gpuswap::state_name(model.state),
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

pub(super) async fn api_status(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    let Caller { grant, admin } = caller;
    json_response(
        StatusCode::OK,
        status_json(&gateway, &grant, admin).to_string().into(),
    )
}

/// `GET /api/events`: a `snapshot` (as `/api/status`), then `model` (one model's new
/// status), `progress` (`{model, phase, text}`) and `removed` events as they happen.
pub(super) async fn api_events(State(gateway): State<Arc<Gateway>>, caller: Caller) -> Response {
    let Caller { grant, admin } = caller;
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
pub(super) struct LogsQuery {
    #[serde(default)]
    follow: bool,
    /// Past lines sent first.
    tail: Option<u32>,
}

/// `GET /api/models/{model}/logs?follow=true&tail=N`: the backend's captured lines as SSE
/// `data: {"stream","line","time_ms"}` events (admin).
pub(super) async fn api_logs(
    State(gateway): State<Arc<Gateway>>,
    AdminModel(model, Query(query)): AdminModel<Query<LogsQuery>>,
) -> Response {
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
