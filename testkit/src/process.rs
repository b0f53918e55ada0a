//! What the tests read of other processes in /proc, through the procfs crate: whether a
//! process lives, its parent and start time, its command line, environment and status.

use procfs::process::{LimitValue, Process, Stat, Status};

/// A process in /proc, for what the helpers below do not read (none once it is gone).
pub fn process(pid: u32) -> Option<Process> {
    Process::new(i32::try_from(pid).ok()?).ok()
}

/// `/proc/PID/stat` (none once the process is gone).
pub fn stat(pid: u32) -> Option<Stat> {
    process(pid)?.stat().ok()
}

/// `/proc/PID/status` (none once the process is gone).
pub fn proc_status(pid: u32) -> Option<Status> {
    process(pid)?.status().ok()
}

/// True while a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

/// The parent of a process.
pub fn parent(pid: u32) -> Option<u32> {
    u32::try_from(stat(pid)?.ppid).ok()
}

/// The start time of a process (clock ticks after boot): with the pid, who it is.
pub fn starttime(pid: u32) -> Option<u64> {
    Some(stat(pid)?.starttime)
}

/// The arguments of a process, its program first (none once it is gone).
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    process(pid)?.cmdline().ok()
}

/// The value of the environment variable `name` of a process.
pub fn env_var(pid: u32, name: &str) -> Option<String> {
    let environ = process(pid)?.environ().ok()?;
    Some(
        environ
            .get(std::ffi::OsStr::new(name))?
            .to_string_lossy()
            .into_owned(),
    )
}

/// `Max open files` of a process: (soft, hard), `u64::MAX` for unlimited.
pub fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = process(pid)
        .and_then(|process| process.limits().ok())
        .expect("the process's limits");
    let value = |limit| match limit {
        LimitValue::Value(n) => n,
        LimitValue::Unlimited => u64::MAX,
    };
    let open_files = limits.max_open_files;
    (value(open_files.soft_limit), value(open_files.hard_limit))
}

/// How many files a process has open (0 once it is gone).
pub fn open_fds(pid: u32) -> usize {
    process(pid)
        .and_then(|process| process.fd_count().ok())
        .unwrap_or(0)
}

/// The resident memory of a process in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    Some(proc_status(pid)?.vmrss? * 1024)
}

/// The id of every process in `/proc` (none when it cannot be read).
pub fn process_ids() -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|process| u32::try_from(process.pid()).ok())
        .collect()
}

/// Every live process whose environment or command line carries `marker`.
///
/// Tests tag the backends they start with a unique marker (an env variable the
/// supervisor passes through), so a leak check finds every descendant, even one
/// that left its process group or was re-parented.
pub fn processes_with_marker(marker: &str) -> Vec<u32> {
    let carries = |pid: u32| {
        let Some(process) = process(pid) else {
            return false;
        };
        let in_environ = process.environ().is_ok_and(|environ| {
            environ.iter().any(|(name, value)| {
                name.to_string_lossy().contains(marker) || value.to_string_lossy().contains(marker)
            })
        });
        in_environ
            || process
                .cmdline()
                .is_ok_and(|args| args.iter().any(|arg| arg.contains(marker)))
    };
    process_ids()
        .into_iter()
        .filter(|&pid| pid != std::process::id() && carries(pid) && alive(pid))
        .collect()
}
