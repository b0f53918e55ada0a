//! Process-wide setup: the global `tracing` subscriber (filtered text or JSON
//! logs) and, when an OTLP endpoint is configured, the span exporter.

use std::time::Duration;

use anyhow::{Context as _, bail};
use gpuswap::config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{SpanExporter, WithExportConfig as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer as _, filter::filter_fn, layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

use crate::propagation;

/// Environment variable that chooses the log format when the config does not.
pub const LOG_FORMAT_ENV: &str = "GPUSWAP_LOG_FORMAT";
/// The standard OpenTelemetry variable, used when the config names no endpoint.
pub const OTLP_ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// How long dropping the guard may wait for the last spans to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps the span exporter alive; dropping it flushes the spans still
/// buffered and shuts the exporter down. Hold it in `main` until exit.
#[must_use = "dropping the guard at once shuts the span exporter down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Whether spans are exported (an OTLP endpoint was configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        propagation::set_exporting(false);
        // The export runs on the SDK's own thread, but its gRPC channel is
        // driven by the tokio runtime: a multi-thread runtime keeps driving it
        // while this worker blocks; a current-thread one cannot, hence the bound.
        let shutdown = move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT);
        let result = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(shutdown),
            _ => shutdown(),
        };
        if let Err(error) = result {
            eprintln!("telemetry: flushing spans at exit failed: {error}");
        }
    }
}

/// Installs the global `tracing` subscriber for a daemon.
///
/// - Filter: `RUST_LOG` (default `info`).
/// - Format: `cfg.log_format`, else `GPUSWAP_LOG_FORMAT`: `text` (default) or `json`, on stderr.
/// - Traces: with `cfg.otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`, spans are
///   batched to that OTLP/gRPC collector (`http://host:4317`) with
///   `service.name = service`. Without an endpoint no exporter is built.
///
/// Call it once, inside the tokio runtime (a multi-thread one), and keep the
/// guard until exit.
pub fn init(service: &'static str, cfg: &TelemetryConfig) -> anyhow::Result<TelemetryGuard> {
    let format = log_format(cfg)?;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|error| match std::env::var_os(EnvFilter::DEFAULT_ENV) {
            // A RUST_LOG that does not parse is a mistake to report, not to ignore.
            Some(_) => Err(error),
            None => Ok(EnvFilter::new("info")),
        })
        .context("RUST_LOG")?;
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };

    let provider = match otlp_endpoint(cfg) {
        Some((endpoint, source)) => Some(tracer_provider(service, &endpoint, source)?),
        None => None,
    };
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service))
            // The exporter's own transport must not be traced: its spans would
            // be exported in turn, without end.
            .with_filter(filter_fn(|meta| !is_exporter_transport(meta.target())))
    });

    tracing_subscriber::registry()
        .with(filter)
        .with(fmt_layer)
        .with(otel_layer)
        .try_init()
        .context("a global tracing subscriber is already installed")?;
    propagation::set_exporting(provider.is_some());
    Ok(TelemetryGuard { provider })
}

/// Runs a daemon: `run`'s future on a multi-thread runtime, with the telemetry of `cfg`
/// installed inside it ([`init`]) for `service`.
pub fn run_with_telemetry<F: Future<Output = anyhow::Result<()>>>(
    service: &'static str,
    cfg: &TelemetryConfig,
    run: impl FnOnce() -> F,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let _runtime_context = runtime.enter();
    // Declared after the runtime, so it is dropped first: its last spans are
    // flushed while the runtime still drives the exporter.
    let _telemetry = init(service, cfg)?;
    runtime.block_on(run())
}

fn log_format(cfg: &TelemetryConfig) -> anyhow::Result<LogFormat> {
    if let Some(format) = cfg.log_format {
        return Ok(format);
    }
    match std::env::var(LOG_FORMAT_ENV) {
        Ok(text) if !text.trim().is_empty() => text.parse().context(LOG_FORMAT_ENV),
        _ => Ok(LogFormat::default()),
    }
}

/// The endpoint and where it came from (for error messages).
fn otlp_endpoint(cfg: &TelemetryConfig) -> Option<(String, &'static str)> {
    let configured = cfg
        .otlp_endpoint
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    if let Some(endpoint) = configured {
        return Some((endpoint.to_owned(), "telemetry.otlp_endpoint"));
    }
    std::env::var(OTLP_ENDPOINT_ENV)
        .ok()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .map(|e| (e, OTLP_ENDPOINT_ENV))
}

fn tracer_provider(
    service: &'static str,
    endpoint: &str,
    source: &str,
) -> anyhow::Result<SdkTracerProvider> {
    if tokio::runtime::Handle::try_current().is_err() {
        bail!("telemetry::init must run inside the tokio runtime when {source} is set");
    }
    let exporter = SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .with_context(|| format!("{source}: cannot export spans to {endpoint:?}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}

fn is_exporter_transport(target: &str) -> bool {
    ["h2", "hyper", "tonic", "tower", "opentelemetry"]
        .iter()
        .any(|prefix| {
            target.strip_prefix(prefix).is_some_and(|rest| {
                rest.is_empty() || rest.starts_with("::") || rest.starts_with('_')
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exporter_transport_targets() {
        assert!(is_exporter_transport("h2::proto::connection"));
        assert!(is_exporter_transport("hyper_util::client"));
        assert!(is_exporter_transport("tonic"));
        assert!(is_exporter_transport("opentelemetry_sdk::trace"));
        assert!(!is_exporter_transport("gpuswap_gateway::proxy"));
        assert!(!is_exporter_transport("h2o"));
    }

    #[test]
    fn the_configured_format_wins() {
        let cfg = TelemetryConfig {
            log_format: Some(LogFormat::Json),
            otlp_endpoint: None,
        };
        assert_eq!(log_format(&cfg).unwrap(), LogFormat::Json);
    }

    #[test]
    fn configured_endpoint_is_used() {
        let cfg = TelemetryConfig {
            log_format: None,
            otlp_endpoint: Some(" http://collector:4317 ".into()),
        };
        assert_eq!(
            otlp_endpoint(&cfg),
            Some(("http://collector:4317".into(), "telemetry.otlp_endpoint"))
        );
    }
}
