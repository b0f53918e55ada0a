//! The official openai Python SDK against the real gateway, supervisor and mock
//! backends: what applications built on it see (e2e/python/openai_client.py).

use crate::clients_common;
use crate::clients_common::{Stack, mock};
use gpuswap::pb::ModelState;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn openai_python_sdk_lists_chats_streams_fails_and_swaps() {
    let venv = clients_common::venv();
    // alpha and beta share GPU 0: serving one stops the other.
    let mut stack = Stack::builder("openai-sdk")
        .model(mock("alpha", "vllm", &[0]))
        .model(mock("beta", "sglang", &[0]))
        .start()
        .await;
    stack.start_gateway().await;

    let base = stack.url("/v1");
    let args = ["--base-url", &base, "--first", "alpha", "--second", "beta"];
    let (results, context) = stack.run_sdk_client(&venv, "openai_client.py", &args).await;
    let (alpha, beta) = (stack.model("alpha"), stack.model("beta"));

    let mut listed: Vec<&str> = results["models"]
        .as_array()
        .expect("models")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    listed.sort();
    assert_eq!(listed, ["alpha", "beta"], "{context}");
    assert_eq!(results["retrieved"]["id"], "alpha", "{context}");
    assert_eq!(results["retrieved"]["object"], "model", "{context}");

    let chat = &results["chat"];
    assert_eq!(chat["model"], "alpha", "{context}");
    assert_eq!(chat["object"], "chat.completion", "{context}");
    assert!(
        chat["content"]
            .as_str()
            .is_some_and(|c| c.contains(&alpha.signature())),
        "the non-streaming answer names alpha: {context}"
    );

    let stream = &results["stream"];
    assert!(
        stream["content"]
            .as_str()
            .is_some_and(|c| c.contains(&alpha.signature())),
        "the streamed deltas name alpha: {context}"
    );
    assert!(
        stream["chunks"].as_u64().is_some_and(|n| n > 1),
        "a stream of several chunks: {context}"
    );
    assert_eq!(stream["models"], serde_json::json!(["alpha"]), "{context}");
    assert_eq!(
        stream["finish_reasons"].as_array().map(Vec::len),
        Some(1),
        "one finish_reason ends the stream: {context}"
    );

    let unknown = &results["unknown"];
    assert_eq!(unknown["raised"], "NotFoundError", "{context}");
    assert_eq!(unknown["status"], 404, "{context}");
    assert_eq!(unknown["code"], "model_not_found", "{context}");

    // The swap: beta streamed (stopping alpha), then alpha again (stopping beta).
    let (to_beta, back_to_alpha) = (&results["swap"][0], &results["swap"][1]);
    assert!(
        to_beta["content"]
            .as_str()
            .is_some_and(|c| c.contains(&beta.signature())),
        "after the swap the stream names beta: {context}"
    );
    // While beta loaded, the stream carried progress the SDK keeps apart from
    // the answer (as the delta's extra reasoning_content).
    let progress = to_beta["reasoning"].as_str().unwrap_or_default();
    assert!(
        progress.contains("beta"),
        "the swap's progress reached the SDK as reasoning: {context}"
    );
    assert!(
        !to_beta["content"]
            .as_str()
            .is_some_and(|c| c.contains(progress.lines().next().unwrap_or_default())),
        "swap progress stays out of the answer: {context}"
    );
    assert_eq!(
        results["stream"]["reasoning"], "",
        "no progress without a swap: {context}"
    );
    assert!(
        back_to_alpha["content"]
            .as_str()
            .is_some_and(|c| c.contains(&alpha.signature())),
        "swapping back, the answer names alpha: {context}"
    );
    let status = stack.statuses().await;
    let state_of = |name: &str| {
        status
            .models
            .iter()
            .find(|m| m.name == name)
            .map(|m| (m.state(), m.generation))
            .unwrap_or_else(|| panic!("no {name} in status"))
    };
    let (alpha_state, alpha_generation) = state_of("alpha");
    let (beta_state, beta_generation) = state_of("beta");
    assert_eq!(alpha_state, ModelState::Ready, "{context}");
    assert_ne!(
        beta_state,
        ModelState::Ready,
        "beta was stopped for alpha: {context}"
    );
    assert!(
        alpha_generation > beta_generation && beta_generation > 0,
        "alpha was started again after beta (generations {alpha_generation} > {beta_generation}): {context}"
    );
}
