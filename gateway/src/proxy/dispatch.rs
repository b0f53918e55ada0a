//! A request waits for its model's route (or streams progress while it waits), goes to
//! the backend, and is sent again when the backend died before answering.

use std::{
    sync::{Arc, atomic::Ordering::SeqCst},
    time::Duration,
};

use axum::response::{IntoResponse, Response};
use gpuswap_telemetry::{Refusal, RequestMetrics};

use super::forward::{Forwarded, Upstream, forward};
use crate::{Gateway, error::ApiError, waiting::WaitingStream};

/// Queues a request for its model's route (or streams progress while it waits), forwards
/// it and retries it when the backend died before answering.
pub(super) async fn dispatch(
    gateway: Arc<Gateway>,
    model: Arc<str>,
    mut upstream: Upstream,
) -> Response {
    let mut metrics = gateway.gw_metrics.request(&model);
    let deadline = tokio::time::Instant::now() + gateway.queue_timeout;
    let mut refusals = 0;
    // The generation that may have read the request, and why it did not answer.
    let mut read_by: Option<(u64, String)> = None;
    loop {
        // Fast path: a live route that accepts. No message, no lock, no copy.
        let fast = gateway.routes.get(&model).and_then(|r| r.try_enter());
        let guard = match fast {
            Some(guard) => guard,
            None => {
                if !gateway.catalog.connected() {
                    let error = ApiError::supervisor_unavailable(gateway.catalog.last_error());
                    return failed(metrics, error);
                }
                if let Some(held) = &mut upstream.held
                    && held.place.is_none()
                {
                    match gateway.limits.enter_queue() {
                        Some(place) => held.place = Some(place),
                        None => {
                            gateway.gw_metrics.refused(Refusal::QueueFull);
                            let limit = gateway.limits.max_queued();
                            return failed(metrics, ApiError::queue_full(limit));
                        }
                    }
                }
                if upstream.probed.stream {
                    return WaitingStream::start(gateway, model, upstream, metrics).into_response();
                }
                let ticket = gateway.scheduler.wait(Arc::clone(&model), None);
                match tokio::time::timeout_at(deadline, ticket).await {
                    Ok(Ok(guard)) => guard,
                    Ok(Err(e)) => return failed(metrics, e),
                    Err(_) => {
                        return failed(
                            metrics,
                            ApiError::queue_timeout(&model, gateway.queue_timeout),
                        );
                    }
                }
            }
        };
        if let Some((generation, error)) = &read_by
            && guard.route().generation == *generation
        {
            return failed(metrics, ApiError::backend_unavailable(&model, error));
        }
        upstream.forwarding();
        match forward(&upstream, guard, metrics).await {
            Forwarded::Response(response) => return response,
            Forwarded::Unanswered {
                generation,
                error,
                delivered,
                metrics: returned,
            } => {
                metrics = returned;
                // The backend died before it answered and the supervisor has
                // not told yet: retry once the route is replaced (a live
                // backend keeps its route, and the client gets the 502).
                refusals += 1;
                if refusals > MAX_REFUSALS || !route_replaced(&gateway, &model, generation).await {
                    return failed(metrics, ApiError::backend_unavailable(&model, error));
                }
                // A backend that may have read the request may be running it
                // still: only a new one (its predecessor is gone) gets it again.
                if delivered {
                    read_by = Some((generation, error));
                }
                tracing::debug!(%model, generation, "the backend failed before answering: retrying");
            }
        }
    }
}

/// The gateway's own error answer to a request that named a known model.
fn failed(metrics: RequestMetrics, error: ApiError) -> Response {
    metrics.finish(error.status.as_u16());
    error.into_response()
}

/// Retries of a request whose backend failed before answering.
pub(super) const MAX_REFUSALS: u32 = 3;
/// How long such a request waits for the supervisor to report the dead backend.
const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// Waits until the route of `generation` is no longer the accepting route of `model`.
pub(super) async fn route_replaced(gateway: &Gateway, model: &str, generation: u64) -> bool {
    let deadline = tokio::time::Instant::now() + REFUSAL_GRACE;
    loop {
        let current = gateway.routes.get(model);
        let stale = current.is_some_and(|r| r.generation == generation && r.accepting.load(SeqCst));
        if !stale {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
