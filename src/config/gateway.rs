//! `[gateway]`: the listener, the supervisor it asks, the queue and its limits, who may call,
//! and the box's registration for the endpoint pickers.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError,
    epp::{default_discovery_prefix, default_lease_ttl, validate_ttl},
    invalid,
    keys::KeyConfig,
    values::{byte_size, check_duration, check_positive, duration},
};
use crate::endpoint::Endpoint;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: String,
    pub supervisor: String,
    /// Token for an https supervisor.
    pub token_file: Option<PathBuf>,
    /// CA of an https supervisor's certificate, or that certificate itself (pinned).
    pub ca_file: Option<PathBuf>,
    /// HTTP/2 pings to the supervisor this often: a supervisor whose host died or froze
    /// is found out within interval + timeout.
    #[serde(deserialize_with = "duration")]
    pub supervisor_keepalive_interval: Duration,
    #[serde(deserialize_with = "duration")]
    pub supervisor_keepalive_timeout: Duration,
    /// Empty (and no `keys`): open. Else `Authorization: Bearer` or `x-api-key` must match one.
    pub api_keys: Vec<String>,
    /// Keys for the admin actions (load, unload, logs) and every model. Empty (and no key
    /// with `admin = true`): admin actions are allowed from loopback only.
    pub admin_keys: Vec<String>,
    /// Named keys, each limited to some models (`[gateway.keys.NAME]`).
    pub keys: BTreeMap<String, KeyConfig>,
    #[serde(deserialize_with = "duration")]
    pub queue_timeout: Duration,
    #[serde(deserialize_with = "byte_size")]
    pub max_body: u64,
    /// 0 = never unload idle models; a model's own idle_ttl overrides.
    #[serde(deserialize_with = "duration")]
    pub idle_ttl: Duration,
    pub preload: Vec<String>,
    /// Streaming requests that wait for a swap get progress chunks; off:
    /// only SSE keep-alive comments.
    pub stream_progress: bool,
    /// Interval of SSE keep-alives while a streaming request waits.
    #[serde(deserialize_with = "duration")]
    pub keepalive_interval: Duration,
    /// Deadline for request headers (slow clients are closed).
    #[serde(deserialize_with = "duration")]
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection to a backend is kept for the
    /// next request (0: not kept). Backends that close theirs sooner (uvicorn
    /// after 5 s) are fine: such a connection is seen closed when taken, and
    /// a request lost in the race is sent again on a new one.
    #[serde(deserialize_with = "duration")]
    pub upstream_idle_timeout: Duration,
    /// Bytes of request bodies the gateway may hold for requests that are
    /// being read or wait for their model; past it a request gets 429.
    #[serde(deserialize_with = "byte_size")]
    pub queue_memory: u64,
    /// Requests that may wait for their model at once; past it, 429.
    pub max_queued: usize,
    /// Deadline for a request body, from the end of its headers (408 and close).
    #[serde(deserialize_with = "duration")]
    pub body_timeout: Duration,
    /// Client connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Put the backend's last log lines in start-failure answers (they can
    /// hold paths and secrets a backend printed: off for open gateways).
    pub expose_log_tail: bool,
    /// Browser origins (`scheme://host[:port]`) allowed to call; `["*"]`: any.
    pub cors_origins: Vec<String>,
    /// Host headers served (`host` or `host:port`); empty: any.
    pub allowed_hosts: Vec<String>,
    /// Register this box in etcd for the endpoint pickers (`[epp] discovery`).
    pub register: Option<RegisterConfig>,
}

/// `[gateway] register`: the box's entry in etcd, under a lease the gateway keeps alive (a
/// gateway that dies or hangs drops out of placement when the lease runs out).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// etcd endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// The box's name (unique among the boxes).
    pub name: String,
    /// `ip:port` the proxy reaches this gateway at.
    pub advertise: String,
    /// The supervisor as the pickers reach it (default: `gateway.supervisor`).
    pub supervisor: Option<String>,
    #[serde(default = "default_discovery_prefix")]
    pub prefix: String,
    /// The lease: how long a box that stopped renewing stays listed.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8002".into(),
            supervisor: "unix:///run/gpuswap/supervisor.sock".into(),
            token_file: None,
            ca_file: None,
            supervisor_keepalive_interval: crate::client::Keepalive::DEFAULT.interval,
            supervisor_keepalive_timeout: crate::client::Keepalive::DEFAULT.timeout,
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            keys: BTreeMap::new(),
            queue_timeout: Duration::from_secs(15 * 60),
            max_body: 32 << 20,
            idle_ttl: Duration::ZERO,
            preload: Vec::new(),
            stream_progress: true,
            keepalive_interval: Duration::from_secs(5),
            header_timeout: Duration::from_secs(30),
            upstream_idle_timeout: Duration::from_secs(4),
            queue_memory: 512 << 20,
            max_queued: 1024,
            body_timeout: Duration::from_secs(60),
            max_connections: 4096,
            expose_log_tail: false,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            register: None,
        }
    }
}

impl GatewayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let g = self;
        if let Some(r) = &g.register {
            if r.etcd.is_empty() {
                return Err(invalid(
                    "gateway.register.etcd",
                    "must list an etcd endpoint",
                ));
            }
            if r.name.trim().is_empty() || r.name.contains('/') {
                return Err(invalid(
                    "gateway.register.name",
                    "must be non-empty and without '/' (it ends the etcd key)",
                ));
            }
            if let Some(supervisor) = &r.supervisor {
                supervisor
                    .parse::<Endpoint>()
                    .map_err(|e| invalid("gateway.register.supervisor", e.to_string()))?;
            }
            if r.advertise.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "gateway.register.advertise",
                    "must be ip:port (the proxy connects to it)",
                ));
            }
            if !r.prefix.starts_with('/') {
                return Err(invalid("gateway.register.prefix", "must start with '/'"));
            }
            validate_ttl("gateway.register.ttl", r.ttl)?;
        }
        if g.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "gateway.listen",
                "must be an address such as 127.0.0.1:8002",
            ));
        }
        g.supervisor
            .parse::<Endpoint>()
            .map_err(|e| invalid("gateway.supervisor", e.to_string()))?;
        for (k, value) in [
            ("queue_timeout", g.queue_timeout),
            ("idle_ttl", g.idle_ttl),
            ("keepalive_interval", g.keepalive_interval),
            ("header_timeout", g.header_timeout),
            ("upstream_idle_timeout", g.upstream_idle_timeout),
        ] {
            check_duration(format!("gateway.{k}"), value)?;
        }
        for (key, value) in [
            (
                "supervisor_keepalive_interval",
                g.supervisor_keepalive_interval,
            ),
            (
                "supervisor_keepalive_timeout",
                g.supervisor_keepalive_timeout,
            ),
        ] {
            check_positive(format!("gateway.{key}"), value)?;
        }
        if g.max_body == 0 {
            return Err(invalid("gateway.max_body", "must be more than 0"));
        }
        check_positive("gateway.queue_timeout", g.queue_timeout)?;
        if g.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("gateway.api_keys", "keys must not be empty"));
        }
        if g.admin_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("gateway.admin_keys", "keys must not be empty"));
        }
        for (name, key) in &g.keys {
            key.validate(name)?;
        }
        check_positive("gateway.keepalive_interval", g.keepalive_interval)?;
        self.validate_limits()
    }

    /// The gateway's bounds on what clients may make it hold, and who may call.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let g = self;
        if g.queue_memory < g.max_body {
            return Err(invalid(
                "gateway.queue_memory",
                format!(
                    "must be at least gateway.max_body ({} bytes), or no large request could wait",
                    g.max_body
                ),
            ));
        }
        if g.max_queued == 0 {
            return Err(invalid("gateway.max_queued", "must be at least 1"));
        }
        check_positive("gateway.body_timeout", g.body_timeout)?;
        if g.max_connections == 0 {
            return Err(invalid("gateway.max_connections", "must be at least 1"));
        }
        for origin in &g.cors_origins {
            if origin != "*" && !is_origin(origin) {
                return Err(invalid(
                    "gateway.cors_origins",
                    format!(
                        "{origin:?} is not an origin: write scheme://host[:port] (no path, no \
                         trailing slash), or \"*\" for any"
                    ),
                ));
            }
        }
        if g.cors_origins.len() > 1 && g.cors_origins.iter().any(|o| o == "*") {
            return Err(invalid(
                "gateway.cors_origins",
                "\"*\" allows every origin: list it alone",
            ));
        }
        for host in &g.allowed_hosts {
            if host.is_empty()
                || host.contains(['/', ' ', '@'])
                || http::uri::Authority::try_from(host.as_str()).is_err()
            {
                return Err(invalid(
                    "gateway.allowed_hosts",
                    format!("{host:?} is not a host or host:port"),
                ));
            }
        }
        Ok(())
    }
}

/// `scheme://host[:port]`, as browsers send it in `Origin`.
fn is_origin(text: &str) -> bool {
    let Ok(uri) = text.parse::<http::Uri>() else {
        return false;
    };
    uri.scheme().is_some()
        && uri.authority().is_some()
        // The parser reads "http://h" with the path "/": only the text tells
        // it from "http://h/", which no browser sends.
        && uri.path() == "/"
        && uri.query().is_none()
        && !text.ends_with('/')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        Config,
        tests::{assert_refused_naming, error_of},
    };

    #[test]
    fn gateway_limits_and_origins_are_checked() {
        let g = Config::default().gateway;
        assert_eq!(
            (g.queue_memory, g.max_queued, g.max_connections),
            (512 << 20, 1024, 4096)
        );
        assert_eq!(g.body_timeout, Duration::from_secs(60));
        assert!(!g.expose_log_tail && g.cors_origins.is_empty() && g.allowed_hosts.is_empty());
        let c = Config::from_toml(
            "[gateway]\ncors_origins = [\"http://webui.lan:3000\", \"https://chat.example\"]\n\
             allowed_hosts = [\"localhost\", \"gpu.lan:8002\", \"[::1]:8002\"]\n",
        )
        .unwrap();
        assert_eq!(c.gateway.cors_origins.len(), 2);
        let lines = [
            ("queue_memory = \"1MiB\"", "gateway.queue_memory"),
            ("max_queued = 0", "gateway.max_queued"),
            ("body_timeout = \"0s\"", "gateway.body_timeout"),
            ("max_connections = 0", "gateway.max_connections"),
            ("cors_origins = [\"http://a.lan/\"]", "gateway.cors_origins"),
            (
                "cors_origins = [\"http://a.lan/x\"]",
                "gateway.cors_origins",
            ),
            ("cors_origins = [\"a.lan\"]", "gateway.cors_origins"),
            (
                "cors_origins = [\"*\", \"http://a.lan\"]",
                "gateway.cors_origins",
            ),
            ("allowed_hosts = [\"\"]", "gateway.allowed_hosts"),
            (
                "allowed_hosts = [\"http://a.lan\"]",
                "gateway.allowed_hosts",
            ),
        ];
        assert_refused_naming(lines.map(|(line, key)| (format!("[gateway]\n{line}\n"), key)));
        assert!(error_of("[gateway]\nmax_conections = 1\n").contains("max_conections"));
    }
}
