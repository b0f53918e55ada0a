//! The telemetry crate's integration tests: the /metrics exposition and the OTLP export.
//! One test binary (one link) for the crate; a module per suite.

mod metrics_exposition;
mod otlp_export;
