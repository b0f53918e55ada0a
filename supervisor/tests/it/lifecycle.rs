//! The daemon's life: bad configs, shutdown, kill -9, leftovers of a predecessor, reload,
//! required files.

use std::process::Command;

use crate::common::{MARKER_ENV, Mock, Supervisor, http, run_to_exit};
use gpuswap::pb::{self, ModelState, activate_event::Event};
use testkit::{DEADLINE, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_scheduler_ends_the_supervisor_with_a_failure_and_its_backends() {
    let mut sup = Supervisor::prepare("actorpanic", &[], vec![Mock::new("alpha")]);
    // A debug build's fault injection: the actor panics on the next reload, as a bug would.
    sup.env
        .push(("GPUSWAP_TEST_FAULT".into(), "actor-panic-on-reload".into()));
    sup.write_config();
    let mut sup = sup.launch().await;
    sup.activate("alpha", false).await.ready().await;
    assert!(!sup.backend_processes().is_empty());
    let mut proc = sup.proc.take().expect("running");
    proc.signal(libc::SIGHUP);
    let status = tokio::task::block_in_place(|| proc.wait_exit(DEADLINE));
    assert!(!status.success(), "exit: {status}\n{}", sup.log());
    assert!(sup.log().contains("scheduler panicked"), "{}", sup.log());
    // As after kill -9: every guard ends its backend when the supervisor is gone.
    sup.wait_no_backends().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_supervisor_never_reuses_a_generation() {
    let mut sup = Supervisor::start("generations", &[], vec![Mock::new("alpha")]).await;
    let before = sup.activate("alpha", false).await.ready().await.generation;
    sup.terminate().await;
    // A gateway that saw `before` must not take the next backend for the same one.
    let sup = sup.launch().await;
    let after = sup.activate("alpha", false).await.ready().await.generation;
    assert!(after > before, "generation {after} after {before}");
}

#[test]
fn bad_configs_exit_2_and_name_the_key() {
    let dir = testkit::short_tempdir();
    let config = dir.path().join("bad.toml");
    let config_arg = config.to_str().expect("utf-8 path");
    let cases = [
        (
            "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 0\n",
            "models.\"a\".port",
        ),
        ("[supervisor]\nbogus = 1\n", "bogus"),
        (
            "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nstop_timeout = \"soon\"\n",
            "soon",
        ),
        // A certificate without its key (with neither, the supervisor makes its own).
        (
            "[supervisor]\nlisten = \"https://0.0.0.0:7070\"\ntls_cert = \"c.pem\"\n",
            "supervisor.tls_key",
        ),
        // Past what `Instant + Duration` can hold: refused, not a panic later.
        (
            "[supervisor]\ndrain_timeout = \"300000000000y\"\n",
            "supervisor.drain_timeout",
        ),
        (
            "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\ngpus = [0]\nenv = { CUDA_VISIBLE_DEVICES = \"1\" }\n",
            "models.\"a\".env.CUDA_VISIBLE_DEVICES",
        ),
    ];
    for (text, key) in cases {
        std::fs::write(&config, text).expect("write config");
        for args in [
            &["--config", config_arg][..],
            &["--config", config_arg, "--check"],
        ] {
            let (code, stderr) = run_to_exit(args, dir.path());
            assert_eq!(code, Some(2), "{args:?} {text}: {stderr}");
            assert!(
                stderr.contains(key),
                "{text}: the error names {key}: {stderr}"
            );
        }
    }
    let (code, stderr) = run_to_exit(&["--config", "/nonexistent/gpuswap.toml"], dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/gpuswap.toml"), "{stderr}");

    std::fs::write(&config, "").expect("write config");
    let (code, stderr) = run_to_exit(
        &["--config", config_arg, "--listen", "http://127.0.0.1:7070"],
        dir.path(),
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("supervisor.listen"), "{stderr}");
}

#[test]
fn check_validates_the_shipped_example_and_exits_0_without_serving() {
    let dir = testkit::short_tempdir();
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/examples/blackwell.toml"
    );
    // The example listens on /run/gpuswap: --check must neither bind nor touch it.
    let (code, stderr) = run_to_exit(&["--config", example, "--check"], dir.path());
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_backend_and_exits_0() {
    let mut sup = Supervisor::start(
        "sigterm",
        &[],
        vec![Mock::new("zero").gpus(&[0]), Mock::new("one").gpus(&[1])],
    )
    .await;
    let mut hold = sup.activate("zero", true).await;
    hold.ready().await;
    sup.activate("one", false).await.ready().await;
    assert!(!sup.backend_processes().is_empty());
    sup.terminate().await;
    // The hold learned why it ended.
    hold.hold_lost().await;
    assert!(!sup.socket.exists(), "the socket is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_supervisor_leaves_no_backend_process() {
    let mut sup = Supervisor::start(
        "kill9",
        &[],
        vec![
            Mock::new("alpha")
                .flavor("sglang")
                .args(&["--workers", "2", "--worker-escape"]),
        ],
    )
    .await;
    sup.activate("alpha", false).await.ready().await;
    let before = sup.backend_processes();
    assert!(before.len() >= 3, "server and two workers: {before:?}");
    let mut proc = sup.proc.take().expect("running");
    proc.signal(libc::SIGKILL);
    tokio::task::block_in_place(|| proc.wait_exit(DEADLINE));
    // Even the workers that left the process group end.
    sup.wait_no_backends().await;
}

/// The start time of a live process.
fn starttime(pid: u32) -> u64 {
    testkit::starttime(pid).expect("the process runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_supervisor_ends_its_predecessors_leftovers() {
    let sup = Supervisor::prepare("leftover", &[], vec![Mock::new("alpha")]);
    // A process group a crashed predecessor recorded, still running.
    let mut leftover = Command::new("sleep");
    leftover.arg("1000").env(MARKER_ENV, &sup.marker);
    let leftover = Proc::spawn(leftover);
    let record = serde_json::json!({
        "groups": [{"model": "alpha", "pgid": leftover.pid(), "starttime": starttime(leftover.pid())}]
    });
    std::fs::write(&sup.state_path, record.to_string()).expect("state file");
    sup.write_config();
    let sup = sup.launch().await;
    assert!(
        !testkit::alive(leftover.pid()),
        "ended before the supervisor serves"
    );
    sup.wait_no_backends().await;
    // And the new supervisor works as usual.
    sup.activate("alpha", false).await.ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_supervisor_on_a_live_socket_is_refused_and_a_stale_socket_is_replaced() {
    let sup = Supervisor::prepare("socket", &[], vec![Mock::new("alpha")]);
    // A socket file left by a dead process.
    drop(std::os::unix::net::UnixListener::bind(&sup.socket).expect("stale socket"));
    assert!(sup.socket.exists());
    sup.write_config();
    let sup = sup.launch().await;
    sup.activate("alpha", false).await.ready().await;

    let config = sup.config_path.to_str().expect("utf-8 path");
    let (code, stderr) = run_to_exit(&["--config", config], sup.dir.path());
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("another supervisor is listening"),
        "{stderr}"
    );
    // The first one is untouched: its backend still runs.
    assert_eq!(sup.state("alpha").await, ModelState::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_flag_is_applied_before_validation_and_kept_across_reloads() {
    // The file's listen would be refused; the flag replaces it before the check.
    let mut sup = Supervisor::prepare(
        "listenflag",
        &["listen = \"nowhere\""],
        vec![Mock::new("alpha")],
    );
    sup.write_config();
    let mut command = sup.command();
    command
        .arg("--listen")
        .arg(format!("unix://{}", sup.socket.display()));
    let mut proc = Proc::spawn(command);
    testkit::wait_until_answering(&sup.client, &mut proc, &sup.stderr_path).await;
    sup.proc = Some(proc);

    // A reload reads the file again with the flag on top: still valid, nothing to restart.
    sup.models.push(Mock::new("beta"));
    let response = sup.rewrite_and_reload().await;
    assert_eq!(response.added, ["beta"]);
    assert!(response.needs_restart.is_empty(), "{response:?}");

    // Another valid socket in the file: the flag still decides, nothing to restart.
    let other = sup.dir.path().join("other.sock");
    sup.settings = vec![format!("listen = \"unix://{}\"", other.display())];
    let response = sup.rewrite_and_reload().await;
    assert!(response.needs_restart.is_empty(), "{response:?}");
    assert!(!other.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_changes_that_need_a_restart() {
    let mut sup = Supervisor::start("reloadkeys", &[], vec![Mock::new("alpha")]).await;
    let other = sup.dir.path().join("other.sock");
    sup.settings.extend(
        [
            &format!("listen = \"unix://{}\"", other.display()),
            "allowed_uids = [4242]",
            "allowed_gids = [4343]",
            "socket_mode = \"0600\"",
            // Applied by the reload: not named.
            "drain_timeout = \"30s\"",
        ]
        .map(String::from),
    );
    sup.write_config();
    let endpoint = format!("unix://{}", sup.socket.display());
    let reload = testkit::run_ctl(&endpoint, &["reload"]).await;
    let stdout = String::from_utf8_lossy(&reload.stdout);
    assert!(reload.status.success(), "{reload:?}");
    for key in [
        "supervisor.socket_mode",
        "supervisor.allowed_uids",
        "supervisor.allowed_gids",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(key) && l.contains("after a restart")),
            "gpuswapctl reload does not say that {key} needs a restart: {stdout}"
        );
    }
    let response = sup.reload().await;
    assert_eq!(
        response.needs_restart,
        [
            "supervisor.listen",
            "supervisor.socket_mode",
            "supervisor.allowed_uids",
            "supervisor.allowed_gids"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_restarts_only_changed_models() {
    let mut sup = Supervisor::start(
        "reload",
        &[],
        vec![
            Mock::new("same").gpus(&[0]),
            Mock::new("changed").gpus(&[1]),
            Mock::new("removed").gpus(&[3]),
        ],
    )
    .await;
    let same = sup.activate("same", false).await.ready().await;
    let same_pid = sup.model("same").await.pid;
    let mut changed_hold = sup.activate("changed", true).await;
    changed_hold.ready().await;
    let removed = sup.activate("removed", false).await.ready().await;

    sup.models.retain(|m| m.name != "removed");
    sup.models[1].load_time = "400ms".into();
    sup.models.push(Mock::new("added").gpus(&[2]));
    let response = sup.rewrite_and_reload().await;
    assert_eq!(response.added, vec!["added".to_string()]);
    assert_eq!(response.removed, vec!["removed".to_string()]);
    assert_eq!(response.changed, vec!["changed".to_string()]);

    let lost = changed_hold.hold_lost().await;
    assert!(lost.reason.contains("configuration changed"), "{lost:?}");
    sup.wait_state("changed", ModelState::Stopped).await;
    testkit::wait_for("the removed model to go", DEADLINE, || async {
        let status = sup.status().await;
        (!status.models.iter().any(|m| m.name == "removed")).then_some(())
    })
    .await;
    assert!(
        http(&removed.address, "GET", "/health", None)
            .await
            .is_err(),
        "removed is stopped"
    );
    assert_eq!(sup.state("added").await, ModelState::Stopped);
    // The unchanged model kept serving, same process, same generation.
    let status = sup.model("same").await;
    assert_eq!(
        (status.state(), status.pid, status.generation),
        (ModelState::Ready, same_pid, same.generation)
    );
    sup.activate("added", false).await.ready().await;

    // A broken file is refused and nothing changes.
    std::fs::write(&sup.config_path, "[models.x]\nport = 0\n").expect("write");
    let error = sup
        .client
        .clone()
        .reload(pb::ReloadRequest {})
        .await
        .expect_err("invalid config");
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    // The reason, not only "cannot load": the file does not deserialize, and says where.
    assert!(
        error.message().contains("cannot load configuration")
            && error.message().contains("models.x"),
        "{error:?}"
    );
    assert_eq!(sup.model("same").await.pid, same_pid);

    // SIGHUP reloads too.
    sup.models.push(Mock::new("by-sighup").gpus(&[4]));
    sup.write_config();
    sup.proc.as_ref().expect("running").signal(libc::SIGHUP);
    testkit::wait_for("SIGHUP to add a model", DEADLINE, || async {
        let status = sup.status().await;
        status
            .models
            .iter()
            .any(|m| m.name == "by-sighup")
            .then_some(())
    })
    .await;
    assert_eq!(sup.model("same").await.pid, same_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_unavailable_until_its_required_files_exist() {
    let mut sup = Supervisor::prepare("requires", &[], vec![]);
    let weights = sup.dir.path().join("weights.bin");
    sup.models
        .push(Mock::new("alpha").toml(&format!("requires = [\"{}\"]", weights.display())));
    sup.write_config();
    let sup = sup.launch().await;

    let status = sup.model("alpha").await;
    assert_eq!(status.state(), ModelState::Unavailable);
    assert!(
        status
            .detail
            .contains(&format!("missing {}", weights.display())),
        "{status:?}"
    );
    let failed = sup.activate("alpha", false).await.failed().await;
    assert!(failed.reason.contains("missing"), "{failed:?}");
    sup.wait_no_backends().await;

    // Files that appear later work without a restart.
    std::fs::write(&weights, b"weights").expect("write weights");
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
    sup.activate("alpha", false).await.ready().await;
}

/// A spawn runs off the actor: while a backend's guard is slow to report its pid (5 s here
/// by a debug build's fault injection; the supervisor waits up to 10 s), Status and other
/// models' activations are answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_answers_while_a_spawn_is_slow() {
    let sup = Supervisor::start(
        "slowspawn",
        &[],
        vec![
            Mock::new("alpha").env("GPUSWAP_TEST_FAULT", "guard-slow-report"),
            Mock::new("beta").gpus(&[1]),
        ],
    )
    .await;
    let starting = |e: &Event| match e {
        Event::Starting(s) => Some(s.pid),
        _ => None,
    };
    let mut alpha = sup.activate("alpha", false).await;
    let answer = std::time::Duration::from_secs(2);
    let began = std::time::Instant::now();
    let status = tokio::time::timeout(answer, sup.model("alpha"))
        .await
        .unwrap_or_else(|_| panic!("no Status answer within {answer:?} during a slow spawn"));
    assert_eq!(status.state(), ModelState::Starting, "{status:?}");
    // Another model starts meanwhile: its activation is not stuck behind alpha's spawn.
    let mut beta = sup.activate("beta", false).await;
    tokio::time::timeout(answer, beta.until("Starting", starting))
        .await
        .expect("beta starts while alpha's spawn waits for its guard");
    assert!(began.elapsed() < 2 * answer, "{:?}", began.elapsed());
    // The slow spawn goes on to its end: alpha is told Starting, then Ready.
    let pid = alpha.until("Starting", starting).await;
    assert!(pid > 0);
    alpha.ready().await;
    beta.ready().await;
}
