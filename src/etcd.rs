//! A small etcd v3 client over the part of etcd's API in `proto/vendor/etcd/`: leases kept alive,
//! keys under a prefix (listed, then watched), and etcd's election. Box gateways register
//! themselves with it (`[gateway] register`); pickers discover boxes and elect the active one
//! (`[epp] discovery`).

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::transport::{Channel, Endpoint};

#[allow(clippy::all, missing_docs)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}
#[allow(clippy::all, missing_docs)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}
#[allow(clippy::all, missing_docs)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

use etcdserverpb::{kv_client::KvClient, lease_client::LeaseClient, watch_client::WatchClient};
use v3electionpb::election_client::ElectionClient;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("invalid etcd endpoint {0:?}")]
    Endpoint(String),
    #[error("etcd: {0}")]
    Call(#[from] tonic::Status),
    #[error("etcd lease {0:x} expired")]
    LeaseExpired(i64),
    #[error("etcd closed the {0} stream")]
    Closed(&'static str),
}

/// A change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put { key: String, value: Vec<u8> },
    Delete { key: String },
}

/// Clients of one etcd cluster (its endpoints balanced; connected lazily).
#[derive(Clone, Debug)]
pub struct Etcd {
    kv: KvClient<Channel>,
    watch: WatchClient<Channel>,
    lease: LeaseClient<Channel>,
    election: ElectionClient<Channel>,
}

impl Etcd {
    /// `endpoints`: `http://host:port` URLs of the cluster's members.
    pub fn connect(endpoints: &[String]) -> Result<Self, EtcdError> {
        let list = endpoints
            .iter()
            .map(|e| {
                Endpoint::from_shared(e.clone())
                    .map(|ep| ep.connect_timeout(Duration::from_secs(2)))
                    .map_err(|_| EtcdError::Endpoint(e.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(list.into_iter());
        Ok(Etcd {
            kv: KvClient::new(channel.clone()),
            watch: WatchClient::new(channel.clone()),
            lease: LeaseClient::new(channel.clone()),
            election: ElectionClient::new(channel),
        })
    }

    /// A new lease of `ttl` (whole seconds, at least 1).
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let response = self
            .lease
            .clone()
            .lease_grant(etcdserverpb::LeaseGrantRequest {
                ttl: ttl.as_secs().max(1) as i64,
                id: 0,
            })
            .await?
            .into_inner();
        Ok(response.id)
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.lease
            .clone()
            .lease_revoke(etcdserverpb::LeaseRevokeRequest { id: lease })
            .await?;
        Ok(())
    }

    /// Renews `lease` every third of `ttl` until it fails: returns the reason (the lease
    /// expired, or etcd could not be reached in time).
    pub async fn keep_alive(&self, lease: i64, ttl: Duration) -> EtcdError {
        let every = (ttl / 3).max(Duration::from_millis(200));
        let (tx, rx) = mpsc::channel(4);
        let request = etcdserverpb::LeaseKeepAliveRequest { id: lease };
        // Queued before the call: etcd answers the call's headers with its first answer, so
        // the call would wait forever for a request sent after it.
        let _ = tx.send(request).await;
        let mut client = self.lease.clone();
        let call = client.lease_keep_alive(ReceiverStream::new(rx));
        let mut responses = match tokio::time::timeout(ttl, call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => return status.into(),
            Err(_) => return EtcdError::LeaseExpired(lease),
        };
        loop {
            // An answer must come before the lease could have run out.
            match tokio::time::timeout(ttl, responses.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl > 0 => {}
                Ok(Ok(Some(_))) => return EtcdError::LeaseExpired(lease),
                Ok(Ok(None)) => return EtcdError::Closed("keep-alive"),
                Ok(Err(status)) => return status.into(),
                Err(_) => return EtcdError::LeaseExpired(lease),
            }
            tokio::time::sleep(every).await;
            if tx.send(request).await.is_err() {
                return EtcdError::Closed("keep-alive");
            }
        }
    }

    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        self.kv
            .clone()
            .put(etcdserverpb::PutRequest {
                key: key.as_bytes().to_vec(),
                value,
                lease,
            })
            .await?;
        Ok(())
    }

    /// Every key under `prefix` with its value, and the revision they were read at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<(String, Vec<u8>)>, i64), EtcdError> {
        let response = self
            .kv
            .clone()
            .range(etcdserverpb::RangeRequest {
                key: prefix.as_bytes().to_vec(),
                range_end: prefix_end(prefix),
                limit: 0,
                revision: 0,
            })
            .await?
            .into_inner();
        let revision = response.header.map_or(0, |h| h.revision);
        let kvs = response
            .kvs
            .into_iter()
            .map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value))
            .collect();
        Ok((kvs, revision))
    }

    /// Changes under `prefix` after `revision`, in order, until the stream fails.
    pub async fn watch(
        &self,
        prefix: &str,
        revision: i64,
        changes: mpsc::Sender<Change>,
    ) -> EtcdError {
        let create = etcdserverpb::WatchRequest {
            request_union: Some(etcdserverpb::watch_request::RequestUnion::CreateRequest(
                etcdserverpb::WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix),
                    start_revision: revision + 1,
                },
            )),
        };
        // The request stream stays open for as long as the watch.
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.send(create).await;
        let mut responses = match self.watch.clone().watch(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status.into(),
        };
        while let Some(response) = responses.next().await {
            let response = match response {
                Ok(r) => r,
                Err(status) => return status.into(),
            };
            if response.canceled {
                return EtcdError::Closed("watch");
            }
            for event in response.events {
                let Some(kv) = event.kv else { continue };
                let key = String::from_utf8_lossy(&kv.key).into_owned();
                let change = if event.r#type == mvccpb::event::EventType::Delete as i32 {
                    Change::Delete { key }
                } else {
                    Change::Put {
                        key,
                        value: kv.value,
                    }
                };
                if changes.send(change).await.is_err() {
                    return EtcdError::Closed("watch");
                }
            }
        }
        drop(tx);
        EtcdError::Closed("watch")
    }

    /// Waits until this client leads `election` under `lease`; returns its leader key.
    pub async fn campaign(
        &self,
        election: &str,
        lease: i64,
        value: &str,
    ) -> Result<v3electionpb::LeaderKey, EtcdError> {
        let response = self
            .election
            .clone()
            .campaign(v3electionpb::CampaignRequest {
                name: election.as_bytes().to_vec(),
                lease,
                value: value.as_bytes().to_vec(),
            })
            .await?
            .into_inner();
        response.leader.ok_or(EtcdError::Closed("campaign"))
    }

    pub async fn resign(&self, leader: v3electionpb::LeaderKey) -> Result<(), EtcdError> {
        self.election
            .clone()
            .resign(v3electionpb::ResignRequest {
                leader: Some(leader),
            })
            .await?;
        Ok(())
    }
}

/// The end of the key range of everything that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every key.
    vec![0]
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(super::prefix_end("/gpuswap/boxes/"), b"/gpuswap/boxes0");
        assert_eq!(super::prefix_end(""), vec![0]);
    }
}
