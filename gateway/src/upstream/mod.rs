//! Keep-alive HTTP/1.1 connections to one backend, each driven by the request
//! that uses it.
//!
//! A pooled client that runs every connection in a task of its own makes each
//! request, response and body chunk cross between tasks, and hands a stream's
//! events to the server one at a time: one write to the client per token.
//! Here the request's own task polls its connection, so a response costs no
//! task hop, and every event already read from the backend is taken in the
//! same pass: the server writes them to the client together, as nginx does.
//!
//! One pool per route (per backend generation): a replaced backend's idle
//! connections go with its route and are never tried against its successor.
//!
//! The files:
//! - `conn`: one connection, counting what it wrote, driven by whoever uses it.
//! - `pool`: a backend's idle connections, and sending a request over one.
//! - `body`: the answer's body, which drives its connection and gives it back.

mod body;
mod conn;
mod pool;
#[cfg(test)]
mod tests;

use std::time::Duration;

use http::uri::Authority;

pub use body::UpstreamBody;
pub use pool::ConnPool;

/// How often [`ConnPool::close_stale`] is due.
pub const IDLE_SWEEP: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer from the backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {authority}: {source}")]
    Connect {
        authority: Authority,
        source: std::io::Error,
    },
    #[error("cannot connect to {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    /// The connection failed before an answer's head.
    #[error("{}", if *delivered {
        "the connection failed after the whole request was sent"
    } else {
        "the connection failed before the whole request was sent"
    })]
    Http {
        source: hyper::Error,
        /// Every byte of the request was written: the backend may have read
        /// it and started a generation, so it must not be sent again.
        delivered: bool,
    },
}

impl UpstreamError {
    /// Whether the backend may have seen the request whole (sending it again
    /// could run it twice); false when it cannot have.
    pub fn delivered(&self) -> bool {
        matches!(
            self,
            UpstreamError::Http {
                delivered: true,
                ..
            }
        )
    }
}
