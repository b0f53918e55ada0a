//! The model a request names, found without building a JSON tree (or a form's parts), and
//! where it sits in the body: a rename for the backend is one splice.

use std::ops::Range;

use bytes::Bytes;
use http::{HeaderMap, header};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The two fields the gateway needs; everything else is skipped unparsed.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    stream: Option<bool>,
}

/// What the gateway learned from a request body.
#[derive(Debug, PartialEq)]
pub struct Probed {
    /// The model as requested (unescaped).
    pub model: String,
    /// Where the model's JSON string literal sits in the body.
    pub span: Range<usize>,
    pub stream: bool,
}

pub fn probe(body: &[u8]) -> Result<Probed, ApiError> {
    // serde would also read a struct from an array: only an object is a request.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::invalid_request(
            "invalid_json",
            "The request body must be a JSON object",
        ));
    }
    // serde_json skips the fields it does not read without checking their
    // UTF-8; JSON is UTF-8, and a backend would fail on it less clearly.
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body is not valid UTF-8: {e}"),
        )
    })?;
    let probe: Probe = serde_json::from_str(text).map_err(|e| {
        ApiError::invalid_request(
            "invalid_json",
            format!("The request body must be a JSON object: {e}"),
        )
    })?;
    let raw = probe.model.ok_or_else(|| {
        ApiError::invalid_request("missing_model", "You must provide a model parameter")
    })?;
    let text = raw.get();
    let model = match serde_json::from_str::<&str>(text) {
        Ok(s) => s.to_owned(),
        Err(_) => serde_json::from_str::<String>(text).map_err(|_| {
            ApiError::invalid_request("missing_model", "The model parameter must be a string")
        })?,
    };
    // The raw value borrows from the body, so its offset is its position there.
    let start = text.as_ptr() as usize - body.as_ptr() as usize;
    Ok(Probed {
        model,
        span: start..start + text.len(),
        stream: probe.stream.unwrap_or(false),
    })
}

/// The body with the model literal at `span` replaced: the one copy a rename costs.
pub fn splice(body: &Bytes, span: Range<usize>, literal: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(body.len() - span.len() + literal.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(literal);
    out.extend_from_slice(&body[span.end..]);
    Bytes::from(out)
}

/// The boundary of a `multipart/form-data` request (the audio and image-edit endpoints).
pub(super) fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// Finds the `model` form field of a multipart body in place (the file parts are skipped
/// unread): the model and where its value sits, for a rename without parsing the rest.
pub fn probe_form(body: &[u8], boundary: &str) -> Result<Probed, ApiError> {
    let delimiter = format!("\r\n--{boundary}");
    let missing =
        || ApiError::invalid_request("missing_model", "You must provide a model form field");
    // The first delimiter may open the body without the CRLF before it.
    let mut at = memchr::memmem::find(body, &delimiter.as_bytes()[2..]).ok_or_else(missing)?;
    at += delimiter.len() - 2;
    loop {
        // After a delimiter: `--` ends the body, else CRLF and the part's headers.
        if body[at..].starts_with(b"--") {
            return Err(missing());
        }
        let head_start = at + 2;
        let after = body.get(head_start..).ok_or_else(missing)?;
        let head_len = memchr::memmem::find(after, b"\r\n\r\n").ok_or_else(missing)?;
        let head = &body[head_start..head_start + head_len];
        let value_start = head_start + head_len + 4;
        let value_len =
            memchr::memmem::find(&body[value_start..], delimiter.as_bytes()).ok_or_else(missing)?;
        if is_model_field(head) {
            let value = &body[value_start..value_start + value_len];
            let model = std::str::from_utf8(value).map_err(|_| {
                ApiError::invalid_request("missing_model", "The model form field must be UTF-8")
            })?;
            return Ok(Probed {
                model: model.to_owned(),
                span: value_start..value_start + value_len,
                stream: false,
            });
        }
        at = value_start + value_len + delimiter.len();
    }
}

/// True for the headers of the part `Content-Disposition: form-data; name="model"`.
fn is_model_field(head: &[u8]) -> bool {
    let Ok(head) = std::str::from_utf8(head) else {
        return false;
    };
    head.lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value.split(';').any(|param| {
                param.split_once('=').is_some_and(|(k, v)| {
                    k.trim() == "name" && v.trim().trim_matches('"') == "model"
                })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::passthrough::percent_decode;
    use http::{HeaderValue, StatusCode};

    #[test]
    fn probe_finds_the_model_span_and_stream_flag() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\""}], "model" : "a-b", "stream":true}"#;
        let p = probe(body).unwrap();
        assert_eq!(p.model, "a-b");
        assert!(p.stream);
        assert_eq!(&body[p.span.clone()], br#""a-b""#);
        let spliced = splice(&Bytes::from_static(body), p.span, br#""served""#);
        let v: serde_json::Value = serde_json::from_slice(&spliced).unwrap();
        assert_eq!(v["model"], "served");
        assert_eq!(v["messages"][0]["content"], "hi \"model\"");
    }

    #[test]
    fn the_model_form_field_is_found_in_place() {
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n\
                     name=\"model\"\r\n--Xy\r\n--XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\n\
                     whisper-1\r\n--XyZ--\r\n";
        let p = probe_form(body, "XyZ").unwrap();
        assert_eq!(p.model, "whisper-1");
        assert_eq!(&body[p.span.clone()], b"whisper-1");
        let renamed = splice(&Bytes::from_static(body), p.span, b"served");
        assert!(renamed.windows(10).any(|w| w == b"\r\nserved\r\n"));
        let none =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--XyZ--\r\n";
        assert_eq!(probe_form(none, "XyZ").unwrap_err().code, "missing_model");
        assert_eq!(
            probe_form(b"garbage", "XyZ").unwrap_err().code,
            "missing_model"
        );
        assert_eq!(
            probe_form(b"--XyZ\r\nno end", "XyZ").unwrap_err().code,
            "missing_model"
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/form-data; boundary=\"XyZ\""),
        );
        assert_eq!(multipart_boundary(&headers).as_deref(), Some("XyZ"));
        assert_eq!(percent_decode("org%2Fmodel%zz"), "org/model%zz");
        // Cut anywhere: refused until the model's value is closed by a delimiter, never a panic.
        let closed = memchr::memmem::find(body, b"whisper-1\r\n--XyZ").unwrap() + 16;
        for end in 0..body.len() {
            assert_eq!(
                probe_form(&body[..end], "XyZ").is_ok(),
                end >= closed,
                "{end}"
            );
        }
    }

    #[test]
    fn probe_unescapes_and_refuses_bad_bodies() {
        let p = probe(br#"{"model":"a\u002fb"}"#).unwrap();
        assert_eq!(p.model, "a/b");
        assert!(!p.stream);
        let code = |b: &[u8]| probe(b).unwrap_err().code;
        assert_eq!(code(b"{not json"), "invalid_json");
        assert_eq!(code(b"[1,2]"), "invalid_json");
        assert_eq!(code(br#"["a",true]"#), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(b"\"model\""), "invalid_json");
        assert_eq!(code(br#"{"model":"a","stream":"yes"}"#), "invalid_json");
        assert_eq!(code(br#"{"messages":[]}"#), "missing_model");
        assert_eq!(code(br#"{"model":7}"#), "missing_model");
        assert_eq!(code(br#"{"model":null}"#), "missing_model");
        assert_eq!(code(br#"{"model":["a"]}"#), "missing_model");
        assert_eq!(code(br#"{"model":{"id":"a"}}"#), "missing_model");
        assert_eq!(code(b"42"), "invalid_json");
        assert_eq!(code(b"null"), "invalid_json");
        // Invalid UTF-8 in a field the probe skips, and in the model itself.
        assert_eq!(
            code(b"{\"model\":\"a\",\"messages\":[{\"content\":\"\xff\"}]}"),
            "invalid_json"
        );
        assert_eq!(code(b"{\"model\":\"a\xc3\"}"), "invalid_json");
        assert_eq!(
            probe(b"{not json").unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
