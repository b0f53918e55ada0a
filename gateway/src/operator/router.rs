//! llama-server's router API (`/models*`), which OpenWebUI uses to show and control what
//! is loaded.

use std::{collections::HashMap, sync::Arc};

use axum::{
    Extension, Json,
    extract::State,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use gpuswap::pb;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    Peer,
    actions::{start_load, unload},
    admit, admit_admin,
    events::{grant_events, sse_response},
    visible_model,
};
use crate::{
    Gateway,
    catalog::{Event, EventKind, ModelInfo},
    error::json_response,
};

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
pub(super) async fn router_models(state: State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    crate::server::list_models(state, headers).await
}

#[derive(Deserialize)]
pub(super) struct RouterModel {
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
pub(super) async fn router_load(
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
pub(super) async fn router_unload(
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
pub(super) async fn router_sse(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
) -> Response {
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
