//! Harness of the gateway's integration tests: the real supervisor, real
//! gateways and real mock backends over real sockets, one stack per test.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use futures_util::StreamExt;
use gpuswap::{SupervisorClient, pb};
use serde_json::{Value, json};
use testkit::{DEADLINE, Proc};

/// One model served by a mock backend (testkit's): every model is on GPU 0 unless told
/// otherwise, so any two of them swap.
pub type Model = testkit::MockModel;

/// Keep SGLang's shape (warm-up) but not its slowness, and no worker grandchild.
const SGLANG_ARGS: &[&str] = &["--warmup", "50ms", "--workers", "0"];

fn render(model: &Model, marker: &str) -> String {
    let flavor_args = if model.flavor == "sglang" {
        SGLANG_ARGS
    } else {
        &[]
    };
    model.render_with_args(marker, flavor_args)
}

/// A running gateway.
pub struct Gateway {
    pub proc: Proc,
    pub base: String,
    pub log: PathBuf,
}

impl Gateway {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A supervisor, its gateways and the models of one test.
pub struct Stack {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub marker: String,
    pub models: Vec<Model>,
    pub supervisor: Option<Proc>,
    pub gateways: Vec<Gateway>,
    pub client: SupervisorClient,
    pub http: reqwest::Client,
    starts: Arc<Mutex<StartLog>>,
    /// Extra environment of every gateway.
    gateway_env: Vec<(String, String)>,
}

pub use testkit::StartLog;

pub struct StackBuilder {
    test: String,
    supervisor: Vec<String>,
    gateway: Vec<String>,
    gateway_env: Vec<(String, String)>,
    models: Vec<Model>,
}

impl StackBuilder {
    /// An extra `[supervisor]` line.
    pub fn supervisor(mut self, line: &str) -> Self {
        self.supervisor.push(line.into());
        self
    }

    /// An extra `[gateway]` line.
    pub fn gateway(mut self, line: &str) -> Self {
        self.gateway.push(line.into());
        self
    }

    /// An environment variable of every gateway.
    pub fn gateway_env(mut self, name: &str, value: &str) -> Self {
        self.gateway_env.push((name.into(), value.into()));
        self
    }

    pub fn model(mut self, model: Model) -> Self {
        self.models.push(model);
        self
    }

    pub async fn start(self) -> Stack {
        let dir = testkit::short_tempdir();
        let socket = dir.path().join("s.sock");
        let client = testkit::supervisor_client(&socket);
        let marker = testkit::unique_marker(&self.test);
        let config_path = dir.path().join("gpuswap.toml");
        let mut config = testkit::stack_sections(
            &socket,
            &dir.path().join("state.json"),
            200,
            &self.supervisor,
            &self.gateway,
        );
        for model in &self.models {
            config.push_str(&render(model, &marker));
        }
        std::fs::write(&config_path, config).expect("write config");
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client");
        let mut stack = Stack {
            dir,
            config_path,
            marker,
            models: self.models,
            supervisor: None,
            gateways: Vec::new(),
            client,
            http,
            starts: Arc::default(),
            gateway_env: self.gateway_env,
        };
        stack.start_supervisor().await;
        stack.add_gateway().await;
        stack
    }
}

impl Stack {
    pub fn builder(test: &str) -> StackBuilder {
        StackBuilder {
            test: test.into(),
            supervisor: Vec::new(),
            gateway: Vec::new(),
            gateway_env: Vec::new(),
            models: Vec::new(),
        }
    }

    pub fn model(&self, name: &str) -> &Model {
        self.models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no model {name}"))
    }

    /// Starts (or restarts) the supervisor and waits until it answers.
    pub async fn start_supervisor(&mut self) {
        let log = self.dir.path().join("supervisor.log");
        let out = testkit::append_log(&log);
        let mut command = testkit::supervisor_command(&self.config_path, "info");
        command.stdout(out.try_clone().expect("log fd")).stderr(out);
        let proc = self.supervisor.insert(Proc::spawn(command));
        testkit::wait_until_answering(&self.client, proc, &log).await;
        tokio::spawn(testkit::follow_starts(
            self.client.clone(),
            Arc::clone(&self.starts),
        ));
    }

    /// Kills the supervisor (its backends go with it).
    pub fn kill_supervisor(&mut self) {
        if let Some(mut proc) = self.supervisor.take() {
            let _ = proc.child.kill();
            proc.wait_exit(DEADLINE);
        }
    }

    /// Starts another gateway on the shared configuration and waits until it
    /// sees the supervisor's catalog.
    pub async fn add_gateway(&mut self) -> usize {
        let index = self.gateways.len();
        let port = testkit::free_port();
        let log = self.dir.path().join(format!("gateway{index}.log"));
        let stderr = std::fs::File::create(&log).expect("gateway log");
        let mut command = Command::new(testkit::bin("gpuswap-gateway"));
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info,gpuswap_gateway=debug")
            .envs(self.gateway_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let gateway = Gateway {
            proc: Proc::spawn(command),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let health = gateway.url("/health");
        let http = self.http.clone();
        testkit::wait_for("the gateway to see the supervisor", DEADLINE, || {
            let (http, health) = (http.clone(), health.clone());
            async move {
                let body: Value = http.get(&health).send().await.ok()?.json().await.ok()?;
                (body["supervisor"]["connected"] == true).then_some(())
            }
        })
        .await;
        self.gateways.push(gateway);
        index
    }

    pub fn gateway(&self) -> &Gateway {
        &self.gateways[0]
    }

    pub fn url(&self, path: &str) -> String {
        self.gateway().url(path)
    }

    /// The logs of every process, for assertion messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        let mut paths = vec![self.dir.path().join("supervisor.log")];
        paths.extend(self.gateways.iter().map(|g| g.log.clone()));
        for path in paths {
            let log = testkit::read_lossy(&path);
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            text.push_str(&format!("\n--- {} (last lines)\n", path.display()));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// Models started so far, in order (from the supervisor's Watch stream).
    pub fn starts(&self) -> Vec<String> {
        self.starts.lock().unwrap().starts.clone()
    }

    pub async fn status(&self, model: &str) -> pb::ModelStatus {
        testkit::model_status(&self.client, model).await
    }

    pub async fn wait_state(&self, model: &str, state: pb::ModelState) -> pb::ModelStatus {
        testkit::wait_state(&self.client, model, state).await
    }

    /// A chat request body.
    pub fn chat(model: &str, stream: bool, max_tokens: u32) -> Value {
        json!({
            "model": model,
            "stream": stream,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello"}],
        })
    }

    /// GETs JSON from the first gateway; None when it does not answer with JSON.
    pub async fn get_json(&self, path: &str) -> Option<Value> {
        self.http
            .get(self.url(path))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }

    /// POSTs JSON to the first gateway; the status and the body text.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, String) {
        post_to(&self.http, &self.url(path), body).await
    }
}

pub async fn post_to(http: &reqwest::Client, url: &str, body: &Value) -> (u16, String) {
    let response = http
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("POST {url} body: {e}"));
    (status, text)
}

/// Reads an SSE response to its end: the raw text.
pub async fn read_stream(response: reqwest::Response) -> String {
    let mut stream = response.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        text.extend_from_slice(&chunk.expect("stream chunk"));
    }
    String::from_utf8(text).expect("utf-8 stream")
}

/// The `data:` payloads of an SSE text, comments and blank lines left out.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// The answer text of an SSE chat stream, progress chunks left out.
pub fn stream_content(text: &str) -> String {
    sse_data(text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| testkit::json(d))
        .filter(|v| v["id"] != "gpuswap-progress")
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}
