//! The supervisor's side of the guard's launch protocol: the guard's command line, what
//! happens between fork and exec, and the one-line report ("pid N" or "error ERRNO") the
//! guard writes on an inherited pipe once the backend is started (or could not be).

use std::{
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::unistd::User;

use super::{LaunchSpec, env::backend_env, guard};

/// `gpuswap-supervisor guard ... -- COMMAND` in a process group of its own, with the
/// backend's environment, the report pipe's write end inherited, the guard's signals
/// blocked and the supervisor's death signalled to it.
pub(super) fn guard_command(
    spec: &LaunchSpec,
    user: Option<&User>,
    report_write: &OwnedFd,
) -> tokio::process::Command {
    let config = &spec.config;
    let mut command = tokio::process::Command::new(&spec.guard_exe);
    command.arg("guard");
    command.args([
        "--stop-timeout-ms",
        &config.stop_timeout.as_millis().to_string(),
    ]);
    command.args(["--report-fd", &report_write.as_raw_fd().to_string()]);
    let supervisor_pid = nix::unistd::getpid().as_raw();
    command.args(["--supervisor-pid", &supervisor_pid.to_string()]);
    if let Some(user) = user {
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
        .envs(backend_env(config, user));
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
    command
}

/// A pipe whose write end the guard inherits; both ends close-on-exec in the supervisor.
pub(super) fn report_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
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

pub(super) enum GuardReport {
    Started(u32),
    Failed(i32),
}

/// Reads the guard's one-line report ("pid N" or "error ERRNO") within `timeout`.
pub(super) fn read_report(read_end: OwnedFd, timeout: Duration) -> std::io::Result<GuardReport> {
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
