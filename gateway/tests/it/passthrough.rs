//! The backend pass-through (`/upstream/{model}/{path}`) and multipart requests routed by
//! their `model` form field, over the real stack.

use crate::common::{Model, Stack};
use serde_json::Value;
use testkit::model_entry;

async fn send(stack: &Stack, request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: not JSON: {text}{}", stack.logs()));
    (status, body)
}

/// GETs `path` from the gateway, with `key` as a bearer token if given.
async fn get_as(stack: &Stack, path: &str, key: Option<&str>, what: &str) -> (u16, Value) {
    let mut request = stack.http.get(stack.url(path));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    send(stack, request, what).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_paths_reach_the_backend_as_they_are_with_the_access_rules() {
    let stack = Stack::builder("passthrough")
        .gateway("keys.alice = { key = \"alice-key\", models = [\"alpha\"] }")
        .model(Model::new("alpha").served_name("alpha-served"))
        .model(Model::new("beta"))
        .start()
        .await;
    let alice = "alice-key";
    let (s, props) = get_as(&stack, "/upstream/alpha/props", Some(alice), "GET props").await;
    assert_eq!(s, 200, "{props}");
    assert_eq!(props["model_alias"], "alpha-served");
    assert_eq!(
        stack.starts(),
        ["alpha"],
        "the pass-through activates the model"
    );

    // Any method, the path and query as they are, the body untouched, the client's key kept
    // from the backend.
    let (s, echo) = send(
        &stack,
        stack
            .http
            .put(stack.url("/upstream/alpha/echo/slots/0?action=save"))
            .header("x-api-key", alice)
            .header("x-test", "kept")
            .body("{\"model\":\"alpha\"}"),
        "PUT echo",
    )
    .await;
    assert_eq!(s, 200, "{echo}");
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/echo/slots/0");
    assert_eq!(echo["query"], "action=save");
    assert_eq!(
        echo["body"], "{\"model\":\"alpha\"}",
        "no rename on a pass-through"
    );
    assert_eq!(echo["x_test"], "kept");
    assert_eq!(echo["authorization"], Value::Null);
    let (s, echo) = send(
        &stack,
        stack
            .http
            .delete(stack.url("/upstream/alpha/echo"))
            .bearer_auth(alice),
        "DELETE echo",
    )
    .await;
    assert_eq!((s, &echo["method"]), (200, &Value::from("DELETE")));

    // The backend's own errors come back as the backend wrote them.
    let (s, missing) = get_as(
        &stack,
        "/upstream/alpha/no/such/path",
        Some(alice),
        "GET missing",
    )
    .await;
    assert_eq!(s, 404, "{missing}");
    assert_eq!(missing["detail"], "Not Found", "converted: {missing}");

    // Another key's model: the same 404 as an unknown model, and nothing started.
    let (s, refused) = get_as(
        &stack,
        "/upstream/beta/props",
        Some(alice),
        "GET beta props",
    )
    .await;
    assert_eq!(s, 404, "{refused}");
    assert_eq!(refused["error"]["code"], "model_not_found");
    let (s, _) = get_as(
        &stack,
        "/upstream/alpha/props",
        None,
        "GET props without a key",
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(stack.starts(), ["alpha"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_holds_its_model_until_it_ends() {
    // alpha and beta share GPU 0: beta can start only once alpha is let go.
    let stack = Stack::builder("passthrough-hold")
        .model(Model::new("alpha"))
        .model(Model::new("beta"))
        .start()
        .await;
    let (s, _) = get_as(&stack, "/upstream/alpha/props", None, "warm up").await;
    assert_eq!(s, 200);
    let slow = tokio::spawn({
        let request = stack
            .http
            .get(stack.url("/upstream/alpha/echo?delay_ms=1500"));
        async move {
            let response = request.send().await.expect("slow pass-through");
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    });
    testkit::wait_for(
        "the slow pass-through in flight",
        testkit::DEADLINE,
        || async {
            let health = stack.get_json("/health").await?;
            let alpha = model_entry(&health, "models", "alpha")?;
            (alpha["in_flight"] == 1).then_some(())
        },
    )
    .await;
    stack.chat_ok("beta", 2).await;
    // Not held, alpha would have been stopped for beta mid-request (a 502 here).
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "the pass-through was cut by the swap: {body}");
    assert_eq!(testkit::json(&body)["model"], "alpha");
    assert_eq!(stack.starts(), ["alpha", "beta"]);
}

/// A multipart body: `fields` as form fields, then a file part of `file_len` bytes.
fn multipart(fields: &[(&str, &str)], file_len: usize, file_first: bool) -> (String, Vec<u8>) {
    let boundary = "gpuswap-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    let file = |body: &mut Vec<u8>| {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
                 Content-Type: audio/wav\r\n\r\n"
            )
            .as_bytes(),
        );
        // Bytes that look like a model field and a boundary prefix must not confuse the scan.
        let filler = b"name=\"model\"\r\n--gpuswap-test \x00\xff";
        body.extend(filler.iter().cycle().take(file_len));
        body.extend_from_slice(b"\r\n");
    };
    if file_first {
        file(&mut body);
    }
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if !file_first {
        file(&mut body);
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_requests_are_routed_by_their_model_field() {
    let stack = Stack::builder("multipart")
        .gateway("max_body = \"64KiB\"")
        .model(
            Model::new("whisper")
                .alias("w")
                .served_name("whisper-served"),
        )
        .model(Model::new("other"))
        .start()
        .await;
    let post = |path: &'static str, (content_type, body): (String, Vec<u8>)| {
        stack
            .http
            .post(stack.url(path))
            .header("content-type", content_type)
            .body(body)
    };
    for (path, file_first) in [
        ("/v1/audio/transcriptions", true),
        ("/v1/audio/translations", false),
    ] {
        let form = multipart(&[("model", "w"), ("language", "en")], 40_000, file_first);
        let (s, answer) = send(&stack, post(path, form), path).await;
        assert_eq!(s, 200, "{path}: {answer}");
        // The mock checks the model field against its served name: the field was renamed.
        assert_eq!(
            answer["text"], "[served by whisper-served] whisper-served: 40000 bytes",
            "{path}"
        );
    }
    assert_eq!(stack.starts(), ["whisper"]);

    // Refused by the gateway: no model field, an unknown model, a body past max_body.
    let refused = [
        (
            &[("language", "en")][..],
            10,
            "no model",
            400,
            "missing_model",
        ),
        (
            &[("model", "nope")][..],
            10,
            "unknown model",
            404,
            "model_not_found",
        ),
        (
            &[("model", "w")][..],
            100_000,
            "too large",
            413,
            "request_too_large",
        ),
    ];
    for (fields, file_len, what, status, code) in refused {
        let form = multipart(fields, file_len, true);
        let (s, e) = send(&stack, post("/v1/audio/transcriptions", form), what).await;
        assert_eq!(
            (s, &e["error"]["code"]),
            (status, &Value::from(code)),
            "{e}"
        );
    }
}
