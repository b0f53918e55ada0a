//! What the picker knows of every box: its models and GPU memory as its supervisor's Watch
//! stream reports them, whether its gateway answers, how many requests this picker has in
//! flight there, and the requests the box's gateway itself reports (its `/metrics`: traffic
//! from other fronts and clients too).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use gpuswap::{config::BoxConfig, pb};

/// One model of one box, as its supervisor last reported it.
#[derive(Clone, Debug)]
pub struct ModelView {
    pub name: String,
    pub aliases: Vec<String>,
    pub state: pb::ModelState,
    /// Its holders are asked to let go: it is about to stop.
    pub draining: bool,
    /// Clients holding it. A box's gateway holds every model it has loaded until it is
    /// drained, so this says "in use by a gateway", not "busy": busy-ness comes from the
    /// requests in flight (see [`Usage`]).
    pub holders: u32,
    /// Empty: every GPU.
    pub gpus: Vec<u32>,
    pub port: u32,
    pub host: String,
    /// Memory it takes on each of its GPUs; None: the whole GPU.
    pub vram: Option<u64>,
    /// Never stopped to make room for another model: the picker never places a model
    /// where it would have to be.
    pub pinned: bool,
    /// When its last use ended, as the box's clients report it to the supervisor (requests
    /// from every front, not only this picker's); None: never used.
    pub last_used: Option<Instant>,
}

impl ModelView {
    fn from_status(status: pb::ModelStatus) -> Self {
        ModelView {
            vram: status.vram_bytes,
            pinned: status.pinned,
            last_used: status.last_used_ms.map(instant_of_unix_ms),
            state: pb::ModelState::try_from(status.state).unwrap_or(pb::ModelState::Unspecified),
            draining: status.detail.starts_with("draining"),
            name: status.name,
            aliases: status.aliases,
            holders: status.holders,
            gpus: status.gpus,
            port: status.port,
            host: status.host,
        }
    }

    pub fn is_named(&self, id: &str) -> bool {
        self.name == id || self.aliases.iter().any(|a| a == id)
    }

    /// Its process exists (or is about to): it takes its GPUs and port.
    pub fn is_resident(&self) -> bool {
        matches!(
            self.state,
            pb::ModelState::Starting | pb::ModelState::Ready | pb::ModelState::Stopping
        )
    }

    pub fn footprint(&self) -> gpuswap::config::Footprint<'_> {
        gpuswap::config::Footprint {
            port: self.port,
            host: &self.host,
            gpus: (!self.gpus.is_empty()).then_some(self.gpus.as_slice()),
        }
    }
}

/// The `Instant` of a Unix time in milliseconds (the supervisor's clock; boxes' clocks are
/// assumed NTP-close: an error of a second only reorders idle models of about the same age).
fn instant_of_unix_ms(unix_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let ago = Duration::from_millis(now_ms.saturating_sub(unix_ms));
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// One GPU of a box, as its supervisor reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuView {
    /// Its memory; None: unknown (a model without vram, or any model on a GPU of unknown
    /// size, takes it whole).
    pub capacity: Option<u64>,
    /// What the live models reserve on it (the supervisor's own sum).
    pub reserved: u64,
}

/// A box's models, replaced whole on every change so that readers take a consistent copy.
#[derive(Clone, Debug, Default)]
pub struct BoxModels {
    /// The Watch stream is open and its snapshot arrived.
    pub watching: bool,
    pub models: BTreeMap<String, ModelView>,
    /// The GPUs of known size, by index.
    pub gpus: BTreeMap<u32, GpuView>,
}

fn gpu_views(gpus: Vec<pb::GpuStatus>) -> BTreeMap<u32, GpuView> {
    gpus.into_iter()
        .map(|g| {
            let view = GpuView {
                capacity: g.capacity_bytes,
                reserved: g.reserved_bytes,
            };
            (g.index, view)
        })
        .collect()
}

/// What a box's gateway reports in flight or queued, less this picker's own requests at the
/// time it was read: the box's load from other fronts and clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OtherLoad {
    pub total: u32,
    pub models: HashMap<String, u32>,
}

/// One box.
#[derive(Debug)]
pub struct BoxEntry {
    pub config: BoxConfig,
    models: RwLock<Arc<BoxModels>>,
    /// Its gateway accepted the last connection probe.
    gateway_up: AtomicBool,
    /// Requests this picker sent there that have not finished.
    in_flight: AtomicU32,
    /// The same per model, with when each was last used. Copied on write: a placement takes
    /// the current map without copying it (it runs per request over every box).
    usage: Mutex<Arc<HashMap<String, Usage>>>,
    /// From the gateway's `/metrics` (see [`OtherLoad`]).
    others: Mutex<Arc<OtherLoad>>,
}

/// One model's traffic on one box through this picker. With one active picker (the etcd
/// election) that is all the traffic of the front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub in_flight: u32,
    /// When its last request ended (or began, while one is in flight); None: never used
    /// since this picker started.
    pub last_used: Option<Instant>,
}

impl BoxEntry {
    pub fn new(config: BoxConfig) -> Self {
        BoxEntry {
            config,
            models: RwLock::default(),
            gateway_up: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            usage: Mutex::default(),
            others: Mutex::default(),
        }
    }

    pub fn others(&self) -> Arc<OtherLoad> {
        Arc::clone(&self.others.lock().unwrap())
    }

    /// The gateway reports `reported` requests (in flight and queued) per model: what is not
    /// this picker's own is the load of other fronts.
    pub fn set_reported(&self, reported: &HashMap<String, u32>) {
        let own = self.usage();
        let models: HashMap<String, u32> = reported
            .iter()
            .map(|(model, &count)| {
                let mine = own.get(model).map_or(0, |u| u.in_flight);
                (model.clone(), count.saturating_sub(mine))
            })
            .filter(|(_, count)| *count > 0)
            .collect();
        let load = OtherLoad {
            total: models.values().sum(),
            models,
        };
        let mut guard = self.others.lock().unwrap();
        if **guard != load {
            tracing::debug!(r#box = %self.config.name, others_total = load.total, others = ?load.models, "requests from other fronts changed");
            *guard = Arc::new(load);
        }
    }

    /// Every model's usage (placement reads it without the lock).
    pub fn usage(&self) -> Arc<HashMap<String, Usage>> {
        Arc::clone(&self.usage.lock().unwrap())
    }

    pub fn models(&self) -> Arc<BoxModels> {
        Arc::clone(&self.models.read().unwrap())
    }

    /// It can take requests: its supervisor is watched and its gateway answers.
    pub fn routable(&self) -> bool {
        self.gateway_up() && self.models().watching
    }

    pub fn gateway_up(&self) -> bool {
        self.gateway_up.load(Ordering::Relaxed)
    }

    pub fn set_gateway_up(&self, up: bool) {
        if self.gateway_up.swap(up, Ordering::Relaxed) != up {
            tracing::info!(r#box = %self.config.name, up, "box gateway reachability changed");
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request for `model` (None: a request without one) until the guard is dropped.
    pub fn begin_request(self: &Arc<Self>, model: Option<&str>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if let Some(model) = model {
            let mut usage = self.usage.lock().unwrap();
            let entry = Arc::make_mut(&mut usage)
                .entry(model.to_owned())
                .or_default();
            entry.in_flight += 1;
            entry.last_used = Some(Instant::now());
        }
        InFlight {
            entry: Arc::clone(self),
            model: model.map(str::to_owned),
            started: Instant::now(),
        }
    }

    /// The Watch stream's first event: every model.
    pub fn apply_snapshot(&self, models: Vec<pb::ModelStatus>, gpus: Vec<pb::GpuStatus>) {
        let models = models
            .into_iter()
            .map(|status| {
                let view = ModelView::from_status(status);
                (view.name.clone(), view)
            })
            .collect();
        let mut guard = self.models.write().unwrap();
        *guard = Arc::new(BoxModels {
            watching: true,
            models,
            gpus: gpu_views(gpus),
        });
    }

    pub fn apply_gpus(&self, gpus: Vec<pb::GpuStatus>) {
        let mut guard = self.models.write().unwrap();
        let mut next = BoxModels::clone(&guard);
        next.gpus = gpu_views(gpus);
        *guard = Arc::new(next);
    }

    pub fn apply_change(&self, status: pb::ModelStatus) {
        let view = ModelView::from_status(status);
        let mut guard = self.models.write().unwrap();
        let mut next = BoxModels::clone(&guard);
        next.models.insert(view.name.clone(), view);
        *guard = Arc::new(next);
    }

    pub fn apply_removed(&self, name: &str) {
        let mut guard = self.models.write().unwrap();
        let mut next = BoxModels::clone(&guard);
        next.models.remove(name);
        *guard = Arc::new(next);
    }

    /// The Watch stream broke: the box takes no new request until it is watched again.
    pub fn set_unwatched(&self) {
        let mut guard = self.models.write().unwrap();
        if guard.watching {
            tracing::warn!(r#box = %self.config.name, "lost the supervisor's Watch stream");
        }
        let mut next = BoxModels::clone(&guard);
        next.watching = false;
        *guard = Arc::new(next);
    }
}

/// Decrements the box's (and model's) in-flight count when the request ends.
#[derive(Debug)]
pub struct InFlight {
    entry: Arc<BoxEntry>,
    model: Option<String>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.entry.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(model) = &self.model {
            let mut usage = self.entry.usage.lock().unwrap();
            if let Some(entry) = Arc::make_mut(&mut usage).get_mut(model) {
                entry.in_flight = entry.in_flight.saturating_sub(1);
                entry.last_used = Some(Instant::now());
            }
        }
        tracing::debug!(
            r#box = %self.entry.config.name,
            model = self.model.as_deref().unwrap_or(""),
            elapsed_ms = self.started.elapsed().as_millis() as u64,
            "request ended"
        );
    }
}

/// Every box, by name.
#[derive(Debug, Default)]
pub struct Fleet {
    boxes: RwLock<Arc<Vec<Arc<BoxEntry>>>>,
    /// Cold placements not yet visible in Watch: model -> (box, when). See `placement`.
    /// The picker holds this lock for a whole decision, so decisions happen one at a time.
    pub pending: Mutex<HashMap<String, (String, Instant)>>,
}

impl Fleet {
    pub fn boxes(&self) -> Arc<Vec<Arc<BoxEntry>>> {
        Arc::clone(&self.boxes.read().unwrap())
    }

    /// Replaces the box list (a discovery update); returns the boxes added and removed so
    /// the caller starts and stops their watchers. A box whose config is unchanged is kept
    /// with its state.
    pub fn set_boxes(&self, configs: Vec<BoxConfig>) -> (Vec<Arc<BoxEntry>>, Vec<Arc<BoxEntry>>) {
        let mut guard = self.boxes.write().unwrap();
        let mut kept = Vec::new();
        let mut added = Vec::new();
        for config in configs {
            match guard.iter().find(|b| b.config == config) {
                Some(existing) => kept.push(Arc::clone(existing)),
                None => {
                    let entry = Arc::new(BoxEntry::new(config));
                    added.push(Arc::clone(&entry));
                    kept.push(entry);
                }
            }
        }
        let removed = guard
            .iter()
            .filter(|b| !kept.iter().any(|k| Arc::ptr_eq(k, b)))
            .cloned()
            .collect();
        kept.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        *guard = Arc::new(kept);
        (added, removed)
    }
}
