//! gpuswap-supervisor: owns the backend processes of one GPU box and decides swaps.
//!
//! Two layers, one folder each:
//! - [`scheduler`]: the one owner of model state. A pure policy (queue, holds, drains,
//!   placement on the GPUs) driven by an actor that carries out its decisions.
//! - [`backend`]: one model's process tree: spawn under a guard, readiness, stop, logs,
//!   ports, GPU memory release, the state file a successor cleans up from.
//!
//! Around them:
//! - [`service`]: the gRPC service over the scheduler.
//! - [`server`]: listeners (Unix socket with mode/group/peer checks, or TLS + token).
//! - [`tls`]: an https listener's certificate (given, or made with a CA of its own) and tokens.

pub mod backend;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod tls;
