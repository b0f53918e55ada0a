//! Requests to the gateway under test and what its answers say: chat bodies, SSE streams
//! and error chains.

use serde_json::{Value, json};

/// A chat request body.
pub fn chat_body(model: &str, stream: bool, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

/// The ids of an OpenAI model list (`GET /v1/models`), in its order.
pub fn listed_ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("not a model list: {list}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap_or_else(|| panic!("no id: {m}")))
        .collect()
}

/// The entry of model `id` in an OpenAI model list.
pub fn listed<'a>(list: &'a Value, id: &str) -> &'a Value {
    model_entry(list, "data", id).unwrap_or_else(|| panic!("{id} is not listed: {list}"))
}

/// The entry of model `id` in the array `list` of a JSON answer (`data` of a model list,
/// `models` of the gateway's `/health` and `/api/status`); None when it is not there.
pub fn model_entry<'a>(body: &'a Value, list: &str, id: &str) -> Option<&'a Value> {
    body[list].as_array()?.iter().find(|m| m["id"] == id)
}

/// The `data:` payloads of an SSE text (LF or CRLF), comments and blank lines left out.
pub fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

/// True for the gateway's own progress chunks (sent while a streaming request waits).
pub fn is_progress(chunk: &Value) -> bool {
    chunk["id"] == "gpuswap-progress"
}

/// The answer text of a whole SSE chat stream, progress chunks left out; panics on a chunk
/// that is not JSON.
pub fn stream_content(text: &str) -> String {
    content_of(chunks(text).map(|d| crate::json(&d)))
}

/// As [`stream_content`], for a stream read in part: a chunk that is not JSON (the last one
/// may be cut short) is left out.
pub fn partial_stream_content(text: &str) -> String {
    content_of(chunks(text).filter_map(|d| serde_json::from_str(&d).ok()))
}

/// The payloads of an SSE text but `[DONE]`.
fn chunks(text: &str) -> impl Iterator<Item = String> {
    sse_data(text).into_iter().filter(|d| d != "[DONE]")
}

fn content_of(chunks: impl Iterator<Item = Value>) -> String {
    chunks
        .filter(|v| !is_progress(v))
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// An error and its sources, `: `-separated (what a transport error really says).
pub use gpuswap::error_chain;
