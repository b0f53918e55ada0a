//! The catalog: every model the supervisor knows (ids, aliases, states), kept
//! current from its Watch stream and reconnected with backoff when the
//! supervisor goes away. `/v1/models` answers from the last catalog always.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use gpuswap::{SupervisorClient, pb};
use tokio::sync::broadcast;

/// One model as the supervisor last reported it.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub name: Arc<str>,
    pub aliases: Vec<String>,
    pub state: pb::ModelState,
    pub idle_ttl: Option<Duration>,
    pub holders: u32,
    pub generation: u64,
    pub detail: String,
    pub last_error: String,
    /// Everything the supervisor reported, for the status page.
    pub status: pb::ModelStatus,
    /// When it was reported (uptimes grow from there).
    pub received: Instant,
}

impl ModelInfo {
    fn from_status(status: pb::ModelStatus) -> Self {
        Self {
            state: status.state(),
            name: status.name.as_str().into(),
            aliases: status.aliases.clone(),
            idle_ttl: status.idle_ttl_ms.map(Duration::from_millis),
            holders: status.holders,
            generation: status.generation,
            detail: status.detail.clone(),
            last_error: status.last_error.clone(),
            status,
            received: Instant::now(),
        }
    }

    /// The state in llama-server's router API (`status.value`).
    pub fn router_state(&self) -> &'static str {
        use pb::ModelState as S;
        match self.state {
            S::Ready => "loaded",
            S::Starting => "loading",
            // llama-server's router has the same state (its child sleeps when idle).
            S::Sleeping => "sleeping",
            S::Stopped | S::Stopping | S::Failed | S::Unavailable | S::Unspecified => "unloaded",
        }
    }

    /// A stopped model with these names (tests).
    #[cfg(test)]
    pub fn for_test(name: &str, aliases: &[&str]) -> Self {
        Self::from_status(pb::ModelStatus {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            state: pb::ModelState::Stopped as i32,
            ..Default::default()
        })
    }

    /// The state as `/v1/models` names it.
    pub fn public_state(&self) -> &'static str {
        use pb::ModelState as S;
        match self.state {
            S::Ready => "ready",
            S::Starting => "loading",
            S::Failed => "failed",
            S::Unavailable => "unavailable",
            S::Sleeping => "sleeping",
            S::Stopped | S::Stopping | S::Unspecified => "stopped",
        }
    }
}

/// Models by id, plus every id and alias resolved to its model.
#[derive(Debug, Default)]
pub struct Catalog {
    pub models: BTreeMap<Arc<str>, Arc<ModelInfo>>,
    names: HashMap<String, Arc<ModelInfo>>,
}

impl Catalog {
    fn from_models(models: impl IntoIterator<Item = ModelInfo>) -> Self {
        let models: BTreeMap<Arc<str>, Arc<ModelInfo>> = models
            .into_iter()
            .map(|m| (Arc::clone(&m.name), Arc::new(m)))
            .collect();
        let mut names = HashMap::new();
        for model in models.values() {
            for alias in &model.aliases {
                names.insert(alias.clone(), Arc::clone(model));
            }
        }
        // Ids win over aliases (the config forbids overlaps anyway).
        for model in models.values() {
            names.insert(model.name.to_string(), Arc::clone(model));
        }
        Self { models, names }
    }

    /// The model a requested id or alias names.
    pub fn resolve(&self, name: &str) -> Option<&Arc<ModelInfo>> {
        self.names.get(name)
    }

    fn with_changed(&self, changed: ModelInfo) -> Self {
        let mut models: Vec<ModelInfo> = self
            .models
            .values()
            .filter(|m| m.name != changed.name)
            .map(|m| ModelInfo::clone(m))
            .collect();
        models.push(changed);
        Self::from_models(models)
    }

    fn without(&self, removed: &str) -> Self {
        Self::from_models(
            self.models
                .values()
                .filter(|m| &*m.name != removed)
                .map(|m| ModelInfo::clone(m)),
        )
    }
}

/// A change the status page and the router API's event stream show.
#[derive(Clone, Debug)]
pub struct Event {
    pub model: Arc<str>,
    pub kind: EventKind,
}

#[derive(Clone, Debug)]
pub enum EventKind {
    /// The model's status changed (or was reported afresh after a reconnection).
    Status(Arc<ModelInfo>),
    /// A step of an activation (queued, draining, stopping, starting, a log line).
    Progress { phase: &'static str, text: String },
    /// A reload removed the model.
    Removed,
    /// The GPUs' memory changed (the new figures are in [`CatalogHandle::gpus`]); `model` is
    /// empty.
    Gpus,
}

/// Events kept for a slow subscriber before it misses some (it then gets a fresh snapshot).
const EVENT_BUFFER: usize = 1024;

/// The shared catalog, whether the supervisor is reachable now, and the event feed.
pub struct CatalogHandle {
    current: ArcSwap<Catalog>,
    /// The memory of the supervisor's GPUs, as last reported.
    gpus: ArcSwap<Vec<pb::GpuStatus>>,
    connected: AtomicBool,
    last_error: Mutex<String>,
    events: broadcast::Sender<Event>,
}

impl Default for CatalogHandle {
    fn default() -> Self {
        Self {
            current: ArcSwap::default(),
            gpus: ArcSwap::default(),
            connected: AtomicBool::default(),
            last_error: Mutex::default(),
            events: broadcast::channel(EVENT_BUFFER).0,
        }
    }
}

impl CatalogHandle {
    /// The memory of the supervisor's GPUs (configured, reserved, used), as last reported.
    pub fn gpus(&self) -> Arc<Vec<pb::GpuStatus>> {
        self.gpus.load_full()
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Sends an event to the subscribers (none: dropped).
    pub fn publish(&self, model: Arc<str>, kind: EventKind) {
        let _ = self.events.send(Event { model, kind });
    }

    pub fn load(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.current.load()
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Why the supervisor is unreachable (for error messages).
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }

    fn set_disconnected(&self, why: String) {
        self.connected.store(false, Ordering::SeqCst);
        if let Ok(mut e) = self.last_error.lock() {
            *e = why;
        }
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Follows the supervisor's Watch stream for ever, reconnecting with backoff.
pub async fn watch(client: SupervisorClient, catalog: Arc<CatalogHandle>, endpoint: String) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let why = match follow_once(client.clone(), &catalog, &mut backoff).await {
            Ok(()) => "the supervisor ended the watch stream".to_owned(),
            Err(status) => describe_status(&status),
        };
        if catalog.connected() {
            tracing::warn!(supervisor = %endpoint, "lost the supervisor: {why}");
        } else {
            tracing::debug!(supervisor = %endpoint, "supervisor unreachable: {why}");
        }
        catalog.set_disconnected(format!("{endpoint}: {why}"));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn follow_once(
    mut client: SupervisorClient,
    catalog: &CatalogHandle,
    backoff: &mut Duration,
) -> Result<(), tonic::Status> {
    let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
    while let Some(event) = stream.message().await? {
        let Some(event) = event.event else { continue };
        match event {
            pb::watch_event::Event::Snapshot(snapshot) => {
                catalog.gpus.store(Arc::new(snapshot.gpus));
                catalog.publish("".into(), EventKind::Gpus);
                let catalog_new =
                    Catalog::from_models(snapshot.models.into_iter().map(ModelInfo::from_status));
                *backoff = BACKOFF_MIN;
                if !catalog.connected() {
                    tracing::info!(
                        models = catalog_new.models.len(),
                        "connected to the supervisor"
                    );
                }
                let models: Vec<_> = catalog_new.models.values().cloned().collect();
                catalog.current.store(Arc::new(catalog_new));
                catalog.connected.store(true, Ordering::SeqCst);
                for model in models {
                    catalog.publish(Arc::clone(&model.name), EventKind::Status(model));
                }
            }
            pb::watch_event::Event::Changed(status) => {
                let changed = ModelInfo::from_status(status);
                let name = Arc::clone(&changed.name);
                let next = Arc::new(catalog.current.load().with_changed(changed));
                catalog.current.store(Arc::clone(&next));
                if let Some(model) = next.models.get(&name) {
                    catalog.publish(name, EventKind::Status(Arc::clone(model)));
                }
            }
            pb::watch_event::Event::Gpus(memory) => {
                catalog.gpus.store(Arc::new(memory.gpus));
                catalog.publish("".into(), EventKind::Gpus);
            }
            pb::watch_event::Event::Removed(name) => {
                let next = catalog.current.load().without(&name);
                catalog.current.store(Arc::new(next));
                catalog.publish(name.as_str().into(), EventKind::Removed);
            }
        }
    }
    Ok(())
}

/// A short human description of a failed supervisor call.
pub fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(s) = source {
        // tonic repeats the io error at several levels: say it once.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, aliases: &[&str], state: pb::ModelState) -> pb::ModelStatus {
        pb::ModelStatus {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn resolves_ids_and_aliases_and_follows_changes() {
        let c = Catalog::from_models([
            ModelInfo::from_status(status("a", &["alpha"], pb::ModelState::Stopped)),
            ModelInfo::from_status(status("b", &[], pb::ModelState::Ready)),
        ]);
        assert_eq!(&*c.resolve("alpha").unwrap().name, "a");
        assert_eq!(c.resolve("b").unwrap().public_state(), "ready");
        assert!(c.resolve("c").is_none());
        let c = c.with_changed(ModelInfo::from_status(status(
            "a",
            &["alpha"],
            pb::ModelState::Starting,
        )));
        assert_eq!(c.resolve("alpha").unwrap().public_state(), "loading");
        let c = c.without("a");
        assert!(c.resolve("alpha").is_none());
        assert_eq!(c.models.len(), 1);
    }
}
