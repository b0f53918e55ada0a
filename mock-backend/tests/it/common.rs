//! Starting the mock binary and talking HTTP/1.1 to it (testkit's client).

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Value;
pub use testkit::http::Reply;
use testkit::{DEADLINE, Proc, http};
use tokio::net::TcpStream;

pub const MARKER_ENV: &str = "GPUSWAP_TEST_MARKER";
/// Lines longer than this are stored cut (the flood test writes megabyte lines).
const STORED_LINE_MAX: usize = 400;

#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    bytes: AtomicU64,
    longest_line: AtomicU64,
}

/// A running mock backend, killed with its process group when dropped.
pub struct Mock {
    pub proc: Proc,
    pub port: u16,
    pub model: String,
    pub marker: String,
    output: Arc<Output>,
}

impl Mock {
    pub fn start(flavor: &str, extra: &[&str]) -> Self {
        Self::start_on(flavor, testkit::free_port(), extra)
    }

    pub fn start_on(flavor: &str, port: u16, extra: &[&str]) -> Self {
        Self::spawn(flavor, port, extra, &[])
    }

    /// With environment variables set (vLLM's VLLM_SERVER_DEV_MODE).
    pub fn start_with_env(flavor: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(flavor, testkit::free_port(), extra, env)
    }

    fn spawn(flavor: &str, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let model = format!("mock-{flavor}-model");
        let marker = testkit::unique_marker(flavor);
        let mut command = Command::new(env!("CARGO_BIN_EXE_gpuswap-mock-backend"));
        command
            .args([
                "--flavor",
                flavor,
                "--port",
                &port.to_string(),
                "--model",
                &model,
            ])
            .args(extra)
            .envs(env.iter().copied())
            .env(MARKER_ENV, &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut proc = Proc::spawn(command);
        let output = Arc::new(Output::default());
        for stream in [
            proc.child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            proc.child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            std::thread::spawn(move || collect_lines(stream, &output));
        }
        Self {
            proc,
            port,
            model,
            marker,
            output,
        }
    }

    /// A chat completion request for the mock's model, read to the end.
    pub async fn chat(&self, stream: bool, max_tokens: u64) -> Reply {
        self.chat_naming(&self.model, stream, max_tokens).await
    }

    /// A chat completion request that names `model`, read to the end.
    pub async fn chat_naming(&self, model: &str, stream: bool, max_tokens: u64) -> Reply {
        let body = chat_request(model, stream, max_tokens);
        post(self.port, "/v1/chat/completions", &body).await
    }

    /// The status of `GET path` on this mock, or None when the connection is refused.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        probe(self.port, path).await
    }

    pub fn has_log(&self, needle: &str) -> bool {
        self.output
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains(needle))
    }

    /// Index of the first line containing `needle`.
    pub fn log_position(&self, needle: &str) -> Option<usize> {
        self.output
            .lines
            .lock()
            .unwrap()
            .iter()
            .position(|line| line.contains(needle))
    }

    pub fn logs(&self) -> String {
        self.output.lines.lock().unwrap().join("\n")
    }

    pub fn output_bytes(&self) -> u64 {
        self.output.bytes.load(Ordering::SeqCst)
    }

    pub fn longest_line(&self) -> u64 {
        self.output.longest_line.load(Ordering::SeqCst)
    }

    pub async fn wait_log(&self, needle: &str) {
        let what = format!("log line containing {needle:?}");
        testkit::wait_for(&what, DEADLINE, || async {
            self.has_log(needle).then_some(())
        })
        .await;
    }

    /// Waits until the port answers HTTP at all.
    pub async fn wait_listening(&self) {
        testkit::wait_for("the mock to listen", DEADLINE, || async {
            TcpStream::connect(("127.0.0.1", self.port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        self.proc.wait_exit(DEADLINE)
    }

    pub fn signal(&self, signal: libc::c_int) {
        self.proc.signal(signal);
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

fn collect_lines(stream: Box<dyn Read + Send>, output: &Output) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                output.bytes.fetch_add(n as u64, Ordering::SeqCst);
                let text_len = line.strip_suffix(b"\n").unwrap_or(&line).len() as u64;
                output.longest_line.fetch_max(text_len, Ordering::SeqCst);
                let kept = &line[..line.len().min(STORED_LINE_MAX)];
                let text = String::from_utf8_lossy(kept).trim_end().to_owned();
                output.lines.lock().unwrap().push(text);
            }
        }
    }
}

/// One request on a fresh connection (`Connection: close`: a backend that dies is not
/// reached through a kept connection), read to the end; Err when nothing answered.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Reply, String> {
    let method = method.parse().expect("an HTTP method");
    let mut request = http::client()
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .header("connection", "close");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_owned());
    }
    let reply = http::send(request).await;
    match reply.status {
        0 => Err(reply.error.unwrap_or_default()),
        _ => Ok(reply),
    }
}

pub async fn get(port: u16, path: &str) -> Reply {
    http(port, "GET", path, &[], None).await.expect("GET")
}

pub async fn post(port: u16, path: &str, body: &Value) -> Reply {
    http(port, "POST", path, &[], Some(&body.to_string()))
        .await
        .expect("POST")
}

/// The status of `GET path`, or None when the connection is refused.
pub async fn probe(port: u16, path: &str) -> Option<u16> {
    http(port, "GET", path, &[], None)
        .await
        .ok()
        .map(|reply| reply.status)
}

pub fn chat_request(model: &str, stream: bool, max_tokens: u64) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "say something nice"}],
        "stream": stream,
        "max_tokens": max_tokens,
    })
}

/// The content tokens of a chat stream, in order (the empty opening delta excluded).
pub fn chat_stream_tokens(chunks: &[Value]) -> Vec<String> {
    chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .filter(|content| !content.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A process's (parent, group, session).
pub fn proc_ids(pid: u32) -> Option<(u32, u32, u32)> {
    let stat = testkit::stat(pid)?;
    let id = |n: i32| u32::try_from(n).ok();
    Some((id(stat.ppid)?, id(stat.pgrp)?, id(stat.session)?))
}
