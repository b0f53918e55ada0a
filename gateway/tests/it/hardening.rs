//! What an open gateway must withstand (issue 11): bounded queue memory and
//! queued requests, a deadline for request bodies, a cap on connections,
//! start failures that tell HTTP clients no secrets, and browser access only
//! from listed origins and hosts. Real supervisor, gateway and mock backends.

use std::{net::SocketAddr, time::Duration};

use crate::common;
use crate::common::{Model, Stack, metrics_when, sample};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

fn gateway_addr(stack: &Stack) -> SocketAddr {
    stack.gateway().base["http://".len()..]
        .parse()
        .expect("the gateway's address")
}

/// A chat request for `model` padded to about `bytes`.
fn padded_chat(model: &str, bytes: usize) -> Value {
    json!({
        "model": model,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "x".repeat(bytes)}],
    })
}

/// Sends `body` in the background; the task ends with the status and text.
fn post_in_background(stack: &Stack, body: Value) -> JoinHandle<(u16, String)> {
    let (http, url) = (stack.http.clone(), stack.url("/v1/chat/completions"));
    tokio::spawn(async move { common::post_to(&http, &url, &body).await })
}

/// Waits until `count` requests for `model` are queued in the gateway.
async fn wait_queued(stack: &Stack, model: &str, count: u32) {
    let series = format!("gpuswap_gateway_queue_depth{{model=\"{model}\"}}");
    metrics_when(stack, &format!("{count} queued for {model}"), |text| {
        sample(text, &series) == Some(f64::from(count))
    })
    .await;
}

async fn refused(stack: &Stack, reason: &str) -> f64 {
    let series = format!("gpuswap_gateway_refused_total{{reason=\"{reason}\"}}");
    let text = common::metrics_text(stack).await;
    sample(&text, &series).unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// The OpenAI-shaped 429 of a full queue, with its `Retry-After`.
fn assert_rate_limited(refusal: &Refusal, code: &str) {
    let (status, headers, body) = refusal;
    assert_eq!(*status, 429, "{body}");
    let error = &testkit::json(body)["error"];
    assert_eq!(error["type"], "rate_limit_exceeded", "{body}");
    assert_eq!(error["code"], code, "{body}");
    let retry_after: u64 = headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After in seconds");
    assert!(retry_after > 0);
}

/// POSTs with a deadline well below the model's load: a request that was
/// queued instead of refused fails the test here.
async fn post_expecting_refusal(stack: &Stack, body: &Value) -> Refusal {
    let response = stack
        .http
        .post(stack.url("/v1/chat/completions"))
        .timeout(Duration::from_secs(10))
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("not refused at once: {e}{}", stack.logs()));
    let headers = response.headers().clone();
    let status = response.status().as_u16();
    (status, headers, response.text().await.expect("body"))
}

/// The status, headers and body of an answer.
type Refusal = (u16, reqwest::header::HeaderMap, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_max_queued_get_429_with_retry_after() {
    let stack = Stack::builder("max-queued")
        .gateway("max_queued = 2")
        .model(Model::new("glacial").load_time("60s"))
        .start()
        .await;
    let waiting: Vec<_> = (0..2)
        .map(|_| post_in_background(&stack, Stack::chat("glacial", false, 1)))
        .collect();
    wait_queued(&stack, "glacial", 2).await;

    let refusal = post_expecting_refusal(&stack, &Stack::chat("glacial", false, 1)).await;
    assert_rate_limited(&refusal, "queue_full");
    // A streaming request is refused the same way, before its 200 would go out.
    let refusal = post_expecting_refusal(&stack, &Stack::chat("glacial", true, 1)).await;
    assert_rate_limited(&refusal, "queue_full");
    assert_eq!(refused(&stack, "queue_full").await, 2.0);

    // The places come back when the waiting clients go away.
    for task in &waiting {
        task.abort();
    }
    wait_queued(&stack, "glacial", 0).await;
    let again = post_in_background(&stack, Stack::chat("glacial", false, 1));
    wait_queued(&stack, "glacial", 1).await;
    again.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_queue_memory_get_429_and_their_memory_comes_back() {
    let stack = Stack::builder("queue-memory")
        .gateway("max_body = \"1MiB\"")
        .gateway("queue_memory = \"2MiB\"")
        .model(Model::new("glacial").load_time("60s"))
        .start()
        .await;
    let waiting: Vec<_> = (0..2)
        .map(|_| post_in_background(&stack, padded_chat("glacial", 900_000)))
        .collect();
    wait_queued(&stack, "glacial", 2).await;

    let refusal = post_expecting_refusal(&stack, &padded_chat("glacial", 900_000)).await;
    assert_rate_limited(&refusal, "queue_memory_full");
    assert_eq!(refused(&stack, "queue_memory").await, 1.0);
    // Small requests still fit beside them.
    let small = post_in_background(&stack, Stack::chat("glacial", false, 1));
    wait_queued(&stack, "glacial", 3).await;

    for task in waiting.iter().chain([&small]) {
        task.abort();
    }
    wait_queued(&stack, "glacial", 0).await;
    let big = post_in_background(&stack, padded_chat("glacial", 900_000));
    wait_queued(&stack, "glacial", 1).await;
    big.abort();
}

/// Reads what the gateway sends on `stream` until it closes it (or `limit` passes).
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408_and_the_connection_closes() {
    let stack = Stack::alpha_with("body-timeout", &["body_timeout = \"1s\""]).await;
    let mut slow = TcpStream::connect(gateway_addr(&stack)).await.unwrap();
    slow.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{\"model\":\"alpha\",",
    )
    .await
    .unwrap();
    let answer = read_until_closed(&mut slow, Duration::from_secs(20))
        .await
        .unwrap_or_else(|| panic!("no answer and still open{}", stack.logs()));
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    assert_eq!(refused(&stack, "body_timeout").await, 1.0);
    stack.chat_ok("alpha", 2).await;
}

/// One `GET /health` on a kept-alive connection: the answer's head and body.
async fn get_health(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let length: usize = text[..head_end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|l| l.trim().parse().ok())
                .expect("content-length");
            if answer.len() >= head_end + 4 + length {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_until_one_closes() {
    let mut stack = Stack::alpha_with("max-connections", &["max_connections = 2"]).await;
    // The harness's client keeps its connection: let it go, so the test
    // holds every connection the gateway serves.
    stack.http = testkit::http::new_client();
    let addr = gateway_addr(&stack);
    let mut first = TcpStream::connect(addr).await.unwrap();
    let mut second = TcpStream::connect(addr).await.unwrap();
    let served = tokio::time::timeout(testkit::DEADLINE, async {
        (get_health(&mut first).await, get_health(&mut second).await)
    })
    .await
    .unwrap_or_else(|_| panic!("the first two connections are not served{}", stack.logs()));
    assert!(served.0.starts_with("HTTP/1.1 200"), "{}", served.0);

    // The third connects (the kernel's backlog) but is not served...
    let mut third = TcpStream::connect(addr).await.unwrap();
    let early = tokio::time::timeout(Duration::from_secs(2), get_health(&mut third)).await;
    assert!(early.is_err(), "served past max_connections: {early:?}");
    // ...until another closes: then it is, having waited, not been refused.
    drop(first);
    let answer = tokio::time::timeout(testkit::DEADLINE, async {
        let mut buf = [0u8; 4096];
        let mut answer = Vec::new();
        while !String::from_utf8_lossy(&answer).contains("\"status\":\"ok\"") {
            let n = third.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap_or_else(|_| panic!("the waiting connection was never served{}", stack.logs()));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(second);
    let text = metrics_when(&stack, "the limit counted", |text| {
        sample(text, "gpuswap_gateway_connection_limit_reached_total").is_some_and(|n| n >= 1.0)
    })
    .await;
    let open = sample(&text, "gpuswap_gateway_connections_open").expect("connections_open");
    assert!((1.0..=2.0).contains(&open), "{open} open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_and_hosts_are_served_only_when_listed() {
    let stack = Stack::alpha_with(
        "browser-access",
        &[
            "cors_origins = [\"http://webui.lan:3000\"]",
            "allowed_hosts = [\"127.0.0.1\", \"localhost\"]",
        ],
    )
    .await;
    let chat = |origin: Option<&'static str>, host: Option<&'static str>| {
        let mut request = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .json(&Stack::chat("alpha", false, 2));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        if let Some(host) = host {
            request = request.header("host", host);
        }
        request.send()
    };
    // A listed origin is echoed.
    let listed = chat(Some("http://webui.lan:3000"), None).await.unwrap();
    assert_eq!(listed.status(), 200);
    assert_eq!(
        listed.headers()["access-control-allow-origin"],
        "http://webui.lan:3000"
    );
    // Any other is refused before the request runs (a page can POST without a
    // preflight, and force a swap even when it cannot read the answer).
    let other = chat(Some("http://evil.example"), None).await.unwrap();
    assert_eq!(other.status(), 403);
    assert!(other.headers().get("access-control-allow-origin").is_none());
    let body = other.text().await.unwrap();
    assert_eq!(
        testkit::json(&body)["error"]["code"],
        "origin_not_allowed",
        "{body}"
    );
    let preflight = stack
        .http
        .request(reqwest::Method::OPTIONS, stack.url("/v1/chat/completions"))
        .header("origin", "http://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    // No Origin: not a browser, served as before.
    assert_eq!(chat(None, None).await.unwrap().status(), 200);

    // A DNS-rebinding page reaches the gateway under its own name.
    let rebound = chat(None, Some("rebound.evil.example:8002")).await.unwrap();
    assert_eq!(rebound.status(), 403);
    let body = rebound.text().await.unwrap();
    assert_eq!(
        testkit::json(&body)["error"]["code"],
        "host_not_allowed",
        "{body}"
    );
    assert_eq!(
        chat(None, Some("localhost:8002")).await.unwrap().status(),
        200
    );
    assert_eq!(refused(&stack, "origin").await, 2.0);
    assert_eq!(refused(&stack, "host").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cors_origins_no_origin_is_echoed() {
    let stack = Stack::alpha_with("no-cors", &[]).await;
    let response = stack
        .http
        .get(stack.url("/v1/models"))
        .header("origin", "http://webui.lan")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_backend_read_is_never_sent_to_it_twice() {
    // The second completion request is read whole, then its connection is
    // closed unanswered (the backend may be generating): sending it again on
    // a new connection would run the generation twice.
    let stack = Stack::builder("no-double-run")
        .model(Model::new("flaky").args(&["--fault", "hang-up:2"]))
        .start()
        .await;
    stack.chat_ok("flaky", 2).await;
    // The backend lives (its route is not replaced): the gateway gives up on
    // the request rather than send it to that backend again.
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("flaky", false, 2))
        .await;
    assert_eq!(s, 502, "{t}{}", stack.logs());
    assert_eq!(
        testkit::json(&t)["error"]["code"],
        "backend_unavailable",
        "{t}"
    );
    stack.chat_ok("flaky", 2).await;

    let endpoint = format!("unix://{}", stack.socket.display());
    let output = testkit::run_ctl(&endpoint, &["logs", "flaky"]).await;
    let logs = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        logs.matches("hang-up fault: completion request").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("\"POST /v1/chat/completions HTTP/1.1\" 200")
            .count(),
        2,
        "a request ran twice: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_named_in_connection_stay_on_their_hop() {
    let stack = Stack::alpha_with("hop-by-hop", &[]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let backend_saw = |connection: Option<&'static str>| {
        let mut request = stack
            .http
            .post(stack.url("/v1/chat/completions"))
            .header("traceparent", traceparent)
            .json(&Stack::chat("alpha", false, 2));
        if let Some(connection) = connection {
            request = request.header("connection", connection);
        }
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["gpuswap_mock"]["traceparent"]
                .as_str()
                .map(str::to_owned)
        }
    };
    // The mock echoes the header it got: an end-to-end header passes...
    assert_eq!(backend_saw(None).await.as_deref(), Some(traceparent));
    // ...and one the client named in `Connection` is for the gateway only.
    assert_eq!(backend_saw(Some("keep-alive, traceparent")).await, None);
}
