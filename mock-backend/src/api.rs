//! The HTTP API: health and model probes as each real server answers them,
//! and the OpenAI endpoints.

use std::{convert::Infallible, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, Request as HttpRequest, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    cli::{Fault, Flavor},
    errors::ApiError,
    generate::{self, Answer, Endpoint},
    log, sleep,
    state::{Phase, Shared},
};

type AppState = State<Arc<Shared>>;

/// The real TabbyAPI pings every 15 s; a slow mock stream pings every second.
const TABBY_PING_EVERY: Duration = Duration::from_secs(1);

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health_generate", get(health_generate))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/v1/model", get(tabby_current_model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(text_completions))
        .route("/v1/embeddings", post(embeddings))
        .merge(crate::extra::routes())
        .merge(crate::sleep::routes(shared.flavor()))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), access_log))
        .with_state(shared)
}

/// One line per request, in the server's own access-log style.
async fn access_log(State(shared): AppState, request: HttpRequest, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let response = next.run(request).await;
    let status = response.status();
    match shared.flavor() {
        Flavor::LlamaServer => log::out(format!(
            "srv  log_server_r: request: {method} {path} 127.0.0.1 {}",
            status.as_u16()
        )),
        // uvicorn's: `INFO:     127.0.0.1:54321 - "GET /health HTTP/1.1" 200 OK`.
        _ => log::out(format!(
            "INFO:     {} - \"{method} {path} HTTP/1.1\" {} {}",
            peer.map_or_else(|| "127.0.0.1".to_owned(), |p| p.to_string()),
            status.as_u16(),
            status.canonical_reason().unwrap_or("")
        )),
    }
    response
}

/// What an endpoint needs before it answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Answers as soon as the port listens (like `/v1/models` during SGLang's warm-up).
    Listening,
    Ready,
}

fn gate(shared: &Shared, headers: &HeaderMap, need: Need) -> Result<(), ApiError> {
    let flavor = shared.flavor();
    let phase = shared.phase();
    // llama-server answers everything but /health with "Loading model" while loading.
    if flavor == Flavor::LlamaServer && phase == Phase::Loading {
        return Err(ApiError::unavailable("Loading model"));
    }
    if !authorized(shared, headers) {
        return Err(ApiError::unauthorized());
    }
    // TabbyAPI with its model unloaded answers as if none had been loaded yet.
    if need == Need::Ready && flavor == Flavor::Tabbyapi && !shared.memory.borrow().serves() {
        return Err(ApiError::unavailable("No models are currently loaded."));
    }
    if need == Need::Ready && phase != Phase::Ready {
        let message = match flavor {
            Flavor::Tabbyapi => "No models are currently loaded.",
            Flavor::LlamaServer => "Loading model",
            Flavor::Sglang | Flavor::Vllm => "The server is not ready yet (warming up)",
        };
        return Err(ApiError::unavailable(message));
    }
    Ok(())
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(key) = shared.args.api_key.as_deref() else {
        return true;
    };
    // TabbyAPI's admin key passes wherever its API key does.
    let admin = match shared.flavor() {
        Flavor::Tabbyapi => shared.args.admin_key.as_deref(),
        _ => None,
    };
    let header_text = |name| {
        headers
            .get(name)
            .and_then(|value: &HeaderValue| value.to_str().ok())
    };
    let bearer = header_text(header::AUTHORIZATION.as_str())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    let x_api_key = match shared.flavor() {
        Flavor::Tabbyapi => header_text("x-api-key").map(str::trim),
        _ => None,
    };
    [Some(key), admin]
        .into_iter()
        .flatten()
        .any(|key| bearer == Some(key) || x_api_key == Some(key))
}

async fn health(State(shared): AppState) -> Response {
    let ready = shared.phase() == Phase::Ready;
    if ready && shared.args.has_fault(Fault::ExitAfterReady) {
        exit_soon();
    }
    match shared.flavor() {
        Flavor::LlamaServer if ready => Json(json!({"status": "ok"})).into_response(),
        Flavor::LlamaServer => ApiError::unavailable("Loading model").render(Flavor::LlamaServer),
        // TabbyAPI's /health is about the service, not whether a model is loaded.
        Flavor::Tabbyapi => Json(json!({"status": "healthy", "issues": []})).into_response(),
        Flavor::Sglang | Flavor::Vllm if ready => StatusCode::OK.into_response(),
        Flavor::Sglang | Flavor::Vllm => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

/// The `exit-after-ready` fault: the first healthy answer goes out, then the server dies
/// (like a server that crashes right after passing its health check).
fn exit_soon() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(1));
        log::err("Fatal: exiting right after the first healthy /health (fault exit-after-ready)");
        std::process::exit(1);
    });
}

/// SGLang's `/health_generate`: a one-token generation.
async fn health_generate(State(shared): AppState) -> Response {
    if shared.flavor() != Flavor::Sglang {
        return not_found(State(shared)).await;
    }
    if shared.phase() != Phase::Ready {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    tokio::time::sleep(shared.args.token_interval()).await;
    StatusCode::OK.into_response()
}

fn model_card(shared: &Shared) -> Value {
    let owned_by = match shared.flavor() {
        Flavor::Sglang => "sglang",
        Flavor::Tabbyapi => "tabbyAPI",
        Flavor::Vllm => "vllm",
        Flavor::LlamaServer => "llamacpp",
    };
    json!({
        "id": shared.model(),
        "object": "model",
        "created": generate::unix_now(),
        "owned_by": owned_by,
        "root": shared.model(),
        "max_model_len": 8192,
    })
}

async fn list_models(State(shared): AppState, headers: HeaderMap) -> Response {
    if let Err(error) = gate(&shared, &headers, Need::Listening) {
        return error.render(shared.flavor());
    }
    Json(json!({"object": "list", "data": [model_card(&shared)]})).into_response()
}

async fn get_model(
    State(shared): AppState,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(error) = gate(&shared, &headers, Need::Listening) {
        return error.render(shared.flavor());
    }
    if id == shared.model() {
        Json(model_card(&shared)).into_response()
    } else {
        ApiError::model_not_found(&id).render(shared.flavor())
    }
}

/// TabbyAPI's readiness probe: the loaded model, 503 while none is.
async fn tabby_current_model(State(shared): AppState, headers: HeaderMap) -> Response {
    if shared.flavor() != Flavor::Tabbyapi {
        return not_found(State(shared)).await;
    }
    if let Err(error) = gate(&shared, &headers, Need::Ready) {
        return error.render(shared.flavor());
    }
    let mut card = model_card(&shared);
    card["parameters"] =
        json!({"max_seq_len": 8192, "cache_mode": "Q4", "prompt_template": "chatml"});
    Json(card).into_response()
}

async fn not_found(State(shared): AppState) -> Response {
    match shared.flavor() {
        Flavor::LlamaServer => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})),
        )
            .into_response(),
        _ => (StatusCode::NOT_FOUND, Json(json!({"detail": "Not Found"}))).into_response(),
    }
}

/// Common checks of the model endpoints; the parsed body on success.
fn admit(shared: &Shared, headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    gate(shared, headers, Need::Ready)?;
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    // TabbyAPI ignores `model`; the others reject a name they do not serve.
    if shared.flavor() != Flavor::Tabbyapi
        && let Some(requested) = value.get("model").and_then(Value::as_str)
        && requested != shared.model()
    {
        return Err(ApiError::model_not_found(requested));
    }
    Ok(value)
}

async fn chat_completions(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    complete(shared, headers, body, Endpoint::Chat).await
}

async fn text_completions(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    complete(shared, headers, body, Endpoint::Text).await
}

async fn complete(
    shared: Arc<Shared>,
    headers: HeaderMap,
    body: Bytes,
    endpoint: Endpoint,
) -> Response {
    let read = shared.completion_read();
    if shared.args.hang_up_at() == Some(read) {
        log::err(format!(
            "hang-up fault: completion request {read} read, closing its connection unanswered"
        ));
        // A handler has no hold of its connection: a panic ends the
        // connection's task, which drops (closes) the socket, and only it.
        panic!("hang-up fault");
    }
    let value = match admit(&shared, &headers, &body) {
        Ok(value) => value,
        Err(error) => return error.render(shared.flavor()),
    };
    let request = match generate::Request::parse(endpoint, &value) {
        Ok(request) => request,
        Err(error) => return error.render(shared.flavor()),
    };
    if let Err(error) = sleep::before_request(&shared).await {
        return error.render(shared.flavor());
    }
    let in_flight = sleep::InFlight::start(&shared);
    let mut answer = Answer::new(&shared, request);
    answer.echo_traceparent(
        headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok()),
    );
    if answer.request.stream {
        return stream(shared, answer, in_flight);
    }
    let interval = shared.args.token_interval();
    let tokens = answer.request.max_tokens;
    if let Some(crash_at) = shared.args.crash_after()
        && crash_at < tokens
    {
        tokio::time::sleep(interval * crash_at as u32).await;
        crash(crash_at);
    }
    let mut abort = shared.abort.subscribe();
    let started = tokio::time::Instant::now();
    tokio::select! {
        () = tokio::time::sleep(interval.saturating_mul(tokens.min(u64::from(u32::MAX)) as u32)) => {}
        Ok(()) = abort.changed() => {
            // What was generated by then, as vLLM answers an aborted request: 200, cut short.
            let done = started.elapsed().as_nanos() / interval.as_nanos().max(1);
            answer.request.max_tokens = (done as u64).clamp(1, tokens);
            answer.aborted = true;
        }
    }
    Json(answer.full_response()).into_response()
}

/// Where an SSE answer's producer sends the bytes it writes.
pub type EventSender = mpsc::Sender<Result<Bytes, Infallible>>;

/// A 200 SSE answer (with `cache_control`) whose bytes `produce` sends, in a task of its own,
/// as it goes.
pub fn event_stream<F>(
    cache_control: &'static str,
    produce: impl FnOnce(EventSender) -> F,
) -> Response
where
    F: Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel::<Result<Bytes, Infallible>>(4);
    tokio::spawn(produce(sender));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, cache_control)
        .body(Body::from_stream(ReceiverStream::new(receiver)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Streams the answer as SSE, written byte for byte: TabbyAPI's CRLF line
/// endings and `: ping` comment included.
fn stream(shared: Arc<Shared>, answer: Answer, in_flight: sleep::InFlight) -> Response {
    event_stream("no-cache", |sender| async move {
        produce_stream(shared, answer, sender).await;
        drop(in_flight);
    })
}

async fn produce_stream(shared: Arc<Shared>, mut answer: Answer, sender: EventSender) {
    let tabby = shared.flavor() == Flavor::Tabbyapi;
    let eol = if tabby { "\r\n" } else { "\n" };
    let send = |text: String| {
        let sender = sender.clone();
        async move { sender.send(Ok(Bytes::from(text))).await.is_ok() }
    };
    let event = |data: &Value| format!("data: {data}{eol}{eol}");
    // TabbyAPI sends keep-alive comments; one up front lets tests see them pass through.
    if tabby && !send(format!(": ping{eol}{eol}")).await {
        return;
    }
    if let Some(opening) = answer.opening_chunk()
        && !send(event(&opening)).await
    {
        return;
    }
    let interval = shared.args.token_interval();
    let crash_at = shared.args.crash_after();
    let abort = shared.abort.subscribe();
    for index in 0..answer.request.max_tokens {
        if abort.has_changed().unwrap_or(false) {
            // A vLLM sleep (mode=abort) cut it: the finish chunk says so, then [DONE].
            answer.request.max_tokens = index;
            answer.aborted = true;
            break;
        }
        if crash_at == Some(index) {
            // Let the tokens already queued reach the socket, then die like a segfault.
            let drained = async {
                while sender.capacity() < sender.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            crash(index);
        }
        if tabby {
            // A slow TabbyAPI stream keeps the connection alive with comments.
            let mut left = interval;
            while left > TABBY_PING_EVERY {
                tokio::time::sleep(TABBY_PING_EVERY).await;
                left -= TABBY_PING_EVERY;
                if !send(format!(": ping{eol}{eol}")).await {
                    return;
                }
            }
            tokio::time::sleep(left).await;
        } else if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        if !send(event(&answer.token_chunk(index))).await {
            return; // the client went away
        }
    }
    let mut tail = event(&answer.finish_chunk());
    if let Some(usage) = answer.usage_chunk() {
        tail.push_str(&event(&usage));
    }
    tail.push_str(&format!("data: [DONE]{eol}{eol}"));
    send(tail).await;
}

/// The `crash-after:N` fault: die mid-answer, without any cleanup.
fn crash(tokens_sent: u64) -> ! {
    log::err(format!(
        "Fatal Python error: Segmentation fault (crash-after fault after {tokens_sent} tokens)"
    ));
    std::process::exit(139);
}

async fn embeddings(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    let value = match admit(&shared, &headers, &body) {
        Ok(value) => value,
        Err(error) => return error.render(shared.flavor()),
    };
    if let Err(error) = sleep::before_request(&shared).await {
        return error.render(shared.flavor());
    }
    let inputs: Vec<String> = match value.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map_or_else(|| item.to_string(), str::to_owned)
            })
            .collect(),
        _ => return ApiError::bad_request("input: field required").render(shared.flavor()),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": generate::embedding(text)}))
        .collect();
    let prompt_tokens: u64 = inputs
        .iter()
        .map(|text| generate::count_words(&json!(text)))
        .sum();
    Json(json!({
        "object": "list",
        "data": data,
        "model": shared.model(),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "gpuswap_mock": {"pid": shared.pid, "port": shared.port(), "request_model": value.get("model")},
    }))
    .into_response()
}
