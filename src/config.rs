//! The one configuration file shared by the supervisor and the gateway.
//!
//! Layers: built-in defaults, then the TOML file, then `GPUSWAP__SECTION__KEY`
//! environment overrides, then the daemon's flags ([`Flags`]), then [`Config::validate`]:
//! [`ConfigLoader`] does it all, at start and again on every reload.
//! Unknown keys are refused, and every error names the model and the key.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Deserializer};

use crate::{
    endpoint::Endpoint,
    sleep::{SLEEPER_BASE_HOST_MEMORY, SleepProtocol, SleepRequest},
};

/// Why a configuration was refused. The one-line form with the reason of a `Load` is
/// [`crate::error_chain`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration {path}: file not found")]
    NotFound { path: PathBuf },
    /// The file does not parse, or a key is unknown or of the wrong type (the source names it).
    #[error("cannot load configuration {path}")]
    Load {
        path: PathBuf,
        // Boxed: the config crate's error is large, and this one is returned everywhere.
        source: Box<config::ConfigError>,
    },
    #[error("invalid configuration: {key}: {message}")]
    Invalid { key: String, message: String },
}

/// The longest duration a setting may take. Deadlines are computed as now + duration, which
/// overflows (a panic) a few hundred billion years out; anything past a century is a typo.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // humantime's "100y"

/// Refuses a duration longer than [`MAX_DURATION`], naming its key.
fn check_duration(key: impl Into<String>, value: Duration) -> Result<(), ConfigError> {
    if value > MAX_DURATION {
        return Err(invalid(
            key,
            format!(
                "{} is too long (at most 100 years)",
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub supervisor: SupervisorConfig,
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// The endpoint picker (`gpuswap-epp`) in front of many boxes.
    #[serde(default)]
    pub epp: EppConfig,
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

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

fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// `ttl` must be whole seconds, at least one (etcd's lease unit).
fn validate_ttl(key: &str, ttl: Duration) -> Result<(), ConfigError> {
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(invalid(key, "must be whole seconds, at least 1s"));
    }
    Ok(())
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

/// One named key of `[gateway.keys.NAME]`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A file whose first line is the key (kept out of the configuration file).
    pub key_file: Option<PathBuf>,
    pub key: Option<String>,
    /// Glob patterns (`*`, `?`) over model names and aliases; unset: every model.
    pub models: Option<Vec<String>>,
    /// May load, unload and read logs.
    #[serde(default)]
    pub admin: bool,
}

/// Never prints the key itself.
impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("key_file", &self.key_file)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("admin", &self.admin)
            .finish()
    }
}

impl KeyConfig {
    /// The key: `key`, or the first line of `key_file` (read now).
    pub fn secret(&self) -> std::io::Result<String> {
        match (&self.key, &self.key_file) {
            (Some(key), _) => Ok(key.clone()),
            (None, Some(path)) => crate::auth::read_token_file(path),
            (None, None) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither key nor key_file is set",
            )),
        }
    }
}

/// `[epp]`: the endpoint picker that sends each request to one box's gateway.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EppConfig {
    /// ext_proc and gRPC health (`host:port`).
    pub listen: String,
    /// A static list of boxes (used when `discovery` is unset).
    pub boxes: Vec<BoxConfig>,
    /// Boxes registered in etcd instead of a static list.
    pub discovery: Option<DiscoveryConfig>,
    /// Largest request body the picker reads to find the model (413 above).
    #[serde(deserialize_with = "byte_size")]
    pub max_body: u64,
    /// Other boxes after the chosen one in `x-gateway-destination-endpoint`, for a proxy
    /// that retries down the list (0: one endpoint, which Envoy's ORIGINAL_DST cluster needs).
    pub fallbacks: usize,
    /// Requests in flight per box through this picker above which a box is full; when every
    /// box that could serve a model is full the request is shed with 429 (0: no limit).
    pub max_in_flight: u32,
}

impl Default for EppConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9002".into(),
            boxes: Vec::new(),
            discovery: None,
            max_body: 32 << 20,
            fallbacks: 0,
            max_in_flight: 0,
        }
    }
}

/// One GPU box: its gateway (where requests go) and its supervisor (whose Watch the
/// picker follows).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoxConfig {
    pub name: String,
    /// `ip:port` of the box's gateway.
    pub gateway: String,
    /// `unix:///path` (a local box) or `https://host:port`.
    pub supervisor: String,
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

impl BoxConfig {
    /// Checks one box; `key` names where it came from (`epp.boxes[0]`, an etcd key).
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid(format!("{key}.name"), "must not be empty"));
        }
        if self.gateway.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                format!("{key}.gateway"),
                "must be ip:port (the proxy connects to it as the destination endpoint)",
            ));
        }
        let endpoint: Endpoint =
            self.supervisor
                .parse()
                .map_err(|e: crate::endpoint::EndpointError| {
                    invalid(format!("{key}.supervisor"), e.to_string())
                })?;
        if matches!(endpoint, Endpoint::Https { .. }) && self.token_file.is_none() {
            return Err(invalid(
                format!("{key}.token_file"),
                "required when the supervisor is https://",
            ));
        }
        Ok(())
    }
}

/// `[epp] discovery`: where the boxes are found (etcd registrations, or pods through the
/// Kubernetes API) and where the pickers elect the active one (etcd's election, or a
/// `coordination.k8s.io` Lease).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// etcd endpoints (`http://host:port`).
    #[serde(default)]
    pub etcd: Vec<String>,
    /// The box pods and the Lease, through the Kubernetes API (instead of `etcd`).
    pub kubernetes: Option<KubernetesConfig>,
    /// Key prefix of the registrations (`/gpuswap/boxes/`).
    #[serde(default = "default_discovery_prefix")]
    pub prefix: String,
    /// The lease of the active picker: a standby takes over this long after it died.
    #[serde(default = "default_lease_ttl", deserialize_with = "duration")]
    pub ttl: Duration,
    /// Token and CA for boxes whose registered supervisor is `https://`.
    pub token_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
}

/// `[epp] discovery.kubernetes`: the boxes are the ready pods that `selector` matches (the
/// InferencePool's selector), listed and then watched through the API; the active picker
/// holds the Lease `lease`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The API server (`https://host:port`); unset: in the cluster, from
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub api: Option<String>,
    /// The API's bearer token (re-read for every request: projected tokens rotate); unset:
    /// the pod's service account token.
    pub api_token_file: Option<PathBuf>,
    /// The CA of the API's certificate; unset: the service account's `ca.crt`.
    pub api_ca_file: Option<PathBuf>,
    /// The namespace of the box pods and the Lease; unset: the picker's own (the service
    /// account's `namespace` file).
    pub namespace: Option<String>,
    /// Label selector of the box pods (`app=gpuswap-box,tier=gpu`).
    pub selector: String,
    /// The port of each pod's gateway (the InferencePool's `targetPorts`).
    pub gateway_port: u16,
    /// Each pod's supervisor, `{ip}` standing for the pod's IP (a pod's annotation
    /// `gpuswap.io/supervisor` overrides it).
    #[serde(default = "default_pod_supervisor")]
    pub supervisor: String,
    /// The Lease of the active picker.
    #[serde(default = "default_lease_name")]
    pub lease: String,
}

/// Where the service account's token, CA and namespace are mounted in a pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn default_pod_supervisor() -> String {
    "https://{ip}:7070".into()
}

fn default_lease_name() -> String {
    "gpuswap-epp".into()
}

fn default_discovery_prefix() -> String {
    "/gpuswap/boxes/".into()
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// None: `GPUSWAP_LOG_FORMAT`, else text.
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC endpoint for traces; `OTEL_EXPORTER_OTLP_ENDPOINT` also works.
    pub otlp_endpoint: Option<String>,
}

/// How a daemon writes its log lines on stderr (`[telemetry] log_format`, `--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a log format (expected \"text\" or \"json\")")]
pub struct UnknownLogFormat(String);

/// Either case ("JSON" too), as the environment variable always took it.
impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(text.to_owned())),
        }
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// What kind of server a backend is: it decides how readiness is probed.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackendKind {
    Sglang,
    Tabbyapi,
    Vllm,
    LlamaServer,
    Openai,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sglang => "sglang",
            BackendKind::Tabbyapi => "tabbyapi",
            BackendKind::Vllm => "vllm",
            BackendKind::LlamaServer => "llama-server",
            BackendKind::Openai => "openai",
        }
    }

    /// The path whose 200 proves the model is loaded and warm.
    pub fn default_health_path(self) -> &'static str {
        match self {
            // TabbyAPI's /health is up before any model is loaded.
            BackendKind::Tabbyapi => "/v1/model",
            BackendKind::Openai => "/v1/models",
            BackendKind::Sglang | BackendKind::Vllm | BackendKind::LlamaServer => "/health",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: BackendKind,
    pub command: Vec<String>,
    pub port: u16,
    #[serde(default = "default_host")]
    pub host: String,
    pub served_name: Option<String>,
    /// None: every GPU.
    pub gpus: Option<Vec<u32>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub user: Option<String>,
    #[serde(default = "default_startup_timeout", deserialize_with = "duration")]
    pub startup_timeout: Duration,
    #[serde(default = "default_stop_timeout", deserialize_with = "duration")]
    pub stop_timeout: Duration,
    pub health_path: Option<String>,
    pub ready_log: Option<String>,
    pub api_key: Option<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Files that must exist before the model can start (weights still downloading).
    #[serde(default)]
    pub requires: Vec<PathBuf>,
    /// The weight files its load reads (absolute paths; `*` and `?` in the file name), read
    /// into the page cache while a swap to it drains and stops the previous model. Empty:
    /// the files under `requires`.
    #[serde(default)]
    pub weights: Vec<String>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_ttl: Option<Duration>,
    /// Memory the model takes on each of its GPUs; None: the whole GPU (it runs alone there).
    #[serde(default, deserialize_with = "opt_byte_size")]
    pub vram: Option<u64>,
    /// Never stopped to make room for another model (only by deactivate, idle_ttl, reload or
    /// shutdown).
    #[serde(default)]
    pub pinned: bool,
    /// Put to sleep (process and port kept, GPU memory freed) rather than stopped to make
    /// room; [`ModelConfig::sleep_protocol`] resolves it.
    #[serde(default)]
    pub sleep: SleepSetting,
    /// vLLM with `sleep = true`: 1 (default) keeps the weights in host RAM while asleep, 2
    /// discards them (the wake reloads them from disk).
    pub sleep_level: Option<u8>,
    /// Host RAM it holds while asleep. Default: its `vram` when the weights stay in host RAM
    /// (vLLM level 1, SGLang with `--enable-weights-cpu-backup`, the table form), else
    /// [`SLEEPER_BASE_HOST_MEMORY`].
    #[serde(default, deserialize_with = "opt_byte_size")]
    pub host_memory: Option<u64>,
}

/// `[models.X] sleep`: `false` (the default), `true` (the kind's own protocol: vllm, sglang,
/// tabbyapi), or a table of requests for any server:
/// `sleep = { enter = "POST /sleep?level=1", leave = "POST /wake_up", asleep = "GET /is_sleeping" }`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SleepSetting {
    #[default]
    Off,
    Kind,
    Requests(SleepRequests),
}

impl SleepSetting {
    pub fn is_on(&self) -> bool {
        !matches!(self, SleepSetting::Off)
    }
}

/// The table form of `sleep`, as written: each request is `"METHOD /path?query"`, optionally
/// followed by a JSON body; `enter` and `leave` may list several, sent in order.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SleepRequests {
    #[serde(deserialize_with = "one_or_many")]
    pub enter: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub leave: Vec<String>,
    /// A request whose answer says whether it sleeps: 2xx means asleep, unless the body is a
    /// JSON object with a boolean `is_sleeping`, which says it.
    pub asleep: Option<String>,
}

impl<'de> Deserialize<'de> for SleepSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = SleepSetting;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or a table { enter = \"POST /path\", leave = \"POST /path\", asleep = \"GET /path\" }")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<SleepSetting, E> {
                Ok(if on {
                    SleepSetting::Kind
                } else {
                    SleepSetting::Off
                })
            }
            // An environment override arrives as text.
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<SleepSetting, E> {
                match text {
                    "true" => Ok(SleepSetting::Kind),
                    "false" => Ok(SleepSetting::Off),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(text), &self)),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<SleepSetting, A::Error> {
                SleepRequests::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(SleepSetting::Requests)
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(one) => vec![one],
        Raw::Many(many) => many,
    })
}

/// The box's memory (MemTotal), read once.
fn mem_total() -> Option<u64> {
    use procfs::Current;
    static TOTAL: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *TOTAL.get_or_init(|| procfs::Meminfo::current().ok().map(|m| m.mem_total))
}

/// Secret values shorter than this are not masked.
const MIN_SECRET_LEN: usize = 4;

/// A flag or variable name that says its value is secret (`--api-key`,
/// `HF_TOKEN`, `db-password`, `client_secret`): one of its words (between
/// `-`, `_` and `.`) is one of these. Whole words, so that
/// `--max-num-batched-tokens 8192` or `--tokenizer PATH` are not taken for
/// secrets (masking "8192" would blank every such number in the log).
pub fn is_secret_name(name: &str) -> bool {
    name.split(['-', '_', '.']).any(|word| {
        [
            "key",
            "token",
            "secret",
            "password",
            "passwd",
            "apikey",
            "passphrase",
        ]
        .iter()
        .any(|secret| word.eq_ignore_ascii_case(secret))
    })
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_startup_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_stop_timeout() -> Duration {
    Duration::from_secs(30)
}

impl ModelConfig {
    pub fn served_name<'a>(&'a self, key: &'a str) -> &'a str {
        self.served_name.as_deref().unwrap_or(key)
    }

    pub fn health_path(&self) -> &str {
        self.health_path
            .as_deref()
            .unwrap_or_else(|| self.kind.default_health_path())
    }

    /// The values that must never show in a log a client or an operator
    /// reads: the `api_key`, the values of command-line flags and of `env`
    /// variables whose names say they are secret (`--api-key k1,k2`,
    /// `--hf-token=T`, `HF_TOKEN`), and each item of a comma-separated one
    /// (a server may print its keys one by one).
    pub fn secrets(&self) -> Vec<String> {
        let mut found: Vec<String> = self.api_key.iter().cloned().collect();
        let mut args = self.command.iter().skip(1).peekable();
        while let Some(arg) = args.next() {
            let Some(flag) = arg.strip_prefix('-') else {
                continue;
            };
            match flag.split_once('=') {
                Some((name, value)) if is_secret_name(name) => found.push(value.to_owned()),
                Some(_) => {}
                None if is_secret_name(flag) => {
                    if let Some(value) = args.next_if(|next| !next.starts_with('-')) {
                        found.push(value.clone());
                    }
                }
                None => {}
            }
        }
        found.extend(
            self.env
                .iter()
                .filter(|(name, _)| is_secret_name(name))
                .map(|(_, value)| value.clone()),
        );
        let items: Vec<String> = found
            .iter()
            .filter(|v| v.contains(','))
            .flat_map(|v| v.split(',').map(|item| item.trim().to_owned()))
            .collect();
        found.extend(items);
        // Short values would mask common words (and tell how long the secret is).
        found.retain(|v| v.len() >= MIN_SECRET_LEN);
        found.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        found.dedup();
        found
    }

    /// Two models conflict when they share a GPU or a port: they never run together.
    pub fn conflicts_with(&self, other: &ModelConfig) -> bool {
        self.footprint().conflicts_with(&other.footprint())
    }

    pub fn footprint(&self) -> Footprint<'_> {
        Footprint {
            port: u32::from(self.port),
            host: &self.host,
            gpus: self.gpus.as_deref(),
        }
    }

    /// The requests that put model `name` to sleep and wake it; None when `sleep` is off.
    /// Refuses (naming the model, the key and what is missing) a command that lacks what its
    /// server needs to sleep, and `sleep_level` or `host_memory` where they mean nothing.
    /// [`Config::validate`] calls it, so on a loaded configuration it is never an error.
    pub fn sleep_protocol(&self, name: &str) -> Result<Option<SleepProtocol>, ConfigError> {
        let key = |k: &str| format!("models.\"{name}\".{k}");
        let kind = self.kind;
        if self.sleep_level.is_some()
            && !(kind == BackendKind::Vllm && self.sleep == SleepSetting::Kind)
        {
            return Err(invalid(
                key("sleep_level"),
                format!(
                    "model {name:?}: sleep_level applies only to vllm with sleep = true (this is {kind} with {})",
                    match &self.sleep {
                        SleepSetting::Off => "sleep off",
                        SleepSetting::Kind => "sleep = true",
                        SleepSetting::Requests(_) =>
                            "the table form of sleep, which spells its requests out",
                    }
                ),
            ));
        }
        if self.host_memory.is_some() && !self.sleep.is_on() {
            return Err(invalid(
                key("host_memory"),
                format!(
                    "model {name:?}: host_memory is what it holds while asleep, and sleep is off"
                ),
            ));
        }
        // What it holds in RAM while asleep: its vram when the weights stay there.
        let host_memory = |keeps_weights: bool| -> Result<u64, ConfigError> {
            match (self.host_memory, keeps_weights, self.vram) {
                (Some(bytes), _, _) => Ok(bytes),
                (None, false, _) => Ok(SLEEPER_BASE_HOST_MEMORY),
                (None, true, Some(vram)) => Ok(vram),
                (None, true, None) => Err(invalid(
                    key("host_memory"),
                    format!(
                        "model {name:?} keeps its weights in host RAM while asleep: set host_memory \
                         (or vram, its default) to what that takes"
                    ),
                )),
            }
        };
        let missing = |piece: &str| {
            invalid(
                key("sleep"),
                format!("model {name:?} ({kind}) cannot sleep: {piece}"),
            )
        };
        let protocol = match &self.sleep {
            SleepSetting::Off => return Ok(None),
            SleepSetting::Requests(requests) => {
                let parse = |k: &str, text: &String| {
                    SleepRequest::parse(text).map_err(|e| {
                        invalid(key(&format!("sleep.{k}")), format!("model {name:?}: {e}"))
                    })
                };
                let all = |k: &str, texts: &[String]| -> Result<Vec<SleepRequest>, ConfigError> {
                    if texts.is_empty() {
                        return Err(invalid(
                            key(&format!("sleep.{k}")),
                            format!("model {name:?}: list at least one request"),
                        ));
                    }
                    texts.iter().map(|t| parse(k, t)).collect()
                };
                let enter = all("enter", &requests.enter)?;
                let leave = all("leave", &requests.leave)?;
                let asleep = requests
                    .asleep
                    .as_ref()
                    .map(|t| parse("asleep", t))
                    .transpose()?;
                SleepProtocol::generic(enter, leave, asleep, host_memory(true)?)
            }
            SleepSetting::Kind => match kind {
                BackendKind::Vllm => {
                    if !self.has_flag("--enable-sleep-mode") {
                        return Err(missing("its command lacks --enable-sleep-mode"));
                    }
                    if !self.has_env("VLLM_SERVER_DEV_MODE", "1") {
                        return Err(missing(
                            "env lacks VLLM_SERVER_DEV_MODE = \"1\" (vLLM serves /sleep and /wake_up only in its development mode)",
                        ));
                    }
                    let level = self.sleep_level.unwrap_or(1);
                    if !matches!(level, 1 | 2) {
                        return Err(invalid(
                            key("sleep_level"),
                            format!(
                                "model {name:?}: must be 1 (weights kept in host RAM) or 2 (weights discarded)"
                            ),
                        ));
                    }
                    SleepProtocol::vllm(level, host_memory(level == 1)?)
                }
                BackendKind::Sglang => {
                    if !self.has_flag("--enable-memory-saver") {
                        return Err(missing("its command lacks --enable-memory-saver"));
                    }
                    let reload_from = if self.has_flag("--enable-weights-cpu-backup") {
                        None
                    } else {
                        Some(self.flag_value("--model-path").or_else(|| self.flag_value("--model")).ok_or_else(|| {
                            missing(
                                "without --enable-weights-cpu-backup its weights are dropped, and the wake reloads \
                                 them from --model-path, which its command lacks",
                            )
                        })?)
                    };
                    SleepProtocol::sglang(reload_from, host_memory(reload_from.is_none())?)
                }
                BackendKind::Tabbyapi => {
                    let auth_off = match self.flag_value("--disable-auth") {
                        Some(value) => value.eq_ignore_ascii_case("true"),
                        None => self.has_flag("--disable-auth"),
                    };
                    if self.api_key.is_none() && !auth_off {
                        return Err(missing(
                            "its /v1/model/unload and /v1/model/load need TabbyAPI's admin key: set api_key to \
                             api_tokens.yml's admin_key (it passes every other endpoint too), or pass --disable-auth true",
                        ));
                    }
                    let model = self
                        .flag_value("--model-name")
                        .unwrap_or_else(|| self.served_name(name));
                    SleepProtocol::tabbyapi(model, host_memory(false)?)
                }
                BackendKind::LlamaServer => {
                    return Err(missing(
                        "llama-server has no sleep route; it sleeps by itself with --sleep-idle-seconds (and stays \
                     ready), or spell the requests out with sleep = { enter = ..., leave = ... }",
                    ));
                }
                BackendKind::Openai => {
                    return Err(missing(
                        "openai has no sleep protocol of its own; spell the requests out with sleep = { enter = ..., leave = ... }",
                    ));
                }
            },
        };
        Ok(Some(protocol))
    }

    /// The words of the command (each argument split at whitespace, so that a `sh -c` script
    /// counts too).
    fn command_words(&self) -> impl Iterator<Item = &str> {
        self.command.iter().flat_map(|arg| arg.split_whitespace())
    }

    /// `--flag` or `--flag=VALUE` (not `=false`) is in the command.
    fn has_flag(&self, flag: &str) -> bool {
        self.command_words().any(|word| {
            word == flag
                || word
                    .strip_prefix(flag)
                    .and_then(|rest| rest.strip_prefix('='))
                    .is_some_and(|value| !value.eq_ignore_ascii_case("false"))
        })
    }

    /// The value of `--flag VALUE` or `--flag=VALUE` in the command.
    fn flag_value(&self, flag: &str) -> Option<&str> {
        let mut words = self.command_words();
        while let Some(word) = words.next() {
            if word == flag {
                return words.next().filter(|value| !value.starts_with('-'));
            }
            if let Some(value) = word
                .strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
            {
                return Some(value);
            }
        }
        None
    }

    /// `NAME=VALUE` is in `env`, or in the command (`env NAME=VALUE prog`, a `sh -c` script).
    fn has_env(&self, name: &str, value: &str) -> bool {
        self.env.get(name).is_some_and(|v| v == value)
            || self.command_words().any(|word| {
                word.strip_prefix(name).and_then(|r| r.strip_prefix('=')) == Some(value)
            })
    }
}

/// What a running model takes on its box: two models whose footprints conflict never run
/// together (the supervisor's rule, which the endpoint picker reads from Watch too).
#[derive(Clone, Copy, Debug)]
pub struct Footprint<'a> {
    pub port: u32,
    pub host: &'a str,
    /// None: every GPU.
    pub gpus: Option<&'a [u32]>,
}

impl Footprint<'_> {
    /// They share a port on overlapping hosts, or a GPU.
    pub fn conflicts_with(&self, other: &Footprint<'_>) -> bool {
        if self.port == other.port && hosts_overlap(self.host, other.host) {
            return true;
        }
        match (self.gpus, other.gpus) {
            (Some(a), Some(b)) => a.iter().any(|g| b.contains(g)),
            // Omitted = all GPUs, which overlaps everything.
            _ => true,
        }
    }
}

/// Whether two backends listening on the same port at hosts `a` and `b` can collide: the
/// kernel refuses the second bind, or a client of one reaches the other.
pub fn hosts_overlap(a: &str, b: &str) -> bool {
    match (bind_addresses(a), bind_addresses(b)) {
        (Some(a), Some(b)) => a.iter().any(|ip| b.contains(ip)),
        // A wildcard takes the port on every address.
        _ => true,
    }
}

/// The addresses a server bound to `host` listens on; None when it may be any of the box's
/// (a wildcard, or a name other than localhost, which may resolve to any address and is
/// not looked up: the configuration is checked without DNS).
fn bind_addresses(host: &str) -> Option<Vec<IpAddr>> {
    let bare = host.trim().trim_start_matches('[').trim_end_matches(']');
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        return Some(vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]);
    }
    // `::ffff:127.0.0.1` is 127.0.0.1 to the kernel.
    let ip = bare.parse::<IpAddr>().ok()?.to_canonical();
    (!ip.is_unspecified()).then(|| vec![ip])
}

/// The GPU indices of a `CUDA_VISIBLE_DEVICES` value; None when it names devices some other
/// way (UUIDs, MIG instances).
fn cuda_device_indices(value: &str) -> Option<BTreeSet<u32>> {
    value
        .split(',')
        .map(|device| device.trim().parse().ok())
        .collect()
}

/// A daemon's command-line flags: the last layer, above the file and the environment. They
/// are applied before [`Config::validate`], so a flag is checked like the key it sets (an
/// error names both), and again on every reload, so a flag is kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    /// gpuswap-supervisor's `--listen`: `supervisor.listen`.
    pub supervisor_listen: Option<String>,
    /// gpuswap-gateway's `--listen`: `gateway.listen`.
    pub gateway_listen: Option<String>,
    /// gpuswap-epp's `--listen`: `epp.listen`.
    pub epp_listen: Option<String>,
    /// `--log-format`: `telemetry.log_format`.
    pub log_format: Option<LogFormat>,
}

impl Flags {
    /// Sets the keys that flags were given for; returns each key with its flag.
    fn apply(&self, config: &mut Config) -> Vec<(&'static str, &'static str)> {
        let mut set = Vec::new();
        let mut listen = |flag: &Option<String>, key, field: &mut String| {
            if let Some(value) = flag {
                field.clone_from(value);
                set.push((key, "--listen"));
            }
        };
        listen(
            &self.supervisor_listen,
            "supervisor.listen",
            &mut config.supervisor.listen,
        );
        listen(
            &self.gateway_listen,
            "gateway.listen",
            &mut config.gateway.listen,
        );
        listen(&self.epp_listen, "epp.listen", &mut config.epp.listen);
        if let Some(format) = self.log_format {
            config.telemetry.log_format = Some(format);
            set.push(("telemetry.log_format", "--log-format"));
        }
        set
    }
}

/// Where a daemon's configuration comes from: its file and its flags. A daemon that reloads
/// keeps it, so that the reloaded file gets the same flags on top.
#[derive(Clone, Debug)]
pub struct ConfigLoader {
    pub path: PathBuf,
    pub flags: Flags,
}

impl ConfigLoader {
    pub fn new(path: impl Into<PathBuf>, flags: Flags) -> Self {
        Self {
            path: path.into(),
            flags,
        }
    }

    /// Defaults, the file, `GPUSWAP__*` environment overrides, the flags; then validates.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::read(&self.path)?;
        let flagged = self.flags.apply(&mut config);
        config.validate().map_err(|error| match error {
            ConfigError::Invalid { key, message } => {
                match flagged.iter().find(|(flagged, _)| *flagged == key) {
                    Some((_, flag)) => ConfigError::Invalid {
                        key: format!("{key} (set by {flag})"),
                        message,
                    },
                    None => ConfigError::Invalid { key, message },
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// `load` for a daemon's start: an invalid configuration is said on stderr (the error
    /// and its sources, after `program`) and ends the process with [`EXIT_BAD_CONFIG`], the
    /// status `--check` uses, so that a service manager can tell it from a crash.
    pub fn load_or_exit(&self, program: &str) -> Config {
        self.load().unwrap_or_else(|error| {
            eprintln!("{program}: {}", crate::error_chain(&error));
            std::process::exit(EXIT_BAD_CONFIG.into())
        })
    }
}

/// The exit status of every gpuswap daemon whose configuration is invalid.
pub const EXIT_BAD_CONFIG: u8 = 2;

impl Config {
    /// Loads defaults, then `path`, then `GPUSWAP__*` environment overrides, and validates
    /// (a daemon's flags too: [`ConfigLoader`]).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        ConfigLoader::new(path, Flags::default()).load()
    }

    /// The layers below the flags, not validated.
    fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: path.to_owned(),
            source: Box::new(source),
        };
        if !path.exists() {
            return Err(ConfigError::NotFound {
                path: path.to_owned(),
            });
        }
        let layered = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("GPUSWAP")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("gateway.api_keys")
                    .with_list_parse_key("gateway.admin_keys")
                    .with_list_parse_key("gateway.preload")
                    .with_list_parse_key("supervisor.tls_names")
                    .with_list_parse_key("gateway.cors_origins")
                    .with_list_parse_key("gateway.allowed_hosts")
                    .try_parsing(true),
            )
            .build()
            .map_err(load_err)?;
        layered.try_deserialize().map_err(load_err)
    }

    /// Parses TOML text alone (no environment), then validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: "<inline>".into(),
            source: Box::new(source),
        };
        let config: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|layered| layered.try_deserialize())
            .map_err(load_err)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: every error names the section or model and the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_supervisor()?;
        self.validate_gateway()?;
        self.validate_epp()?;
        let mut names: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, model) in &self.models {
            let key = |k: &str| format!("models.\"{name}\".{k}");
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(
                    format!("models.\"{name}\""),
                    "a model id must be non-empty and without whitespace",
                ));
            }
            if model.command.is_empty() || model.command[0].trim().is_empty() {
                return Err(invalid(key("command"), "must name a program"));
            }
            if model.port == 0 {
                return Err(invalid(key("port"), "must be 1-65535"));
            }
            if model.host.trim().is_empty() {
                return Err(invalid(key("host"), "must not be empty"));
            }
            for (k, value) in [
                ("startup_timeout", Some(model.startup_timeout)),
                ("stop_timeout", Some(model.stop_timeout)),
                ("idle_ttl", model.idle_ttl),
            ] {
                if let Some(value) = value {
                    check_duration(key(k), value)?;
                }
            }
            if model.startup_timeout.is_zero() {
                return Err(invalid(key("startup_timeout"), "must be more than 0s"));
            }
            if let Some(gpus) = &model.gpus
                && gpus.is_empty()
            {
                return Err(invalid(
                    key("gpus"),
                    "must list at least one GPU (omit it for all GPUs)",
                ));
            }
            if !model.health_path().starts_with('/') {
                return Err(invalid(key("health_path"), "must start with '/'"));
            }
            if let Some(s) = &model.served_name
                && s.trim().is_empty()
            {
                return Err(invalid(key("served_name"), "must not be empty"));
            }
            if let Some(r) = &model.ready_log
                && r.is_empty()
            {
                return Err(invalid(key("ready_log"), "must not be empty"));
            }
            if let Some(u) = &model.user
                && u.trim().is_empty()
            {
                return Err(invalid(key("user"), "must not be empty"));
            }
            for k in model.env.keys() {
                if k.is_empty() || k.contains('=') || k.contains('\0') {
                    return Err(invalid(key(&format!("env.{k}")), "invalid variable name"));
                }
            }
            if let Some(devices) = model.env.get("CUDA_VISIBLE_DEVICES") {
                check_cuda_devices(model.gpus.as_deref(), devices)
                    .map_err(|message| invalid(key("env.CUDA_VISIBLE_DEVICES"), message))?;
            }
            if model.weights.iter().any(|w| !w.starts_with('/')) {
                return Err(invalid(key("weights"), "paths must be absolute"));
            }
            if model.vram == Some(0) {
                return Err(invalid(key("vram"), "must be more than 0"));
            }
            if let (Some(vram), Some(memory)) = (model.vram, &self.supervisor.gpu_memory) {
                let gpus: Vec<u32> = match (&model.gpus, memory) {
                    (Some(gpus), _) => gpus.clone(),
                    (None, GpuMemory::PerGpu(sizes)) => sizes.keys().copied().collect(),
                    (None, GpuMemory::Every(_)) => vec![0],
                };
                for gpu in gpus {
                    if let Some(capacity) = memory.of(gpu)
                        && vram > capacity
                    {
                        return Err(invalid(
                            key("vram"),
                            format!(
                                "model {name:?} needs {} but GPU {gpu} has {} (supervisor.gpu_memory)",
                                format_bytes(vram),
                                format_bytes(capacity)
                            ),
                        ));
                    }
                }
            }
            for path in &model.requires {
                if !path.is_absolute() {
                    return Err(invalid(key("requires"), "paths must be absolute"));
                }
            }
            if let Some(protocol) = model.sleep_protocol(name)? {
                self.validate_sleeper(name, model, &protocol)?;
            }
            for id in std::iter::once(name.as_str()).chain(model.aliases.iter().map(String::as_str))
            {
                if id.trim().is_empty() {
                    return Err(invalid(key("aliases"), "an alias must not be empty"));
                }
                if let Some(other) = names.insert(id, name) {
                    return Err(invalid(
                        key("aliases"),
                        format!("{id:?} is already a name of model {other:?}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A sleeper keeps its port, so a model sharing it could never start beside it; and what
    /// it holds asleep must fit in the supervisor's host memory budget when one is set.
    fn validate_sleeper(
        &self,
        name: &str,
        model: &ModelConfig,
        protocol: &SleepProtocol,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("models.\"{name}\".{k}");
        if let Some((other, _)) = self.models.iter().find(|(other, m)| {
            *other != name && m.port == model.port && hosts_overlap(&m.host, &model.host)
        }) {
            return Err(invalid(
                key("sleep"),
                format!(
                    "model {name:?} shares port {} with model {other:?}: a sleeping model keeps its port, \
                     so the two could never swap by sleeping; give one of them another port",
                    model.port
                ),
            ));
        }
        if let Some(budget) = self.supervisor.host_memory
            && protocol.host_memory > budget
        {
            return Err(invalid(
                key("host_memory"),
                format!(
                    "model {name:?} holds {} while asleep, more than supervisor.host_memory ({}): it could never sleep",
                    format_bytes(protocol.host_memory),
                    format_bytes(budget)
                ),
            ));
        }
        Ok(())
    }

    fn validate_supervisor(&self) -> Result<(), ConfigError> {
        let s = &self.supervisor;
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
            if value.is_zero() {
                return Err(invalid(format!("supervisor.{key}"), "must be more than 0s"));
            }
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

    fn validate_gateway(&self) -> Result<(), ConfigError> {
        let g = &self.gateway;
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
            if value.is_zero() {
                return Err(invalid(format!("gateway.{key}"), "must be more than 0s"));
            }
        }
        if g.max_body == 0 {
            return Err(invalid("gateway.max_body", "must be more than 0"));
        }
        if g.queue_timeout.is_zero() {
            return Err(invalid("gateway.queue_timeout", "must be more than 0s"));
        }
        if g.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("gateway.api_keys", "keys must not be empty"));
        }
        if g.admin_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(invalid("gateway.admin_keys", "keys must not be empty"));
        }
        for (name, key) in &g.keys {
            let field = |k: &str| format!("gateway.keys.{name}.{k}");
            match (&key.key, &key.key_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(field("key"), "set key or key_file, not both"));
                }
                (None, None) => return Err(invalid(field("key"), "set key or key_file")),
                (Some(k), None) if k.trim().is_empty() => {
                    return Err(invalid(field("key"), "must not be empty"));
                }
                (None, Some(path)) if !path.is_absolute() => {
                    return Err(invalid(field("key_file"), "must be an absolute path"));
                }
                _ => {}
            }
            if let Some(models) = &key.models
                && models.iter().any(|m| m.trim().is_empty())
            {
                return Err(invalid(field("models"), "patterns must not be empty"));
            }
        }
        if g.keepalive_interval.is_zero() {
            return Err(invalid(
                "gateway.keepalive_interval",
                "must be more than 0s",
            ));
        }
        self.validate_gateway_limits()
    }

    /// The gateway's bounds on what clients may make it hold, and who may call.
    fn validate_gateway_limits(&self) -> Result<(), ConfigError> {
        let g = &self.gateway;
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
        if g.body_timeout.is_zero() {
            return Err(invalid("gateway.body_timeout", "must be more than 0s"));
        }
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

    fn validate_epp(&self) -> Result<(), ConfigError> {
        let e = &self.epp;
        if e.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "epp.listen",
                "must be an address such as 127.0.0.1:9002",
            ));
        }
        if e.max_body == 0 {
            return Err(invalid("epp.max_body", "must be more than 0"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, b) in e.boxes.iter().enumerate() {
            b.validate(&format!("epp.boxes[{i}]"))?;
            if !names.insert(b.name.as_str()) {
                return Err(invalid(
                    format!("epp.boxes[{i}].name"),
                    format!("box {:?} is listed twice", b.name),
                ));
            }
        }
        if let Some(d) = &e.discovery {
            if !e.boxes.is_empty() {
                return Err(invalid(
                    "epp.discovery",
                    "use either epp.boxes or epp.discovery, not both",
                ));
            }
            match &d.kubernetes {
                None if d.etcd.is_empty() => {
                    return Err(invalid(
                        "epp.discovery.etcd",
                        "must list an etcd endpoint (or set epp.discovery.kubernetes)",
                    ));
                }
                Some(_) if !d.etcd.is_empty() => {
                    return Err(invalid(
                        "epp.discovery.kubernetes",
                        "use either epp.discovery.etcd or epp.discovery.kubernetes, not both",
                    ));
                }
                Some(k) => k.validate()?,
                None => {}
            }
            if !d.prefix.starts_with('/') {
                return Err(invalid("epp.discovery.prefix", "must start with '/'"));
            }
            validate_ttl("epp.discovery.ttl", d.ttl)?;
        }
        Ok(())
    }
}

impl KubernetesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("epp.discovery.kubernetes.{k}");
        let scheme_ok = |api: &String| api.starts_with("https://") || api.starts_with("http://");
        if !self.api.as_ref().is_none_or(scheme_ok) {
            return Err(invalid(key("api"), "must be https://host:port"));
        }
        if self.selector.trim().is_empty() {
            return Err(invalid(
                key("selector"),
                "must select the box pods (app=gpuswap-box)",
            ));
        }
        if self.gateway_port == 0 {
            return Err(invalid(key("gateway_port"), "must be a port"));
        }
        if !self.supervisor.contains("{ip}") {
            return Err(invalid(
                key("supervisor"),
                "must contain {ip} (the pod's IP), e.g. https://{ip}:7070",
            ));
        }
        let lease_name = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c);
        if self.lease.is_empty() || !self.lease.chars().all(lease_name) {
            return Err(invalid(
                key("lease"),
                "must be a Kubernetes object name (lowercase letters, digits, '-' and '.')",
            ));
        }
        Ok(())
    }
}

/// `env.CUDA_VISIBLE_DEVICES` may only repeat `gpus`: the scheduler keeps two models off one
/// GPU by `gpus`, so a backend that sees other GPUs than those would share them unnoticed.
fn check_cuda_devices(gpus: Option<&[u32]>, devices: &str) -> Result<(), String> {
    let indices = cuda_device_indices(devices);
    match (gpus, indices) {
        (Some(gpus), Some(indices)) if gpus.iter().copied().collect::<BTreeSet<_>>() == indices => {
            Ok(())
        }
        (Some(gpus), _) => Err(format!(
            "{devices:?} disagrees with gpus = {gpus:?}: omit it (the supervisor sets it from gpus) or make the two the same"
        )),
        (None, Some(indices)) => Err(format!(
            "{devices:?} without gpus: write gpus = {:?} instead (the scheduler places models by gpus; without it the model counts as using every GPU)",
            indices.into_iter().collect::<Vec<_>>()
        )),
        // UUIDs or MIG instances with no gpus: the model counts as using every GPU.
        (None, None) => Ok(()),
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

/// Parses an octal file mode ("0660", "660", "0o660").
pub fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {text:?}")]
pub struct InvalidDuration {
    text: String,
    source: humantime::DurationError,
}

/// Parses "10m", "5s", "1h 30m", "250ms"; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|source| InvalidDuration {
        text: text.to_owned(),
        source,
    })
}

/// A size for people: "40 GiB", "1.5 GiB", "512 MiB", "100 B".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            return if whole * size == bytes {
                format!("{whole} {unit}")
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidSize {
    #[error("invalid size {0:?}: expected a number with an optional unit")]
    NotANumber(String),
    #[error("invalid size {text:?}: unknown unit {unit:?}")]
    UnknownUnit { text: String, unit: String },
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
}

/// Parses "32MiB", "512KB", "1048576".
pub fn parse_byte_size(text: &str) -> Result<u64, InvalidSize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| InvalidSize::NotANumber(text.to_owned()))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(InvalidSize::UnknownUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| InvalidSize::TooLarge(text.to_owned()))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TextOrNumber {
    Text(String),
    Number(u64),
}

/// A deserializer's error says one line: the error with its sources.
fn de_error<E: serde::de::Error>(error: &dyn std::error::Error) -> E {
    E::custom(crate::error_chain(error))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match TextOrNumber::deserialize(d)? {
        TextOrNumber::Text(t) => parse_duration(&t).map_err(|e| de_error(&e)),
        TextOrNumber::Number(n) => Ok(Duration::from_secs(n)),
    }
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

fn opt_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size(d).map(Some)
}

fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match TextOrNumber::deserialize(d)? {
        TextOrNumber::Text(t) => parse_byte_size(&t).map_err(|e| de_error(&e)),
        TextOrNumber::Number(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use procfs::Current;

    use super::*;

    const EXAMPLE: &str = r#"
[supervisor]
listen = "unix:///tmp/gpuswap-test.sock"
drain_timeout = "10m"
min_residency = "5s"

[gateway]
max_body = "1MiB"

[models."llama-3.3-70b-awq"]
kind = "sglang"
command = ["python", "-m", "sglang.launch_server", "--port", "30000"]
port = 30000
served_name = "llama"
gpus = [0]
aliases = ["llama3"]

[models.tabby]
kind = "tabbyapi"
command = ["python", "main.py"]
port = 5000
gpus = [0]
api_key = "k"

[models.small]
kind = "vllm"
command = ["vllm", "serve"]
port = 8000
gpus = [1]
"#;

    #[test]
    fn example_loads_with_defaults() {
        let c = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(c.supervisor.drain_timeout, Duration::from_secs(600));
        assert_eq!(c.gateway.max_body, 1 << 20);
        let name = "llama-3.3-70b-awq";
        let llama = &c.models[name];
        assert_eq!(llama.aliases, ["llama3"]);
        assert_eq!(llama.served_name(name), "llama");
        assert_eq!(llama.health_path(), "/health");
        assert_eq!(c.models["tabby"].health_path(), "/v1/model");
        assert!(llama.conflicts_with(&c.models["tabby"]));
        assert!(!llama.conflicts_with(&c.models["small"]));
    }

    fn error_of(text: &str) -> String {
        crate::error_chain(&Config::from_toml(text).unwrap_err())
    }

    #[test]
    fn log_formats_parse_in_either_case_and_bad_ones_name_the_key() {
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(" text ".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let c = Config::from_toml("[telemetry]\nlog_format = \"Json\"\n").unwrap();
        assert_eq!(c.telemetry.log_format, Some(LogFormat::Json));
        let e = error_of("[telemetry]\nlog_format = \"yaml\"\n");
        assert!(
            e.contains("telemetry.log_format") && e.contains("\"yaml\" is not a log format"),
            "{e}"
        );
    }

    #[test]
    fn flags_are_a_layer_under_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpuswap.toml");
        std::fs::write(
            &path,
            "[gateway]\nlisten = \"127.0.0.1:8002\"\n[telemetry]\nlog_format = \"json\"\n",
        )
        .unwrap();
        let flags = Flags {
            gateway_listen: Some("127.0.0.1:9000".into()),
            log_format: Some(LogFormat::Text),
            ..Flags::default()
        };
        let c = ConfigLoader::new(&path, flags).load().unwrap();
        assert_eq!(c.gateway.listen, "127.0.0.1:9000");
        assert_eq!(c.telemetry.log_format, Some(LogFormat::Text));

        // A flag is checked like its key, and the error names both.
        let flags = Flags {
            gateway_listen: Some("localhost:9000".into()),
            ..Flags::default()
        };
        let e = ConfigLoader::new(&path, flags)
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.listen (set by --listen)"), "{e}");

        // The file's value is not checked when a flag replaces it.
        std::fs::write(&path, "[supervisor]\nlisten = \"nowhere\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("supervisor.listen") && !e.contains("--listen"),
            "{e}"
        );
        let flags = Flags {
            supervisor_listen: Some("unix:///run/gpuswap/s.sock".into()),
            ..Flags::default()
        };
        let c = ConfigLoader::new(&path, flags).load().unwrap();
        assert_eq!(c.supervisor.listen, "unix:///run/gpuswap/s.sock");
    }

    #[test]
    fn errors_name_the_model_and_key() {
        let e = error_of("[models.a]\nkind = \"sglang\"\ncommand = []\nport = 1\n");
        assert!(e.contains("models.\"a\".command"), "{e}");
        let e = error_of("[models.a]\nkind = \"sglang\"\ncommand = [\"x\"]\nport = 0\n");
        assert!(e.contains("models.\"a\".port"), "{e}");
        let e = error_of("[models.a]\nkind = \"nope\"\ncommand = [\"x\"]\nport = 1\n");
        assert!(e.contains("nope"), "{e}");
        let e = error_of("[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
        let e = error_of(
            "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nstop_timeout = \"soon\"\n",
        );
        assert!(e.contains("soon"), "{e}");
        let e = error_of("[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_cert = \"c.pem\"\n");
        assert!(e.contains("supervisor.tls_key"), "{e}");
        let e = error_of(
            "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_names = [\"gpu box\"]\n",
        );
        assert!(e.contains("supervisor.tls_names"), "{e}");
        let e = error_of(
            "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n[models.b]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 2\naliases = [\"a\"]\n",
        );
        assert!(e.contains("models.\"b\".aliases"), "{e}");
    }

    fn model_at(host: &str, gpu: u32) -> ModelConfig {
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 8000\nhost = \"{host}\"\ngpus = [{gpu}]\n"
        );
        Config::from_toml(&text)
            .unwrap()
            .models
            .remove("m")
            .unwrap()
    }

    #[test]
    fn addresses_that_can_share_a_port_conflict() {
        let collide = [
            ("127.0.0.1", "localhost"),
            ("::1", "[::1]"),
            ("::1", "LOCALHOST."),
            ("0.0.0.0", "10.1.2.3"),
            ("[::]", "127.0.0.1"),
            ("::ffff:127.0.0.1", "127.0.0.1"),
            ("gpu-box.lan", "127.0.0.1"),
        ];
        for (a, b) in collide {
            assert!(model_at(a, 0).conflicts_with(&model_at(b, 1)), "{a} vs {b}");
            assert!(model_at(b, 0).conflicts_with(&model_at(a, 1)), "{b} vs {a}");
        }
        for (a, b) in [("127.0.0.1", "127.0.0.2"), ("::1", "127.0.0.2")] {
            assert!(
                !model_at(a, 0).conflicts_with(&model_at(b, 1)),
                "{a} vs {b}"
            );
        }
    }

    #[test]
    fn cuda_visible_devices_must_agree_with_gpus() {
        let model = |extra: &str| {
            format!("[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n{extra}\n")
        };
        for ok in [
            "gpus = [0, 1]\nenv = { CUDA_VISIBLE_DEVICES = \"1,0\" }",
            "env = { CUDA_VISIBLE_DEVICES = \"GPU-5d3c\" }",
        ] {
            Config::from_toml(&model(ok)).unwrap();
        }
        for bad in [
            "gpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }",
            "gpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"GPU-5d3c\" }",
            "env = { CUDA_VISIBLE_DEVICES = \"0\" }",
        ] {
            let e = error_of(&model(bad));
            assert!(e.contains("models.\"m\".env.CUDA_VISIBLE_DEVICES"), "{e}");
        }
    }

    #[test]
    fn gateway_keys_are_validated_and_never_printed() {
        let c = Config::from_toml(
            "[gateway]\nadmin_keys = [\"root\"]\n[gateway.keys.alice]\nkey = \"s3cret\"\nmodels = [\"llama-*\"]\n",
        )
        .unwrap();
        let alice = &c.gateway.keys["alice"];
        assert_eq!(alice.secret().unwrap(), "s3cret");
        assert_eq!(alice.models.as_deref(), Some(&["llama-*".to_owned()][..]));
        assert!(!alice.admin);
        assert!(!format!("{alice:?}").contains("s3cret"));
        let e = error_of("[gateway.keys.bob]\nmodels = [\"a\"]\n");
        assert!(e.contains("gateway.keys.bob.key"), "{e}");
        let e = error_of("[gateway.keys.bob]\nkey = \"k\"\nkey_file = \"/k\"\n");
        assert!(e.contains("gateway.keys.bob.key"), "{e}");
        let e = error_of("[gateway.keys.bob]\nkey_file = \"k\"\n");
        assert!(e.contains("gateway.keys.bob.key_file"), "{e}");
        let e = error_of("[gateway.keys.bob]\nkey = \"k\"\nmodels = [\"\"]\n");
        assert!(e.contains("gateway.keys.bob.models"), "{e}");
        let e = error_of("[gateway.keys.bob]\nkey = \"k\"\nadmn = true\n");
        assert!(e.contains("admn"), "{e}");
        let e = error_of("[gateway]\nadmin_keys = [\" \"]\n");
        assert!(e.contains("gateway.admin_keys"), "{e}");
    }

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
    fn epp_boxes_and_discovery_are_validated() {
        let ok = Config::from_toml(
            r#"
[epp]
listen = "127.0.0.1:9002"
boxes = [
  { name = "gpu1", gateway = "10.0.0.11:8002", supervisor = "https://10.0.0.11:7070", token_file = "/etc/gpuswap/gpu1.token", ca_file = "/etc/gpuswap/gpu1.pem" },
  { name = "gpu2", gateway = "127.0.0.1:8003", supervisor = "unix:///run/gpuswap/supervisor.sock" },
]
"#,
        )
        .unwrap();
        assert_eq!(ok.epp.boxes.len(), 2);
        assert_eq!(ok.epp.max_body, 32 << 20);
        let etcd = Config::from_toml("[epp]\ndiscovery = { etcd = [\"http://127.0.0.1:2379\"] }\n")
            .unwrap();
        assert_eq!(etcd.epp.discovery.unwrap().prefix, "/gpuswap/boxes/");
        let kube = Config::from_toml(
            "[epp]\ndiscovery = { kubernetes = { selector = \"app=gpuswap-box\", gateway_port = 8002 } }\n",
        )
        .unwrap();
        let kube = kube.epp.discovery.unwrap().kubernetes.unwrap();
        assert_eq!(
            (kube.supervisor.as_str(), kube.lease.as_str(), kube.api),
            ("https://{ip}:7070", "gpuswap-epp", None)
        );
        let cases = [
            ("[epp]\nlisten = \"nowhere\"\n", "epp.listen"),
            (
                "[epp]\nboxes = [{ name = \"g\", gateway = \"host\", supervisor = \"unix:///s\" }]\n",
                "epp.boxes[0].gateway",
            ),
            (
                "[epp]\nboxes = [{ name = \"g\", gateway = \"1.2.3.4:5\", supervisor = \"https://h:7\" }]\n",
                "epp.boxes[0].token_file",
            ),
            (
                "[epp]\nboxes = [{ name = \"g\", gateway = \"1.2.3.4:5\", supervisor = \"unix:///s\", color = 1 }]\n",
                "color",
            ),
            (
                "[epp]\nboxes = [{ name = \"g\", gateway = \"1.2.3.4:5\", supervisor = \"unix:///s\" }, { name = \"g\", gateway = \"1.2.3.4:6\", supervisor = \"unix:///t\" }]\n",
                "epp.boxes[1].name",
            ),
            ("[epp]\ndiscovery = { etcd = [] }\n", "epp.discovery.etcd"),
            (
                "[epp]\ndiscovery = { etcd = [\"http://e:2379\"], ttl = \"1500ms\" }\n",
                "epp.discovery.ttl",
            ),
            (
                "[gateway]\nregister = { etcd = [\"http://e:2379\"], name = \"g\", advertise = \"host\" }\n",
                "gateway.register.advertise",
            ),
            (
                "[gateway]\nregister = { etcd = [\"http://e:2379\"], name = \"a/b\", advertise = \"1.2.3.4:5\" }\n",
                "gateway.register.name",
            ),
            (
                "[gateway]\nregister = { etcd = [], name = \"g\", advertise = \"1.2.3.4:5\" }\n",
                "gateway.register.etcd",
            ),
            (
                "[epp]\ndiscovery = { etcd = [\"http://e:2379\"], prefix = \"boxes\" }\n",
                "epp.discovery.prefix",
            ),
            (
                "[epp]\ndiscovery = { etcd = [\"http://e:2379\"], kubernetes = { selector = \"a=b\", gateway_port = 8002 } }\n",
                "epp.discovery.kubernetes",
            ),
            (
                "[epp]\ndiscovery = { kubernetes = { selector = \" \", gateway_port = 8002 } }\n",
                "epp.discovery.kubernetes.selector",
            ),
            (
                "[epp]\ndiscovery = { kubernetes = { selector = \"a=b\", gateway_port = 8002, supervisor = \"https://box:7070\" } }\n",
                "epp.discovery.kubernetes.supervisor",
            ),
            (
                "[epp]\ndiscovery = { kubernetes = { selector = \"a=b\", gateway_port = 8002, lease = \"Leader\" } }\n",
                "epp.discovery.kubernetes.lease",
            ),
            (
                "[epp]\ndiscovery = { kubernetes = { selector = \"a=b\", gateway_port = 8002, api = \"kube:6443\" } }\n",
                "epp.discovery.kubernetes.api",
            ),
        ];
        for (text, key) in cases {
            let e = error_of(text);
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn secrets_come_from_the_key_secret_flags_and_secret_env() {
        let c = Config::from_toml(
            "[models.a]\nkind = \"vllm\"\nport = 1\napi_key = \"sk-config\"\n\
             command = [\"vllm\", \"serve\", \"--api-key\", \"k-one,k-two\", \"--hf-token=hf_abcdef\",\
             \"--port\", \"8000\", \"--SSL-KEYFILE\", \"/etc/k.pem\", \"--api-key\", \"--no-value\", \"--tokenizer\", \"some/tokenizer\", \"--max-num-batched-tokens\", \"8192\"]\n\
             env = { HF_TOKEN = \"hf_env_value\", DB_Password = \"hunter22\", PATH_TOKEN = \"ab\", LANG = \"C.UTF-8\" }\n",
        )
        .unwrap();
        let secrets = c.models["a"].secrets();
        for s in [
            "sk-config",
            "k-one,k-two",
            "k-one",
            "k-two",
            "hf_abcdef",
            "hf_env_value",
            "hunter22",
        ] {
            assert!(
                secrets.iter().any(|x| x == s),
                "{s} missing from {secrets:?}"
            );
        }
        for s in [
            "8000",
            "C.UTF-8",
            "ab",
            "--no-value",
            "some/tokenizer",
            "8192",
            "/etc/k.pem",
        ] {
            assert!(!secrets.iter().any(|x| x == s), "{s} in {secrets:?}");
        }
        // Longest first: a key that contains another is masked whole.
        assert!(secrets.windows(2).all(|w| w[0].len() >= w[1].len()));
    }

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
        for (line, key) in [
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
        ] {
            let e = error_of(&format!("[gateway]\n{line}\n"));
            assert!(e.contains(key), "{line}: {e}");
        }
        assert!(error_of("[gateway]\nmax_conections = 1\n").contains("max_conections"));
    }

    #[test]
    fn gpu_memory_and_vram() {
        let model = |extra: &str| {
            format!(
                "[models.big]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\ngpus = [1]\n{extra}"
            )
        };
        let c = Config::from_toml(&format!(
            "[supervisor]\ngpu_memory = \"96GiB\"\n{}",
            model("vram = \"40GiB\"\npinned = true\n")
        ))
        .unwrap();
        assert_eq!(c.supervisor.gpu_memory, Some(GpuMemory::Every(96 << 30)));
        assert_eq!(c.models["big"].vram, Some(40 << 30));
        assert!(c.models["big"].pinned);
        let c = Config::from_toml(&format!(
            "[supervisor]\ngpu_memory = {{ \"0\" = \"96GiB\", \"1\" = \"48GiB\" }}\n{}",
            model("")
        ))
        .unwrap();
        let memory = c.supervisor.gpu_memory.unwrap();
        assert_eq!(
            (memory.of(0), memory.of(1), memory.of(2)),
            (Some(96 << 30), Some(48 << 30), None)
        );
        assert!(!c.models["big"].pinned && c.models["big"].vram.is_none());
        let e = error_of(&format!(
            "[supervisor]\ngpu_memory = {{ \"0\" = \"96GiB\", \"1\" = \"48GiB\" }}\n{}",
            model("vram = \"50GiB\"\n")
        ));
        assert!(
            e.contains("models.\"big\".vram") && e.contains("GPU 1 has 48 GiB"),
            "{e}"
        );
        let e = error_of(&format!(
            "[supervisor]\ngpu_memory = {{ gpu0 = \"1GiB\" }}\n{}",
            model("")
        ));
        assert!(e.contains("gpu0"), "{e}");
        let e = error_of(&model("vram = \"lots\"\n"));
        assert!(e.contains("lots"), "{e}");
        let e = error_of(&model("vram = 0\n"));
        assert!(e.contains("models.\"big\".vram"), "{e}");
        assert_eq!(format_bytes(40 << 30), "40 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }

    /// A model of `kind` running `command` on `port`, with `extra` lines.
    fn sleeper(kind: &str, command: &str, port: u16, extra: &str) -> String {
        format!(
            "[models.m]\nkind = \"{kind}\"\ncommand = {command}\nport = {port}\ngpus = [0]\n{extra}\n"
        )
    }

    const VLLM: &str = r#"["vllm", "serve", "/m", "--enable-sleep-mode"]"#;
    const VLLM_ENV: &str = "env = { VLLM_SERVER_DEV_MODE = \"1\" }";

    #[test]
    fn each_kind_resolves_its_own_sleep_protocol() {
        let protocol = |text: &str| {
            let c = Config::from_toml(text).unwrap();
            c.models["m"].sleep_protocol("m").unwrap().unwrap()
        };
        let v = protocol(&sleeper(
            "vllm",
            VLLM,
            1,
            &format!("{VLLM_ENV}\nsleep = true\nvram = \"40GiB\""),
        ));
        assert_eq!(v.enter[0].to_string(), "POST /sleep?level=1");
        assert_eq!(v.leave[0].to_string(), "POST /wake_up");
        assert_eq!(v.asleep.unwrap().request.to_string(), "GET /is_sleeping");
        assert_eq!((v.host_memory, v.keeps_weights), (40 << 30, true));
        // The variable may be set in the command too; level 2 holds little.
        let v = protocol(&sleeper(
            "vllm",
            r#"["sh", "-c", "VLLM_SERVER_DEV_MODE=1 exec vllm serve /m --enable-sleep-mode"]"#,
            1,
            "sleep = true\nsleep_level = 2",
        ));
        assert_eq!(v.leave.len(), 3);
        assert_eq!(v.host_memory, crate::sleep::SLEEPER_BASE_HOST_MEMORY);
        // SGLang without a CPU backup reloads from its model path.
        let g = protocol(&sleeper(
            "sglang",
            r#"["python", "-m", "sglang.launch_server", "--model-path", "/models/q", "--enable-memory-saver"]"#,
            1,
            "sleep = true",
        ));
        assert_eq!(
            g.leave.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "POST /resume_memory_occupation {}",
                "POST /update_weights_from_disk {\"model_path\":\"/models/q\"}"
            ]
        );
        assert!(g.refuses_in_flight && g.asleep.is_none() && !g.keeps_weights);
        let g = protocol(&sleeper(
            "sglang",
            r#"["sglang", "serve", "--enable-memory-saver", "--enable-weights-cpu-backup"]"#,
            1,
            "sleep = true\nhost_memory = \"20GiB\"",
        ));
        assert_eq!((g.leave.len(), g.host_memory), (1, 20 << 30));
        let t = protocol(&sleeper(
            "tabbyapi",
            r#"["python", "main.py", "--model-name", "Qwen-exl2"]"#,
            1,
            "sleep = true\napi_key = \"admin-key\"",
        ));
        assert_eq!(t.enter[0].to_string(), "POST /v1/model/unload");
        assert_eq!(
            t.leave[0].to_string(),
            "POST /v1/model/load {\"name\":\"Qwen-exl2\"}"
        );
        // Without --model-name it loads its served name; --disable-auth needs no key.
        let t = protocol(&sleeper(
            "tabbyapi",
            r#"["python", "main.py", "--disable-auth", "true"]"#,
            1,
            "sleep = true\nserved_name = \"qwen\"",
        ));
        assert_eq!(t.leave[0].body.as_deref(), Some("{\"name\":\"qwen\"}"));
        let generic = protocol(&sleeper(
            "llama-server",
            r#"["llama-server"]"#,
            1,
            "host_memory = \"1GiB\"\nsleep = { enter = \"POST /sleep?level=1\", leave = [\"POST /wake_up\", \"POST /collective_rpc {\\\"method\\\":\\\"reload_weights\\\"}\"], asleep = \"GET /is_sleeping\" }",
        ));
        assert_eq!(generic.leave.len(), 2);
        assert_eq!(
            generic.leave[1].body.as_deref(),
            Some("{\"method\":\"reload_weights\"}")
        );
        let off = Config::from_toml(&sleeper("vllm", VLLM, 1, "sleep = false")).unwrap();
        assert_eq!(off.models["m"].sleep_protocol("m").unwrap(), None);
    }

    #[test]
    fn sleep_refusals_name_the_model_the_key_and_what_is_missing() {
        let tabby = r#"["python", "main.py"]"#;
        let sglang = r#"["sglang", "serve", "--enable-memory-saver"]"#;
        let cases: Vec<(String, &str, &str)> = vec![
            (
                sleeper("vllm", VLLM, 1, "sleep = true\nvram = \"1GiB\""),
                "models.\"m\".sleep",
                "VLLM_SERVER_DEV_MODE",
            ),
            (
                sleeper(
                    "vllm",
                    r#"["vllm", "serve"]"#,
                    1,
                    &format!("{VLLM_ENV}\nsleep = true\nvram = \"1GiB\""),
                ),
                "models.\"m\".sleep",
                "--enable-sleep-mode",
            ),
            (
                sleeper(
                    "vllm",
                    r#"["vllm", "serve", "--enable-sleep-mode=false"]"#,
                    1,
                    &format!("{VLLM_ENV}\nsleep = true\nvram = \"1GiB\""),
                ),
                "models.\"m\".sleep",
                "--enable-sleep-mode",
            ),
            (
                sleeper("vllm", VLLM, 1, &format!("{VLLM_ENV}\nsleep = true")),
                "models.\"m\".host_memory",
                "vram",
            ),
            (
                sleeper(
                    "vllm",
                    VLLM,
                    1,
                    &format!("{VLLM_ENV}\nsleep = true\nsleep_level = 3\nvram = \"1GiB\""),
                ),
                "models.\"m\".sleep_level",
                "1 (weights kept",
            ),
            (
                sleeper("sglang", r#"["sglang", "serve"]"#, 1, "sleep = true"),
                "models.\"m\".sleep",
                "--enable-memory-saver",
            ),
            (
                sleeper("sglang", sglang, 1, "sleep = true"),
                "models.\"m\".sleep",
                "--model-path",
            ),
            (
                sleeper("sglang", sglang, 1, "sleep = true\nsleep_level = 2"),
                "models.\"m\".sleep_level",
                "vllm",
            ),
            (
                sleeper("tabbyapi", tabby, 1, "sleep = true"),
                "models.\"m\".sleep",
                "admin key",
            ),
            (
                sleeper(
                    "tabbyapi",
                    r#"["python", "main.py", "--disable-auth", "false"]"#,
                    1,
                    "sleep = true",
                ),
                "models.\"m\".sleep",
                "--disable-auth",
            ),
            (
                sleeper("llama-server", r#"["llama-server"]"#, 1, "sleep = true"),
                "models.\"m\".sleep",
                "--sleep-idle-seconds",
            ),
            (
                sleeper("openai", r#"["x"]"#, 1, "sleep = true"),
                "models.\"m\".sleep",
                "sleep = { enter",
            ),
            (
                sleeper("vllm", VLLM, 1, "sleep_level = 1"),
                "models.\"m\".sleep_level",
                "sleep off",
            ),
            (
                sleeper("vllm", VLLM, 1, "host_memory = \"1GiB\""),
                "models.\"m\".host_memory",
                "sleep is off",
            ),
            (
                sleeper(
                    "openai",
                    r#"["x"]"#,
                    1,
                    "host_memory = 1\nsleep = { enter = \"/sleep\", leave = \"POST /wake\" }",
                ),
                "models.\"m\".sleep.enter",
                "METHOD /path",
            ),
            (
                sleeper(
                    "openai",
                    r#"["x"]"#,
                    1,
                    "host_memory = 1\nsleep = { enter = \"POST /s\", leave = [] }",
                ),
                "models.\"m\".sleep.leave",
                "at least one",
            ),
            (
                sleeper(
                    "openai",
                    r#"["x"]"#,
                    1,
                    "host_memory = 1\nsleep = { enter = \"POST /s\", leave = \"POST /w\", asleep = \"GET /a {x\" }",
                ),
                "models.\"m\".sleep.asleep",
                "not JSON",
            ),
            (
                sleeper(
                    "openai",
                    r#"["x"]"#,
                    1,
                    "host_memory = 1\nsleep = { enter = \"POST /s\", leave = \"POST /w\", asleep = \"GET /a\" }\nsleep_level = 1",
                ),
                "models.\"m\".sleep_level",
                "table form",
            ),
            (
                format!(
                    "{}[models.other]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nhost = \"localhost\"\ngpus = [1]\n",
                    sleeper(
                        "vllm",
                        VLLM,
                        1,
                        &format!("{VLLM_ENV}\nsleep = true\nvram = \"1GiB\"")
                    )
                ),
                "models.\"m\".sleep",
                "shares port 1 with model \"other\"",
            ),
            (
                format!(
                    "[supervisor]\nhost_memory = \"8GiB\"\n{}",
                    sleeper(
                        "vllm",
                        VLLM,
                        1,
                        &format!("{VLLM_ENV}\nsleep = true\nvram = \"40GiB\"")
                    )
                ),
                "models.\"m\".host_memory",
                "more than supervisor.host_memory (8 GiB)",
            ),
            (
                "[supervisor]\nhost_memory = 0\n".into(),
                "supervisor.host_memory",
                "more than 0",
            ),
        ];
        for (text, key, piece) in cases {
            let e = error_of(&text);
            assert!(
                e.contains(key) && e.contains(piece),
                "{key} / {piece}: {e}\n{text}"
            );
            if key.starts_with("models.") {
                assert!(e.contains("\"m\""), "the model is named: {e}");
            }
        }
        // Unknown keys of the table are refused by name; so is a value of another type.
        let e = error_of(&sleeper(
            "openai",
            r#"["x"]"#,
            1,
            "sleep = { enter = \"POST /s\", leave = \"POST /w\", wake = \"x\" }",
        ));
        assert!(e.contains("wake"), "{e}");
        let e = error_of(&sleeper("vllm", VLLM, 1, "sleep = 1"));
        assert!(
            e.contains("sleep") || e.contains("true, false or a table"),
            "{e}"
        );
        // A port on another address is no clash.
        Config::from_toml(&format!(
            "{}[models.other]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nhost = \"127.0.0.2\"\ngpus = [1]\n",
            sleeper("vllm", VLLM, 1, &format!("{VLLM_ENV}\nsleep = true\nvram = \"1GiB\""))
        ))
        .unwrap();
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

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_byte_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_byte_size("10").unwrap(), 10);
        assert!(parse_byte_size("10XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        let error = parse_duration("soon").unwrap_err();
        assert!(std::error::Error::source(&error).is_some(), "{error:?}");
        // A file's bad duration says which and why, under the key.
        let e = error_of("[supervisor]\ndrain_timeout = \"soon\"\n");
        assert!(
            e.contains("invalid duration \"soon\": ") && e.contains("supervisor.drain_timeout"),
            "{e}"
        );
    }

    #[test]
    fn absurd_durations_are_refused_with_their_key() {
        let model = "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n";
        for (extra, key) in [
            (
                "[supervisor]\ndrain_timeout = \"300000000000y\"\n",
                "supervisor.drain_timeout",
            ),
            ("[gateway]\nidle_ttl = \"101y\"\n", "gateway.idle_ttl"),
            ("", "models.\"a\".stop_timeout"),
        ] {
            let mut text = format!("{extra}{model}");
            if extra.is_empty() {
                text.push_str("stop_timeout = \"1000000y\"\n");
            }
            let error = Config::from_toml(&text).expect_err(key).to_string();
            assert!(error.contains(key), "{error}");
        }
        let century = "[supervisor]\ndrain_timeout = \"100y\"\n";
        assert!(Config::from_toml(century).is_ok());
    }
}
