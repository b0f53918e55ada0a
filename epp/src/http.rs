//! A small HTTP/1.1 client: the box gateways' `/metrics` and the Kubernetes API (https,
//! trusting the service account's CA). One connection per request: the picker asks a few
//! times a second at most, and a watch is one long response.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: cannot connect: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url}: TLS: {source}")]
    Tls { url: String, source: std::io::Error },
    #[error("{url}: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}: not an http(s) URL with a host")]
    Url { url: String },
    #[error("{url}: answered {status}: {body}")]
    Status {
        url: String,
        status: http::StatusCode,
        body: String,
    },
}

/// Where requests go: `http://host:port` or `https://host:port` (with `tls`).
#[derive(Clone, Debug)]
pub struct Server {
    /// `scheme://host:port`, no trailing slash.
    pub base: String,
    host: String,
    authority: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Server {
    /// `base` is `http://host:port` or `https://host:port`; `tls` is required for https.
    pub fn new(base: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<Self, HttpError> {
        let bad = || HttpError::Url { url: base.into() };
        let uri: http::Uri = base.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad()),
        };
        let host = uri.host().ok_or_else(bad)?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Server {
            base: base.trim_end_matches('/').to_owned(),
            host,
            authority,
            tls: if https {
                Some(tls.ok_or_else(bad)?)
            } else {
                None
            },
        })
    }

    /// Sends `request` (its URI is the path and query) and returns the answer's head, its
    /// body still to read.
    pub async fn send(
        &self,
        mut request: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, HttpError> {
        let url = format!("{}{}", self.base, request.uri());
        if let Ok(value) = http::HeaderValue::from_str(&self.authority) {
            request.headers_mut().insert(http::header::HOST, value);
        }
        let tcp = TcpStream::connect(&self.authority)
            .await
            .map_err(|source| HttpError::Connect {
                url: url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => exchange(TokioIo::new(tcp), request, &url).await,
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|_| HttpError::Url { url: url.clone() })?;
                let stream = TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|source| HttpError::Tls {
                        url: url.clone(),
                        source,
                    })?;
                exchange(TokioIo::new(stream), request, &url).await
            }
        }
    }

    /// Sends `request` and reads the whole answer; an answer other than 2xx is an error
    /// carrying the body (the Kubernetes API explains itself there).
    pub async fn call(
        &self,
        request: http::Request<Full<Bytes>>,
    ) -> Result<(http::StatusCode, Bytes), HttpError> {
        let url = format!("{}{}", self.base, request.uri());
        let response = self.send(request).await?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| HttpError::Http {
                url: url.clone(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(HttpError::Status {
                url,
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok((status, body))
    }
}

async fn exchange<T>(
    io: T,
    request: http::Request<Full<Bytes>>,
    url: &str,
) -> Result<http::Response<Incoming>, HttpError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let error = |source| HttpError::Http {
        url: url.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(error)?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(error)
}

/// The TLS settings of an https client of an HTTP/1.1 server trusting `ca_file`.
pub fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, gpuswap::tls::TlsSetupError> {
    let mut config = rustls::ClientConfig::clone(&*gpuswap::tls::client_config(ca_file)?);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
