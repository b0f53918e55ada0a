//! Kubernetes discovery and the Lease election against the fake API server (`kube_api`):
//! real boxes, real pickers and a real Envoy; only the API server is a stand-in.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::MockModel;

use crate::{
    common::{Front, GpuBox},
    kube_api::{FakeApi, NAMESPACE, box_pod},
};

const LEASE: &str = "gpuswap-epp";

/// Boxes gpu2 and gpu3 on 127.0.0.2 and .3, their gateways on one port (as pods).
async fn boxes(test: &str) -> (Vec<GpuBox>, u16) {
    let port = testkit::free_port();
    let mut boxes = Vec::new();
    for (name, ip) in [("gpu2", "127.0.0.2"), ("gpu3", "127.0.0.3")] {
        let models = vec![MockModel::new("a")];
        boxes.push(
            GpuBox::start_configured(test, name, (ip, port), models, &[], |_| Vec::new()).await,
        );
    }
    (boxes, port)
}

fn pod_of(b: &GpuBox, ready: bool) -> Value {
    box_pod(
        &b.name,
        &b.ip,
        ready,
        &format!("unix://{}", b.socket.display()),
    )
}

fn picker_config(api: &FakeApi, port: u16) -> String {
    format!(
        "[epp]\ndiscovery = {{ ttl = \"3s\", kubernetes = {{ api = \"{}\", api_token_file = \"{}\", api_ca_file = \"{}\", namespace = \"{NAMESPACE}\", selector = \"app.kubernetes.io/name=gpuswap-box\", gateway_port = {port}, lease = \"{LEASE}\" }} }}\n",
        api.url,
        api.token_file.display(),
        api.ca_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_pods_of_the_selector_are_the_boxes() {
    let api = FakeApi::start().await;
    let (boxes, port) = boxes("kube-pods").await;
    boxes[0].load("a").await;
    for b in &boxes {
        api.put_pod(pod_of(b, true));
    }
    // A pod the selector does not match is no box.
    let mut other = pod_of(&boxes[1], true);
    other["metadata"]["name"] = "not-a-box".into();
    other["metadata"]["labels"]["app.kubernetes.io/name"] = "something-else".into();
    api.put_pod(other);
    let front = Front::start_pickers(boxes, &[picker_config(&api, port)], |t| t).await;
    for _ in 0..5 {
        front.assert_served_by("a", 2, "gpu2").await;
    }
    // gpu2's pod turns NotReady (a watch MODIFIED event): it leaves, a loads on gpu3.
    api.put_pod(pod_of(front.gpu_box("gpu2"), false));
    front
        .wait_picker_logged("gpu2 to leave the boxes", &["box removed", "box=gpu2"])
        .await;
    front.assert_served_by("a", 2, "gpu3").await;
    // gpu3's pod is deleted, gpu2's is ready again: only gpu2 serves.
    api.delete_pod("gpu3");
    api.put_pod(pod_of(front.gpu_box("gpu2"), true));
    front
        .wait_picker_logged("gpu3 to leave the boxes", &["box removed", "box=gpu3"])
        .await;
    front
        .wait_logged("gpu2 to serve again", || async {
            let (status, by, _) = front.chat("a", false, 2).await;
            (status == 200 && by == "gpu2").then_some(())
        })
        .await;
    let log = crate::common::without_colors(&testkit::read_lossy(&front.pickers[0].log));
    assert!(!log.contains("not-a-box"), "{log}");
    assert_eq!(api.unauthorized(), 0);
}

/// Which pickers are ready (gRPC readiness SERVING).
async fn ready(front: &Front) -> Vec<bool> {
    let mut ready = Vec::new();
    for picker in &front.pickers {
        ready.push(picker.health(gpuswap_epp::READINESS).await == Some(1));
    }
    ready
}

fn holder(api: &FakeApi) -> String {
    api.lease(LEASE).map_or(String::new(), |l| {
        l["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    })
}

fn transitions(api: &FakeApi) -> u64 {
    api.lease(LEASE)
        .map_or(0, |l| l["spec"]["leaseTransitions"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_picker_holds_the_lease_and_a_standby_takes_it_over() {
    let api = FakeApi::start().await;
    let (mut boxes, port) = boxes("kube-lease").await;
    boxes.truncate(1);
    api.put_pod(pod_of(&boxes[0], true));
    let config = picker_config(&api, port);
    let mut front = Front::start_pickers(boxes, &[config.clone(), config], |t| t).await;
    let leader = front
        .wait_logged("one picker to lead", || async {
            let ready = ready(&front).await;
            (ready.iter().filter(|r| **r).count() == 1).then(|| ready.iter().position(|r| *r))?
        })
        .await;
    let standby = 1 - leader;
    let ports: Vec<u16> = front.pickers.iter().map(|p| p.port).collect();
    let suffix = |i: usize| format!("127.0.0.1:{}", ports[i]);
    assert!(
        holder(&api).ends_with(&suffix(leader)),
        "{:?}",
        api.lease(LEASE)
    );
    assert_eq!(transitions(&api), 0);
    // It renews (renewTime moves) and stays the only one ready, across renewals and a
    // write refused with 409 Conflict.
    let renewed = api.lease(LEASE).unwrap()["spec"]["renewTime"].clone();
    api.conflict_next_put();
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let now = ready(&front).await;
        assert!(now[leader] && !now[standby], "{now:?}\n{}", front.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(api.conflicts() >= 1);
    let lease = api.lease(LEASE).unwrap();
    assert_ne!(lease["spec"]["renewTime"], renewed, "{lease}");
    assert!(holder(&api).ends_with(&suffix(leader)));

    // kill -9 of the leader: the standby takes over once the Lease has expired (3 s).
    front.pickers[leader].kill();
    let killed = Instant::now();
    front
        .wait_logged("the standby to lead", || async {
            ready(&front).await[standby].then_some(())
        })
        .await;
    let took = killed.elapsed();
    eprintln!("the standby led {took:?} after the kill");
    // The Lease (3 s) runs from the leader's last renewal, at most one round (1 s) before
    // the kill: a standby that did not wait for it would lead within a round.
    assert!(
        took >= Duration::from_millis(1800),
        "took over before the Lease expired: {took:?}"
    );
    assert!(
        holder(&api).ends_with(&suffix(standby)),
        "{:?}",
        api.lease(LEASE)
    );
    assert_eq!(transitions(&api), 1);
    // Envoy moves its ext_proc streams at its next health check of the pickers.
    front
        .wait_logged("requests placed through Envoy again", || async {
            (front.chat("a", false, 2).await.0 == 200).then_some(())
        })
        .await;

    // The old leader comes back as a standby: the Lease is held and renewed.
    front.pickers[leader].start();
    let back = Instant::now() + Duration::from_secs(3);
    while Instant::now() < back {
        let now = ready(&front).await;
        assert!(!now[leader] && now[standby], "{now:?}\n{}", front.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Another holder writes the Lease: the leader steps down at once, and takes it back
    // once that holder has not renewed it for the Lease's duration.
    api.steal_lease(LEASE, "someone-else");
    front
        .wait_logged("the leader to step down", || async {
            (ready(&front).await == [false, false]).then_some(())
        })
        .await;
    front
        .wait_logged("a picker to lead again", || async {
            (ready(&front).await.iter().filter(|r| **r).count() == 1).then_some(())
        })
        .await;
    assert_eq!(transitions(&api), 3, "{:?}", api.lease(LEASE));

    // A clean stop (SIGTERM) hands the Lease back before the process exits: the other picker
    // need not wait for it to expire.
    let ready_now = ready(&front).await;
    let leader = ready_now.iter().position(|r| *r).unwrap();
    let other = 1 - leader;
    front.pickers[leader].stop();
    let stopped = Instant::now();
    let after_exit = holder(&api);
    assert!(
        !after_exit.ends_with(&suffix(leader)),
        "the stopped leader still holds the Lease: {:?}",
        api.lease(LEASE)
    );
    front
        .wait_logged("the other picker to lead", || async {
            ready(&front).await[other].then_some(())
        })
        .await;
    eprintln!(
        "the other picker led {:?} after the stop",
        stopped.elapsed()
    );
    assert!(holder(&api).ends_with(&suffix(other)));
}
