//! Records live process groups so a restarted supervisor can end its predecessor's leftovers. (owner: process layer)
//!
//! The file is JSON, `{"groups":[{"model","pgid","starttime"}]}`, rewritten atomically
//! (temporary file + rename) on every change. The start time (field 22 of
//! /proc/PID/stat) tells a recorded group leader apart from an unrelated process that
//! got the same pid later.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill, killpg},
    unistd::Pid,
};
use serde::{Deserialize, Serialize};

use crate::guard::procfs;

/// How long cleanup waits for a killed leftover to disappear.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub model: String,
    pub pgid: i32,
    pub starttime: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Contents {
    groups: Vec<GroupRecord>,
}

#[derive(Default)]
struct Records {
    /// Groups recorded by a previous supervisor, not yet cleaned up.
    leftovers: Vec<GroupRecord>,
    /// Groups of this supervisor's running backends.
    live: Vec<GroupRecord>,
}

pub struct StateFile {
    path: PathBuf,
    records: Mutex<Records>,
}

impl std::fmt::Debug for StateFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateFile")
            .field("path", &self.path)
            .finish()
    }
}

impl StateFile {
    /// Opens (creating its directory) the state file at `path`; the groups it already
    /// lists are a predecessor's, for [`StateFile::cleanup_leftovers`].
    pub fn open(path: &Path) -> io::Result<StateFile> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let leftovers = match std::fs::read(path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Vec::new(),
            Ok(bytes) => match serde_json::from_slice::<Contents>(&bytes) {
                Ok(contents) => contents.groups,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable state file: {e}");
                    Vec::new()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(StateFile {
            path: path.to_owned(),
            records: Mutex::new(Records {
                leftovers,
                live: Vec::new(),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the live process group `pgid` of `model`.
    pub fn record(&self, model: &str, pgid: i32, starttime: u64) -> io::Result<()> {
        let mut records = self.records();
        records.live.retain(|r| r.pgid != pgid);
        records.live.push(GroupRecord {
            model: model.to_owned(),
            pgid,
            starttime,
        });
        self.write(&records)
    }

    /// Removes the process group `pgid` (it has ended).
    pub fn forget(&self, pgid: i32) -> io::Result<()> {
        let mut records = self.records();
        let before = records.live.len();
        records.live.retain(|r| r.pgid != pgid);
        if records.live.len() == before {
            return Ok(());
        }
        self.write(&records)
    }

    /// The groups recorded now (leftovers first, then live ones).
    pub fn groups(&self) -> Vec<GroupRecord> {
        let records = self.records();
        records
            .leftovers
            .iter()
            .chain(&records.live)
            .cloned()
            .collect()
    }

    /// Ends every group a predecessor recorded that still runs (the same leader start
    /// time, or members left after the leader died) with SIGKILL, together with all
    /// descendants; waits (bounded) until they are gone. Returns one description each.
    pub fn cleanup_leftovers(&self) -> Vec<String> {
        let leftovers = std::mem::take(&mut self.records().leftovers);
        let mut report = Vec::new();
        for record in &leftovers {
            if let Some(description) = end_leftover(record) {
                report.push(description);
            }
        }
        let records = self.records();
        if let Err(e) = self.write(&records) {
            tracing::warn!(path = %self.path.display(), "cannot rewrite state file: {e}");
        }
        report
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, records: &Records) -> io::Result<()> {
        let contents = Contents {
            groups: records
                .leftovers
                .iter()
                .chain(&records.live)
                .cloned()
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&contents).map_err(io::Error::other)?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &self.path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// The processes of a recorded group still running, or None when it is gone or the pid
/// now names an unrelated process.
fn leftover_processes(record: &GroupRecord) -> Option<Vec<i32>> {
    let leader = procfs::stat(record.pgid);
    let leader_is_ours = match leader {
        Some(s) if s.alive() => s.starttime == record.starttime,
        // A pid is not reused while a group of that id has members: any members left
        // after the leader died are the recorded group's.
        _ => true,
    };
    if !leader_is_ours {
        return None;
    }
    let mut processes = procfs::group_members(record.pgid);
    if leader.is_some_and(|s| s.alive()) {
        for pid in procfs::descendants(record.pgid) {
            if !processes.contains(&pid) {
                processes.push(pid);
            }
        }
    }
    (!processes.is_empty()).then_some(processes)
}

fn end_leftover(record: &GroupRecord) -> Option<String> {
    let mut processes = leftover_processes(record)?;
    let found = processes.len();
    let deadline = Instant::now() + CLEANUP_DEADLINE;
    let mut pause = Duration::from_millis(1);
    loop {
        // Kill the descendants first: a killed leader would orphan them out of reach.
        for &pid in processes.iter().rev() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = killpg(Pid::from_raw(record.pgid), Signal::SIGKILL);
        processes.retain(|&pid| procfs::alive(pid));
        for pid in procfs::group_members(record.pgid) {
            if !processes.contains(&pid) {
                processes.push(pid);
            }
        }
        if processes.is_empty() {
            return Some(format!(
                "ended {found} leftover process(es) of model {:?} (process group {})",
                record.model, record.pgid
            ));
        }
        if Instant::now() >= deadline {
            return Some(format!(
                "could not end leftover processes {processes:?} of model {:?} (process group {}) within {CLEANUP_DEADLINE:?}",
                record.model, record.pgid
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_forgets_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/state.json");
        let state = StateFile::open(&path).expect("open");
        state.record("a", 10, 1).expect("record");
        state.record("b", 11, 2).expect("record");
        state.forget(10).expect("forget");
        let reopened = StateFile::open(&path).expect("reopen");
        assert_eq!(
            reopened.groups(),
            [GroupRecord {
                model: "b".into(),
                pgid: 11,
                starttime: 2
            }]
        );
    }

    #[test]
    fn a_reused_pid_is_left_alone() {
        // Our own pid with a start time that is not ours: an unrelated process.
        let me = std::process::id() as i32;
        let real = procfs::stat(me).expect("own stat").starttime;
        let record = GroupRecord {
            model: "m".into(),
            pgid: me,
            starttime: real + 1,
        };
        assert_eq!(leftover_processes(&record), None);
    }
}
