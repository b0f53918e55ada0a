//! A start's load progress: read from the backend's output, kept for Status and Watch, sent
//! to the waiters that follow the start.

use std::time::Duration;

use gpuswap::pb::{self, activate_event::Event};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Internal, Message,
    actor::{Actor, millis},
    policy::State,
};
use crate::backend::{
    load_progress::{self, LoadProgress, Operation},
    logs::LogEntry,
};

impl Actor {
    /// Keeps the starting model's progress for Status and Watch and tells every waiter that
    /// follows this start.
    pub(super) fn load_progressed(
        &mut self,
        name: &str,
        generation: u64,
        parsed: Option<LoadProgress>,
    ) {
        let starting = self
            .policy
            .slot(name)
            .is_some_and(|s| s.state == State::Starting && s.generation == generation);
        let Some(model) = self.models.get_mut(name) else {
            return;
        };
        if !starting
            || model
                .run
                .as_ref()
                .is_none_or(|r| r.generation != generation)
        {
            return;
        }
        if let Some(parsed) = parsed {
            if model.progress.as_ref() == Some(&parsed) {
                return;
            }
            model.progress = Some(parsed);
        }
        let Some(progress) = self.load_progress(name) else {
            return;
        };
        for id in self.policy.followers(name, generation) {
            if let Some(stream) = self.streams.get(&id) {
                stream.stream.send(Event::Progress(progress.clone()));
            }
        }
    }

    /// Where the start (or wake) of `name` stands: the backend's own words and an estimate of
    /// the time left from its percentage or from its recent loads (or wakes). None unless it
    /// is starting or waking.
    pub(super) fn load_progress(&self, name: &str) -> Option<pb::LoadProgress> {
        let model = self.models.get(name)?;
        let slot = self
            .policy
            .slot(name)
            .filter(|s| matches!(s.state, State::Starting | State::Waking))?;
        let run = slot.run.as_ref()?;
        // A wake: the backend prints no load lines, its recent wakes make the estimate.
        let (phase, operation, since) = match run.waking_since {
            Some(since) if slot.state == State::Waking => ("waking", Operation::Wake, since),
            _ => ("loading", Operation::Load, run.spawned_at),
        };
        let elapsed = since.elapsed();
        let typical = self.history.typical(name, operation);
        let percent = model.progress.as_ref().and_then(|p| p.percent);
        Some(pb::LoadProgress {
            model: name.to_owned(),
            phase: phase.into(),
            percent,
            detail: model
                .progress
                .as_ref()
                .map(|p| p.detail.clone())
                .unwrap_or_default(),
            elapsed_ms: millis(elapsed),
            eta_ms: load_progress::time_left(elapsed, percent, typical).map(millis),
            typical_ms: typical.map_or(0, millis),
        })
    }
}

/// How often a start's estimate of the time left is refreshed when the backend prints nothing.
pub(super) const PROGRESS_REFRESH: Duration = Duration::from_secs(5);

/// Reads a starting backend's output for progress lines and reports them to the actor, plus a
/// refresh every [`PROGRESS_REFRESH`] (the first at once); ends when the guard is dropped.
pub(super) fn track_progress(
    mut lines: broadcast::Receiver<LogEntry>,
    kind: gpuswap::config::BackendKind,
    tx: mpsc::UnboundedSender<Message>,
    model: String,
    generation: u64,
) -> DropGuard {
    let token = CancellationToken::new();
    let guard = token.clone().drop_guard();
    tokio::spawn(async move {
        let mut refresh = tokio::time::interval(PROGRESS_REFRESH);
        loop {
            let parsed = tokio::select! {
                _ = token.cancelled() => break,
                _ = refresh.tick() => None,
                entry = lines.recv() => match entry {
                    Ok(entry) => match load_progress::parse_line(kind, &entry.line) {
                        Some(parsed) => Some(parsed),
                        None => continue,
                    },
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            };
            let report = Internal::Progress {
                model: model.clone(),
                generation,
                parsed,
            };
            if tx.send(Message::Internal(report)).is_err() {
                break;
            }
        }
    });
    guard
}
