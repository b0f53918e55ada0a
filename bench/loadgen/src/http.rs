//! One keep-alive HTTP/1.1 connection per worker, and the chat request it sends.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where requests go: an `http://host:port/path` URL split for a raw connection.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` for the Host header.
    pub authority: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("only http:// URLs are supported: {url}");
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("URL without host: {url}"))?
            .to_string();
        let host = uri.host().unwrap_or("127.0.0.1");
        let host = if host == "localhost" {
            "127.0.0.1"
        } else {
            host
        };
        let port = uri.port_u16().unwrap_or(80);
        let addr = format!("{host}:{port}")
            .parse()
            .with_context(|| format!("the host of {url} must be an IP address"))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        Ok(Self {
            addr,
            authority,
            path,
        })
    }
}

/// A small OpenAI chat completion request body.
pub fn chat_body(model: &str, stream: bool, max_tokens: u32) -> Bytes {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me something about load tests."}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    Bytes::from(body.to_string())
}

/// Builds the POST of `body` to `target` (origin-form URI, as HTTP/1.1 wants).
pub fn post(target: &Target, body: Bytes, bearer: Option<&str>) -> Result<Request<Full<Bytes>>> {
    let mut request = Request::post(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::ACCEPT, "application/json, text/event-stream");
    if let Some(token) = bearer {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    Ok(request.body(Full::new(body))?)
}

/// Opens a keep-alive connection; its driver task ends with the connection.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<Full<Bytes>>> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connect to {addr} timed out"))?
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("HTTP handshake with {addr}"))?;
    tokio::spawn(async move {
        // The error (peer closed, reset) surfaces on the next send.
        let _ = connection.await;
    });
    Ok(sender)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split() {
        let t = Target::parse("http://localhost:8002/v1/chat/completions").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8002".parse().unwrap());
        assert_eq!(t.authority, "localhost:8002");
        assert_eq!(t.path, "/v1/chat/completions");
        assert!(Target::parse("https://127.0.0.1:1/").is_err());
        assert!(Target::parse("http://example.com:80/").is_err());
    }
}
