//! One task per box: follows its supervisor's Watch stream (the box's models, states and
//! holders) and probes its gateway's port, so that a dead gateway or supervisor takes no
//! new request within a second or two.

use std::{sync::Arc, time::Duration};

use gpuswap::{ClientOptions, Endpoint, pb};
use tokio::task::JoinHandle;

use crate::fleet::BoxEntry;

/// The first retry after a broken stream; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a box's gateway port is tried, and how long one try may take.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts following `entry`; abort the handles to stop.
pub fn spawn(entry: Arc<BoxEntry>) -> [JoinHandle<()>; 2] {
    [
        tokio::spawn(follow_watch(Arc::clone(&entry))),
        tokio::spawn(probe_gateway(entry)),
    ]
}

async fn follow_watch(entry: Arc<BoxEntry>) {
    let name = entry.config.name.clone();
    let client = match client_for(&entry) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(r#box = %name, %error, "cannot set up the supervisor client; the box stays unused");
            return;
        }
    };
    let mut backoff = MIN_BACKOFF;
    loop {
        match watch_once(&entry, client.clone()).await {
            Ok(()) => tracing::warn!(r#box = %name, "the supervisor ended its Watch stream"),
            Err(status) => {
                tracing::warn!(r#box = %name, code = ?status.code(), message = status.message(), "Watch failed")
            }
        }
        entry.set_unwatched();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
        // A stream that stayed up a while earns a quick retry next time.
        if entry.models().watching {
            backoff = MIN_BACKOFF;
        }
    }
}

async fn watch_once(
    entry: &BoxEntry,
    mut client: gpuswap::SupervisorClient,
) -> Result<(), tonic::Status> {
    let mut stream = client.watch(pb::WatchRequest {}).await?.into_inner();
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::watch_event::Event::Snapshot(snapshot)) => {
                tracing::info!(r#box = %entry.config.name, models = snapshot.models.len(), "watching");
                entry.apply_snapshot(snapshot.models);
            }
            Some(pb::watch_event::Event::Changed(status)) => entry.apply_change(status),
            Some(pb::watch_event::Event::Removed(name)) => entry.apply_removed(&name),
            // GPU memory does not steer the picker.
            Some(pb::watch_event::Event::Gpus(_)) | None => {}
        }
    }
    Ok(())
}

fn client_for(entry: &BoxEntry) -> anyhow::Result<gpuswap::SupervisorClient> {
    let config = &entry.config;
    let endpoint: Endpoint = config.supervisor.parse()?;
    // The token file, read again when it changes: a rotated supervisor token needs no restart.
    let options = ClientOptions {
        token: None,
        token_file: config.token_file.clone(),
        ca_file: config.ca_file.clone(),
        ..ClientOptions::default()
    };
    Ok(gpuswap::connect(&endpoint, &options)?)
}

/// A TCP connection to the gateway's port each [`PROBE_EVERY`]: no HTTP, no load on the
/// gateway beyond an accept.
async fn probe_gateway(entry: Arc<BoxEntry>) {
    let address = entry.config.gateway.clone();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let up = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(&address)).await,
            Ok(Ok(_))
        );
        entry.set_gateway_up(up);
    }
}
