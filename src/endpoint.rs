//! One endpoint string for every way of reaching a supervisor.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

/// Where a supervisor listens or a client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///run/gpuswap/supervisor.sock`: local, guarded by file mode and peer credentials.
    Unix(PathBuf),
    /// `https://host:port`: remote, TLS plus a bearer token.
    Https { host: String, port: u16 },
}

#[derive(Debug, thiserror::Error)]
#[error(
    "invalid endpoint {input:?}: {reason} (expected unix:///path/to.sock or https://host:port)"
)]
pub struct EndpointError {
    input: String,
    reason: &'static str,
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| EndpointError {
            input: input.to_owned(),
            reason,
        };
        if let Some(path) = input.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(err("a unix socket path must be absolute"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = input.strip_prefix("https://") {
            let rest = rest.trim_end_matches('/');
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("missing :port"))?;
            let port: u16 = port.parse().map_err(|_| err("bad port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(err("missing host"));
            }
            return Ok(Endpoint::Https {
                host: host.to_owned(),
                port,
            });
        }
        if input.starts_with("http://") {
            return Err(err("plain TCP is refused: use https:// (TLS and a token)"));
        }
        Err(err("unknown scheme"))
    }
}

impl Endpoint {
    /// The socket address to bind for a TCP endpoint.
    pub fn bind_addr(&self) -> Option<SocketAddr> {
        match self {
            Endpoint::Https { host, port } => {
                let ip = if host == "localhost" {
                    "127.0.0.1"
                } else {
                    host
                };
                ip.parse().ok().map(|ip| SocketAddr::new(ip, *port))
            }
            Endpoint::Unix(_) => None,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::Https { host, port } if host.contains(':') => {
                write!(f, "https://[{host}]:{port}")
            }
            Endpoint::Https { host, port } => write!(f, "https://{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_forms_and_refuses_the_rest() {
        assert_eq!(
            "unix:///run/x.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/x.sock".into())
        );
        let tcp: Endpoint = "https://0.0.0.0:7070".parse().unwrap();
        assert_eq!(tcp.bind_addr().unwrap().port(), 7070);
        assert_eq!(tcp.to_string(), "https://0.0.0.0:7070");
        let v6: Endpoint = "https://[::1]:7070".parse().unwrap();
        assert_eq!(v6.to_string(), "https://[::1]:7070");
        for bad in [
            "http://127.0.0.1:7070",
            "unix://relative.sock",
            "https://host",
            "tcp://x:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} should be refused");
        }
    }
}
