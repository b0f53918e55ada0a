//! The gateway's request parsing under generated input, on stable in every test run: the
//! properties of `fuzz_props` (shared with the cargo-fuzz target in `fuzz/`) over
//! well-formed requests written in many styles, over those requests with a few bytes
//! changed, and over arbitrary bytes.

use crate::fuzz_props::{check_backend_error, check_request, split_input};
use gpuswap_gateway::proxy::probe;
use proptest::prelude::*;
use serde_json::{Number, Value};

/// Short text of any characters (proptest favours the awkward ones: quotes, controls,
/// surrogate-pair ranges); cheaper to draw than `any::<String>()`.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..4)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// A chat-like request: fields in a chosen order, the model somewhere among them.
#[derive(Debug, Clone)]
struct Request {
    model: String,
    stream: Option<bool>,
    /// Other fields; never `model` or `stream`, no name twice.
    fields: Vec<(String, Value)>,
    /// Where `model` goes among the fields (`stream` goes first when present).
    model_at: usize,
    /// Decides whitespace and escapes: the same request written many ways.
    style: u64,
}

fn request() -> impl Strategy<Value = Request> {
    let name = prop_oneof![
        "[a-zA-Z0-9._/:-]{0,40}",
        text(),
        Just("qwen2.5-7b-instruct".to_owned())
    ];
    let fields = prop::collection::vec(
        (
            prop_oneof![
                "messages|max_tokens|temperature|top_p|stop|tools|user",
                text()
            ],
            json_value(),
        ),
        0..6,
    );
    (
        name,
        any::<Option<bool>>(),
        fields,
        any::<usize>(),
        any::<u64>(),
    )
        .prop_map(|(model, stream, fields, model_at, style)| {
            let mut unique: Vec<(String, Value)> = Vec::new();
            for (key, value) in fields {
                if key != "model" && key != "stream" && !unique.iter().any(|(k, _)| *k == key) {
                    unique.push((key, value));
                }
            }
            Request {
                model,
                stream,
                model_at: model_at % (unique.len() + 1),
                fields: unique,
                style,
            }
        })
}

/// Writes JSON with whitespace and escapes chosen by a seed (serde_json writes one style).
struct Writer {
    out: Vec<u8>,
    seed: u64,
}

impl Writer {
    fn next(&mut self) -> u64 {
        // xorshift64: any seed but 0 works.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    fn space(&mut self) {
        let gap: &[u8] = match self.next() % 6 {
            0 => b" ",
            1 => b"\n  ",
            2 => b"\t",
            3 => b"\r\n",
            _ => b"",
        };
        self.out.extend_from_slice(gap);
    }

    fn string(&mut self, text: &str) {
        self.out.push(b'"');
        for c in text.chars() {
            let short: Option<&[u8]> = match c {
                '"' => Some(b"\\\""),
                '\\' => Some(b"\\\\"),
                '\n' => Some(b"\\n"),
                '\t' => Some(b"\\t"),
                _ => None,
            };
            let must_escape = short.is_some() || (c as u32) < 0x20;
            if self.next().is_multiple_of(5) || (must_escape && short.is_none()) {
                // \uXXXX, as a surrogate pair beyond the BMP.
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    self.out
                        .extend_from_slice(format!("\\u{:04x}", *unit).as_bytes());
                }
            } else if let Some(short) = short {
                self.out.extend_from_slice(short);
            } else {
                let mut buf = [0u8; 4];
                self.out
                    .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
        self.out.push(b'"');
    }

    fn value(&mut self, value: &Value) {
        match value {
            Value::String(s) => self.string(s),
            Value::Array(items) => self.list(b'[', b']', items, |w, item| w.value(item)),
            Value::Object(fields) => {
                let fields: Vec<(&String, &Value)> = fields.iter().collect();
                self.object(&fields);
            }
            scalar => self.out.extend_from_slice(scalar.to_string().as_bytes()),
        }
    }

    fn object(&mut self, fields: &[(&String, &Value)]) {
        self.list(b'{', b'}', fields, |w, (key, value)| {
            w.string(key);
            w.space();
            w.out.push(b':');
            w.space();
            w.value(value);
        });
    }

    /// `items` between `open` and `close`, comma-separated, each between random spaces.
    fn list<T>(&mut self, open: u8, close: u8, items: &[T], item: impl Fn(&mut Self, &T)) {
        self.out.push(open);
        for (i, each) in items.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.space();
            item(self, each);
            self.space();
        }
        self.out.push(close);
    }
}

fn write_request(request: &Request) -> Vec<u8> {
    let model_key = "model".to_owned();
    let stream_key = "stream".to_owned();
    let model = Value::String(request.model.clone());
    let stream = request.stream.map(Value::Bool);
    let mut fields: Vec<(&String, &Value)> = request.fields.iter().map(|(k, v)| (k, v)).collect();
    fields.insert(request.model_at, (&model_key, &model));
    if let Some(stream) = &stream {
        fields.insert(0, (&stream_key, stream));
    }
    let mut writer = Writer {
        out: Vec::new(),
        seed: request.style | 1,
    };
    writer.space();
    writer.object(&fields);
    writer.space();
    writer.out
}

/// A few byte edits: (position, what) where what < 256 replaces or inserts that byte, and
/// what >= 256 deletes.
fn edits() -> impl Strategy<Value = Vec<(usize, u16, bool)>> {
    prop::collection::vec((any::<usize>(), 0u16..300, any::<bool>()), 1..4)
}

fn apply_edits(body: &mut Vec<u8>, edits: &[(usize, u16, bool)]) {
    for &(at, what, insert) in edits {
        if body.is_empty() {
            body.push(what as u8);
            continue;
        }
        let at = at % body.len();
        match (u8::try_from(what), insert) {
            (Ok(byte), true) => body.insert(at, byte),
            (Ok(byte), false) => body[at] = byte,
            (Err(_), _) => {
                body.remove(at);
            }
        }
    }
}

// Case counts keep the file near ten seconds of CPU in a debug build.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(2500))]

    /// Well-formed requests in any style are read right, and renamed without other change.
    #[test]
    fn requests_are_read_and_renamed_faithfully(request in request(), new_name in text()) {
        let body = write_request(&request);
        let probed = probe(&body).unwrap_or_else(|e| {
            panic!("a valid request was refused ({e}): {}", String::from_utf8_lossy(&body))
        });
        prop_assert_eq!(&probed.model, &request.model);
        prop_assert_eq!(probed.stream, request.stream.unwrap_or(false));
        check_request(&body, &new_name);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2500))]

    /// Requests with a few bytes changed: mostly broken, sometimes still requests.
    #[test]
    fn damaged_requests_never_break_the_properties(
        request in request(),
        edits in edits(),
        new_name in text(),
    ) {
        let mut body = write_request(&request);
        apply_edits(&mut body, &edits);
        check_request(&body, &new_name);
    }

}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    /// Arbitrary bytes, split like a fuzz input into a new name and a body.
    #[test]
    fn arbitrary_bytes_never_break_the_properties(
        data in prop::collection::vec(any::<u8>(), 0..512),
        status in 100u16..600,
    ) {
        let (new_name, body) = split_input(&data);
        check_request(body, &new_name);
        check_backend_error(status, body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Backend error bodies of every shape the backends use, and near misses.
    #[test]
    fn backend_errors_convert_or_pass_through(
        fields in prop::collection::vec(
            (prop_oneof!["error", "message", "detail", "type", "code", "object", "param"], json_value()),
            0..5,
        ),
        nested in prop::collection::vec(
            (prop_oneof!["message", "type", "code", "param"], json_value()),
            0..4,
        ),
        nest in any::<bool>(),
        status in 400u16..600,
        style in any::<u64>(),
    ) {
        let mut object: serde_json::Map<String, Value> = fields.into_iter().collect();
        if nest {
            object.insert("error".into(), Value::Object(nested.into_iter().collect()));
        }
        let mut writer = Writer { out: Vec::new(), seed: style | 1 };
        writer.value(&Value::Object(object));
        check_backend_error(status, &writer.out);
    }
}
