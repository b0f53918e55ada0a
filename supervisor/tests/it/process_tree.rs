//! The process tree of a backend never outlives a stop, its own exit, or the spawner.

use std::{
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::process_support::{assert_logged, logs, model, sh, spec, tagged};
use gpuswap_supervisor::backend::{Backend, StartError, state_file::StateFile};
use serde_json::json;
use tempfile::TempDir;
use testkit::{DEADLINE, free_port, unique_marker, wait_for, wait_for_blocking};

const SPAWNER_MARKER_ENV: &str = "GPUSWAP_TEST_SPAWNER_MARKER";
const SPAWNER_PORT_ENV: &str = "GPUSWAP_TEST_SPAWNER_PORT";

/// A backend whose worker calls setsid (leaves the process group) and runs a grandchild.
const ESCAPING_TREE: &str = "setsid sh -c 'sleep 1000 & exec sleep 1001' & exec sleep 1002";

fn tagged_config(
    script: &str,
    marker: &str,
    extra: serde_json::Value,
) -> gpuswap::config::ModelConfig {
    let mut extra = extra;
    extra["env"] = json!({ "GPUSWAP_TEST_MARKER": marker });
    let command = sh(script);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    model("vllm", &command, free_port(), extra)
}

/// Waits until `count` tagged processes run (the guard included).
async fn wait_tagged(marker: &str, count: usize, except: &[u32]) -> Vec<u32> {
    wait_for(
        &format!("{count} processes tagged {marker}"),
        DEADLINE,
        || async {
            let found = tagged(marker, except);
            (found.len() >= count).then_some(found)
        },
    )
    .await
}

#[tokio::test]
async fn stop_ends_a_worker_that_left_the_group() {
    let marker = unique_marker("setsid");
    let config = tagged_config(ESCAPING_TREE, &marker, json!({}));
    let logs = logs("escape");
    let backend = Backend::spawn(&spec("escape", config), logs.clone()).expect("spawn");
    // guard, backend (sleep 1002), the setsid worker (sleep 1001) and its child (sleep 1000).
    let found = wait_tagged(&marker, 4, &[]).await;
    let outside: Vec<u32> = found
        .iter()
        .copied()
        .filter(|&pid| testkit::stat(pid).map(|stat| stat.pgrp) != Some(backend.pgid()))
        .collect();
    assert_eq!(
        outside.len(),
        2,
        "the setsid worker and its child left the group: {found:?}"
    );

    let stopping = Instant::now();
    let info = backend.stop().await;
    eprintln!("stop took {:?}", stopping.elapsed());
    assert_eq!(
        info.signal,
        Some(libc::SIGTERM),
        "the guard mirrors the backend's SIGTERM: {info}"
    );
    assert_eq!(
        tagged(&marker, &[]),
        Vec::<u32>::new(),
        "processes left after stop"
    );
    assert_eq!(backend.exit_info(), Some(info));
    assert_logged(&logs, "stopping");
    assert_logged(&logs, "exited: killed by signal 15");
}

#[tokio::test]
async fn concurrent_stops_share_one_stop() {
    let marker = unique_marker("concurrent");
    let config = tagged_config("exec sleep 1000", &marker, json!({}));
    let backend = Backend::spawn(&spec("concurrent", config), logs("concurrent")).expect("spawn");
    wait_tagged(&marker, 2, &[]).await;
    let other = backend.clone();
    let (a, b) = tokio::join!(backend.stop(), other.stop());
    assert_eq!(a, b);
    assert_eq!(
        backend.stop().await,
        a,
        "a later stop reports the same exit"
    );
    assert!(tagged(&marker, &[]).is_empty());
}

#[tokio::test]
async fn a_backend_ignoring_sigterm_is_killed_after_stop_timeout() {
    let marker = unique_marker("stubborn");
    let stop_timeout = Duration::from_millis(1500);
    let config = tagged_config(
        "trap '' TERM; sleep 1000 & setsid sleep 1001 & wait",
        &marker,
        json!({ "stop_timeout": "1500ms" }),
    );
    let logs = logs("stubborn");
    let backend = Backend::spawn(&spec("stubborn", config), logs.clone()).expect("spawn");
    wait_tagged(&marker, 4, &[]).await;
    let started = Instant::now();
    let info = backend.stop().await;
    let took = started.elapsed();
    assert_eq!(info.signal, Some(libc::SIGKILL), "{info}");
    assert!(
        took >= stop_timeout,
        "SIGKILL only after stop_timeout, took {took:?}"
    );
    assert!(tagged(&marker, &[]).is_empty(), "processes left after stop");
    assert_logged(&logs, "stop escalated to SIGKILL");
}

#[tokio::test]
async fn an_exit_reports_its_code_and_leaves_no_descendant() {
    let marker = unique_marker("exit");
    let dir = testkit::short_tempdir();
    let go = dir.path().join("go");
    let script = format!(
        "sleep 1000 & setsid sleep 1001 & while [ ! -e {} ]; do sleep 0.01; done; exit 7",
        go.display()
    );
    let config = tagged_config(&script, &marker, json!({}));
    let logs = logs("exit");
    let backend = Backend::spawn(&spec("exit", config), logs.clone()).expect("spawn");
    // guard, backend shell, its two sleeps (and maybe a short `sleep 0.01`).
    wait_tagged(&marker, 4, &[]).await;
    std::fs::write(&go, "").expect("go");
    let info = tokio::time::timeout(DEADLINE, backend.exited())
        .await
        .expect("exit in time");
    assert_eq!(info.code, Some(7), "{info}");
    assert!(
        tagged(&marker, &[]).is_empty(),
        "descendants left after the backend exited"
    );
    assert_logged(&logs, "exited: exit status 7");
    // A stop after the exit is a no-op that reports the same exit.
    assert_eq!(backend.stop().await, info);
}

#[tokio::test]
async fn a_missing_program_fails_the_spawn() {
    let config = model(
        "vllm",
        &["/nonexistent/gpuswap-backend"],
        free_port(),
        json!({}),
    );
    match Backend::spawn(&spec("missing", config), logs("missing")) {
        Err(StartError::Spawn { program, source }) => {
            assert_eq!(program, "/nonexistent/gpuswap-backend");
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{source}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("spawned a missing program"),
    }
}

#[tokio::test]
async fn an_unknown_user_is_refused() {
    let config = model(
        "vllm",
        &["true"],
        free_port(),
        json!({ "user": "gpuswap-no-such-user" }),
    );
    let error = Backend::spawn(&spec("user", config), logs("user"))
        .err()
        .expect("refused");
    assert!(
        matches!(error, StartError::NoSuchUser(ref u) if u == "gpuswap-no-such-user"),
        "{error}"
    );
}

#[tokio::test]
async fn the_backend_runs_as_its_user() {
    testkit::require_root("dropping privileges to another user");
    let nobody = nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .expect("this test runs the backend as the user nobody, which this system lacks");
    let config = model(
        "vllm",
        &[
            "sh",
            "-c",
            "echo uid=$(id -u) gid=$(id -g) home=$HOME user=$USER",
        ],
        free_port(),
        json!({ "user": "nobody", "workdir": "/" }),
    );
    let logs = logs("nobody");
    let backend = Backend::spawn(&spec("nobody", config), logs.clone()).expect("spawn");
    let info = tokio::time::timeout(DEADLINE, backend.exited())
        .await
        .expect("exit in time");
    assert_eq!(info.code, Some(0), "{info}: {:?}", logs.tail_lines(20));
    let expected = format!(
        "uid={} gid={} home={} user=nobody",
        nobody.uid,
        nobody.gid,
        nobody.dir.display()
    );
    assert_logged(&logs, &expected);
}

#[tokio::test]
async fn a_busy_port_is_refused_with_its_holder() {
    let port = free_port();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind");
    let config = model("vllm", &["sleep", "1000"], port, json!({}));
    match Backend::spawn(&spec("busy", config), logs("busy")) {
        Err(StartError::PortBusy { port: busy, detail }) => {
            assert_eq!(busy, port);
            assert!(
                detail.contains(&format!("pid {}", std::process::id())),
                "the holder is named: {detail:?}"
            );
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("spawned on a busy port"),
    }
}

#[tokio::test]
async fn the_state_file_lists_running_groups() {
    let dir = testkit::short_tempdir();
    let state =
        std::sync::Arc::new(StateFile::open(&dir.path().join("run/state.json")).expect("open"));
    let marker = unique_marker("state");
    let config = tagged_config("exec sleep 1000", &marker, json!({}));
    let mut spec = spec("state", config);
    spec.state_file = Some(state.clone());
    let backend = Backend::spawn(&spec, logs("state")).expect("spawn");
    let recorded = StateFile::open(state.path()).expect("reopen").groups();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        (recorded[0].model.as_str(), recorded[0].pgid),
        ("state", backend.pgid())
    );
    // The backend by pid and start time, and the boot they belong to.
    let backend_pid = backend.pid();
    assert!(
        recorded[0]
            .processes
            .iter()
            .any(|p| p.pid == backend_pid as i32 && p.starttime == starttime(backend_pid)),
        "{recorded:?}"
    );
    let text = std::fs::read_to_string(state.path()).expect("read");
    let boot_id = procfs::sys::kernel::random::boot_id().expect("boot id");
    assert!(text.contains(boot_id.trim()), "{text}");
    backend.stop().await;
    assert!(
        StateFile::open(state.path())
            .expect("reopen")
            .groups()
            .is_empty()
    );
}

#[test]
fn cleanup_ends_a_recorded_leftover_group() {
    let dir = testkit::short_tempdir();
    let path = dir.path().join("state.json");
    let marker = unique_marker("leftover");
    let mut command = Command::new("sh");
    command
        .args(["-c", "sleep 1000 & setsid sleep 1001 & wait"])
        .env("GPUSWAP_TEST_MARKER", &marker);
    let leftover = testkit::Proc::spawn(command);
    let pgid = leftover.pid() as i32;
    wait_for_blocking("the leftover tree", DEADLINE, || {
        (tagged(&marker, &[]).len() >= 3).then_some(())
    });
    let starttime = starttime(leftover.pid());
    StateFile::open(&path)
        .expect("open")
        .record("old", pgid, starttime)
        .expect("record");

    let restarted = StateFile::open(&path).expect("reopen");
    let ended = restarted.cleanup_leftovers();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert!(ended[0].contains("\"old\""), "{ended:?}");
    assert!(
        tagged(&marker, &[]).is_empty(),
        "leftovers survived the cleanup"
    );
    assert!(StateFile::open(&path).expect("reopen").groups().is_empty());
    // Nothing recorded is running: a second cleanup has nothing to say.
    assert!(restarted.cleanup_leftovers().is_empty());
}

/// A state file's path in a fresh directory (kept while the directory lives), and a
/// process group whose leader exited and left `sleep 1000` behind, tagged for `test`:
/// (the directory, the path, the group, the sleep's pid).
fn state_and_group_without_its_leader(test: &str) -> (TempDir, PathBuf, testkit::Proc, u32) {
    let dir = testkit::short_tempdir();
    let path = dir.path().join("state.json");
    let marker = unique_marker(test);
    let mut command = Command::new("sh");
    command
        .args(["-c", "sleep 1000 & exit 0"])
        .env("GPUSWAP_TEST_MARKER", &marker);
    let mut group = testkit::Proc::spawn(command);
    group.wait_exit(DEADLINE);
    let sleep = wait_for_blocking("the sleep", DEADLINE, || {
        tagged(&marker, &[]).first().copied()
    });
    (dir, path, group, sleep)
}

#[test]
fn cleanup_leaves_alone_a_group_none_of_whose_recorded_processes_runs() {
    // The recorded guard ended long ago; another program's group has its id now.
    let (_dir, path, group, stranger) = state_and_group_without_its_leader("stranger");
    let pgid = group.pid() as i32;
    StateFile::open(&path)
        .expect("open")
        .record("old", pgid, 1)
        .expect("record");
    let report = StateFile::open(&path).expect("reopen").cleanup_leftovers();
    assert!(testkit::alive(stranger), "an unproven process was killed");
    assert_eq!(report.len(), 1, "{report:?}");
    assert!(report[0].contains("left alone"), "{report:?}");
}

#[test]
fn cleanup_ends_a_recorded_process_whose_group_leader_is_gone() {
    let (_dir, path, group, orphan) = state_and_group_without_its_leader("orphan");
    let state = StateFile::open(&path).expect("open");
    state.record("old", group.pid() as i32, 1).expect("record");
    state
        .record_processes(group.pid() as i32, &[orphan as i32])
        .expect("record the worker");
    let report = StateFile::open(&path).expect("reopen").cleanup_leftovers();
    assert!(
        !testkit::alive(orphan),
        "a recorded process survived: {report:?}"
    );
    assert!(report[0].contains("ended 1 leftover"), "{report:?}");
}

#[test]
fn cleanup_kills_nothing_recorded_in_another_boot() {
    let dir = testkit::short_tempdir();
    let path = dir.path().join("state.json");
    let mut command = Command::new("sleep");
    command.arg("1000");
    let other = testkit::Proc::spawn(command);
    // The same pid and start time, but of another boot: another process.
    let record = json!({
        "boot_id": "00000000-0000-0000-0000-000000000000",
        "groups": [{"model": "old", "pgid": other.pid(), "starttime": starttime(other.pid())}]
    });
    std::fs::write(&path, record.to_string()).expect("state file");
    let report = StateFile::open(&path).expect("open").cleanup_leftovers();
    assert!(
        testkit::alive(other.pid()),
        "killed a process of this boot: {report:?}"
    );
    assert!(report.is_empty(), "{report:?}");
}

#[test]
fn killing_the_spawner_ends_the_whole_tree() {
    let marker = unique_marker("spawner");
    let mut command = Command::new(std::env::current_exe().expect("current_exe"));
    command
        .arg(testkit::test_name(module_path!(), "spawner_helper"))
        .args(["--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(SPAWNER_MARKER_ENV, &marker)
        .env(SPAWNER_PORT_ENV, free_port().to_string())
        .stdout(Stdio::piped());
    // The helper dies with this test, whatever happens to it.
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let mut spawner = testkit::Proc::spawn(command);
    let stdout = spawner.child.stdout.take().expect("stdout");
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // libtest prints "test spawner_helper ... " before the helper's own words.
        let spawned = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("spawned pgid"));
        let _ = line_tx.send(spawned);
    });
    let spawned = line_rx
        .recv_timeout(DEADLINE)
        .expect("the helper answers in time")
        .expect("the helper spawned a backend");
    let helper = spawner.pid();
    wait_for_blocking("the backend tree", DEADLINE, || {
        (tagged(&marker, &[helper]).len() >= 4).then_some(())
    });

    let killed = Instant::now();
    spawner.signal(libc::SIGKILL);
    spawner.wait_exit(DEADLINE);
    wait_for_blocking(
        "the tree to end after the spawner's death",
        DEADLINE,
        || tagged(&marker, &[helper]).is_empty().then_some(()),
    );
    eprintln!(
        "{spawned}: tree gone {:?} after SIGKILL of the spawner",
        killed.elapsed()
    );
}

/// Run by `killing_the_spawner_ends_the_whole_tree` in a process of its own.
#[test]
#[ignore = "helper process of killing_the_spawner_ends_the_whole_tree"]
fn spawner_helper() {
    let (Ok(marker), Ok(port)) = (
        std::env::var(SPAWNER_MARKER_ENV),
        std::env::var(SPAWNER_PORT_ENV),
    ) else {
        panic!("run by killing_the_spawner_ends_the_whole_tree only");
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut config = tagged_config(ESCAPING_TREE, &marker, json!({}));
        config.port = port.parse().expect("port");
        let backend = Backend::spawn(&spec("spawner", config), logs("spawner")).expect("spawn");
        println!("spawned pgid {} pid {}", backend.pgid(), backend.pid());
        std::future::pending::<()>().await
    });
}

/// The start time of a live process.
fn starttime(pid: u32) -> u64 {
    testkit::starttime(pid).expect("the process runs")
}

#[tokio::test]
async fn a_backend_outlives_the_thread_that_spawned_it() {
    let marker = unique_marker("thread");
    let config = tagged_config("exec sleep 1000", &marker, json!({}));
    let runtime = tokio::runtime::Handle::current();
    let spawned = std::thread::spawn(move || {
        let _entered = runtime.enter();
        Backend::spawn(&spec("thread", config), logs("thread")).expect("spawn")
    })
    .join()
    .expect("spawner thread");
    // The parent-death signal follows the forking thread: had the thread that just ended
    // forked the guard, the guard would be ending the tree now.
    let early_exit = tokio::time::timeout(Duration::from_secs(1), spawned.exited()).await;
    assert!(
        early_exit.is_err(),
        "the backend died with its spawning thread: {early_exit:?}"
    );
    assert!(testkit::alive(spawned.pid()));
    spawned.stop().await;
    assert!(tagged(&marker, &[]).is_empty());
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_tree() {
    let marker = unique_marker("dropped");
    let config = tagged_config(ESCAPING_TREE, &marker, json!({}));
    let backend = Backend::spawn(&spec("dropped", config), logs("dropped")).expect("spawn");
    wait_tagged(&marker, 4, &[]).await;
    let clone = backend.clone();
    drop(backend);
    assert_eq!(
        tagged(&marker, &[]).len(),
        4,
        "a clone still holds the tree"
    );
    drop(clone);
    wait_for("the tree to end", DEADLINE, || async {
        tagged(&marker, &[]).is_empty().then_some(())
    })
    .await;
}
