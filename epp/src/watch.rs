//! Two tasks per box: one follows its supervisor's Watch stream (the box's models, states,
//! holders and GPU memory); the other reads its gateway's `/metrics` twice a second, which
//! both proves the gateway answers (a dead gateway or supervisor takes no new request within
//! a second or two) and tells the requests in flight and queued there per model, from every
//! front and client (`gpuswap_gateway_in_flight` and `gpuswap_gateway_queue_depth`).

use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;

use gpuswap::{ClientOptions, Endpoint, pb};
use tokio::task::JoinHandle;

use crate::fleet::BoxEntry;

/// The first retry after a broken stream; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often a box's gateway is read, and how long one read may take.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Starts following `entry`; abort the handles to stop.
pub fn spawn(entry: Arc<BoxEntry>) -> [JoinHandle<()>; 2] {
    [
        tokio::spawn(follow_watch(Arc::clone(&entry))),
        tokio::spawn(read_gateway(entry)),
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
                entry.apply_snapshot(snapshot.models, snapshot.gpus);
            }
            Some(pb::watch_event::Event::Changed(status)) => entry.apply_change(status),
            Some(pb::watch_event::Event::Removed(name)) => entry.apply_removed(&name),
            Some(pb::watch_event::Event::Gpus(memory)) => entry.apply_gpus(memory.gpus),
            None => {}
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

/// The gateway's `/metrics` each [`PROBE_EVERY`]: up when it answers 200 in time.
async fn read_gateway(entry: Arc<BoxEntry>) {
    let server = match crate::http::Server::new(&format!("http://{}", entry.config.gateway), None) {
        Ok(server) => server,
        Err(error) => {
            tracing::error!(r#box = %entry.config.name, %error, "cannot read the box gateway; the box stays unused");
            return;
        }
    };
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let request = http::Request::get("/metrics")
            .body(Full::<Bytes>::default())
            .expect("a constant request");
        match tokio::time::timeout(PROBE_TIMEOUT, server.call(request)).await {
            Ok(Ok((_, text))) => {
                entry.set_reported(&requests_per_model(&String::from_utf8_lossy(&text)));
                entry.set_gateway_up(true);
            }
            Ok(Err(error)) => {
                tracing::debug!(r#box = %entry.config.name, %error, "box gateway unreadable");
                entry.set_gateway_up(false);
            }
            Err(_) => entry.set_gateway_up(false),
        }
    }
}

/// The gateway's requests in flight plus queued, per model, from its Prometheus text.
pub fn requests_per_model(text: &str) -> HashMap<String, u32> {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line
            .strip_prefix("gpuswap_gateway_in_flight{")
            .or_else(|| line.strip_prefix("gpuswap_gateway_queue_depth{"))
        else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let model = labels
            .split(',')
            .find_map(|label| label.strip_prefix("model=\""))
            .and_then(|v| v.strip_suffix('"'));
        let value = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok());
        if let (Some(model), Some(value)) = (model, value) {
            *counts.entry(model.to_owned()).or_default() += value.max(0.0) as u32;
        }
    }
    counts.retain(|_, n| *n > 0);
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_model_adds_in_flight_and_queued() {
        let text = "# HELP gpuswap_gateway_in_flight Requests forwarded\n\
            # TYPE gpuswap_gateway_in_flight gauge\n\
            gpuswap_gateway_in_flight{model=\"a\"} 2\n\
            gpuswap_gateway_in_flight{model=\"b\"} 0\n\
            gpuswap_gateway_queue_depth{model=\"a\"} 1\n\
            gpuswap_gateway_queue_depth{model=\"c\"} 4\n\
            gpuswap_gateway_requests_total{model=\"a\",status=\"200\"} 9\n";
        let counts = requests_per_model(text);
        assert_eq!(
            counts,
            HashMap::from([("a".to_string(), 3), ("c".to_string(), 4)])
        );
    }
}
