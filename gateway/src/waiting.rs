//! A streaming request that must wait for its model: 200 + `text/event-stream`
//! at once, SSE keep-alive comments (and progress chunks a client can tell
//! from the answer) while the model loads, then the upstream stream appended.
//! A failure after the headers went out is one `data: {"error":...}` event,
//! and the stream ends without `[DONE]`.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures_util::{FutureExt, future::BoxFuture};
use gpuswap_telemetry::RequestMetrics;
use http_body::{Body as HttpBody, Frame};
use tokio::{sync::mpsc, time::Interval};

use crate::{
    Gateway,
    error::ApiError,
    proxy::{GuardedBody, Upstream, event_stream_response, forward_stream},
    scheduler::{Progress, WaitTicket},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct WaitingStream {
    state: State,
    gateway: Arc<Gateway>,
    model: Arc<str>,
    /// The name the client asked for, shown in progress chunks.
    requested: String,
    chat: bool,
    /// Errors go out in Anthropic's shape (`/v1/messages`).
    anthropic: bool,
    started: Instant,
    progress: Option<mpsc::Receiver<Progress>>,
    last_progress: Option<Progress>,
    keepalive: Interval,
    /// The first frame goes out at once, so the client sees the stream begin.
    greeted: bool,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Until the request is forwarded (then its body records), or fails here.
    metrics: Option<RequestMetrics>,
}

enum State {
    Waiting {
        ticket: WaitTicket,
        upstream: Option<Box<Upstream>>,
    },
    Forwarding(BoxFuture<'static, Result<GuardedBody, Bytes>>),
    Streaming(Box<GuardedBody>),
    Done,
}

impl WaitingStream {
    pub fn start(
        gateway: Arc<Gateway>,
        model: Arc<str>,
        upstream: Upstream,
        metrics: RequestMetrics,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let ticket = gateway.scheduler.wait(Arc::clone(&model), Some(tx));
        let started = Instant::now();
        let interval = gateway.keepalive_interval;
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = Box::pin(tokio::time::sleep(gateway.queue_timeout));
        Self {
            requested: upstream.requested_model().to_owned(),
            chat: upstream.is_chat(),
            anthropic: upstream.anthropic(),
            state: State::Waiting {
                ticket,
                upstream: Some(Box::new(upstream)),
            },
            gateway,
            model,
            started,
            progress: Some(rx),
            last_progress: None,
            keepalive,
            greeted: false,
            deadline,
            metrics: Some(metrics),
        }
    }

    fn show_progress(&self) -> bool {
        self.chat && self.gateway.stream_progress
    }

    /// One progress chunk in the chat chunk shape, with the text as
    /// `reasoning_content` (OpenWebUI shows it as a collapsible thinking block).
    fn progress_chunk(&self) -> Bytes {
        let elapsed = self.started.elapsed();
        let (phase, text, position, percent) = match &self.last_progress {
            Some(p) => (p.phase, p.text.as_str(), p.queue_position, p.percent),
            None => ("queued", "", None, None),
        };
        let text = if text.is_empty() {
            format!("Waiting for {}", self.model)
        } else {
            text.to_owned()
        };
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let chunk = serde_json::json!({
            "id": "gpuswap-progress",
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.requested,
            "choices": [{
                "index": 0,
                "delta": {"reasoning_content": format!("{text} … {} s\n", elapsed.as_secs())},
                "finish_reason": null,
            }],
            "gpuswap_progress": {
                "phase": phase,
                "model": &*self.model,
                "elapsed_ms": elapsed.as_millis() as u64,
                "queue_position": position,
                "percent": percent,
            },
        });
        let mut event = b"data: ".to_vec();
        event.extend_from_slice(chunk.to_string().as_bytes());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    fn keepalive_frame(&self) -> Bytes {
        if self.show_progress() {
            let mut frame = b": keep-alive\n\n".to_vec();
            frame.extend_from_slice(&self.progress_chunk());
            Bytes::from(frame)
        } else {
            Bytes::from_static(b": keep-alive\n\n")
        }
    }

    fn fail(&mut self, event: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        Poll::Ready(Some(Ok(Frame::data(event))))
    }

    /// A failure while waiting, recorded with the status it would have had.
    fn fail_waiting(&mut self, error: &ApiError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(metrics) = self.metrics.take() {
            metrics.finish(error.status.as_u16());
        }
        self.fail(error.sse_event_for(self.anthropic))
    }
}

impl IntoResponse for WaitingStream {
    fn into_response(self) -> Response {
        event_stream_response(Body::new(self))
    }
}

impl HttpBody for WaitingStream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Waiting { ticket, upstream } => {
                    if let Poll::Ready(granted) = Pin::new(ticket).poll(cx) {
                        match granted {
                            Ok(guard) => {
                                let (Some(upstream), Some(metrics)) =
                                    (upstream.take(), this.metrics.take())
                                else {
                                    return this.fail(Bytes::new());
                                };
                                this.progress = None;
                                let future = forward_stream(
                                    Arc::clone(&this.gateway),
                                    *upstream,
                                    guard,
                                    metrics,
                                )
                                .boxed();
                                this.state = State::Forwarding(future);
                                continue;
                            }
                            Err(error) => return this.fail_waiting(&error),
                        }
                    }
                    if !this.greeted {
                        this.greeted = true;
                        return Poll::Ready(Some(Ok(Frame::data(this.keepalive_frame()))));
                    }
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        let error =
                            ApiError::queue_timeout(&this.model, this.gateway.queue_timeout);
                        return this.fail_waiting(&error);
                    }
                    if let Some(rx) = &mut this.progress {
                        match rx.poll_recv(cx) {
                            Poll::Ready(Some(progress)) => {
                                this.last_progress = Some(progress);
                                if this.show_progress() {
                                    return Poll::Ready(Some(Ok(Frame::data(
                                        this.progress_chunk(),
                                    ))));
                                }
                                continue;
                            }
                            Poll::Ready(None) => this.progress = None,
                            Poll::Pending => {}
                        }
                    }
                    if this.keepalive.poll_tick(cx).is_ready() {
                        return Poll::Ready(Some(Ok(Frame::data(this.keepalive_frame()))));
                    }
                    return Poll::Pending;
                }
                State::Forwarding(future) => match future.as_mut().poll(cx) {
                    Poll::Ready(Ok(body)) => this.state = State::Streaming(Box::new(body)),
                    Poll::Ready(Err(event)) => return this.fail(event),
                    Poll::Pending => {
                        // The backend may take a while to its first byte (long prompts).
                        if this.keepalive.poll_tick(cx).is_ready() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                                b": keep-alive\n\n",
                            )))));
                        }
                        return Poll::Pending;
                    }
                },
                State::Streaming(body) => {
                    return Pin::new(body).poll_frame(cx).map_err(BoxError::from);
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done)
    }
}
