//! Process relations (parents, groups, start times, descendants), read with the `procfs`
//! crate. Shared by the supervisor and the guard.

use std::collections::HashMap;

use procfs::{ProcError, process::Process};

/// What matters here of a process's stat.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub ppid: i32,
    pub pgrp: i32,
    pub state: char,
    /// Clock ticks after boot: tells a pid apart from a reused one.
    pub starttime: u64,
}

impl Stat {
    pub fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// The stat of `pid`; None when it is gone (or unreadable).
pub fn stat(pid: i32) -> Option<Stat> {
    let stat = Process::new(pid).ok()?.stat().ok()?;
    Some(Stat {
        ppid: stat.ppid,
        pgrp: stat.pgrp,
        state: stat.state,
        starttime: stat.starttime,
    })
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    stat(pid).is_some_and(|s| s.alive())
}

/// Every live descendant of `root` (not `root` itself), parents before children.
pub fn descendants(root: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![root];
    let mut by_parent: Option<HashMap<i32, Vec<i32>>> = None;
    while let Some(pid) = queue.pop() {
        let children = match children_of(pid) {
            Some(children) => children,
            // No per-task children lists (CONFIG_PROC_CHILDREN off): scan every process once.
            None => by_parent
                .get_or_insert_with(parent_map)
                .get(&pid)
                .cloned()
                .unwrap_or_default(),
        };
        for child in children {
            if !found.contains(&child) {
                found.push(child);
                queue.push(child);
            }
        }
    }
    found
}

/// The children of `pid`, from each of its threads' children list; None when the kernel
/// keeps no such lists.
fn children_of(pid: i32) -> Option<Vec<i32>> {
    let tasks = match Process::new(pid).and_then(|p| p.tasks()) {
        Ok(tasks) => tasks,
        // The process is gone: no children.
        Err(_) => return Some(Vec::new()),
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        match task.children() {
            Ok(pids) => children.extend(pids.into_iter().filter_map(|p| i32::try_from(p).ok())),
            // The thread is still there but has no children list: unsupported.
            Err(ProcError::NotFound(_)) if task.stat().is_ok() => return None,
            Err(_) => {}
        }
    }
    Some(children)
}

fn parent_map() -> HashMap<i32, Vec<i32>> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    for pid in all_pids() {
        if let Some(s) = stat(pid) {
            map.entry(s.ppid).or_default().push(pid);
        }
    }
    map
}

/// Every pid on the system (in this pid namespace).
pub fn all_pids() -> Vec<i32> {
    procfs::process::all_processes()
        .map(|all| all.flatten().map(|p| p.pid()).collect())
        .unwrap_or_default()
}

/// Every live member of the process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| stat(pid).is_some_and(|s| s.pgrp == pgid && s.alive()))
        .collect()
}

/// The supplementary groups of `pid` (empty when it is gone or unreadable).
pub fn supplementary_groups(pid: i32) -> Vec<u32> {
    Process::new(pid)
        .and_then(|p| p.status())
        .map(|status| status.groups)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command name with spaces and parentheses (the stat line's hard case) does not
    /// confuse the fields after it.
    #[test]
    fn reads_a_process_with_an_odd_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a) S 7 (c");
        std::fs::copy("/bin/sleep", &odd).expect("copy sleep");
        let mut child = std::process::Command::new(&odd)
            .arg("30")
            .spawn()
            .expect("spawn the oddly named sleep");
        let me = std::process::id() as i32;
        let stat = stat(child.id() as i32).expect("its stat");
        assert_eq!(stat.ppid, me);
        assert!(stat.alive() && stat.starttime > 0, "{stat:?}");
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn finds_our_own_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let me = std::process::id() as i32;
        assert!(descendants(me).contains(&(child.id() as i32)));
        assert_eq!(stat(child.id() as i32).map(|s| s.ppid), Some(me));
        assert!(all_pids().contains(&(child.id() as i32)));
        let _ = child.kill();
        let _ = child.wait();
    }
}
