//! The pool and the body against raw test backends that keep, close or reset connections.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::SeqCst},
    },
    time::Instant,
};

use bytes::Bytes;
use http::Request;
use http_body::Body as _;
use http_body_util::{BodyExt, Full};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
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
                    let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
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

/// A pool to a test backend that behaves as `behaviour`, its first request answered on
/// the backend's first connection; and the backend's count of accepted connections.
async fn pool_after_one_answer(behaviour: Behaviour) -> (Arc<ConnPool>, Arc<AtomicUsize>) {
    let (authority, accepted) = backend(behaviour).await;
    let pool = ConnPool::new(authority, TEST_IDLE);
    assert_eq!(text(&pool).await, "conn-1");
    (pool, accepted)
}

#[tokio::test]
async fn a_connection_is_reused_once_its_answer_was_read() {
    let (pool, accepted) = pool_after_one_answer(Behaviour::KeepAlive).await;
    assert_eq!(idle(&pool), 1);
    assert_eq!(text(&pool).await, "conn-1");
    assert_eq!(text(&pool).await, "conn-1");
    assert_eq!(accepted.load(SeqCst), 1);
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_not_used() {
    let (pool, accepted) = pool_after_one_answer(Behaviour::CloseAfterAnswer).await;
    // Whether or not the hangup arrived before the next request, that
    // request is answered, on a new connection.
    assert_eq!(text(&pool).await, "conn-2");
    assert_eq!(text(&pool).await, "conn-3");
    assert_eq!(accepted.load(SeqCst), 3);
}

/// A request the backend read whole and left unanswered fails, and is
/// not sent again: the backend may be running it.
async fn assert_not_sent_again(behaviour: Behaviour) {
    let (pool, accepted) = pool_after_one_answer(behaviour).await;
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
    let (pool, accepted) = pool_after_one_answer(Behaviour::ResetSecondRequestBeforeItsBody).await;
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
    let (pool, accepted) = pool_after_one_answer(Behaviour::CloseAfterAnswer).await;
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
