//! The HTTP client of every test: reqwest over keep-alive HTTP/1.1 connections (what OpenAI
//! clients use), with whole answers ([`Reply`]) for request/response tests and answers read
//! piece by piece ([`Opened`]) for streams. A broken exchange is an answer too (its `error`):
//! the fault tests judge what a client saw when a daemon died mid-answer.
//!
//! Bytes no client would send (malformed heads, bodies that never end, half-closed sockets)
//! are not requests: the tests that need them write them on a raw socket.

use std::{sync::OnceLock, time::Instant};

use reqwest::{RequestBuilder, header::HeaderMap};
use serde_json::Value;

use crate::{DEADLINE, error_chain};

/// Idle connections kept per host: the soak and race tests run dozens of clients at once.
const IDLE_PER_HOST: usize = 128;

/// The client shared by every test of a test binary.
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(new_client)
}

/// A client with the same settings and connections of its own: they close when it is
/// dropped (a test that counts the connections a server holds lets go of them so).
pub fn new_client() -> reqwest::Client {
    reqwest::Client::builder()
        // Every test talks to 127.0.0.1: a developer's HTTP_PROXY must not get in between.
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(IDLE_PER_HOST)
        .build()
        .expect("the tests' HTTP client")
}

/// A whole answer. `status` is 0 when no answer came; `error` is set when the connection
/// or the body broke (`text` then holds what arrived before).
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    pub error: Option<String>,
}

impl Reply {
    /// True when the body arrived to its end.
    pub fn complete(&self) -> bool {
        self.error.is_none()
    }

    /// The body as JSON; panics (with the body) when it is not.
    pub fn json(&self) -> Value {
        crate::json(&self.text)
    }

    /// The value of the header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// The payloads of the SSE `data:` lines.
    pub fn sse_data(&self) -> Vec<String> {
        crate::sse_data(&self.text)
    }

    /// The JSON chunks of an SSE body (everything but `[DONE]`).
    pub fn sse_chunks(&self) -> Vec<Value> {
        self.sse_data()
            .iter()
            .filter(|data| *data != "[DONE]")
            .map(|data| crate::json(data))
            .collect()
    }
}

/// A request on the shared client: `method` to `url`, with a JSON `body` if given.
pub fn request(method: &str, url: &str, body: Option<&Value>) -> RequestBuilder {
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .unwrap_or_else(|e| panic!("HTTP method {method:?}: {e}"));
    let request = client().request(method, url);
    match body {
        Some(body) => request.json(body),
        None => request,
    }
}

/// Sends `method url` (a JSON `body` if given) and reads the whole answer.
pub async fn fetch(method: &str, url: &str, body: Option<&Value>) -> Reply {
    send(request(method, url, body)).await
}

/// `GET url`, read whole.
pub async fn get(url: &str) -> Reply {
    fetch("GET", url, None).await
}

/// `POST url` with a JSON body, read whole.
pub async fn post(url: &str, body: &Value) -> Reply {
    fetch("POST", url, Some(body)).await
}

/// GETs `url`: the body as JSON, None when nothing answered or not with JSON.
pub async fn get_json(url: &str) -> Option<Value> {
    client().get(url).send().await.ok()?.json().await.ok()
}

/// Waits until the gateway whose `/health` is at `health_url` says it reaches its supervisor
/// (what a harness does after starting a gateway). Each probe closes its connection: a test
/// that counts the gateway's connections finds none left over from the start.
pub async fn wait_gateway_connected(health_url: &str) {
    crate::wait_for("the gateway to see its supervisor", DEADLINE, || async {
        let request = client().get(health_url).header("connection", "close");
        let health: Value = request.send().await.ok()?.json().await.ok()?;
        (health["supervisor"]["connected"] == true).then_some(())
    })
    .await;
}

/// Sends `request` and reads the whole answer; a broken exchange is in `error`.
pub async fn send(request: RequestBuilder) -> Reply {
    match open(request).await {
        Ok(opened) => opened.read_to_end().await,
        Err(error) => Reply {
            error: Some(error),
            ..Reply::default()
        },
    }
}

/// Sends `request` and returns once the head of the answer arrived (within [`DEADLINE`]).
pub async fn open(request: RequestBuilder) -> Result<Opened, String> {
    let url = request
        .try_clone()
        .and_then(|r| r.build().ok())
        .map(|r| r.url().to_string())
        .unwrap_or_default();
    let response = tokio::time::timeout(DEADLINE, request.send())
        .await
        .map_err(|_| format!("no answer from {url} within {DEADLINE:?}"))?
        .map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    Ok(Opened {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        response,
    })
}

/// An answer whose head arrived; the body is read piece by piece, each within [`DEADLINE`].
pub struct Opened {
    pub status: u16,
    pub headers: HeaderMap,
    response: reqwest::Response,
}

impl Opened {
    /// The next piece of the body: None at its end, Err when it broke.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        match self.response.chunk().await {
            Ok(piece) => piece.map(|bytes| Ok(bytes.to_vec())),
            Err(e) => Some(Err(error_chain(&e))),
        }
    }

    /// The next piece within [`DEADLINE`]; a silent body is an error.
    async fn next_in_time(&mut self) -> Option<Result<Vec<u8>, String>> {
        tokio::time::timeout(DEADLINE, self.next())
            .await
            .unwrap_or_else(|_| Some(Err("no data within the deadline".to_owned())))
    }

    /// Reads until `text` (everything read so far) satisfies `done`; the text read.
    pub async fn read_until(&mut self, done: impl Fn(&str) -> bool) -> Result<String, String> {
        let mut text = Vec::new();
        while !done(&String::from_utf8_lossy(&text)) {
            match self.next_in_time().await {
                None => {
                    return Err(format!(
                        "the body ended: {}",
                        String::from_utf8_lossy(&text)
                    ));
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(piece)) => text.extend_from_slice(&piece),
            }
        }
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    /// Reads to the end, noting when each piece arrived.
    pub async fn read_timed(mut self) -> TimedBody {
        let mut pieces = Vec::new();
        let error = loop {
            match self.next_in_time().await {
                None => break None,
                Some(Err(e)) => break Some(e),
                Some(Ok(piece)) => pieces.push((Instant::now(), piece)),
            }
        };
        TimedBody {
            pieces,
            ended: Instant::now(),
            error,
        }
    }

    /// Reads to the end: the whole answer.
    pub async fn read_to_end(self) -> Reply {
        let (status, headers) = (self.status, self.headers.clone());
        let body = self.read_timed().await;
        Reply {
            status,
            headers,
            text: body.text(),
            error: body.error,
        }
    }
}

/// A body read to its end with the arrival time of each piece.
pub struct TimedBody {
    pub pieces: Vec<(Instant, Vec<u8>)>,
    pub ended: Instant,
    pub error: Option<String>,
}

impl TimedBody {
    pub fn text(&self) -> String {
        let bytes: Vec<u8> = self
            .pieces
            .iter()
            .flat_map(|(_, piece)| piece.clone())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
