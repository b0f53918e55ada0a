//! The gRPC service: a thin translation from `gpuswap.v1.Supervisor` calls to the scheduler
//! actor. Streams are served from channels; every task that feeds one ends when the client
//! goes away.

use std::{pin::Pin, sync::Arc};

use gpuswap::pb::{self, supervisor_server::Supervisor};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    backend::logs::{LogBuffer, LogEntry},
    scheduler::{ActivateArgs, EVENT_CHANNEL_CAPACITY, LostLines, Scheduler, recv_until},
    tls::Tokens,
};

/// Capacity of Watch and Logs streams.
const STREAM_CAPACITY: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct SupervisorService {
    scheduler: Scheduler,
    /// An https listener's tokens, re-read on Reload with the configuration.
    tokens: Option<Arc<Tokens>>,
}

impl SupervisorService {
    pub fn new(scheduler: Scheduler, tokens: Option<Arc<Tokens>>) -> Self {
        Self { scheduler, tokens }
    }
}

fn log_line(entry: &LogEntry, dropped: u64) -> pb::LogLine {
    pb::LogLine {
        model: entry.model.to_string(),
        stream: entry.stream as i32,
        line: entry.line.clone(),
        time_ms: entry.time_ms,
        dropped,
    }
}

/// The last `tail` lines over all `buffers`, oldest first.
fn merged_tail(buffers: &[LogBuffer], tail: usize) -> Vec<LogEntry> {
    if tail == 0 {
        return Vec::new();
    }
    let mut entries: Vec<LogEntry> = buffers.iter().flat_map(|b| b.tail(tail)).collect();
    // Stable: lines of one model with the same timestamp keep their order.
    entries.sort_by_key(|e| e.time_ms);
    let skip = entries.len().saturating_sub(tail);
    entries.split_off(skip)
}

/// Forwards one model's new lines to `tx` until either side ends; a follower that fell
/// behind learns how many lines it lost (and they are counted).
async fn follow(
    mut lines: broadcast::Receiver<LogEntry>,
    lost: LostLines,
    tx: mpsc::Sender<Result<pb::LogLine, Status>>,
) {
    while let Some(received) = recv_until(&mut lines, tx.closed()).await {
        let line = match received {
            Ok(entry) => log_line(&entry, 0),
            Err(dropped) => {
                lost.count(dropped);
                pb::LogLine {
                    model: lost.model.clone(),
                    stream: pb::LogStream::Supervisor as i32,
                    line: format!("[{dropped} lines dropped: the reader was too slow]"),
                    time_ms: 0,
                    dropped,
                }
            }
        };
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    type ActivateStream = BoxStream<pb::ActivateEvent>;
    type WatchStream = BoxStream<pb::WatchEvent>;
    type LogsStream = BoxStream<pb::LogLine>;

    async fn activate(
        &self,
        request: Request<pb::ActivateRequest>,
    ) -> Result<Response<Self::ActivateStream>, Status> {
        // The activation continues the caller's trace (the gateway sends `traceparent`); the
        // span is parented before anything enters it.
        let span = tracing::info_span!(
            "activate",
            model = %request.get_ref().model,
            hold = request.get_ref().hold
        );
        gpuswap_telemetry::set_parent(&span, gpuswap_telemetry::extract_grpc(request.metadata()));
        let request = request.into_inner();
        if request.model.is_empty() {
            return Err(Status::invalid_argument("model must not be empty"));
        }
        let (events, rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        self.scheduler
            .activate(
                ActivateArgs {
                    model: request.model,
                    hold: request.hold,
                    force: request.force,
                    client: request.client,
                    span,
                },
                events,
            )
            .await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn deactivate(
        &self,
        request: Request<pb::DeactivateRequest>,
    ) -> Result<Response<pb::DeactivateResponse>, Status> {
        let request = request.into_inner();
        let model = match (request.all, request.model.is_empty()) {
            (true, true) => None,
            (false, false) => Some(request.model),
            (true, false) => return Err(Status::invalid_argument("give a model or all, not both")),
            (false, true) => return Err(Status::invalid_argument("give a model, or all = true")),
        };
        if request.if_idle_generation.is_some() && model.is_none() {
            return Err(Status::invalid_argument(
                "if_idle_generation needs one model, not all",
            ));
        }
        if request.sleep && model.is_none() {
            return Err(Status::invalid_argument("sleep needs one model, not all"));
        }
        let stopped = self
            .scheduler
            .deactivate(
                model,
                request.force,
                request.sleep,
                request.if_idle_generation,
            )
            .await?;
        Ok(Response::new(pb::DeactivateResponse { stopped }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.scheduler.status().await?))
    }

    async fn watch(
        &self,
        _request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (snapshot, mut changes) = self.scheduler.watch().await?;
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        let scheduler = self.scheduler.clone();
        tokio::spawn(async move {
            let snapshot = pb::WatchEvent {
                event: Some(pb::watch_event::Event::Snapshot(snapshot)),
            };
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            while let Some(received) = recv_until(&mut changes, tx.closed()).await {
                let event = match received {
                    Ok(event) => event,
                    // Too slow to see every change: start over from a fresh snapshot.
                    Err(_) => match scheduler.watch().await {
                        Ok((snapshot, fresh)) => {
                            changes = fresh;
                            pb::WatchEvent {
                                event: Some(pb::watch_event::Event::Snapshot(snapshot)),
                            }
                        }
                        Err(status) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                    },
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        let model = (!request.model.is_empty()).then_some(request.model);
        let buffers = self.scheduler.logs(model).await?;
        let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
        // Subscribe before reading the tail so no line falls between the two.
        let followers: Vec<_> = if request.follow {
            buffers
                .iter()
                .map(|b| {
                    let lost = LostLines {
                        metrics: self.scheduler.metrics().clone(),
                        model: b.model().to_owned(),
                    };
                    (b.subscribe(), lost)
                })
                .collect()
        } else {
            Vec::new()
        };
        let tail = merged_tail(&buffers, request.tail as usize);
        tokio::spawn(async move {
            for entry in &tail {
                if tx.send(Ok(log_line(entry, 0))).await.is_err() {
                    return;
                }
            }
            let tasks: Vec<_> = followers
                .into_iter()
                .map(|(lines, lost)| tokio::spawn(follow(lines, lost, tx.clone())))
                .collect();
            drop(tx);
            for task in tasks {
                let _ = task.await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn reload(
        &self,
        _request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        // The token first: a reload refused for it changes nothing.
        if let Some(tokens) = &self.tokens {
            tokens
                .reload()
                .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        }
        Ok(Response::new(self.scheduler.reload().await?))
    }

    async fn report_use(
        &self,
        request: Request<pb::ReportUseRequest>,
    ) -> Result<Response<pb::ReportUseResponse>, Status> {
        self.scheduler.report_use(request.into_inner().uses)?;
        Ok(Response::new(pb::ReportUseResponse {}))
    }
}
