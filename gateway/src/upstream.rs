//! Keep-alive HTTP/1.1 connections to one backend, each driven by the request
//! that uses it.
//!
//! A pooled client that runs every connection in a task of its own makes each
//! request, response and body chunk cross between tasks, and hands a stream's
//! events to the server one at a time: one write to the client per token.
//! Here the request's own task polls its connection, so a response costs no
//! task hop, and every event already read from the backend is taken in the
//! same pass: the server writes them to the client together, as nginx does.
//!
//! One pool per route (per backend generation): a replaced backend's idle
//! connections go with its route and are never tried against its successor.

use std::{
    collections::VecDeque,
    future::{Future, poll_fn},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response, uri::Authority};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::http1::{self, Connection, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Below uvicorn's 5 s keep-alive (SGLang, vLLM, TabbyAPI), so the gateway,
/// not the backend, gives up on idle connections: a request sent into a
/// connection the backend is closing would be lost on the way.
const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Idle connections kept per backend.
const MAX_IDLE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer from the backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        source: std::io::Error,
    },
    #[error("cannot connect to {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// One HTTP/1.1 connection: the handle that sends requests and the state
/// machine that someone has to poll for anything to move.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection ended; boxed once per connection, as it
    /// holds the buffers and moves with every request.
    driver: Option<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
}

impl Conn {
    /// Moves the connection's I/O along; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = &mut self.driver else {
            return false;
        };
        match Pin::new(&mut **driver).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!("upstream connection ended: {e}");
                }
                self.driver = None;
                false
            }
        }
    }

    /// Lets an idle connection notice a hangup and ask for its next request.
    fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// The idle keep-alive connections to one backend.
pub struct ConnPool {
    authority: Authority,
    idle: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl ConnPool {
    pub fn new(authority: Authority) -> Arc<Self> {
        Arc::new(Self {
            authority,
            idle: Mutex::new(VecDeque::new()),
        })
    }

    /// Sends the request `make` builds and waits for the answer's head; the
    /// body comes with the connection. A reused connection that fails before
    /// any answer (the backend closed it as the request went out) is retried
    /// once on a new one: the backend did not see that request.
    pub async fn send(
        self: &Arc<Self>,
        make: impl Fn() -> Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        if let Some(conn) = self.take_idle() {
            match exchange(conn, make()).await {
                Ok((response, conn)) => return Ok(self.attach(response, conn)),
                Err(e) if e.is_canceled() || e.is_incomplete_message() => {
                    tracing::debug!(upstream = %self.authority, "reused connection failed: {e}; retrying on a new one");
                }
                Err(e) => return Err(e.into()),
            }
        }
        let conn = self.connect().await?;
        let (response, conn) = exchange(conn, make()).await?;
        Ok(self.attach(response, conn))
    }

    fn attach(
        self: &Arc<Self>,
        response: Response<Incoming>,
        conn: Conn,
    ) -> Response<UpstreamBody> {
        response.map(|inner| UpstreamBody {
            inner,
            conn: Some(conn),
            pool: Arc::clone(self),
        })
    }

    async fn connect(&self) -> Result<Conn, UpstreamError> {
        let connecting = TcpStream::connect(self.authority.as_str());
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    authority: self.authority.clone(),
                    source,
                });
            }
            Err(_) => return Err(UpstreamError::ConnectTimeout(self.authority.clone())),
        };
        // Tokens are small writes: Nagle would hold each one back.
        let _ = stream.set_nodelay(true);
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        Ok(Conn {
            sender,
            driver: Some(Box::new(driver)),
        })
    }

    /// The most recently used live connection (the likeliest to be warm and open).
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let idle = self.lock().pop_back()?;
            let mut conn = idle.conn;
            if idle.since.elapsed() < IDLE_TIMEOUT && conn.usable() {
                return Some(conn);
            }
        }
    }

    fn put_idle(&self, mut conn: Conn) {
        // A `Connection: close` answer, or a backend that went away, ends here.
        if !conn.drive(&mut Context::from_waker(Waker::noop())) {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|oldest| now.duration_since(oldest.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { conn, since: now });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The queue stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends `request` on `conn`, driving the connection until the answer's head arrives.
async fn exchange(
    mut conn: Conn,
    request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Conn), hyper::Error> {
    let mut response = std::pin::pin!(conn.sender.send_request(request));
    let result = poll_fn(|cx| {
        // Polled first so the request is written and the answer read; an
        // ended connection has already failed the answer, which says why.
        conn.drive(cx);
        response.as_mut().poll(cx)
    })
    .await;
    result.map(|response| (response, conn))
}

/// A backend's answer body. Polling it drives its connection, which goes
/// back to the pool once the body has been read to its end; dropped earlier
/// (the client went away), the connection is closed, which tells the backend
/// to stop generating.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<ConnPool>,
}

impl UpstreamBody {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_idle(conn);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // The connection hands over one decoded chunk per turn: take what is
        // there, else let it decode (or read) the next one and look again.
        let mut polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some(conn) = &mut this.conn {
                conn.drive(cx);
            }
            polled = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}
