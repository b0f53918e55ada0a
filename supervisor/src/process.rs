//! Backend processes: spawn under a guard, probe readiness, stop the whole tree. (owner: process layer)
//!
//! Interface used by the scheduler; keep these signatures.

use std::{path::PathBuf, sync::Arc, time::Duration};

use gpuswap::config::ModelConfig;

use crate::logs::LogBuffer;

/// Everything needed to start one model.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub model: String,
    pub config: ModelConfig,
    /// The supervisor's own executable, run as `guard` to parent the backend.
    pub guard_exe: PathBuf,
    /// How long a stop waits for the GPU memory of the stopped processes to be freed.
    pub gpu_release_timeout: Duration,
}

/// How a backend process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown exit"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("port {port} is already in use{detail} ; is another server running?")]
    PortBusy { port: u16, detail: String },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    #[error("backend exited while starting ({0})")]
    Exited(ExitInfo),
    #[error("backend not ready after {0:?} (startup_timeout)")]
    Timeout(Duration),
}

/// A running (or exited) backend. Cheap to clone: every clone refers to the same process tree.
#[derive(Clone)]
pub struct Backend {
    _todo: Arc<()>,
}

impl Backend {
    /// Checks the port is free, spawns the guard and the backend in a new process group,
    /// and starts capturing stdout/stderr into `logs`. Returns once spawned.
    pub fn spawn(_spec: &LaunchSpec, _logs: LogBuffer) -> Result<Backend, StartError> {
        unimplemented!()
    }
    /// The backend's pid (the guard's child).
    pub fn pid(&self) -> u32 {
        unimplemented!()
    }
    /// The process group (the guard's pid).
    pub fn pgid(&self) -> i32 {
        unimplemented!()
    }
    /// Resolves once the process tree has exited, by itself or by a stop. Cancel-safe.
    pub async fn exited(&self) -> ExitInfo {
        unimplemented!()
    }
    /// The exit, if it already happened.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        unimplemented!()
    }
    /// Probes readiness for the model's kind until ready. Fails at once when the process
    /// exits, or after startup_timeout.
    pub async fn wait_ready(&self) -> Result<(), StartError> {
        unimplemented!()
    }
    /// SIGTERM to the group, SIGKILL after stop_timeout, reap, then wait (bounded) until the
    /// port is free and the GPU memory released. Idempotent; concurrent calls share one stop.
    pub async fn stop(&self) -> ExitInfo {
        unimplemented!()
    }
}
