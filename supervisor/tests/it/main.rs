//! The supervisor's integration tests: the daemon over its gRPC socket, and its backend layer directly (`process_*`).
//! One test binary (one link) for the crate; a module per suite.

mod common;
mod process_support;

mod access;
mod basic;
mod faults;
mod holds;
mod lifecycle;
mod logging;
mod metrics;
mod process_gpu;
mod process_logs;
mod process_ready;
mod process_tree;
mod trace_context;
