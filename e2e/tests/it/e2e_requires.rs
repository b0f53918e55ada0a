//! A model whose weights are still downloading (`requires` names files that do not exist
//! yet): listed as `unavailable` with the reason, refused with a 503 that says what is
//! missing, and served without any restart once the files appear.

use crate::e2e_common;
use crate::e2e_common::{Model, Stack, openai_error};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_appears_once_its_files_exist() {
    let weights_dir = testkit::short_tempdir();
    let weights = weights_dir.path().join("config.json");
    let stack = Stack::builder("e2e-requires")
        .model(Model::new("monstral").toml(&format!("requires = [\"{}\"]", weights.display())))
        .start()
        .await;

    let listed = || async {
        let list = testkit::http::get_json(&stack.url("/v1/models"))
            .await
            .expect("GET /v1/models: a JSON list");
        testkit::listed(&list, "monstral").clone()
    };
    assert_eq!(listed().await["gpuswap"]["state"], "unavailable");
    let status = stack.status("monstral").await;
    assert!(status.detail.contains("config.json"), "{status:?}");

    let reply = stack.chat("monstral", false, 2).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    let body: Value = serde_json::from_str(&reply.text).expect("JSON");
    let (_, message) = openai_error(&body).expect("an OpenAI-shaped error");
    assert!(
        message.contains("missing") && message.contains("config.json"),
        "the error says what is missing: {message}"
    );
    assert!(
        stack.model_processes("monstral").is_empty(),
        "nothing started"
    );

    // The download finishes: no restart, no reload.
    std::fs::write(&weights, "{}").expect("write weights");
    let served = testkit::wait_for("monstral served", testkit::DEADLINE, || async {
        let reply = stack.chat("monstral", false, 2).await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert!(
        served.text.contains(&e2e_common::signature("monstral")),
        "{served:?}"
    );
    assert_eq!(listed().await["gpuswap"]["state"], "ready");
}
