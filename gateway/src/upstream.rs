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
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll, Waker, ready},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, uri::Authority};
use http_body::{Body, Frame, SizeHint};
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

/// How often [`ConnPool::close_stale`] is due.
pub const IDLE_SWEEP: Duration = Duration::from_secs(1);
/// Idle connections kept per backend.
const MAX_IDLE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this much already-received body is merged into one frame.
const MERGE_LIMIT: usize = 64 << 10;

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
    /// The connection failed before an answer's head.
    #[error("{}", if *delivered {
        "the connection failed after the whole request was sent"
    } else {
        "the connection failed before the whole request was sent"
    })]
    Http {
        source: hyper::Error,
        /// Every byte of the request was written: the backend may have read
        /// it and started a generation, so it must not be sent again.
        delivered: bool,
    },
}

impl UpstreamError {
    /// Whether the backend may have seen the request whole (sending it again
    /// could run it twice); false when it cannot have.
    pub fn delivered(&self) -> bool {
        matches!(
            self,
            UpstreamError::Http {
                delivered: true,
                ..
            }
        )
    }
}

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
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection ended; boxed once per connection, as it
    /// holds the buffers and moves with every request.
    driver: Option<Box<Connection<TokioIo<CountedStream>, Full<Bytes>>>>,
    writes: Arc<Writes>,
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
            stashed: None,
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

    fn put_idle(&self, mut conn: Conn) {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        // The queue stays consistent even if a holder panicked.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends `request` on `conn`, driving the connection until the answer's head
/// arrives; a failure says whether the request was written whole.
async fn exchange(
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

/// A backend's answer body. Polling it drives its connection, which goes
/// back to the pool once the body has been read to its end; dropped earlier
/// (the client went away), the connection is closed, which tells the backend
/// to stop generating.
pub struct UpstreamBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<ConnPool>,
    /// What came after the data merged into the last frame: the end, an
    /// error or trailers, handed out by the next poll.
    stashed: Option<Option<Result<Frame<Bytes>, hyper::Error>>>,
}

impl UpstreamBody {
    /// The next frame from the connection, which hands over one decoded
    /// chunk per turn: take what is there, else let it decode (or read) the
    /// next one and look again.
    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            if let Some(conn) = &mut self.conn {
                conn.drive(cx);
            }
            polled = Pin::new(&mut self.inner).poll_frame(cx);
        }
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        polled
    }

    fn release(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_idle(conn);
        }
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
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
        if let Some(stashed) = this.stashed.take() {
            return Poll::Ready(stashed);
        }
        let data = match ready!(this.poll_next(cx)) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            },
            other => return Poll::Ready(other),
        };
        // Everything else that has already arrived goes out with it: one
        // frame, one chunk to encode and write, instead of one per token.
        let mut merged = BytesMut::new();
        while !this.inner.is_end_stream() && data.len() + merged.len() < MERGE_LIMIT {
            match this.poll_next(cx) {
                Poll::Pending => break,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(next) => {
                        if merged.is_empty() {
                            merged.reserve(MERGE_LIMIT.min(4 * (data.len() + next.len())));
                            merged.extend_from_slice(&data);
                        }
                        merged.extend_from_slice(&next);
                    }
                    Err(trailers) => {
                        this.stashed = Some(Some(Ok(trailers)));
                        break;
                    }
                },
                // The end or the error follows the data, on the next poll.
                Poll::Ready(other) => {
                    this.stashed = Some(other);
                    break;
                }
            }
        }
        let data = if merged.is_empty() {
            data
        } else {
            merged.freeze()
        };
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        match &self.stashed {
            Some(Some(_)) => false,
            _ => self.inner.is_end_stream(),
        }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use http_body_util::BodyExt;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    const TEST_IDLE: Duration = Duration::from_secs(60);

    /// How the test backend treats its connections.
    #[derive(Clone, Copy)]
    enum Behaviour {
        /// Answers every request on a connection.
        KeepAlive,
        /// Closes each connection right after its first answer (as a
        /// backend's keep-alive timeout would, between requests).
        CloseAfterAnswer,
        /// Reads the second request of a connection, then closes it unanswered
        /// (it may have started generating: the request must not be sent again).
        DropSecondRequest,
        /// The same, closing with a reset.
        ResetSecondRequest,
        /// Reads the head of the second request, then resets the connection
        /// before its body arrived (it cannot have run it).
        ResetSecondRequestBeforeItsBody,
        /// Writes these bytes as the answer (in one write), then closes.
        Raw(&'static [u8]),
    }

    /// A raw HTTP/1.1 backend; each answer names its connection's number.
    async fn backend(behaviour: Behaviour) -> (Authority, Arc<AtomicUsize>) {
        let (authority, accepted, _) = backend_counting_closes(behaviour).await;
        (authority, accepted)
    }

    /// The backend, its count of accepted connections and of connections the
    /// gateway closed.
    async fn backend_counting_closes(
        behaviour: Behaviour,
    ) -> (Authority, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (counter, closes) = (Arc::clone(&accepted), Arc::clone(&closed));
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let id = counter.fetch_add(1, SeqCst) + 1;
                let closes = Arc::clone(&closes);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for served in 0.. {
                        let Some(body_len) = read_head(&mut socket, &mut buf).await else {
                            closes.fetch_add(1, SeqCst);
                            return;
                        };
                        if matches!(behaviour, Behaviour::ResetSecondRequestBeforeItsBody)
                            && served == 1
                        {
                            socket.set_zero_linger().unwrap();
                            return;
                        }
                        if !read_body(&mut socket, &mut buf, body_len).await {
                            return;
                        }
                        if matches!(behaviour, Behaviour::DropSecondRequest) && served == 1 {
                            return;
                        }
                        if matches!(behaviour, Behaviour::ResetSecondRequest) && served == 1 {
                            socket.set_zero_linger().unwrap();
                            return;
                        }
                        if let Behaviour::Raw(answer) = behaviour {
                            socket.write_all(answer).await.unwrap();
                            return;
                        }
                        let body = format!("conn-{id}");
                        let head =
                            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                        socket.write_all((head + &body).as_bytes()).await.unwrap();
                        if matches!(behaviour, Behaviour::CloseAfterAnswer) {
                            return;
                        }
                    }
                });
            }
        });
        (authority, accepted, closed)
    }

    /// Reads one request's head; its body's length, None at end of stream.
    async fn read_head(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                buf.drain(..end + 4);
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |l| l.trim().parse().unwrap());
                return Some(length);
            }
            if !read_more(socket, buf).await {
                return None;
            }
        }
    }

    /// Reads (and drops) `length` bytes of body; false at end of stream.
    async fn read_body(socket: &mut TcpStream, buf: &mut Vec<u8>, mut length: usize) -> bool {
        loop {
            let taken = length.min(buf.len());
            buf.drain(..taken);
            length -= taken;
            if length == 0 {
                return true;
            }
            if !read_more(socket, buf).await {
                return false;
            }
        }
    }

    async fn read_more(socket: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    fn get() -> Request<Full<Bytes>> {
        Request::builder()
            .uri("/x")
            .header("host", "backend")
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn text(pool: &Arc<ConnPool>) -> String {
        let response = pool.send(get).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// Idle connections (a body read to its end returns its connection as it ends).
    fn idle(pool: &ConnPool) -> usize {
        pool.lock().len()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_answer_was_read() {
        let (authority, accepted) = backend(Behaviour::KeepAlive).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        assert_eq!(text(&pool).await, "conn-1");
        assert_eq!(idle(&pool), 1);
        assert_eq!(text(&pool).await, "conn-1");
        assert_eq!(text(&pool).await, "conn-1");
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_while_idle_is_not_used() {
        let (authority, accepted) = backend(Behaviour::CloseAfterAnswer).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        assert_eq!(text(&pool).await, "conn-1");
        // Whether or not the hangup arrived before the next request, that
        // request is answered, on a new connection.
        assert_eq!(text(&pool).await, "conn-2");
        assert_eq!(text(&pool).await, "conn-3");
        assert_eq!(accepted.load(SeqCst), 3);
    }

    /// A request the backend read whole and left unanswered fails, and is
    /// not sent again: the backend may be running it.
    async fn assert_not_sent_again(behaviour: Behaviour) {
        let (authority, accepted) = backend(behaviour).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        assert_eq!(text(&pool).await, "conn-1");
        let error = pool.send(get).await.unwrap_err();
        assert!(error.delivered(), "{error}");
        assert_eq!(accepted.load(SeqCst), 1, "sent again");
        assert_eq!(text(&pool).await, "conn-2");
    }

    #[tokio::test]
    async fn a_request_read_by_the_backend_is_not_sent_again_when_it_closes_unanswered() {
        assert_not_sent_again(Behaviour::DropSecondRequest).await;
    }

    #[tokio::test]
    async fn a_request_read_by_the_backend_is_not_sent_again_when_it_resets_unanswered() {
        assert_not_sent_again(Behaviour::ResetSecondRequest).await;
    }

    #[tokio::test]
    async fn a_request_cut_off_before_its_body_is_sent_again_on_a_new_connection() {
        let (authority, accepted) = backend(Behaviour::ResetSecondRequestBeforeItsBody).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        assert_eq!(text(&pool).await, "conn-1");
        // Larger than the socket buffers of both ends: the reset comes mid-body.
        let body = Bytes::from(vec![b'x'; 32 << 20]);
        let post = || {
            Request::builder()
                .method("POST")
                .uri("/x")
                .header("host", "backend")
                .body(Full::new(body.clone()))
                .unwrap()
        };
        let response = pool.send(post).await.expect("sent again");
        let answer = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(answer, "conn-2");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (authority, accepted) = backend(Behaviour::KeepAlive).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        let response = pool.send(get).await.unwrap();
        assert!(!response.body().is_end_stream());
        drop(response);
        assert_eq!(idle(&pool), 0);
        assert_eq!(text(&pool).await, "conn-2");
        assert_eq!(accepted.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_the_backend_closed_are_let_go() {
        let (authority, accepted) = backend(Behaviour::CloseAfterAnswer).await;
        let pool = ConnPool::new(authority, TEST_IDLE);
        assert_eq!(text(&pool).await, "conn-1");
        let deadline = Instant::now() + Duration::from_secs(30);
        while idle(&pool) > 0 {
            assert!(
                Instant::now() < deadline,
                "the half-closed connection stayed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
            pool.close_stale();
        }
        assert_eq!(accepted.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_are_closed() {
        let (authority, _, closed) = backend_counting_closes(Behaviour::KeepAlive).await;
        let pool = ConnPool::new(authority, Duration::from_secs(1));
        assert_eq!(text(&pool).await, "conn-1");
        pool.close_stale();
        assert_eq!(idle(&pool), 1, "closed before its time");
        let deadline = Instant::now() + Duration::from_secs(30);
        while closed.load(SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the idle connection stayed open");
            pool.close_stale();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(idle(&pool), 0);
    }

    /// The frames of an answer, as the server would take them.
    async fn frames(answer: &'static [u8]) -> Vec<Result<Bytes, String>> {
        let (authority, _) = backend(Behaviour::Raw(answer)).await;
        let mut body = ConnPool::new(authority, TEST_IDLE)
            .send(get)
            .await
            .unwrap()
            .into_body();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(
                frame
                    .map(|f| f.into_data().unwrap())
                    .map_err(|e| e.to_string()),
            );
        }
        frames
    }

    #[tokio::test]
    async fn events_that_arrived_together_go_out_as_one_frame() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n\
            9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n9\r\ndata: c\n\n\r\n0\r\n\r\n";
        let frames = frames(answer).await;
        assert_eq!(
            frames,
            [Ok(Bytes::from("data: a\n\ndata: b\n\ndata: c\n\n"))]
        );
    }

    #[tokio::test]
    async fn a_stream_that_breaks_hands_over_its_data_before_the_error() {
        let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
            9\r\ndata: a\n\n\r\n9\r\ndata: b\n\n\r\n";
        let frames = frames(answer).await;
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(frames[0], Ok(Bytes::from("data: a\n\ndata: b\n\n")));
        assert!(frames[1].is_err(), "{frames:?}");
    }

    #[tokio::test]
    async fn a_backend_that_is_not_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        drop(listener);
        let error = ConnPool::new(authority, TEST_IDLE)
            .send(get)
            .await
            .unwrap_err();
        assert!(matches!(error, UpstreamError::Connect { .. }), "{error}");
    }
}
