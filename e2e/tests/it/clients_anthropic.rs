//! The official anthropic Python SDK against the real gateway, supervisor and mock backends:
//! Anthropic's Messages API (`/v1/messages`, served by llama-server and vLLM) passes through,
//! streaming included, with `x-api-key` and `anthropic-version`, and the gateway's errors on
//! that path are Anthropic-shaped (e2e/python/anthropic_client.py).

use crate::clients_common;
use crate::clients_common::{Stack, mock};

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_python_sdk_streams_and_gets_anthropic_errors() {
    let venv = clients_common::venv();
    let mut stack = Stack::builder("anthropic-sdk")
        .model(mock("claude-like", "llama-server", &[0]))
        .gateway_env("GPUSWAP__GATEWAY__API_KEYS", "anthropic-test-key")
        .start()
        .await;
    stack.start_gateway().await;
    let base = stack.url("");

    let args = [
        "--base-url",
        &base,
        "--key",
        "anthropic-test-key",
        "--model",
        "claude-like",
    ];
    let (results, context) = stack
        .run_sdk_client(&venv, "anthropic_client.py", &args)
        .await;
    let signature = stack.model("claude-like").signature();

    // Streamed while the model was still loading (keep-alive comments first), then the
    // backend's events as they came.
    let streamed = &results["stream"];
    assert!(
        streamed["text"]
            .as_str()
            .is_some_and(|t| t.contains(&signature)),
        "{context}"
    );
    assert_eq!(streamed["stop_reason"], "end_turn", "{context}");
    assert_eq!(streamed["output_tokens"], 8, "{context}");
    let message = &results["message"];
    assert_eq!(message["type"], "message", "{context}");
    assert!(
        message["text"]
            .as_str()
            .is_some_and(|t| t.contains(&signature)),
        "{context}"
    );

    // The gateway's own errors on this path, as Anthropic shapes them.
    for (step, raised, status, kind) in [
        ("unknown", "NotFoundError", 404, "not_found_error"),
        (
            "unauthorized",
            "AuthenticationError",
            401,
            "authentication_error",
        ),
    ] {
        let refusal = &results[step];
        assert_eq!(refusal["raised"], raised, "{step}: {context}");
        assert_eq!(refusal["status"], status, "{step}: {context}");
        assert_eq!(refusal["body"]["type"], "error", "{step}: {context}");
        assert_eq!(refusal["body"]["error"]["type"], kind, "{step}: {context}");
        assert!(
            refusal["body"]["error"]["message"].is_string(),
            "{step}: {context}"
        );
    }
}
