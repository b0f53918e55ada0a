//! The OpenAI surface: the model list, chat through a real OpenAI client,
//! SSE pass-through, API keys, CORS, and every error shape.

use crate::common::{Model, Stack, read_stream};
use async_openai::{
    Client,
    config::OpenAIConfig,
    types::chat::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs},
};
use futures_util::StreamExt;
use serde_json::{Value, json};
use testkit::{http, stream_content};

fn openai(stack: &Stack, key: &str) -> Client<OpenAIConfig> {
    Client::with_config(
        OpenAIConfig::new()
            .with_api_base(stack.url("/v1"))
            .with_api_key(key),
    )
}

fn chat_request(
    model: &str,
    max_tokens: u32,
) -> async_openai::types::chat::CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .max_completion_tokens(max_tokens)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hello")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap()
}

/// Asserts the OpenAI error shape and returns the error object.
fn openai_error(status: u16, text: &str, want_status: u16, want_code: &str) -> Value {
    assert_eq!(status, want_status, "{text}");
    let body = testkit::json(text);
    let error = &body["error"];
    assert!(error["message"].is_string(), "{text}");
    assert!(error["type"].is_string(), "{text}");
    assert_eq!(error["code"], want_code, "{text}");
    error.clone()
}

async fn post_raw(stack: &Stack, path: &str, body: &str) -> (u16, String) {
    post_bytes(stack, path, Some("application/json"), body.as_bytes()).await
}

async fn post_bytes(
    stack: &Stack,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut request = stack.http.post(stack.url(path)).body(body.to_vec());
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("POST");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_has_every_model_and_alias_from_the_catalog() {
    let stack = Stack::builder("list")
        .model(Model::new("alpha").alias("a").alias("al"))
        .model(Model::new("beta"))
        .start()
        .await;
    let body = stack.get_json("/v1/models").await.expect("GET /v1/models");
    assert_eq!(body["object"], "list");
    let data = body["data"].as_array().unwrap();
    let ids: Vec<&str> = data.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["alpha", "a", "al", "beta"], "{body}");
    for entry in data {
        assert_eq!(entry["object"], "model");
        assert_eq!(entry["owned_by"], "gpuswap");
        assert!(entry["created"].as_u64().unwrap() > 0);
        assert_eq!(entry["gpuswap"]["state"], "stopped", "{entry}");
    }
    assert_eq!(data[1]["gpuswap"]["alias_of"], "alpha");
    assert!(data[0]["gpuswap"].get("alias_of").is_none());

    let one = stack
        .get_json("/v1/models/al")
        .await
        .expect("GET /v1/models/al");
    assert_eq!(one["id"], "al");
    assert_eq!(one["gpuswap"]["alias_of"], "alpha");
    let missing = http::send(stack.http.get(stack.url("/v1/models/zeta"))).await;
    openai_error(missing.status, &missing.text, 404, "model_not_found");

    // States follow the supervisor.
    stack.chat_ok("a", 2).await;
    testkit::wait_for("alpha listed as ready", testkit::DEADLINE, || async {
        let body = stack.get_json("/v1/models").await?;
        (body["data"][0]["gpuswap"]["state"] == "ready").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_chats_with_and_without_streaming() {
    let stack = Stack::builder("openai")
        .model(Model::new("alpha").served_name("alpha-served").alias("a"))
        .model(Model::new("beta").flavor("sglang"))
        .start()
        .await;
    let client = openai(&stack, "unused");

    // Non-stream, by alias: the body is renamed to the served name.
    let response = client
        .chat()
        .create(chat_request("a", 5))
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    assert_eq!(response.model, "alpha-served");
    let content = response.choices[0].message.content.clone().unwrap();
    assert!(content.starts_with("[served by alpha-served]"), "{content}");

    // Stream, to a model that must be swapped in first: progress chunks parse
    // as chunks and carry no content.
    let mut stream = client
        .chat()
        .create_stream(chat_request("beta", 6))
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    let mut content = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("chunk: {e}{}", stack.logs()));
        chunks += 1;
        for choice in chunk.choices {
            content.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert!(content.starts_with("[served by beta]"), "{content}");
    assert!(chunks >= 6, "{chunks} chunks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_pass_through_byte_for_byte() {
    let stack = Stack::builder("sse")
        .model(Model::new("tabby").flavor("tabbyapi"))
        .start()
        .await;
    // Make it ready first, so the stream below is the backend's own.
    stack.chat_ok("tabby", 1).await;

    let response = stack.post_chat("tabby", true, 4).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["cache-control"], "no-cache");
    let text = read_stream(response).await;
    // TabbyAPI's CRLF framing and its `: ping` comment arrive untouched.
    assert!(text.starts_with(": ping\r\n\r\n"), "{text:?}");
    assert!(text.ends_with("data: [DONE]\r\n\r\n"), "{text:?}");
    assert!(!text.contains("gpuswap-progress"), "{text:?}");
    assert!(
        stream_content(&text).starts_with("[served by tabby]"),
        "{text:?}"
    );
    let direct = stack
        .http
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            stack.model("tabby").port
        ))
        .json(&Stack::chat("tabby", true, 4))
        .send()
        .await
        .unwrap();
    let direct = read_stream(direct).await;
    assert_eq!(
        text.matches("\r\n").count(),
        direct.matches("\r\n").count(),
        "gateway:\n{text:?}\ndirect:\n{direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_are_openai_shaped() {
    let stack = Stack::alpha_with("errors", &["max_body = \"2KiB\""]).await;
    let path = "/v1/chat/completions";
    let (s, t) = post_raw(&stack, path, "{\"model\": \"alpha\", bad").await;
    let e = openai_error(s, &t, 400, "invalid_json");
    assert_eq!(e["type"], "invalid_request_error");
    let (s, t) = post_raw(&stack, path, "[\"alpha\", true]").await;
    openai_error(s, &t, 400, "invalid_json");
    let (s, t) = post_raw(&stack, path, "{\"messages\": []}").await;
    openai_error(s, &t, 400, "missing_model");
    for not_an_object in ["\"alpha\"", "42", "null", "true"] {
        let (s, t) = post_raw(&stack, path, not_an_object).await;
        openai_error(s, &t, 400, "invalid_json");
    }
    for not_a_string in ["12", "[\"alpha\"]", "{\"id\": \"alpha\"}", "true", "null"] {
        let body = format!("{{\"model\": {not_a_string}, \"messages\": []}}");
        let (s, t) = post_raw(&stack, path, &body).await;
        let e = openai_error(s, &t, 400, "missing_model");
        if not_a_string != "null" {
            assert!(e["message"].as_str().unwrap().contains("string"), "{t}");
        }
    }
    // Invalid UTF-8, in a field the gateway does not read and in the model.
    let (s, t) = post_bytes(
        &stack,
        path,
        Some("application/json"),
        b"{\"model\": \"alpha\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}",
    )
    .await;
    let e = openai_error(s, &t, 400, "invalid_json");
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{t}");
    let (s, t) = post_bytes(&stack, path, None, b"{\"model\": \"alph\xe1\"}").await;
    openai_error(s, &t, 400, "invalid_json");
    let (s, t) = post_raw(&stack, path, "{\"model\": \"zeta\", \"messages\": []}").await;
    let e = openai_error(s, &t, 404, "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("zeta"));
    let big =
        json!({"model": "alpha", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let (s, t) = post_raw(&stack, path, &big.to_string()).await;
    openai_error(s, &t, 413, "request_too_large");
    // Chunked, without a length up front.
    let chunks = futures_util::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 512]))),
    );
    let chunked = stack
        .http
        .post(stack.url(path))
        .body(reqwest::Body::wrap_stream(chunks));
    let reply = http::send(chunked).await;
    // The rest of the body is not read: the connection cannot be reused.
    assert_eq!(reply.header("connection"), Some("close"), "{reply:?}");
    openai_error(reply.status, &reply.text, 413, "request_too_large");
    // Any other POST /v1/* with a model is routed; a GET there is not allowed.
    let (s, t) = post_raw(
        &stack,
        "/v1/embeddings",
        "{\"model\": \"alpha\", \"input\": \"hi\"}",
    )
    .await;
    assert_eq!(s, 200, "{t}");
    assert!(testkit::json(&t)["data"][0]["embedding"].is_array(), "{t}");
    // Like the real servers, any content type (or none) is fine when the body is JSON.
    let chat = Stack::chat("alpha", false, 2).to_string();
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let (s, t) = post_bytes(&stack, path, content_type, chat.as_bytes()).await;
        assert_eq!(s, 200, "{content_type:?}: {t}");
        assert!(t.contains("[served by alpha]"), "{content_type:?}: {t}");
    }
    let reply = http::send(stack.http.get(stack.url(path))).await;
    openai_error(reply.status, &reply.text, 405, "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_error_shapes_are_converted() {
    // One GPU each: no swaps needed.
    let stack = Stack::builder("shapes")
        .model(Model::new("sg").flavor("sglang").gpus(&[0]))
        .model(Model::new("tb").flavor("tabbyapi").gpus(&[1]))
        .model(Model::new("vl").flavor("vllm").gpus(&[2]))
        // The supervisor knows it as "renamed", the backend serves "ll": it refuses the name.
        .model(
            Model::new("ll")
                .flavor("llama-server")
                .gpus(&[3])
                .toml("served_name = \"renamed\""),
        )
        .start()
        .await;
    for model in ["sg", "tb", "vl"] {
        // Embeddings without input: each backend's own 400 shape.
        let (s, t) = stack.post("/v1/embeddings", &json!({"model": model})).await;
        let e = openai_error(s, &t, 400, "invalid_request");
        assert!(
            e["message"].as_str().unwrap().contains("input"),
            "{model}: {t}"
        );
        assert!(
            !t.contains("\"object\":\"error\"") && !t.contains("detail"),
            "{model}: {t}"
        );
    }
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("ll", false, 2))
        .await;
    let e = openai_error(s, &t, 404, "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("renamed"), "{t}");
    // A path the backend does not know: FastAPI's {"detail":"Not Found"}.
    let (s, t) = stack
        .post("/v1/nothing/here", &json!({"model": "tb"}))
        .await;
    let e = openai_error(s, &t, 404, "not_found");
    assert_eq!(e["message"], "Not Found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_the_api_but_not_health_or_preflight() {
    let stack = Stack::builder("keys")
        .gateway("api_keys = [\"k1\", \"k2\"]")
        .gateway("cors_origins = [\"http://webui.local\"]")
        .model(
            Model::new("alpha")
                .args(&["--api-key", "backend-secret"])
                .toml("api_key = \"backend-secret\""),
        )
        .start()
        .await;
    let get = |key: Option<(&'static str, &'static str)>| {
        let mut request = stack.http.get(stack.url("/v1/models"));
        if let Some((name, value)) = key {
            request = request.header(name, value);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (s, t) = get(None).await;
    openai_error(s, &t, 401, "invalid_api_key");
    let (s, t) = get(Some(("authorization", "Bearer k3"))).await;
    openai_error(s, &t, 401, "invalid_api_key");
    assert_eq!(get(Some(("authorization", "Bearer k2"))).await.0, 200);
    assert_eq!(get(Some(("x-api-key", "k1"))).await.0, 200);
    let (s, t) = stack
        .post("/v1/chat/completions", &Stack::chat("alpha", false, 2))
        .await;
    openai_error(s, &t, 401, "invalid_api_key");

    // The client's key is the gateway's; the backend gets its own.
    let response = openai(&stack, "k1")
        .chat()
        .create(chat_request("alpha", 3))
        .await
        .unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    assert!(
        response.choices[0]
            .message
            .content
            .as_deref()
            .unwrap()
            .starts_with("[served by alpha]")
    );
    let error = openai(&stack, "wrong")
        .chat()
        .create(chat_request("alpha", 3))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("API key"), "{error}");

    let health = stack.http.get(stack.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let preflight = stack
        .http
        .request(reqwest::Method::OPTIONS, stack.url("/v1/chat/completions"))
        .header("origin", "http://webui.local")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "http://webui.local");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        h["access-control-allow-headers"],
        "authorization, content-type"
    );
    let with_origin = stack
        .http
        .get(stack.url("/v1/models"))
        .header("origin", "http://webui.local")
        .header("x-api-key", "k2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        with_origin.headers()["access-control-allow-origin"],
        "http://webui.local"
    );
}
