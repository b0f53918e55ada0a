//! Backends that misbehave (mock `--fault`): failed starts, crashes, stubborn stops, floods.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Mock, Supervisor, http};
use gpuswap::pb::{ModelState, activate_event::Event};
use testkit::rss_bytes;

/// A supervisor of one model, alpha, whose mock backend misbehaves as `fault` says; `toml`:
/// more lines of its section.
async fn alpha_with_fault(test: &str, fault: &str, toml: &[&str]) -> Supervisor {
    let mut alpha = Mock::new("alpha").args(&["--fault", fault]);
    for line in toml {
        alpha = alpha.toml(line);
    }
    Supervisor::start(test, &[], vec![alpha]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_during_load_fails_with_the_log_tail() {
    let sup = alpha_with_fault("exitload", "exit-during-load", &[]).await;
    let mut activation = sup.activate("alpha", false).await;
    let failed = activation.failed().await;
    assert_eq!(failed.model, "alpha");
    assert!(failed.reason.contains("exited"), "{failed:?}");
    assert!(
        !failed.log_tail.is_empty(),
        "the backend's last lines come along"
    );
    assert!(failed.log_tail.len() <= 20);
    assert!(
        activation.next().await.is_none(),
        "the stream ends after Failed"
    );

    let status = sup.model("alpha").await;
    assert_eq!(status.state(), ModelState::Failed);
    assert!(status.last_error.contains("exited"), "{status:?}");
    sup.wait_no_backends().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_never_ready_fails_at_startup_timeout() {
    let sup = alpha_with_fault("neverready", "never-ready", &["startup_timeout = \"1s\""]).await;
    let failed = sup.activate("alpha", false).await.failed().await;
    assert!(
        failed.reason.contains("1s"),
        "names the timeout: {failed:?}"
    );
    assert_eq!(sup.state("alpha").await, ModelState::Failed);
    // Nothing of the failed start is left running.
    sup.wait_no_backends().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_ready_loses_the_holds_and_the_next_activate_restarts_with_backoff() {
    let sup = alpha_with_fault("crash", "crash-after:2", &[]).await;
    let mut generations = Vec::new();
    for round in 1..=2u32 {
        let mut hold = sup.activate("alpha", true).await;
        let ready = hold.ready().await;
        generations.push(ready.generation);
        if round == 2 {
            assert!(
                hold.saw(|e| matches!(e, Event::Log(l) if l.line.contains("restarting") && l.line.contains("1 consecutive"))),
                "the restart waits out a backoff: {:?}",
                hold.seen
            );
        }
        let body =
            r#"{"model":"alpha","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
        // The backend dies in the middle of the answer.
        let _ = http(&ready.address, "POST", "/v1/chat/completions", Some(body)).await;
        let lost = hold.hold_lost().await;
        assert!(lost.reason.contains("exited"), "{lost:?}");
        assert!(hold.next().await.is_none(), "the hold stream ends");
        let status = sup.wait_state("alpha", ModelState::Failed).await;
        assert!(status.last_error.contains("exited"), "{status:?}");
        assert_eq!(status.restarts, round - 1);
    }
    assert!(generations[1] > generations[0]);
    // The second crash in a row doubles the wait.
    let mut third = sup.activate("alpha", false).await;
    third.ready().await;
    assert!(
        third.saw(|e| matches!(e, Event::Log(l) if l.line.contains("2 consecutive"))),
        "{:?}",
        third.seen
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_dying_right_after_its_health_check_is_a_crash_never_ready() {
    let sup = alpha_with_fault("exitready", "exit-after-ready", &[]).await;
    for round in 1..=2u32 {
        let mut hold = sup.activate("alpha", true).await;
        // The death is seen before Ready (Failed) or right after it (the hold is lost);
        // either way it is a crash, and the model does not stay Ready with a dead process.
        let reason = hold
            .until("Failed or HoldLost", |e| match e {
                Event::Failed(f) => Some(f.reason.clone()),
                Event::HoldLost(h) => Some(h.reason.clone()),
                _ => None,
            })
            .await;
        assert!(reason.contains("exit"), "{reason}");
        let status = sup.wait_state("alpha", ModelState::Failed).await;
        assert!(status.last_error.contains("exit"), "{status:?}");
        assert_eq!(status.restarts, round - 1);
        if round == 2 {
            assert!(
                hold.saw(|e| matches!(e, Event::Log(l) if l.line.contains("1 consecutive"))),
                "the restart waits out a backoff: {:?}",
                hold.seen
            );
        }
        sup.wait_no_backends().await;
    }
}

/// Waits for a log line of `model` containing `needle`, while the model stays Ready.
async fn wait_for_line_while_ready(sup: &Supervisor, model: &str, needle: &str) {
    testkit::wait_for(needle, testkit::DEADLINE, || async {
        let status = sup.model(model).await;
        assert_eq!(status.state(), ModelState::Ready, "{status:?}");
        let lines = sup.log_text(model, 500).await;
        lines.iter().any(|l| l.contains(needle)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_ignores_signals_from_its_own_tree_and_stray_sigusr2() {
    let mut sup = Supervisor::prepare("guardsignals", &[], Vec::new());
    // A backend that ignores SIGTERM and sends it to its whole group (`kill 0`), the guard
    // included; before the fix the guard took it for a stop and SIGKILLed the tree after
    // stop_timeout.
    let section = format!(
        "\n[models.alpha]\nkind = \"vllm\"\nport = {}\nready_log = \"up-and-ready\"\n\
         stop_timeout = \"1s\"\ncommand = [\"sh\", \"-c\", \"trap '' TERM; echo up-and-ready; \
         kill -TERM 0; exec sleep 120\"]\nenv = {{ {} = \"{}\" }}\n",
        testkit::free_port(),
        common::MARKER_ENV,
        sup.marker
    );
    std::fs::write(&sup.config_path, sup.config_text() + &section).expect("write config");
    sup = sup.launch().await;
    let ready = sup.activate("alpha", true).await.ready().await;
    let pid = sup.model("alpha").await.pid;
    wait_for_line_while_ready(&sup, "alpha", "a process of the backend's own tree").await;

    // A SIGUSR2 from anyone but the dying supervisor is no parent death.
    let guard = parent_of(pid);
    // SAFETY: kill with a pid read from /proc (the guard, our supervisor's child).
    assert_eq!(unsafe { libc::kill(guard, libc::SIGUSR2) }, 0);
    wait_for_line_while_ready(&sup, "alpha", "the supervisor (pid").await;
    assert!(testkit::alive(pid), "the backend lives on");
    let status = sup.model("alpha").await;
    assert_eq!((status.pid, status.generation), (pid, ready.generation));
}

/// The parent of `pid`, from /proc.
fn parent_of(pid: u32) -> i32 {
    testkit::stat(pid).expect("process alive").ppid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_killed_from_outside_keeps_the_gpu_until_its_orphans_are_ended() {
    // Both on GPU 0; alpha's worker outlives its leader when orphaned (like a CUDA worker).
    let sup = Supervisor::start(
        "guardkilled",
        &[],
        vec![
            Mock::new("alpha").args(&["--workers", "1"]),
            Mock::new("beta"),
        ],
    )
    .await;
    sup.activate("alpha", false).await.ready().await;
    let leader = sup.model("alpha").await.pid;
    let guard = parent_of(leader);
    let worker = sup
        .backend_processes()
        .into_iter()
        .find(|&pid| pid != leader && pid as i32 != guard && parent_of(pid) == leader as i32)
        .expect("alpha's worker");
    // SAFETY: kill with a pid read from /proc (alpha's guard, our supervisor's child).
    assert_eq!(unsafe { libc::kill(guard, libc::SIGKILL) }, 0);
    // Seen as a crash first (else beta's swap would stop alpha by signalling its group).
    sup.wait_state("alpha", ModelState::Failed).await;
    // beta needs GPU 0: it must not start while alpha's orphaned worker still runs.
    sup.activate("beta", false).await.ready().await;
    assert!(
        !testkit::alive(worker),
        "beta started while alpha's worker {worker} still ran"
    );
    let log = sup.log_text("alpha", 500).await.join("\n");
    assert!(log.contains("outlived the guard"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_ignoring_sigterm_is_killed_after_stop_timeout() {
    let sup = alpha_with_fault("sigterm", "ignore-sigterm", &["stop_timeout = \"1s\""]).await;
    sup.activate("alpha", false).await.ready().await;
    assert!(!sup.backend_processes().is_empty());
    let began = Instant::now();
    assert_eq!(
        sup.deactivate("alpha", false).await,
        vec!["alpha".to_string()]
    );
    assert!(
        began.elapsed() >= Duration::from_secs(1),
        "SIGKILL only after stop_timeout"
    );
    // Deactivate returns once the processes are gone.
    assert!(
        sup.backend_processes().is_empty(),
        "{:?}",
        sup.backend_processes()
    );
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_flood_keeps_the_supervisor_memory_bounded() {
    let sup = alpha_with_fault("flood", "flood:100M", &[]).await;
    let pid = sup.pid();
    let mut activation = sup.activate("alpha", false).await;
    let mut peak = 0;
    let started = Instant::now();
    let mut ready = false;
    loop {
        peak = peak.max(rss_bytes(pid).expect("supervisor alive"));
        if !ready
            && let Ok(Some(event)) =
                tokio::time::timeout(Duration::from_millis(20), activation.next()).await
        {
            ready = matches!(event, Event::Ready(_));
            assert!(!matches!(event, Event::Failed(_)), "{event:?}");
        }
        let mut done = false;
        for line in sup.log_lines("alpha", 20).await {
            done |= line.line.contains("flood done");
            assert!(line.line.len() <= 17 * 1024, "long lines are cut");
        }
        if done && ready {
            break;
        }
        assert!(
            started.elapsed() < testkit::DEADLINE * 2,
            "the flood did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    peak = peak.max(rss_bytes(pid).expect("supervisor alive"));
    assert!(
        peak < 200 << 20,
        "supervisor RSS peaked at {} MiB",
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_fails_the_start_clearly() {
    let sup = Supervisor::start("portbusy", &[], vec![Mock::new("alpha")]).await;
    // Something else (not a configured model) holds the model's port.
    let squatter = std::net::TcpListener::bind(sup.mock("alpha").address()).expect("bind");
    let failed = sup.activate("alpha", false).await.failed().await;
    assert!(failed.reason.contains("already in use"), "{failed:?}");
    assert!(
        failed.reason.contains(&sup.mock("alpha").port.to_string()),
        "{failed:?}"
    );
    assert_eq!(sup.state("alpha").await, ModelState::Failed);
    sup.wait_no_backends().await;
    drop(squatter);
    // Once the port is free the model starts (after the one-second backoff).
    sup.activate("alpha", false).await.ready().await;
}
