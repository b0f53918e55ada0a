//! The operator's API over the real stack: `/api/status`, `/api/events`, logs, load and
//! unload, who may use them, and llama-server's router API with the request shapes of
//! llama.cpp's own router tests (tools/server/tests/unit/test_router.py).

use std::pin::Pin;

use crate::common::{Model, Stack};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{Value, json};
use testkit::DEADLINE;

/// Reads an SSE response event by event.
struct Events {
    stream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: String,
}

impl Events {
    async fn open(stack: &Stack, path: &str, key: Option<&str>) -> Events {
        let mut request = stack.http.get(stack.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("GET events");
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{path}"
        );
        Events {
            stream: Box::pin(response.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event: its name (`message` when unnamed) and its data.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut name = "message".to_owned();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_owned();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if !data.is_empty() {
                    return (name, testkit::json(&data));
                }
                continue;
            }
            let chunk = tokio::time::timeout(DEADLINE, self.stream.next())
                .await
                .expect("an event within the deadline")
                .expect("the stream goes on")
                .expect("a chunk");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Reads events until `found` picks one; returns the events read, that one last.
    async fn until(
        &mut self,
        what: &str,
        found: impl Fn(&str, &Value) -> bool,
    ) -> Vec<(String, Value)> {
        let mut seen = Vec::new();
        let read = async {
            loop {
                let (name, data) = self.next().await;
                let hit = found(&name, &data);
                seen.push((name, data));
                if hit {
                    return;
                }
            }
        };
        if tokio::time::timeout(DEADLINE, read).await.is_err() {
            panic!("no event {what} within the deadline; saw {seen:?}");
        }
        seen
    }
}

async fn send(
    stack: &Stack,
    method: reqwest::Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = stack.http.request(method, stack.url(path));
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect(path);
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(stack: &Stack, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    send(stack, reqwest::Method::POST, path, key, body).await
}

/// A llama.cpp router call (`/models/load`, `/models/unload`) naming `model` in its body.
async fn model_call(stack: &Stack, path: &str, key: Option<&str>, model: &str) -> (u16, Value) {
    post(stack, path, key, Some(json!({ "model": model }))).await
}

async fn get(stack: &Stack, path: &str, key: Option<&str>) -> (u16, Value) {
    send(stack, reqwest::Method::GET, path, key, None).await
}

/// The status once it shows model `id` in `state`: the gateway learns states from the
/// supervisor's Watch, a moment after an action's answer.
async fn status_showing(stack: &Stack, key: Option<&str>, id: &str, state: &str) -> Value {
    testkit::wait_for(
        &format!("{id} {state} in /api/status"),
        DEADLINE,
        || async {
            let (_, status) = get(stack, "/api/status", key).await;
            (model(&status, id)["state"] == state).then_some(status)
        },
    )
    .await
}

/// Waits until the status shows model `id` in `state`, and asserts that it is still the
/// process `pid` (put to sleep or woken in place, not started again).
async fn assert_shown_in_process(
    stack: &Stack,
    key: Option<&str>,
    id: &str,
    state: &str,
    pid: &Value,
) {
    let status = status_showing(stack, key, id, state).await;
    let entry = model(&status, id);
    assert_eq!(
        (&entry["state"], &entry["pid"]),
        (&json!(state), pid),
        "{status}"
    );
}

fn model<'a>(status: &'a Value, id: &str) -> &'a Value {
    testkit::model_entry(status, "models", id).unwrap_or_else(|| panic!("no {id} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_shows_progress_then_ready_and_unload_stops_with_logs_followed() {
    let stack = Stack::builder("operator-api")
        .model(Model::new("alpha").alias("a").load_time("300ms"))
        .model(Model::new("beta"))
        .start()
        .await;
    let mut events = Events::open(&stack, "/api/events", None).await;
    let (name, snapshot) = events.next().await;
    assert_eq!(name, "snapshot");
    assert_eq!(
        snapshot["admin"], true,
        "loopback with no admin key is admin"
    );
    assert_eq!(model(&snapshot, "alpha")["state"], "stopped");
    assert_eq!(model(&snapshot, "alpha")["aliases"], json!(["a"]));
    assert_eq!(model(&snapshot, "beta")["state"], "stopped");

    let (s, body) = post(&stack, "/api/models/a/load", None, None).await;
    assert_eq!(s, 202, "{body}");
    assert_eq!(body["model"], "alpha");
    let seen = events
        .until("alpha ready", |name, data| {
            name == "model" && data["id"] == "alpha" && data["state"] == "ready"
        })
        .await;
    let starting = seen
        .iter()
        .position(|(n, d)| n == "model" && d["id"] == "alpha" && d["state"] == "starting");
    let progress = seen
        .iter()
        .position(|(n, d)| n == "progress" && d["model"] == "alpha");
    assert!(
        starting.is_some(),
        "no starting state before ready: {seen:?}"
    );
    assert!(
        progress.is_some(),
        "no progress step before ready: {seen:?}"
    );

    // The swap is recorded by another reader of the events than this stream: wait for it.
    let status = testkit::wait_for("alpha's swap in /api/status", DEADLINE, || async {
        let (s, status) = get(&stack, "/api/status", None).await;
        assert_eq!(s, 200);
        (!status["swaps"].as_array()?.is_empty()).then_some(status)
    })
    .await;
    let alpha = model(&status, "alpha");
    assert_eq!(alpha["state"], "ready");
    assert!(alpha["pid"].as_u64().unwrap() > 0, "{alpha}");
    assert_eq!(alpha["status"]["value"], "loaded");
    assert_eq!(status["swaps"][0]["model"], "alpha", "{status}");
    assert_eq!(status["swaps"][0]["outcome"], "ready", "{status}");

    // The log, followed: the past lines, then a line the backend prints now.
    let mut log = Events::open(&stack, "/api/models/alpha/logs?follow=true&tail=100", None).await;
    log.until("a startup line", |_, line| {
        line["line"].as_str().unwrap().contains("startup complete")
    })
    .await;
    stack.chat_ok("alpha", 20).await;
    // The gateway's own counters: the tokens generated, and a rate over the last seconds.
    testkit::wait_for("alpha's tokens per second", DEADLINE, || async {
        let (_, status) = get(&stack, "/api/status", None).await;
        let alpha = model(&status, "alpha").clone();
        let rate = alpha["tokens_per_second"].as_f64()?;
        (alpha["generated_tokens"] == 20 && rate > 0.0).then_some(())
    })
    .await;
    log.until("the chat's access line", |_, line| {
        line["line"]
            .as_str()
            .unwrap()
            .contains("POST /v1/chat/completions")
    })
    .await;

    let (s, body) = post(&stack, "/api/models/alpha/unload", None, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["stopped"], json!(["alpha"]));
    events
        .until("alpha stopped", |name, data| {
            name == "model" && data["id"] == "alpha" && data["state"] == "stopped"
        })
        .await;

    let (s, body) = post(&stack, "/api/models/beta/load?wait=true", None, None).await;
    assert_eq!((s, &body["state"]), (200, &json!("ready")), "{body}");
    let (s, body) = post(&stack, "/api/models/gamma/load", None, None).await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_need_an_admin_key_once_one_is_configured() {
    let stack = Stack::builder("operator-admin")
        .gateway("api_keys = [\"user-key\"]")
        .gateway("admin_keys = [\"admin-key\"]")
        .gateway("keys.ops = { key = \"ops-key\", models = [\"beta\"], admin = true }")
        .model(Model::new("alpha"))
        .model(Model::new("beta"))
        .start()
        .await;
    // Reading needs a valid key; the status says whether the caller may act.
    assert_eq!(get(&stack, "/api/status", None).await.0, 401);
    let (s, status) = get(&stack, "/api/status", Some("user-key")).await;
    assert_eq!((s, &status["admin"]), (200, &json!(false)), "{status}");
    let (s, status) = get(&stack, "/api/status", Some("ops-key")).await;
    assert_eq!(s, 200);
    assert_eq!(status["admin"], true);
    assert_eq!(
        status["models"].as_array().unwrap().len(),
        1,
        "ops sees beta only: {status}"
    );

    // Loopback is not enough once an admin key exists.
    for path in ["/api/models/alpha/load", "/api/models/alpha/unload"] {
        let (s, body) = post(&stack, path, Some("user-key"), None).await;
        assert_eq!(s, 403, "{path}: {body}");
        assert_eq!(body["error"]["code"], "admin_required");
    }
    let (s, _) = get(&stack, "/api/models/alpha/logs", Some("user-key")).await;
    assert_eq!(s, 403);
    let (s, _) = model_call(&stack, "/models/load", Some("user-key"), "alpha").await;
    assert_eq!(s, 403);
    assert_eq!(
        post(&stack, "/api/models/alpha/load", None, None).await.0,
        401
    );
    // An admin key limited to some models acts on those only.
    let (s, body) = post(&stack, "/api/models/alpha/load", Some("ops-key"), None).await;
    assert_eq!(s, 404, "{body}");
    let (s, body) = post(
        &stack,
        "/api/models/beta/load?wait=true",
        Some("ops-key"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}{}", stack.logs());
    let (s, body) = post(
        &stack,
        "/api/models/alpha/load?wait=true",
        Some("admin-key"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{body}{}", stack.logs());
    assert_eq!(stack.starts(), ["beta", "alpha"]);
}

/// The request and answer shapes of llama.cpp's router tests: `_load_model_and_wait`,
/// `test_router_unload_model`, `_get_model_status`, and the `/models/sse` events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_server_router_api() {
    let stack = Stack::builder("router-api")
        .model(Model::new("alpha").alias("a"))
        .model(Model::new("beta"))
        .start()
        .await;
    let status_value = |id: &'static str| {
        let stack = &stack;
        async move {
            let (s, body) = get(stack, "/models", None).await;
            assert_eq!(s, 200);
            assert_eq!(body["object"], "list");
            let item = testkit::listed(&body, id);
            item["status"]["value"].as_str().unwrap().to_owned()
        }
    };
    let wait_status = |id: &'static str, want: &'static str| async move {
        testkit::wait_for(&format!("{id} {want}"), DEADLINE, || async {
            (status_value(id).await == want).then_some(())
        })
        .await;
    };
    assert_eq!(status_value("alpha").await, "unloaded");
    assert_eq!(
        status_value("a").await,
        "unloaded",
        "aliases are listed too"
    );
    let (s, list) = get(&stack, "/v1/models", None).await;
    assert_eq!(s, 200);
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"]["value"] == "unloaded"),
        "{list}"
    );

    let mut sse = Events::open(&stack, "/models/sse", None).await;
    let (s, body) = model_call(&stack, "/models/load", None, "alpha").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["success"], true);
    wait_status("alpha", "loaded").await;
    let seen = sse
        .until("alpha loaded", |_, e| {
            e["model"] == "alpha" && e["data"]["status"] == "loaded"
        })
        .await;
    assert!(
        seen.iter()
            .any(|(_, e)| e["event"] == "status_change" && e["data"]["status"] == "loading"),
        "{seen:?}"
    );

    let (s, body) = model_call(&stack, "/models/load", None, "alpha").await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["message"], "model is already running");
    let (s, body) = model_call(&stack, "/models/load", None, "nope").await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(body["error"]["type"], "not_found_error");

    let (s, body) = model_call(&stack, "/models/unload", None, "alpha").await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["success"], true);
    wait_status("alpha", "unloaded").await;
    sse.until("alpha unloaded", |_, e| {
        e["model"] == "alpha" && e["data"]["status"] == "unloaded"
    })
    .await;
    let (s, body) = model_call(&stack, "/models/unload", None, "alpha").await;
    assert_eq!(s, 400, "{body}");
    assert_eq!(body["error"]["message"], "model is not running");
}

/// The page's sleep action: admin only, drains and puts a model with a sleep protocol to
/// sleep in its own process (load wakes it there); a model without one gets a 409 saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_sleep_action_puts_a_model_to_sleep_and_load_wakes_it() {
    let stack = Stack::builder("operator-sleep")
        .gateway("api_keys = [\"user-key\"]")
        .gateway("admin_keys = [\"admin-key\"]")
        .model(
            Model::new("alpha")
                .args(&["--enable-sleep-mode"])
                .env("VLLM_SERVER_DEV_MODE", "1")
                .toml("sleep = true")
                .toml("host_memory = \"1GiB\""),
        )
        .model(Model::new("beta").gpus(&[1]))
        .start()
        .await;
    let admin = Some("admin-key");
    let (s, body) = post(&stack, "/api/models/alpha/load?wait=true", admin, None).await;
    assert_eq!((s, &body["state"]), (200, &json!("ready")), "{body}");
    let (_, status) = get(&stack, "/api/status", admin).await;
    let pid = model(&status, "alpha")["pid"].clone();
    assert_eq!(model(&status, "alpha")["can_sleep"], true, "{status}");
    assert_eq!(model(&status, "beta")["can_sleep"], false, "{status}");

    let (s, body) = post(&stack, "/api/models/alpha/sleep", Some("user-key"), None).await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (403, &json!("admin_required")),
        "{body}"
    );
    assert_eq!(
        model(&get(&stack, "/api/status", admin).await.1, "alpha")["state"],
        "ready"
    );

    let (s, body) = post(&stack, "/api/models/alpha/sleep", admin, None).await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        body,
        json!({"model": "alpha", "state": "sleeping", "stopped": ["alpha"]})
    );
    assert_shown_in_process(&stack, admin, "alpha", "sleeping", &pid).await;

    let (s, body) = post(&stack, "/api/models/alpha/load?wait=true", admin, None).await;
    assert_eq!((s, &body["state"]), (200, &json!("ready")), "{body}");
    assert_shown_in_process(&stack, admin, "alpha", "ready", &pid).await;

    let (s, body) = post(&stack, "/api/models/beta/load?wait=true", admin, None).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&stack, "/api/models/beta/sleep", admin, None).await;
    assert_eq!(
        (s, &body["error"]["code"]),
        (409, &json!("cannot_sleep")),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("beta has no sleep protocol"), "{body}");
}
