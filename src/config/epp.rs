//! `[epp]`: the endpoint picker's boxes, found in a static list, etcd or the Kubernetes API;
//! and the lease and prefix defaults that the gateway's `[gateway] register` shares.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    ConfigError, invalid,
    values::{byte_size, duration},
};
use crate::endpoint::Endpoint;

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

pub(super) fn default_discovery_prefix() -> String {
    "/gpuswap/boxes/".into()
}

pub(super) fn default_lease_ttl() -> Duration {
    Duration::from_secs(10)
}

/// `ttl` must be whole seconds, at least one (etcd's lease unit).
pub(super) fn validate_ttl(key: &str, ttl: Duration) -> Result<(), ConfigError> {
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(invalid(key, "must be whole seconds, at least 1s"));
    }
    Ok(())
}

impl EppConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let e = self;
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

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::assert_refused_naming};

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
        assert_refused_naming(cases);
    }
}
