//! Readiness probes per backend kind.
//!
//! Every kind is ready when its health path answers 200; what differs is what comes
//! before (docs/backends.md has what each real server did):
//! - sglang: connection refused while loading, `/health` 503 while warming, then 200;
//! - vllm: refused, then `/health` 200;
//! - llama-server: `/health` 503 while loading, then 200;
//! - tabbyapi: not listening while loading; `GET /v1/model` with the API key is 200 once a
//!   model is loaded (its `/health` is up before that, so it proves nothing);
//! - openai: the configured health path answers 200.
//!
//! A probe is one fresh loopback HTTP/1.1 request over a raw socket: connect, write the
//! request, read the status line. Cheap, and nothing is pooled across a backend restart.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use gpuswap::config::{BackendKind, ModelConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// What one probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Nothing listens on the port (yet).
    Refused,
    /// The server answered with this status.
    Status(u16),
    /// Connected, but no usable answer (timeout, reset, garbage).
    NoAnswer(String),
}

impl ProbeOutcome {
    pub fn is_ready(&self) -> bool {
        matches!(self, ProbeOutcome::Status(200))
    }

    /// Whether something listened on the port.
    pub fn listening(&self) -> bool {
        !matches!(self, ProbeOutcome::Refused)
    }
}

/// The readiness request of one model, prepared once and sent many times.
#[derive(Clone, Debug)]
pub struct ReadinessProbe {
    pub kind: BackendKind,
    pub port: u16,
    host: String,
    path: String,
    request: Vec<u8>,
    timeout: Duration,
}

impl ReadinessProbe {
    pub fn new(config: &ModelConfig) -> Self {
        let path = config.health_path().to_owned();
        let host_header = if config.host.contains(':') && !config.host.starts_with('[') {
            format!("[{}]:{}", config.host, config.port)
        } else {
            format!("{}:{}", config.host, config.port)
        };
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: gpuswap-supervisor\r\nAccept: */*\r\nConnection: close\r\n"
        );
        if let Some(key) = config.api_key.as_deref().filter(|k| !k.is_empty()) {
            // TabbyAPI takes either header; OpenAI-compatible servers take the bearer.
            request.push_str(&format!(
                "x-api-key: {key}\r\nAuthorization: Bearer {key}\r\n"
            ));
        }
        request.push_str("\r\n");
        Self {
            kind: config.kind,
            port: config.port,
            host: config.host.clone(),
            path,
            request: request.into_bytes(),
            timeout: Duration::from_secs(2),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The address to probe: a wildcard bind host is probed over loopback.
    pub async fn resolve(&self) -> io::Result<SocketAddr> {
        resolve(&self.host, self.port).await
    }

    /// One probe.
    pub async fn probe(&self, addr: SocketAddr) -> ProbeOutcome {
        match tokio::time::timeout(self.timeout, self.exchange(addr)).await {
            Ok(outcome) => outcome,
            Err(_) => ProbeOutcome::NoAnswer(format!("no answer within {:?}", self.timeout)),
        }
    }

    async fn exchange(&self, addr: SocketAddr) -> ProbeOutcome {
        let mut stream = match TcpStream::connect(addr).await {
            Ok(stream) => stream,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return ProbeOutcome::Refused,
            Err(e) => return ProbeOutcome::NoAnswer(e.to_string()),
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = stream.write_all(&self.request).await {
            return ProbeOutcome::NoAnswer(e.to_string());
        }
        let mut head = [0u8; 64];
        let mut len = 0;
        // "HTTP/1.1 200" is all we need; read until we have it or the peer closes.
        while len < 12 {
            match stream.read(&mut head[len..]).await {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) => return ProbeOutcome::NoAnswer(e.to_string()),
            }
        }
        match parse_status(&head[..len]) {
            Some(status) => ProbeOutcome::Status(status),
            None => ProbeOutcome::NoAnswer(format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&head[..len])
            )),
        }
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The loopback-reachable address of `host:port`.
pub async fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let ip = match bare {
        "" | "0.0.0.0" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "::" => Some(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        other => other.parse().ok(),
    };
    if let Some(ip) = ip {
        return Ok(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((bare, port))
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host}: no address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
    }

    #[tokio::test]
    async fn resolves_wildcards_to_loopback() {
        assert_eq!(
            resolve("0.0.0.0", 5).await.ok(),
            Some(SocketAddr::from(([127, 0, 0, 1], 5)))
        );
        assert_eq!(
            resolve("::", 5).await.ok().map(|a| a.ip()),
            Some(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(resolve("[::1]", 5).await.ok().map(|a| a.port()), Some(5));
    }
}
