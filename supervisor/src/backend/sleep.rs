//! Sleep and wake: sends a model's sleep protocol ([`gpuswap::sleep::SleepProtocol`], resolved
//! from `[models.X] sleep`) to its backend, each request bounded by a timeout, and checks what
//! the backend says afterwards.
//!
//! - Sleep: every `enter` request must answer 2xx; then `asleep` (when the server has such a
//!   route) must say it sleeps; then the GPU memory of its process tree must be released
//!   ([`super::gpu::wait_sleep_released`]). Anything else is a failed sleep: the caller stops
//!   the backend instead.
//! - Wake: every `leave` request must answer 2xx, `asleep` must say it is awake, and the
//!   model's readiness probe must pass again. Anything else is a failed wake: the caller
//!   stops the backend and starts it cold.
//!
//! The backend's process lives throughout and keeps its port: a wake reuses the same pid.

use std::{net::SocketAddr, time::Duration};

use gpuswap::{
    config::ModelConfig,
    sleep::{SleepProtocol, SleepRequest},
};
use http_body_util::{BodyExt, Full};
use hyper::{Request, body::Bytes, client::conn::http1, header};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};

use super::probe::{ReadinessProbe, resolve};

/// How long one request of a sleep or wake may take. vLLM moves the weights to host RAM
/// during `/sleep` (seconds for tens of GB) and a level-2 wake reloads them from disk.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// The pause between two readiness probes after a wake.
const PROBE_PAUSE: Duration = Duration::from_millis(20);

/// Why a sleep or a wake failed, in words for the progress and the logs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SleepError(String);

/// Sends `request` to the backend of `config` and returns its status and body.
pub async fn send(
    config: &ModelConfig,
    request: &SleepRequest,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), SleepError> {
    let addr = resolve(&config.host, config.port)
        .await
        .map_err(|e| SleepError(format!("{request}: cannot resolve {}: {e}", config.host)))?;
    tokio::time::timeout(timeout, exchange(addr, config, request))
        .await
        .map_err(|_| SleepError(format!("{request}: no answer within {timeout:?}")))?
        .map_err(|e| SleepError(format!("{request}: {e}")))
}

async fn exchange(
    addr: SocketAddr,
    config: &ModelConfig,
    request: &SleepRequest,
) -> Result<(u16, Vec<u8>), String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let connection = tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(request.method.clone())
        .uri(&request.path_and_query)
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "gpuswap-supervisor");
    if let Some(key) = config.api_key.as_deref().filter(|k| !k.is_empty()) {
        // TabbyAPI's admin key passes as a bearer too.
        builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let body = match &request.body {
        Some(body) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Bytes::from(body.clone())
        }
        None => Bytes::new(),
    };
    let request = builder.body(Full::new(body)).map_err(|e| e.to_string())?;
    let answer = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = answer.status().as_u16();
    let body = answer
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes()
        .to_vec();
    connection.abort();
    Ok((status, body))
}

/// Sends each request in order; each must answer 2xx.
async fn send_all(
    config: &ModelConfig,
    requests: &[SleepRequest],
    timeout: Duration,
) -> Result<(), SleepError> {
    for request in requests {
        let (status, body) = send(config, request, timeout).await?;
        if !(200..300).contains(&status) {
            let said = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(SleepError(format!("{request} answered {status}: {said}")));
        }
    }
    Ok(())
}

/// Whether the backend says it sleeps; None when the server has no route that says so.
async fn says_asleep(
    config: &ModelConfig,
    protocol: &SleepProtocol,
    timeout: Duration,
) -> Result<Option<bool>, SleepError> {
    let Some(probe) = &protocol.asleep else {
        return Ok(None);
    };
    let (status, body) = send(config, &probe.request, timeout).await?;
    Ok(Some(probe.says_asleep(status, &body)))
}

/// Puts the backend of `config` to sleep (the GPU check is the caller's: it knows the tree).
pub async fn enter(
    config: &ModelConfig,
    protocol: &SleepProtocol,
    timeout: Duration,
) -> Result<(), SleepError> {
    let not_asleep = "says it is not asleep after the sleep";
    send_and_check(config, protocol, &protocol.enter, timeout, true, not_asleep).await
}

/// Sends `requests`; then, if the server has a route that says, it must say it sleeps as
/// `asleep` says, else the error names that route and says `otherwise`.
async fn send_and_check(
    config: &ModelConfig,
    protocol: &SleepProtocol,
    requests: &[SleepRequest],
    timeout: Duration,
    asleep: bool,
    otherwise: &str,
) -> Result<(), SleepError> {
    send_all(config, requests, timeout).await?;
    if says_asleep(config, protocol, timeout).await? == Some(!asleep) {
        let probe = protocol.asleep.as_ref().map(|p| &p.request);
        return Err(SleepError(format!(
            "{} {otherwise}",
            probe.map(ToString::to_string).unwrap_or_default()
        )));
    }
    Ok(())
}

/// Wakes the backend of `config`: the `leave` requests, then `asleep` must say awake and the
/// readiness probe must pass, all before `deadline`.
pub async fn leave(
    config: &ModelConfig,
    protocol: &SleepProtocol,
    timeout: Duration,
    deadline: Instant,
) -> Result<(), SleepError> {
    let still_asleep = "still says it sleeps after the wake";
    send_and_check(
        config,
        protocol,
        &protocol.leave,
        timeout,
        false,
        still_asleep,
    )
    .await?;
    let probe = ReadinessProbe::new(config);
    let addr = probe
        .resolve()
        .await
        .map_err(|e| SleepError(format!("cannot resolve {}: {e}", config.host)))?;
    loop {
        let outcome = probe.probe(addr).await;
        if outcome.is_ready() {
            return Ok(());
        }
        if Instant::now() + PROBE_PAUSE >= deadline {
            return Err(SleepError(format!(
                "not ready after the wake: GET {} gave {outcome:?}",
                probe.path()
            )));
        }
        tokio::time::sleep(PROBE_PAUSE).await;
    }
}
