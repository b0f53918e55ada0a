//! Reading processes from /proc: memory, CPU time, process trees, and a
//! background sampler for the processes a run watches.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

/// Resident memory in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The fields of /proc/PID/stat after the command name, which may contain spaces.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let fields = stat_fields(pid)?;
    // After ")": state(0) ppid(1) pgrp(2) ... utime(11) stime(12).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// True while the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match stat_fields(pid) {
        Some(fields) => !matches!(fields.first().map(String::as_str), Some("Z" | "X")),
        None => false,
    }
}

/// Bytes the process has written (any fd), from /proc/PID/io.
pub fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("wchar:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Busy and total CPU time of the whole machine (all cores), in clock ticks.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle and iowait
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// `pid` and every process below it.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = stat_fields(child)
                .and_then(|f| f.get(1).cloned())
                .and_then(|p| p.parse().ok())
            {
                parents.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(child, _)| *child),
        );
        index += 1;
    }
    found
}

/// Memory and CPU of one process over a run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcUsage {
    pub name: String,
    pub pid: u32,
    pub rss_start_mib: f64,
    pub rss_peak_mib: f64,
    pub rss_end_mib: f64,
    pub cpu_s: f64,
    /// CPU time over wall time, in % of one core.
    pub cpu_pct: f64,
}

struct Watched {
    name: String,
    pid: u32,
    rss_start: u64,
    rss_peak: u64,
    rss_last: u64,
    cpu_start: f64,
}

impl Watched {
    fn sample(&mut self) {
        if let Some(rss) = rss_kib(self.pid) {
            self.rss_peak = self.rss_peak.max(rss);
            self.rss_last = rss;
        }
    }
}

/// Samples the watched processes on its own thread until finished.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<(Vec<Watched>, Duration)>>,
}

impl Sampler {
    /// Every 50 ms: cheap enough to run beside a load measurement.
    pub fn start(watch: &[(String, u32)]) -> Self {
        Self::every(watch, Duration::from_millis(50))
    }

    pub fn every(watch: &[(String, u32)], interval: Duration) -> Self {
        let mut watched: Vec<Watched> = watch
            .iter()
            .map(|(name, pid)| {
                let rss = rss_kib(*pid).unwrap_or(0);
                Watched {
                    name: name.clone(),
                    pid: *pid,
                    rss_start: rss,
                    rss_peak: rss,
                    rss_last: rss,
                    cpu_start: cpu_seconds(*pid).unwrap_or(0.0),
                }
            })
            .collect();
        if watched.is_empty() {
            return Self {
                stop: Arc::new(AtomicBool::new(true)),
                thread: None,
            };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !stop_flag.load(Ordering::Relaxed) {
                watched.iter_mut().for_each(Watched::sample);
                std::thread::sleep(interval);
            }
            watched.iter_mut().for_each(Watched::sample);
            (watched, start.elapsed())
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub async fn finish(mut self) -> Vec<ProcUsage> {
        self.stop.store(true, Ordering::Relaxed);
        let Some(thread) = self.thread.take() else {
            return Vec::new();
        };
        let Ok(Ok((watched, wall))) = tokio::task::spawn_blocking(move || thread.join()).await
        else {
            return Vec::new();
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        watched
            .into_iter()
            .map(|w| {
                let cpu = cpu_seconds(w.pid).map_or(0.0, |end| end - w.cpu_start);
                ProcUsage {
                    name: w.name,
                    pid: w.pid,
                    rss_start_mib: mib(w.rss_start),
                    rss_peak_mib: mib(w.rss_peak),
                    rss_end_mib: mib(w.rss_last),
                    cpu_s: cpu,
                    cpu_pct: 100.0 * cpu / wall.as_secs_f64().max(1e-9),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(cpu_seconds(me).is_some());
        assert!(alive(me));
        assert!(tree(me).contains(&me));
        assert!(written_bytes(me).is_some());
    }

    #[test]
    fn finds_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        assert!(tree(std::process::id()).contains(&pid));
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(!alive(pid));
    }
}
