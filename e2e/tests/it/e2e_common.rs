//! Harness of the end-to-end fault suite: the real supervisor, gateway, gpuswapctl and mock
//! backends over real sockets, one stack per test. Besides starting and killing the daemons,
//! it judges every answer (served by the model asked for, a well-formed OpenAI error, or
//! lost) and samples the backend processes of each model from /proc while a test runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use testkit::{
    DEADLINE, Proc, StackBase, StartStack, chat_body, http, is_progress, partial_stream_content,
    sse_data,
};

use testkit::http::{Opened, Reply};

/// The variable that tags every backend process (see `processes_with_marker`).
pub use testkit::MARKER_ENV;

/// What `/proc/PID/stat` shows as the name of a mock backend (15 bytes of `comm`).
const MOCK_COMM: &str = "gpuswap-mock-ba";

/// One model served by a mock backend (testkit's): a vLLM-like mock on GPU 0 that loads in
/// 300 ms and answers without delay, unless told otherwise, so any two swap.
pub type Model = testkit::MockModel;

/// Keep SGLang's shape (warm-up, a worker grandchild) but not its slowness.
const SGLANG_ARGS: &[&str] = &["--warmup", "50ms"];

/// The model's table; its processes carry the model's own marker (see [`model_marker`]).
fn render(model: &Model, stack_marker: &str) -> String {
    model.render_with_sglang_args(&model_marker(stack_marker, &model.name), SGLANG_ARGS)
}

/// The marker of one model's processes: no model's marker is a prefix of another's.
pub fn model_marker(stack_marker: &str, model: &str) -> String {
    format!("{stack_marker}/{model}/")
}

/// `[served by NAME]`: how every mock answer begins.
pub fn signature(served: &str) -> String {
    format!("[served by {served}]")
}

/// A supervisor, a gateway and the models of one test (the supervisor's half is testkit's,
/// reached through `Deref`).
pub struct Stack {
    base: StackBase,
    pub gateway: Option<Proc>,
    /// The gateway listens here across restarts.
    pub gateway_port: u16,
    gateway_runs: usize,
}

pub type StackBuilder = testkit::StackBuilder<Stack>;

impl StartStack for Stack {
    /// Writes the configuration, starts the supervisor and the gateway, and waits until the
    /// gateway sees the supervisor.
    async fn start(builder: StackBuilder) -> Stack {
        Stack::start_rendered(builder, render).await
    }
}

impl Stack {
    /// As `start`, with each model's table written by `render(model, stack_marker)` (the
    /// real-server suite renders real servers' commands).
    pub async fn start_rendered(
        builder: StackBuilder,
        render: impl Fn(&Model, &str) -> String,
    ) -> Stack {
        let mut stack = Stack {
            base: builder.write(300, render),
            gateway: None,
            gateway_port: testkit::free_port(),
            gateway_runs: 0,
        };
        stack.start_supervisor().await;
        stack.start_gateway().await;
        stack
    }
}

testkit::stack_over_base!(Stack, base);

impl Stack {
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts (or restarts) the supervisor on the same configuration and waits until it
    /// answers; follows its Watch stream to record starts.
    pub async fn start_supervisor(&mut self) {
        self.base
            .start_supervisor_with("info,gpuswap_supervisor=debug", spawn_tied)
            .await;
    }

    /// SIGKILLs the supervisor and reaps it; returns when it is gone.
    pub fn kill_supervisor(&mut self) -> Instant {
        let mut proc = self.supervisor.take().expect("a supervisor");
        proc.signal(libc::SIGKILL);
        let killed = Instant::now();
        proc.wait_exit(DEADLINE);
        killed
    }

    /// Starts (or restarts) the gateway on its port and waits until it sees the supervisor.
    pub async fn start_gateway(&mut self) {
        let log = self.gateway_log(self.gateway_runs);
        self.gateway_runs += 1;
        let command = self.gateway_command(self.gateway_port, &log);
        self.gateway = Some(spawn_tied(command));
        testkit::http::wait_gateway_connected(&self.url("/health")).await;
    }

    /// SIGKILLs the gateway and reaps it.
    pub fn kill_gateway(&mut self) {
        let mut proc = self.gateway.take().expect("a gateway");
        proc.signal(libc::SIGKILL);
        proc.wait_exit(DEADLINE);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }

    /// The gateway's `/health`, None when it does not answer.
    pub async fn health(&self) -> Option<Value> {
        let reply = http::get(&self.url("/health")).await;
        (reply.status == 200).then(|| serde_json::from_str(&reply.text).ok())?
    }

    /// Requests in flight in the gateway, per routed model.
    pub async fn in_flight(&self) -> BTreeMap<String, u64> {
        let health = self.health().await.expect("the gateway's /health");
        health["models"]
            .as_array()
            .expect("models in /health")
            .iter()
            .map(|m| {
                (
                    m["id"].as_str().unwrap_or_default().to_owned(),
                    m["in_flight"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// POSTs a chat request to the gateway and reads the whole answer.
    pub async fn chat(&self, model: &str, stream: bool, max_tokens: u32) -> Reply {
        http::post(
            &self.url("/v1/chat/completions"),
            &chat_body(model, stream, max_tokens),
        )
        .await
    }

    /// Opens a chat request; the body is read by the caller.
    pub async fn open_chat(&self, model: &str, stream: bool, max_tokens: u32) -> Opened {
        let request = http::client()
            .post(self.url("/v1/chat/completions"))
            .json(&chat_body(model, stream, max_tokens));
        http::open(request)
            .await
            .unwrap_or_else(|e| panic!("POST to the gateway: {e}"))
    }

    /// Runs `gpuswapctl --endpoint <this supervisor> ARGS...` to its end (bounded).
    pub async fn ctl(&self, args: &[&str]) -> CtlOutput {
        let started = Instant::now();
        let output = testkit::run_ctl(&self.endpoint(), args).await;
        CtlOutput {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            ended: Instant::now(),
            took: started.elapsed(),
        }
    }

    /// The live processes of this stack's backends (guards, leaders, workers).
    pub fn backend_processes(&self) -> Vec<u32> {
        testkit::processes_with_marker(&self.marker)
    }

    /// The processes of one model.
    pub fn model_processes(&self, model: &str) -> Vec<u32> {
        testkit::processes_with_marker(&model_marker(&self.marker, model))
    }

    /// The leader (server) processes of each model, workers and guards left out.
    pub fn leaders(&self) -> BTreeMap<String, Vec<u32>> {
        let mut leaders: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for p in scan_mocks(&self.marker) {
            if !p.worker {
                leaders.entry(p.model).or_default().push(p.pid);
            }
        }
        leaders
    }

    /// Samples the leaders of this stack's models until `finish`.
    pub fn sampler(&self, conflicts: &[(&str, &str)]) -> Sampler {
        Sampler::start(
            &self.marker,
            conflicts
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
    }

    /// The last lines of every log, for assertion messages.
    pub fn logs(&self) -> String {
        self.logs_with((0..self.gateway_runs).map(|i| self.gateway_log(i)))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        // The gateway first, then the supervisor, whose death ends every backend.
        drop(self.gateway.take());
        drop(self.supervisor.take());
    }
}

/// Spawns a daemon that dies with this test process, even one killed by a timeout (which
/// runs no destructor): the supervisor's death then ends every backend.
fn spawn_tied(mut command: Command) -> Proc {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl and getppid are async-signal-safe; nothing is allocated.
    unsafe {
        let parent = libc::getpid();
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    // The parent-death signal follows the spawning thread: call this from the test or a
    // runtime worker (they live as long as the test), never from a blocking-pool thread.
    Proc::spawn(command)
}

/// What a gpuswapctl run printed.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub ended: Instant,
    pub took: Duration,
}

// ----- judging answers -----------------------------------------------------------------------

/// What came of one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Served by the model asked for, complete.
    Served,
    /// A well-formed OpenAI error (as the answer, or as the last event of a stream).
    Error { status: u16, code: String },
    /// Another model answered, or a backend refused the name (it got another model's request).
    Misroute(String),
    /// No complete answer: the connection or the stream broke without an error event.
    Lost(String),
    /// An answer that is neither a success nor an OpenAI error.
    Malformed(String),
}

/// The `{"error":{...}}` of an OpenAI error body: message and type strings, a string code.
pub fn openai_error(body: &Value) -> Option<(String, String)> {
    let error = body.get("error")?;
    let message = error.get("message")?.as_str()?;
    error.get("type")?.as_str()?;
    let code = error.get("code")?.as_str()?;
    (!message.is_empty()).then(|| (code.to_owned(), message.to_owned()))
}

/// Judges a complete answer to a chat request for `asked`.
pub fn judge(asked: &str, stream: bool, reply: &Reply) -> Verdict {
    if let Some(error) = &reply.error {
        return Verdict::Lost(format!(
            "{error} (status {}, {} bytes read)",
            reply.status,
            reply.text.len()
        ));
    }
    if reply.status != 200 {
        let body: Option<Value> = serde_json::from_str(&reply.text).ok();
        return match body.as_ref().and_then(openai_error) {
            // The gateway knows every model asked for here: a refused name means a backend
            // got a request meant for another model.
            Some((code, _)) if code == "model_not_found" => {
                Verdict::Misroute(format!("{}: {}", reply.status, reply.text))
            }
            Some((code, _)) => Verdict::Error {
                status: reply.status,
                code,
            },
            None => Verdict::Malformed(format!("{}: {}", reply.status, reply.text)),
        };
    }
    if stream {
        judge_stream(asked, &reply.text)
    } else {
        judge_json(asked, &reply.text)
    }
}

impl Stack {
    /// POSTs a chat request to the gateway and asserts that the model asked for served it.
    pub async fn served_chat(&self, model: &str, stream: bool, max_tokens: u32) -> Reply {
        let reply = self.chat(model, stream, max_tokens).await;
        assert_eq!(
            judge(model, stream, &reply),
            Verdict::Served,
            "{reply:?}{}",
            self.logs()
        );
        reply
    }
}

impl Stack {
    /// Opens a streamed chat request and reads it until the first tokens of `model`'s own
    /// answer: the stream, and the text read so far.
    pub async fn stream_served(&self, model: &str, max_tokens: u32) -> (Opened, String) {
        let mut stream = self.open_chat(model, true, max_tokens).await;
        assert_eq!(stream.status, 200);
        let served_by = signature(model);
        let head = stream
            .read_until(|text| partial_stream_content(text).starts_with(&served_by))
            .await
            .expect("the first tokens");
        (stream, head)
    }
}

fn judge_json(asked: &str, text: &str) -> Verdict {
    let Ok(body) = serde_json::from_str::<Value>(text) else {
        return Verdict::Malformed(format!("not JSON: {text}"));
    };
    let content = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    if !content.starts_with(&signature(asked))
        || body["model"] != asked
        || body["gpuswap_mock"]["request_model"] != asked
    {
        return Verdict::Misroute(format!("asked {asked}, got {text}"));
    }
    Verdict::Served
}

fn judge_stream(asked: &str, text: &str) -> Verdict {
    let data = sse_data(text);
    let Some(last) = data.last() else {
        return Verdict::Lost(format!("an empty stream: {text:?}"));
    };
    if last != "[DONE]" {
        let body: Option<Value> = serde_json::from_str(last).ok();
        return match body.as_ref().and_then(openai_error) {
            Some((code, _)) if code == "model_not_found" => Verdict::Misroute(text.to_owned()),
            Some((code, _)) => Verdict::Error { status: 200, code },
            None => Verdict::Lost(format!(
                "the stream ended without [DONE] or an error: {text}"
            )),
        };
    }
    let mut content = String::new();
    let mut routed = false;
    for payload in &data[..data.len() - 1] {
        let Ok(chunk) = serde_json::from_str::<Value>(payload) else {
            return Verdict::Malformed(format!("a chunk is not JSON: {payload}"));
        };
        if is_progress(&chunk) {
            continue;
        }
        if chunk["model"] != asked {
            return Verdict::Misroute(format!("asked {asked}, got a chunk {payload}"));
        }
        if chunk["gpuswap_mock"].is_object() {
            if chunk["gpuswap_mock"]["request_model"] != asked {
                return Verdict::Misroute(format!("asked {asked}, got {payload}"));
            }
            routed = true;
        }
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            content.push_str(piece);
        }
    }
    if !routed || !content.starts_with(&signature(asked)) {
        return Verdict::Misroute(format!("asked {asked}, got {text}"));
    }
    Verdict::Served
}

// ----- processes -----------------------------------------------------------------------------

/// One live mock backend process of a stack.
#[derive(Clone, Debug)]
pub struct MockProcess {
    pub pid: u32,
    pub model: String,
    /// A worker (`gpuswap-mock-backend worker ...`), or a child not yet exec'd: not a server.
    pub worker: bool,
    pub starttime: u64,
}

/// Every live mock backend process tagged with `stack_marker`, by model. Cheap enough to run
/// every few milliseconds: only processes named like the mock are read further.
pub fn scan_mocks(stack_marker: &str) -> Vec<MockProcess> {
    let mut found = Vec::new();
    let prefix = format!("{stack_marker}/");
    for pid in testkit::process_ids() {
        let Some(stat) = testkit::stat(pid) else {
            continue;
        };
        if stat.comm != MOCK_COMM || matches!(stat.state, 'Z' | 'X') {
            continue;
        }
        let Some(marker) = testkit::env_var(pid, MARKER_ENV) else {
            continue;
        };
        let Some(model) = marker
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix('/'))
        else {
            continue;
        };
        let argv = testkit::cmdline(pid).unwrap_or_default();
        let is_worker_command = argv.get(1).is_some_and(|arg| arg == "worker");
        // A server's parent is its guard; a mock whose parent is a mock is a worker, or a
        // worker between fork and exec (it still shows the server's command line).
        let parent_is_mock = u32::try_from(stat.ppid)
            .ok()
            .and_then(testkit::stat)
            .is_some_and(|parent| parent.comm == MOCK_COMM);
        found.push(MockProcess {
            pid,
            model: model.to_owned(),
            worker: is_worker_command || parent_is_mock,
            starttime: stat.starttime,
        });
    }
    found
}

/// True while `pid` is the same live process (same start time).
fn still_alive(pid: u32, starttime: u64) -> bool {
    testkit::stat(pid)
        .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X') && stat.starttime == starttime)
}

/// What the sampler saw.
#[derive(Debug, Default)]
pub struct SampleReport {
    pub samples: u64,
    /// The most server processes seen at once, per model.
    pub max_leaders: BTreeMap<String, usize>,
    /// Two servers of one model, or processes (servers or workers) of two conflicting models,
    /// alive at once.
    pub violations: Vec<String>,
}

impl SampleReport {
    /// Asserts at most one server per model and never two conflicting ones at once.
    pub fn assert_clean(&self, context: &str) {
        assert!(
            self.samples > 10,
            "the sampler hardly ran ({} samples)",
            self.samples
        );
        assert!(
            self.violations.is_empty(),
            "{} violations in {} samples, first: {:?}{context}",
            self.violations.len(),
            self.samples,
            &self.violations[..self.violations.len().min(5)]
        );
        for (model, max) in &self.max_leaders {
            assert!(*max <= 1, "{max} servers of {model} at once{context}");
        }
    }
}

/// Samples the server processes of one stack every few milliseconds on its own thread.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<SampleReport>>,
}

impl Sampler {
    pub fn start(stack_marker: &str, conflicts: Vec<(String, String)>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let marker = stack_marker.to_owned();
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut report = SampleReport::default();
            while !stopped.load(Ordering::Relaxed) {
                sample(&marker, &conflicts, &mut report);
                std::thread::sleep(Duration::from_millis(3));
            }
            sample(&marker, &conflicts, &mut report);
            report
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) -> SampleReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("the sampler thread")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A test that fails for another reason (a deadlock, say) still tells what the
        // sampler saw: a double start often is the cause.
        if std::thread::panicking()
            && let Some(thread) = self.thread.take()
            && let Ok(report) = thread.join()
        {
            eprintln!("--- process sampler at the failure: {report:?}");
        }
    }
}

fn sample(marker: &str, conflicts: &[(String, String)], report: &mut SampleReport) {
    report.samples += 1;
    // Workers count for the GPU (they are what holds its memory), only servers for "one
    // server per model".
    let count = |processes: &[MockProcess]| {
        let mut servers: BTreeMap<String, usize> = BTreeMap::new();
        let mut on_gpu: BTreeSet<String> = BTreeSet::new();
        for p in processes {
            on_gpu.insert(p.model.clone());
            if !p.worker {
                *servers.entry(p.model.clone()).or_default() += 1;
            }
        }
        (servers, on_gpu)
    };
    let suspicious = |(servers, on_gpu): &(BTreeMap<String, usize>, BTreeSet<String>)| {
        servers.values().any(|n| *n > 1)
            || conflicts
                .iter()
                .any(|(a, b)| on_gpu.contains(a) && on_gpu.contains(b))
    };
    let mut confirmed = scan_mocks(marker);
    let mut counted = count(&confirmed);
    if suspicious(&counted) {
        // One scan reads the processes one after the other: confirm that all of them are
        // still alive now, together, before calling it a violation.
        confirmed.retain(|p| still_alive(p.pid, p.starttime));
        counted = count(&confirmed);
        if suspicious(&counted) {
            report.violations.push(format!("at once: {confirmed:?}"));
        }
    }
    for (model, n) in counted.0 {
        let max = report.max_leaders.entry(model).or_default();
        *max = (*max).max(n);
    }
}

/// Every record of the client tasks, task by task; panics when one of them panicked.
pub async fn records_of<T>(clients: Vec<tokio::task::JoinHandle<Vec<T>>>) -> Vec<T> {
    let mut records = Vec::new();
    for client in clients {
        records.extend(client.await.expect("a client task"));
    }
    records
}

/// Polls a process on its own thread and reports when it died (or None after `limit`).
pub fn watch_death(pid: u32, limit: Duration) -> std::thread::JoinHandle<Option<Instant>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < limit {
            if !testkit::alive(pid) {
                return Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    })
}
