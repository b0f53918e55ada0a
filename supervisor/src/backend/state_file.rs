//! Records live process groups so a restarted supervisor can end its predecessor's leftovers.
//!
//! The file is JSON, `{"boot_id", "groups":[{"model","pgid","starttime","processes"}]}`,
//! rewritten atomically (temporary file + rename) on every change. Cleanup kills only what it
//! can prove to be a recorded process: the same boot (pids mean nothing across a reboot), the
//! same pid with the same start time (field 22 of /proc/PID/stat: a pid reused later has
//! another), and their descendants; the members of a recorded group only while a proven
//! process is still one of them (a group id is not reused while the group has a member).
//! Files of older supervisors (no boot id, no processes) are read as the same boot.

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

use super::process_tree;

/// How long cleanup waits for a killed leftover to disappear.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub model: String,
    /// The guard's pid, which is the group's id.
    pub pgid: i32,
    /// The guard's start time.
    pub starttime: u64,
    /// Other processes of the tree seen running (the backend, its workers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessRecord>,
}

/// One process by pid and start time: together they name it for the whole boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: i32,
    pub starttime: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct Contents {
    /// The boot the pids belong to; None in the files of older supervisors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot_id: Option<String>,
    groups: Vec<GroupRecord>,
}

#[derive(Default)]
struct Records {
    /// Groups recorded by a previous supervisor, not yet cleaned up.
    leftovers: Vec<GroupRecord>,
    /// The boot of the leftovers (None: not recorded).
    leftovers_boot_id: Option<String>,
    /// Groups of this supervisor's running backends.
    live: Vec<GroupRecord>,
}

pub struct StateFile {
    path: PathBuf,
    /// This boot's id (None where /proc does not tell).
    boot_id: Option<String>,
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
        let contents = match std::fs::read(path) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Contents::default(),
            Ok(bytes) => serde_json::from_slice::<Contents>(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), "ignoring unreadable state file: {e}");
                Contents::default()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(e),
        };
        Ok(StateFile {
            path: path.to_owned(),
            boot_id: procfs::sys::kernel::random::boot_id().ok(),
            records: Mutex::new(Records {
                leftovers: contents.groups,
                leftovers_boot_id: contents.boot_id,
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
            processes: Vec::new(),
        });
        self.write(&records)
    }

    /// Adds `pids` (those still running, with their start times) to the record of the
    /// group `pgid`.
    pub fn record_processes(&self, pgid: i32, pids: &[i32]) -> io::Result<()> {
        let mut records = self.records();
        let Some(group) = records.live.iter_mut().find(|r| r.pgid == pgid) else {
            return Ok(());
        };
        let before = group.processes.len();
        for &pid in pids {
            let Some(stat) = process_tree::stat(pid).filter(|s| s.alive()) else {
                continue;
            };
            let process = ProcessRecord {
                pid,
                starttime: stat.starttime,
            };
            if pid != pgid && !group.processes.contains(&process) {
                group.processes.push(process);
            }
        }
        if group.processes.len() == before {
            return Ok(());
        }
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

    /// Ends with SIGKILL every process a predecessor recorded that provably still runs (see
    /// the module's doc), with its descendants; waits (bounded) until they are gone. Returns
    /// one description per group that it ended, or left alone although it has members.
    pub fn cleanup_leftovers(&self) -> Vec<String> {
        let (leftovers, boot_id) = {
            let mut records = self.records();
            (
                std::mem::take(&mut records.leftovers),
                records.leftovers_boot_id.take(),
            )
        };
        let another_boot =
            matches!((&boot_id, &self.boot_id), (Some(then), Some(now)) if then != now);
        let mut report = Vec::new();
        for record in &leftovers {
            if another_boot {
                tracing::info!(model = %record.model, pgid = record.pgid, "the state file is of another boot: nothing it lists can run");
                continue;
            }
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
            boot_id: self.boot_id.clone(),
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

/// What of a recorded group provably still runs.
#[derive(Debug, PartialEq, Eq)]
struct Leftover {
    /// Recorded processes (same pid, same start time) and their descendants.
    processes: Vec<i32>,
    /// Whether the group itself is the recorded one (a proven process is still in it), so
    /// that all its members are ours.
    whole_group: bool,
}

fn leftover_processes(record: &GroupRecord) -> Leftover {
    let recorded = std::iter::once(ProcessRecord {
        pid: record.pgid,
        starttime: record.starttime,
    })
    .chain(record.processes.iter().copied());
    let mut processes = Vec::new();
    let mut whole_group = false;
    for process in recorded {
        let Some(stat) = process_tree::stat(process.pid) else {
            continue;
        };
        if !stat.alive() || stat.starttime != process.starttime {
            continue;
        }
        whole_group |= stat.pgrp == record.pgid;
        add_new(&mut processes, [process.pid]);
    }
    for pid in processes.clone() {
        add_new(&mut processes, process_tree::descendants(pid));
    }
    if whole_group {
        add_new(&mut processes, process_tree::group_members(record.pgid));
    }
    Leftover {
        processes,
        whole_group,
    }
}

fn add_new(to: &mut Vec<i32>, pids: impl IntoIterator<Item = i32>) {
    for pid in pids {
        if !to.contains(&pid) {
            to.push(pid);
        }
    }
}

fn end_leftover(record: &GroupRecord) -> Option<String> {
    let Leftover {
        mut processes,
        whole_group,
    } = leftover_processes(record);
    if processes.is_empty() {
        let strangers = process_tree::group_members(record.pgid);
        return (!strangers.is_empty()).then(|| {
            format!(
                "left alone process(es) {strangers:?} in process group {} of model {:?}: none of the recorded processes runs, so the group id may have been reused",
                record.pgid, record.model
            )
        });
    }
    let found = processes.len();
    let deadline = Instant::now() + CLEANUP_DEADLINE;
    let mut pause = Duration::from_millis(1);
    loop {
        // Kill the descendants first: a killed leader would orphan them out of reach.
        for &pid in processes.iter().rev() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if whole_group {
            let _ = killpg(Pid::from_raw(record.pgid), Signal::SIGKILL);
        }
        processes.retain(|&pid| process_tree::alive(pid));
        if whole_group {
            add_new(&mut processes, process_tree::group_members(record.pgid));
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
                starttime: 2,
                processes: Vec::new(),
            }]
        );
    }

    #[test]
    fn a_reused_pid_is_left_alone() {
        // Our own pid with a start time that is not ours: an unrelated process.
        let me = std::process::id() as i32;
        let real = process_tree::stat(me).expect("own stat").starttime;
        let record = GroupRecord {
            model: "m".into(),
            pgid: me,
            starttime: real + 1,
            processes: Vec::new(),
        };
        assert_eq!(
            leftover_processes(&record),
            Leftover {
                processes: Vec::new(),
                whole_group: false
            }
        );
    }

    #[test]
    fn reads_the_files_of_older_supervisors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        std::fs::write(
            &path,
            r#"{"groups":[{"model":"a","pgid":10,"starttime":1}]}"#,
        )
        .expect("write");
        let state = StateFile::open(&path).expect("open");
        assert_eq!(state.groups()[0].pgid, 10);
        assert_eq!(state.records().leftovers_boot_id, None);
    }
}
