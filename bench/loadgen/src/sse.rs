//! Incremental parsing of an OpenAI-style Server-Sent-Events body.
//!
//! Only what the measurements need: count `data:` events, notice `[DONE]`, and
//! find the first event that carries generated text (`choices[0].delta.content`
//! or `choices[0].text`). Progress chunks a proxy sends while it swaps models
//! (`reasoning_content`) and SSE comments (`: ping`) are not text.

use serde::Deserialize;

/// What one chunk of body bytes contained.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// `data:` events other than `[DONE]`.
    pub events: u64,
    /// The first event with generated text was in this chunk.
    pub first_text: bool,
    pub done: bool,
    /// An event was an in-stream error (`{"error": ...}`).
    pub error: bool,
}

/// Parser state across body chunks (lines may be split anywhere).
#[derive(Debug, Default)]
pub struct SseParser {
    partial: Vec<u8>,
    text_seen: bool,
    done: bool,
}

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(default, borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

impl SseParser {
    pub fn new() -> Self {
        Self::default()
    }

    #[cfg(test)]
    pub fn text_seen(&self) -> bool {
        self.text_seen
    }

    pub fn done(&self) -> bool {
        self.done
    }

    /// Feeds the next body bytes.
    pub fn feed(&mut self, bytes: &[u8]) -> Seen {
        let mut seen = Seen::default();
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(newline);
            rest = &tail[1..];
            if self.partial.is_empty() {
                self.line(head, &mut seen);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, &mut seen);
            }
        }
        self.partial.extend_from_slice(rest);
        seen
    }

    fn line(&mut self, line: &[u8], seen: &mut Seen) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(payload) = line.strip_prefix(b"data:") else {
            return;
        };
        let payload = payload.trim_ascii();
        if payload == b"[DONE]" {
            self.done = true;
            seen.done = true;
            return;
        }
        seen.events += 1;
        // Parsing every event would make the load generator the bottleneck:
        // only look inside until the first text arrived (errors come early too).
        if self.text_seen {
            return;
        }
        match serde_json::from_slice::<Chunk>(payload) {
            Ok(chunk) if chunk.error.is_some() => seen.error = true,
            Ok(chunk) => {
                let has_text = chunk.choices.iter().any(|c| {
                    let delta = c.delta.as_ref().and_then(|d| d.content.as_deref());
                    let text = c.text.as_deref();
                    delta.or(text).is_some_and(|t| !t.is_empty())
                });
                if has_text {
                    self.text_seen = true;
                    seen.first_text = true;
                }
            }
            Err(_) => seen.error = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_events_finds_first_text_and_done_across_splits() {
        let body = concat!(
            ": ping\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"loading\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for split in 0..body.len() {
            let mut parser = SseParser::new();
            let a = parser.feed(&body[..split]);
            let b = parser.feed(&body[split..]);
            assert_eq!(a.events + b.events, 4, "split at {split}");
            assert!(a.first_text ^ b.first_text, "split at {split}");
            assert!(parser.done() && parser.text_seen());
            assert!(!a.error && !b.error);
        }
    }

    #[test]
    fn completions_text_and_in_stream_errors() {
        let mut parser = SseParser::new();
        let seen = parser.feed(b"data: {\"choices\":[{\"text\":\"x\"}]}\n");
        assert!(seen.first_text);
        let mut parser = SseParser::new();
        let seen = parser.feed(b"data: {\"error\":{\"message\":\"boom\"}}\n");
        assert!(seen.error && !seen.first_text);
        let seen = parser.feed(b"data: not json\n");
        assert!(seen.error);
        assert!(!parser.done());
    }
}
