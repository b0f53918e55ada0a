//! The idle keep-alive connections to one backend, and sending a request over one of them.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    task::{Context, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, uri::Authority};
use http_body_util::Full;
use hyper::body::Incoming;

use super::{
    UpstreamBody, UpstreamError,
    conn::{Conn, exchange},
};

/// Idle connections kept per backend.
const MAX_IDLE: usize = 4096;

pub(super) struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle keep-alive connections to one backend.
pub struct ConnPool {
    authority: Authority,
    idle: Mutex<VecDeque<Idle>>,
    idle_timeout: Duration,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    /// A pool that keeps connections idle for up to `idle_timeout`.
    pub fn new(authority: Authority, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            authority,
            idle: Mutex::new(VecDeque::new()),
            idle_timeout,
        })
    }

    /// Sends the request `make` builds and waits for the answer's head; the
    /// body comes with the connection. A reused connection that fails before
    /// the request was written whole (found closed, or a write failed) is
    /// retried once on a new one: the backend cannot have read the request.
    /// One that fails after is not: the backend may have read it and started
    /// a generation that a second copy would run again. (The race where a
    /// backend's keep-alive timeout closes a connection just as a request
    /// goes out is avoided by `upstream_idle_timeout` being shorter than the
    /// backends' own.)
    pub async fn send(
        self: &Arc<Self>,
        make: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(conn) = self.take_idle() {
            match exchange(conn, make()).await {
                Ok((response, conn)) => return Ok(self.attach(response, conn)),
                Err(e) if !e.delivered() => {
                    tracing::debug!(upstream = %self.authority, "reused connection failed: {e}; retrying on a new one");
                }
                Err(e) => return Err(e),
            }
        }
        let conn = Conn::connect(&self.authority).await?;
        let (response, conn) = exchange(conn, make()).await?;
        Ok(self.attach(response, conn))
    }

    fn attach(
        self: &Arc<Self>,
        response: Response<Incoming>,
        conn: Conn,
    ) -> Response<UpstreamBody> {
        response.map(|inner| UpstreamBody::new(inner, conn, Arc::clone(self)))
    }

    /// The most recently used live connection (the likeliest to be warm and open).
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let idle = self.lock().pop_back()?;
            let mut conn = idle.conn;
            if idle.since.elapsed() < self.idle_timeout && conn.usable() {
                return Some(conn);
            }
        }
    }

    pub(super) fn put_idle(&self, mut conn: Conn) {
        // A `Connection: close` answer, or a backend that went away, ends here.
        if !conn.drive(&mut Context::from_waker(Waker::noop())) {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes the connections idle past the timeout and those the backend
    /// closed (uvicorn does after 5 s): without it, the connections of a
    /// burst would stay open, or half-closed, until the next burst.
    pub fn close_stale(&self) {
        let closing: Vec<Idle> = {
            let mut idle = self.lock();
            let mut closing = Vec::new();
            for mut entry in std::mem::take(&mut *idle) {
                // Polling an idle connection reads nothing unless the backend
                // hung up, so the lock is held for little.
                if entry.since.elapsed() < self.idle_timeout && entry.conn.usable() {
                    idle.push_back(entry);
                } else {
                    closing.push(entry);
                }
            }
            closing
        };
        // Closed outside the lock: requests take connections meanwhile.
        drop(closing);
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The queue stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}
