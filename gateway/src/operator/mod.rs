//! The operator's view: the status API (`/api/*`), llama-server's router API (`/models*`,
//! which OpenWebUI uses to show and control what is loaded) and the status page (`/ui/`).
//!
//! Everything here goes through the supervisor's API as any client would: loads are the
//! gateway's own activations (the scheduler's, like traffic), unloads are Deactivate calls,
//! logs are the Logs stream, and states come from the catalog's Watch stream.
//!
//! The files:
//! - this one: the routes, and who may see or act on a model.
//! - `status`: `/api/status`, `/api/events` and a model's logs.
//! - `actions`: load, unload and sleep (`/api/models/{model}/...`).
//! - `router`: llama-server's router API (`/models*`).
//! - `events`: the SSE answers both APIs stream, and the catalog's events a key may see.
//! - `activity`: tokens per second and the last swaps.
//! - `page`: the status page's files.

mod actions;
mod activity;
mod events;
mod page;
mod router;
mod status;

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::{FromRequestParts, Path},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http::{HeaderMap, StatusCode, request::Parts};

use crate::{Gateway, access::Grant, catalog::ModelInfo, error::ApiError};
pub use activity::{Swaps, TokenRates};
pub use router::router_status;
pub use status::{gpus_json, model_json};

/// The address of the client of a connection (set by the accept loop).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/api/status", get(status::api_status))
        .route("/api/events", get(status::api_events))
        .route("/api/models/{model}/logs", get(status::api_logs))
        .route("/api/models/{model}/load", post(actions::api_load))
        .route("/api/models/{model}/unload", post(actions::api_unload))
        .route("/api/models/{model}/sleep", post(actions::api_sleep))
        .route("/models", get(router::router_models))
        .route("/models/load", post(router::router_load))
        .route("/models/unload", post(router::router_unload))
        .route("/models/sse", get(router::router_sse))
        .route("/ui", get(page::ui_redirect))
        .route("/ui/", get(page::ui_page))
        .route("/ui/app.js", get(page::ui_script))
        .route("/ui/style.css", get(page::ui_style))
}

fn admit(gateway: &Gateway, headers: &HeaderMap) -> Result<Grant, ApiError> {
    gateway
        .access
        .grant(headers)
        .ok_or_else(ApiError::invalid_api_key)
}

/// The address of the connection's client, set by the accept loop.
fn peer(parts: &Parts) -> Option<Peer> {
    parts.extensions.get::<Peer>().copied()
}

/// Who calls the status API: what the key may see, and whether it may administer.
struct Caller {
    grant: Grant,
    admin: bool,
}

impl FromRequestParts<Arc<Gateway>> for Caller {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Response> {
        let grant = admit(gateway, &parts.headers).map_err(IntoResponse::into_response)?;
        let ip = peer(parts).map(|Peer(addr)| addr.ip());
        let admin = gateway.access.may_administer(&grant, ip);
        Ok(Caller { grant, admin })
    }
}

fn admit_admin(
    gateway: &Gateway,
    headers: &HeaderMap,
    peer: Option<Peer>,
) -> Result<Grant, ApiError> {
    let grant = admit(gateway, headers)?;
    let ip = peer.map(|Peer(addr)| addr.ip());
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

/// An admin action's model, which `{model}` names in the path, and what else the action reads
/// of its request (`Q`, read after the path): the caller must be an admin and allowed to see
/// the model, else the refusal is the answer.
struct AdminModel<Q = ()>(Arc<ModelInfo>, Q);

impl<Q: FromRequestParts<Arc<Gateway>>> FromRequestParts<Arc<Gateway>> for AdminModel<Q> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Response> {
        let Path(name) = Path::<String>::from_request_parts(parts, gateway)
            .await
            .map_err(IntoResponse::into_response)?;
        let request = Q::from_request_parts(parts, gateway)
            .await
            .map_err(IntoResponse::into_response)?;
        let grant = admit_admin(gateway, &parts.headers, peer(parts))
            .map_err(IntoResponse::into_response)?;
        let model = visible_model(gateway, &grant, &name).map_err(IntoResponse::into_response)?;
        Ok(AdminModel(model, request))
    }
}
