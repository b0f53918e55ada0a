//! Why a backend did not start.

use std::time::Duration;

use super::ExitInfo;

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
    /// Something answered the readiness probe, but the socket listening on the port is
    /// another process's (a server started on the port while this one loaded).
    #[error(
        "port {port} answered the readiness probe, but it is held by {holder}, not by the model's processes"
    )]
    PortTaken { port: u16, holder: String },
    #[error("backend exited while starting ({0})")]
    Exited(ExitInfo),
    /// It passed its readiness check, then its leader was gone before it could be Ready.
    #[error("backend exited right after passing its readiness check ({0})")]
    ExitedAfterReady(String),
    #[error("backend not ready after {0:?} (startup_timeout)")]
    Timeout(Duration),
    /// The process ran for the whole startup_timeout but nothing ever listened on its
    /// port (TabbyAPI silently moves to port+1 when its port is busy).
    #[error(
        "backend not ready after {timeout:?} (startup_timeout): it kept running but nothing ever listened on port {port}{hint}"
    )]
    NotListening {
        port: u16,
        timeout: Duration,
        hint: String,
    },
}
