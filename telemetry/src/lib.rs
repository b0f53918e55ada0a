//! Observability for the gpuswap daemons: logs, OTLP traces with W3C trace
//! context across processes, and Prometheus metrics. See docs/observability.md.
//!
//! # Logs and traces
//! ```ignore
//! // In main, inside the (multi-thread) tokio runtime; keep the guard until exit.
//! let _telemetry = gpuswap_telemetry::init("gpuswap-gateway", &config.telemetry)?;
//! ```
//! `RUST_LOG` filters (default `info`); `telemetry.log_format` or
//! `GPUSWAP_LOG_FORMAT` picks `text` or `json`; `telemetry.otlp_endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`http://collector:4317`) turns span export on.
//! Without an endpoint no exporter exists and the propagation helpers return at once.
//!
//! # Trace context across processes
//! ```ignore
//! // Client side, inside the span of the call:
//! let mut request = tonic::Request::new(activate);
//! gpuswap_telemetry::inject_grpc(request.metadata_mut());      // gateway -> supervisor
//! gpuswap_telemetry::inject_http(upstream_request.headers_mut()); // gateway -> backend
//!
//! // Server side: a new span, parented *before* it is entered.
//! let span = tracing::info_span!("activate", model = %name);
//! gpuswap_telemetry::set_parent(&span, gpuswap_telemetry::extract_grpc(request.metadata()));
//! async move { ... }.instrument(span).await
//! // (incoming HTTP: `extract_http(request.headers())`)
//! ```
//!
//! # Metrics
//! ```ignore
//! let mut metrics = gpuswap_telemetry::Metrics::new();
//! let gateway = metrics.gateway();          // or metrics.supervisor()
//! let metrics = std::sync::Arc::new(metrics);
//! // Serve `metrics.encode()` with `gpuswap_telemetry::CONTENT_TYPE`, or:
//! let _server = gpuswap_telemetry::serve_metrics(addr, std::sync::Arc::new({
//!     let metrics = metrics.clone();
//!     move || metrics.encode()
//! })).await?;
//!
//! let mut request = gateway.request(model_id);   // queue_depth +1
//! request.forwarding();                          // queue_depth -1, in_flight +1
//! request.first_byte();
//! request.add_tokens(1);                         // per content chunk; or usage_tokens(n)
//! request.finish(200);                           // dropped unfinished: status 499
//! ```

mod init;
mod metrics;
mod propagation;
mod serve;
#[cfg(feature = "testing")]
pub mod testing;

pub use init::{LOG_FORMAT_ENV, OTLP_ENDPOINT_ENV, TelemetryGuard, init, run_with_telemetry};
pub use metrics::{
    CONTENT_TYPE, GatewayMetrics, Metrics, ModelCounts, ModelState, OpenConnection, Refusal,
    RequestMetrics, STATUS_CLIENT_CLOSED, SupervisorMetrics, SwapPhase,
};
pub use propagation::{
    exporting, extract_grpc, extract_http, inject_grpc, inject_http, set_parent,
};
pub use serve::{MetricsServer, Render, serve_metrics};
