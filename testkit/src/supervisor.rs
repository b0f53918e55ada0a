//! The real supervisor under test: its command line, the wait until it answers, and
//! Status read through the API crate's client.

use std::{
    collections::HashMap,
    fs::File,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use gpuswap::{ClientOptions, Endpoint, SupervisorClient, pb};

use crate::{DEADLINE, Proc};

/// A client of the supervisor listening on the Unix socket `socket` (it connects lazily,
/// so it can be made before the supervisor starts).
pub fn supervisor_client(socket: &Path) -> SupervisorClient {
    gpuswap::connect(
        &Endpoint::Unix(socket.to_owned()),
        &ClientOptions::default(),
    )
    .expect("supervisor client")
}

/// `gpuswap-supervisor --config CONFIG` with `RUST_LOG`, stdin closed; the caller says
/// where its output goes.
pub fn supervisor_command(config: &Path, rust_log: &str) -> Command {
    let mut command = Command::new(crate::bin("gpuswap-supervisor"));
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdin(Stdio::null());
    command
}

/// A log file opened for appending: a restarted daemon adds to what the last run wrote.
pub fn append_log(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("log {}: {e}", path.display()))
}

/// Waits until the supervisor answers Status through `client`; panics with its log when
/// the process exits first.
pub async fn wait_until_answering(client: &SupervisorClient, proc: &mut Proc, log: &Path) {
    crate::wait_for("the supervisor to answer Status", DEADLINE, || {
        let mut client = client.clone();
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "the supervisor exited with {status}: {}",
                crate::read_lossy(log)
            );
        }
        async move { client.status(pb::StatusRequest {}).await.ok() }
    })
    .await;
}

/// Status, answered within [`DEADLINE`].
pub async fn status(client: &SupervisorClient) -> pb::StatusResponse {
    let mut client = client.clone();
    tokio::time::timeout(DEADLINE, client.status(pb::StatusRequest {}))
        .await
        .expect("Status in time")
        .expect("Status")
        .into_inner()
}

/// The last `tail` lines the supervisor keeps of `model`'s log ("": every model's), oldest
/// first.
pub async fn log_lines(client: &SupervisorClient, model: &str, tail: u32) -> Vec<pb::LogLine> {
    let mut client = client.clone();
    let mut stream = client
        .logs(pb::LogsRequest {
            model: model.into(),
            tail,
            follow: false,
        })
        .await
        .expect("Logs")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(line) = stream.message().await.expect("Logs stream") {
        lines.push(line);
    }
    lines
}

/// The Status of one model; panics when the supervisor does not list it.
pub async fn model_status(client: &SupervisorClient, name: &str) -> pb::ModelStatus {
    status(client)
        .await
        .models
        .into_iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("model {name} not in Status"))
}

/// Waits until `name` is in `state`.
pub async fn wait_state(
    client: &SupervisorClient,
    name: &str,
    state: pb::ModelState,
) -> pb::ModelStatus {
    crate::wait_for(
        &format!("{name} to be {state:?}"),
        DEADLINE,
        || async move {
            let model = model_status(client, name).await;
            (model.state() == state).then_some(model)
        },
    )
    .await
}

/// Every start the supervisor reported on its Watch stream, in order (each start has a
/// new generation).
#[derive(Default)]
pub struct StartLog {
    pub starts: Vec<String>,
}

/// Records each model start that the supervisor behind `client` reports, until its Watch
/// stream ends; spawn it once per supervisor run.
pub async fn follow_starts(client: SupervisorClient, log: Arc<Mutex<StartLog>>) {
    let mut client = client;
    let Ok(response) = client.watch(pb::WatchRequest {}).await else {
        return;
    };
    let mut stream = response.into_inner();
    // Generations are per supervisor run: a restarted supervisor counts afresh.
    let mut generations: HashMap<String, u64> = HashMap::new();
    while let Ok(Some(event)) = stream.message().await {
        let statuses = match event.event {
            Some(pb::watch_event::Event::Snapshot(s)) => s.models,
            Some(pb::watch_event::Event::Changed(m)) => vec![m],
            _ => continue,
        };
        let mut log = log.lock().unwrap();
        for status in statuses {
            if status.generation == 0 {
                continue;
            }
            let before = generations.insert(status.name.clone(), status.generation);
            if before != Some(status.generation) {
                log.starts.push(status.name.clone());
            }
        }
    }
}
