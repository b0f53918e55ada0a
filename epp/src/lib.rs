//! `gpuswap-epp`: the Endpoint Picker of the Gateway API Inference Extension for many GPU
//! boxes. A proxy (Envoy, or any GIE-conformant gateway) asks it over `ext_proc` where each
//! request goes; it answers with one box's gateway, chosen from what the boxes' supervisors
//! report on their Watch streams (see `placement` for the order).

pub mod discovery;
pub mod etcd;
pub mod extproc;
pub mod fleet;
pub mod http;
pub mod kubernetes;
pub mod picker;
pub mod placement;
pub mod watch;

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;
use gpuswap::config::EppConfig;
use tokio::sync::watch as channel;
use tonic_health::ServingStatus;

use crate::{
    discovery::{Discovery, StaticBoxes},
    fleet::Fleet,
    picker::Picker,
};

/// gRPC health service names: GIE's liveness and readiness, and the ext_proc service itself
/// (what Envoy's health check of the picker cluster asks; same as readiness).
pub const LIVENESS: &str = "liveness";
pub const READINESS: &str = "readiness";
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// How long a stopping picker tries to hand its Lease back.
const RELEASE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the picker until the server fails or `shutdown` completes (then a Lease it holds is
/// released).
pub async fn run(
    config: EppConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let addr: SocketAddr = config
        .listen
        .parse()
        .with_context(|| format!("epp.listen: {:?} is not an address", config.listen))?;
    let fleet = Arc::new(Fleet::default());
    let picker = Arc::new(Picker {
        fleet: Arc::clone(&fleet),
        max_in_flight: config.max_in_flight,
        fallbacks: config.fallbacks,
    });
    let (boxes_tx, boxes_rx) = channel::channel(Vec::new());
    let (leader_tx, leader_rx) = channel::channel(false);
    // What a clean stop hands back: the Kubernetes Lease (its election task, then a release).
    let mut lease: Option<(tokio::task::JoinHandle<()>, kubernetes::Api, String, String)> = None;
    let source = match &config.discovery {
        None => {
            // One picker per static list: it leads from the start.
            leader_tx.send_replace(true);
            tokio::spawn(async move { StaticBoxes(config.boxes).run(boxes_tx).await })
        }
        Some(discovery) if discovery.kubernetes.is_some() => {
            let kubernetes = discovery.kubernetes.clone().expect("matched");
            let api = kubernetes::Api::new(&kubernetes)?;
            // In a pod HOSTNAME is the pod's name: the Lease's holder says which picker leads.
            let me = match std::env::var("HOSTNAME") {
                Ok(host) if !host.is_empty() => format!("{host}_{addr}"),
                _ => addr.to_string(),
            };
            let election = tokio::spawn(kubernetes::elect(
                api.clone(),
                kubernetes.lease.clone(),
                discovery.ttl,
                me.clone(),
                leader_tx,
            ));
            lease = Some((election, api.clone(), kubernetes.lease.clone(), me));
            let source = kubernetes::KubernetesBoxes {
                api,
                config: kubernetes,
                discovery: discovery.clone(),
            };
            tokio::spawn(async move { source.run(boxes_tx).await })
        }
        Some(discovery) => {
            let etcd = gpuswap::etcd::Etcd::connect(&discovery.etcd)?;
            tokio::spawn(etcd::elect(
                etcd.clone(),
                discovery.clone(),
                addr.to_string(),
                leader_tx,
            ));
            let source = etcd::EtcdBoxes {
                etcd,
                config: discovery.clone(),
            };
            tokio::spawn(async move { source.run(boxes_tx).await })
        }
    };
    tokio::spawn(discovery::apply(fleet, boxes_rx));

    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, ServingStatus::Serving)
        .await;
    tokio::spawn(report_readiness(reporter, leader_rx));

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "gpuswap-epp listening (ext_proc + gRPC health)");
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(ExternalProcessorServer::new(extproc::ExtProc::new(
            picker,
            config.max_body,
        )))
        // Without TCP_NODELAY, Nagle and the proxy's delayed ACKs hold the small answers of
        // an exchange for ~40 ms each (measured: 64 ms per request at one client).
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        );
    tokio::select! {
        result = server => result.context("ext_proc server failed"),
        () = shutdown => {
            tracing::info!("stopping");
            if let Some((election, api, name, me)) = lease {
                // Handing the Lease back lets a standby lead at once instead of after ttl.
                election.abort();
                match tokio::time::timeout(RELEASE_TIMEOUT, kubernetes::release(&api, &name, &me)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "kubernetes: could not release the Lease"),
                    Err(_) => tracing::warn!("kubernetes: releasing the Lease took too long"),
                }
            }
            Ok(())
        }
        result = source => match result {
            Ok(Ok(())) => anyhow::bail!("discovery ended"),
            Ok(Err(error)) => Err(error.context("discovery failed")),
            Err(panic) => Err(anyhow::anyhow!("discovery task failed: {panic}")),
        },
    }
}

/// Readiness (and the ext_proc service's health) follow leadership: only the active picker
/// is SERVING, so the proxy's health check sends traffic to it alone.
async fn report_readiness(
    reporter: tonic_health::server::HealthReporter,
    mut leader: channel::Receiver<bool>,
) {
    loop {
        let status = if *leader.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in [READINESS, EXT_PROC_SERVICE] {
            reporter.set_service_status(service, status).await;
        }
        if leader.changed().await.is_err() {
            return;
        }
    }
}
