//! llama-server's router API (`/models*`), which OpenWebUI uses to show and control what
//! is loaded.

use std::{collections::HashMap, marker::PhantomData, sync::Arc};

use axum::{
    Json,
    extract::{FromRequest, Request, State},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use gpuswap::pb;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    actions::{start_load, unload},
    admit, admit_admin,
    events::{grant_events, sse_response},
    peer, visible_model,
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

/// A router API action: how it answers for a model it does not know, and the state it acts on.
pub(super) trait RouterAction {
    /// llama-server answers an unknown model with 404 on load, 400 on unload.
    const UNKNOWN_STATUS: StatusCode;
    /// Whether the model must be running for the action (else the refusal says why not).
    const ACTS_ON_RUNNING: bool;
    const REFUSAL: &'static str;
}

pub(super) struct Load;
pub(super) struct Unload;

impl RouterAction for Load {
    const UNKNOWN_STATUS: StatusCode = StatusCode::NOT_FOUND;
    const ACTS_ON_RUNNING: bool = false;
    const REFUSAL: &'static str = "model is already running";
}

impl RouterAction for Unload {
    const UNKNOWN_STATUS: StatusCode = StatusCode::BAD_REQUEST;
    const ACTS_ON_RUNNING: bool = true;
    const REFUSAL: &'static str = "model is not running";
}

/// The model a router API action (`/models/load`, `/models/unload`) names in its body
/// `{"model"}`, once the caller proved it may administer and the model is in the state the
/// action `A` acts on; else the answer to send, as llama-server's router words it.
pub(super) struct RouterTarget<A> {
    model: Arc<ModelInfo>,
    action: PhantomData<A>,
}

impl<A: RouterAction> FromRequest<Arc<Gateway>> for RouterTarget<A> {
    type Rejection = Response;

    async fn from_request(request: Request, gateway: &Arc<Gateway>) -> Result<Self, Response> {
        let (parts, body) = request.into_parts();
        let peer = peer(&parts);
        let headers = parts.headers.clone();
        let body =
            Option::<Json<RouterModel>>::from_request(Request::from_parts(parts, body), gateway)
                .await
                .map_err(IntoResponse::into_response)?;
        let grant = admit_admin(gateway, &headers, peer).map_err(IntoResponse::into_response)?;
        let name = body.map(|Json(b)| b.model).unwrap_or_default();
        let model = visible_model(gateway, &grant, &name).map_err(|_| {
            let kind = if A::UNKNOWN_STATUS == StatusCode::NOT_FOUND {
                "not_found_error"
            } else {
                "invalid_request_error"
            };
            router_error(A::UNKNOWN_STATUS, kind, "model is not found")
        })?;
        if router_running(&model) != A::ACTS_ON_RUNNING {
            return Err(router_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                A::REFUSAL,
            ));
        }
        Ok(RouterTarget {
            model,
            action: PhantomData,
        })
    }
}

/// `POST /models/load {"model"}` (admin): `{"success": true}` once the load started.
pub(super) async fn router_load(
    State(gateway): State<Arc<Gateway>>,
    target: RouterTarget<Load>,
) -> Response {
    drop(start_load(&gateway, Arc::clone(&target.model.name)));
    router_ok()
}

/// `POST /models/unload {"model"}` (admin): `{"success": true}` once the unload started.
pub(super) async fn router_unload(
    State(gateway): State<Arc<Gateway>>,
    target: RouterTarget<Unload>,
) -> Response {
    let name = Arc::clone(&target.model.name);
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
