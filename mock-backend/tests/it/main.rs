//! The mock backend's integration tests: that its start-up, API and faults behave like the real servers'.
//! One test binary (one link) for the crate; a module per suite.

mod common;

mod api;
mod faults;
mod processes;
mod readiness;
mod sleep;
