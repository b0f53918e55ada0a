//! Holds, drains, arrival order and minimum residency.

use std::time::{Duration, Instant};

use crate::common;
use crate::common::{Activation, Mock, Supervisor, activate_on};
use gpuswap::{
    ClientOptions, Endpoint,
    pb::{self, ModelState, activate_event::Event},
};
use tokio::task::JoinHandle;

/// A supervisor of alpha and beta (both on GPU 0) with `settings`, and a ready hold on alpha.
async fn alpha_held(test: &str, settings: &[&str]) -> (Supervisor, Activation, pb::Ready) {
    let models = vec![Mock::new("alpha"), Mock::new("beta")];
    let sup = Supervisor::start(test, settings, models).await;
    let mut hold = sup.activate("alpha", true).await;
    let ready = hold.ready().await;
    (sup, hold, ready)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_model_is_drained_and_stopped_only_after_release() {
    let (sup, mut hold, alpha) = alpha_held("hold", &[]).await;
    assert_eq!(sup.model("alpha").await.holders, 1);

    let mut beta = sup.activate("beta", false).await;
    let drain = hold.drain_requested().await;
    assert_eq!(drain.model, "alpha");
    assert_eq!(drain.wanted_by, "beta");
    assert!(
        drain.deadline_ms > 0 && drain.deadline_ms <= 60_000,
        "{drain:?}"
    );
    let draining = beta.draining().await;
    assert_eq!((draining.model.as_str(), draining.holders), ("alpha", 1));

    // Held: alpha keeps serving while the hold is open.
    let status = sup.model("alpha").await;
    assert_eq!(status.state(), ModelState::Ready);
    assert_eq!(status.holders, 1);
    assert_eq!(
        sup.status().await.supervisor.expect("info").queue,
        vec!["beta".to_string()]
    );
    assert_eq!(
        common::http(&alpha.address, "GET", "/health", None)
            .await
            .expect("alpha answers")
            .0,
        200
    );

    // Releasing the hold lets the swap go on at once.
    drop(hold);
    let ready = beta.ready().await;
    assert!(ready.generation > alpha.generation);
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_are_sticky_while_nobody_waits() {
    let sup = Supervisor::start(
        "sticky",
        &[],
        vec![Mock::new("alpha"), Mock::new("other").gpus(&[1])],
    )
    .await;
    let mut hold = sup.activate("alpha", true).await;
    hold.ready().await;
    // A model on other GPUs asks nothing of the holder.
    sup.activate("other", false).await.ready().await;
    let mut second = sup.activate("alpha", true).await;
    second.ready().await;
    assert_eq!(sup.model("alpha").await.holders, 2);
    drop(second);
    testkit::wait_for(
        "the second hold to be released",
        testkit::DEADLINE,
        || async { (sup.model("alpha").await.holders == 1).then_some(()) },
    )
    .await;
    // Deactivate with force ends the remaining hold with HoldLost.
    assert_eq!(
        sup.deactivate("alpha", true).await,
        vec!["alpha".to_string()]
    );
    let lost = hold.hold_lost().await;
    assert!(lost.reason.contains("deactivated"), "{lost:?}");
    assert!(hold.next().await.is_none(), "the hold stream ends");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_revokes_holds() {
    let (sup, mut hold, _) = alpha_held("revoke", &["drain_timeout = \"1s\""]).await;
    let mut beta = sup.activate("beta", false).await;
    hold.drain_requested().await;
    // The holder ignores the request; after drain_timeout the hold is revoked.
    let lost = hold.hold_lost().await;
    assert_eq!(lost.model, "alpha");
    assert!(lost.reason.contains("revoked"), "{lost:?}");
    assert!(hold.next().await.is_none(), "a revoked hold's stream ends");
    beta.ready().await;
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_revokes_holds_at_once() {
    let (sup, mut hold, _) = alpha_held("force", &["drain_timeout = \"10m\""]).await;
    let mut beta = sup
        .activate_with(pb::ActivateRequest {
            model: "beta".into(),
            hold: false,
            force: true,
            client: "test".into(),
        })
        .await
        .expect("Activate");
    // Only force can end the hold within the test deadline: drain_timeout is ten minutes.
    let lost = hold.hold_lost().await;
    assert!(lost.reason.contains("force"), "{lost:?}");
    beta.ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_client_releases_its_hold() {
    let sup = Supervisor::start(
        "disconnect",
        &[],
        vec![Mock::new("alpha"), Mock::new("beta")],
    )
    .await;
    // A client of its own: dropping it closes its connection.
    let own_client = gpuswap::connect(
        &Endpoint::Unix(sup.socket.clone()),
        &ClientOptions::default(),
    )
    .expect("client");
    let mut hold = activate_on(
        &own_client,
        pb::ActivateRequest {
            model: "alpha".into(),
            hold: true,
            force: false,
            client: "leaver".into(),
        },
    )
    .await
    .expect("Activate");
    hold.ready().await;
    assert_eq!(sup.model("alpha").await.holders, 1);
    drop(hold);
    drop(own_client);
    testkit::wait_for("the hold to be released", testkit::DEADLINE, || async {
        (sup.model("alpha").await.holders == 0).then_some(())
    })
    .await;
    // With no holder left, a swap needs no drain.
    let mut beta = sup.activate("beta", false).await;
    beta.ready().await;
    assert!(
        !beta.saw(|e| matches!(e, Event::Draining(_))),
        "{:?}",
        beta.seen
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_in_arrival_order() {
    let sup = Supervisor::start(
        "order",
        &[],
        vec![Mock::new("alpha"), Mock::new("beta"), Mock::new("gamma")],
    )
    .await;
    let mut hold = sup.activate("alpha", true).await;
    let alpha = hold.ready().await;

    let mut beta = sup.activate("beta", false).await;
    hold.drain_requested().await;
    let mut gamma = sup.activate("gamma", false).await;
    let queued = gamma.queued().await;
    assert_eq!((queued.position, queued.behind.as_str()), (2, "beta"));
    // A ready model is not granted past an earlier waiter that needs it stopped.
    let mut alpha_again = sup.activate("alpha", false).await;
    let queued = alpha_again.queued().await;
    assert_eq!(queued.position, 3);
    assert_eq!(
        sup.status().await.supervisor.expect("info").queue,
        vec!["beta".to_string(), "gamma".into(), "alpha".into()]
    );

    drop(hold);
    let beta = beta.ready().await;
    let gamma = gamma.ready().await;
    let alpha_again = alpha_again.ready().await;
    assert!(alpha.generation < beta.generation, "{alpha:?} {beta:?}");
    assert!(beta.generation < gamma.generation, "{beta:?} {gamma:?}");
    assert!(
        gamma.generation < alpha_again.generation,
        "{gamma:?} {alpha_again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_residency_is_respected() {
    let residency = Duration::from_secs(2);
    let sup = Supervisor::start(
        "residency",
        &["min_residency = \"2s\""],
        vec![Mock::new("alpha"), Mock::new("beta").load_time("1s")],
    )
    .await;
    sup.activate("alpha", false).await.ready().await;
    let alpha_ready = Instant::now();
    let mut beta = sup.activate("beta", false).await;
    let draining = beta.draining().await;
    assert_eq!(draining.model, "alpha");
    assert!(
        draining.residency_ms > 0 && draining.residency_ms <= 2000,
        "{draining:?}"
    );
    beta.ready().await;
    // alpha stopped no earlier than 2 s after it became ready (which was before we saw it),
    // and beta then loaded for 1 s: that slack covers the delivery of alpha's Ready.
    assert!(
        alpha_ready.elapsed() >= residency,
        "{:?}",
        alpha_ready.elapsed()
    );
}

/// Sends `request` from a task of its own (it waits for the drain); the task answers with the
/// models it stopped.
fn deactivate_in_background(
    sup: &Supervisor,
    request: pb::DeactivateRequest,
) -> JoinHandle<Result<Vec<String>, tonic::Status>> {
    let mut client = sup.client.clone();
    tokio::spawn(async move {
        let response = client.deactivate(request).await?;
        Ok(response.into_inner().stopped)
    })
}

/// The answer of a deactivation sent in the background, within the deadline.
async fn answer(task: JoinHandle<Result<Vec<String>, tonic::Status>>) -> Vec<String> {
    tokio::time::timeout(testkit::DEADLINE, task)
        .await
        .expect("Deactivate in time")
        .expect("task")
        .expect("Deactivate")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deactivate_drains_the_holders_first() {
    let sup = Supervisor::start("deactivate", &[], vec![Mock::new("alpha")]).await;
    let mut hold = sup.activate("alpha", true).await;
    hold.ready().await;
    let deactivation = deactivate_in_background(
        &sup,
        pb::DeactivateRequest {
            model: "alpha".into(),
            all: false,
            force: false,
            if_idle_generation: None,
            sleep: false,
        },
    );
    let drain = hold.drain_requested().await;
    assert_eq!(drain.wanted_by, "deactivate");
    // Still held, still serving, the Deactivate still waits.
    assert_eq!(sup.state("alpha").await, ModelState::Ready);
    assert!(!deactivation.is_finished());
    drop(hold);
    assert_eq!(answer(deactivation).await, vec!["alpha".to_string()]);
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
    sup.wait_no_backends().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_deactivation_stops_only_a_model_still_idle_in_the_generation_seen() {
    // A short drain: an unconditional Deactivate would revoke the hold within the test.
    let sup = Supervisor::start(
        "idledeactivate",
        &["drain_timeout = \"1s\""],
        vec![Mock::new("alpha")],
    )
    .await;
    let mut hold = sup.activate("alpha", true).await;
    let generation = hold.ready().await.generation;
    let if_idle = |generation| pb::DeactivateRequest {
        model: "alpha".into(),
        all: false,
        force: false,
        if_idle_generation: Some(generation),
        sleep: false,
    };
    // A request came in after the gateway saw the model idle: it is held now, so it stays.
    assert!(sup.deactivate_with(if_idle(generation)).await.is_empty());
    assert_eq!(sup.state("alpha").await, ModelState::Ready);
    assert!(!hold.saw(|e| matches!(e, Event::DrainRequested(_))));
    drop(hold);
    testkit::wait_for("no holder", testkit::DEADLINE, || async {
        (sup.model("alpha").await.holders == 0).then_some(())
    })
    .await;
    // Not the generation that was seen idle: left alone too.
    assert!(
        sup.deactivate_with(if_idle(generation + 1))
            .await
            .is_empty()
    );
    assert_eq!(sup.state("alpha").await, ModelState::Ready);
    // Still idle in the generation seen: stopped.
    assert_eq!(
        sup.deactivate_with(if_idle(generation)).await,
        vec!["alpha".to_string()]
    );
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_loses_its_hold_to_the_keepalive() {
    // drain_timeout is far past the test's deadline: only the keepalive can end the hold.
    let sup = Supervisor::start(
        "frozen",
        &[
            "keepalive_interval = \"1s\"",
            "keepalive_timeout = \"1s\"",
            "drain_timeout = \"600s\"",
        ],
        vec![Mock::new("alpha"), Mock::new("beta")],
    )
    .await;
    let mut command = std::process::Command::new(testkit::bin("gpuswapctl"));
    command
        .arg("--endpoint")
        .arg(format!("unix://{}", sup.socket.display()))
        .args(["activate", "alpha", "--hold"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let holder = testkit::Proc::spawn(command);
    testkit::wait_for("gpuswapctl to hold alpha", testkit::DEADLINE, || async {
        (sup.model("alpha").await.holders == 1).then_some(())
    })
    .await;
    // Frozen as on a host that died: its connection stays open, nothing answers on it.
    holder.signal(libc::SIGSTOP);
    let asked = Instant::now();
    let mut beta = sup.activate("beta", false).await;
    beta.ready().await;
    let took = asked.elapsed();
    assert!(
        beta.saw(|e| matches!(e, Event::Draining(_))),
        "alpha was held when beta was asked for: {:?}",
        beta.seen
    );
    assert!(
        took < Duration::from_secs(30),
        "the frozen holder kept alpha for {took:?}"
    );
    assert_eq!(sup.state("alpha").await, ModelState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_finds_out_a_frozen_supervisor() {
    let sup = Supervisor::start("frozensup", &[], vec![Mock::new("alpha")]).await;
    let options = ClientOptions {
        keepalive: gpuswap::Keepalive {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
        },
        ..ClientOptions::default()
    };
    let client = gpuswap::connect(&Endpoint::Unix(sup.socket.clone()), &options).expect("client");
    let request = pb::ActivateRequest {
        model: "alpha".into(),
        hold: true,
        force: false,
        client: "watcher".into(),
    };
    let mut hold = activate_on(&client, request).await.expect("Activate");
    hold.ready().await;
    // Frozen as on a host that died: the socket stays open, nothing answers on it.
    let supervisor = sup.proc.as_ref().expect("running");
    supervisor.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let ended = tokio::time::timeout(testkit::DEADLINE, hold.stream.message()).await;
    supervisor.signal(libc::SIGCONT);
    let ended = ended.expect("the hold stream ends instead of hanging");
    assert!(ended.is_err(), "{ended:?}");
    assert!(
        frozen.elapsed() < Duration::from_secs(30),
        "found out after {:?}",
        frozen.elapsed()
    );
}

/// A vLLM mock that implements vLLM's sleep (dev mode), keeping `host_gib` of host RAM.
fn sleeper(name: &str, host_gib: u32) -> Mock {
    Mock::new(name)
        .args(&["--enable-sleep-mode"])
        .env("VLLM_SERVER_DEV_MODE", "1")
        .toml("sleep = true")
        .toml(&format!("host_memory = \"{host_gib}GiB\""))
}

fn sleep_request(model: &str) -> pb::DeactivateRequest {
    pb::DeactivateRequest {
        model: model.into(),
        sleep: true,
        ..Default::default()
    }
}

/// A deactivation that puts `model` to sleep is refused (FailedPrecondition), saying `why`.
async fn sleep_refused(sup: &Supervisor, model: &str, why: &str) {
    let mut client = sup.client.clone();
    let refused = client
        .deactivate(sleep_request(model))
        .await
        .expect_err(why);
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains(why), "{refused:?}");
}

/// A deactivation with sleep drains the holder like a stop, then puts the model to sleep in
/// its own process; an Activate wakes it there. Models that cannot sleep are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deactivation_with_sleep_drains_then_sleeps_and_activate_wakes_the_same_process() {
    let sup = Supervisor::start(
        "deactivate-sleep",
        &["host_memory = \"100GiB\""],
        vec![sleeper("alpha", 40), Mock::new("beta"), sleeper("big", 70)],
    )
    .await;
    assert!(sup.model("alpha").await.can_sleep);
    assert!(!sup.model("beta").await.can_sleep);
    let mut hold = sup.activate("alpha", true).await;
    let ready = hold.ready().await;
    let pid = sup.model("alpha").await.pid;

    let sleeping = deactivate_in_background(&sup, sleep_request("alpha"));
    let drain = hold.drain_requested().await;
    assert_eq!(drain.model, "alpha");
    assert_eq!(sup.state("alpha").await, ModelState::Ready, "drains first");
    drop(hold);
    assert_eq!(answer(sleeping).await, ["alpha"]);
    let asleep = sup.model("alpha").await;
    assert_eq!(asleep.state, ModelState::Sleeping as i32, "{asleep:?}");
    assert_eq!((asleep.pid, asleep.generation), (pid, ready.generation));

    sleep_refused(&sup, "beta", "beta has no sleep protocol").await;
    // big (never used) would be the first sleeper stopped for its own room.
    let why = "big cannot sleep: sleepers would hold 110 GiB of host_memory 100 GiB";
    sleep_refused(&sup, "big", why).await;
    let woke = sup.activate("alpha", false).await.ready().await;
    assert_eq!(woke.generation, ready.generation);
    let awake = sup.model("alpha").await;
    assert_eq!((awake.state, awake.pid), (ModelState::Ready as i32, pid));
}
