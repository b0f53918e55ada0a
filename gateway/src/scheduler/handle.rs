//! The handle request handlers hold: a wait is a message to the actor, answered on a ticket.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::SeqCst},
};

use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{Message, Progress, Waiter};
use crate::{error::ApiError, route::InFlight};

/// The handle request handlers use to wait for a model.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Message>,
    next_waiter: Arc<AtomicU64>,
}

impl Scheduler {
    pub(super) fn new(tx: mpsc::UnboundedSender<Message>) -> Self {
        Self {
            tx,
            next_waiter: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Queues a request for `model`; await the ticket for the grant. Call it
    /// inside the request's span.
    pub fn wait(&self, model: Arc<str>, progress: Option<mpsc::Sender<Progress>>) -> WaitTicket {
        let id = self.next_waiter.fetch_add(1, SeqCst);
        let (reply, rx) = oneshot::channel();
        let span = if gpuswap_telemetry::exporting() {
            Span::current()
        } else {
            Span::none()
        };
        let waiter = Waiter {
            id,
            reply,
            progress,
            span,
            swap_counted: false,
        };
        let _ = self.tx.send(Message::Wait {
            model: Arc::clone(&model),
            waiter,
        });
        WaitTicket {
            id,
            model,
            tx: self.tx.clone(),
            rx,
            settled: false,
        }
    }
}

/// A queued request. Dropping it before the grant leaves the queue at once.
pub struct WaitTicket {
    id: u64,
    model: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
    rx: oneshot::Receiver<Result<InFlight, ApiError>>,
    settled: bool,
}

impl std::future::Future for WaitTicket {
    type Output = Result<InFlight, ApiError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = std::pin::Pin::new(&mut self.rx).poll(cx);
        polled.map(|result| {
            self.settled = true;
            result.unwrap_or_else(|_| {
                Err(ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "scheduler_stopped",
                    "The gateway's scheduler stopped",
                ))
            })
        })
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.tx.send(Message::WaiterGone {
                model: Arc::clone(&self.model),
                id: self.id,
            });
        }
    }
}
