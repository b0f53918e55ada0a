//! gpuswapctl's integration tests: the CLI itself and against a real supervisor.
//! One test binary (one link) for the crate; a module per suite.

mod common;

mod cli;
mod supervisor;
