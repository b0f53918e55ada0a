//! Where the list of boxes comes from, behind one trait: a static list in the configuration
//! file, etcd registrations (see `etcd`), or the ready pods of a label selector through the
//! Kubernetes API (see `kubernetes`).

use std::{collections::HashMap, future::Future, sync::Arc};

use gpuswap::config::BoxConfig;
use tokio::{sync::watch, task::JoinHandle};

use crate::fleet::Fleet;

/// A source of the box list.
pub trait Discovery: Send + 'static {
    /// Publishes the whole list on `boxes` whenever it changes; returns only when the
    /// source fails for good.
    fn run(
        self,
        boxes: watch::Sender<Vec<BoxConfig>>,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// The boxes of `[epp] boxes`.
pub struct StaticBoxes(pub Vec<BoxConfig>);

impl Discovery for StaticBoxes {
    async fn run(self, boxes: watch::Sender<Vec<BoxConfig>>) -> anyhow::Result<()> {
        boxes.send_replace(self.0);
        // The list never changes: keep the sender (and so the list) alive.
        std::future::pending::<()>().await;
        Ok(())
    }
}

/// Keeps the fleet and its per-box watchers in step with the discovered list.
pub async fn apply(fleet: Arc<Fleet>, mut boxes: watch::Receiver<Vec<BoxConfig>>) {
    let mut watchers: HashMap<String, [JoinHandle<()>; 2]> = HashMap::new();
    loop {
        let list = boxes.borrow_and_update().clone();
        let (added, removed) = fleet.set_boxes(list);
        for entry in removed {
            tracing::info!(r#box = %entry.config.name, "box removed");
            if let Some(handles) = watchers.remove(&key(&entry.config)) {
                handles.iter().for_each(JoinHandle::abort);
            }
        }
        for entry in added {
            tracing::info!(r#box = %entry.config.name, gateway = %entry.config.gateway, "box added");
            watchers.insert(key(&entry.config), crate::watch::spawn(entry));
        }
        if boxes.changed().await.is_err() {
            return;
        }
    }
}

fn key(config: &BoxConfig) -> String {
    format!("{config:?}")
}
