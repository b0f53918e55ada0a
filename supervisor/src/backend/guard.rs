//! The guard process: parent of one backend.
//!
//! `gpuswap-supervisor guard [--uid U --gid G] [--stop-timeout-ms N] [--workdir D]
//! [--report-fd FD] [--supervisor-pid PID] -- PROGRAM ARGS...`
//!
//! The guard is a child subreaper, so every descendant of the backend stays its descendant,
//! even one that calls setsid and leaves the process group. It ends them all:
//! - when the backend leader exits (by itself or after a stop),
//! - on SIGTERM/SIGINT (a stop): SIGTERM to the group and to every descendant outside it,
//!   then SIGKILL to every descendant after the stop timeout; not when the sender is in the
//!   backend's own tree (a backend's `kill 0` reaches its whole group, the guard included),
//! - on the parent-death signal (the supervisor died, even by SIGKILL): SIGKILL at once; a
//!   SIGUSR2 while the supervisor (`--supervisor-pid`) is still our parent is ignored.
//!
//! It then exits mirroring the backend's status (same exit code, or the same signal), so
//! the supervisor sees the backend's own exit. Synchronous on purpose: no runtime, no
//! threads, signals taken with sigtimedwait.

use std::{
    ffi::{CString, OsString},
    io::Write,
    os::{fd::RawFd, unix::process::CommandExt},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        signal::{SigSet, SigmaskHow, Signal, kill, killpg, sigprocmask},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::{Gid, Pid, Uid, User},
};

use super::process_tree;

/// The signal the supervisor's death sends to the guard (PR_SET_PDEATHSIG). Catchable on
/// purpose: the guard must kill the tree before it goes, which SIGKILL would not allow.
pub const PARENT_DEATH_SIGNAL: Signal = Signal::SIGUSR2;

/// The signals the guard takes synchronously. The supervisor blocks them already in the
/// guard's pre-exec, so one that arrives before `main` runs stays pending instead of
/// killing the guard with the backend still unborn.
pub fn guarded_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGCHLD);
    set.add(PARENT_DEATH_SIGNAL);
    set
}

/// Exit status of the guard when it cannot start the backend (as a shell would).
const EXIT_CANNOT_START: i32 = 127;
/// Exit status of the guard on a bad command line.
const EXIT_USAGE: i32 = 2;

#[derive(Debug, Default)]
struct Args {
    uid: Option<u32>,
    gid: Option<u32>,
    stop_timeout: Option<Duration>,
    workdir: Option<PathBuf>,
    report_fd: Option<RawFd>,
    /// The supervisor: only its death (not any SIGUSR2) ends the tree at once.
    supervisor_pid: Option<i32>,
    program: OsString,
    args: Vec<OsString>,
}

/// What is wrong with the guard's command line.
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("missing `-- PROGRAM`")]
    MissingSeparator,
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("{flag}: not a number: {value:?}")]
    NotANumber { flag: String, value: OsString },
    #[error("unknown flag {0}")]
    UnknownFlag(String),
    #[error("missing PROGRAM after --")]
    MissingProgram,
}

fn parse_args(mut argv: impl Iterator<Item = OsString>) -> Result<Args, UsageError> {
    let mut args = Args::default();
    loop {
        let Some(flag) = argv.next() else {
            return Err(UsageError::MissingSeparator);
        };
        let flag = flag.to_string_lossy().into_owned();
        if flag == "--" {
            break;
        }
        let value = argv
            .next()
            .ok_or_else(|| UsageError::MissingValue(flag.clone()))?;
        let number = |v: &OsString| -> Result<u64, UsageError> {
            v.to_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| UsageError::NotANumber {
                    flag: flag.clone(),
                    value: v.clone(),
                })
        };
        match flag.as_str() {
            "--uid" => args.uid = Some(number(&value)? as u32),
            "--gid" => args.gid = Some(number(&value)? as u32),
            "--stop-timeout-ms" => args.stop_timeout = Some(Duration::from_millis(number(&value)?)),
            "--workdir" => args.workdir = Some(value.into()),
            "--report-fd" => args.report_fd = Some(number(&value)? as RawFd),
            "--supervisor-pid" => args.supervisor_pid = Some(number(&value)? as i32),
            _ => return Err(UsageError::UnknownFlag(flag)),
        }
    }
    args.program = argv.next().ok_or(UsageError::MissingProgram)?;
    args.args = argv.collect();
    Ok(args)
}

fn say(message: std::fmt::Arguments) {
    // The supervisor captures our stderr into the model's log; a dead reader is no reason
    // to stop ending the tree.
    let _ = writeln!(std::io::stderr(), "gpuswap-guard: {message}");
}

/// Entry point of `gpuswap-supervisor guard ...`; never returns.
pub fn main() -> ! {
    let signals = guarded_signals();
    // Already blocked by the supervisor's pre-exec; again for a guard started by hand.
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None);

    let args = match parse_args(std::env::args_os().skip(2)) {
        Ok(args) => args,
        Err(e) => {
            say(format_args!(
                "usage: guard [--uid U --gid G] [--stop-timeout-ms N] [--workdir D] [--report-fd FD] [--supervisor-pid PID] -- PROGRAM ARGS...: {e}"
            ));
            std::process::exit(EXIT_USAGE);
        }
    };
    let mut report = args.report_fd.map(Report::new);

    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        say(format_args!("cannot become a child subreaper: {e}"));
    }

    let backend = match start_backend(&args, &signals) {
        Ok(pid) => pid,
        Err(e) => {
            say(format_args!("cannot start {:?}: {e}", args.program));
            if let Some(report) = report.as_mut() {
                report.send(&format!("error {}\n", e.raw_os_error().unwrap_or(0)));
            }
            std::process::exit(EXIT_CANNOT_START);
        }
    };
    // Fault injection for the tests, in debug builds only: a guard slow to report, as on a
    // machine under heavy load (the supervisor waits up to 10 s for the report).
    #[cfg(debug_assertions)]
    if std::env::var_os("GPUSWAP_TEST_FAULT").is_some_and(|f| f == "guard-slow-report") {
        std::thread::sleep(Duration::from_secs(5));
    }
    if let Some(report) = report.as_mut() {
        report.send(&format!("pid {backend}\n"));
    }
    drop(report);

    // Started by hand: the parent stands in for the supervisor.
    let supervisor = args
        .supervisor_pid
        .unwrap_or_else(|| nix::unistd::getppid().as_raw());
    let status = supervise(backend, args.stop_timeout, supervisor, &signals);
    end_all_descendants();
    mirror(status)
}

/// The write end of the pipe on which the guard tells the supervisor the backend's pid.
struct Report(std::fs::File);

impl Report {
    fn new(fd: RawFd) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: the supervisor passes this descriptor to us and nothing else here owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        // The backend must not inherit it: the supervisor's read must see EOF when we exit.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        Self(file)
    }

    fn send(&mut self, message: &str) {
        let _ = self.0.write_all(message.as_bytes());
    }
}

fn start_backend(args: &Args, signals: &SigSet) -> std::io::Result<Pid> {
    let mut command = Command::new(&args.program);
    command.args(&args.args);
    if let Some(dir) = &args.workdir {
        command.current_dir(dir);
    }
    let credentials = match (args.uid, args.gid) {
        (None, None) => None,
        (uid, gid) => {
            let uid = uid.map_or_else(Uid::current, Uid::from_raw);
            let gid = gid.map_or_else(Gid::current, Gid::from_raw);
            Some((uid, gid, supplementary_groups(uid, gid)))
        }
    };
    let guard_pid = nix::unistd::getpid();
    let signals = *signals;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls on memory prepared before the fork; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid, groups)) = &credentials
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid.as_raw()) != 0
                    || libc::setuid(uid.as_raw()) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After the credential change, which clears the parent-death signal.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != guard_pid.as_raw() {
                // We died between fork and prctl: the signal will never come.
                libc::_exit(EXIT_CANNOT_START);
            }
            // std resets the mask too; unblock explicitly in case that ever changes.
            libc::sigprocmask(libc::SIG_UNBLOCK, signals.as_ref(), std::ptr::null_mut());
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// The supplementary groups of the user `uid` (empty when it has no passwd entry).
fn supplementary_groups(uid: Uid, gid: Gid) -> Vec<libc::gid_t> {
    let Ok(Some(user)) = User::from_uid(uid) else {
        return vec![gid.as_raw()];
    };
    let Ok(name) = CString::new(user.name) else {
        return vec![gid.as_raw()];
    };
    nix::unistd::getgrouplist(&name, gid)
        .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
        .unwrap_or_else(|_| vec![gid.as_raw()])
}

/// Waits for signals until the backend leader exits; returns its status.
fn supervise(
    backend: Pid,
    stop_timeout: Option<Duration>,
    supervisor: i32,
    signals: &SigSet,
) -> WaitStatus {
    let stop_timeout = stop_timeout.unwrap_or(Duration::from_secs(30));
    let mut stopping = false;
    // Set by a stop; cleared once the escalation to SIGKILL happened.
    let mut kill_at: Option<Instant> = None;
    loop {
        if let Some(status) = reap_children(backend) {
            return status;
        }
        let timeout = kill_at.map(|at| at.saturating_duration_since(Instant::now()));
        match wait_signal(signals, timeout) {
            Some((signal @ (Signal::SIGTERM | Signal::SIGINT), sender)) if !stopping => {
                // A backend that signals its own group (`kill 0`, a launcher's cleanup trap)
                // reaches us too: that is not a stop.
                if from_own_tree(sender) {
                    say(format_args!(
                        "ignoring {signal} from pid {sender}, a process of the backend's own tree"
                    ));
                    continue;
                }
                stopping = true;
                kill_at = Some(Instant::now() + stop_timeout);
                signal_tree(Signal::SIGTERM);
            }
            Some((signal, sender)) if signal == PARENT_DEATH_SIGNAL => {
                // The parent-death signal comes after the kernel gave us a new parent; any
                // other SIGUSR2 (a stray kill) while the supervisor lives is no death.
                if nix::unistd::getppid().as_raw() == supervisor {
                    say(format_args!(
                        "ignoring {signal} from pid {sender}: the supervisor (pid {supervisor}) is alive"
                    ));
                    continue;
                }
                // The supervisor is gone: nobody will ever stop this backend gracefully.
                kill_descendants();
                end_all_descendants();
                std::process::exit(EXIT_CANNOT_START);
            }
            Some(_) => {}
            None => {
                if kill_at.is_some_and(|at| Instant::now() >= at) {
                    say(format_args!(
                        "backend still running {stop_timeout:?} after SIGTERM: sending SIGKILL"
                    ));
                    kill_descendants();
                    kill_at = None;
                }
            }
        }
    }
}

/// Reaps every exited child without blocking; returns the leader's status once it exited.
fn reap_children(backend: Pid) -> Option<WaitStatus> {
    let mut leader = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return leader,
            Ok(status) => {
                if status.pid() == Some(backend)
                    && matches!(status, WaitStatus::Exited(..) | WaitStatus::Signaled(..))
                {
                    leader = Some(status);
                }
            }
        }
    }
}

/// True when `pid` is the guard or one of its descendants (walking up its parents).
fn from_own_tree(pid: i32) -> bool {
    let me = nix::unistd::getpid().as_raw();
    let mut current = pid;
    // Bounded: a parent chain is short, and a racing exit must not loop us.
    for _ in 0..256 {
        if current == me {
            return true;
        }
        if current <= 1 {
            return false;
        }
        match process_tree::stat(current) {
            Some(stat) => current = stat.ppid,
            // Gone already: not provably ours, so it counts (as it always did).
            None => return false,
        }
    }
    false
}

/// One signal from `signals` and the pid that sent it (0: the kernel), or None when
/// `timeout` passed (or the wait was interrupted).
fn wait_signal(signals: &SigSet, timeout: Option<Duration>) -> Option<(Signal, i32)> {
    let timespec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let timespec_ptr = timespec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: sigtimedwait with a valid set, a siginfo to fill and an optional timeout.
    let sig = unsafe { libc::sigtimedwait(signals.as_ref(), &mut info, timespec_ptr) };
    if sig < 0 {
        return None;
    }
    // SAFETY: the kernel filled `info` for this signal; si_pid is 0 when no process sent it.
    let sender = unsafe { info.si_pid() };
    Signal::try_from(sig).ok().map(|signal| (signal, sender))
}

/// SIGTERM (a stop) to our group and to every descendant that left it.
fn signal_tree(signal: Signal) {
    let own_group = nix::unistd::getpgrp();
    // We are in the group too, with the signal blocked: it stays pending and is ignored.
    let _ = killpg(own_group, signal);
    for pid in process_tree::descendants(nix::unistd::getpid().as_raw()) {
        if process_tree::stat(pid).is_some_and(|s| s.pgrp != own_group.as_raw()) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
}

fn kill_descendants() {
    for pid in process_tree::descendants(nix::unistd::getpid().as_raw()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// SIGKILLs every descendant and reaps until none is left. Orphans of killed processes
/// come to us (we are their subreaper), so when waitpid says ECHILD the tree is empty.
fn end_all_descendants() {
    loop {
        kill_descendants();
        match waitpid(None, None) {
            Err(Errno::ECHILD) => return,
            Err(Errno::EINTR) | Ok(_) => {}
            Err(e) => {
                say(format_args!("waitpid: {e}"));
                return;
            }
        }
    }
}

/// Exits the way the backend did, so the supervisor sees its status.
fn mirror(status: WaitStatus) -> ! {
    match status {
        WaitStatus::Exited(_, code) => std::process::exit(code),
        WaitStatus::Signaled(_, signal, _) => {
            // No core file of the guard for a backend that dumped core.
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain system calls on valid arguments.
            unsafe {
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(signal as libc::c_int, libc::SIG_DFL);
            }
            let mut only = SigSet::empty();
            only.add(signal);
            let _ = nix::sys::signal::raise(signal);
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
            std::process::exit(128 + signal as i32)
        }
        _ => std::process::exit(EXIT_CANNOT_START),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line() {
        let argv = [
            "--uid",
            "5",
            "--gid",
            "6",
            "--stop-timeout-ms",
            "1500",
            "--workdir",
            "/w",
            "--supervisor-pid",
            "77",
            "--",
            "prog",
            "--x",
            "--",
        ];
        let args = parse_args(argv.iter().map(OsString::from)).expect("parse");
        assert_eq!((args.uid, args.gid), (Some(5), Some(6)));
        assert_eq!(args.stop_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(args.workdir, Some(PathBuf::from("/w")));
        assert_eq!(args.supervisor_pid, Some(77));
        assert_eq!(args.program, "prog");
        assert_eq!(args.args, ["--x", "--"]);
        assert!(parse_args(["--bogus", "1", "--", "p"].iter().map(OsString::from)).is_err());
        assert!(parse_args(["--uid", "1"].iter().map(OsString::from)).is_err());
    }
}
