//! Connecting to a supervisor from an endpoint string.

use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;
use tonic::{
    codegen::InterceptedService,
    transport::{Channel, Uri},
};

use crate::{auth::TokenInterceptor, endpoint::Endpoint, pb};

/// A supervisor client that adds the bearer token (if any) to every call.
pub type SupervisorClient =
    pb::supervisor_client::SupervisorClient<InterceptedService<Channel, TokenInterceptor>>;

/// How to reach a supervisor besides its address.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// Bearer token for https endpoints.
    pub token: Option<String>,
    /// A file holding the bearer token, read again whenever it changes (instead of `token`).
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the supervisor's certificate, or of that certificate
    /// itself (trusted exactly: pinned).
    pub ca_file: Option<PathBuf>,
    pub keepalive: Keepalive,
}

/// HTTP/2 pings on a connection, idle or not: a peer that does not answer one within
/// `timeout` (its host died, it froze, a firewall dropped the flow) is disconnected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Keepalive {
    pub const DEFAULT: Keepalive = Keepalive {
        interval: Duration::from_secs(10),
        timeout: Duration::from_secs(20),
    };
}

impl Default for Keepalive {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(crate::tls::TlsSetupError),
    #[error("invalid token: {0}")]
    Token(String),
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid endpoint: {0}")]
    Uri(String),
}

/// A lazily connected client: the channel (re)connects on use, so a client
/// built before the supervisor starts works once it is up.
pub fn connect(
    endpoint: &Endpoint,
    options: &ClientOptions,
) -> Result<SupervisorClient, ConnectError> {
    let keepalive = |endpoint: tonic::transport::Endpoint| {
        endpoint
            .http2_keep_alive_interval(options.keepalive.interval)
            .keep_alive_timeout(options.keepalive.timeout)
            .keep_alive_while_idle(true)
    };
    let channel = match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is a placeholder: the connector below ignores it.
            keepalive(tonic::transport::Endpoint::from_static("http://[::1]:1"))
                .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
        }
        Endpoint::Https { host, port } => {
            let tls = TlsConnector::from(
                crate::tls::client_config(options.ca_file.as_deref()).map_err(ConnectError::Tls)?,
            );
            let server_name = ServerName::try_from(host.clone())
                .map_err(|e| ConnectError::Uri(format!("{host:?}: {e}")))?;
            let (host, port, ca_file) = (host.clone(), *port, options.ca_file.clone());
            // tonic's TLS cannot pin a certificate nor explain a refusal (see tls.rs), so the
            // connector does the handshake and tonic sees a plain stream: hence http://.
            let uri = format!(
                "http://{}",
                endpoint.to_string().trim_start_matches("https://")
            );
            keepalive(
                tonic::transport::Endpoint::from_shared(uri)
                    .map_err(|e| ConnectError::Uri(e.to_string()))?,
            )
            .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
                let (tls, server_name) = (tls.clone(), server_name.clone());
                let (host, ca_file) = (host.clone(), ca_file.clone());
                async move {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    let stream =
                        tls.connect(server_name, tcp).await.map_err(|error| {
                            match error
                                .get_ref()
                                .and_then(|e| e.downcast_ref::<rustls::Error>())
                            {
                                Some(refused) => std::io::Error::new(
                                    error.kind(),
                                    crate::tls::explain(refused, &host, ca_file.as_deref()),
                                ),
                                None => error,
                            }
                        })?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
        }
    };
    let interceptor = match &options.token_file {
        Some(path) => {
            TokenInterceptor::from_file(path).map_err(|source| ConnectError::TokenFile {
                path: path.clone(),
                source,
            })?
        }
        None => TokenInterceptor::new(options.token.as_deref())
            .map_err(|s| ConnectError::Token(s.message().to_owned()))?,
    };
    Ok(pb::supervisor_client::SupervisorClient::with_interceptor(
        channel,
        interceptor,
    ))
}
