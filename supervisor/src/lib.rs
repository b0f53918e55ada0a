//! gpuswap-supervisor: owns the backend processes of one GPU box and decides swaps.
//!
//! - [`process`]: spawn a backend under a [`guard`], stop its whole tree, report its exit.
//! - [`guard`]: the tiny parent of every backend; kills all descendants when the backend
//!   exits, when told to stop, or when the supervisor dies.
//! - [`probe`]: readiness per backend kind (port, health codes, ready log line).
//! - [`load_progress`]: a load's progress from the backend's own output; recent load times.
//! - [`logs`]: bounded per-model log ring buffers with followers.
//! - [`state_file`]: records live process groups; a restarted supervisor ends leftovers.
//! - [`gpu`]: after a stop, waits until the stopped processes left the GPUs (NVML, if any).
//! - [`warm`]: reads the next model's weight files into the page cache during a swap.
//! - [`scheduler`]: the one owner of model state: queue, holds, drains, min residency.
//! - [`service`]: the gRPC service over the scheduler.
//! - [`server`]: listeners (Unix socket with mode/group/peer checks, or TLS + token).
//! - [`tls`]: an https listener's certificate (given, or made with a CA of its own) and tokens.

pub mod gpu;
pub mod guard;
pub mod load_progress;
pub mod logs;
pub mod probe;
pub mod process;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state_file;
pub mod tls;
pub mod warm;
