//! The closed-loop load generator: N workers, each with one keep-alive
//! connection, send the next request as soon as the previous one completed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde::Serialize;

use crate::{
    http::{Target, chat_body, connect, post},
    procfs::{self, ProcUsage, Sampler},
    sse::SseParser,
    stats::{Summary, micros},
};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub url: String,
    pub model: String,
    pub stream: bool,
    pub max_tokens: u32,
    pub concurrency: usize,
    /// Workers start no request after this long.
    pub duration: Option<Duration>,
    /// Or stop after this many requests in all.
    pub requests: Option<u64>,
    /// How long requests in flight at the end may take to finish (with a
    /// count instead of a duration: how long the whole run may take); those
    /// cut off are counted as `incomplete`.
    pub grace: Duration,
    pub bearer: Option<String>,
    /// Processes whose memory and CPU are sampled during the run.
    pub watch: Vec<(String, u32)>,
}

/// The JSON report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub url: String,
    pub model: String,
    pub stream: bool,
    pub concurrency: usize,
    pub max_tokens: u32,
    pub elapsed_s: f64,
    pub requests_ok: u64,
    pub errors: u64,
    pub incomplete: u64,
    pub error_samples: Vec<String>,
    pub rps: f64,
    /// Request to last byte.
    pub latency_ms: Option<Summary>,
    /// Request to the first event with generated text (streams only; it
    /// includes requests cut off later).
    pub ttft_ms: Option<Summary>,
    pub chunks: u64,
    pub chunks_per_s: f64,
    pub bytes: u64,
    /// The watched processes, and this load generator itself (`loadgen`).
    pub processes: Vec<ProcUsage>,
    /// How busy all cores were during the run, in %: near 100 means the
    /// machine (not only the system under test) was the limit.
    pub machine_busy_pct: Option<f64>,
}

#[derive(Default)]
struct WorkerResult {
    latencies_us: Vec<u64>,
    ttft_us: Vec<u64>,
    ok: u64,
    errors: u64,
    incomplete: u64,
    chunks: u64,
    bytes: u64,
    error_samples: Vec<String>,
}

impl WorkerResult {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_samples.len() < 3 {
            self.error_samples.push(message);
        }
    }
}

enum Outcome {
    Ok {
        latency: Duration,
        chunks: u64,
        bytes: u64,
    },
    Failed(String),
}

struct Shared {
    target: Target,
    body: Bytes,
    spec: LoadSpec,
    /// Requests not yet started when a count was given.
    remaining: AtomicU64,
    stop_at: Option<Instant>,
    hard_deadline: Instant,
}

impl Shared {
    fn take_one(&self) -> bool {
        if self.stop_at.is_some_and(|at| Instant::now() >= at) {
            return false;
        }
        if self.spec.requests.is_some() {
            return self
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        }
        true
    }
}

pub async fn run(spec: LoadSpec) -> Result<LoadReport> {
    let target = Target::parse(&spec.url)?;
    let body = chat_body(&spec.model, spec.stream, spec.max_tokens);
    let start = Instant::now();
    let stop_at = spec.duration.map(|d| start + d);
    let shared = Arc::new(Shared {
        target,
        body,
        remaining: AtomicU64::new(spec.requests.unwrap_or(u64::MAX)),
        stop_at,
        hard_deadline: stop_at.unwrap_or(start) + spec.grace,
        spec: spec.clone(),
    });
    let mut watch = spec.watch.clone();
    watch.push(("loadgen".into(), std::process::id()));
    let sampler = Sampler::start(&watch);
    let machine_start = procfs::machine_ticks();
    let workers: Vec<_> = (0..spec.concurrency.max(1))
        .map(|_| tokio::spawn(worker(shared.clone())))
        .collect();
    let mut total = WorkerResult::default();
    for worker in workers {
        let r = worker.await?;
        total.latencies_us.extend(r.latencies_us);
        total.ttft_us.extend(r.ttft_us);
        total.ok += r.ok;
        total.errors += r.errors;
        total.incomplete += r.incomplete;
        total.chunks += r.chunks;
        total.bytes += r.bytes;
        for sample in r.error_samples {
            if total.error_samples.len() < 5 && !total.error_samples.contains(&sample) {
                total.error_samples.push(sample);
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let processes = sampler.finish().await;
    let machine_busy_pct = machine_start.zip(procfs::machine_ticks()).and_then(
        |((busy0, total0), (busy1, total1))| {
            let total = total1.checked_sub(total0).filter(|t| *t > 0)?;
            Some(100.0 * busy1.saturating_sub(busy0) as f64 / total as f64)
        },
    );
    Ok(LoadReport {
        url: spec.url,
        model: spec.model,
        stream: spec.stream,
        concurrency: spec.concurrency,
        max_tokens: spec.max_tokens,
        elapsed_s: elapsed,
        requests_ok: total.ok,
        errors: total.errors,
        incomplete: total.incomplete,
        error_samples: total.error_samples,
        rps: total.ok as f64 / elapsed,
        latency_ms: Summary::of_micros(total.latencies_us),
        ttft_ms: Summary::of_micros(total.ttft_us),
        chunks: total.chunks,
        chunks_per_s: total.chunks as f64 / elapsed,
        bytes: total.bytes,
        processes,
        machine_busy_pct,
    })
}

async fn worker(shared: Arc<Shared>) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    while shared.take_one() {
        // A connection the server closed while idle (keep-alive timeout) is
        // replaced silently: only requests that were sent can fail.
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            match connect(shared.target.addr, Duration::from_secs(10)).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    result.error(format!("{e:#}"));
                    // Do not spin on a refused port.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        // Kept outside the exchange: a stream cut off at the deadline still
        // had a valid time to first token.
        let mut ttft = None;
        let exchange = one_request(s, &shared, &mut ttft);
        let outcome = match tokio::time::timeout_at(shared.hard_deadline.into(), exchange).await {
            Ok(outcome) => outcome,
            Err(_) => {
                result.incomplete += 1;
                result.ttft_us.extend(ttft.map(micros));
                break;
            }
        };
        match outcome {
            Outcome::Ok {
                latency,
                chunks,
                bytes,
            } => {
                result.ok += 1;
                result.latencies_us.push(micros(latency));
                result.ttft_us.extend(ttft.map(micros));
                result.chunks += chunks;
                result.bytes += bytes;
            }
            Outcome::Failed(message) => {
                result.error(message);
                sender = None;
            }
        }
    }
    result
}

async fn one_request(
    sender: &mut SendRequest<Full<Bytes>>,
    shared: &Shared,
    ttft: &mut Option<Duration>,
) -> Outcome {
    let request = match post(
        &shared.target,
        shared.body.clone(),
        shared.spec.bearer.as_deref(),
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("{e:#}")),
    };
    let started = Instant::now();
    if let Err(e) = sender.ready().await {
        return Outcome::Failed(format!("connection: {e}"));
    }
    let response = match sender.send_request(request).await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("send: {e}")),
    };
    let status = response.status();
    let mut body = response.into_body();
    let mut parser = SseParser::new();
    let mut bytes = 0u64;
    let mut chunks = 0u64;
    let mut error_body = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => return Outcome::Failed(format!("body: {e}")),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        bytes += data.len() as u64;
        if !status.is_success() {
            if error_body.len() < 300 {
                error_body.extend_from_slice(&data);
            }
            continue;
        }
        if shared.spec.stream {
            let seen = parser.feed(&data);
            chunks += seen.events;
            if seen.first_text {
                *ttft = Some(started.elapsed());
            }
            if seen.error {
                return Outcome::Failed(format!("in-stream error: {}", excerpt(&data)));
            }
        }
    }
    let latency = started.elapsed();
    if !status.is_success() {
        return Outcome::Failed(format!("HTTP {status}: {}", excerpt(&error_body)));
    }
    if shared.spec.stream && !parser.done() {
        return Outcome::Failed("stream ended without [DONE]".into());
    }
    Outcome::Ok {
        latency,
        chunks,
        bytes,
    }
}

/// The start of a body, for an error sample.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}
