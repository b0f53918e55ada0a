//! Starting the mock binary and talking raw HTTP/1.1 to it.

use std::{
    io::{BufRead, BufReader, Read},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde_json::Value;
use testkit::{DEADLINE, Proc};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

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

/// An HTTP response as received.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
    /// False when the connection closed before the body's end.
    pub complete: bool,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        testkit::json(&self.text())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// The payloads of the SSE `data:` lines.
    pub fn sse_data(&self) -> Vec<String> {
        self.text()
            .split('\n')
            .map(|line| line.trim_end_matches('\r'))
            .filter_map(|line| line.strip_prefix("data: "))
            .map(str::to_owned)
            .collect()
    }

    /// The JSON chunks of an SSE body (everything but `[DONE]`).
    pub fn sse_chunks(&self) -> Vec<Value> {
        self.sse_data()
            .iter()
            .filter(|data| *data != "[DONE]")
            .map(|data| testkit::json(data))
            .collect()
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or(""));
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut raw))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out"))?
        .or_else(|e| match e.kind() {
            // A crashing server resets the connection: keep what arrived.
            std::io::ErrorKind::ConnectionReset => Ok(0),
            _ => Err(e),
        })?;
    parse_reply(&raw)
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

fn parse_reply(raw: &[u8]) -> std::io::Result<Reply> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| invalid("no complete response head"))?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
        .collect();
    let rest = &raw[head_end + 4..];
    let header = |name: &str| {
        headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.clone())
    };
    let (body, complete) = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        dechunk(rest)
    } else if let Some(length) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        (
            rest[..rest.len().min(length)].to_vec(),
            rest.len() >= length,
        )
    } else {
        (rest.to_vec(), true)
    };
    Ok(Reply {
        status,
        headers,
        body,
        complete,
    })
}

/// Chunked transfer decoding that keeps whatever arrived before a cut.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (body, false);
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            return (body, true);
        }
        if rest.len() < size {
            body.extend_from_slice(rest);
            return (body, false);
        }
        body.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
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
