//! Harness of the supervisor's integration tests: the real supervisor binary, real mock
//! backends, a real Unix socket.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use gpuswap::{
    SupervisorClient,
    pb::{self, activate_event::Event},
};
use testkit::{DEADLINE, Proc};

/// The variable that tags every backend process of one test (see `processes_with_marker`).
#[allow(unused_imports)] // lifecycle.rs tags a process of its own
pub use testkit::MARKER_ENV;

pub fn supervisor_exe() -> &'static str {
    env!("CARGO_BIN_EXE_gpuswap-supervisor")
}

/// One model served by a mock backend (testkit's: vLLM-like, GPU 0, loads in 300 ms).
pub type Mock = testkit::MockModel;

/// A running supervisor with its own directory, socket, state file and marker.
pub struct Supervisor {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub state_path: PathBuf,
    pub stderr_path: PathBuf,
    pub marker: String,
    pub settings: Vec<String>,
    /// Extra environment of the supervisor process.
    pub env: Vec<(String, String)>,
    pub models: Vec<Mock>,
    pub proc: Option<Proc>,
    pub client: SupervisorClient,
}

impl Supervisor {
    /// Starts a supervisor for `models`; `settings` are extra `[supervisor]` lines.
    pub async fn start(test: &str, settings: &[&str], models: Vec<Mock>) -> Supervisor {
        let supervisor = Self::prepare(test, settings, models);
        supervisor.write_config();
        supervisor.launch().await
    }

    /// Everything but the process: the config is written by `write_config`.
    pub fn prepare(test: &str, settings: &[&str], models: Vec<Mock>) -> Supervisor {
        let dir = testkit::short_tempdir();
        let socket = dir.path().join("s.sock");
        let client = testkit::supervisor_client(&socket);
        Supervisor {
            config_path: dir.path().join("gpuswap.toml"),
            state_path: dir.path().join("state.json"),
            stderr_path: dir.path().join("supervisor.log"),
            socket,
            marker: testkit::unique_marker(test),
            settings: settings.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            models,
            proc: None,
            client,
            dir,
        }
    }

    pub fn config_text(&self) -> String {
        let defaults = [
            format!("listen = \"unix://{}\"", self.socket.display()),
            format!("state_file = \"{}\"", self.state_path.display()),
            "min_residency = \"0s\"".to_owned(),
            "drain_timeout = \"60s\"".to_owned(),
            "log_lines = 500".to_owned(),
        ];
        let mut text = String::from("[supervisor]\n");
        text.push_str(&testkit::lines_with_defaults(&defaults, &self.settings));
        for model in &self.models {
            text.push_str(&model.render(&self.marker));
        }
        text
    }

    pub fn write_config(&self) {
        std::fs::write(&self.config_path, self.config_text()).expect("write config");
    }

    /// Spawns the supervisor and waits until its socket answers Status.
    pub async fn launch(mut self) -> Supervisor {
        let mut proc = self.spawn_process();
        testkit::wait_until_answering(&self.client, &mut proc, &self.stderr_path).await;
        self.proc = Some(proc);
        self
    }

    /// The supervisor process for this config (stderr appended to `stderr_path`).
    pub fn spawn_process(&self) -> Proc {
        Proc::spawn(self.command())
    }

    /// The command `spawn_process` runs, for a test to add flags to.
    pub fn command(&self) -> Command {
        let mut command =
            testkit::supervisor_command(&self.config_path, "info,gpuswap_supervisor=debug");
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(testkit::append_log(&self.stderr_path));
        command
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().expect("running").pid()
    }

    pub fn log(&self) -> String {
        testkit::read_lossy(&self.stderr_path)
    }

    pub fn mock(&self, name: &str) -> &Mock {
        self.models
            .iter()
            .find(|m| m.name == name)
            .expect("configured mock")
    }

    pub async fn status(&self) -> pb::StatusResponse {
        testkit::status(&self.client).await
    }

    pub async fn model(&self, name: &str) -> pb::ModelStatus {
        testkit::model_status(&self.client, name).await
    }

    pub async fn state(&self, name: &str) -> pb::ModelState {
        self.model(name).await.state()
    }

    /// Waits until `name` is in `state`.
    pub async fn wait_state(&self, name: &str, state: pb::ModelState) -> pb::ModelStatus {
        testkit::wait_state(&self.client, name, state).await
    }

    pub async fn activate(&self, model: &str, hold: bool) -> Activation {
        self.activate_with(pb::ActivateRequest {
            model: model.into(),
            hold,
            force: false,
            client: "test".into(),
        })
        .await
        .expect("Activate accepted")
    }

    pub async fn activate_with(
        &self,
        request: pb::ActivateRequest,
    ) -> Result<Activation, tonic::Status> {
        activate_on(&self.client, request).await
    }

    /// Reads the configuration file again; panics when the supervisor refuses it.
    pub async fn reload(&self) -> pb::ReloadResponse {
        let mut client = self.client.clone();
        client
            .reload(pb::ReloadRequest {})
            .await
            .expect("Reload")
            .into_inner()
    }

    /// Writes the configuration as it is now, then reloads it.
    pub async fn rewrite_and_reload(&self) -> pb::ReloadResponse {
        self.write_config();
        self.reload().await
    }

    /// The last `tail` lines kept of `model`'s log ("": every model's), oldest first.
    pub async fn log_lines(&self, model: &str, tail: u32) -> Vec<pb::LogLine> {
        testkit::log_lines(&self.client, model, tail).await
    }

    /// The text of the last `tail` lines kept of `model`'s log, oldest first.
    pub async fn log_text(&self, model: &str, tail: u32) -> Vec<String> {
        let lines = self.log_lines(model, tail).await;
        lines.into_iter().map(|line| line.line).collect()
    }

    pub async fn deactivate(&self, model: &str, force: bool) -> Vec<String> {
        self.deactivate_with(pb::DeactivateRequest {
            model: model.into(),
            all: model.is_empty(),
            force,
            if_idle_generation: None,
            sleep: false,
        })
        .await
    }

    pub async fn deactivate_with(&self, request: pb::DeactivateRequest) -> Vec<String> {
        let mut client = self.client.clone();
        tokio::time::timeout(DEADLINE, client.deactivate(request))
            .await
            .expect("Deactivate in time")
            .expect("Deactivate")
            .into_inner()
            .stopped
    }

    /// The live processes of this test's backends.
    pub fn backend_processes(&self) -> Vec<u32> {
        testkit::processes_with_marker(&self.marker)
    }

    /// Waits until no backend process of this test is left.
    pub async fn wait_no_backends(&self) {
        testkit::wait_for("no backend process left", DEADLINE, || async {
            self.backend_processes().is_empty().then_some(())
        })
        .await;
    }

    /// SIGTERM, expect exit 0 and no backend left.
    pub async fn terminate(&mut self) {
        let mut proc = self.proc.take().expect("running");
        proc.signal(libc::SIGTERM);
        let status = tokio::task::block_in_place(|| proc.wait_exit(DEADLINE));
        assert!(
            status.success(),
            "supervisor exit: {status}\n{}",
            self.log()
        );
        self.wait_no_backends().await;
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // The supervisor's death ends every guard (parent-death signal), and so every backend.
        drop(self.proc.take());
        if std::thread::panicking() {
            eprintln!("--- supervisor log ---\n{}", self.log());
        }
    }
}

pub async fn activate_on(
    client: &SupervisorClient,
    request: pb::ActivateRequest,
) -> Result<Activation, tonic::Status> {
    let mut client = client.clone();
    let stream = tokio::time::timeout(DEADLINE, client.activate(request))
        .await
        .expect("Activate answered in time")?
        .into_inner();
    Ok(Activation {
        stream,
        seen: Vec::new(),
    })
}

/// One Activate stream and the events read from it so far.
#[derive(Debug)]
pub struct Activation {
    pub stream: tonic::Streaming<pb::ActivateEvent>,
    pub seen: Vec<Event>,
}

impl Activation {
    /// The next event; None when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        let message = tokio::time::timeout(DEADLINE, self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("no event within {DEADLINE:?}; seen: {:?}", self.seen))
            .unwrap_or_else(|status| panic!("stream error {status:?}; seen: {:?}", self.seen))?;
        let event = message.event.expect("an event");
        self.seen.push(event.clone());
        Some(event)
    }

    /// Reads until `pick` matches; panics when the stream ends first.
    pub async fn until<T>(&mut self, what: &str, pick: impl Fn(&Event) -> Option<T>) -> T {
        loop {
            match self.next().await {
                Some(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                None => panic!("stream ended before {what}; seen: {:?}", self.seen),
            }
        }
    }

    pub async fn ready(&mut self) -> pb::Ready {
        loop {
            match self.next().await {
                Some(Event::Ready(ready)) => return ready,
                Some(Event::Failed(failed)) => panic!("Failed instead of Ready: {failed:?}"),
                Some(_) => {}
                None => panic!("stream ended before Ready; seen: {:?}", self.seen),
            }
        }
    }

    pub async fn failed(&mut self) -> pb::Failed {
        self.until("Failed", |e| match e {
            Event::Failed(failed) => Some(failed.clone()),
            Event::Ready(ready) => panic!("Ready instead of Failed: {ready:?}"),
            _ => None,
        })
        .await
    }

    pub fn saw(&self, pick: impl Fn(&Event) -> bool) -> bool {
        self.seen.iter().any(pick)
    }
}

/// Methods of [`Activation`] that read until the first event of one kind and return it.
macro_rules! read_until {
    ($($(#[$doc:meta])* $method:ident: $kind:ident;)*) => {
        impl Activation {
            $(
                $(#[$doc])*
                pub async fn $method(&mut self) -> pb::$kind {
                    self.until(stringify!($kind), |e| match e {
                        Event::$kind(event) => Some(event.clone()),
                        _ => None,
                    })
                    .await
                }
            )*
        }
    };
}

read_until! {
    /// Reads until the hold is lost.
    hold_lost: HoldLost;
    /// Reads until the holder is asked to let go.
    drain_requested: DrainRequested;
    /// Reads until the waiter is told what it waits behind.
    queued: Queued;
    /// Reads until the waiter is told a model in its way drains.
    draining: Draining;
}

/// One request to a backend at `address` (`host:port`) over a fresh connection
/// (`Connection: close`): (status, body); Err when nothing answered or the body broke.
pub async fn http(
    address: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let method = method.parse().expect("an HTTP method");
    let request = testkit::http::client()
        .request(method, format!("http://{address}{path}"))
        .header("connection", "close")
        .header("content-type", "application/json")
        .body(body.unwrap_or("").to_owned());
    let reply = testkit::http::send(request).await;
    match reply.error {
        Some(error) => Err(error),
        None => Ok((reply.status, reply.text)),
    }
}

/// Runs the supervisor binary to its end (bad configs): (exit code, stderr).
pub fn run_to_exit(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let stderr_path = dir.join("run.stderr");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut command = Command::new(supervisor_exe());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut proc = Proc::spawn(command);
    let status = proc.wait_exit(DEADLINE);
    (status.code(), testkit::read_lossy(&stderr_path))
}
