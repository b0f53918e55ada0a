//! Backend processes: spawn under a guard, probe readiness, stop the whole tree.
//!
//! The supervisor never runs a backend itself: it runs `gpuswap-supervisor guard -- CMD`
//! (see [`crate::guard`]) in a new process group with a parent-death signal, and the guard
//! runs the backend. One owner task per backend waits for the guard (never `waitpid(-1)`:
//! that would steal tokio's statuses) and publishes the exit on a watch channel.

use std::{
    collections::BTreeMap,
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuswap::{config::ModelConfig, pb::LogStream};
use nix::{
    errno::Errno,
    sys::signal::{Signal, kill, killpg},
    unistd::{Pid, User},
};
use tokio::{
    io::{AsyncRead, BufReader},
    sync::watch,
    task::JoinHandle,
};

use crate::{
    gpu,
    guard::{self, procfs},
    logs::{LogBuffer, read_lines},
    probe::{ProbeOutcome, ReadinessProbe},
    state_file::StateFile,
};

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

/// How a backend process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(c), _) => write!(f, "exit status {c}"),
            (None, Some(s)) => write!(f, "killed by signal {s}"),
            (None, None) => write!(f, "unknown exit"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("port {port} is already in use{detail} ; is another server running?")]
    PortBusy { port: u16, detail: String },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("user {0:?} does not exist")]
    NoSuchUser(String),
    /// Something answered the readiness probe, but the socket listening on the port is
    /// another process's (a server started on the port while this one loaded).
    #[error(
        "port {port} answered the readiness probe, but it is held by {holder}, not by the model's processes"
    )]
    PortTaken { port: u16, holder: String },
    #[error("backend exited while starting ({0})")]
    Exited(ExitInfo),
    /// It passed its readiness check, then its leader was gone before it could be Ready.
    #[error("backend exited right after passing its readiness check ({0})")]
    ExitedAfterReady(String),
    #[error("backend not ready after {0:?} (startup_timeout)")]
    Timeout(Duration),
    /// The process ran for the whole startup_timeout but nothing ever listened on its
    /// port (TabbyAPI silently moves to port+1 when its port is busy).
    #[error(
        "backend not ready after {timeout:?} (startup_timeout): it kept running but nothing ever listened on port {port}{hint}"
    )]
    NotListening {
        port: u16,
        timeout: Duration,
        hint: String,
    },
}

/// How long `spawn` waits for the guard to report the backend's pid.
const GUARD_REPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time the guard gets, after stop_timeout, to SIGKILL the tree itself.
const ESCALATION_MARGIN: Duration = Duration::from_secs(2);
/// After the supervisor's own SIGKILL, how long to wait for the guard to be reaped.
const BACKSTOP_WAIT: Duration = Duration::from_secs(10);
/// How long the output readers may take to drain after the guard exited.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);
/// How long a stop waits for the port to be bindable again.
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(5);
const PROBE_FIRST_PAUSE: Duration = Duration::from_millis(5);
const PROBE_MAX_PAUSE: Duration = Duration::from_millis(15);

/// A running (or exited) backend. Cheap to clone: every clone refers to the same process tree.
#[derive(Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    model: String,
    config: ModelConfig,
    gpu_release_timeout: Duration,
    guard_pid: i32,
    backend_pid: u32,
    spawned_at: Instant,
    logs: LogBuffer,
    /// Set by the owner task the moment the guard is reaped: its pgid may be reused after.
    reaped: Arc<AtomicBool>,
    exit: watch::Receiver<Option<ExitInfo>>,
    ready_log_seen: watch::Receiver<bool>,
    /// The one stop in progress or done; later callers wait on it.
    stop: Mutex<Option<watch::Receiver<Option<ExitInfo>>>>,
    /// Every pid seen in the tree (guard, backend, workers) with its start time (0:
    /// unknown): who may still hold GPU memory after a stop, even the workers of a backend
    /// that crashed before it, and who may be killed once the guard is gone.
    seen_pids: Mutex<BTreeMap<i32, u64>>,
    /// Where the tree's processes are recorded for a successor's cleanup.
    state_file: Option<Arc<StateFile>>,
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
        let Some(program) = config.command.first() else {
            return Err(StartError::Spawn {
                program: String::new(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
            });
        };
        ensure_port_free(&config.host, config.port)?;
        let user = match &config.user {
            Some(name) => Some(match User::from_name(name) {
                Ok(Some(user)) => user,
                _ => return Err(StartError::NoSuchUser(name.clone())),
            }),
            None => None,
        };
        if let Some(dir) = &config.workdir
            && !dir.is_dir()
        {
            return Err(StartError::Spawn {
                program: format!("{program} in {}", dir.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the working directory does not exist",
                ),
            });
        }

        let (report_read, report_write) = report_pipe().map_err(|source| StartError::Spawn {
            program: program.clone(),
            source,
        })?;
        let mut command = tokio::process::Command::new(&spec.guard_exe);
        command.arg("guard");
        command.args([
            "--stop-timeout-ms",
            &config.stop_timeout.as_millis().to_string(),
        ]);
        command.args(["--report-fd", &report_write.as_raw_fd().to_string()]);
        let supervisor_pid = nix::unistd::getpid().as_raw();
        command.args(["--supervisor-pid", &supervisor_pid.to_string()]);
        if let Some(user) = &user {
            command.args([
                "--uid",
                &user.uid.to_string(),
                "--gid",
                &user.gid.to_string(),
            ]);
        }
        if let Some(dir) = &config.workdir {
            command.arg("--workdir").arg(dir);
        }
        command.arg("--").args(&config.command);
        command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_clear()
            .envs(backend_env(config, user.as_ref()));
        let report_fd = report_write.as_raw_fd();
        let blocked = *guard::guarded_signals().as_ref();
        // SAFETY: the closure runs between fork and exec and makes only async-signal-safe
        // system calls on values prepared before the fork; it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // The guard inherits the report pipe's write end.
                if libc::fcntl(report_fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Signals the guard takes with sigwait stay pending until it does.
                libc::sigprocmask(libc::SIG_BLOCK, &blocked, std::ptr::null_mut());
                let death = guard::PARENT_DEATH_SIGNAL as libc::c_int as libc::c_ulong;
                if libc::prctl(libc::PR_SET_PDEATHSIG, death) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != supervisor_pid {
                    // The supervisor died between fork and prctl: no signal will come.
                    libc::_exit(1);
                }
                Ok(())
            });
        }

        // The log buffer masks the backend's API key (see `LogBuffer::set_secrets`).
        logs.push(
            LogStream::Supervisor,
            format!("starting: {}", shell_words(&config.command)),
        );
        let mut child = forker::spawn(command).map_err(|source| {
            logs.push(
                LogStream::Supervisor,
                format!("cannot start the guard: {source}"),
            );
            StartError::Spawn {
                program: spec.guard_exe.display().to_string(),
                source,
            }
        })?;
        drop(report_write);
        let Some(guard_pid) = child.id() else {
            return Err(StartError::Spawn {
                program: spec.guard_exe.display().to_string(),
                source: std::io::Error::other("the guard exited at once"),
            });
        };
        let guard_pid = guard_pid as i32;
        let starttime = procfs::stat(guard_pid).map_or(0, |s| s.starttime);
        if let Some(state) = &spec.state_file
            && let Err(e) = state.record(&spec.model, guard_pid, starttime)
        {
            tracing::warn!(model = %spec.model, path = %state.path().display(), "cannot record the process group: {e}");
        }

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

        let backend_pid = match read_report(report_read, GUARD_REPORT_TIMEOUT) {
            Ok(GuardReport::Started(pid)) => pid,
            Ok(GuardReport::Failed(errno)) => {
                return Err(StartError::Spawn {
                    program: program.clone(),
                    source: std::io::Error::from_raw_os_error(errno),
                });
            }
            Err(e) => {
                let _ = killpg(Pid::from_raw(guard_pid), Signal::SIGKILL);
                return Err(StartError::Spawn {
                    program: program.clone(),
                    source: std::io::Error::new(
                        e.kind(),
                        format!("the guard did not start it: {e}"),
                    ),
                });
            }
        };
        if let Some(state) = &spec.state_file
            && let Err(e) = state.record_processes(guard_pid, &[backend_pid as i32])
        {
            tracing::warn!(model = %spec.model, path = %state.path().display(), "cannot record the backend's process: {e}");
        }
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

    /// The backend's pid (the guard's child).
    pub fn pid(&self) -> u32 {
        self.inner.backend_pid
    }

    /// The process group (the guard's pid).
    pub fn pgid(&self) -> i32 {
        self.inner.guard_pid
    }

    /// The model this backend serves.
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &ModelConfig {
        &self.inner.config
    }

    /// Resolves once the process tree has exited, by itself or by a stop. Cancel-safe.
    pub async fn exited(&self) -> ExitInfo {
        let mut exit = self.inner.exit.clone();
        let outcome = exit
            .wait_for(Option::is_some)
            .await
            .map(|info| info.clone());
        match outcome {
            Ok(info) => info.unwrap_or(UNKNOWN_EXIT),
            // The owner task is gone without a word: the runtime is shutting down.
            Err(_) => UNKNOWN_EXIT,
        }
    }

    /// The exit, if it already happened.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        self.inner.exit.borrow().clone()
    }

    /// Why the backend leader is gone, or None while it lives. The leader is the guard's
    /// child: its pid stays its own until the guard reaps it, and the guard exits (which
    /// `exit_info` shows) right after.
    pub fn leader_gone(&self) -> Option<String> {
        if let Some(info) = self.exit_info() {
            return Some(info.to_string());
        }
        (!procfs::alive(self.inner.backend_pid as i32))
            .then(|| format!("process {} is gone", self.inner.backend_pid))
    }

    /// Probes readiness for the model's kind until ready. Fails at once when the process
    /// exits, or after startup_timeout.
    pub async fn wait_ready(&self) -> Result<(), StartError> {
        let config = &self.inner.config;
        let timeout = config.startup_timeout;
        let deadline = tokio::time::Instant::from_std(self.inner.spawned_at + timeout);
        let probe = ReadinessProbe::new(config);
        // Atomic and Mutex (not Cell/RefCell) keep this future Send: the scheduler spawns it.
        let ever_listened = std::sync::atomic::AtomicBool::new(false);
        let last_outcome = std::sync::Mutex::new(None::<ProbeOutcome>);
        // A server prints a line at the moment it starts to listen or finishes warming up
        // ("Uvicorn running on", "Application startup complete", "fired up"): probe at once
        // then instead of waiting out the pause.
        let mut lines = self.inner.logs.subscribe();
        let probing = async {
            let mut pause = PROBE_FIRST_PAUSE;
            let mut addr = None;
            loop {
                if addr.is_none() {
                    match probe.resolve().await {
                        Ok(a) => addr = Some(a),
                        Err(e) => {
                            *last_outcome.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(ProbeOutcome::NoAnswer(e.to_string()))
                        }
                    }
                }
                if let Some(addr) = addr {
                    let outcome = probe.probe(addr).await;
                    if outcome.is_ready() {
                        return;
                    }
                    if outcome.listening() {
                        ever_listened.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    *last_outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(outcome);
                }
                tokio::select! {
                    () = tokio::time::sleep(pause) => pause = (pause * 2).min(PROBE_MAX_PAUSE),
                    line = lines.recv() => {
                        // A burst of lines (a log flood) must not turn into a burst of probes.
                        lines = lines.resubscribe();
                        if matches!(line, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            tokio::time::sleep(pause).await;
                        } else {
                            tokio::time::sleep(PROBE_FIRST_PAUSE / 5).await;
                        }
                    }
                }
            }
        };
        let mut ready_log_seen = self.inner.ready_log_seen.clone();
        let ready_log = async {
            if config.ready_log.as_deref().is_some_and(|s| !s.is_empty())
                && ready_log_seen.wait_for(|seen| *seen).await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await
        };
        let outcome = tokio::select! {
            biased;
            info = self.exited() => Err(StartError::Exited(info)),
            () = ready_log => Ok(()),
            () = probing => Ok(()),
            () = tokio::time::sleep_until(deadline) => {
                let last = last_outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
                Err(self.not_ready(&probe, ever_listened.load(std::sync::atomic::Ordering::Relaxed), last).await)
            }
        };
        if outcome.is_ok() {
            // The workers exist by now (servers fork them while loading).
            self.remember_tree();
            self.check_port_owner(&probe).await?;
        }
        outcome
    }

    /// Ready only when the socket that answered is the model's own: a 200 from whatever
    /// holds the port (another model, a stray server) would route its clients elsewhere.
    async fn check_port_owner(&self, probe: &ReadinessProbe) -> Result<(), StartError> {
        let port = self.inner.config.port;
        let addr = probe.resolve().await.ok();
        let backend = self.clone();
        let owner = tokio::task::spawn_blocking(move || {
            let tree = backend.tree_pids();
            port_holder::owner(addr, port, &tree)
        })
        .await
        .unwrap_or_else(|e| port_holder::Owner::Unknown(e.to_string()));
        match owner {
            port_holder::Owner::Tree => Ok(()),
            port_holder::Owner::Unknown(why) => {
                self.inner.logs.push(
                    LogStream::Supervisor,
                    format!("cannot tell which process listens on port {port} ({why}): taking the answer as the model's"),
                );
                Ok(())
            }
            port_holder::Owner::Foreign(holder) => {
                let error = StartError::PortTaken { port, holder };
                self.inner
                    .logs
                    .push(LogStream::Supervisor, error.to_string());
                Err(error)
            }
        }
    }

    /// The guard and its live descendants; empty once the guard was reaped (its pid may
    /// name another process by then).
    fn tree_pids(&self) -> Vec<i32> {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return Vec::new();
        }
        let mut tree = procfs::descendants(self.inner.guard_pid);
        tree.push(self.inner.guard_pid);
        tree
    }

    /// Adds the tree's live pids to those seen. Not after the guard was reaped: its pid,
    /// and so the walk from it, may belong to another process by then.
    fn remember_tree(&self) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        let live = procfs::descendants(self.inner.guard_pid);
        if let Some(state) = &self.inner.state_file
            && let Err(e) = state.record_processes(self.inner.guard_pid, &live)
        {
            tracing::warn!(model = %self.inner.model, path = %state.path().display(), "cannot record the tree's processes: {e}");
        }
        let started: Vec<(i32, u64)> = live.iter().map(|&pid| (pid, start_of(pid))).collect();
        self.inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(started);
    }

    /// The processes seen in the tree that still run (same pid, same start time). After the
    /// guard was reaped these are orphans of a guard killed from outside, or processes stuck
    /// in the kernel (D state): they may still hold the GPUs.
    pub fn survivors(&self) -> Vec<i32> {
        let seen = self
            .inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|&(&pid, &start)| {
                start != 0 && procfs::stat(pid).is_some_and(|s| s.alive() && s.starttime == start)
            })
            .map(|(&pid, _)| pid)
            .collect()
    }

    async fn not_ready(
        &self,
        probe: &ReadinessProbe,
        ever_listened: bool,
        last: Option<ProbeOutcome>,
    ) -> StartError {
        let config = &self.inner.config;
        let timeout = config.startup_timeout;
        if ever_listened {
            let last = match last {
                Some(ProbeOutcome::Status(code)) => format!("HTTP {code}"),
                Some(ProbeOutcome::NoAnswer(why)) => why,
                Some(ProbeOutcome::Refused) => "connection refused".into(),
                None => "nothing".into(),
            };
            self.inner.logs.push(
                LogStream::Supervisor,
                format!(
                    "not ready after {timeout:?}: the last probe of {} answered {last}",
                    probe.path()
                ),
            );
            return StartError::Timeout(timeout);
        }
        let next = config.port.checked_add(1);
        let next_listens = match next {
            Some(next) => match crate::probe::resolve(&config.host, next).await {
                Ok(addr) => tokio::net::TcpStream::connect(addr).await.is_ok(),
                Err(_) => false,
            },
            None => false,
        };
        let hint = match next {
            Some(next) if next_listens => format!(
                "; something listens on port {next}: TabbyAPI moves to port+1 when its port is busy"
            ),
            _ => String::new(),
        };
        let error = StartError::NotListening {
            port: config.port,
            timeout,
            hint,
        };
        self.inner
            .logs
            .push(LogStream::Supervisor, error.to_string());
        error
    }

    /// SIGTERM to the group, SIGKILL after stop_timeout, reap, then wait (bounded) until the
    /// port is free and the GPU memory released. Idempotent; concurrent calls share one stop.
    pub async fn stop(&self) -> ExitInfo {
        let mut done = {
            let mut slot = self.inner.stop.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(done) => done.clone(),
                None => {
                    let (tx, done) = watch::channel(None);
                    let backend = self.clone();
                    // A task of its own: a caller that gives up waiting does not cancel the stop.
                    tokio::spawn(async move {
                        let info = backend.run_stop().await;
                        let _ = tx.send(Some(info));
                    });
                    *slot = Some(done.clone());
                    done
                }
            }
        };
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map(|info| info.clone());
        match outcome {
            Ok(info) => info.unwrap_or(UNKNOWN_EXIT),
            Err(_) => self.exited().await,
        }
    }

    async fn run_stop(&self) -> ExitInfo {
        let inner = &self.inner;
        let stop_timeout = inner.config.stop_timeout;
        // Who may hold GPU memory: known now, gone (and unknowable) after the stop.
        self.remember_tree();
        let tree: Vec<i32> = inner
            .seen_pids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .copied()
            .collect();
        if self.exit_info().is_none() {
            inner.logs.push(
                LogStream::Supervisor,
                format!("stopping (SIGTERM, SIGKILL after {stop_timeout:?})"),
            );
            let signalled = Instant::now();
            self.signal_group(Signal::SIGTERM);
            let graceful = tokio::time::timeout(stop_timeout, self.exited()).await;
            // The guard escalates by itself at about the same moment (its clock may win).
            if graceful.is_err() || signalled.elapsed() >= stop_timeout {
                inner.logs.push(
                    LogStream::Supervisor,
                    format!("stop escalated to SIGKILL after {stop_timeout:?}"),
                );
            }
            if graceful.is_err()
                && tokio::time::timeout(ESCALATION_MARGIN, self.exited())
                    .await
                    .is_err()
            {
                inner.logs.push(
                    LogStream::Supervisor,
                    "the guard did not exit: killing its group and every descendant".into(),
                );
                self.kill_everything();
            }
        }
        let info = match tokio::time::timeout(BACKSTOP_WAIT, self.exited()).await {
            Ok(info) => info,
            Err(_) => {
                inner.logs.push(
                    LogStream::Supervisor,
                    format!("the guard was not reaped {BACKSTOP_WAIT:?} after SIGKILL"),
                );
                UNKNOWN_EXIT
            }
        };
        // The guard ends every descendant before it exits; one killed from outside leaves
        // them orphaned (to init, not to us): end those we know, by pid and start time.
        let orphans = self.survivors();
        if !orphans.is_empty() {
            inner.logs.push(
                LogStream::Supervisor,
                format!("processes {orphans:?} outlived the guard: killing them"),
            );
            for pid in orphans {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let deadline = Instant::now() + BACKSTOP_WAIT;
            let mut pause = Duration::from_millis(1);
            while !self.survivors().is_empty() && Instant::now() < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
        if !wait_port_free(&inner.config.host, inner.config.port, PORT_RELEASE_TIMEOUT).await {
            inner.logs.push(
                LogStream::Supervisor,
                format!(
                    "port {} is still in use {PORT_RELEASE_TIMEOUT:?} after the stop",
                    inner.config.port
                ),
            );
        }
        gpu::wait_released(&tree, inner.gpu_release_timeout, &inner.logs).await;
        info
    }

    fn signal_group(&self, signal: Signal) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        match killpg(Pid::from_raw(self.inner.guard_pid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(model = %self.inner.model, "killpg({signal}): {e}"),
        }
    }

    /// The supervisor's own backstop when the guard does not answer.
    fn kill_everything(&self) {
        if self.inner.reaped.load(Ordering::SeqCst) {
            return;
        }
        for pid in procfs::descendants(self.inner.guard_pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        self.signal_group(Signal::SIGKILL);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone while the tree still runs: nobody could stop it any more.
        // SIGTERM lets the guard do a normal stop, SIGKILL after stop_timeout included.
        if self.exit.borrow().is_none() && !self.reaped.load(Ordering::SeqCst) {
            self.logs.push(
                LogStream::Supervisor,
                "stopping: the supervisor dropped its last handle on this backend".into(),
            );
            tracing::warn!(model = %self.model, pgid = self.guard_pid, "backend handle dropped while running: stopping it");
            let _ = killpg(Pid::from_raw(self.guard_pid), Signal::SIGTERM);
        }
    }
}

/// The start time of `pid` (clock ticks after boot), 0 when it cannot be read.
fn start_of(pid: i32) -> u64 {
    procfs::stat(pid).map_or(0, |s| s.starttime)
}

const UNKNOWN_EXIT: ExitInfo = ExitInfo {
    code: None,
    signal: None,
};

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

/// The backend's environment: nothing of the supervisor's but PATH, LANG and TZ; HOME and
/// USER of the user it runs as; CUDA_VISIBLE_DEVICES from `gpus`; then the model's `env`.
fn backend_env(config: &ModelConfig, user: Option<&User>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.push(("PATH".into(), path));
    for name in ["LANG", "TZ"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name.into(), value));
        }
    }
    match user {
        Some(user) => {
            env.push(("HOME".into(), user.dir.display().to_string()));
            env.push(("USER".into(), user.name.clone()));
        }
        None => {
            for name in ["HOME", "USER"] {
                if let Ok(value) = std::env::var(name) {
                    env.push((name.into(), value));
                }
            }
        }
    }
    if let Some(gpus) = &config.gpus
        && !config.env.contains_key("CUDA_VISIBLE_DEVICES")
    {
        let list: Vec<String> = gpus.iter().map(u32::to_string).collect();
        env.push(("CUDA_VISIBLE_DEVICES".into(), list.join(",")));
    }
    env.extend(config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

fn shell_words(words: &[String]) -> String {
    let quote = |w: &String| {
        if !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+%".contains(&b))
        {
            w.clone()
        } else {
            format!("'{}'", w.replace('\'', r"'\''"))
        }
    };
    words.iter().map(quote).collect::<Vec<_>>().join(" ")
}

/// True when `host:port` can be bound now (SO_REUSEADDR, like the servers themselves).
fn port_is_free(host: &str, port: u16) -> bool {
    bind_error(host, port).is_none()
}

fn bind_error(host: &str, port: u16) -> Option<std::io::Error> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match std::net::TcpListener::bind((host, port)) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(e),
        // Not ours to judge (an address not on this box, a privileged port): the backend
        // will report it itself.
        Err(_) => None,
    }
}

fn ensure_port_free(host: &str, port: u16) -> Result<(), StartError> {
    if bind_error(host, port).is_none() {
        return Ok(());
    }
    let detail = port_holder::describe(port)
        .map(|holder| format!(" by {holder}"))
        .unwrap_or_default();
    Err(StartError::PortBusy { port, detail })
}

/// Polls (from 1 ms, doubling) until the port can be bound; false after `timeout`.
async fn wait_port_free(host: &str, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if port_is_free(host, port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A pipe whose write end the guard inherits; both ends close-on-exec in the supervisor.
fn report_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // Keep it off 0-2, which the child's stdio setup overwrites.
    if write.as_raw_fd() > 2 {
        return Ok((read, write));
    }
    // SAFETY: fcntl on a descriptor we own; the duplicate becomes an OwnedFd at once.
    let moved = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if moved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `moved` is a fresh descriptor nobody else owns.
    Ok((read, unsafe { OwnedFd::from_raw_fd(moved) }))
}

enum GuardReport {
    Started(u32),
    Failed(i32),
}

/// Reads the guard's one-line report ("pid N" or "error ERRNO") within `timeout`.
fn read_report(read_end: OwnedFd, timeout: Duration) -> std::io::Result<GuardReport> {
    let fd: RawFd = read_end.as_raw_fd();
    let mut file = std::fs::File::from(read_end);
    let deadline = Instant::now() + timeout;
    let mut text = Vec::new();
    while !text.contains(&b'\n') {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no report in time",
            ));
        }
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd.
        let ready =
            unsafe { libc::poll(&mut poll, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if ready == 0 {
            continue;
        }
        let mut chunk = [0u8; 64];
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => text.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().next().unwrap_or("");
    let parsed = match line.split_once(' ') {
        Some(("pid", pid)) => pid.trim().parse().ok().map(GuardReport::Started),
        Some(("error", errno)) => errno.trim().parse().ok().map(GuardReport::Failed),
        _ => None,
    };
    parsed.ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            if line.is_empty() {
                "it exited without a word".to_string()
            } else {
                format!("unexpected report {line:?}")
            },
        )
    })
}

/// All forks of guards happen on one thread that lives as long as the process: the
/// guard's parent-death signal fires when the thread that forked it exits, and a tokio
/// worker or blocking-pool thread may exit long before the supervisor does.
mod forker {
    use std::sync::{Mutex, OnceLock, mpsc};

    type Job = Box<dyn FnOnce() + Send>;

    static JOBS: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();

    fn jobs() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
        JOBS.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("gpuswap-forker".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
        .as_ref()
    }

    /// Spawns `command` from the forker thread, registered with the caller's runtime.
    pub(super) fn spawn(
        mut command: tokio::process::Command,
    ) -> std::io::Result<tokio::process::Child> {
        let runtime = tokio::runtime::Handle::current();
        let Some(jobs) = jobs() else {
            // No thread to be had: fork here, the best that is left.
            return command.spawn();
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _entered = runtime.enter();
            let _ = done_tx.send(command.spawn());
        });
        let sent = jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
        if sent.is_err() {
            return Err(std::io::Error::other("the forker thread is gone"));
        }
        done_rx
            .recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the forker thread is gone")))
    }
}

/// Who holds a TCP port, from /proc/net/tcp{,6} and /proc/PID/fd.
mod port_holder {
    use std::{
        collections::BTreeSet,
        net::{IpAddr, SocketAddr},
    };

    use procfs::{
        net::TcpState,
        process::{FDTarget, Process},
    };

    /// Who listens where a connection to the port goes.
    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Owner {
        /// Every such socket is held by the given process tree.
        Tree,
        /// Another process: `pid N (command line)`.
        Foreign(String),
        /// Not knowable from here (no such socket in this network namespace, or its holder's
        /// descriptors cannot be read).
        Unknown(String),
    }

    /// Who holds the sockets that take connections to `addr` (any listener on `port` when
    /// None), judged against the processes `tree`.
    pub(super) fn owner(addr: Option<SocketAddr>, port: u16, tree: &[i32]) -> Owner {
        let sockets = listening_inodes(port, addr.map(|a| a.ip()));
        if sockets.is_empty() {
            return Owner::Unknown(format!("no listening socket on port {port} is visible"));
        }
        let ours = socket_inodes_of(tree.iter().copied());
        let others: BTreeSet<u64> = sockets.difference(&ours).copied().collect();
        if others.is_empty() {
            return Owner::Tree;
        }
        match holder(&others) {
            Some(holder) => Owner::Foreign(holder),
            None if sockets.len() > others.len() => Owner::Tree,
            None => Owner::Unknown(format!(
                "the holder of the socket on port {port} is not readable"
            )),
        }
    }

    /// `pid N (command line)` of a process that listens on `port`, if any.
    pub(super) fn describe(port: u16) -> Option<String> {
        let sockets = listening_inodes(port, None);
        if sockets.is_empty() {
            return None;
        }
        holder(&sockets)
    }

    /// The first process (in pid order) with a descriptor on one of `sockets`.
    fn holder(sockets: &BTreeSet<u64>) -> Option<String> {
        let processes = procfs::process::all_processes().ok()?;
        for process in processes.flatten() {
            if socket_inodes(&process).is_some_and(|held| !held.is_disjoint(sockets)) {
                let command = process.cmdline().unwrap_or_default().join(" ");
                return Some(format!("pid {} ({command})", process.pid()));
            }
        }
        None
    }

    fn socket_inodes(process: &Process) -> Option<BTreeSet<u64>> {
        let fds = process.fd().ok()?;
        Some(
            fds.flatten()
                .filter_map(|fd| match fd.target {
                    FDTarget::Socket(inode) => Some(inode),
                    _ => None,
                })
                .collect(),
        )
    }

    fn socket_inodes_of(pids: impl Iterator<Item = i32>) -> BTreeSet<u64> {
        pids.filter_map(|pid| socket_inodes(&Process::new(pid).ok()?))
            .flatten()
            .collect()
    }

    /// The inodes of the sockets listening on `port` that a connection to `ip` reaches:
    /// those bound to that very address, else the wildcards (the kernel prefers the exact
    /// bind); every listener on the port when `ip` is None.
    fn listening_inodes(port: u16, ip: Option<IpAddr>) -> BTreeSet<u64> {
        let tables = [procfs::net::tcp(), procfs::net::tcp6()];
        let listeners: Vec<(IpAddr, u64)> = tables
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
            .map(|e| (e.local_address.ip().to_canonical(), e.inode))
            .collect();
        let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
            return listeners.into_iter().map(|(_, inode)| inode).collect();
        };
        let exact: BTreeSet<u64> = listeners
            .iter()
            .filter(|(bound, _)| *bound == ip)
            .map(|(_, inode)| *inode)
            .collect();
        if !exact.is_empty() {
            return exact;
        }
        listeners
            .iter()
            // `::` takes IPv4 connections too, unless IPV6_V6ONLY (not visible here).
            .filter(|(bound, _)| bound.is_unspecified() && (bound.is_ipv6() || ip.is_ipv4()))
            .map(|(_, inode)| *inode)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_commands_for_the_log() {
        let words = ["python3", "-m", "x", "--name", "a b", "it's"].map(String::from);
        assert_eq!(shell_words(&words), r"python3 -m x --name 'a b' 'it'\''s'");
    }

    #[test]
    fn exit_info_reads_well() {
        assert_eq!(
            ExitInfo {
                code: Some(3),
                signal: None
            }
            .to_string(),
            "exit status 3"
        );
        assert_eq!(
            ExitInfo {
                code: None,
                signal: Some(9)
            }
            .to_string(),
            "killed by signal 9"
        );
    }
}
