//! Bounded per-model log buffers. (owner: process layer)
//!
//! Interface used by the scheduler and the gRPC service; keep these signatures.

use std::sync::Arc;

use gpuswap::pb::LogStream;
use tokio::sync::broadcast;

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
    _todo: Arc<()>,
}

impl LogBuffer {
    pub fn new(_model: &str, _capacity: usize) -> Self {
        unimplemented!()
    }
    pub fn push(&self, _stream: LogStream, _line: String) {
        unimplemented!()
    }
    /// The last `n` entries, oldest first.
    pub fn tail(&self, _n: usize) -> Vec<LogEntry> {
        unimplemented!()
    }
    /// The text of the last `n` lines, oldest first (for failure reports).
    pub fn tail_lines(&self, _n: usize) -> Vec<String> {
        unimplemented!()
    }
    pub fn subscribe(&self) -> broadcast::Receiver<LogEntry> {
        unimplemented!()
    }
}
