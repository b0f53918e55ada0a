//! What the HTTP handlers share with the start-up sequence.

use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};

use crate::cli::{Args, Flavor};

/// Where the server is in its start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading weights (only llama-server listens in this phase).
    Loading = 0,
    /// Listening but not ready: SGLang's warm-up, TabbyAPI with no model loaded.
    Warming = 1,
    Ready = 2,
}

pub struct Shared {
    pub args: Args,
    pub pid: u32,
    phase: AtomicU8,
    /// The port actually bound (TabbyAPI moves to port+1 when the port is busy).
    port: AtomicU16,
    request_seq: AtomicU64,
    /// Completion requests read so far (for the `hang-up:N` fault).
    completions: AtomicU64,
    /// What of the model's GPU memory a sleep released (see `sleep.rs`).
    pub memory: tokio::sync::watch::Sender<crate::sleep::Memory>,
    /// Completion requests being answered now.
    pub in_flight: AtomicU64,
    /// Milliseconds since `started` of the last completion request's start or end
    /// (llama-server's idle sleep counts from it).
    pub last_activity_ms: AtomicU64,
    pub started: std::time::Instant,
    /// Completion requests that arrived while the model slept or had lost its weights, and
    /// sleeps asked for while requests ran: a swapper should cause neither.
    pub requests_while_asleep: AtomicU64,
    pub sleeps_while_busy: AtomicU64,
    /// Sent by a vLLM sleep with `mode=abort`: requests that began before it end at once.
    pub abort: tokio::sync::watch::Sender<()>,
    /// One sleep or wake at a time.
    pub transition: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn new(args: Args) -> Self {
        let port = args.port;
        Self {
            args,
            pid: std::process::id(),
            phase: AtomicU8::new(Phase::Loading as u8),
            port: AtomicU16::new(port),
            request_seq: AtomicU64::new(0),
            completions: AtomicU64::new(0),
            memory: tokio::sync::watch::Sender::new(crate::sleep::Memory::default()),
            in_flight: AtomicU64::new(0),
            requests_while_asleep: AtomicU64::new(0),
            sleeps_while_busy: AtomicU64::new(0),
            abort: tokio::sync::watch::Sender::new(()),
            last_activity_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            transition: tokio::sync::Mutex::new(()),
        }
    }

    pub fn flavor(&self) -> Flavor {
        self.args.flavor
    }

    pub fn model(&self) -> &str {
        &self.args.model
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Loading,
            1 => Phase::Warming,
            _ => Phase::Ready,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }

    pub fn set_port(&self, port: u16) {
        self.port.store(port, Ordering::SeqCst);
    }

    /// Counts a completion request read; its number, from 1.
    pub fn completion_read(&self) -> u64 {
        self.completions.fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn next_request(&self) -> u64 {
        self.request_seq.fetch_add(1, Ordering::Relaxed)
    }
}
