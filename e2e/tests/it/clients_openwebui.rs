//! OpenWebUI itself (PyPI `open-webui`, pinned in e2e/openwebui/make-venv.sh) in front of
//! the real gateway, supervisor and mock llama-servers, driven through OpenWebUI's own HTTP
//! API, the calls its pages make: the model list (every gpuswap model, each with the "loaded"
//! state OpenWebUI reads from llama-server's router fields), a chat with a model that is not
//! loaded (gpuswap starts it), the model manager's load (`POST /openai/models/0/load`, which
//! OpenWebUI sends on as `POST /models/load`), its event stream (`/openai/models/0/sse`, from
//! `/models/sse`) and the eject button (`POST /api/models/unload`, sent on as
//! `POST /models/unload`). The connection is OpenWebUI's "llama.cpp" provider.
//!
//! Ignored by `cargo test`: OpenWebUI takes one to two minutes to start on a small machine
//! (measured on 2 busy cores: 122 s the first time, 57 s once its files are cached). `.ci/run` makes its venv
//! (`e2e/openwebui/make-venv.sh`, a few GB, cached per version under ~/.cache/gpuswap) and
//! runs it: `cargo test -p gpuswap-e2e --test it clients_openwebui:: -- --ignored`.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::clients_common;
use crate::clients_common::{Stack, mock};
use gpuswap::pb;
use serde_json::{Value, json};
use testkit::{DEADLINE, Proc};

/// How long OpenWebUI may take to answer /health (database migrations, imports).
const OPENWEBUI_START: Duration = Duration::from_secs(600);

/// The key OpenWebUI's connection uses: an admin key, so its load and eject are allowed.
const ADMIN_KEY: &str = "openwebui-admin-key";

/// The OpenWebUI venv, made (or found) by e2e/openwebui/make-venv.sh.
fn openwebui_venv() -> PathBuf {
    let script = clients_common::repo().join("e2e/openwebui/make-venv.sh");
    let output = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "could not make OpenWebUI's venv ({}): {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}

/// A running OpenWebUI and the admin session its page would hold.
struct OpenWebUi {
    base: String,
    token: String,
    http: reqwest::Client,
    log: PathBuf,
    _data: tempfile::TempDir,
    _proc: Proc,
}

impl OpenWebUi {
    /// Starts OpenWebUI on `gateway` (its OpenAI base URL, with /v1) with no login, no
    /// Ollama, nothing fetched from the internet, and signs in as its page does.
    async fn start(venv: &std::path::Path, gateway: &str) -> OpenWebUi {
        let data = testkit::short_tempdir();
        let port = testkit::free_port();
        let log = data.path().join("openwebui.log");
        let file = std::fs::File::create(&log).expect("openwebui log");
        let mut command = Command::new(venv.join("bin/open-webui"));
        command
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .env("DATA_DIR", data.path())
            .env("WEBUI_AUTH", "False")
            .env("WEBUI_SECRET_KEY", "gpuswap-test")
            .env("ENABLE_OLLAMA_API", "False")
            .env("OPENAI_API_BASE_URL", gateway)
            .env("OPENAI_API_KEY", ADMIN_KEY)
            // OpenWebUI's llama.cpp connection type: the router API's load, unload and state.
            .env("OPENAI_API_CONFIGS", r#"{"0": {"provider": "llama.cpp"}}"#)
            // Offline: no version check, no model downloads, no telemetry; and no local
            // embedding model to load (RAG is not what this test is about).
            .env("OFFLINE_MODE", "True")
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("ANONYMIZED_TELEMETRY", "False")
            .env("DO_NOT_TRACK", "true")
            .env("SCARF_NO_ANALYTICS", "true")
            .env("RAG_EMBEDDING_ENGINE", "openai")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        let mut proc = Proc::spawn(command);
        let base = format!("http://127.0.0.1:{port}");
        let http = testkit::http::client().clone();
        let started = std::time::Instant::now();
        testkit::wait_for("OpenWebUI to answer /health", OPENWEBUI_START, || {
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none(),
                "OpenWebUI exited ({exited:?}):\n{}",
                testkit::read_lossy(&log)
            );
            let (http, url) = (http.clone(), format!("{base}/health"));
            async move {
                let response = http.get(url).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
        eprintln!("OpenWebUI answered after {:?}", started.elapsed());
        // With WEBUI_AUTH=False the page signs in without a password and gets an admin token.
        let session: Value = http
            .post(format!("{base}/api/v1/auths/signin"))
            .json(&json!({ "email": "", "password": "" }))
            .send()
            .await
            .expect("sign in")
            .json()
            .await
            .expect("sign-in answer");
        assert_eq!(session["role"], "admin", "{session}");
        OpenWebUi {
            token: session["token"].as_str().expect("token").to_owned(),
            base,
            http,
            log,
            _data: data,
            _proc: proc,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .timeout(DEADLINE * 4);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    /// POSTs `body` to `path` as a page does and asserts that OpenWebUI granted it (`context`
    /// for the message): its answer.
    async fn post_ok(&self, path: &str, body: Value, context: impl Fn() -> String) -> Value {
        let (status, answer) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 200, "{answer}{}", context());
        answer
    }

    /// OpenWebUI's model list, as its pages get it: id -> `loaded` (null: not reported).
    async fn models(&self) -> Vec<(String, Value)> {
        let (status, body) = self.call(reqwest::Method::GET, "/api/models", None).await;
        assert_eq!(status, 200, "{body}");
        let mut models: Vec<(String, Value)> = body["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no data: {body}"))
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or("").to_owned(),
                    m["loaded"].clone(),
                )
            })
            .collect();
        models.sort_by(|a, b| a.0.cmp(&b.0));
        models
    }

    /// Waits until OpenWebUI shows `model` as loaded (or not).
    async fn wait_loaded(&self, model: &str, loaded: bool) {
        let mut last = Vec::new();
        let found = tokio::time::timeout(DEADLINE * 2, async {
            loop {
                last = self.models().await;
                if last.iter().any(|(id, l)| id == model && *l == loaded) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "OpenWebUI never showed {model} with loaded = {loaded}; it shows {last:?}\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        testkit::log_tails([&self.log])
    }
}

fn state(status: &pb::StatusResponse, model: &str) -> pb::ModelState {
    status
        .models
        .iter()
        .find(|m| m.name == model)
        .unwrap_or_else(|| panic!("no {model} in {status:?}"))
        .state()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "OpenWebUI starts in one to two minutes; .ci/run runs it with --ignored"]
async fn openwebui_lists_chats_loads_and_ejects_gpuswap_models() {
    let venv = openwebui_venv();
    // Both on GPU 0: loading one stops the other.
    let mut stack = Stack::builder("openwebui")
        .model(mock("llama-8b", "llama-server", &[0]).alias("llama"))
        .model(mock("qwen-7b", "llama-server", &[0]))
        // Closed (a key is needed), and OpenWebUI's key may load and unload.
        .gateway_env("GPUSWAP__GATEWAY__API_KEYS", "some-other-key")
        .gateway_env("GPUSWAP__GATEWAY__ADMIN_KEYS", ADMIN_KEY)
        .start()
        .await;
    stack.start_gateway().await;
    let webui = OpenWebUi::start(&venv, &stack.url("/v1")).await;
    let context = || format!("{}{}", stack.logs(), webui.log_tail());

    // Every gpuswap model (and alias), none loaded.
    let models = webui.models().await;
    assert_eq!(
        models,
        [
            ("llama".to_owned(), json!(false)),
            ("llama-8b".to_owned(), json!(false)),
            ("qwen-7b".to_owned(), json!(false)),
        ],
        "{}",
        context()
    );

    // A chat with a model that is not loaded: gpuswap starts it and it answers.
    let answer = webui
        .post_ok(
            "/api/chat/completions",
            json!({
                "model": "qwen-7b",
                "messages": [{ "role": "user", "content": "hello" }],
                "stream": false,
            }),
            context,
        )
        .await;
    let content = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        content.contains(&stack.model("qwen-7b").signature()),
        "{answer}{}",
        context()
    );
    webui.wait_loaded("qwen-7b", true).await;

    // The model manager's event stream, followed while the next model loads.
    let events = Arc::new(Mutex::new(String::new()));
    let mut response = webui
        .http
        .get(format!("{}/openai/models/0/sse", webui.base))
        .bearer_auth(&webui.token)
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status(), 200, "{}", context());
    let reader = {
        let events = Arc::clone(&events);
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = response.chunk().await {
                events
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
            }
        })
    };

    // Load, as the model manager's button does: the other model makes room.
    let answer = webui
        .post_ok(
            "/openai/models/0/load",
            json!({ "model": "llama-8b" }),
            context,
        )
        .await;
    assert_eq!(answer, json!({ "success": true }), "{}", context());
    webui.wait_loaded("llama-8b", true).await;
    webui.wait_loaded("qwen-7b", false).await;
    let status = stack.statuses().await;
    assert_eq!(state(&status, "llama-8b"), pb::ModelState::Ready);
    assert_eq!(state(&status, "qwen-7b"), pb::ModelState::Stopped);
    for step in ["loading", "loaded"] {
        let want = json!({
            "model": "llama-8b",
            "event": "status_change",
            "data": { "status": step },
        });
        testkit::wait_for(
            &format!("llama-8b {step} in OpenWebUI's model events"),
            DEADLINE,
            || {
                let seen = events.lock().unwrap().clone();
                let found = seen
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .any(|data| serde_json::from_str::<Value>(data).ok() == Some(want.clone()));
                std::future::ready(found.then_some(()))
            },
        )
        .await;
    }
    reader.abort();

    // Eject, as the button beside a loaded model does.
    webui
        .post_ok(
            "/api/models/unload",
            json!({ "model": "llama-8b" }),
            context,
        )
        .await;
    webui.wait_loaded("llama-8b", false).await;
    testkit::wait_for("the supervisor to stop llama-8b", DEADLINE, || async {
        (state(&stack.statuses().await, "llama-8b") == pb::ModelState::Stopped).then_some(())
    })
    .await;
}
