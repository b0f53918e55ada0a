//! Worker processes, like SGLang's schedulers: re-executions of this binary
//! that only idle and log now and then. They deliberately set no parent-death
//! signal, so only a supervisor that kills the whole group (or, with
//! `--worker-escape`, tracks them down) gets rid of them.

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{cli::WorkerArgs, log};

/// An orphaned worker gives up after this long, so a failed test run does not
/// leave processes behind forever; far beyond any test's deadline.
const ORPHAN_GIVE_UP: Duration = Duration::from_secs(600);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The workers of a server process.
#[derive(Clone, Default)]
pub struct Workers {
    children: Arc<Mutex<Vec<Child>>>,
    escaped: bool,
}

impl Workers {
    pub fn spawn(count: u32, escape: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating own executable")?;
        let parent = std::process::id();
        let mut children = Vec::new();
        for rank in 0..count {
            let mut command = Command::new(&exe);
            command
                .args([
                    "worker",
                    "--rank",
                    &rank.to_string(),
                    "--parent",
                    &parent.to_string(),
                ])
                .stdin(Stdio::null());
            if escape {
                command.arg("--escape");
            }
            children.push(
                command
                    .spawn()
                    .with_context(|| format!("spawning worker {rank}"))?,
            );
        }
        Ok(Self {
            children: Arc::new(Mutex::new(children)),
            escaped: escape,
        })
    }

    /// What SGLang does on its way out: SIGKILL its own children. Escaped
    /// workers are left alone: that is the case a supervisor must handle.
    pub fn kill_unless_escaped(&self) {
        if self.escaped {
            return;
        }
        let mut children = match self.children.lock() {
            Ok(children) => children,
            Err(poisoned) => poisoned.into_inner(),
        };
        for child in children.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }
}

/// Main of the hidden `worker` subcommand.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    if args.escape {
        nix::unistd::setsid().context("setsid")?;
    }
    let pid = std::process::id();
    let tp = args.rank;
    log::out(format!(
        "[{} TP{tp}] Scheduler process started, pid={pid}{}",
        log::timestamp(),
        if args.escape { " (own session)" } else { "" }
    ));
    let mut last_log = Instant::now();
    let mut orphaned_since: Option<Instant> = None;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if last_log.elapsed() >= LOG_EVERY {
            last_log = Instant::now();
            log::out(format!(
                "[{} TP{tp}] Decode batch. #running-req: 0, #token: 0, token usage: 0.00, #queue-req: 0",
                log::timestamp()
            ));
        }
        let orphaned = nix::unistd::getppid().as_raw() as u32 != args.parent;
        if orphaned {
            let since = *orphaned_since.get_or_insert_with(Instant::now);
            if since.elapsed() > ORPHAN_GIVE_UP {
                log::out(format!(
                    "[{} TP{tp}] Parent gone; scheduler exiting",
                    log::timestamp()
                ));
                return Ok(());
            }
        }
    }
}
