//! Forwarding a starting model's output to its waiters, and counting the lines they lose.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use gpuswap::pb::{self, activate_event::Event};
use gpuswap_telemetry::SupervisorMetrics;
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{CONTROL_RESERVE, EventSender, actor::millis, streams::recv_until};
use crate::backend::logs::LogEntry;

/// Forwards a starting model's output to one waiter while it lives. Dropping it closes the
/// sender slot under its lock, so no line can follow the Ready or Failed the actor sends next.
pub(super) struct LogForward {
    slot: Arc<std::sync::Mutex<Option<EventSender>>>,
    _stop: DropGuard,
}

impl Drop for LogForward {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Starts forwarding `lines` to `events`. Lines are skipped (and counted as dropped) when
/// the client reads slowly, so control events always find room.
pub(super) fn forward_logs(
    mut lines: broadcast::Receiver<LogEntry>,
    events: EventSender,
    control_pending: Arc<AtomicUsize>,
    received: Instant,
    lost: LostLines,
) -> LogForward {
    let token = CancellationToken::new();
    let slot = Arc::new(std::sync::Mutex::new(Some(events)));
    let forward = LogForward {
        slot: slot.clone(),
        _stop: token.clone().drop_guard(),
    };
    tokio::spawn(async move {
        while let Some(entry) = recv_until(&mut lines, token.cancelled()).await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(skipped) => {
                    lost.count(skipped);
                    continue;
                }
            };
            let slot = slot.lock().unwrap_or_else(|p| p.into_inner());
            let Some(events) = slot.as_ref() else { break };
            // A line never overtakes a control event that waits for room.
            if events.capacity() <= CONTROL_RESERVE || control_pending.load(Ordering::SeqCst) > 0 {
                lost.count(1);
                continue;
            }
            let event = pb::ActivateEvent {
                elapsed_ms: millis(received.elapsed()),
                event: Some(Event::Log(pb::LogLine {
                    model: entry.model.to_string(),
                    stream: entry.stream as i32,
                    line: entry.line,
                    time_ms: entry.time_ms,
                    dropped: 0,
                })),
            };
            match events.try_send(Ok(event)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lost.count(1),
                Err(mpsc::error::TrySendError::Closed(_)) => break,
            }
        }
    });
    forward
}

/// Counts the log lines a reader of `model`'s output did not get.
pub struct LostLines {
    pub metrics: SupervisorMetrics,
    pub model: String,
}

impl LostLines {
    pub fn count(&self, lines: u64) {
        self.metrics.log_lines_dropped(&self.model, lines);
    }
}
