//! The SSE answers of the status and router APIs, and the catalog's events a key may see.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{body::Body, response::Response};
use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, stream};
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::{
    Gateway,
    access::Grant,
    catalog::{Event, EventKind},
    proxy::event_stream_response,
};

/// SSE comments sent this often on idle event streams (proxies close silent connections).
pub(super) const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) fn sse_event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

pub(super) fn sse_response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    event_stream_response(Body::from_stream(body.map(Ok::<_, Infallible>)))
}

/// The grant's events from the catalog's feed, with keep-alive comments while idle and a
/// fresh start (`None`) after the subscriber fell too far behind.
pub(super) fn grant_events(
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
