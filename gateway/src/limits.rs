//! What clients may make the gateway hold: the bytes of request bodies being
//! read or waiting for their model (`queue_memory`) and the number of waiting
//! requests (`max_queued`). Without these bounds anyone who can reach an open
//! gateway could queue thousands of 32 MiB bodies for an unloaded model and
//! get it killed for memory, ending every other user's stream.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst},
};

/// The shared counters; each holder returns what it took when dropped.
#[derive(Debug)]
pub struct QueueLimits {
    max_bytes: u64,
    max_queued: usize,
    bytes: AtomicU64,
    queued: AtomicUsize,
}

impl QueueLimits {
    pub fn new(max_bytes: u64, max_queued: usize) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            max_queued,
            bytes: AtomicU64::new(0),
            queued: AtomicUsize::new(0),
        })
    }

    /// An empty share of `queue_memory`, for one request body.
    pub fn body(self: &Arc<Self>) -> BodyReservation {
        BodyReservation {
            limits: Arc::clone(self),
            bytes: 0,
        }
    }

    /// A place among the `max_queued` waiting requests, if one is free.
    pub fn enter_queue(self: &Arc<Self>) -> Option<QueueSlot> {
        self.queued
            .fetch_update(SeqCst, SeqCst, |n| (n < self.max_queued).then_some(n + 1))
            .ok()
            .map(|_| QueueSlot {
                limits: Arc::clone(self),
            })
    }

    /// `queue_memory`.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// `max_queued`.
    pub fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Bytes held now (for tests and the log).
    pub fn held_bytes(&self) -> u64 {
        self.bytes.load(SeqCst)
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.queued.load(SeqCst)
    }
}

/// The bytes of one request body counted against `queue_memory`.
#[derive(Debug)]
pub struct BodyReservation {
    limits: Arc<QueueLimits>,
    bytes: u64,
}

impl BodyReservation {
    /// Counts `more` bytes; false (and nothing counted) past `queue_memory`.
    pub fn grow(&mut self, more: u64) -> bool {
        let limits = &self.limits;
        let grown = limits.bytes.fetch_update(SeqCst, SeqCst, |held| {
            held.checked_add(more)
                .filter(|total| *total <= limits.max_bytes)
        });
        if grown.is_ok() {
            self.bytes += more;
        }
        grown.is_ok()
    }
}

impl Drop for BodyReservation {
    fn drop(&mut self) {
        self.limits.bytes.fetch_sub(self.bytes, SeqCst);
    }
}

/// One of the `max_queued` places, held while a request waits for its model.
#[derive(Debug)]
pub struct QueueSlot {
    limits: Arc<QueueLimits>,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.limits.queued.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_and_places_are_bounded_and_given_back() {
        let limits = QueueLimits::new(100, 2);
        let mut a = limits.body();
        assert!(a.grow(60));
        let mut b = limits.body();
        assert!(!b.grow(41), "past the bound");
        assert!(b.grow(40));
        assert_eq!(limits.held_bytes(), 100);
        drop(a);
        assert_eq!(limits.held_bytes(), 40);
        assert!(!b.grow(u64::MAX - 10), "no overflow");
        drop(b);
        assert_eq!(limits.held_bytes(), 0);

        let first = limits.enter_queue().unwrap();
        let _second = limits.enter_queue().unwrap();
        assert!(limits.enter_queue().is_none());
        drop(first);
        assert_eq!(limits.queued(), 1);
        assert!(limits.enter_queue().is_some());
    }
}
