//! Placement through a real Envoy and the real picker in front of three real boxes
//! (127.0.0.2, .3, .4: each its own supervisor, gateway and mock backends).

use crate::common::{self, Front, GpuBox};
use testkit::MockModel;

/// Models a and b share GPU 0 (they swap); c is on GPU 1 (it fits beside either).
fn models() -> Vec<MockModel> {
    vec![
        MockModel::new("a"),
        MockModel::new("b"),
        MockModel::new("c").gpus(&[1]),
    ]
}

async fn three_boxes(test: &str, models: impl Fn() -> Vec<MockModel>) -> Vec<GpuBox> {
    let mut boxes = Vec::new();
    for (name, ip) in [
        ("gpu2", "127.0.0.2"),
        ("gpu3", "127.0.0.3"),
        ("gpu4", "127.0.0.4"),
    ] {
        boxes.push(GpuBox::start(test, name, ip, models()).await);
    }
    boxes
}

/// Decisions made at the same moment see each other: as many requests as boxes, for a model
/// ready on every box, decided at once on as many threads, land one on each box (fewest in
/// flight), none on a box that only looked idle to two of them.
#[test]
fn decisions_made_at_once_land_on_different_boxes() {
    use gpuswap_epp::picker::Decision;
    const BOXES: usize = 4;
    // Two models on four boxes: model-0 is ready on every box (the scale bench's fleet).
    let picker = crate::scale::fleet(BOXES, 2);
    for round in 0..300 {
        let start = std::sync::Barrier::new(BOXES);
        let decided: Vec<_> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..BOXES)
                .map(|_| {
                    scope.spawn(|| {
                        start.wait();
                        match picker.decide(Some("model-0"), None) {
                            Decision::Route {
                                box_name,
                                in_flight,
                                ..
                            } => (box_name, in_flight),
                            Decision::Refuse { message, .. } => panic!("{message}"),
                        }
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut boxes: Vec<&str> = decided.iter().map(|(name, _)| name.as_str()).collect();
        boxes.sort();
        assert_eq!(boxes, ["gpu0", "gpu1", "gpu2", "gpu3"], "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaded_model_is_served_by_its_box_every_time() {
    let boxes = three_boxes("loaded", models).await;
    boxes[0].load("b").await;
    let front = Front::start(boxes, &[], |t| t).await;
    for _ in 0..20 {
        let text = front.assert_served_by("b", 3, "gpu2").await;
        assert!(text.contains("[served by b]"), "{text}");
    }
    assert_eq!(front.starts(), vec![("gpu2".to_string(), "b".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_goes_where_it_fits_without_eviction() {
    let with_d = || {
        let mut list = models();
        list.push(MockModel::new("d"));
        list
    };
    let boxes = three_boxes("fits", with_d).await;
    // GPU 0 is taken on gpu2 (a) and gpu3 (b): only gpu4 can start another GPU 0 model.
    boxes[0].load("a").await;
    boxes[1].load("b").await;
    let front = Front::start(boxes, &[], |t| t).await;
    for _ in 0..3 {
        front.assert_served_by("d", 3, "gpu4").await;
    }
    // c (GPU 1) fits on every box: wherever it goes, nothing is stopped.
    front.chat_ok("c", 3).await;
    front
        .assert_ready(&[("gpu2", "a"), ("gpu3", "b"), ("gpu4", "d")])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_for_a_cold_model_cause_one_load() {
    // Every box is busy streaming b (GPU 0), so a (GPU 0) must wait for a drain wherever it
    // goes, and the boxes' in-flight counts change with every request routed: without
    // coalescing the 50 would spread over the boxes and load a three times.
    let boxes = three_boxes("coalesce", || {
        vec![
            MockModel::new("a").load_time("1s"),
            MockModel::new("b").tokens_per_second(20),
        ]
    })
    .await;
    for b in &boxes {
        b.load("b").await;
    }
    let front = Front::start(boxes, &[], |t| t).await;
    let streams: Vec<_> = (0..3)
        .map(|_| common::stream_timed(&front, "b", 30))
        .collect();
    let cold = async {
        // Once the three streams are in flight (one per box: fewest in flight first).
        front.wait_in_flight("b", 3).await;
        futures_util::future::join_all((0..50).map(|_| front.chat("a", false, 2))).await
    };
    let (streamed, answers) = tokio::join!(futures_util::future::join_all(streams), cold);
    let mut stream_boxes: Vec<_> = streamed.iter().map(|(by, _, _)| by.clone()).collect();
    stream_boxes.sort();
    assert_eq!(stream_boxes, ["gpu2", "gpu3", "gpu4"]);
    for (_, _, text) in &streamed {
        assert!(text.is_ok(), "{text:?}");
    }
    let first = answers[0].1.clone();
    for (status, by, text) in &answers {
        assert_eq!(*status, 200, "{text}\n{}", front.logs());
        assert_eq!(*by, first, "{text}");
    }
    let loads_of_a: Vec<_> = front
        .starts()
        .into_iter()
        .filter(|(_, m)| m == "a")
        .collect();
    assert_eq!(loads_of_a, vec![(first, "a".to_string())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_model_is_not_evicted_while_an_idle_box_can_take_the_new_one() {
    let boxes = three_boxes("busy", || {
        vec![
            MockModel::new("a"),
            MockModel::new("b").tokens_per_second(20),
        ]
    })
    .await;
    let mut boxes = boxes;
    boxes.truncate(2);
    for b in &boxes {
        b.load("b").await;
    }
    let front = Front::start(boxes, &[], |t| t).await;
    // b streams on one box (held there); the other box's b is idle.
    let stream = common::stream_timed(&front, "b", 40);
    let cold = async {
        front.wait_in_flight("b", 1).await;
        front.chat("a", false, 2).await
    };
    let ((streamed_by, _, streamed), (status, a_by, text)) = tokio::join!(stream, cold);
    assert_eq!(status, 200, "{text}");
    assert_ne!(a_by, streamed_by, "a evicted the busy b\n{}", front.logs());
    let streamed = streamed.expect("the busy stream was cut");
    assert!(streamed.contains("[DONE]"), "{streamed}");
    front.assert_ready(&[(&streamed_by, "b")]).await;
}

/// The box of `names` that the rendezvous hash prefers for `model` (where a picker that
/// ignored what is in the way would put it).
fn preferred(names: &[&'static str], model: &str) -> &'static str {
    names
        .iter()
        .copied()
        .max_by_key(|b| gpuswap_epp::placement::rendezvous(b, model))
        .unwrap()
}

async fn two_boxes(
    test: &str,
    models: impl Fn(&str) -> Vec<MockModel>,
    supervisor: &[&str],
) -> Vec<GpuBox> {
    let mut boxes = Vec::new();
    for (name, ip) in [("gpu2", "127.0.0.2"), ("gpu3", "127.0.0.3")] {
        let gpu_box = GpuBox::start_configured(
            test,
            name,
            (ip, testkit::free_port()),
            models(name),
            supervisor,
            |_| Vec::new(),
        )
        .await;
        boxes.push(gpu_box);
    }
    boxes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_never_goes_where_a_pinned_model_is_in_its_way() {
    // b (GPU 0) is ready on both boxes, pinned on the box the hash prefers for a (GPU 0).
    let pinned_box = preferred(&["gpu2", "gpu3"], "a");
    let boxes = two_boxes(
        "pinned",
        |name| {
            let b = MockModel::new("b");
            vec![
                MockModel::new("a"),
                if name == pinned_box {
                    b.toml("pinned = true")
                } else {
                    b
                },
            ]
        },
        &[],
    )
    .await;
    for b in &boxes {
        b.load("b").await;
    }
    let front = Front::start(boxes, &[], |t| t).await;
    let (by, _) = front.chat_ok("a", 2).await;
    assert_ne!(by, pinned_box, "{}", front.logs());
    front.assert_ready(&[(pinned_box, "b")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_goes_where_its_gpu_has_room() {
    // 24 GiB GPUs. a and b take 10 GiB each (they fit together); c takes GPU 0 whole.
    // b is ready on one box, c on the one the hash prefers for a: a joins b, nothing stops.
    let full_box = preferred(&["gpu2", "gpu3"], "a");
    let boxes = two_boxes(
        "memory",
        |_| {
            vec![
                MockModel::new("a").toml("vram = \"10GiB\""),
                MockModel::new("b").toml("vram = \"10GiB\""),
                MockModel::new("c"),
            ]
        },
        &["gpu_memory = \"24GiB\""],
    )
    .await;
    let room_box = if full_box == "gpu2" { "gpu3" } else { "gpu2" };
    // c first: the full box's model is the idler one, which a picker that thought both
    // boxes full would evict.
    for (name, model) in [(full_box, "c"), (room_box, "b")] {
        boxes
            .iter()
            .find(|b| b.name == name)
            .unwrap()
            .load(model)
            .await;
    }
    let front = Front::start(boxes, &[], |t| t).await;
    front.assert_served_by("a", 2, room_box).await;
    front
        .assert_ready(&[(room_box, "b"), (full_box, "c")])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fronts_requests_count_in_a_boxs_load() {
    // b is ready on both boxes; on the box the hash prefers for b another client streams b
    // straight through that box's gateway: the picker sees it only in the gateway's
    // metrics, and sends b (least loaded) and a (GPU 0: b is in its way, busy there) to
    // the other box.
    let busy_box = preferred(&["gpu2", "gpu3"], "b");
    let boxes = two_boxes(
        "others",
        |_| {
            vec![
                MockModel::new("a"),
                MockModel::new("b").tokens_per_second(20),
            ]
        },
        &[],
    )
    .await;
    for b in &boxes {
        b.load("b").await;
    }
    let front = Front::start(boxes, &[], |t| t).await;
    let stream = front.gpu_box(busy_box).stream_direct("b", 60);
    let through_front = async {
        front
            .wait_picker_logged(
                "the picker to read the other front's request",
                &[&format!("box={busy_box}"), "others_total=1"],
            )
            .await;
        (
            front.chat("b", false, 2).await,
            front.chat("a", false, 2).await,
        )
    };
    let (streamed, ((b_status, b_by, b_text), (status, by, text))) =
        tokio::join!(stream, through_front);
    assert_eq!(b_status, 200, "{b_text}\n{}", front.logs());
    assert_ne!(b_by, busy_box, "b went to the busier box\n{}", front.logs());
    assert_eq!(status, 200, "{text}\n{}", front.logs());
    assert_ne!(by, busy_box, "a evicted the busy b\n{}", front.logs());
    let streamed = streamed.expect("the other front's stream was cut");
    assert!(streamed.contains("[DONE]"), "{streamed}");
    front.assert_ready(&[(busy_box, "b")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_model_is_woken_rather_than_started_cold_elsewhere() {
    // a and b (vLLM, 70 GiB each: two do not fit in 96 GiB) sleep rather than stop. On the
    // box the hash does not prefer for a, a sleeps next to a ready b; the other box is empty
    // (a fits there cold). The picker wakes a where it sleeps: no second start.
    let sleep_box = if preferred(&["gpu2", "gpu3"], "a") == "gpu2" {
        "gpu3"
    } else {
        "gpu2"
    };
    let sleeper = |name: &str| {
        MockModel::new(name)
            .toml("vram = \"70GiB\"")
            .args(&["--enable-sleep-mode"])
            .env("VLLM_SERVER_DEV_MODE", "1")
            .toml("sleep = true")
            .toml("host_memory = \"40GiB\"")
    };
    let boxes = two_boxes(
        "sleeping",
        |_| vec![sleeper("a"), sleeper("b")],
        &["gpu_memory = \"96GiB\"", "host_memory = \"100GiB\""],
    )
    .await;
    let asleep = boxes.iter().find(|b| b.name == sleep_box).unwrap();
    asleep.load("a").await;
    asleep.load("b").await;
    asleep
        .wait_state("a", gpuswap::pb::ModelState::Sleeping)
        .await;
    let front = Front::start(boxes, &[], |t| t).await;
    front.assert_served_by("a", 2, sleep_box).await;
    let starts_of_a: Vec<_> = front
        .starts()
        .into_iter()
        .filter(|(_, m)| m == "a")
        .collect();
    assert_eq!(starts_of_a, vec![(sleep_box.to_string(), "a".to_string())]);
}
