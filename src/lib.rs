//! The gpuswap API crate: everything a supervisor client or server shares.
//!
//! - [`pb`]: the generated gRPC code for `proto/gpuswap/v1/supervisor.proto`.
//! - [`endpoint`]: `unix:///path` and `https://host:port` targets behind one string.
//! - [`auth`]: the bearer-token interceptor (client side) and its constant-time check (server side).
//! - [`client`]: connect to a supervisor from an endpoint string.
//! - [`tls`]: the client's TLS: CA or pinned certificate, refusals explained.
//! - [`config`]: the one TOML configuration file, loaded in layers and validated.
//! - [`shutdown`]: the stop signal the daemons share.
//! - [`etcd`]: leases, prefix watches and elections in etcd (box registration, pickers).

pub mod auth;
pub mod client;
pub mod config;
pub mod endpoint;
pub mod etcd;
pub mod shutdown;
pub mod sleep;
pub mod tls;

/// Generated protocol code.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("gpuswap.v1");

    /// The encoded descriptor set, served by grpc.reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/gpuswap_descriptor.bin"));
}

pub use client::{ClientOptions, Keepalive, SupervisorClient, connect};
pub use endpoint::Endpoint;

/// An error and its sources, `: `-separated: what a typed error with a source says in one line
/// (a log field, a gRPC status message, an HTTP error body).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Human-readable name of a model state (`ready`, `starting`, ...).
pub fn state_name(state: pb::ModelState) -> &'static str {
    use pb::ModelState as S;
    match state {
        S::Unspecified => "unknown",
        S::Stopped => "stopped",
        S::Starting => "starting",
        S::Ready => "ready",
        S::Stopping => "stopping",
        S::Failed => "failed",
        S::Unavailable => "unavailable",
        S::Sleeping => "sleeping",
    }
}

/// Shell-style matching: `*` any run of characters, `?` one character, the rest literal.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was and the text position it is tried at: backtrack there.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A load's progress in words, the same for every client: "45 % (9/20 shards), about 25 s
/// left; last loads took 52 s". Empty when nothing is known beyond the elapsed time.
pub fn progress_text(progress: &pb::LoadProgress) -> String {
    let mut parts = Vec::new();
    match (progress.percent, progress.detail.is_empty()) {
        (Some(percent), true) => parts.push(format!("{percent:.0} %")),
        (Some(percent), false) => parts.push(format!("{percent:.0} % ({})", progress.detail)),
        (None, false) => parts.push(progress.detail.clone()),
        (None, true) => {}
    }
    let mut text = parts.join("");
    let seconds = |ms: u64| ms.div_ceil(1000);
    let mut estimate = Vec::new();
    if let Some(eta) = progress.eta_ms {
        estimate.push(format!("about {} s left", seconds(eta)));
    }
    if progress.typical_ms > 0 {
        let noun = if progress.phase == "waking" {
            "wakes"
        } else {
            "loads"
        };
        estimate.push(format!(
            "last {noun} took {} s",
            seconds(progress.typical_ms)
        ));
    }
    if !estimate.is_empty() {
        if !text.is_empty() {
            text.push_str(", ");
        }
        text.push_str(&estimate.join("; "));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_text_says_what_is_known() {
        let mut p = pb::LoadProgress {
            model: "m".into(),
            phase: "loading".into(),
            percent: Some(45.0),
            detail: "9/20 shards".into(),
            elapsed_ms: 20_000,
            eta_ms: Some(24_500),
            typical_ms: 52_000,
        };
        assert_eq!(
            progress_text(&p),
            "45 % (9/20 shards), about 25 s left; last loads took 52 s"
        );
        p.detail.clear();
        p.typical_ms = 0;
        assert_eq!(progress_text(&p), "45 %, about 25 s left");
        p.percent = None;
        p.eta_ms = None;
        assert_eq!(progress_text(&p), "");
        p.phase = "waking".into();
        p.typical_ms = 1_200;
        assert_eq!(progress_text(&p), "last wakes took 2 s");
    }
}
