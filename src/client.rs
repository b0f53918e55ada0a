//! Connecting to a supervisor from an endpoint string.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::{
    codegen::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Uri},
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
    /// PEM file of the CA (or self-signed certificate) that signed the supervisor's certificate.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup failed: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("invalid token: {0}")]
    Token(String),
    #[error("invalid endpoint: {0}")]
    Uri(String),
}

/// A lazily connected client: the channel (re)connects on use, so a client
/// built before the supervisor starts works once it is up.
pub fn connect(
    endpoint: &Endpoint,
    options: &ClientOptions,
) -> Result<SupervisorClient, ConnectError> {
    let channel = match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            // The URI is a placeholder: the connector below ignores it.
            tonic::transport::Endpoint::from_static("http://[::1]:1").connect_with_connector_lazy(
                tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }),
            )
        }
        Endpoint::Https { host, .. } => {
            let mut tls = ClientTlsConfig::new().domain_name(host.clone());
            if let Some(path) = &options.ca_file {
                let pem = std::fs::read(path).map_err(|source| ConnectError::CaFile {
                    path: path.clone(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            tonic::transport::Endpoint::from_shared(endpoint.to_string())
                .map_err(|e| ConnectError::Uri(e.to_string()))?
                .tls_config(tls)
                .map_err(ConnectError::Tls)?
                .connect_lazy()
        }
    };
    let interceptor = TokenInterceptor::new(options.token.as_deref())
        .map_err(|s| ConnectError::Token(s.message().to_owned()))?;
    Ok(pb::supervisor_client::SupervisorClient::with_interceptor(
        channel,
        interceptor,
    ))
}
