//! Completion tokens of a response, counted from its bytes as they pass
//! through: no buffering, no JSON parsing, no allocation.
//!
//! One `memchr` pass finds the colons of a frame; the few bytes before each
//! colon name the key, and only after a key of interest are the bytes of its
//! value looked at one by one. Frames split the stream anywhere, so the last
//! bytes of each frame are kept to read a key cut by a frame start, and a
//! value cut by a frame end is finished on the next frame.
//!
//! - In an event stream every non-empty `content` (also `reasoning_content`),
//!   `text` (completions) or `arguments` (tool calls) string is one token: the
//!   servers send one token per chunk.
//! - In any response, `"completion_tokens": N` after a `"usage"` key is the
//!   backend's own count, which replaces the counted chunks.
//!
//! A whole answer (not a stream) is only searched for `"usage"` (one SIMD
//! `memmem` per frame) until the key shows up, so a long answer full of
//! colons (logprobs) is not read key by key.
//!
//! JSON escapes every `"` inside a string, so a key seen this way is a real
//! key (`\"content\":` in a message is not one).

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Bytes kept from before a colon: the longest key, its quotes and some blanks.
const LOOKBACK: usize = 24;
const USAGE_KEY: &[u8] = b"\"usage\"";
static USAGE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(USAGE_KEY));

/// What to count in a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counting {
    /// An event stream: content chunks, and the usage if the backend sends it.
    Stream,
    /// A whole JSON answer: only its usage (its one content is not a token count).
    Usage,
}

/// Tokens found in one frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counted {
    /// Content chunks.
    pub chunks: u64,
    /// The last `usage.completion_tokens` seen.
    pub usage: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    /// `content`, `reasoning_content`, `text`, `arguments`: a string of tokens.
    Token,
    Usage,
    CompletionTokens,
}

/// Names the key whose colon follows `before` (the bytes up to the colon).
fn key(before: &[u8]) -> Option<Key> {
    let end = before.iter().rposition(|b| !matches!(b, b' ' | b'\t'))?;
    let name = before[..=end].strip_suffix(b"\"")?;
    match name.last()? {
        b't' if name.ends_with(b"content") || name.ends_with(b"\"text") => Some(Key::Token),
        b's' if name.ends_with(b"\"arguments") => Some(Key::Token),
        b's' if name.ends_with(b"\"completion_tokens") => Some(Key::CompletionTokens),
        b'e' if name.ends_with(b"\"usage") => Some(Key::Usage),
        _ => None,
    }
}

/// Where the scan is in a value, after its key's colon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// A token key: the opening `"`, then the first byte of the string.
    StringQuote,
    StringFirstByte,
    /// `completion_tokens`: digits.
    NumberFirstDigit,
    Digits(u64),
}

enum Found {
    Token,
    Usage(u64),
}

enum Scan {
    /// The frame ended inside the value.
    Pending(Value),
    /// The value is complete; `None`: it was not what was looked for.
    Finished(Option<Found>),
}

impl Value {
    fn step(self, byte: u8) -> Result<Value, Option<Found>> {
        let blank = matches!(byte, b' ' | b'\t');
        match (self, byte) {
            (Value::StringQuote, b'"') => Ok(Value::StringFirstByte),
            (Value::StringQuote | Value::NumberFirstDigit, _) if blank => Ok(self),
            // `""` is an empty string: a role or finish chunk, not a token.
            (Value::StringFirstByte, b'"') => Err(None),
            (Value::StringFirstByte, _) => Err(Some(Found::Token)),
            (Value::NumberFirstDigit, b'0'..=b'9') => Ok(Value::Digits(u64::from(byte - b'0'))),
            (Value::Digits(n), b'0'..=b'9') => Ok(Value::Digits(
                n.saturating_mul(10).saturating_add(u64::from(byte - b'0')),
            )),
            (Value::Digits(n), _) => Err(Some(Found::Usage(n))),
            _ => Err(None),
        }
    }

    fn scan(mut self, bytes: &[u8]) -> Scan {
        for &byte in bytes {
            match self.step(byte) {
                Ok(next) => self = next,
                Err(found) => return Scan::Finished(found),
            }
        }
        Scan::Pending(self)
    }
}

/// Counts the tokens of one response, frame by frame.
pub struct TokenCounter {
    counting: Counting,
    /// The last bytes of the stream so far (`tail_len` of them).
    tail: [u8; LOOKBACK],
    tail_len: usize,
    /// A value cut by the end of the previous frame.
    pending: Option<Value>,
    /// A `"usage"` key was seen: from then on `completion_tokens` counts.
    usage_seen: bool,
}

impl TokenCounter {
    pub fn new(counting: Counting) -> Self {
        Self {
            counting,
            tail: [0; LOOKBACK],
            tail_len: 0,
            pending: None,
            usage_seen: false,
        }
    }

    /// Scans the next frame of the response.
    pub fn scan(&mut self, frame: &[u8]) -> Counted {
        let mut counted = Counted::default();
        if frame.is_empty() {
            return counted;
        }
        if let Some(value) = self.pending.take() {
            self.read_value(value, frame, &mut counted);
        }
        if self.counting == Counting::Usage && !self.usage_seen && !self.has_usage_key(frame) {
            self.remember(frame);
            return counted;
        }
        for colon in memchr::memchr_iter(b':', frame) {
            // Most colons end keys of no interest (`"id":`, `"model":`) or are
            // not after a key at all: rejected on the two bytes before them.
            if colon >= 2 {
                match frame[colon - 1] {
                    b'"' if !matches!(frame[colon - 2], b't' | b's' | b'e') => continue,
                    b'"' | b' ' | b'\t' => {}
                    _ => continue,
                }
            }
            let found = if colon >= LOOKBACK {
                key(&frame[colon - LOOKBACK..colon])
            } else {
                // The key may begin in the previous frame.
                let mut window = [0u8; LOOKBACK];
                let from_tail = (LOOKBACK - colon).min(self.tail_len);
                window[..from_tail]
                    .copy_from_slice(&self.tail[self.tail_len - from_tail..self.tail_len]);
                window[from_tail..from_tail + colon].copy_from_slice(&frame[..colon]);
                key(&window[..from_tail + colon])
            };
            let value = match found {
                Some(Key::Token) if self.counting == Counting::Stream => Value::StringQuote,
                Some(Key::CompletionTokens) if self.usage_seen => Value::NumberFirstDigit,
                Some(Key::Usage) => {
                    self.usage_seen = true;
                    continue;
                }
                _ => continue,
            };
            self.read_value(value, &frame[colon + 1..], &mut counted);
        }
        self.remember(frame);
        counted
    }

    /// Whether `"usage"` is in the frame, or begins in the previous one.
    fn has_usage_key(&self, frame: &[u8]) -> bool {
        if USAGE.find(frame).is_some() {
            return true;
        }
        let mut seam = [0u8; 2 * LOOKBACK];
        let head = &frame[..frame.len().min(USAGE_KEY.len() - 1)];
        seam[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        seam[self.tail_len..self.tail_len + head.len()].copy_from_slice(head);
        USAGE.find(&seam[..self.tail_len + head.len()]).is_some()
    }

    /// Reads a value; `rest` runs to the end of the frame.
    fn read_value(&mut self, value: Value, rest: &[u8], counted: &mut Counted) {
        match value.scan(rest) {
            Scan::Pending(value) => self.pending = Some(value),
            Scan::Finished(Some(Found::Token)) => counted.chunks += 1,
            Scan::Finished(Some(Found::Usage(n))) => counted.usage = Some(n),
            Scan::Finished(None) => {}
        }
    }

    fn remember(&mut self, frame: &[u8]) {
        if frame.len() >= LOOKBACK {
            self.tail.copy_from_slice(&frame[frame.len() - LOOKBACK..]);
            self.tail_len = LOOKBACK;
            return;
        }
        let keep = self.tail_len.min(LOOKBACK - frame.len());
        self.tail
            .copy_within(self.tail_len - keep..self.tail_len, 0);
        self.tail[keep..keep + frame.len()].copy_from_slice(frame);
        self.tail_len = keep + frame.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mock's (and vLLM's) chat stream: a role chunk with empty content,
    /// token chunks, a finish chunk, optionally a usage chunk, `[DONE]`.
    fn chat_stream(tokens: u64, usage: Option<u64>) -> Vec<u8> {
        let mut text = String::from(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        );
        for i in 0..tokens {
            text.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" w{i}\"}},\"finish_reason\":null}}]}}\n\n"
            ));
        }
        text.push_str("data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
        if let Some(n) = usage {
            text.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":{n},\"total_tokens\":{},\"completion_tokens_details\":null}}}}\n\n",
                n + 7
            ));
        }
        text.push_str("data: [DONE]\n\n");
        text.into_bytes()
    }

    fn total(counting: Counting, frames: &[&[u8]]) -> Counted {
        let mut counter = TokenCounter::new(counting);
        let mut sum = Counted::default();
        for frame in frames {
            let c = counter.scan(frame);
            sum.chunks += c.chunks;
            sum.usage = c.usage.or(sum.usage);
        }
        sum
    }

    #[test]
    fn content_chunks_are_counted_and_empty_ones_are_not() {
        let stream = chat_stream(6, None);
        assert_eq!(
            total(Counting::Stream, &[&stream]),
            Counted {
                chunks: 6,
                usage: None
            }
        );
        let stream = chat_stream(4, Some(9));
        assert_eq!(
            total(Counting::Stream, &[&stream]),
            Counted {
                chunks: 4,
                usage: Some(9)
            }
        );
    }

    #[test]
    fn reasoning_text_tool_arguments_and_spaced_json_count() {
        let frame =
            br#"data: {"choices": [{"delta": {"reasoning_content": "hm", "content": null}}]}

data: {"choices":[{"text":" a","index":0}]}

data: {"choices":[{"delta":{"tool_calls":[{"function":{"arguments":"{\"x\""}}]}}]}

data: {"choices":[{"delta":{"content":"\"quoted\""}}]}

data: {"choices":[{"delta":{"content":"say \"content\": \"x\" and \"usage\":"}}]}

data: {"choices" : [{"delta" : {"content" :	"spaced"}}]}

data: {"choices":[{"type":"text","delta":{"content":""}}],"context":"x"}

"#;
        assert_eq!(
            total(Counting::Stream, &[frame]),
            Counted {
                chunks: 6,
                usage: None
            }
        );
    }

    #[test]
    fn usage_needs_a_usage_key_and_whole_answers_count_only_usage() {
        let no_usage = br#"{"completion_tokens": 5, "choices":[{"message":{"content":"hi"}}]}"#;
        assert_eq!(total(Counting::Usage, &[no_usage]), Counted::default());
        let whole = br#"{"choices":[{"message":{"role":"assistant","content":"a b c"}}],"usage": {"prompt_tokens":3, "completion_tokens" : 12,"total_tokens":15}}"#;
        assert_eq!(
            total(Counting::Usage, &[whole]),
            Counted {
                chunks: 0,
                usage: Some(12)
            }
        );
        for cut in 0..=whole.len() {
            let (a, b) = whole.split_at(cut);
            assert_eq!(
                total(Counting::Usage, &[a, b]).usage,
                Some(12),
                "cut at {cut}"
            );
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(total(Counting::Usage, &bytes).usage, Some(12));
        // The count ends the body: a number cut by the end is not reported.
        let cut = br#"{"usage":{"completion_tokens":12"#;
        assert_eq!(total(Counting::Usage, &[cut]).usage, None);
    }

    /// Counts `stream` whole, asserts that is `expected`, and that the stream cut in two
    /// anywhere counts the same; the count.
    fn assert_any_cut_counts(stream: &[u8], expected: Counted) -> Counted {
        let whole = total(Counting::Stream, &[stream]);
        assert_eq!(whole, expected);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(total(Counting::Stream, &[a, b]), whole, "cut at {cut}");
        }
        whole
    }

    #[test]
    fn any_split_of_the_stream_counts_the_same() {
        let stream = chat_stream(5, Some(123));
        let whole = assert_any_cut_counts(
            &stream,
            Counted {
                chunks: 5,
                usage: Some(123),
            },
        );
        for first in 0..stream.len() {
            let (a, rest) = stream.split_at(first);
            let (b, c) = rest.split_at(rest.len().min(3));
            assert_eq!(
                total(Counting::Stream, &[a, b, c]),
                whole,
                "cut at {first} and {}",
                first + 3
            );
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(total(Counting::Stream, &bytes), whole);

        // TabbyAPI-like CRLF framing and spaced JSON, cut anywhere.
        let spaced = b"data: {\"choices\": [{\"delta\": {\"content\" : \"a\"}}]}\r\n\r\ndata: {\"choices\": [], \"usage\" : {\"completion_tokens\" :  17}}\r\n\r\n";
        assert_any_cut_counts(
            spaced,
            Counted {
                chunks: 1,
                usage: Some(17),
            },
        );
    }
}
