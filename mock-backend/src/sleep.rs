//! Sleep and wake, the way each real server does it (docs/backends.md, "Sleep and wake"):
//! - vLLM (routes only with VLLM_SERVER_DEV_MODE=1): `POST /sleep?level=1|2`,
//!   `POST /wake_up[?tags=weights|kv_cache]`, `GET /is_sleeping`, `POST /collective_rpc`
//!   (`reload_weights`). A completion sent while it sleeps waits until it is woken.
//! - SGLang: `POST /release_memory_occupation` (400 while requests run),
//!   `POST /resume_memory_occupation`, `POST /update_weights_from_disk`.
//! - TabbyAPI: `POST /v1/model/unload`, `POST /v1/model/load` (an SSE stream of module events),
//!   both with the admin key; while no model is loaded, `/v1/model` and completions are 503.
//! - llama-server `--sleep-idle-seconds N`: drops the weights after N idle seconds; `/health`
//!   stays 200, `/props` says `is_sleeping`, and the next request reloads them first.
//!
//! Every flavor reports its "GPU memory" at `GET /gpuswap_mock/memory` (and in
//! `--gpu-memory-file`): what a sleep released is no longer counted.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};

use crate::{
    api,
    cli::{Fault, Flavor},
    errors::ApiError,
    log,
    state::{Phase, Shared},
};

type AppState = State<Arc<Shared>>;

/// What a sleep released of the model's GPU memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    pub weights_released: bool,
    pub kv_released: bool,
    /// The weights' content is gone (discarded, or released without a backup) until they are
    /// reloaded from disk.
    pub weights_lost: bool,
    /// The sleep freed nothing (vLLM without --enable-sleep-mode, SGLang without
    /// --enable-memory-saver, the `sleep-keeps-memory` fault).
    pub held_anyway: bool,
}

impl Memory {
    pub fn asleep(&self) -> bool {
        self.weights_released || self.kv_released
    }

    /// Awake with its weights: a request can be answered.
    pub fn serves(&self) -> bool {
        !self.asleep() && !self.weights_lost
    }

    fn all_released(weights_lost: bool, frees: bool) -> Self {
        Self {
            weights_released: true,
            kv_released: true,
            weights_lost: weights_lost && frees,
            held_anyway: !frees,
        }
    }
}

pub fn routes(flavor: Flavor) -> Router<Arc<Shared>> {
    let routes = Router::new().route("/gpuswap_mock/memory", get(memory_report));
    match flavor {
        Flavor::Vllm if std::env::var("VLLM_SERVER_DEV_MODE").as_deref() == Ok("1") => routes
            .route("/sleep", post(vllm_sleep))
            .route("/wake_up", post(vllm_wake_up))
            .route("/is_sleeping", get(vllm_is_sleeping))
            .route("/collective_rpc", post(vllm_collective_rpc)),
        Flavor::Sglang => routes
            .route("/release_memory_occupation", post(sglang_release))
            .route("/resume_memory_occupation", post(sglang_resume))
            .route("/update_weights_from_disk", post(sglang_update_weights)),
        Flavor::Tabbyapi => routes
            .route("/v1/model/unload", post(tabby_unload))
            .route("/v1/model/load", post(tabby_load)),
        _ => routes,
    }
}

fn gpu_bytes(shared: &Shared, memory: Memory) -> u64 {
    let full = shared.args.gpu_memory;
    if shared.phase() == Phase::Loading {
        return 0;
    }
    if memory.held_anyway {
        return full;
    }
    let weights = full / 2;
    let mut held = 0;
    if !memory.weights_released {
        held += weights;
    }
    if !memory.kv_released {
        held += full - weights;
    }
    held
}

fn memory_json(shared: &Shared) -> Value {
    let memory = *shared.memory.borrow();
    let kept_in_ram = memory.weights_released && !memory.weights_lost && !memory.held_anyway;
    json!({
        "pid": shared.pid,
        "gpu_memory_bytes": gpu_bytes(shared, memory),
        "host_memory_bytes": if kept_in_ram { shared.args.gpu_memory / 2 } else { 0 },
        "asleep": memory.asleep(),
        "weights_lost": memory.weights_lost,
        "requests_while_asleep": shared.requests_while_asleep.load(Ordering::SeqCst),
        "sleeps_while_busy": shared.sleeps_while_busy.load(Ordering::SeqCst),
        "requests_in_flight": shared.in_flight.load(Ordering::SeqCst),
    })
}

async fn memory_report(State(shared): AppState) -> Json<Value> {
    Json(memory_json(&shared))
}

/// Changes the memory state and republishes it (`--gpu-memory-file`).
fn update(shared: &Shared, change: impl FnOnce(&mut Memory)) {
    shared.memory.send_modify(change);
    publish(shared);
}

/// Writes `--gpu-memory-file` (a new file renamed over the old one: a reader never sees half).
pub fn publish(shared: &Shared) {
    let Some(path) = &shared.args.gpu_memory_file else {
        return;
    };
    let partial = path.with_extension("partial");
    let written = std::fs::write(&partial, memory_json(shared).to_string())
        .and_then(|()| std::fs::rename(&partial, path));
    if let Err(e) = written {
        log::err(format!("cannot write {}: {e}", path.display()));
    }
}

/// A completion request being answered: counted in `in_flight` until dropped.
pub struct InFlight(Arc<Shared>);

impl InFlight {
    pub fn start(shared: &Arc<Shared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        touch(shared);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        touch(&self.0);
    }
}

/// Marks now as the last activity (llama-server's idle time counts from it).
pub fn touch(shared: &Shared) {
    let now = u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX);
    shared.last_activity_ms.store(now, Ordering::SeqCst);
}

/// What a completion request meets while the model sleeps; Ok: answer it now.
pub async fn before_request(shared: &Arc<Shared>) -> Result<(), ApiError> {
    if shared.phase() != Phase::Ready || shared.memory.borrow().serves() {
        return Ok(());
    }
    // llama-server's own sleep is meant to be woken by a request.
    if shared.flavor() != Flavor::LlamaServer {
        shared.requests_while_asleep.fetch_add(1, Ordering::SeqCst);
        publish(shared);
        log::err("WARNING: (mock) a completion request arrived while the model sleeps");
    }
    match shared.flavor() {
        // vLLM takes it and holds it until woken (seen with vLLM 0.32: a chat sent while
        // sleeping hangs until /wake_up).
        Flavor::Vllm => {
            let mut memory = shared.memory.subscribe();
            let _ = memory.wait_for(|m| !m.asleep()).await;
            if shared.memory.borrow().weights_lost {
                // The real one would compute with empty weights; the mock says so instead.
                return Err(internal_error(
                    "(mock) the weights were discarded by a level 2 sleep and not reloaded \
                     (POST /collective_rpc {\"method\":\"reload_weights\"})",
                ));
            }
            Ok(())
        }
        Flavor::LlamaServer => wake_llama_server(shared).await,
        // SGLang does not guard it (its scheduler would run on released memory); the mock
        // refuses rather than pretend.
        Flavor::Sglang => Err(internal_error(
            "(mock) a request while the GPU memory is released: SGLang does not guard this",
        )),
        Flavor::Tabbyapi => Err(ApiError::unavailable("No models are currently loaded.")),
    }
}

/// Waits until no completion request runs (the mock lets them finish before a sleep), and
/// counts a sleep that had to wait.
async fn wait_idle(shared: &Shared) {
    let running = shared.in_flight.load(Ordering::SeqCst);
    if running > 0 {
        shared.sleeps_while_busy.fetch_add(1, Ordering::SeqCst);
        publish(shared);
        log::err(format!(
            "WARNING: (mock) asked to sleep while {running} requests run; letting them finish"
        ));
    }
    while shared.in_flight.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the weights again (`--load-time`, and `--load-file` when given).
async fn reload_from_disk(shared: &Shared) {
    if let Some(path) = shared.args.load_file.clone() {
        let _ = tokio::task::spawn_blocking(move || crate::lifecycle::read_whole(&path)).await;
    }
    tokio::time::sleep(shared.args.load_time).await;
}

fn query_values(query: Option<&str>, name: &str) -> Vec<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
        .collect()
}

/// With `fault` injected: logs that `what` failed and gives the message to answer.
fn injected(shared: &Shared, fault: Fault, what: &str) -> Option<String> {
    shared.args.has_fault(fault).then(|| {
        log::err(format!("ERROR: {what} failed (fault {fault:?})"));
        format!("(mock) {what} failed")
    })
}

fn internal_error(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalServerError",
        message,
    )
}

/// Wakes the parts asked for; what it freed nothing for is then no longer held either.
fn mark_awake(shared: &Shared, weights: bool, kv_cache: bool) {
    update(shared, |m| {
        m.weights_released &= !weights;
        m.kv_released &= !kv_cache;
        if !m.asleep() {
            m.held_anyway = false;
        }
    });
}

fn vllm_line(shared: &Shared, process: &str, text: &str) {
    log::out(format!(
        "({process} pid={}) INFO {} {text}",
        shared.pid,
        &log::timestamp()[5..]
    ));
}

async fn vllm_sleep(State(shared): AppState, RawQuery(query): RawQuery) -> Response {
    let level = match query_values(query.as_deref(), "level")
        .first()
        .map(String::as_str)
    {
        None | Some("1") => 1,
        Some("2") => 2,
        Some(other) => {
            return ApiError::bad_request(format!("(mock) sleep level {other}: 1 or 2"))
                .render(Flavor::Vllm);
        }
    };
    let _transition = shared.transition.lock().await;
    if let Some(message) = injected(&shared, Fault::SleepFails, "sleep") {
        return internal_error(message).render(Flavor::Vllm);
    }
    // The default mode=abort cuts what runs short (finish_reason "abort"); wait (and keep,
    // which the mock does not tell apart) lets it finish first.
    let mode = query_values(query.as_deref(), "mode");
    if mode.first().is_none_or(|m| m == "abort") && shared.in_flight.load(Ordering::SeqCst) > 0 {
        shared.abort.send_replace(());
    }
    wait_idle(&shared).await;
    tokio::time::sleep(shared.args.sleep_time()).await;
    let frees = shared.args.enable_sleep_mode && !shared.args.has_fault(Fault::SleepKeepsMemory);
    update(&shared, |m| *m = Memory::all_released(level == 2, frees));
    let freed = if frees { shared.args.gpu_memory } else { 0 };
    vllm_line(
        &shared,
        "Worker",
        &format!(
            "[gpu_worker.py:127] Sleep mode freed {:.2} GiB memory, {:.2} GiB memory is still in use.",
            freed as f64 / f64::from(1 << 30),
            (shared.args.gpu_memory - freed) as f64 / f64::from(1 << 30),
        ),
    );
    // vLLM 0.32's answer (the router's code before it answered an empty 200).
    Json(json!({"status": "sleeping", "level": level})).into_response()
}

async fn vllm_wake_up(State(shared): AppState, RawQuery(query): RawQuery) -> Response {
    let tags = query_values(query.as_deref(), "tags");
    vllm_line(
        &shared,
        "APIServer",
        &format!(
            "[api_router.py:42] wake up the engine with tags: {}",
            if tags.is_empty() {
                "None".to_owned()
            } else {
                format!("{tags:?}")
            }
        ),
    );
    let _transition = shared.transition.lock().await;
    if let Some(message) = injected(&shared, Fault::WakeFails, "wake_up") {
        return internal_error(message).render(Flavor::Vllm);
    }
    let weights = tags.is_empty() || tags.iter().any(|t| t == "weights");
    let kv_cache = tags.is_empty() || tags.iter().any(|t| t == "kv_cache");
    if weights && shared.memory.borrow().weights_released {
        tokio::time::sleep(shared.args.wake_time()).await;
    }
    mark_awake(&shared, weights, kv_cache);
    // vLLM 0.32: the state after the wake, and the tags asked for (null: all).
    let status = if shared.memory.borrow().asleep() {
        "sleeping"
    } else {
        "awake"
    };
    let tags = if tags.is_empty() {
        Value::Null
    } else {
        json!(tags)
    };
    Json(json!({"status": status, "tags": tags})).into_response()
}

async fn vllm_is_sleeping(State(shared): AppState) -> Json<Value> {
    Json(json!({"is_sleeping": shared.memory.borrow().asleep()}))
}

async fn vllm_collective_rpc(State(shared): AppState, body: Bytes) -> Response {
    // vLLM 0.32 answers these in its error shape, type "Bad Request".
    let bad = |text: String| {
        ApiError::new(StatusCode::BAD_REQUEST, "Bad Request", text).render(Flavor::Vllm)
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(value) => value,
        Err(e) => return bad(format!("JSON decode error: {e}")),
    };
    let Some(method) = value.get("method").and_then(Value::as_str) else {
        return bad("Missing 'method' in request body".into());
    };
    if method != "reload_weights" {
        return internal_error(format!(
            "(mock) collective_rpc {method:?}: only reload_weights is implemented"
        ))
        .render(Flavor::Vllm);
    }
    let _transition = shared.transition.lock().await;
    if shared.memory.borrow().weights_released {
        return internal_error(
            "(mock) the weights' memory sleeps: POST /wake_up?tags=weights first",
        )
        .render(Flavor::Vllm);
    }
    let started = std::time::Instant::now();
    reload_from_disk(&shared).await;
    update(&shared, |m| m.weights_lost = false);
    vllm_line(
        &shared,
        "Worker",
        &format!(
            "[default_loader.py:501] Loading weights took {:.2} seconds",
            started.elapsed().as_secs_f64()
        ),
    );
    Json(json!({"results": [null]})).into_response()
}

fn sglang_answer(status: StatusCode, success: bool, message: &str) -> Response {
    (
        status,
        Json(json!({"success": success, "message": message})),
    )
        .into_response()
}

/// The `tags` of a release or resume body (`{}` or none: weights and KV cache).
fn sglang_tags(body: &Bytes) -> (bool, bool) {
    let tags: Vec<String> = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("tags").cloned())
        .and_then(|t| serde_json::from_value(t).ok())
        .unwrap_or_default();
    if tags.is_empty() {
        return (true, true);
    }
    (
        tags.iter().any(|t| t == "weights"),
        tags.iter().any(|t| t == "kv_cache"),
    )
}

async fn sglang_release(State(shared): AppState, body: Bytes) -> Response {
    let _transition = shared.transition.lock().await;
    // Its scheduler asserts that it is idle.
    if shared.in_flight.load(Ordering::SeqCst) > 0 {
        shared.sleeps_while_busy.fetch_add(1, Ordering::SeqCst);
        publish(&shared);
        return sglang_answer(
            StatusCode::BAD_REQUEST,
            false,
            "release_memory_occupation should be called only when server is idle.",
        );
    }
    if let Some(message) = injected(&shared, Fault::SleepFails, "release_memory_occupation") {
        return sglang_answer(StatusCode::INTERNAL_SERVER_ERROR, false, &message);
    }
    let (weights, kv_cache) = sglang_tags(&body);
    tokio::time::sleep(shared.args.sleep_time()).await;
    let frees = shared.args.enable_memory_saver && !shared.args.has_fault(Fault::SleepKeepsMemory);
    let backup = shared.args.enable_weights_cpu_backup;
    update(&shared, |m| {
        m.weights_released |= weights;
        m.kv_released |= kv_cache;
        m.weights_lost |= weights && frees && !backup;
        m.held_anyway = !frees;
    });
    log::out(format!(
        "[{}] Release memory occupation: weights={weights}, kv_cache={kv_cache}",
        log::timestamp()
    ));
    sglang_answer(StatusCode::OK, true, "Success")
}

async fn sglang_resume(State(shared): AppState, body: Bytes) -> Response {
    let _transition = shared.transition.lock().await;
    if let Some(message) = injected(&shared, Fault::WakeFails, "resume_memory_occupation") {
        return sglang_answer(StatusCode::INTERNAL_SERVER_ERROR, false, &message);
    }
    let (weights, kv_cache) = sglang_tags(&body);
    if weights && shared.memory.borrow().weights_released {
        tokio::time::sleep(shared.args.wake_time()).await;
    }
    mark_awake(&shared, weights, kv_cache);
    sglang_answer(StatusCode::OK, true, "Success")
}

async fn sglang_update_weights(State(shared): AppState, body: Bytes) -> Response {
    let path = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("model_path")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let Some(path) = path else {
        return sglang_answer(StatusCode::BAD_REQUEST, false, "model_path: field required");
    };
    let _transition = shared.transition.lock().await;
    if shared.memory.borrow().weights_released {
        return sglang_answer(
            StatusCode::BAD_REQUEST,
            false,
            "(mock) the weights' memory is released: resume it first",
        );
    }
    reload_from_disk(&shared).await;
    update(&shared, |m| m.weights_lost = false);
    log::out(format!(
        "[{}] Update weights end. model_path={path}",
        log::timestamp()
    ));
    (
        StatusCode::OK,
        Json(json!({"success": true, "message": "Succeeded to update model weights.", "num_paused_requests": 0})),
    )
        .into_response()
}

/// TabbyAPI's admin check: `x-admin-key: K` or `Authorization: Bearer K`.
fn tabby_admin(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = shared
        .args
        .admin_key
        .as_ref()
        .or(shared.args.api_key.as_ref())
    else {
        return Ok(());
    };
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let given = text("x-admin-key")
        .or_else(|| text(header::AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer ")));
    match given {
        Some(given) if given.trim() == key => Ok(()),
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Invalid admin key",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "Please provide an admin key",
        )),
    }
}

async fn tabby_unload(State(shared): AppState, headers: HeaderMap) -> Response {
    if let Err(refused) = tabby_admin(&shared, &headers) {
        return refused.render(Flavor::Tabbyapi);
    }
    let _transition = shared.transition.lock().await;
    if shared.phase() != Phase::Ready || !shared.memory.borrow().serves() {
        return ApiError::unavailable("No models are currently loaded.").render(Flavor::Tabbyapi);
    }
    if let Some(message) = injected(&shared, Fault::SleepFails, "unload") {
        return internal_error(message).render(Flavor::Tabbyapi);
    }
    // Unloading cuts what runs; the mock lets it finish.
    wait_idle(&shared).await;
    tokio::time::sleep(shared.args.sleep_time()).await;
    let frees = !shared.args.has_fault(Fault::SleepKeepsMemory);
    update(&shared, |m| *m = Memory::all_released(true, frees));
    log::out("INFO:     Model unloaded.");
    Json(Value::Null).into_response()
}

async fn tabby_load(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(refused) = tabby_admin(&shared, &headers) {
        return refused.render(Flavor::Tabbyapi);
    }
    let name = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("name").and_then(Value::as_str).map(str::to_owned));
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return ApiError::bad_request("A model name was not provided for load.")
            .render(Flavor::Tabbyapi);
    };
    if name != shared.model() {
        return ApiError::bad_request(
            "Could not find the model path for load. Check model name or config.yml?",
        )
        .render(Flavor::Tabbyapi);
    }
    api::event_stream("no-store", |sender| stream_load(shared, name, sender))
}

/// TabbyAPI's load stream: an event per module loaded, `finished` at the last; a failure is
/// an error event in the stream (the answer is 200 already).
async fn stream_load(shared: Arc<Shared>, name: String, sender: api::EventSender) {
    let send = |data: Value| {
        let sender = sender.clone();
        async move {
            sender
                .send(Ok(Bytes::from(format!("data: {data}\r\n\r\n"))))
                .await
                .is_ok()
        }
    };
    let event = |module: u32, modules: u32, status: &str| json!({"model_type": "model", "module": module, "modules": modules, "status": status});
    let _transition = shared.transition.lock().await;
    let modules = shared.args.shards.max(1);
    if shared.memory.borrow().serves() {
        send(event(modules, modules, "finished")).await;
        return;
    }
    log::out(format!("INFO:     Loading model: /models/{name}"));
    if let Some(path) = shared.args.load_file.clone() {
        let _ = tokio::task::spawn_blocking(move || crate::lifecycle::read_whole(&path)).await;
    }
    let step = shared.args.load_time / modules;
    for module in 1..=modules {
        tokio::time::sleep(step).await;
        if shared.args.has_fault(Fault::WakeFails) {
            log::err("ERROR:    Model load failed (fault WakeFails)");
            send(json!({"error": {"message": "(mock) model load failed", "trace": null}})).await;
            return;
        }
        if module == modules {
            // Loaded before it says so: a client that read `finished` finds /v1/model 200.
            update(&shared, |m| *m = Memory::default());
            log::out("INFO:     Model successfully loaded.");
        }
        if !send(event(module, modules, "processing")).await {
            return;
        }
    }
    send(event(modules, modules, "finished")).await;
}

/// llama-server's `--sleep-idle-seconds`: after that long without a request, the weights go.
pub fn watch_idle(shared: Arc<Shared>) {
    let Ok(seconds) = u64::try_from(shared.args.sleep_idle_seconds) else {
        return;
    };
    let idle = Duration::from_secs(seconds);
    touch(&shared);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::SeqCst));
            let quiet = shared.started.elapsed().saturating_sub(last) >= idle;
            if !quiet
                || shared.in_flight.load(Ordering::SeqCst) > 0
                || !shared.memory.borrow().serves()
            {
                continue;
            }
            let _transition = shared.transition.lock().await;
            log::out("srv  handle_sleeping_state: server is idle, entering sleeping state");
            tokio::time::sleep(shared.args.sleep_time()).await;
            let frees = !shared.args.has_fault(Fault::SleepKeepsMemory);
            update(&shared, |m| *m = Memory::all_released(true, frees));
        }
    });
}

/// A request to a sleeping llama-server reloads the model first.
async fn wake_llama_server(shared: &Arc<Shared>) -> Result<(), ApiError> {
    let _transition = shared.transition.lock().await;
    if shared.memory.borrow().serves() {
        return Ok(());
    }
    log::out("srv  handle_sleeping_state: leaving sleeping state, loading the model");
    if shared.args.has_fault(Fault::WakeFails) {
        log::err("srv  load_model: failed to load the model (fault WakeFails)");
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "(mock) failed to reload the model",
        ));
    }
    reload_from_disk(shared).await;
    update(shared, |m| *m = Memory::default());
    touch(shared);
    log::out("srv  load_model: model loaded");
    Ok(())
}
