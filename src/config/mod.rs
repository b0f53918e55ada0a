//! The one configuration file shared by the supervisor, the gateway and the endpoint picker.
//!
//! Layers: built-in defaults, then the TOML file, then `GPUSWAP__SECTION__KEY`
//! environment overrides, then the daemon's flags ([`Flags`]), then [`Config::validate`]:
//! [`ConfigLoader`] does it all, at start and again on every reload.
//! Unknown keys are refused, and every error names the model and the key.
//!
//! - `loader`: the layers ([`ConfigLoader`], [`Flags`], [`EXIT_BAD_CONFIG`]) and the daemons'
//!   shared command-line flags ([`DaemonArgs`]).
//! - `supervisor`, `gateway`, `keys`, `epp`, `telemetry`: each section's keys, defaults and checks.
//! - `model`: `[models.NAME]` (the backend's command, kind, secrets) and its checks;
//!   `footprint`: the ports, addresses and GPUs that keep two models apart; `sleep`: the
//!   `sleep` setting and the protocol it resolves to.
//! - `values`: the value parsers (durations, byte sizes, file modes) and their serde forms.

mod epp;
mod footprint;
mod gateway;
mod keys;
mod loader;
mod model;
mod sleep;
mod supervisor;
mod telemetry;
mod values;

use std::{collections::BTreeMap, path::PathBuf};

use serde::Deserialize;

pub use self::{
    epp::{BoxConfig, DiscoveryConfig, EppConfig, KubernetesConfig, SERVICE_ACCOUNT_DIR},
    footprint::{Footprint, hosts_overlap},
    gateway::{GatewayConfig, RegisterConfig},
    keys::KeyConfig,
    loader::{ConfigLoader, Daemon, DaemonArgs, EXIT_BAD_CONFIG, Flags},
    model::{BackendKind, ModelConfig, is_secret_name},
    sleep::{SleepRequests, SleepSetting},
    supervisor::{GpuMemory, SupervisorConfig},
    telemetry::{LogFormat, TelemetryConfig, UnknownLogFormat},
    values::{
        InvalidDuration, InvalidSize, MAX_DURATION, format_bytes, parse_byte_size, parse_duration,
        parse_mode,
    },
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

impl Config {
    /// Checks what serde cannot: every error names the section or model and the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.supervisor.validate()?;
        self.gateway.validate()?;
        self.epp.validate()?;
        self.validate_models()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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

    /// What loading `text` refused, in one line.
    pub(super) fn error_of(text: &str) -> String {
        crate::error_chain(&Config::from_toml(text).unwrap_err())
    }

    /// Each text is refused with an error that names what its case gives: the key, or the
    /// value or unknown key at fault.
    pub(super) fn assert_refused_naming<T: AsRef<str>>(
        cases: impl IntoIterator<Item = (T, &'static str)>,
    ) {
        for (text, named) in cases {
            let text = text.as_ref();
            let e = error_of(text);
            assert!(e.contains(named), "{named}: {e}\n{text}");
        }
    }
}
