//! A client's Activate stream: control events are never dropped, a closed stream is reported.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use gpuswap::pb::{self, activate_event::Event};
use tokio::{
    sync::{broadcast, mpsc},
    time::Instant,
};
use tonic::Status;

use super::{
    EventSender, Internal,
    actor::{Actor, millis},
};

/// The next value a reader of a broadcast channel gets: Ok, Err with how many it missed
/// (it read too slowly), or None once `stop` completes (its own client went away) or the
/// sender is gone.
pub async fn recv_until<T: Clone>(
    values: &mut broadcast::Receiver<T>,
    stop: impl Future<Output = ()>,
) -> Option<Result<T, u64>> {
    let received = tokio::select! {
        _ = stop => return None,
        received = values.recv() => received,
    };
    match received {
        Ok(value) => Some(Ok(value)),
        Err(broadcast::error::RecvError::Lagged(missed)) => Some(Err(missed)),
        Err(broadcast::error::RecvError::Closed) => None,
    }
}

/// One client's Activate stream. Dropping it ends the stream once every control event sent
/// on it has reached the client's channel (and the log forwarding, if any, has stopped).
pub(super) struct ClientStream {
    pub(super) id: u64,
    pub(super) events: EventSender,
    /// Control events that found the channel full, in order, to the task that waits for room.
    pub(super) queued: mpsc::UnboundedSender<Result<pb::ActivateEvent, Status>>,
    /// How many of them have not reached the channel yet: log lines wait behind them.
    pub(super) pending: Arc<AtomicUsize>,
    pub(super) received: Instant,
}

impl ClientStream {
    fn event(&self, event: Event) -> pb::ActivateEvent {
        pb::ActivateEvent {
            elapsed_ms: millis(self.received.elapsed()),
            event: Some(event),
        }
    }

    /// Sends a control event. It is never dropped: when the client reads slowly it waits (in
    /// order) for room; a client that went away is reported separately.
    pub(super) fn send(&self, event: Event) {
        let mut event = Ok(self.event(event));
        if self.pending.load(Ordering::SeqCst) == 0 {
            match self.events.try_send(event) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(back)) => event = back,
            }
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let _ = self.queued.send(event);
    }
}

impl Actor {
    /// Wraps a client's stream. Its task moves the control events that found the channel
    /// full into it as room appears, and reports when the client closes the stream.
    pub(super) fn client_stream(&mut self, events: EventSender, received: Instant) -> ClientStream {
        let id = self.next_stream_id;
        self.next_stream_id += 1;
        let (queued, mut waiting) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let report = self.sender();
        let (channel, in_queue) = (events.clone(), pending.clone());
        tokio::spawn(async move {
            let closed = || {
                if let Some(tx) = &report {
                    Self::report(tx, Internal::StreamClosed { id });
                }
            };
            loop {
                let next = tokio::select! {
                    biased;
                    next = waiting.recv() => next,
                    () = channel.closed() => return closed(),
                };
                // None: the stream's owner let go, and everything it sent is delivered.
                let Some(event) = next else { return };
                if channel.send(event).await.is_err() {
                    return closed();
                }
                in_queue.fetch_sub(1, Ordering::SeqCst);
            }
        });
        ClientStream {
            id,
            events,
            queued,
            pending,
            received,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use gpuswap::config::Config;

    use super::*;
    use crate::scheduler::{EVENT_CHANNEL_CAPACITY, actor::test_options};

    /// A client that does not read its Activate stream gets every control event, in order,
    /// once it reads: none is dropped because the stream's channel was full.
    #[tokio::test]
    async fn control_events_wait_for_a_slow_reader_instead_of_being_dropped() {
        let (tx, _reports) = mpsc::unbounded_channel();
        let config = Config::from_toml("").unwrap();
        let mut actor = Actor::new(config, test_options(PathBuf::new()), tx.downgrade());
        let (events, mut rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
        let stream = actor.client_stream(events, Instant::now());
        let total = 2 * EVENT_CHANNEL_CAPACITY as u32;
        for position in 1..=total {
            stream.send(Event::Queued(pb::Queued {
                position,
                behind: "other".into(),
            }));
        }
        drop(stream);
        let mut positions = Vec::new();
        while let Some(event) = rx.recv().await {
            match event.expect("an event").event {
                Some(Event::Queued(queued)) => positions.push(queued.position),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(positions, (1..=total).collect::<Vec<_>>());
        drop(tx);
    }
}
