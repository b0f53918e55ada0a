//! W3C trace context (`traceparent`/`tracestate`) across process boundaries:
//! gateway → supervisor over gRPC metadata, client → gateway and gateway →
//! backend over HTTP headers.
//!
//! Every helper first reads one relaxed atomic flag and returns at once when
//! no exporter is configured, so the gateway's hot path pays nothing then.

use std::sync::{
    LazyLock,
    atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator as _},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

static EXPORTING: AtomicBool = AtomicBool::new(false);
static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

pub(crate) fn set_exporting(on: bool) {
    EXPORTING.store(on, Ordering::Relaxed);
}

/// Whether spans are being exported (set by [`crate::init`] when an OTLP
/// endpoint is configured). Use it to skip building tracing-only data.
#[inline]
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Writes the current span's trace context into outgoing gRPC metadata.
/// Call it inside the span of the outgoing call (e.g. on `tonic::Request::metadata_mut()`).
#[inline]
pub fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
    if exporting() {
        let cx = tracing::Span::current().context();
        PROPAGATOR.inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// Reads the caller's trace context from incoming gRPC metadata; pass it to
/// [`set_parent`]. An empty context when nothing is exported.
#[inline]
pub fn extract_grpc(metadata: &tonic::metadata::MetadataMap) -> Context {
    if !exporting() {
        return Context::new();
    }
    PROPAGATOR.extract(&MetadataExtractor(metadata))
}

/// Writes the current span's trace context (`traceparent`, `tracestate`) into
/// the headers of an outgoing HTTP request.
#[inline]
pub fn inject_http(headers: &mut http::HeaderMap) {
    if exporting() {
        let cx = tracing::Span::current().context();
        PROPAGATOR.inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// Reads a client's trace context from incoming HTTP headers; pass it to
/// [`set_parent`]. An empty context when nothing is exported.
#[inline]
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    if !exporting() {
        return Context::new();
    }
    PROPAGATOR.extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the remote `parent` (from [`extract_grpc`] or
/// [`extract_http`]).
///
/// `span` must not have been entered yet: create it, call this, then
/// `.instrument(span)` (a span started by `#[instrument]` is too late).
/// A context without a valid remote span leaves `span` a new trace root.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if !exporting() {
        return;
    }
    if let Err(error) = span.set_parent(parent) {
        tracing::debug!(%error, "cannot attach the remote trace context");
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let key = tonic::metadata::MetadataKey::from_bytes(key.as_bytes());
        let value = tonic::metadata::MetadataValue::try_from(value.as_str());
        if let (Ok(key), Ok(value)) = (key, value) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        let name = http::HeaderName::from_bytes(key.as_bytes());
        let value = http::HeaderValue::try_from(value);
        if let (Ok(name), Ok(value)) = (name, value) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt as _;

    use super::*;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    // The carriers are tested directly: the exporting flag is process-wide,
    // and flipping it here would race the other unit tests.
    #[test]
    fn http_and_grpc_carriers_round_trip_traceparent() {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", TRACEPARENT.parse().unwrap());
        let cx = PROPAGATOR.extract(&HeaderExtractor(&headers));
        let span = cx.span();
        assert_eq!(
            span.span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(span.span_context().is_remote());

        let mut metadata = tonic::metadata::MetadataMap::new();
        PROPAGATOR.inject_context(&cx, &mut MetadataInjector(&mut metadata));
        assert_eq!(metadata.get("traceparent").unwrap(), TRACEPARENT);
        let back = PROPAGATOR.extract(&MetadataExtractor(&metadata));
        assert_eq!(
            back.span().span_context().span_id().to_string(),
            "00f067aa0ba902b7"
        );

        let mut outgoing = http::HeaderMap::new();
        PROPAGATOR.inject_context(&back, &mut HeaderInjector(&mut outgoing));
        assert_eq!(outgoing.get("traceparent").unwrap(), TRACEPARENT);
    }

    #[test]
    fn helpers_do_nothing_without_an_exporter() {
        // No unit test calls `init`, so the flag is off in this process.
        assert!(!exporting());
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", TRACEPARENT.parse().unwrap());
        assert!(!extract_http(&headers).has_active_span());
        let mut outgoing = http::HeaderMap::new();
        inject_http(&mut outgoing);
        assert!(outgoing.is_empty());
        let mut metadata = tonic::metadata::MetadataMap::new();
        inject_grpc(&mut metadata);
        assert!(metadata.is_empty());
    }
}
