//! `kill -9` of a box's gateway or supervisor behind a real Envoy and the real picker: the
//! box's requests in flight fail cleanly, new ones go to the other box within seconds, the
//! other box's requests are untouched, and a restarted box is used again.

use std::time::{Duration, Instant};

use crate::common::{self, Front, GpuBox};
use testkit::{MockModel, Proc};

/// Two boxes with model a (20 tokens/s, so a stream of 40 lasts two seconds) loaded; gpu3
/// also has b (GPU 1), which no other box has.
async fn two_boxes(test: &str) -> Front {
    let mut boxes = Vec::new();
    for (name, ip) in [("gpu2", "127.0.0.2"), ("gpu3", "127.0.0.3")] {
        let mut models = vec![MockModel::new("a").tokens_per_second(20)];
        if name == "gpu3" {
            models.push(MockModel::new("b").gpus(&[1]));
        }
        let b = GpuBox::start(test, name, ip, models).await;
        b.load("a").await;
        boxes.push(b);
    }
    Front::start(boxes, &[], |t| t).await
}

/// [`two_boxes`], then two streams at once: one lands on each box (fewest in flight first),
/// and `process` of box `victim` (its gateway or its supervisor) is killed (SIGKILL) while
/// they stream. The front, and the streams by box.
async fn kill_mid_stream(
    test: &str,
    victim: &str,
    process: impl Fn(&GpuBox) -> Option<&Proc>,
) -> (Front, Vec<(String, Result<String, String>)>) {
    let front = two_boxes(test).await;
    let pid = process(front.gpu_box(victim)).unwrap().pid();
    let shared = &front;
    let streams = (0..2).map(|_| common::stream_timed(shared, "a", 40));
    let killer = async {
        // Once both streams reached their backends (each stream lasts 2 s).
        shared.wait_in_flight("a", 2).await;
        // SAFETY: kill(2) of a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    };
    let (streams, ()) = tokio::join!(futures_util::future::join_all(streams), killer);
    let mut out: Vec<_> = streams
        .into_iter()
        .map(|(by, _, text)| (by, text))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (front, out)
}

/// New requests for a all go to `expected` within a few seconds of the failure.
async fn new_requests_go_to(front: &Front, expected: &str) -> Duration {
    let since = Instant::now();
    testkit::wait_for(
        "requests to avoid the dead box",
        Duration::from_secs(10),
        || async {
            let (status, by, _) = front.chat("a", false, 2).await;
            (status == 200 && by == expected).then_some(())
        },
    )
    .await;
    let took = since.elapsed();
    for _ in 0..10 {
        front.assert_served_by("a", 2, expected).await;
    }
    took
}

/// After a kill on the other box: the stream on `alive` ended whole, and once `dead` (the
/// killed process) is reaped, new requests all go to `alive`.
async fn the_other_box_takes_over(
    front: &Front,
    alive_stream: &Result<String, String>,
    mut dead: Proc,
    alive: &str,
    avoided: &str,
) {
    let other = alive_stream
        .as_ref()
        .expect("the other box's stream was cut");
    assert!(other.contains("[DONE]"), "{other}");
    dead.wait_exit(testkit::DEADLINE);
    let took = new_requests_go_to(front, alive).await;
    eprintln!("requests avoided {avoided} after {took:?}");
}

async fn both_boxes_serve(front: &Front) {
    testkit::wait_for("both boxes to serve again", testkit::DEADLINE, || async {
        let streams = (0..2).map(|_| common::stream_timed(front, "a", 6));
        let mut served: Vec<String> = futures_util::future::join_all(streams)
            .await
            .into_iter()
            .filter(|(_, _, text)| text.is_ok())
            .map(|(by, _, _)| by)
            .collect();
        served.sort();
        (served == ["gpu2", "gpu3"]).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_fails_its_requests_and_its_box_is_avoided_then_used_again() {
    let (mut front, streams) = kill_mid_stream("killgw", "gpu2", |b| b.gateway.as_ref()).await;
    assert_eq!(streams[0].0, "gpu2");
    assert!(
        streams[0].1.is_err(),
        "the stream on the killed gateway did not fail: {:?}",
        streams[0].1
    );
    let dead = front.gpu_box_mut("gpu2").gateway.take().unwrap();
    the_other_box_takes_over(&front, &streams[1].1, dead, "gpu3", "the dead gateway").await;
    front.gpu_box_mut("gpu2").start_gateway().await;
    both_boxes_serve(&front).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_takes_its_box_out_until_it_is_back() {
    let (mut front, streams) = kill_mid_stream("killsup", "gpu3", |b| b.supervisor.as_ref()).await;
    // The supervisor takes its backends with it: the stream there is cut, the other is whole.
    assert_eq!(streams[1].0, "gpu3");
    let cut = streams[1]
        .1
        .as_ref()
        .map(|t| t.contains("[DONE]"))
        .unwrap_or(false);
    assert!(
        !cut,
        "the stream on the dead box ended normally: {:?}",
        streams[1].1
    );
    let dead = front.gpu_box_mut("gpu3").base.supervisor.take().unwrap();
    let what = "the box without a supervisor";
    the_other_box_takes_over(&front, &streams[0].1, dead, "gpu2", what).await;
    let (status, _, text) = front.chat("b", false, 2).await;
    assert_eq!(
        status,
        503,
        "b has no box while gpu3 is down: {text}\n{}",
        front.logs()
    );
    front.gpu_box_mut("gpu3").start_supervisor().await;
    // Its models start again on demand: b (only there) is served once the picker sees it.
    testkit::wait_for("gpu3 to serve b again", testkit::DEADLINE, || async {
        let (status, by, _) = front.chat("b", false, 2).await;
        (status == 200 && by == "gpu3").then_some(())
    })
    .await;
}
