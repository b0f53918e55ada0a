//! `[models.NAME] sleep`: the setting as written, the protocol it resolves to for the
//! model's kind, and what a sleeper needs of the other models and of the box.

use std::fmt;

use serde::{Deserialize, Deserializer};

use super::{BackendKind, Config, ConfigError, ModelConfig, format_bytes, hosts_overlap, invalid};
use crate::sleep::{SLEEPER_BASE_HOST_MEMORY, SleepProtocol, SleepRequest};

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

impl ModelConfig {
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
}

impl Config {
    /// A sleeper keeps its port, so a model sharing it could never start beside it; and what
    /// it holds asleep must fit in the supervisor's host memory budget when one is set.
    pub(super) fn validate_sleeper(
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
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::error_of};

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
}
