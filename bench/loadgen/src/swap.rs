//! Swap overhead: ask a proxy for a model that is not loaded and compare the
//! moment its first generated text arrives with the moment the backend itself
//! became ready.
//!
//! The backend's ready moment is observed from outside: a poller thread asks
//! the backend's readiness endpoint (the one its kind defines: `/health`, or
//! `/v1/model` for TabbyAPI) over a fresh connection every millisecond and
//! keeps the time of the first 200. So the figure is the proxy's own cost of
//! a swap beyond the backend's load time: noticing readiness, handing the
//! request over, and relaying the first token (which the mock sends at once).
//! It is late by at most one poll (~1-2 ms), which makes the overhead look
//! that much smaller.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use http_body_util::BodyExt;
use serde::Serialize;

use crate::{
    http::{Target, chat_body, connect, post},
    poller::MomentPoller,
    sse::SseParser,
};

/// How to ask a backend whether it is ready.
#[derive(Debug, Clone)]
pub struct ReadyProbe {
    pub addr: SocketAddr,
    pub path: String,
    /// Extra request header lines (`authorization: Bearer K`).
    pub headers: Vec<String>,
}

impl ReadyProbe {
    /// One probe over a fresh connection: true on a 200.
    pub fn check(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = stream.set_nodelay(true);
        let mut request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.path, self.addr
        );
        for header in &self.headers {
            request.push_str(header);
            request.push_str("\r\n");
        }
        request.push_str("\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut head = [0u8; 16];
        let mut filled = 0;
        while filled < head.len() {
            match stream.read(&mut head[filled..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => filled += n,
            }
        }
        head[..filled].starts_with(b"HTTP/1.1 200") || head[..filled].starts_with(b"HTTP/1.0 200")
    }
}

/// One swap, in milliseconds from sending the request.
#[derive(Debug, Clone, Serialize)]
pub struct SwapSample {
    pub model: String,
    /// Response headers (a proxy may send them before the swap is done).
    pub headers_ms: f64,
    /// The first event with generated text.
    pub first_text_ms: f64,
    /// The backend's readiness endpoint first answered 200.
    pub backend_ready_ms: f64,
    /// first_text - backend_ready: what the proxy added.
    pub overhead_ms: f64,
    pub total_ms: f64,
    /// The answer named the expected model.
    pub served_by_expected: bool,
}

/// One streaming chat request read to its end.
pub struct Streamed {
    pub started: Instant,
    /// Response headers (a proxy may send them before the swap is done).
    pub headers: Duration,
    /// The first event with generated text.
    pub first_text: Instant,
    pub total: Duration,
    pub body: Vec<u8>,
}

/// Sends one streaming chat request for `model` through `url` and reads the answer, noting
/// when its first generated text arrived; an error status or no text at all is an error.
pub async fn stream_once(
    url: &str,
    model: &str,
    bearer: Option<&str>,
    timeout: Duration,
) -> Result<Streamed> {
    let target = Target::parse(url)?;
    let mut sender = connect(target.addr, Duration::from_secs(10)).await?;
    let request = post(&target, chat_body(model, true, 8), bearer)?;
    let started = Instant::now();
    let exchange = async {
        let response = sender.send_request(request).await.context("send")?;
        let headers = started.elapsed();
        let status = response.status();
        let mut body = response.into_body();
        let mut parser = SseParser::new();
        let mut first_text = None;
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.context("body")?.into_data() else {
                continue;
            };
            if parser.feed(&data).first_text {
                first_text = Some(Instant::now());
            }
            all.extend_from_slice(&data);
        }
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&all));
        }
        let Some(first_text) = first_text else {
            bail!("no generated text in: {}", String::from_utf8_lossy(&all));
        };
        Ok((headers, first_text, all))
    };
    let (headers, first_text, body) = tokio::time::timeout(timeout, exchange)
        .await
        .context("no complete answer in time")??;
    Ok(Streamed {
        started,
        headers,
        first_text,
        total: started.elapsed(),
        body,
    })
}

/// Milliseconds from `earlier` to `later`, negative when `later` came first.
pub fn signed_ms(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(earlier - later).as_secs_f64() * 1000.0,
    }
}

/// Sends one streaming chat request for `model` through `url` while `probe`
/// watches the backend that should serve it.
pub async fn measure(
    url: &str,
    model: &str,
    expect_served: &str,
    bearer: Option<&str>,
    probe: ReadyProbe,
    timeout: Duration,
) -> Result<SwapSample> {
    if probe.check() {
        bail!(
            "{model}'s backend at {} is ready before the request: nothing to swap",
            probe.addr
        );
    }
    // The moment of the first 200, polled every millisecond.
    let poller = MomentPoller::start(Duration::from_millis(1), move || probe.check());
    let outcome = stream_once(url, model, bearer, timeout).await;
    let ready = poller
        .finish(Duration::from_millis(200), Duration::from_millis(5))
        .await;
    let streamed = outcome.context("swap")?;
    let Some(ready) = ready else {
        bail!("the backend of {model} never answered its readiness probe");
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(SwapSample {
        model: model.to_owned(),
        headers_ms: ms(streamed.headers),
        first_text_ms: signed_ms(streamed.first_text, streamed.started),
        backend_ready_ms: signed_ms(ready, streamed.started),
        overhead_ms: signed_ms(streamed.first_text, ready),
        total_ms: ms(streamed.total),
        served_by_expected: String::from_utf8_lossy(&streamed.body).contains(expect_served),
    })
}
