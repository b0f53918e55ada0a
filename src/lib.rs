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
    }
}
