//! The answer's body on its way to the client: counted (tokens, first byte, status) and
//! holding the request's in-flight count until it ends or the client goes away.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use gpuswap::error_chain;
use gpuswap_telemetry::RequestMetrics;
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tracing::Span;

use crate::{
    error::ApiError,
    route::InFlight,
    tokens::{Counting, TokenCounter},
    upstream::UpstreamBody,
};

/// The upstream body, passed through frame by frame, holding the request's
/// in-flight count until it ends or the client goes away (dropping it drops
/// the upstream body, which cancels the upstream request).
pub struct GuardedBody {
    inner: UpstreamBody,
    guard: Option<InFlight>,
    /// An event stream reports a broken upstream as a final error event.
    sse: bool,
    /// That event in Anthropic's shape (`/v1/messages`).
    anthropic: bool,
    done: bool,
    /// The upstream status, recorded when the body ends.
    status: StatusCode,
    /// Until the body ends; dropped earlier (the client went away), it records a 499.
    metrics: Option<RequestMetrics>,
    tokens: TokenCounter,
    /// Keeps the request's span open until the last byte.
    _span: Span,
}

/// Recorded for a stream that broke after its 200 went out.
const BROKEN_STREAM: u16 = 502;

impl GuardedBody {
    pub fn new(
        inner: UpstreamBody,
        guard: InFlight,
        sse: bool,
        anthropic: bool,
        status: StatusCode,
        metrics: RequestMetrics,
        span: Span,
    ) -> Self {
        Self {
            inner,
            guard: Some(guard),
            sse,
            anthropic,
            done: false,
            status,
            metrics: Some(metrics),
            tokens: TokenCounter::new(if sse {
                Counting::Stream
            } else {
                Counting::Usage
            }),
            _span: span,
        }
    }

    fn count(&mut self, frame: &Frame<Bytes>) {
        let Some(metrics) = &mut self.metrics else {
            return;
        };
        metrics.first_byte();
        if let Some(data) = frame.data_ref() {
            let counted = self.tokens.scan(data);
            if counted.chunks > 0 {
                metrics.add_tokens(counted.chunks);
            }
            if let Some(usage) = counted.usage {
                metrics.usage_tokens(usage);
            }
        }
    }

    fn finish(&mut self, status: u16) {
        if let Some(metrics) = self.metrics.take() {
            metrics.finish(status);
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // A body of known length may be dropped after its last frame without
        // being polled to its end: that is a complete answer, not a client gone.
        if self.inner.is_end_stream() {
            let status = self.status.as_u16();
            self.finish(status);
        }
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                self.count(&frame);
                if self.inner.is_end_stream() {
                    let status = self.status.as_u16();
                    self.finish(status);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                self.done = true;
                self.finish(BROKEN_STREAM);
                let guard = self.guard.take();
                if self.sse {
                    let model = guard
                        .as_ref()
                        .map(|g| Arc::clone(&g.route().model))
                        .unwrap_or_default();
                    let error = ApiError::backend_unavailable(
                        &model,
                        format!("the stream broke: {}", error_chain(&e)),
                    );
                    let mut event = b"\n\n".to_vec();
                    event.extend_from_slice(&error.sse_event_for(self.anthropic));
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
                } else {
                    Poll::Ready(Some(Err(e)))
                }
            }
            None => {
                self.done = true;
                self.guard = None;
                let status = self.status.as_u16();
                self.finish(status);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
