//! The fake completions: request parsing and the JSON of answers and chunks.
//!
//! The text starts with `[served by NAME]` and goes on with varied words, one
//! token per content chunk, `max_tokens` of them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::{errors::ApiError, state::Shared};

const DEFAULT_MAX_TOKENS: u64 = 16;
/// Keeps a careless request from streaming forever.
const MAX_TOKENS_CAP: u64 = 1_000_000;

const WORDS: [&str; 32] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "amber", "basalt", "cobalt", "dune",
    "ember", "fjord",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Text,
}

/// The parts of a completion request the mock cares about.
pub struct Request {
    pub endpoint: Endpoint,
    /// The `model` field as received (null when absent).
    pub request_model: Value,
    pub stream: bool,
    pub max_tokens: u64,
    pub max_tokens_given: bool,
    pub include_usage: bool,
    pub prompt_tokens: u64,
}

impl Request {
    pub fn parse(endpoint: Endpoint, body: &Value) -> Result<Self, ApiError> {
        let object = body
            .as_object()
            .ok_or_else(|| ApiError::bad_request("request body must be a JSON object"))?;
        let requested_max = object
            .get("max_tokens")
            .or_else(|| object.get("max_completion_tokens"))
            .filter(|value| !value.is_null());
        let max_tokens = match requested_max {
            None => DEFAULT_MAX_TOKENS,
            Some(value) => value
                .as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ApiError::bad_request("max_tokens must be a positive integer"))?
                .min(MAX_TOKENS_CAP),
        };
        let prompt_tokens = match endpoint {
            Endpoint::Chat => {
                let messages = object
                    .get("messages")
                    .and_then(Value::as_array)
                    .ok_or_else(|| ApiError::bad_request("messages: field required"))?;
                messages.iter().map(|m| count_words(&m["content"])).sum()
            }
            Endpoint::Text => {
                let prompt = object
                    .get("prompt")
                    .ok_or_else(|| ApiError::bad_request("prompt: field required"))?;
                count_words(prompt)
            }
        };
        Ok(Self {
            endpoint,
            request_model: object.get("model").cloned().unwrap_or(Value::Null),
            stream: object
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_tokens,
            max_tokens_given: requested_max.is_some(),
            include_usage: object
                .get("stream_options")
                .and_then(|options| options.get("include_usage"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            prompt_tokens: prompt_tokens.max(1),
        })
    }
}

/// Whitespace-separated words in a string, an array of strings or of content parts.
pub fn count_words(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(count_words).sum(),
        Value::Object(part) => part.get("text").map_or(0, count_words),
        _ => 0,
    }
}

/// One answer being produced: ids, tokens and the JSON around them.
pub struct Answer {
    pub request: Request,
    /// Cut short by a vLLM sleep (`mode=abort`): finish_reason "abort".
    pub aborted: bool,
    id: String,
    created: u64,
    seq: u64,
    model: String,
    mock_info: Value,
}

impl Answer {
    pub fn new(shared: &Shared, request: Request) -> Self {
        let seq = shared.next_request();
        let prefix = match request.endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Text => "cmpl",
        };
        let mock_info = json!({
            "pid": shared.pid,
            "port": shared.port(),
            "request_model": request.request_model,
            "flavor": format!("{:?}", shared.flavor()).to_lowercase(),
        });
        Self {
            id: format!("{prefix}-mock-{}-{seq}", shared.pid),
            created: unix_now(),
            seq,
            model: shared.model().to_owned(),
            mock_info,
            request,
            aborted: false,
        }
    }

    /// Adds the request's W3C `traceparent` header (if any) to `gpuswap_mock`,
    /// so tests can see the trace context a proxy passed on.
    pub fn echo_traceparent(&mut self, traceparent: Option<&str>) {
        if let Some(traceparent) = traceparent {
            self.mock_info["traceparent"] = Value::from(traceparent);
        }
    }

    /// Token `index` (0-based) of this answer; consecutive tokens always differ.
    pub fn token(&self, index: u64) -> String {
        if index == 0 {
            format!("[served by {}]", self.model)
        } else {
            let word = (index * 5 + self.seq) % WORDS.len() as u64;
            format!(" {}", WORDS[word as usize])
        }
    }

    pub fn text(&self) -> String {
        (0..self.request.max_tokens)
            .map(|i| self.token(i))
            .collect()
    }

    fn finish_reason(&self) -> &'static str {
        if self.aborted {
            "abort"
        } else if self.request.max_tokens_given {
            "length"
        } else {
            "stop"
        }
    }

    fn usage(&self) -> Value {
        json!({
            "prompt_tokens": self.request.prompt_tokens,
            "completion_tokens": self.request.max_tokens,
            "total_tokens": self.request.prompt_tokens + self.request.max_tokens,
        })
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.request.endpoint, streaming) {
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Text, _) => "text_completion",
        }
    }

    /// The whole non-streaming answer.
    pub fn full_response(&self) -> Value {
        let choice = match self.request.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": self.text()},
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }),
            Endpoint::Text => json!({
                "index": 0,
                "text": self.text(),
                "logprobs": null,
                "finish_reason": self.finish_reason(),
            }),
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(),
            "gpuswap_mock": self.mock_info,
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// The chat stream's opening chunk (role only); None for text completions.
    pub fn opening_chunk(&self) -> Option<Value> {
        (self.request.endpoint == Endpoint::Chat).then(|| {
            let mut chunk = self.chunk(json!([{
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": null,
                "finish_reason": null,
            }]));
            chunk["gpuswap_mock"] = self.mock_info.clone();
            chunk
        })
    }

    /// The chunk carrying token `index`; the first chunk of the stream carries `gpuswap_mock`.
    pub fn token_chunk(&self, index: u64) -> Value {
        let token = self.token(index);
        let choice = match self.request.endpoint {
            Endpoint::Chat => json!({
                "index": 0, "delta": {"content": token}, "logprobs": null, "finish_reason": null,
            }),
            Endpoint::Text => json!({
                "index": 0, "text": token, "logprobs": null, "finish_reason": null,
            }),
        };
        let mut chunk = self.chunk(json!([choice]));
        if index == 0 && self.request.endpoint == Endpoint::Text {
            chunk["gpuswap_mock"] = self.mock_info.clone();
        }
        chunk
    }

    pub fn finish_chunk(&self) -> Value {
        let choice = match self.request.endpoint {
            Endpoint::Chat => json!({
                "index": 0, "delta": {}, "logprobs": null, "finish_reason": self.finish_reason(),
            }),
            Endpoint::Text => json!({
                "index": 0, "text": "", "logprobs": null, "finish_reason": self.finish_reason(),
            }),
        };
        self.chunk(json!([choice]))
    }

    /// `stream_options.include_usage`: empty choices, then usage.
    pub fn usage_chunk(&self) -> Option<Value> {
        self.request.include_usage.then(|| {
            let mut chunk = self.chunk(json!([]));
            chunk["usage"] = self.usage();
            chunk
        })
    }
}

/// A small deterministic vector per input text.
pub fn embedding(text: &str) -> Vec<f32> {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        state = (state ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (0..8)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_counted_in_every_content_shape() {
        assert_eq!(count_words(&json!("a b  c")), 3);
        assert_eq!(count_words(&json!(["a b", "c"])), 3);
        assert_eq!(count_words(&json!([{"type": "text", "text": "x y"}])), 2);
        assert_eq!(count_words(&json!(null)), 0);
    }

    #[test]
    fn max_tokens_must_be_positive() {
        let request = json!({"messages": [], "max_tokens": 0});
        assert!(Request::parse(Endpoint::Chat, &request).is_err());
        let request = json!({"prompt": "hi", "max_completion_tokens": 3});
        assert_eq!(
            Request::parse(Endpoint::Text, &request)
                .ok()
                .map(|r| r.max_tokens),
            Some(3)
        );
    }
}
