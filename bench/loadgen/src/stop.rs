//! Stop timing: how long the supervisor's Deactivate takes, against how long
//! the same backend takes to exit on its own after SIGTERM.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use gpuswap::{ClientOptions, Endpoint, SupervisorClient, pb};
use serde::Serialize;

use crate::{poller::MomentPoller, procfs, swap::ReadyProbe};

pub fn client(endpoint: &str) -> Result<SupervisorClient> {
    let endpoint: Endpoint = endpoint.parse()?;
    Ok(gpuswap::connect(&endpoint, &ClientOptions::default())?)
}

/// Activates `model` without a hold and waits for Ready; returns the backend pid
/// (from the Starting event, or from Status when it was already running).
pub async fn activate(
    client: &mut SupervisorClient,
    model: &str,
    timeout: Duration,
) -> Result<u32> {
    let events = async {
        let mut stream = client
            .activate(pb::ActivateRequest {
                model: model.to_owned(),
                hold: false,
                force: true,
                client: "gpuswap-bench".into(),
            })
            .await
            .with_context(|| format!("Activate {model}"))?
            .into_inner();
        let mut pid = 0;
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(pb::activate_event::Event::Starting(s)) => pid = s.pid,
                Some(pb::activate_event::Event::Ready(_)) => return Ok(pid),
                Some(pb::activate_event::Event::Failed(f)) => {
                    bail!("{model} failed to start: {} {:?}", f.reason, f.log_tail)
                }
                _ => {}
            }
        }
        bail!("the Activate stream of {model} ended without Ready")
    };
    let pid = tokio::time::timeout(timeout, events)
        .await
        .map_err(|_| anyhow!("{model} not ready after {timeout:?}"))??;
    if pid != 0 {
        return Ok(pid);
    }
    backend_pid(client, model).await
}

pub async fn backend_pid(client: &mut SupervisorClient, model: &str) -> Result<u32> {
    let status = client.status(pb::StatusRequest {}).await?.into_inner();
    status
        .models
        .iter()
        .find(|m| m.name == model)
        .map(|m| m.pid)
        .filter(|&pid| pid != 0)
        .ok_or_else(|| anyhow!("Status shows no process for {model}"))
}

/// Watches a set of processes and records when the last one is gone (polled every 0.5 ms).
fn gone_poller(pids: Vec<u32>) -> MomentPoller {
    MomentPoller::start(Duration::from_micros(500), move || {
        !pids.iter().any(|&pid| procfs::alive(pid))
    })
}

/// How often the finishing side looks whether the last process is gone.
const GONE_CHECK: Duration = Duration::from_millis(2);

fn ms_between(later: Instant, earlier: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64() * 1000.0
}

#[derive(Debug, Clone, Serialize)]
pub struct DeactivateSample {
    pub model: String,
    /// Processes in the backend's tree before the stop.
    pub processes: usize,
    /// The Deactivate call returned.
    pub rpc_ms: f64,
    /// The last process of the tree was gone (seen from /proc).
    pub tree_gone_ms: Option<f64>,
    /// Processes of the tree still alive when the call returned.
    pub left_alive: usize,
}

/// Activates `model`, then times its Deactivate.
pub async fn measure_deactivate(
    client: &mut SupervisorClient,
    model: &str,
) -> Result<DeactivateSample> {
    let pid = activate(client, model, Duration::from_secs(60)).await?;
    let pids = procfs::tree(pid);
    let poller = gone_poller(pids.clone());
    let started = Instant::now();
    client
        .deactivate(pb::DeactivateRequest {
            model: model.to_owned(),
            all: false,
            force: false,
            if_idle_generation: None,
            sleep: false,
        })
        .await
        .with_context(|| format!("Deactivate {model}"))?;
    let returned = Instant::now();
    let left_alive = pids.iter().filter(|&&p| procfs::alive(p)).count();
    let gone = poller.finish(Duration::from_secs(30), GONE_CHECK).await;
    Ok(DeactivateSample {
        model: model.to_owned(),
        processes: pids.len(),
        rpc_ms: ms_between(returned, started),
        tree_gone_ms: gone.map(|g| ms_between(g, started)),
        left_alive,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct OwnExitSample {
    pub processes: usize,
    /// SIGTERM to the backend leader's exit (or to SIGKILL + exit, when it ignores SIGTERM).
    pub leader_exit_ms: f64,
    /// SIGTERM until no process of its tree was left.
    pub tree_gone_ms: Option<f64>,
    /// The leader ignored SIGTERM for `kill_after` and was killed.
    pub killed: bool,
}

/// Runs `command` alone (no supervisor), waits until `probe` says ready,
/// sends SIGTERM to it and times its exit. After `kill_after` the process
/// group is killed, as a supervisor would do at its stop timeout.
pub async fn measure_own_exit(
    command: &[String],
    probe: &ReadyProbe,
    kill_after: Duration,
) -> Result<OwnExitSample> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawn {program}"))?;
    let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
    let pgid = libc::pid_t::try_from(pid)?;
    let kill_group = |signal| {
        // SAFETY: plain kill(2) on the process group we created.
        unsafe { libc::kill(-pgid, signal) };
    };
    let ready_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let probe = probe.clone();
        if tokio::task::spawn_blocking(move || probe.check()).await? {
            break;
        }
        if Instant::now() > ready_deadline {
            kill_group(libc::SIGKILL);
            bail!("{program} never became ready");
        }
        if let Some(status) = child.try_wait()? {
            bail!("{program} exited before it was ready: {status}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pids = procfs::tree(pid);
    let poller = gone_poller(pids.clone());
    let started = Instant::now();
    // As a supervisor does it: SIGTERM to the whole process group.
    kill_group(libc::SIGTERM);
    let killed = match tokio::time::timeout(kill_after, child.wait()).await {
        Ok(status) => {
            status?;
            false
        }
        Err(_) => {
            kill_group(libc::SIGKILL);
            child.wait().await?;
            true
        }
    };
    let leader_exit = Instant::now();
    // A backend that leaves workers behind is cleaned up the way the guard
    // does it, after a while, so that the bench leaves nothing running.
    let gone = poller.finish(Duration::from_secs(2), GONE_CHECK).await;
    kill_group(libc::SIGKILL);
    Ok(OwnExitSample {
        processes: pids.len(),
        leader_exit_ms: ms_between(leader_exit, started),
        tree_gone_ms: gone.map(|g| ms_between(g, started)),
        killed,
    })
}
