//! `[supervisor]`: the listener, its access rules and TLS, the state file, drain and memory.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

use super::{
    ConfigError, invalid,
    values::{
        TextOrNumber, check_duration, check_positive, duration, opt_byte_size, parse_byte_size,
        parse_mode,
    },
};
use crate::endpoint::Endpoint;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// `unix:///path.sock` or `https://addr:port`.
    pub listen: String,
    /// File mode of the Unix socket, octal ("0660").
    pub socket_mode: String,
    /// Group that owns the Unix socket (the gateway's user should be in it).
    pub socket_group: Option<String>,
    /// Peers allowed on the Unix socket (SO_PEERCRED); empty lists: any peer
    /// that the socket's mode lets in.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    /// The server's certificate and key (PEM). Unset with an https listen address: the
    /// supervisor makes its own under `tls_dir`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The bearer token of https clients. Unset: the supervisor makes one, `tls_dir/token`.
    pub token_file: Option<PathBuf>,
    /// Where the supervisor keeps the CA, certificate and token it makes (default: `tls`
    /// beside the state file).
    pub tls_dir: Option<PathBuf>,
    /// Names and addresses the made certificate is valid for besides the host's own.
    pub tls_names: Vec<String>,
    /// How long the previous token still works after a reload picked up a changed
    /// `token_file`, so that clients can be given the new one.
    #[serde(deserialize_with = "duration")]
    pub token_grace: Duration,
    /// HTTP/2 pings to each client this often: a holder whose host died or froze is
    /// found out and loses its holds within interval + timeout, not at drain_timeout.
    #[serde(deserialize_with = "duration")]
    pub keepalive_interval: Duration,
    /// A client that does not answer a ping within this is disconnected.
    #[serde(deserialize_with = "duration")]
    pub keepalive_timeout: Duration,
    /// Lines kept per model.
    pub log_lines: usize,
    #[serde(deserialize_with = "duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "duration")]
    pub min_residency: Duration,
    /// Where the process groups of running backends are recorded, so that a
    /// supervisor restarted after a crash can end what its predecessor left.
    pub state_file: PathBuf,
    /// How long a stop waits for a stopped backend's GPU memory to be freed.
    #[serde(deserialize_with = "duration")]
    pub gpu_release_timeout: Duration,
    /// Prometheus metrics (`host:port`), off when unset.
    pub metrics_listen: Option<String>,
    /// Memory of each GPU that models may share (`vram`); unset: NVML's total, and without
    /// NVML a model takes its GPUs whole.
    pub gpu_memory: Option<GpuMemory>,
    /// Host RAM that sleeping models may hold in all; unset: 80 % of MemTotal
    /// ([`SupervisorConfig::host_memory_budget`]).
    #[serde(deserialize_with = "opt_byte_size")]
    pub host_memory: Option<u64>,
}

/// `[supervisor] gpu_memory`: one size for every GPU, or a size per GPU index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GpuMemory {
    Every(u64),
    PerGpu(BTreeMap<u32, u64>),
}

impl GpuMemory {
    /// The configured capacity of `gpu` (None: not configured for it).
    pub fn of(&self, gpu: u32) -> Option<u64> {
        match self {
            GpuMemory::Every(bytes) => Some(*bytes),
            GpuMemory::PerGpu(sizes) => sizes.get(&gpu).copied(),
        }
    }
}

impl<'de> Deserialize<'de> for GpuMemory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(TextOrNumber),
            PerGpu(BTreeMap<String, TextOrNumber>),
        }
        let size = |value: TextOrNumber| match value {
            TextOrNumber::Text(t) => parse_byte_size(&t),
            TextOrNumber::Number(n) => Ok(n),
        };
        match Raw::deserialize(d)? {
            Raw::One(value) => size(value)
                .map(GpuMemory::Every)
                .map_err(serde::de::Error::custom),
            Raw::PerGpu(table) => table
                .into_iter()
                .map(|(gpu, value)| {
                    let index = gpu.trim().parse::<u32>().map_err(|_| {
                        serde::de::Error::custom(format!(
                            "gpu_memory: {gpu:?} is not a GPU index (\"0\", \"1\", ...)"
                        ))
                    })?;
                    Ok((index, size(value).map_err(serde::de::Error::custom)?))
                })
                .collect::<Result<_, D::Error>>()
                .map(GpuMemory::PerGpu),
        }
    }
}

impl SupervisorConfig {
    /// The host RAM sleeping models may hold in all: `host_memory`, else 80 % of the box's
    /// MemTotal (0 when /proc/meminfo cannot be read: then no model sleeps).
    pub fn host_memory_budget(&self) -> u64 {
        self.host_memory
            .unwrap_or_else(|| mem_total().map_or(0, |total| total / 5 * 4))
    }

    /// Where the supervisor keeps what it makes for TLS: `tls_dir`, or `tls` beside the
    /// state file.
    pub fn tls_dir(&self) -> PathBuf {
        self.tls_dir.clone().unwrap_or_else(|| {
            self.state_file
                .parent()
                .unwrap_or_else(|| std::path::Path::new("."))
                .join("tls")
        })
    }
}

impl SupervisorConfig {
    /// The keys whose value in `new` differs from this running one and that a reload cannot
    /// apply (the listener, its access rules, TLS, the state file, metrics): they take effect
    /// at the next start. Every field is named here, so that a new one must be sorted too.
    pub fn keys_needing_restart(&self, new: &SupervisorConfig) -> Vec<&'static str> {
        let SupervisorConfig {
            // The --listen flag is applied on reload too: this compares what would be served.
            listen,
            socket_mode,
            socket_group,
            allowed_uids,
            allowed_gids,
            tls_cert,
            tls_key,
            // Its contents are read again on reload; another path is not.
            token_file,
            tls_dir,
            tls_names,
            token_grace,
            keepalive_interval,
            keepalive_timeout,
            state_file,
            metrics_listen,
            // Applied by a reload.
            log_lines: _,
            drain_timeout: _,
            min_residency: _,
            gpu_release_timeout: _,
            gpu_memory: _,
            host_memory: _,
        } = self;
        let changed = [
            ("listen", *listen != new.listen),
            ("socket_mode", *socket_mode != new.socket_mode),
            ("socket_group", *socket_group != new.socket_group),
            ("allowed_uids", *allowed_uids != new.allowed_uids),
            ("allowed_gids", *allowed_gids != new.allowed_gids),
            ("tls_cert", *tls_cert != new.tls_cert),
            ("tls_key", *tls_key != new.tls_key),
            ("token_file", *token_file != new.token_file),
            ("tls_dir", *tls_dir != new.tls_dir),
            ("tls_names", *tls_names != new.tls_names),
            ("token_grace", *token_grace != new.token_grace),
            (
                "keepalive_interval",
                *keepalive_interval != new.keepalive_interval,
            ),
            (
                "keepalive_timeout",
                *keepalive_timeout != new.keepalive_timeout,
            ),
            ("state_file", *state_file != new.state_file),
            ("metrics_listen", *metrics_listen != new.metrics_listen),
        ];
        changed
            .into_iter()
            .filter_map(|(key, differs)| differs.then_some(key))
            .collect()
    }
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            listen: "unix:///run/gpuswap/supervisor.sock".into(),
            socket_mode: "0660".into(),
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            tls_cert: None,
            tls_key: None,
            token_file: None,
            tls_dir: None,
            tls_names: Vec::new(),
            token_grace: Duration::from_secs(600),
            keepalive_interval: crate::client::Keepalive::DEFAULT.interval,
            keepalive_timeout: crate::client::Keepalive::DEFAULT.timeout,
            log_lines: 5000,
            drain_timeout: Duration::from_secs(600),
            min_residency: Duration::from_secs(5),
            state_file: "/run/gpuswap/supervisor.state".into(),
            gpu_release_timeout: Duration::from_secs(10),
            metrics_listen: None,
            gpu_memory: None,
            host_memory: None,
        }
    }
}

/// The box's memory (MemTotal), read once.
fn mem_total() -> Option<u64> {
    use procfs::Current;
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| procfs::Meminfo::current().ok().map(|m| m.mem_total))
}

impl SupervisorConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        let endpoint: Endpoint =
            s.listen
                .parse()
                .map_err(|e: crate::endpoint::EndpointError| {
                    invalid("supervisor.listen", e.to_string())
                })?;
        if let Endpoint::Https { .. } = endpoint {
            if endpoint.bind_addr().is_none() {
                return Err(invalid(
                    "supervisor.listen",
                    "an https listen address needs an IP address (e.g. https://0.0.0.0:7070)",
                ));
            }
            match (&s.tls_cert, &s.tls_key) {
                (Some(_), None) => {
                    return Err(invalid(
                        "supervisor.tls_key",
                        "required with supervisor.tls_cert (or set neither, and the supervisor \
                         makes its own certificate)",
                    ));
                }
                (None, Some(_)) => {
                    return Err(invalid(
                        "supervisor.tls_cert",
                        "required with supervisor.tls_key (or set neither, and the supervisor \
                         makes its own certificate)",
                    ));
                }
                (Some(_), Some(_)) if !s.tls_names.is_empty() => {
                    return Err(invalid(
                        "supervisor.tls_names",
                        "applies only to a certificate the supervisor makes: list the names in \
                         your certificate's subjectAltName instead (or drop tls_cert / tls_key)",
                    ));
                }
                _ => {}
            }
        }
        for name in &s.tls_names {
            let valid_dns = !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
                });
            if name.parse::<std::net::IpAddr>().is_err() && !valid_dns {
                return Err(invalid(
                    "supervisor.tls_names",
                    format!("{name:?} is neither a host name nor an IP address"),
                ));
            }
        }
        parse_mode(&s.socket_mode).ok_or_else(|| {
            invalid(
                "supervisor.socket_mode",
                "must be an octal file mode such as \"0660\"",
            )
        })?;
        for (k, value) in [
            ("drain_timeout", s.drain_timeout),
            ("min_residency", s.min_residency),
            ("gpu_release_timeout", s.gpu_release_timeout),
            ("token_grace", s.token_grace),
        ] {
            check_duration(format!("supervisor.{k}"), value)?;
        }
        for (key, value) in [
            ("keepalive_interval", s.keepalive_interval),
            ("keepalive_timeout", s.keepalive_timeout),
        ] {
            check_positive(format!("supervisor.{key}"), value)?;
        }
        if s.log_lines == 0 {
            return Err(invalid("supervisor.log_lines", "must be at least 1"));
        }
        if let Some(addr) = &s.metrics_listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid("supervisor.metrics_listen", "must be host:port"));
        }
        let sizes: Vec<u64> = match &s.gpu_memory {
            None => Vec::new(),
            Some(GpuMemory::Every(bytes)) => vec![*bytes],
            Some(GpuMemory::PerGpu(sizes)) => sizes.values().copied().collect(),
        };
        if sizes.contains(&0) {
            return Err(invalid("supervisor.gpu_memory", "must be more than 0"));
        }
        if s.host_memory == Some(0) {
            return Err(invalid(
                "supervisor.host_memory",
                "must be more than 0 (a model without sleep never uses it)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use procfs::Current;

    use super::*;
    use crate::config::{Config, tests::error_of};

    #[test]
    fn an_https_listen_address_alone_is_enough() {
        let c = Config::from_toml(
            "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\nstate_file = \"/var/lib/gpuswap/state\"\n",
        )
        .unwrap();
        assert_eq!(
            c.supervisor.tls_dir(),
            PathBuf::from("/var/lib/gpuswap/tls")
        );
        assert_eq!(c.supervisor.token_grace, Duration::from_secs(600));
        let e = error_of(
            "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_names = [\"gpu1\"]\n",
        );
        assert!(e.contains("supervisor.tls_names"), "{e}");
    }

    #[test]
    fn host_memory_defaults_to_four_fifths_of_the_box() {
        let c = Config::default();
        let total = procfs::Meminfo::current().unwrap().mem_total;
        assert_eq!(c.supervisor.host_memory_budget(), total / 5 * 4);
        let c = Config::from_toml("[supervisor]\nhost_memory = \"200GiB\"\n").unwrap();
        assert_eq!(c.supervisor.host_memory_budget(), 200 << 30);
        assert!(
            c.supervisor
                .keys_needing_restart(&Config::default().supervisor)
                .is_empty()
        );
    }
}
