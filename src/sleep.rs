//! Sleeping models: the requests that put a backend to sleep (its GPU memory freed, the process
//! and its port kept) and wake it again, resolved from `[models.X] sleep` for the supervisor to
//! run as they are.
//!
//! Each kind's own protocol, as its current server code has it (docs/backends.md, "Sleep and
//! wake"):
//! - vLLM (`--enable-sleep-mode`, env `VLLM_SERVER_DEV_MODE=1`): `POST /sleep?level=1` keeps the
//!   weights in host RAM and `POST /wake_up` brings them back; level 2 discards them, and the
//!   wake is `POST /wake_up?tags=weights`, `POST /collective_rpc {"method":"reload_weights"}`,
//!   `POST /wake_up?tags=kv_cache` (weights first, so that the reload never meets a full GPU).
//!   `GET /is_sleeping` answers `{"is_sleeping": bool}`.
//! - SGLang (`--enable-memory-saver`): `POST /release_memory_occupation {}` and
//!   `POST /resume_memory_occupation {}`. The weights survive only with
//!   `--enable-weights-cpu-backup`; without it the wake reloads them with
//!   `POST /update_weights_from_disk {"model_path": ...}`. No route says whether it sleeps.
//! - TabbyAPI: `POST /v1/model/unload` and `POST /v1/model/load {"name": ...}` (admin key);
//!   `GET /v1/model` is 503 while no model is loaded.

use std::fmt;

use http::Method;

/// What a sleeping model holds in host RAM when its weights are not kept there: the server's
/// own process (Python, CUDA context, tokenizer), not its weights.
pub const SLEEPER_BASE_HOST_MEMORY: u64 = 1 << 30;

/// One HTTP request of a sleep or wake, sent to the backend's own host and port with the
/// model's `api_key` as `Authorization: Bearer` (TabbyAPI's admin key passes that way too).
/// It succeeded when the answer is 2xx.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SleepRequest {
    pub method: Method,
    /// From the leading `/`, with the query (`/sleep?level=1`).
    pub path_and_query: String,
    /// A JSON body, sent with `Content-Type: application/json`; None: no body.
    pub body: Option<String>,
}

impl SleepRequest {
    fn new(method: Method, path_and_query: &str, body: Option<&str>) -> Self {
        Self {
            method,
            path_and_query: path_and_query.to_owned(),
            body: body.map(str::to_owned),
        }
    }

    /// Parses `"METHOD /path?query"`, optionally followed by a JSON body
    /// (`"POST /collective_rpc {\"method\":\"reload_weights\"}"`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (method, rest) = text
            .split_once(char::is_whitespace)
            .ok_or_else(|| format!("{text:?} is not \"METHOD /path\" (e.g. \"POST /sleep\")"))?;
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::GET,
            "POST" => Method::POST,
            "PUT" => Method::PUT,
            "PATCH" => Method::PATCH,
            "DELETE" => Method::DELETE,
            other => {
                return Err(format!(
                    "{text:?}: unknown method {other:?} (GET, POST, PUT, PATCH or DELETE)"
                ));
            }
        };
        let rest = rest.trim_start();
        let (path, body) = match rest.split_once(char::is_whitespace) {
            Some((path, body)) => (path, Some(body.trim())),
            None => (rest, None),
        };
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(format!("{text:?}: the path must start with '/'"));
        }
        if let Some(body) = body
            && let Err(e) = serde_json::from_str::<serde_json::Value>(body)
        {
            return Err(format!("{text:?}: the body is not JSON: {e}"));
        }
        Ok(Self::new(method, path, body))
    }
}

impl fmt::Display for SleepRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path_and_query)?;
        if let Some(body) = &self.body {
            write!(f, " {body}")?;
        }
        Ok(())
    }
}

/// How the answer to an [`AsleepProbe`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsleepAnswer {
    /// 2xx with a JSON object whose `is_sleeping` is true (vLLM's `/is_sleeping`).
    IsSleepingTrue,
    /// 503: no model loaded (TabbyAPI's `GET /v1/model`).
    Unavailable,
    /// The table form's `asleep`: a JSON object with a boolean `is_sleeping` says it; any
    /// other 2xx answer means asleep.
    Generic,
}

/// A request whose answer says whether the backend sleeps, to check a sleep took (and that a
/// wake did: then it must say awake).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AsleepProbe {
    pub request: SleepRequest,
    pub answer: AsleepAnswer,
}

impl AsleepProbe {
    /// Whether an answer of `status` with `body` says the backend sleeps.
    pub fn says_asleep(&self, status: u16, body: &[u8]) -> bool {
        let success = (200..300).contains(&status);
        let flag = || {
            serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("is_sleeping").and_then(serde_json::Value::as_bool))
        };
        match self.answer {
            AsleepAnswer::IsSleepingTrue => success && flag() == Some(true),
            AsleepAnswer::Unavailable => status == 503,
            AsleepAnswer::Generic => success && flag().unwrap_or(true),
        }
    }
}

/// A model's resolved sleep protocol: what the supervisor sends, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SleepProtocol {
    /// Sent in order to put it to sleep; each must answer 2xx.
    pub enter: Vec<SleepRequest>,
    /// Sent in order to wake it; each must answer 2xx. After the last one the model's usual
    /// readiness probe (`health_path`) must pass again.
    pub leave: Vec<SleepRequest>,
    /// Says whether it sleeps; None: the server has no such route (SGLang).
    pub asleep: Option<AsleepProbe>,
    /// Host RAM it holds while asleep (`[models.X] host_memory`, or its default), counted
    /// against `[supervisor] host_memory`.
    pub host_memory: u64,
    /// Whether the weights stay in host RAM while it sleeps (vLLM level 1, SGLang with
    /// `--enable-weights-cpu-backup`): then a wake reads nothing from disk.
    pub keeps_weights: bool,
    /// The server refuses to sleep while requests run (SGLang answers 400): drain it first.
    /// The others abort (vLLM) or cut (TabbyAPI) what runs, so draining first is right for
    /// every kind; this says what happens when it is not done.
    pub refuses_in_flight: bool,
}

impl SleepProtocol {
    /// vLLM at `level` 1 or 2.
    pub(crate) fn vllm(level: u8, host_memory: u64) -> Self {
        let post = |path: &str, body: Option<&str>| SleepRequest::new(Method::POST, path, body);
        let leave = if level == 1 {
            vec![post("/wake_up", None)]
        } else {
            vec![
                post("/wake_up?tags=weights", None),
                post("/collective_rpc", Some(r#"{"method":"reload_weights"}"#)),
                post("/wake_up?tags=kv_cache", None),
            ]
        };
        Self {
            enter: vec![post(&format!("/sleep?level={level}"), None)],
            leave,
            asleep: Some(AsleepProbe {
                request: SleepRequest::new(Method::GET, "/is_sleeping", None),
                answer: AsleepAnswer::IsSleepingTrue,
            }),
            host_memory,
            keeps_weights: level == 1,
            refuses_in_flight: false,
        }
    }

    /// SGLang; `reload_from`: the model path to reload the weights from when they were not
    /// backed up in host RAM.
    pub(crate) fn sglang(reload_from: Option<&str>, host_memory: u64) -> Self {
        let post = |path: &str, body: &str| SleepRequest::new(Method::POST, path, Some(body));
        let mut leave = vec![post("/resume_memory_occupation", "{}")];
        if let Some(path) = reload_from {
            let body = serde_json::json!({ "model_path": path }).to_string();
            leave.push(post("/update_weights_from_disk", &body));
        }
        Self {
            enter: vec![post("/release_memory_occupation", "{}")],
            leave,
            asleep: None,
            host_memory,
            keeps_weights: reload_from.is_none(),
            refuses_in_flight: true,
        }
    }

    /// TabbyAPI unloading and loading `name` (a folder of its model_dir).
    pub(crate) fn tabbyapi(name: &str, host_memory: u64) -> Self {
        let body = serde_json::json!({ "name": name }).to_string();
        Self {
            enter: vec![SleepRequest::new(Method::POST, "/v1/model/unload", None)],
            leave: vec![SleepRequest::new(
                Method::POST,
                "/v1/model/load",
                Some(&body),
            )],
            asleep: Some(AsleepProbe {
                request: SleepRequest::new(Method::GET, "/v1/model", None),
                answer: AsleepAnswer::Unavailable,
            }),
            host_memory,
            keeps_weights: false,
            refuses_in_flight: false,
        }
    }

    /// The table form, its requests parsed already.
    pub(crate) fn generic(
        enter: Vec<SleepRequest>,
        leave: Vec<SleepRequest>,
        asleep: Option<SleepRequest>,
        host_memory: u64,
    ) -> Self {
        Self {
            enter,
            leave,
            asleep: asleep.map(|request| AsleepProbe {
                request,
                answer: AsleepAnswer::Generic,
            }),
            host_memory,
            // Unknown: count its memory as if it kept them (the default host_memory is vram).
            keeps_weights: true,
            refuses_in_flight: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_and_without_a_body() {
        let r = SleepRequest::parse("POST /sleep?level=1").unwrap();
        assert_eq!(
            (r.method, r.path_and_query.as_str()),
            (Method::POST, "/sleep?level=1")
        );
        assert_eq!(r.body, None);
        let r =
            SleepRequest::parse("post  /collective_rpc {\"method\": \"reload_weights\"}").unwrap();
        assert_eq!(r.body.as_deref(), Some("{\"method\": \"reload_weights\"}"));
        assert_eq!(
            r.to_string(),
            "POST /collective_rpc {\"method\": \"reload_weights\"}"
        );
        for bad in ["/sleep", "FETCH /sleep", "POST sleep", "POST /x {not json"] {
            assert!(SleepRequest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn probes_read_answers_as_their_servers_give_them() {
        let vllm = SleepProtocol::vllm(1, 0).asleep.unwrap();
        assert!(vllm.says_asleep(200, br#"{"is_sleeping":true}"#));
        assert!(!vllm.says_asleep(200, br#"{"is_sleeping":false}"#));
        assert!(!vllm.says_asleep(404, br#"{"is_sleeping":true}"#));
        let tabby = SleepProtocol::tabbyapi("m", 0).asleep.unwrap();
        assert!(tabby.says_asleep(503, b"{}"));
        assert!(!tabby.says_asleep(200, br#"{"id":"m"}"#));
        let generic = AsleepProbe {
            request: SleepRequest::parse("GET /asleep").unwrap(),
            answer: AsleepAnswer::Generic,
        };
        assert!(generic.says_asleep(200, b"yes"));
        assert!(!generic.says_asleep(200, br#"{"is_sleeping":false}"#));
        assert!(!generic.says_asleep(500, b""));
    }

    #[test]
    fn vllm_level_two_reloads_the_weights_before_the_kv_cache() {
        let p = SleepProtocol::vllm(2, 0);
        let leave: Vec<String> = p.leave.iter().map(ToString::to_string).collect();
        assert_eq!(
            leave,
            [
                "POST /wake_up?tags=weights",
                "POST /collective_rpc {\"method\":\"reload_weights\"}",
                "POST /wake_up?tags=kv_cache"
            ]
        );
        assert_eq!(p.enter[0].to_string(), "POST /sleep?level=2");
        assert!(!p.keeps_weights);
    }
}
