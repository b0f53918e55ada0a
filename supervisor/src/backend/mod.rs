//! The backend layer: one model's process tree, from spawn to stop.
//!
//! The supervisor never runs a backend itself: it runs `gpuswap-supervisor guard -- CMD`
//! (see [`guard`]) in a new process group with a parent-death signal, and the guard runs
//! the backend. One owner task per backend waits for the guard (never `waitpid(-1)`: that
//! would steal tokio's statuses) and publishes the exit on a watch channel.
//!
//! One job per file:
//! - [`Backend`] (`handle`): the handle on a tree: pids, exit, the processes seen in it.
//! - `spawn`: checks, the guard's launch (`guard_launch`, on the `forker` thread), output
//!   captured into [`logs`], the owner task.
//! - `readiness`: probe (see [`probe`]) until ready, exited or out of startup_timeout.
//! - `stop`: SIGTERM, SIGKILL, reap, orphans, then the port and [`gpu`] memory freed.
//! - `ports`, `env`, [`process_tree`]: port checks and holders, the backend's environment,
//!   process relations from /proc.
//! - [`guard`]: the guard process itself. [`state_file`]: live groups for a successor.
//! - [`load_progress`]: a load's progress from the output; [`warm`]: weights into the page
//!   cache during a swap.
//! - [`sleep`]: a sleeping model's protocol sent to its backend (sleep, wake) over HTTP.

mod env;
mod error;
mod forker;
pub mod gpu;
pub mod guard;
mod guard_launch;
mod handle;
pub mod load_progress;
pub mod logs;
mod ports;
pub mod probe;
pub mod process_tree;
mod readiness;
pub mod sleep;
mod spawn;
pub mod state_file;
mod stop;
pub mod warm;

pub use error::StartError;
pub use handle::{Backend, ExitInfo};
use handle::{Inner, UNKNOWN_EXIT};
pub use spawn::LaunchSpec;
