//! One HTTP/1.1 connection to a backend: the request's own task drives it, and what it
//! wrote tells whether a request that got no answer can have reached the backend.

use std::{
    future::{Future, poll_fn},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use http::{Request, Response, uri::Authority};
use http_body::Body;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::http1::{self, Connection, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use super::{CONNECT_TIMEOUT, UpstreamError};

/// What was written to a backend connection: tells whether a request that
/// got no answer can have reached the backend.
#[derive(Debug, Default)]
struct Writes {
    bytes: AtomicU64,
    /// A write failed since the current request started.
    failed: AtomicBool,
}

/// A backend socket that counts what is written to it.
struct CountedStream {
    inner: TcpStream,
    writes: Arc<Writes>,
}

impl CountedStream {
    fn count(&self, written: &Poll<std::io::Result<usize>>) {
        match written {
            Poll::Ready(Ok(n)) => {
                self.writes.bytes.fetch_add(*n as u64, Relaxed);
            }
            Poll::Ready(Err(_)) => self.writes.failed.store(true, Relaxed),
            Poll::Pending => {}
        }
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Err(_)) = &flushed {
            self.writes.failed.store(true, Relaxed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One HTTP/1.1 connection: the handle that sends requests and the state
/// machine that someone has to poll for anything to move.
pub(super) struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection ended; boxed once per connection, as it
    /// holds the buffers and moves with every request.
    driver: Option<Box<Connection<TokioIo<CountedStream>, Full<Bytes>>>>,
    writes: Arc<Writes>,
}

impl Conn {
    /// A new connection to `authority`, its handshake done.
    pub(super) async fn connect(authority: &Authority) -> Result<Conn, UpstreamError> {
        let connecting = TcpStream::connect(authority.as_str());
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    authority: authority.clone(),
                    source,
                });
            }
            Err(_) => return Err(UpstreamError::ConnectTimeout(authority.clone())),
        };
        // Tokens are small writes: Nagle would hold each one back.
        let _ = stream.set_nodelay(true);
        let writes = Arc::new(Writes::default());
        let stream = CountedStream {
            inner: stream,
            writes: Arc::clone(&writes),
        };
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Http {
                source,
                delivered: false,
            })?;
        Ok(Conn {
            sender,
            driver: Some(Box::new(driver)),
            writes,
        })
    }

    /// Moves the connection's I/O along; false once it has ended.
    pub(super) fn drive(&mut self, cx: &mut Context<'_>) -> bool {
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
    pub(super) fn usable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }
}

/// Sends `request` on `conn`, driving the connection until the answer's head
/// arrives; a failure says whether the request was written whole.
pub(super) async fn exchange(
    mut conn: Conn,
    request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Conn), UpstreamError> {
    let written_before = conn.writes.bytes.load(Relaxed);
    conn.writes.failed.store(false, Relaxed);
    let body_len = request.body().size_hint().exact().unwrap_or(0);
    let mut response = std::pin::pin!(conn.sender.send_request(request));
    let result = poll_fn(|cx| {
        // Polled first so the request is written and the answer read; an
        // ended connection has already failed the answer, which says why.
        conn.drive(cx);
        response.as_mut().poll(cx)
    })
    .await;
    match result {
        Ok(response) => Ok((response, conn)),
        Err(source) => {
            // Not delivered: nothing written (the connection was found
            // closed), fewer bytes than the body alone (the backend never got
            // its end: a reset while writing may fail the read first), or a
            // failed write. Anything else counts as delivered, a head cut
            // short included: better a 502 than a generation run twice.
            let written = conn.writes.bytes.load(Relaxed) - written_before;
            let delivered = written > body_len && !conn.writes.failed.load(Relaxed);
            Err(UpstreamError::Http { source, delivered })
        }
    }
}
