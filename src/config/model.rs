//! `[models.NAME]`: one backend, its command, its kind (how readiness is probed) and the
//! secrets its log must not show; and the checks of every model together.

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    Config, ConfigError, GpuMemory,
    footprint::{Footprint, check_cuda_devices},
    invalid,
    sleep::SleepSetting,
    values::{check_duration, check_positive, duration, format_bytes, opt_byte_size, opt_duration},
};
#[cfg(doc)]
use crate::sleep::SLEEPER_BASE_HOST_MEMORY;

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

    /// The words of the command (each argument split at whitespace, so that a `sh -c` script
    /// counts too).
    fn command_words(&self) -> impl Iterator<Item = &str> {
        self.command.iter().flat_map(|arg| arg.split_whitespace())
    }

    /// `--flag` or `--flag=VALUE` (not `=false`) is in the command.
    pub(super) fn has_flag(&self, flag: &str) -> bool {
        self.command_words().any(|word| {
            word == flag
                || word
                    .strip_prefix(flag)
                    .and_then(|rest| rest.strip_prefix('='))
                    .is_some_and(|value| !value.eq_ignore_ascii_case("false"))
        })
    }

    /// The value of `--flag VALUE` or `--flag=VALUE` in the command.
    pub(super) fn flag_value(&self, flag: &str) -> Option<&str> {
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
    pub(super) fn has_env(&self, name: &str, value: &str) -> bool {
        self.env.get(name).is_some_and(|v| v == value)
            || self.command_words().any(|word| {
                word.strip_prefix(name).and_then(|r| r.strip_prefix('=')) == Some(value)
            })
    }
}

impl Config {
    /// Checks every model: its own keys, its sleep protocol, and that no two models share a
    /// name or an alias.
    pub(super) fn validate_models(&self) -> Result<(), ConfigError> {
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
            check_positive(key("startup_timeout"), model.startup_timeout)?;
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
                    .map_err(|e| invalid(key("env.CUDA_VISIBLE_DEVICES"), e.to_string()))?;
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
}

#[cfg(test)]
mod tests {
    use crate::config::{
        Config, GpuMemory, format_bytes,
        tests::{assert_refused_naming, error_of},
    };

    #[test]
    fn errors_name_the_model_and_key() {
        assert_refused_naming([
            (
                "[models.a]\nkind = \"sglang\"\ncommand = []\nport = 1\n",
                "models.\"a\".command",
            ),
            (
                "[models.a]\nkind = \"sglang\"\ncommand = [\"x\"]\nport = 0\n",
                "models.\"a\".port",
            ),
            (
                "[models.a]\nkind = \"nope\"\ncommand = [\"x\"]\nport = 1\n",
                "nope",
            ),
            (
                "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nbogus = 1\n",
                "bogus",
            ),
            (
                "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nstop_timeout = \"soon\"\n",
                "soon",
            ),
            (
                "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_cert = \"c.pem\"\n",
                "supervisor.tls_key",
            ),
            (
                "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_names = [\"gpu box\"]\n",
                "supervisor.tls_names",
            ),
            (
                "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n[models.b]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 2\naliases = [\"a\"]\n",
                "models.\"b\".aliases",
            ),
        ]);
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
        assert_refused_naming([
            (model("vram = \"lots\"\n"), "lots"),
            (model("vram = 0\n"), "models.\"big\".vram"),
        ]);
        assert_eq!(format_bytes(40 << 30), "40 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
