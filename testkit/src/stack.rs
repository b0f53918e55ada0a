//! What the gateway's integration tests and the end-to-end suite build alike: a supervisor
//! on a Unix socket with mock backends, and the configuration its gateways share. Each
//! harness wraps a [`StackBase`] in its own stack (its gateways, its HTTP client).

use std::{
    future::Future,
    marker::PhantomData,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use gpuswap::{SupervisorClient, pb};

use crate::{MockModel, Proc, StartLog};

/// Starts the stack that a [`StackBuilder`] describes: each harness implements it for its
/// own stack, so that `Stack::builder(..).model(..).start().await` reads the same in both.
pub trait StartStack: Sized {
    fn start(builder: StackBuilder<Self>) -> impl Future<Output = Self>;
}

/// The extra configuration lines, gateway environment and models of one test's stack `S`.
pub struct StackBuilder<S> {
    test: String,
    supervisor: Vec<String>,
    gateway: Vec<String>,
    gateway_env: Vec<(String, String)>,
    models: Vec<MockModel>,
    stack: PhantomData<fn() -> S>,
}

impl<S> StackBuilder<S> {
    /// A stack named after `test` (its processes carry a marker made from it).
    pub fn new(test: &str) -> Self {
        StackBuilder {
            test: test.into(),
            supervisor: Vec::new(),
            gateway: Vec::new(),
            gateway_env: Vec::new(),
            models: Vec::new(),
            stack: PhantomData,
        }
    }

    /// An extra (or overriding) `[supervisor]` line.
    pub fn supervisor(mut self, line: &str) -> Self {
        self.supervisor.push(line.into());
        self
    }

    /// An extra (or overriding) `[gateway]` line.
    pub fn gateway(mut self, line: &str) -> Self {
        self.gateway.push(line.into());
        self
    }

    /// An environment variable of every gateway.
    pub fn gateway_env(mut self, name: &str, value: &str) -> Self {
        self.gateway_env.push((name.into(), value.into()));
        self
    }

    pub fn model(mut self, model: MockModel) -> Self {
        self.models.push(model);
        self
    }

    /// Writes the configuration into a new temporary directory (`log_lines` in
    /// `[supervisor]`; each model's table is `render(model, stack_marker)`); starts nothing.
    pub fn write(self, log_lines: u32, render: impl Fn(&MockModel, &str) -> String) -> StackBase {
        let dir = crate::short_tempdir();
        let socket = dir.path().join("s.sock");
        let client = crate::supervisor_client(&socket);
        let marker = crate::unique_marker(&self.test);
        let mut config = crate::stack_sections(
            &socket,
            &dir.path().join("state.json"),
            log_lines,
            &self.supervisor,
            &self.gateway,
        );
        for model in &self.models {
            config.push_str(&render(model, &marker));
        }
        let config_path = dir.path().join("gpuswap.toml");
        std::fs::write(&config_path, config).expect("write config");
        StackBase {
            dir,
            config_path,
            socket,
            marker,
            models: self.models,
            supervisor: None,
            client,
            starts: Arc::default(),
            gateway_env: self.gateway_env,
        }
    }
}

impl<S: StartStack> StackBuilder<S> {
    /// Starts the stack, as its harness's [`StartStack`] says.
    pub async fn start(self) -> S {
        S::start(self).await
    }
}

/// The supervisor half of a test stack: its directory, configuration, models and client.
pub struct StackBase {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    /// The supervisor listens here.
    pub socket: PathBuf,
    pub marker: String,
    pub models: Vec<MockModel>,
    pub supervisor: Option<Proc>,
    pub client: SupervisorClient,
    starts: Arc<Mutex<StartLog>>,
    gateway_env: Vec<(String, String)>,
}

impl StackBase {
    pub fn model(&self, name: &str) -> &MockModel {
        self.models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no model {name}"))
    }

    /// Starts (or restarts) the supervisor through `spawn` with `RUST_LOG=rust_log`, its
    /// output appended to `supervisor.log`, and waits until it answers; follows its Watch
    /// stream to record starts.
    pub async fn start_supervisor_with(
        &mut self,
        rust_log: &str,
        spawn: impl FnOnce(Command) -> Proc,
    ) {
        let log = self.dir.path().join("supervisor.log");
        let out = crate::append_log(&log);
        let mut command = crate::supervisor_command(&self.config_path, rust_log);
        command.stdout(out.try_clone().expect("log fd")).stderr(out);
        let proc = self.supervisor.insert(spawn(command));
        crate::wait_until_answering(&self.client, proc, &log).await;
        tokio::spawn(crate::follow_starts(
            self.client.clone(),
            Arc::clone(&self.starts),
        ));
    }

    /// The log of a gateway (the `n`th one, or the `n`th run of one): `gatewayN.log`.
    pub fn gateway_log(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("gateway{n}.log"))
    }

    /// `gpuswap-gateway` on the shared configuration, listening on `port` with the
    /// stack's gateway environment; its stderr goes to `log` (made afresh).
    pub fn gateway_command(&self, port: u16, log: &Path) -> Command {
        self.gateway_command_on(&format!("127.0.0.1:{port}"), log)
    }

    /// As [`gateway_command`](Self::gateway_command), listening on `listen` (`ip:port`: the
    /// picker's tests put each box's gateway on its own loopback address).
    pub fn gateway_command_on(&self, listen: &str, log: &Path) -> Command {
        let stderr = std::fs::File::create(log).expect("gateway log");
        let mut command = Command::new(crate::bin("gpuswap-gateway"));
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(listen)
            .env("RUST_LOG", "info,gpuswap_gateway=debug")
            .envs(self.gateway_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        command
    }

    /// The last lines of the supervisor's log and of `gateway_logs`, for assertion messages.
    pub fn logs_with(&self, gateway_logs: impl IntoIterator<Item = PathBuf>) -> String {
        crate::log_tails(
            std::iter::once(self.dir.path().join("supervisor.log")).chain(gateway_logs),
        )
    }

    /// Models started so far, in order (from the supervisor's Watch stream).
    pub fn starts(&self) -> Vec<String> {
        self.starts.lock().unwrap().starts.clone()
    }

    pub async fn statuses(&self) -> pb::StatusResponse {
        crate::status(&self.client).await
    }

    pub async fn status(&self, model: &str) -> pb::ModelStatus {
        crate::model_status(&self.client, model).await
    }

    pub async fn wait_state(&self, model: &str, state: pb::ModelState) -> pb::ModelStatus {
        crate::wait_state(&self.client, model, state).await
    }

    /// Asserts that `model` is ready in the process and generation it had (`before`): it
    /// woke, it was not started again. `context` for the message.
    pub async fn assert_woke_in_place(&self, model: &str, before: &pb::ModelStatus, context: &str) {
        let awake = self.status(model).await;
        assert_eq!(
            (awake.state(), awake.pid, awake.generation),
            (pb::ModelState::Ready, before.pid, before.generation),
            "{context}"
        );
    }
}

/// Makes a harness's `$stack` a stack over the [`StackBase`] in its field `$base`: it derefs
/// to that base (so `stack.status(..)`, `stack.client` work on it) and has
/// `$stack::builder(test)`.
#[macro_export]
macro_rules! stack_over_base {
    ($stack:ty, $base:ident) => {
        impl ::std::ops::Deref for $stack {
            type Target = $crate::StackBase;

            fn deref(&self) -> &$crate::StackBase {
                &self.$base
            }
        }

        impl ::std::ops::DerefMut for $stack {
            fn deref_mut(&mut self) -> &mut $crate::StackBase {
                &mut self.$base
            }
        }

        impl $stack {
            pub fn builder(test: &str) -> $crate::StackBuilder<$stack> {
                $crate::StackBuilder::new(test)
            }
        }
    };
}
