//! Test support (feature `testing`): an in-process OTLP/gRPC trace receiver,
//! standing in for a collector so tests can check the spans that the daemons export.
//!
//! ```ignore
//! let receiver = OtlpReceiver::start().await?;
//! // start daemons with OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint() ...
//! let span = receiver
//!     .wait_for_span(testkit::DEADLINE, |s| s.service_name == "gpuswap-gateway")
//!     .await?;
//! ```

use std::{net::SocketAddr, time::Duration};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::wrappers::TcpListenerStream;

/// One received span, flattened for assertions. Ids are lowercase hex.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedSpan {
    /// The resource's `service.name`.
    pub service_name: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// The span's attributes, values rendered as text.
    pub attributes: Vec<(String, String)>,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    #[error("cannot bind the OTLP receiver: {0}")]
    Bind(#[from] std::io::Error),
    #[error("no matching span after {waited:?}; received: {received:#?}")]
    Timeout {
        waited: Duration,
        received: Vec<ReceivedSpan>,
    },
}

/// An OTLP/gRPC trace collector on 127.0.0.1 (a port of its own); it stops when dropped.
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: watch::Receiver<Vec<ReceivedSpan>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    pub async fn start() -> Result<Self, ReceiverError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (sender, spans) = watch::channel(Vec::new());
        let service = TraceServiceServer::new(Collector { spans: sender });
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "OTLP test receiver stopped");
            }
        });
        Ok(Self { addr, spans, task })
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT` / `telemetry.otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.borrow().clone()
    }

    /// Waits until a received span matches `matches`, and returns it.
    pub async fn wait_for_span(
        &self,
        deadline: Duration,
        matches: impl Fn(&ReceivedSpan) -> bool,
    ) -> Result<ReceivedSpan, ReceiverError> {
        let mut spans = self.spans.clone();
        let found =
            tokio::time::timeout(deadline, spans.wait_for(|spans| spans.iter().any(&matches)))
                .await;
        match found {
            Ok(Ok(spans)) => Ok(spans
                .iter()
                .find(|span| matches(span))
                .cloned()
                .expect("wait_for saw a match")),
            // The collector lives in `self.task`, so the sender outlives this wait;
            // either way, report what arrived.
            _ => Err(ReceiverError::Timeout {
                waited: deadline,
                received: self.spans(),
            }),
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Collector {
    spans: watch::Sender<Vec<ReceivedSpan>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .map(|kv| value_text(kv.value.as_ref()))
                .unwrap_or_default();
            for span in resource_spans
                .scope_spans
                .into_iter()
                .flat_map(|scope| scope.spans)
            {
                received.push(ReceivedSpan {
                    service_name: service_name.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes: span.attributes.iter().map(attribute_text).collect(),
                });
            }
        }
        self.spans.send_modify(|spans| spans.extend(received));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attribute_text(kv: &KeyValue) -> (String, String) {
    (kv.key.clone(), value_text(kv.value.as_ref()))
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
