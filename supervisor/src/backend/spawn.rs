//! Starting a backend: checks, the guard's launch, the output captured into the model's log,
//! the task that owns the guard and publishes its exit.

use std::{
    collections::BTreeMap,
    os::{fd::OwnedFd, unix::process::ExitStatusExt},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuswap::{config::ModelConfig, pb::LogStream};
use nix::{
    sys::signal::{Signal, killpg},
    unistd::{Pid, User},
};
use tokio::{
    io::{AsyncRead, BufReader},
    sync::watch,
    task::JoinHandle,
};

use super::{
    Backend, ExitInfo, Inner, StartError, UNKNOWN_EXIT,
    env::shell_words,
    forker,
    guard_launch::{self, GuardReport},
    handle::start_of,
    logs::{LogBuffer, read_lines},
    ports,
    state_file::StateFile,
};

/// How long `spawn` waits for the guard to report the backend's pid.
const GUARD_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the output readers may take to drain after the guard exited.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Everything needed to start one model.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub model: String,
    pub config: ModelConfig,
    /// The supervisor's own executable, run as `guard` to parent the backend.
    pub guard_exe: PathBuf,
    /// How long a stop waits for the GPU memory of the stopped processes to be freed.
    pub gpu_release_timeout: Duration,
    /// Where the guard's process group is recorded while it runs (None: nowhere), so a
    /// restarted supervisor can end it if this one dies without ending it.
    pub state_file: Option<Arc<StateFile>>,
}

impl LaunchSpec {
    /// A spec with the default GPU release timeout (10 s) and no state file.
    pub fn new(
        model: impl Into<String>,
        config: ModelConfig,
        guard_exe: impl Into<PathBuf>,
    ) -> Self {
        Self {
            model: model.into(),
            config,
            guard_exe: guard_exe.into(),
            gpu_release_timeout: Duration::from_secs(10),
            state_file: None,
        }
    }
}

impl Backend {
    /// Checks the port is free, spawns the guard and the backend in a new process group,
    /// and starts capturing stdout/stderr into `logs`. Returns once spawned.
    ///
    /// Must be called within a tokio runtime. The fork itself happens on one long-lived
    /// thread of the process (the parent-death signal fires when the *forking thread*
    /// exits), so any calling thread is fine, `spawn_blocking` included. Blocks the caller
    /// briefly (a few ms) until the guard reports the backend's pid, which also turns a
    /// missing program into an error here.
    pub fn spawn(spec: &LaunchSpec, logs: LogBuffer) -> Result<Backend, StartError> {
        let config = &spec.config;
        let program = program_of(config)?;
        ports::ensure_port_free(&config.host, config.port)?;
        let user = run_as(config)?;
        check_workdir(config, program)?;

        let (report_read, report_write) =
            guard_launch::report_pipe().map_err(|source| StartError::Spawn {
                program: program.clone(),
                source,
            })?;
        let command = guard_launch::guard_command(spec, user.as_ref(), &report_write);
        // The log buffer masks the backend's API key (see `LogBuffer::set_secrets`).
        logs.push(
            LogStream::Supervisor,
            format!("starting: {}", shell_words(&config.command)),
        );
        let mut child = fork_guard(spec, command, &logs)?;
        drop(report_write);
        let guard_pid = guard_pid_of(spec, &child)?;
        let starttime = start_of(guard_pid);
        record_group(spec, guard_pid, starttime);

        let (readers, ready_log_seen) = capture_output(&mut child, config, &logs);
        let (exit_tx, exit) = watch::channel(None);
        let reaped = Arc::new(AtomicBool::new(false));
        tokio::spawn(own_guard(
            child,
            readers,
            logs.clone(),
            spec.state_file.clone(),
            reaped.clone(),
            exit_tx,
        ));

        let backend_pid = backend_pid_from_guard(report_read, program, guard_pid)?;
        record_backend(spec, guard_pid, backend_pid);
        Ok(Backend {
            inner: Arc::new(Inner {
                model: spec.model.clone(),
                config: config.clone(),
                gpu_release_timeout: spec.gpu_release_timeout,
                guard_pid,
                backend_pid,
                spawned_at: Instant::now(),
                logs,
                reaped,
                exit,
                ready_log_seen,
                stop: Mutex::new(None),
                seen_pids: Mutex::new(BTreeMap::from([
                    (guard_pid, starttime),
                    (backend_pid as i32, start_of(backend_pid as i32)),
                ])),
                state_file: spec.state_file.clone(),
            }),
        })
    }
}

/// The program the model runs (the first word of `command`).
fn program_of(config: &ModelConfig) -> Result<&String, StartError> {
    config.command.first().ok_or_else(|| StartError::Spawn {
        program: String::new(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
    })
}

/// The account of `user` (None: the supervisor's own).
fn run_as(config: &ModelConfig) -> Result<Option<User>, StartError> {
    let Some(name) = &config.user else {
        return Ok(None);
    };
    match User::from_name(name) {
        Ok(Some(user)) => Ok(Some(user)),
        _ => Err(StartError::NoSuchUser(name.clone())),
    }
}

fn check_workdir(config: &ModelConfig, program: &str) -> Result<(), StartError> {
    match &config.workdir {
        Some(dir) if !dir.is_dir() => Err(StartError::Spawn {
            program: format!("{program} in {}", dir.display()),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the working directory does not exist",
            ),
        }),
        _ => Ok(()),
    }
}

/// Forks the guard (on the forker thread).
fn fork_guard(
    spec: &LaunchSpec,
    command: tokio::process::Command,
    logs: &LogBuffer,
) -> Result<tokio::process::Child, StartError> {
    forker::spawn(command).map_err(|source| {
        logs.push(
            LogStream::Supervisor,
            format!("cannot start the guard: {source}"),
        );
        StartError::Spawn {
            program: spec.guard_exe.display().to_string(),
            source,
        }
    })
}

/// The guard's pid, which is also the process group of the whole tree.
fn guard_pid_of(spec: &LaunchSpec, child: &tokio::process::Child) -> Result<i32, StartError> {
    match child.id() {
        Some(pid) => Ok(pid as i32),
        None => Err(StartError::Spawn {
            program: spec.guard_exe.display().to_string(),
            source: std::io::Error::other("the guard exited at once"),
        }),
    }
}

/// Records the guard's group in the state file, for a successor's cleanup.
fn record_group(spec: &LaunchSpec, guard_pid: i32, starttime: u64) {
    if let Some(state) = &spec.state_file
        && let Err(e) = state.record(&spec.model, guard_pid, starttime)
    {
        tracing::warn!(model = %spec.model, path = %state.path().display(), "cannot record the process group: {e}");
    }
}

/// Records the backend leader in the state file.
fn record_backend(spec: &LaunchSpec, guard_pid: i32, backend_pid: u32) {
    if let Some(state) = &spec.state_file
        && let Err(e) = state.record_processes(guard_pid, &[backend_pid as i32])
    {
        tracing::warn!(model = %spec.model, path = %state.path().display(), "cannot record the backend's process: {e}");
    }
}

/// Reads stdout and stderr into `logs`, watching for the ready line if the model has one.
fn capture_output(
    child: &mut tokio::process::Child,
    config: &ModelConfig,
    logs: &LogBuffer,
) -> ([Option<JoinHandle<()>>; 2], watch::Receiver<bool>) {
    let (ready_tx, ready_log_seen) = watch::channel(false);
    let ready_tx = Arc::new(ready_tx);
    let needle = config.ready_log.clone().filter(|s| !s.is_empty());
    let readers = [
        child.stdout.take().map(|out| {
            spawn_reader(
                out,
                LogStream::Stdout,
                logs.clone(),
                needle.clone(),
                ready_tx.clone(),
            )
        }),
        child.stderr.take().map(|err| {
            spawn_reader(
                err,
                LogStream::Stderr,
                logs.clone(),
                needle.clone(),
                ready_tx.clone(),
            )
        }),
    ];
    (readers, ready_log_seen)
}

/// Waits for the guard's report: the backend's pid, or why it could not be started. A
/// guard that says nothing in time is killed with its group.
fn backend_pid_from_guard(
    report_read: OwnedFd,
    program: &str,
    guard_pid: i32,
) -> Result<u32, StartError> {
    match guard_launch::read_report(report_read, GUARD_REPORT_TIMEOUT) {
        Ok(GuardReport::Started(pid)) => Ok(pid),
        Ok(GuardReport::Failed(errno)) => Err(StartError::Spawn {
            program: program.to_owned(),
            source: std::io::Error::from_raw_os_error(errno),
        }),
        Err(e) => {
            let _ = killpg(Pid::from_raw(guard_pid), Signal::SIGKILL);
            Err(StartError::Spawn {
                program: program.to_owned(),
                source: std::io::Error::new(e.kind(), format!("the guard did not start it: {e}")),
            })
        }
    }
}

/// Waits for the guard, lets the output readers drain, then publishes the exit.
async fn own_guard(
    mut child: tokio::process::Child,
    readers: [Option<JoinHandle<()>>; 2],
    logs: LogBuffer,
    state_file: Option<Arc<StateFile>>,
    reaped: Arc<AtomicBool>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
) {
    let pgid = child.id().map_or(0, |id| id as i32);
    let info = match child.wait().await {
        Ok(status) => ExitInfo {
            code: status.code(),
            signal: status.signal(),
        },
        Err(e) => {
            logs.push(
                LogStream::Supervisor,
                format!("cannot wait for the guard: {e}"),
            );
            UNKNOWN_EXIT
        }
    };
    reaped.store(true, Ordering::SeqCst);
    // The guard exits after every descendant, so the pipes are at EOF or about to be;
    // bounded all the same, in case something outside the tree holds them open.
    let drain = async {
        for reader in readers.into_iter().flatten() {
            let _ = reader.await;
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN, drain).await;
    logs.push(LogStream::Supervisor, format!("exited: {info}"));
    if let Some(state) = state_file
        && let Err(e) = state.forget(pgid)
    {
        tracing::warn!(path = %state.path().display(), "cannot update the state file: {e}");
    }
    let _ = exit_tx.send(Some(info));
}

fn spawn_reader(
    stream: impl AsyncRead + Unpin + Send + 'static,
    kind: LogStream,
    logs: LogBuffer,
    ready_log: Option<String>,
    ready_tx: Arc<watch::Sender<bool>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let reader = BufReader::with_capacity(64 * 1024, stream);
        let result = read_lines(reader, |line| {
            if let Some(needle) = &ready_log
                && !*ready_tx.borrow()
                && line.contains(needle.as_str())
            {
                ready_tx.send_replace(true);
            }
            logs.push(kind, line);
        })
        .await;
        if let Err(e) = result {
            logs.push(
                LogStream::Supervisor,
                format!("cannot read the backend's {kind:?}: {e}"),
            );
        }
    })
}
