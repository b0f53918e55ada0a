//! Keys per model: what each key sees and may use, over the real stack.

use crate::common::{Model, Stack};
use serde_json::Value;

/// Sends `body` (a chat) or a GET (no body) with the key in `header`; the status and body.
pub async fn call(
    stack: &Stack,
    path: &str,
    key: Option<(&str, &str)>,
    body: Option<&Value>,
) -> (u16, String) {
    let url = stack.url(path);
    let mut request = match body {
        Some(body) => stack.http.post(&url).json(body),
        None => stack.http.get(&url),
    };
    if let Some((name, value)) = key {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// A chat of `model` (not streamed) with the key in `key`: the status and body.
async fn chat_as(stack: &Stack, key: Option<(&str, &str)>, model: &str) -> (u16, String) {
    let chat = Stack::chat(model, false, 2);
    call(stack, "/v1/chat/completions", key, Some(&chat)).await
}

fn ids(text: &str) -> Vec<String> {
    let body = testkit::json(text);
    let mut ids: Vec<String> = body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{text}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The models the GPU memory of a `/v1/models` or `/api/status` answer names on GPU 0.
fn gpu0_models(text: &str) -> Vec<String> {
    let body = testkit::json(text);
    let gpus = body
        .pointer("/gpuswap/gpus")
        .or_else(|| body.pointer("/gpus"))
        .unwrap_or_else(|| panic!("no gpus: {text}"));
    gpus.as_array()
        .into_iter()
        .flatten()
        .filter(|gpu| gpu["index"] == 0)
        .flat_map(|gpu| gpu["models"].as_array().cloned().unwrap_or_default())
        .map(|name| name.as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sees_and_uses_only_its_models_and_is_never_logged() {
    let keys = testkit::short_tempdir();
    let bob_file = keys.path().join("bob");
    std::fs::write(&bob_file, "bob-file-secret\n").unwrap();
    let stack = Stack::builder("keys-per-model")
        .gateway("api_keys = [\"every-model-key\"]")
        .gateway("admin_keys = [\"admin-secret\"]")
        .gateway("keys.alice = { key = \"alice-secret\", models = [\"al*\"] }")
        .gateway(&format!(
            "keys.bob = {{ key_file = \"{}\", models = [\"b\"] }}",
            bob_file.display()
        ))
        // Both fit on GPU 0 together: its memory then names them both.
        .supervisor("gpu_memory = \"96GiB\"")
        .model(Model::new("alpha").alias("a").toml("vram = \"40GiB\""))
        .model(Model::new("beta").alias("b").toml("vram = \"40GiB\""))
        .start()
        .await;
    let alice = Some(("authorization", "Bearer alice-secret"));
    let bob = Some(("x-api-key", "bob-file-secret"));

    // The lists: each key its own models (with their aliases); the other keys all.
    let (s, t) = call(&stack, "/v1/models", alice, None).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(ids(&t), ["a", "alpha"]);
    let (s, t) = call(&stack, "/v1/models", bob, None).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(ids(&t), ["b", "beta"], "a pattern may name an alias");
    for key in [
        Some(("x-api-key", "every-model-key")),
        Some(("authorization", "Bearer admin-secret")),
    ] {
        let (s, t) = call(&stack, "/v1/models", key, None).await;
        assert_eq!(s, 200, "{t}");
        assert_eq!(ids(&t), ["a", "alpha", "b", "beta"]);
    }
    let (s, t) = call(&stack, "/v1/models", None, None).await;
    assert_eq!(s, 401, "named keys close the gateway: {t}");

    // A model the key may not use answers exactly like a model that does not exist.
    let (s, forbidden) = chat_as(&stack, alice, "beta").await;
    let (s2, unknown) = chat_as(&stack, alice, "gamma").await;
    assert_eq!((s, s2), (404, 404), "{forbidden} {unknown}");
    assert_eq!(
        forbidden.replace("beta", "X"),
        unknown.replace("gamma", "X"),
        "the refusal must not tell that the model exists"
    );
    assert_eq!(
        testkit::json(&forbidden)["error"]["code"],
        "model_not_found"
    );
    let (s, t) = call(&stack, "/v1/models/b", alice, None).await;
    assert_eq!(s, 404, "{t}");
    assert!(
        stack.starts().is_empty(),
        "a refused request started a model"
    );

    // Its own models work, by name or alias.
    let (s, t) = chat_as(&stack, alice, "a").await;
    assert_eq!(s, 200, "{t}{}", stack.logs());
    let (s, t) = chat_as(&stack, bob, "beta").await;
    assert_eq!(s, 200, "{t}{}", stack.logs());
    let (s, t) = chat_as(&stack, Some(("x-api-key", "alice-secret-but-longer")), "a").await;
    assert_eq!(s, 401, "{t}");

    // The GPUs' memory names only the models the key may see.
    let admin = Some(("authorization", "Bearer admin-secret"));
    testkit::wait_for("both models on GPU 0", testkit::DEADLINE, || async {
        let (_, t) = call(&stack, "/v1/models", admin, None).await;
        (gpu0_models(&t) == ["alpha", "beta"]).then_some(())
    })
    .await;
    for (key, own) in [(alice, "alpha"), (bob, "beta")] {
        for path in ["/v1/models", "/api/status"] {
            let (s, t) = call(&stack, path, key, None).await;
            assert_eq!(s, 200, "{t}");
            assert_eq!(gpu0_models(&t), [own], "{path}: {t}");
        }
    }

    let logs = stack.logs();
    for secret in [
        "alice-secret",
        "bob-file-secret",
        "every-model-key",
        "admin-secret",
    ] {
        assert!(!logs.contains(secret), "{secret} was logged:{logs}");
    }
}
