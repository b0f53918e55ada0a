//! The moment a condition first holds, observed from outside: a thread of its own checks it
//! in a tight loop (an async task would add the runtime's scheduling delay to the moment).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

pub struct MomentPoller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Option<Instant>>,
}

impl MomentPoller {
    /// Checks `holds` every `every` until it is true (or [`finish`](Self::finish) stops it).
    pub fn start(every: Duration, mut holds: impl FnMut() -> bool + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                if holds() {
                    return Some(Instant::now());
                }
                std::thread::sleep(every);
            }
            None
        });
        Self { stop, thread }
    }

    /// The moment the condition first held, waiting up to `wait` for it (looking every
    /// `check_every`); None when it did not hold by then.
    pub async fn finish(self, wait: Duration, check_every: Duration) -> Option<Instant> {
        let deadline = Instant::now() + wait;
        while !self.thread.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(check_every).await;
        }
        self.stop.store(true, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || self.thread.join().ok().flatten())
            .await
            .ok()
            .flatten()
    }
}
