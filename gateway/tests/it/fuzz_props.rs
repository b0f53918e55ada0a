//! Properties of the gateway's request parsing, shared by the proptest suite
//! (`gateway/tests/it/fuzz_parse.rs`, stable, in every test run) and the cargo-fuzz target
//! (`fuzz/fuzz_targets/parse_request.rs`). Each check panics on a violation.
//!
//! Only what the gateway makes `pub` is reached: `proxy::probe` and `proxy::splice` (the
//! hot path's model lookup and rename) and `error::convert_backend_error`. Alias resolution
//! (`catalog::Catalog::resolve`) cannot be given a catalog from outside the crate.

use bytes::Bytes;
use gpuswap_gateway::{
    error::convert_backend_error,
    proxy::{probe, splice},
};
use http::StatusCode;
use serde_json::Value;

/// The name a fuzz input renames its model to when it does not bring its own.
pub const DEFAULT_NEW_NAME: &str = "renamed/model:v2 \"q\" \\ é \u{1F600} \u{7}";

/// Splits a fuzz input into (new model name, request body) at its first 0xFF byte, which
/// never occurs in UTF-8 text (so in no JSON body); without one, the whole input is the body.
pub fn split_input(data: &[u8]) -> (String, &[u8]) {
    match data.iter().position(|&b| b == 0xFF) {
        Some(at) => (
            String::from_utf8_lossy(&data[..at]).into_owned(),
            &data[at + 1..],
        ),
        None => (DEFAULT_NEW_NAME.to_owned(), data),
    }
}

/// Every property of one request body renamed to `new_name`:
/// - `probe` never panics, and its span holds the JSON string literal of the model it names;
/// - splicing a new literal over the span gives a body that `probe` reads as the same request
///   for the new name (same `stream`);
/// - where the body is valid JSON, the spliced body is valid JSON whose `model` is the new name
///   and whose other fields are unchanged.
pub fn check_request(body: &[u8], new_name: &str) {
    let Ok(probed) = probe(body) else {
        return;
    };
    let literal = body.get(probed.span.clone()).unwrap_or_else(|| {
        panic!(
            "span {:?} outside a body of {} bytes",
            probed.span,
            body.len()
        )
    });
    let unescaped: String = serde_json::from_slice(literal).unwrap_or_else(|e| {
        panic!(
            "the span does not hold a string literal ({e}): {:?}",
            String::from_utf8_lossy(literal)
        )
    });
    assert_eq!(
        unescaped, probed.model,
        "the span's literal is not the model"
    );

    let new_literal = serde_json::to_vec(new_name).expect("a string serializes");
    let spliced = splice(
        &Bytes::copy_from_slice(body),
        probed.span.clone(),
        &new_literal,
    );
    let again = probe(&spliced).unwrap_or_else(|e| {
        panic!(
            "the renamed body is refused ({e}): {:?}",
            String::from_utf8_lossy(&spliced)
        )
    });
    assert_eq!(
        again.model, new_name,
        "the renamed body names another model"
    );
    assert_eq!(again.stream, probed.stream, "the rename changed `stream`");
    assert_eq!(
        again.span,
        probed.span.start..probed.span.start + new_literal.len(),
        "the renamed model is not where it was spliced"
    );

    let Ok(before) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let after: Value = serde_json::from_slice(&spliced).unwrap_or_else(|e| {
        panic!(
            "valid JSON became invalid by the rename ({e}): {:?}",
            String::from_utf8_lossy(&spliced)
        )
    });
    let (Value::Object(mut before), Value::Object(mut after)) = (before, after) else {
        panic!("probe accepted a body that is not a JSON object");
    };
    assert_eq!(
        after.remove("model"),
        Some(Value::String(new_name.to_owned())),
        "the renamed JSON's model"
    );
    before.remove("model");
    assert_eq!(before, after, "the rename changed other fields");
}

/// `convert_backend_error` never panics, keeps the status, and either converts to an
/// OpenAI error body or says the body already is one.
pub fn check_backend_error(status: u16, body: &[u8]) {
    let Ok(status) = StatusCode::from_u16(status) else {
        return;
    };
    match convert_backend_error(status, body) {
        Some(error) => {
            assert_eq!(error.status, status, "the status changed");
            let converted: Value =
                serde_json::from_slice(&error.body()).expect("the converted body is JSON");
            let inner = &converted["error"];
            assert!(inner["message"].is_string(), "no message: {converted}");
            assert!(inner["type"].is_string(), "no type: {converted}");
            assert!(
                inner["code"].as_str().is_some_and(|c| !c.is_empty()),
                "no code: {converted}"
            );
        }
        None => {
            // Forwarded as is: it must be an OpenAI error already.
            let kept: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
                panic!(
                    "kept a body that is not JSON ({e}): {:?}",
                    String::from_utf8_lossy(body)
                )
            });
            let inner = &kept["error"];
            assert!(
                inner["message"].is_string()
                    && (inner["code"].is_string() || inner["code"].is_null()),
                "kept a body that is not an OpenAI error: {kept}"
            );
        }
    }
}
