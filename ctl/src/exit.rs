//! Exit codes scripts can trust, and the mapping from errors to them.
//!
//! Commands return `Ok(code)` when they ran to the end (even if the outcome
//! was a failure they already reported, like a failed activation) and `Err`
//! when something stopped them; [`classify`] turns such an error into a code
//! and one clear message.

use std::{io, process::ExitCode};

use gpuswap::Endpoint;
use tonic::Code as Grpc;

/// The documented exit codes (see [`HELP`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Success = 0,
    Failed = 1,
    Usage = 2,
    Unreachable = 3,
    UnknownModel = 4,
    Denied = 5,
    /// 128 + SIGINT, as shells report a command ended by Ctrl-C.
    Interrupted = 130,
}

impl From<Code> for ExitCode {
    fn from(code: Code) -> Self {
        ExitCode::from(code as u8)
    }
}

/// The exit code section of `--help`.
pub const HELP: &str = "\
Exit codes:
  0    success
  1    the operation failed (activation failed, hold lost, model failed, supervisor error)
  2    usage or configuration error (bad arguments, unreadable token or CA file)
  3    supervisor unreachable (socket missing, connection refused)
  4    unknown model
  5    permission or authentication denied
  130  interrupted (Ctrl-C) before the operation finished";

/// An error that already knows its exit code (usage and configuration problems
/// found by gpuswapctl itself, an unknown model found in a Status snapshot).
#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code and the message for an error that ended a command.
/// `None` as message: exit quietly (stdout was closed by a pager or `head`).
pub fn classify(error: &anyhow::Error, endpoint: &Endpoint) -> (Code, Option<String>) {
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return (failure.code, Some(failure.message.clone()));
        }
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            let (code, message) = from_status(status, endpoint);
            return (code, Some(message));
        }
        if let Some(io) = cause.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::BrokenPipe
        {
            return (Code::Success, None);
        }
    }
    (Code::Failed, Some(format!("{error:#}")))
}

/// Maps a gRPC status to an exit code and a message that says what to do.
pub fn from_status(status: &tonic::Status, endpoint: &Endpoint) -> (Code, String) {
    match status.code() {
        Grpc::Unavailable => unreachable_message(status, endpoint),
        Grpc::NotFound => (Code::UnknownModel, status.message().to_owned()),
        Grpc::Unauthenticated => (
            Code::Denied,
            format!(
                "authentication denied by the supervisor at {endpoint}: {} \
                 (check --token-file / GPUSWAP_TOKEN_FILE)",
                status.message()
            ),
        ),
        Grpc::PermissionDenied => (
            Code::Denied,
            format!(
                "permission denied by the supervisor at {endpoint}: {}",
                status.message()
            ),
        ),
        Grpc::InvalidArgument => (Code::Usage, status.message().to_owned()),
        code => (
            Code::Failed,
            format!(
                "supervisor error ({}): {}",
                code.description(),
                status.message()
            ),
        ),
    }
}

/// A connection failure: tonic reports it as `Unavailable`, with the socket's
/// own error somewhere in the source chain.
fn unreachable_message(status: &tonic::Status, endpoint: &Endpoint) -> (Code, String) {
    let hint = "is gpuswap-supervisor running? (set --endpoint or GPUSWAP_ENDPOINT)";
    let unreachable = |why: String| {
        (
            Code::Unreachable,
            format!("cannot reach the supervisor at {endpoint}: {why}"),
        )
    };
    let socket = match endpoint {
        Endpoint::Unix(path) => Some(path.display().to_string()),
        Endpoint::Https { .. } => None,
    };
    match io_error_kind(status) {
        Some(io::ErrorKind::NotFound) => unreachable(match socket {
            Some(path) => format!("no socket at {path}; {hint}"),
            None => format!("not found; {hint}"),
        }),
        Some(io::ErrorKind::ConnectionRefused) => {
            unreachable(format!("connection refused; {hint}"))
        }
        Some(io::ErrorKind::PermissionDenied) => (
            Code::Denied,
            match socket {
                Some(path) => format!(
                    "permission denied connecting to {path}: is your user in the socket's group?"
                ),
                None => format!("permission denied connecting to {endpoint}"),
            },
        ),
        // A refused certificate's cause already says what to do (gpuswap::tls::explain).
        _ => unreachable(root_cause(status)),
    }
}

fn io_error_kind(status: &tonic::Status) -> Option<io::ErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<io::Error>() {
            return Some(io.kind());
        }
        source = error.source();
    }
    None
}

/// The most specific cause: the innermost error of the chain (why a certificate was
/// refused, or "connection reset", rather than "transport error").
fn root_cause(status: &tonic::Status) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = status;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        "unix:///tmp/x.sock".parse().unwrap()
    }

    #[test]
    fn grpc_codes_map_to_documented_exit_codes() {
        let cases = [
            (
                tonic::Status::not_found("unknown model x"),
                Code::UnknownModel,
            ),
            (tonic::Status::unauthenticated("bad token"), Code::Denied),
            (tonic::Status::permission_denied("uid 1000"), Code::Denied),
            (tonic::Status::unavailable("connect"), Code::Unreachable),
            (tonic::Status::invalid_argument("model or all"), Code::Usage),
            (tonic::Status::internal("boom"), Code::Failed),
        ];
        for (status, expected) in cases {
            let error = anyhow::Error::new(status);
            assert_eq!(classify(&error, &endpoint()).0, expected, "{error}");
        }
    }

    #[test]
    fn a_failure_keeps_its_code_under_context() {
        let error = anyhow::Error::new(Failure::new(Code::UnknownModel, "unknown model q"))
            .context("status");
        assert_eq!(classify(&error, &endpoint()).0, Code::UnknownModel);
    }

    #[test]
    fn a_closed_stdout_exits_quietly() {
        let error = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(classify(&error, &endpoint()), (Code::Success, None));
    }
}
