//! Harness of the gateway's integration tests: the real supervisor, real
//! gateways and real mock backends over real sockets, one stack per test.

use std::path::PathBuf;

use futures_util::StreamExt;
use serde_json::Value;
use testkit::{DEADLINE, Proc, StackBase, StartStack};

/// One model served by a mock backend (testkit's): every model is on GPU 0 unless told
/// otherwise, so any two of them swap.
pub type Model = testkit::MockModel;

/// Keep SGLang's shape (warm-up) but not its slowness, and no worker grandchild.
const SGLANG_ARGS: &[&str] = &["--warmup", "50ms", "--workers", "0"];

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

/// A supervisor, its gateways and the models of one test (the supervisor's half is
/// testkit's, reached through `Deref`).
pub struct Stack {
    base: StackBase,
    pub gateways: Vec<Gateway>,
    /// The stack's own connections (a test that counts the gateway's connections replaces
    /// it to let them go).
    pub http: reqwest::Client,
}

pub type StackBuilder = testkit::StackBuilder<Stack>;

impl StartStack for Stack {
    async fn start(builder: StackBuilder) -> Stack {
        let base = builder.write(200, |model, marker| {
            model.render_with_sglang_args(marker, SGLANG_ARGS)
        });
        let http = testkit::http::new_client();
        let mut stack = Stack {
            base,
            gateways: Vec::new(),
            http,
        };
        stack.start_supervisor().await;
        stack.add_gateway().await;
        stack
    }
}

testkit::stack_over_base!(Stack, base);

impl Stack {
    /// A stack of one model, alpha, behind a gateway with the settings `gateway_lines` (how
    /// the tests of a gateway setting start).
    pub async fn alpha_with(test: &str, gateway_lines: &[&str]) -> Stack {
        let builder = gateway_lines
            .iter()
            .fold(Stack::builder(test), |builder, line| builder.gateway(line));
        builder.model(Model::new("alpha")).start().await
    }

    /// Starts (or restarts) the supervisor and waits until it answers.
    pub async fn start_supervisor(&mut self) {
        self.base.start_supervisor_with("info", Proc::spawn).await;
    }

    /// Kills the supervisor (its backends go with it).
    pub fn kill_supervisor(&mut self) {
        if let Some(mut proc) = self.supervisor.take() {
            let _ = proc.child.kill();
            proc.wait_exit(DEADLINE);
        }
    }

    /// Starts another gateway on the shared configuration and waits until it
    /// sees the supervisor.
    pub async fn add_gateway(&mut self) -> usize {
        let index = self.gateways.len();
        let port = testkit::free_port();
        let log = self.gateway_log(index);
        let gateway = Gateway {
            proc: Proc::spawn(self.gateway_command(port, &log)),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        testkit::http::wait_gateway_connected(&gateway.url("/health")).await;
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
        self.logs_with(self.gateways.iter().map(|g| g.log.clone()))
    }

    /// A chat request body.
    pub fn chat(model: &str, stream: bool, max_tokens: u32) -> Value {
        testkit::chat_body(model, stream, max_tokens)
    }

    /// A chat request to the first gateway: its response, once the headers came.
    pub async fn post_chat(&self, model: &str, stream: bool, max_tokens: u32) -> reqwest::Response {
        self.http
            .post(self.url("/v1/chat/completions"))
            .json(&Self::chat(model, stream, max_tokens))
            .send()
            .await
            .expect("POST /v1/chat/completions")
    }

    /// A streamed chat of `model` through the first gateway, read to its end: the SSE text.
    pub async fn stream_chat(&self, model: &str, max_tokens: u32) -> String {
        read_stream(self.post_chat(model, true, max_tokens).await).await
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

    /// A chat of `model` (not streamed) through the first gateway that must be answered: the
    /// answer's text.
    pub async fn chat_ok(&self, model: &str, max_tokens: u32) -> String {
        let chat = Self::chat(model, false, max_tokens);
        let (status, text) = self.post("/v1/chat/completions", &chat).await;
        assert_eq!(status, 200, "{model}: {text}{}", self.logs());
        text
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

/// The value of the sample `series` (name and labels exactly as exposed).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

pub async fn metrics_text(stack: &Stack) -> String {
    let response = stack
        .http
        .get(stack.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap();
    assert_eq!(content_type, gpuswap_telemetry::CONTENT_TYPE);
    response.text().await.expect("metrics body")
}

/// Waits until the exposition satisfies `ready` (a response is recorded as
/// its last byte leaves, which races the client reading it).
pub async fn metrics_when(stack: &Stack, what: &str, ready: impl Fn(&str) -> bool) -> String {
    testkit::wait_for(what, testkit::DEADLINE, || async {
        let text = metrics_text(stack).await;
        ready(&text).then_some(text)
    })
    .await
}
