//! The OpenAI API once ready: every answer names the model that served it.

use std::time::Instant;

use crate::common::{Mock, chat_request, chat_stream_tokens, get, http, post};
use serde_json::json;

async fn ready(flavor: &str, extra: &[&str]) -> Mock {
    let mut args = vec!["--load-time", "10ms", "--warmup", "0s"];
    args.extend_from_slice(extra);
    let mock = Mock::start(flavor, &args);
    let ready_line = match flavor {
        "sglang" => "fired up",
        "vllm" => "Application startup complete.",
        "llama-server" => "llama_server: listening on",
        _ => "is ready",
    };
    mock.wait_log(ready_line).await;
    mock
}

#[tokio::test]
async fn chat_answer_names_the_model_and_reports_usage() {
    let mock = ready("vllm", &["--tokens-per-second", "0"]).await;
    let reply = mock.chat(false, 5).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["model"], mock.model.as_str());
    assert_eq!(body["object"], "chat.completion");
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with(&format!("[served by {}]", mock.model)),
        "{content}"
    );
    assert_eq!(
        content.split_whitespace().count(),
        3 + 4,
        "5 tokens: the tag (3 words) and 4 words"
    );
    assert_eq!(body["usage"]["completion_tokens"], 5);
    assert_eq!(body["usage"]["prompt_tokens"], 3);
    assert_eq!(body["gpuswap_mock"]["pid"], mock.pid());
    assert_eq!(body["gpuswap_mock"]["port"], mock.port);
    assert_eq!(body["gpuswap_mock"]["request_model"], mock.model.as_str());
}

#[tokio::test]
async fn chat_stream_sends_max_tokens_varied_chunks_then_usage_and_done() {
    let mock = ready("sglang", &["--tokens-per-second", "0"]).await;
    let mut request = chat_request(&mock.model, true, 40);
    request["stream_options"] = json!({"include_usage": true});
    let reply = post(mock.port, "/v1/chat/completions", &request).await;
    assert_eq!(reply.status, 200);
    assert!(reply.complete());
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(!reply.text.contains('\r'), "LF line endings");
    let data = reply.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = reply.sse_chunks();
    assert_eq!(chunks[0]["gpuswap_mock"]["pid"], mock.pid());
    assert_eq!(
        chunks[0]["gpuswap_mock"]["request_model"],
        mock.model.as_str()
    );
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["model"] == mock.model.as_str())
    );
    let tokens = chat_stream_tokens(&chunks);
    assert_eq!(tokens.len(), 40);
    assert_eq!(tokens[0], format!("[served by {}]", mock.model));
    assert!(
        tokens.windows(2).all(|w| w[0] != w[1]),
        "consecutive tokens differ: {tokens:?}"
    );
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 40);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let mock = ready("vllm", &["--tokens-per-second", "0"]).await;
    let reply = mock.chat(true, 3).await;
    let chunks = reply.sse_chunks();
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    assert_eq!(chat_stream_tokens(&chunks).len(), 3);
}

#[tokio::test]
async fn text_completions_stream_and_not() {
    let mock = ready("llama-server", &["--tokens-per-second", "0"]).await;
    let request = json!({"model": mock.model, "prompt": "once upon a time", "max_tokens": 4});
    let reply = post(mock.port, "/v1/completions", &request).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["object"], "text_completion");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("[served by mock-llama-server-model]")
    );
    assert_eq!(body["usage"]["prompt_tokens"], 4);

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let reply = post(mock.port, "/v1/completions", &streaming).await;
    let chunks = reply.sse_chunks();
    assert_eq!(chunks[0]["gpuswap_mock"]["port"], mock.port);
    let texts: Vec<_> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert_eq!(texts.len(), 4);
    assert_eq!(reply.sse_data().last().map(String::as_str), Some("[DONE]"));
}

#[tokio::test]
async fn unknown_model_is_404_in_each_flavors_shape() {
    let vllm = ready("vllm", &[]).await;
    let reply = vllm.chat_naming("other-model", false, 2).await;
    assert_eq!(reply.status, 404);
    // vLLM 0.32's own shape (e2e/tests/it/real_servers.rs saw it): the status as the code.
    let body = reply.json();
    assert_eq!(body["error"]["type"], "NotFoundError", "{body}");
    assert_eq!(body["error"]["code"], 404, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");

    let sglang = ready("sglang", &[]).await;
    let reply = sglang.chat_naming("other-model", false, 2).await;
    assert_eq!(reply.status, 404);
    let body = reply.json();
    assert_eq!(body["object"], "error", "{body}");
    assert_eq!(body["code"], "model_not_found");
    assert_eq!(get(sglang.port, "/v1/models/other-model").await.status, 404);
    assert_eq!(
        get(sglang.port, &format!("/v1/models/{}", sglang.model))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn tabbyapi_stream_uses_crlf_and_pings_and_ignores_model() {
    let mock = ready("tabbyapi", &["--tokens-per-second", "0", "--api-key", "k1"]).await;
    let body = chat_request("whatever-the-client-says", true, 3).to_string();
    let keyless = http(mock.port, "POST", "/v1/chat/completions", &[], Some(&body))
        .await
        .unwrap();
    assert_eq!(keyless.status, 401);
    assert!(keyless.json()["detail"].is_string());
    let reply = http(
        mock.port,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer k1")],
        Some(&body),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let text = &reply.text;
    assert!(text.starts_with(": ping\r\n\r\n"), "{text:?}");
    assert!(text.ends_with("data: [DONE]\r\n\r\n"), "{text:?}");
    assert!(
        !text.replace("\r\n", "").contains('\n'),
        "every line ends in CRLF: {text:?}"
    );
    let chunks = reply.sse_chunks();
    assert_eq!(
        chunks[0]["gpuswap_mock"]["request_model"],
        "whatever-the-client-says"
    );
    assert_eq!(chunks[0]["model"], mock.model.as_str());
    assert_eq!(chat_stream_tokens(&chunks).len(), 3);
}

#[tokio::test]
async fn api_key_is_enforced_on_v1_but_not_health() {
    let mock = ready("vllm", &["--api-key", "k2"]).await;
    assert_eq!(get(mock.port, "/health").await.status, 200);
    let reply = get(mock.port, "/v1/models").await;
    assert_eq!(reply.status, 401);
    assert!(reply.json()["error"].is_object(), "{}", reply.text);
    let reply = http(
        mock.port,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer k2")],
        None,
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200);
    // x-api-key is TabbyAPI's alone.
    let reply = http(mock.port, "GET", "/v1/models", &[("x-api-key", "k2")], None)
        .await
        .unwrap();
    assert_eq!(reply.status, 401);
}

#[tokio::test]
async fn embeddings_return_one_vector_per_input() {
    let mock = ready("vllm", &[]).await;
    let request = json!({"model": mock.model, "input": ["a b", "c"]});
    let reply = post(mock.port, "/v1/embeddings", &request).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["model"], mock.model.as_str());
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(!data[0]["embedding"].as_array().unwrap().is_empty());
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
}

#[tokio::test]
async fn tokens_are_paced_by_tokens_per_second() {
    let mock = ready("vllm", &["--tokens-per-second", "20"]).await;
    let start = Instant::now();
    let reply = mock.chat(true, 6).await;
    assert_eq!(chat_stream_tokens(&reply.sse_chunks()).len(), 6);
    // 6 tokens at 20/s take at least 300 ms (an upper bound would be a timing goal).
    assert!(start.elapsed().as_millis() >= 290, "{:?}", start.elapsed());
}

#[tokio::test]
async fn bad_requests_and_unknown_paths() {
    let mock = ready("sglang", &[]).await;
    let reply = http(
        mock.port,
        "POST",
        "/v1/chat/completions",
        &[],
        Some("{not json"),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["object"], "error");
    let reply = get(mock.port, "/no/such/path").await;
    assert_eq!(reply.status, 404);
    let llama = ready("llama-server", &[]).await;
    assert_eq!(
        get(llama.port, "/v1/model").await.status,
        404,
        "/v1/model is TabbyAPI's"
    );
}

#[tokio::test]
async fn slow_tabbyapi_streams_send_keep_alive_pings() {
    // 0.5 tokens/s: two seconds before the only token, so a ping in between.
    let mock = ready("tabbyapi", &["--tokens-per-second", "0.5"]).await;
    let reply = mock.chat(true, 1).await;
    let text = &reply.text;
    assert!(text.matches(": ping\r\n\r\n").count() >= 2, "{text:?}");
    assert_eq!(chat_stream_tokens(&reply.sse_chunks()).len(), 1);
}
