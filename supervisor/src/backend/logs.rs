//! Bounded per-model log buffers.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use gpuswap::pb::LogStream;
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt},
    sync::broadcast,
};

/// Lines longer than this keep their prefix and lose the rest, so one endless line
/// (a progress bar without newlines, a binary dump) cannot exhaust memory.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// What follows the kept prefix of a cut line: ` …[truncated N bytes]`.
const TRUNCATED_MARK: &str = " …[truncated ";

/// How many entries a follower may fall behind before it starts losing lines.
const FOLLOWER_BACKLOG: usize = 1024;

/// One captured line.
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub model: Arc<str>,
    pub stream: LogStream,
    pub line: String,
    /// Unix time in milliseconds.
    pub time_ms: u64,
}

/// A model's ring buffer of the last `capacity` lines plus a broadcast for followers.
/// Cheap to clone; pushing never blocks (slow followers lose lines, never the child).
#[derive(Clone)]
pub struct LogBuffer {
    shared: Arc<Shared>,
}

struct Shared {
    model: Arc<str>,
    capacity: usize,
    ring: Mutex<VecDeque<LogEntry>>,
    followers: broadcast::Sender<LogEntry>,
    /// Strings masked in every line before it is kept or followed (the backend's API key
    /// and the other secrets of its configuration, `ModelConfig::secrets`: real servers
    /// print their arguments, and the supervisor logs the command line).
    secrets: Mutex<Vec<String>>,
}

impl LogBuffer {
    pub fn new(model: &str, capacity: usize) -> Self {
        let (followers, _) = broadcast::channel(FOLLOWER_BACKLOG);
        Self {
            shared: Arc::new(Shared {
                model: model.into(),
                capacity,
                ring: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
                followers,
                secrets: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Masks `secrets` (empty ones are ignored) in every line pushed from now on.
    pub fn set_secrets<'a>(&self, secrets: impl IntoIterator<Item = &'a str>) {
        let secrets = secrets
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        *self
            .shared
            .secrets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = secrets;
    }

    pub fn push(&self, stream: LogStream, mut line: String) {
        {
            let secrets = self
                .shared
                .secrets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            line = mask(line, &secrets);
        }
        let entry = LogEntry {
            model: self.shared.model.clone(),
            stream,
            line,
            time_ms: unix_time_ms(),
        };
        // Cloning for followers costs an allocation per line: skip it when nobody follows.
        if self.shared.followers.receiver_count() > 0 {
            let _ = self.shared.followers.send(entry.clone());
        }
        if self.shared.capacity == 0 {
            return;
        }
        let mut ring = self.ring();
        if ring.len() >= self.shared.capacity {
            ring.pop_front();
        }
        ring.push_back(entry);
    }

    /// The last `n` entries, oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogEntry> {
        let ring = self.ring();
        let skip = ring.len().saturating_sub(n);
        ring.iter().skip(skip).cloned().collect()
    }

    /// The text of the last `n` lines, oldest first (for failure reports).
    pub fn tail_lines(&self, n: usize) -> Vec<String> {
        let ring = self.ring();
        let skip = ring.len().saturating_sub(n);
        ring.iter().skip(skip).map(|e| e.line.clone()).collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        self.shared.followers.subscribe()
    }

    /// The model this buffer belongs to.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// The most lines kept.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    fn ring(&self) -> MutexGuard<'_, VecDeque<LogEntry>> {
        // A panic while holding the lock cannot leave the deque inconsistent.
        self.shared.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

const MASK: &str = "***";

/// `line` with every known secret masked, then the values of secret-named
/// flags and variables (`--api-key V`, `--hf-token=V`, `HF_TOKEN=V`) that no
/// configuration named (a wrapper script's, a traceback's). A line cut at
/// [`MAX_LINE_BYTES`] may end inside a secret: a tail that begins one is masked too.
fn mask(line: String, secrets: &[String]) -> String {
    let (text, cut) = match line.rfind(TRUNCATED_MARK) {
        Some(at) if line.ends_with(" bytes]") => line.split_at(at),
        _ => (line.as_str(), ""),
    };
    let mut text = text.to_owned();
    // Longest first (as `ModelConfig::secrets` sorts them): "k1,k2" before "k1".
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), MASK);
        }
    }
    let mut text = mask_secret_arguments(text);
    if !cut.is_empty() {
        let partial = secrets
            .iter()
            .filter_map(|secret| {
                (1..secret.len())
                    .rev()
                    .filter(|&n| secret.is_char_boundary(n))
                    .find(|&n| text.ends_with(&secret[..n]))
            })
            .max();
        if let Some(n) = partial {
            text.truncate(text.len() - n);
            text.push_str(MASK);
        }
        text.push_str(cut);
    }
    text
}

/// Masks the value of each `--NAME V`, `--NAME=V` and `NAME=V` whose name says it
/// is secret (see [`gpuswap::config::is_secret_name`]).
fn mask_secret_arguments(line: String) -> String {
    if !line.contains('=') && !line.contains("--") {
        return line;
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    let mut masked = false;
    let mut value_follows = false;
    while !rest.is_empty() {
        let word_end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, after) = rest.split_at(word_end);
        let space_end = after
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(after.len());
        let (space, next) = after.split_at(space_end);
        if value_follows && !word.is_empty() && !word.starts_with('-') {
            out.push_str(MASK);
            masked = true;
        } else if let Some((name, value)) = word.split_once('=')
            && !value.is_empty()
            && gpuswap::config::is_secret_name(name.trim_start_matches('-'))
        {
            out.push_str(name);
            out.push('=');
            out.push_str(MASK);
            masked = true;
        } else {
            out.push_str(word);
        }
        value_follows = word
            .strip_prefix("--")
            .is_some_and(|flag| !flag.contains('=') && gpuswap::config::is_secret_name(flag));
        out.push_str(space);
        rest = next;
    }
    if masked { out } else { line }
}

fn unix_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Reads `reader` to its end, line by line, calling `on_line` for each line (without its
/// line ending, invalid UTF-8 replaced). A line longer than [`MAX_LINE_BYTES`] keeps its
/// prefix and gets " …[truncated N bytes]" appended. Reading never pauses for the
/// consumer, so the writer never blocks on a full pipe because of us.
pub async fn read_lines<R, F>(mut reader: R, mut on_line: F) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    F: FnMut(String),
{
    let mut line: Vec<u8> = Vec::new();
    let mut dropped: u64 = 0;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            if !line.is_empty() || dropped > 0 {
                on_line(finish_line(&mut line, &mut dropped));
            }
            return Ok(());
        }
        let (part, consumed, complete) = match memchr_newline(chunk) {
            Some(i) => (&chunk[..i], i + 1, true),
            None => (chunk, chunk.len(), false),
        };
        let room = MAX_LINE_BYTES.saturating_sub(line.len());
        let kept = part.len().min(room);
        line.extend_from_slice(&part[..kept]);
        dropped += (part.len() - kept) as u64;
        reader.consume(consumed);
        if complete {
            on_line(finish_line(&mut line, &mut dropped));
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

fn finish_line(line: &mut Vec<u8>, dropped: &mut u64) -> String {
    if *dropped == 0 && line.last() == Some(&b'\r') {
        line.pop();
    }
    let mut text = String::from_utf8_lossy(line).into_owned();
    if *dropped > 0 {
        text.push_str(&format!("{TRUNCATED_MARK}{dropped} bytes]"));
    }
    line.clear();
    *dropped = 0;
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines() {
        let logs = LogBuffer::new("m", 3);
        for i in 0..5 {
            logs.push(LogStream::Stdout, format!("line {i}"));
        }
        assert_eq!(logs.tail_lines(10), ["line 2", "line 3", "line 4"]);
        assert_eq!(logs.tail_lines(1), ["line 4"]);
        assert_eq!(logs.tail(2).len(), 2);
        assert_eq!(&*logs.tail(1)[0].model, "m");
    }

    #[tokio::test]
    async fn secrets_are_masked_for_the_ring_and_followers() {
        let logs = LogBuffer::new("m", 3);
        logs.set_secrets(Some("k3y"));
        let mut follower = logs.subscribe();
        logs.push(LogStream::Stdout, "args: --api-key k3y --port 1".into());
        assert_eq!(logs.tail_lines(1), ["args: --api-key *** --port 1"]);
        assert_eq!(
            follower.recv().await.expect("entry").line,
            "args: --api-key *** --port 1"
        );
    }

    #[test]
    fn secret_arguments_and_cut_secrets_are_masked() {
        let logs = LogBuffer::new("m", 10);
        logs.set_secrets(["k-one,k-two", "hf_abcdefgh", "k-one", "k-two"]);
        let lines = [
            "args: --api-key k-one,k-two --port 1",
            "printed: k-two",
            "wrapper: --hf-token hf_unknown --db-password=pw123 HF_TOKEN=\"xyz\" --max-tokens 8",
            "Namespace(model='m', api_key='other')",
        ];
        for line in lines {
            logs.push(LogStream::Stdout, line.into());
        }
        let mut cut = "x".repeat(MAX_LINE_BYTES - 4);
        cut.push_str("hf_a");
        cut.push_str(&format!("{TRUNCATED_MARK}7 bytes]"));
        logs.push(LogStream::Stdout, cut);
        let kept = logs.tail_lines(10);
        assert_eq!(kept[0], "args: --api-key *** --port 1");
        assert_eq!(kept[1], "printed: ***");
        assert_eq!(
            kept[2],
            "wrapper: --hf-token *** --db-password=*** HF_TOKEN=*** --max-tokens 8"
        );
        assert_eq!(kept[3], "Namespace(model='m', api_key=***");
        assert!(
            kept[4].ends_with(&format!("xx***{TRUNCATED_MARK}7 bytes]")),
            "{}",
            &kept[4][MAX_LINE_BYTES - 10..]
        );
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let logs = LogBuffer::new("m", 3);
        let mut follower = logs.subscribe();
        logs.push(LogStream::Stderr, "hello".into());
        let entry = follower.recv().await.expect("entry");
        assert_eq!(entry.line, "hello");
        assert_eq!(entry.stream, LogStream::Stderr);
    }

    #[tokio::test]
    async fn long_lines_keep_their_prefix() {
        let mut input = vec![b'a'; MAX_LINE_BYTES + 100];
        input.extend_from_slice(b"\nshort\r\nlast");
        let mut lines = Vec::new();
        read_lines(&input[..], |l| lines.push(l))
            .await
            .expect("read");
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with(&"a".repeat(MAX_LINE_BYTES)));
        assert!(
            lines[0].ends_with(" …[truncated 100 bytes]"),
            "{}",
            &lines[0][MAX_LINE_BYTES..]
        );
        assert_eq!(lines[1], "short");
        assert_eq!(lines[2], "last");
    }
}
