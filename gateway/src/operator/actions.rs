//! What the operator does to a model: load it (the gateway's own activation, held like
//! after traffic), unload it or put it to sleep (Deactivate calls).

use std::sync::Arc;

use axum::{
    extract::{Query, State},
    response::{IntoResponse, Response},
};
use gpuswap::pb;
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::AdminModel;
use crate::{
    Gateway,
    catalog::ModelInfo,
    error::{ApiError, json_response},
};

#[derive(Deserialize)]
pub(super) struct LoadQuery {
    /// Answer once the model is ready (or failed) instead of at once.
    #[serde(default)]
    wait: bool,
}

/// Starts the gateway's activation of `model` (it then holds the model like after traffic):
/// the returned receiver tells how it ended.
pub(super) fn start_load(
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
pub(super) async fn api_load(
    State(gateway): State<Arc<Gateway>>,
    AdminModel(model, Query(query)): AdminModel<Query<LoadQuery>>,
) -> Response {
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
pub(super) async fn unload(gateway: &Gateway, model: &str) -> Result<Vec<String>, ApiError> {
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
pub(super) async fn api_unload(
    State(gateway): State<Arc<Gateway>>,
    AdminModel(model, ()): AdminModel,
) -> Response {
    admin_deactivate(&gateway, &model, false).await
}

/// `POST /api/models/{model}/sleep` (admin): answers once the model is asleep (409 when it
/// has no sleep protocol or the host memory budget does not allow it). `load` wakes it.
pub(super) async fn api_sleep(
    State(gateway): State<Arc<Gateway>>,
    AdminModel(model, ()): AdminModel,
) -> Response {
    admin_deactivate(&gateway, &model, true).await
}

async fn admin_deactivate(gateway: &Gateway, model: &ModelInfo, sleep: bool) -> Response {
    match deactivate(gateway, &model.name, sleep).await {
        Ok(stopped) => {
            let state = if sleep { "sleeping" } else { "stopped" };
            let body = json!({ "model": &*model.name, "state": state, "stopped": stopped });
            json_response(StatusCode::OK, body.to_string().into())
        }
        Err(error) => error.into_response(),
    }
}
