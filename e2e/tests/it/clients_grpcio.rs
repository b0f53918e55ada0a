//! Python grpcio (Google's gRPC core, a second independent gRPC stack) against a
//! real supervisor on its Unix socket: it learns the schema through server
//! reflection and calls the supervisor with it (e2e/python/grpc_reflection_client.py).

use std::{ffi::OsStr, time::Duration};

use crate::clients_common;
use crate::clients_common::{Stack, mock};
use serde_json::{Value, json};

/// Runs e2e/python/grpc_reflection_client.py against a fresh supervisor and asserts that
/// reflection lists `service`: the client's JSON results and a context for assertion
/// messages.
async fn discover(test: &str, service: &str) -> (Value, String) {
    let venv = clients_common::venv();
    let stack = Stack::builder(test)
        .model(mock("alpha", "vllm", &[0]))
        .model(mock("beta", "sglang", &[1]))
        .start()
        .await;
    let (results, context) = venv
        .run_script(
            "grpc_reflection_client.py",
            [OsStr::new("--socket"), stack.socket.as_os_str()],
            Duration::from_secs(120),
            || stack.logs(),
        )
        .await;
    let services = results["services"].as_array().expect("services");
    assert!(
        services.contains(&json!(service)),
        "reflection lists {service}: {context}"
    );
    (results, context)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_discovers_the_supervisor_through_reflection_and_calls_it() {
    let (results, context) = discover("grpcio", "gpuswap.v1.Supervisor").await;
    assert_eq!(
        results["methods"],
        json!([
            "Activate",
            "Deactivate",
            "Logs",
            "Reload",
            "ReportUse",
            "Status",
            "Watch"
        ]),
        "{context}"
    );

    let models = results["status"]["models"].as_array().expect("models");
    let described: Vec<(&str, &str, Vec<u64>)> = models
        .iter()
        .map(|m| {
            let gpus = m["gpus"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .collect();
            (
                m["name"].as_str().unwrap_or_default(),
                m["state"].as_str().unwrap_or_default(),
                gpus,
            )
        })
        .collect();
    assert_eq!(
        described,
        [
            ("alpha", "MODEL_STATE_STOPPED", vec![0]),
            ("beta", "MODEL_STATE_STOPPED", vec![1]),
        ],
        "Status as decoded with the reflected schema: {context}"
    );
    assert_eq!(results["unknown_model"], "NOT_FOUND", "{context}");
    // grpcio-health-checking brings its own schema of grpc.health.v1.
    assert_eq!(
        results["health"],
        json!({"": "SERVING", "gpuswap.v1.Supervisor": "SERVING"}),
        "{context}"
    );
}

/// What grpcurl 1.8.x, grpcui and grpcio-reflection's own client need of a
/// server's reflection: the v1alpha protocol, and every served service described.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_describes_every_service_in_both_protocol_versions() {
    let (results, context) = discover("grpcio-alpha", "grpc.health.v1.Health").await;
    assert_eq!(
        results["v1alpha"]["services"], results["services"],
        "v1alpha reflection answers as v1 does: {context}"
    );
}
