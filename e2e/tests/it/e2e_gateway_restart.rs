//! The gateway SIGKILLed mid-stream and restarted: the supervisor keeps the running model
//! (same process, same generation), and the new gateway serves it without a new start.

use crate::e2e_common::{Model, Stack};
use gpuswap::pb::ModelState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_serves_the_running_model_without_a_new_start() {
    let mut stack = Stack::builder("e2e-gw-kill")
        .model(Model::new("alpha").flavor("sglang").tokens_per_second(20))
        .start()
        .await;
    stack.served_chat("alpha", false, 2).await;
    let before = stack.status("alpha").await;
    assert_eq!(before.state(), ModelState::Ready);
    assert_eq!(before.holders, 1, "the gateway holds what it serves");

    // Killed while it streams a long answer (200 tokens at 20 per second).
    let (stream, _) = stack.stream_served("alpha", 200).await;
    stack.kill_gateway();
    // The hold went with the gateway's connection; the model stays.
    let after = testkit::wait_for("the gateway's hold to go", testkit::DEADLINE, || async {
        let status = stack.status("alpha").await;
        (status.holders == 0).then_some(status)
    })
    .await;
    assert_eq!(after.state(), ModelState::Ready, "{after:?}");
    assert_eq!(
        (after.pid, after.generation),
        (before.pid, before.generation),
        "the backend was replaced"
    );
    assert!(testkit::alive(before.pid));
    drop(stream);

    stack.start_gateway().await;
    for stream in [false, true] {
        stack.served_chat("alpha", stream, 3).await;
    }
    let now = stack.status("alpha").await;
    assert_eq!(
        (now.state(), now.pid, now.generation, now.holders),
        (ModelState::Ready, before.pid, before.generation, 1),
        "{now:?}"
    );
    assert_eq!(stack.starts(), ["alpha"], "one start in all");
    assert_eq!(
        stack.leaders().get("alpha").map(Vec::len),
        Some(1),
        "{:?}",
        stack.leaders()
    );
}
