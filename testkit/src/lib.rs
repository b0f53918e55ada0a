//! Test support shared by the integration tests of every crate: they start the
//! real binaries over real sockets, so this finds the binaries, hands out
//! ports without races, waits on conditions (never fixed sleeps) and inspects
//! process trees.

use std::{
    fs::File,
    net::TcpListener,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

mod answers;
mod ctl;
pub mod http;
mod mock;
mod process;
mod promtool;
mod stack;
mod supervisor;

pub use answers::{
    chat_body, error_chain, is_progress, listed, listed_ids, model_entry, partial_stream_content,
    sse_data, stream_content,
};
pub use ctl::{run_ctl, run_ctl_line, run_ctl_within};
pub use mock::{MARKER_ENV, MockModel, key_of, lines_with_defaults, stack_sections, toml_list};
pub use process::{
    alive, cmdline, env_var, open_fds, open_files_limit, parent, proc_status, process, process_ids,
    processes_with_marker, rss_bytes, starttime, stat,
};
pub use promtool::promtool_check;
pub use stack::{StackBase, StackBuilder, StartStack};
pub use supervisor::{
    StartLog, append_log, follow_starts, log_lines, model_status, status, supervisor_client,
    supervisor_command, wait_state, wait_until_answering,
};

/// A generous deadline: tests run on loaded 2-core machines.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// The path of a workspace binary (`gpuswap-supervisor`, `gpuswap-mock-backend`, ...).
///
/// `cargo test --workspace` builds every binary before it runs any test; a
/// narrower run needs `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// The name libtest gives the test `name` of the module `module` (the caller's
/// `module_path!()`): a crate's integration tests are one binary (`tests/it/main.rs`), whose
/// tests are named by their module path without the crate's own name. A test that runs one
/// of its binary's tests in a child process (another user, an environment of its own, a
/// process-wide subscriber) names it so for `--exact`.
pub fn test_name(module: &str, name: &str) -> String {
    match module.split_once("::") {
        Some((_crate, path)) => format!("{path}::{name}"),
        None => name.to_owned(),
    }
}

/// Runs the test `name` of the caller's module (`module_path!()`) alone in a new process of
/// this test binary, with `configure` applied to its command (its environment); fails unless
/// it ran and passed. For a test whose body changes what the whole process shares (the
/// process environment, which the other tests' children would inherit).
pub fn run_test_in_child(
    module: &str,
    name: &str,
    configure: impl FnOnce(&mut std::process::Command),
) {
    let test = test_name(module, name);
    let mut command = std::process::Command::new(std::env::current_exe().expect("current_exe"));
    command.args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"]);
    configure(&mut command);
    let output = command.output().expect("run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "the child running {test} failed: {}",
        described(&output)
    );
}

/// Ports held for the whole test process: a lock file per port makes
/// allocation race-free across the many test processes that run at once.
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// A TCP port on 127.0.0.1 that no other test process holds and nothing listens on.
/// Drawn below the kernel's ephemeral range, so outgoing connections never take it.
pub fn free_port() -> u16 {
    let dir = std::env::temp_dir().join("gpuswap-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock dir");
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..10_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 12_000 + (x % 20_000) as u16;
        let file = File::create(dir.join(format!("{port}.lock"))).expect("port lock file");
        // SAFETY: flock on a file descriptor we own.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !locked {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            HELD.lock().unwrap().push(file);
            return port;
        }
    }
    panic!("no free port found");
}

/// Fails the test, saying why, unless it runs as root. Tests that take other users'
/// identities need root, and CI runs as root: a test that passed without running would
/// hide that. Leave one out by name where root is not to be had (`-- --skip NAME`).
pub fn require_root(why: &str) {
    // SAFETY: geteuid(2) cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root ({why}); CI runs as root. Run it as root, or leave it out with `-- --skip TEST_NAME`"
    );
}

/// Polls `check` until it returns Some, or panics after `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Blocking variant of [`wait_for`] for synchronous tests.
pub fn wait_for_blocking<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A unique marker for [`processes_with_marker`].
pub fn unique_marker(test: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("gpuswap-test-{test}-{}-{n}", std::process::id())
}

/// A child process killed (with its whole process group) when dropped.
pub struct Proc {
    pub child: std::process::Child,
    group: bool,
}

impl Proc {
    /// Spawns `cmd` in its own process group.
    pub fn spawn(mut cmd: std::process::Command) -> Self {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self { child, group: true }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process alone.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        wait_for_blocking("process exit", deadline, || {
            self.child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.group {
            // SAFETY: plain killpg(2) on the group we created.
            unsafe { libc::killpg(self.child.id() as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory for sockets, configs and state files (short path:
/// Unix socket paths are limited to 108 bytes).
pub fn short_tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("gs")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

/// Reads a file written by a process under test, for assertion messages.
pub fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last lines of each log (a file written by a process under test), for assertion
/// messages.
pub fn log_tails<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> String {
    let mut text = String::new();
    for path in paths {
        let path = path.as_ref();
        let log = read_lossy(path);
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        text.push_str(&format!("\n--- {} (last lines)\n", path.display()));
        for line in tail.into_iter().rev() {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// What a finished process left: its exit status, stdout and stderr, for assertion messages.
pub fn described(output: &std::process::Output) -> String {
    format!(
        "{}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that a finished process (`what`: which one) succeeded; shows what it left
/// otherwise.
#[track_caller]
pub fn assert_success(output: &std::process::Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        described(output)
    );
}

/// Asserts that none of `total` tries failed; otherwise says how many did (`what` went
/// wrong), the first five failures, and `context`.
#[track_caller]
pub fn assert_none_failed<T: std::fmt::Debug>(
    failures: &[T],
    total: usize,
    what: &str,
    context: &str,
) {
    assert!(
        failures.is_empty(),
        "{} of {total} {what}, first: {:?}{context}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// Parses one JSON value, panicking with the text on failure.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
