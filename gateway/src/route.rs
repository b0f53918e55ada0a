//! The route table read lock-free by every request, and the in-flight count
//! that lets a draining model finish its requests before the hold is released.

use std::{
    collections::HashMap,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{HeaderValue, uri::Authority};
use tokio::sync::mpsc;

use crate::{scheduler::Message, upstream::ConnPool};

/// Where requests for one model go while the gateway holds it.
#[derive(Debug)]
pub struct Route {
    /// The canonical model id.
    pub model: Arc<str>,
    /// Idle keep-alive connections to this backend (this generation only).
    pub pool: Arc<ConnPool>,
    /// `Host` for upstream requests, built once (the client would format it per request).
    pub host: HeaderValue,
    /// The id the backend expects, as a JSON string literal, to splice into bodies.
    pub served_name: String,
    pub served_name_json: Bytes,
    /// `Authorization: Bearer K` and `x-api-key: K` for the backend.
    pub api_key: Option<(HeaderValue, HeaderValue)>,
    pub generation: u64,
    pub in_flight: AtomicUsize,
    /// False from the moment a drain (or idle release) begins: no new request may enter.
    pub accepting: AtomicBool,
    /// When the last request finished, in [`now_ms`] units.
    pub last_done: AtomicU64,
    /// Tells the scheduler when the last request of a draining route finished.
    notify: mpsc::UnboundedSender<Message>,
}

impl Route {
    pub fn new(
        model: Arc<str>,
        upstream: Authority,
        served_name: String,
        api_key: Option<(HeaderValue, HeaderValue)>,
        generation: u64,
        notify: mpsc::UnboundedSender<Message>,
        upstream_idle_timeout: Duration,
    ) -> Self {
        let served_name_json = Bytes::from(serde_json::to_vec(&served_name).unwrap_or_default());
        let host = HeaderValue::from_str(upstream.as_str())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            model,
            host,
            pool: ConnPool::new(upstream, upstream_idle_timeout),
            served_name,
            served_name_json,
            api_key,
            generation,
            in_flight: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            last_done: AtomicU64::new(now_ms()),
            notify,
        }
    }

    /// Counts a request in, unless the route stopped accepting. The count goes
    /// up before the second look at `accepting`, so a drain that flips the flag
    /// and then reads the count either sees this request or this request sees
    /// the flag (both are SeqCst).
    pub fn try_enter(self: &Arc<Self>) -> Option<InFlight> {
        if !self.accepting.load(SeqCst) {
            return None;
        }
        self.in_flight.fetch_add(1, SeqCst);
        let guard = InFlight {
            route: Arc::clone(self),
        };
        if self.accepting.load(SeqCst) {
            Some(guard)
        } else {
            // Dropping the guard undoes the count (and reports a finished drain).
            drop(guard);
            None
        }
    }

    /// Counts a request in for the scheduler, which grants only while it knows
    /// the route accepts.
    pub fn enter_unchecked(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, SeqCst);
        InFlight {
            route: Arc::clone(self),
        }
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_done.load(SeqCst)))
    }
}

/// One counted request. Dropped when the response body ends or the client goes away.
#[derive(Debug)]
pub struct InFlight {
    route: Arc<Route>,
}

impl InFlight {
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let route = &self.route;
        route.last_done.store(now_ms(), SeqCst);
        if route.in_flight.fetch_sub(1, SeqCst) == 1 && !route.accepting.load(SeqCst) {
            let _ = route.notify.send(Message::Drained {
                model: Arc::clone(&route.model),
                generation: route.generation,
            });
        }
    }
}

/// Canonical model id -> route; replaced whole by the scheduler, read per request.
#[derive(Default)]
pub struct RouteTable {
    table: ArcSwap<HashMap<Arc<str>, Arc<Route>>>,
}

impl RouteTable {
    pub fn get(&self, model: &str) -> Option<Arc<Route>> {
        self.table.load().get(model).cloned()
    }

    pub fn publish(&self, route: Arc<Route>) {
        self.table.rcu(|old| {
            let mut new = HashMap::clone(old);
            new.insert(Arc::clone(&route.model), Arc::clone(&route));
            new
        });
    }

    /// Removes the route of `model` if it is still the given generation.
    pub fn unpublish(&self, model: &str, generation: u64) {
        self.table.rcu(|old| {
            let mut new = HashMap::clone(old);
            if new.get(model).is_some_and(|r| r.generation == generation) {
                new.remove(model);
            }
            new
        });
    }

    pub fn snapshot(&self) -> Arc<HashMap<Arc<str>, Arc<Route>>> {
        self.table.load_full()
    }
}

/// Milliseconds since the gateway started: a cheap monotonic clock for atomics.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tx: mpsc::UnboundedSender<Message>) -> Arc<Route> {
        Arc::new(Route::new(
            "m".into(),
            Authority::from_static("127.0.0.1:1"),
            "served".into(),
            None,
            7,
            tx,
            Duration::from_secs(1),
        ))
    }

    #[test]
    fn a_draining_route_refuses_and_reports_its_last_request() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let r = route(tx);
        assert_eq!(&r.served_name_json[..], b"\"served\"");
        let a = r.try_enter().unwrap();
        let b = r.try_enter().unwrap();
        assert_eq!(r.in_flight.load(SeqCst), 2);
        r.accepting.store(false, SeqCst);
        assert!(r.try_enter().is_none());
        assert_eq!(r.in_flight.load(SeqCst), 2);
        drop(a);
        assert!(rx.try_recv().is_err());
        drop(b);
        match rx.try_recv() {
            Ok(Message::Drained { model, generation }) => {
                assert_eq!(&*model, "m");
                assert_eq!(generation, 7);
            }
            other => panic!("expected Drained, got {other:?}"),
        }
    }

    #[test]
    fn the_table_unpublishes_only_its_own_generation() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let table = RouteTable::default();
        table.publish(route(tx));
        table.unpublish("m", 6);
        assert!(table.get("m").is_some());
        table.unpublish("m", 7);
        assert!(table.get("m").is_none());
    }
}
