//! The gateway's integration tests: the real gateway with a real supervisor and mock backends.
//! One test binary (one link) for the crate; a module per suite.

mod common;
mod fuzz_props;

mod access;
mod api;
mod cli;
mod connections;
mod fuzz_parse;
mod hardening;
mod observability;
mod operator;
mod passthrough;
mod swap;
mod ui;
mod waiting;
