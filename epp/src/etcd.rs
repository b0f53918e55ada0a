//! etcd discovery (`[epp] discovery`): boxes are the keys under the prefix that box gateways
//! keep alive (`[gateway] register`), listed and then watched; and the pickers elect the active
//! one with etcd's election, so that only one places cold models (readiness follows it).

use std::{collections::BTreeMap, time::Duration};

use gpuswap::{
    config::{BoxConfig, DiscoveryConfig},
    etcd::{Change, Etcd},
};
use tokio::sync::{mpsc, watch};

use crate::discovery::Discovery;

/// How long to wait before trying etcd again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// Boxes registered under the prefix.
pub struct EtcdBoxes {
    pub etcd: Etcd,
    pub config: DiscoveryConfig,
}

impl Discovery for EtcdBoxes {
    async fn run(self, boxes: watch::Sender<Vec<BoxConfig>>) -> anyhow::Result<()> {
        let prefix = &self.config.prefix;
        loop {
            let (listed, revision) = match self.etcd.list(prefix).await {
                Ok(listed) => listed,
                Err(error) => {
                    tracing::warn!(%error, "etcd: cannot list the boxes");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let mut known: BTreeMap<String, BoxConfig> = listed
                .into_iter()
                .filter_map(|(key, value)| Some((key.clone(), self.parse(&key, &value)?)))
                .collect();
            boxes.send_replace(known.values().cloned().collect());
            let (tx, mut rx) = mpsc::channel(64);
            let watching = self.etcd.watch(prefix, revision, tx);
            tokio::pin!(watching);
            loop {
                tokio::select! {
                    error = &mut watching => {
                        tracing::warn!(%error, "etcd: the watch of the boxes ended; listing again");
                        break;
                    }
                    Some(change) = rx.recv() => {
                        match change {
                            Change::Put { key, value } => {
                                if let Some(config) = self.parse(&key, &value) {
                                    known.insert(key, config);
                                }
                            }
                            Change::Delete { key } => {
                                known.remove(&key);
                            }
                        }
                        boxes.send_replace(known.values().cloned().collect());
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}

impl EtcdBoxes {
    /// A registration's value: `{name, gateway, supervisor}`; the token and CA for an https
    /// supervisor come from the discovery's own configuration.
    fn parse(&self, key: &str, value: &[u8]) -> Option<BoxConfig> {
        #[derive(serde::Deserialize)]
        struct Registration {
            name: String,
            gateway: String,
            supervisor: String,
        }
        let parsed: Registration = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(%key, %error, "etcd: ignoring a registration that is not {{name, gateway, supervisor}}");
                return None;
            }
        };
        let config = BoxConfig {
            name: parsed.name,
            gateway: parsed.gateway,
            supervisor: parsed.supervisor,
            token_file: self.config.token_file.clone(),
            ca_file: self.config.ca_file.clone(),
        };
        match config.validate(key) {
            Ok(()) => Some(config),
            Err(error) => {
                tracing::warn!(%key, %error, "etcd: ignoring a registration");
                None
            }
        }
    }
}

/// Campaigns for leadership of the pickers forever: `leader` is true while this picker leads.
/// A leader whose lease is lost (etcd unreachable for a TTL) steps down and campaigns again.
pub async fn elect(etcd: Etcd, config: DiscoveryConfig, me: String, leader: watch::Sender<bool>) {
    let election = format!("{}.leader", config.prefix.trim_end_matches('/'));
    loop {
        let lease = match etcd.grant(config.ttl).await {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!(%error, "etcd: cannot get a lease for the election");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // The lease must live while this picker waits its turn, too.
        let keep_alive = etcd.keep_alive(lease, config.ttl);
        tokio::pin!(keep_alive);
        tracing::info!(%election, "campaigning to be the active picker");
        let won = tokio::select! {
            won = etcd.campaign(&election, lease, &me) => won,
            error = &mut keep_alive => Err(error),
        };
        match won {
            Ok(_key) => {
                tracing::info!(%election, "this picker is the active one");
                leader.send_replace(true);
                let error = keep_alive.await;
                leader.send_replace(false);
                tracing::warn!(%error, "lost the picker leadership");
            }
            Err(error) => tracing::warn!(%error, "etcd: campaign failed"),
        }
        let _ = etcd.revoke(lease).await;
        tokio::time::sleep(RETRY).await;
    }
}
