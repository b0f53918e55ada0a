//! etcd discovery and election with a real etcd: box gateways register themselves under a
//! lease they keep alive, two pickers elect the active one, Envoy follows the leader.

use std::time::{Duration, Instant};

use crate::common::{EtcdServer, Front, GpuBox};
use testkit::MockModel;

/// Boxes registered with a 2 s lease (so a hung gateway drops out within about 2 s).
async fn registered_boxes(test: &str, etcd: &EtcdServer) -> Vec<GpuBox> {
    let mut boxes = Vec::new();
    for (name, ip) in [("gpu2", "127.0.0.2"), ("gpu3", "127.0.0.3")] {
        let url = etcd.url.clone();
        let register = move |advertise: &str| {
            vec![format!(
                "register = {{ etcd = [\"{url}\"], name = \"{name}\", advertise = \"{advertise}\", ttl = \"2s\" }}"
            )]
        };
        boxes.push(GpuBox::start_with(test, name, ip, vec![MockModel::new("a")], register).await);
    }
    boxes
}

fn discovery(etcd: &EtcdServer) -> String {
    format!(
        "[epp]\ndiscovery = {{ etcd = [\"{}\"], ttl = \"2s\" }}\n",
        etcd.url
    )
}

/// A chat request for a through Envoy that gives up after `limit` (a hung gateway never
/// answers): the serving box, or None.
async fn served_within(front: &Front, limit: Duration) -> Option<String> {
    let answer = testkit::http::client()
        .post(front.url("/v1/chat/completions"))
        .json(&testkit::chat_body("a", false, 2))
        .timeout(limit)
        .send()
        .await
        .ok()?;
    (answer.status() == 200).then(|| front.served_by(&answer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_that_stops_renewing_its_lease_leaves_placement_and_comes_back() {
    let etcd = EtcdServer::start().await;
    let boxes = registered_boxes("lease", &etcd).await;
    boxes[0].load("a").await;
    let front = Front::start_pickers(boxes, &[discovery(&etcd)], |t| t).await;
    for _ in 0..5 {
        assert_eq!(
            served_within(&front, testkit::DEADLINE).await.as_deref(),
            Some("gpu2")
        );
    }
    // A hung gateway: its port still accepts connections, but it renews nothing.
    let gateway = front.gpu_box("gpu2").gateway.as_ref().unwrap();
    gateway.signal(libc::SIGSTOP);
    let since = Instant::now();
    front
        .wait_logged("gpu2 to leave placement", || async {
            (served_within(&front, Duration::from_secs(2))
                .await
                .as_deref()
                == Some("gpu3"))
            .then_some(())
        })
        .await;
    eprintln!("the hung box left placement after {:?}", since.elapsed());
    // Its gateway's metrics no longer answer, which takes it out of placement first; the
    // lease is what takes it off the box list.
    front
        .wait_picker_logged("gpu2's lease to run out", &["box removed", "box=gpu2"])
        .await;
    eprintln!("the hung box left the box list after {:?}", since.elapsed());
    for _ in 0..5 {
        assert_eq!(
            served_within(&front, testkit::DEADLINE).await.as_deref(),
            Some("gpu3")
        );
    }
    gateway.signal(libc::SIGCONT);
    // Registered again: listed through Envoy once more.
    front.wait_models_listed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_picker_takes_over_when_the_active_one_is_killed() {
    let etcd = EtcdServer::start().await;
    let boxes = registered_boxes("failover", &etcd).await;
    let configs = [discovery(&etcd), discovery(&etcd)];
    let mut front = Front::start_pickers(boxes, &configs, |t| t).await;
    const READY: &str = "readiness";
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let leader = testkit::wait_for("one picker to lead", testkit::DEADLINE, || async {
        let states = [
            front.pickers[0].health(READY).await,
            front.pickers[1].health(READY).await,
        ];
        let leaders: Vec<usize> = (0..2).filter(|&i| states[i] == Some(serving)).collect();
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await;
    let standby = 1 - leader;
    assert_eq!(
        front.pickers[standby].health("liveness").await,
        Some(serving)
    );
    assert!(served_within(&front, testkit::DEADLINE).await.is_some());
    front.pickers[leader].kill();
    let since = Instant::now();
    testkit::wait_for("the standby to lead", testkit::DEADLINE, || async {
        (front.pickers[standby].health(READY).await == Some(serving)).then_some(())
    })
    .await;
    let took = since.elapsed();
    eprintln!("the standby picker took over after {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Envoy follows (its health check sees the dead picker fail and the new leader serve):
    // five requests in a row are placed.
    front
        .wait_logged("five requests in a row through the new leader", || async {
            for _ in 0..5 {
                served_within(&front, Duration::from_secs(5)).await?;
            }
            Some(())
        })
        .await;
    eprintln!(
        "requests through Envoy placed again {:?} after the kill",
        since.elapsed()
    );
}
