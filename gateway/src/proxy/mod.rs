//! The hot path: read the body once, find the model without building a JSON
//! tree, take a route from the lock-free table, forward over a pooled
//! keep-alive connection and stream the answer back untouched.
//!
//! The files, in the order a request goes through them:
//! - `request`: `POST /v1/*`: access, body, model, then dispatch; Anthropic-shaped errors.
//! - `passthrough`: `/upstream/{model}/{path}`, the backend's own API behind the same rules.
//! - `body`: the request body read once, within the gateway's limits.
//! - `probe`: the model (and `stream`) found in a JSON or multipart body, renamed in place.
//! - `dispatch`: wait for a route, forward, retry when a backend died before answering.
//! - `forward`: the upstream request built, sent, and its answer (or error) passed back.
//! - `guarded`: the answer's body, holding the request's in-flight count to its end.

mod body;
mod dispatch;
mod forward;
mod guarded;
mod passthrough;
mod probe;
mod request;

pub use body::{BodyError, read_body};
pub use forward::{
    BodyShape, Forwarded, Upstream, add_event_stream_headers, event_stream_response, forward,
    forward_stream,
};
pub use guarded::GuardedBody;
pub use passthrough::{PASSTHROUGH_PREFIX, handle_passthrough};
pub use probe::{Probed, probe, probe_form, splice};
pub use request::handle;

/// How much of a backend's error body is read to convert it.
pub(super) const ERROR_BODY_LIMIT: usize = 1 << 20;
