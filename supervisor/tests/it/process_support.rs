//! Shared helpers of the process-layer tests (the `process_*` modules).

use std::path::Path;

use gpuswap::config::ModelConfig;
use gpuswap_supervisor::backend::{LaunchSpec, logs::LogBuffer};
use serde_json::{Value, json};

/// A model config of `kind` running `command` on 127.0.0.1:`port`; `extra` overrides keys.
pub fn model(kind: &str, command: &[&str], port: u16, extra: Value) -> ModelConfig {
    let mut value = json!({
        "kind": kind,
        "command": command,
        "port": port,
        "startup_timeout": "60s",
        "stop_timeout": "10s",
    });
    if let (Some(map), Value::Object(extra)) = (value.as_object_mut(), extra) {
        map.extend(extra);
    }
    serde_json::from_value(value).expect("model config")
}

/// A launch spec with the real guard binary.
pub fn spec(name: &str, config: ModelConfig) -> LaunchSpec {
    LaunchSpec::new(name, config, testkit::bin("gpuswap-supervisor"))
}

/// `sh -c SCRIPT` as a command.
pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

pub fn logs(name: &str) -> LogBuffer {
    LogBuffer::new(name, 1000)
}

/// Asserts that `logs` holds a line containing `needle`; shows its last lines if not.
pub fn assert_logged(logs: &LogBuffer, needle: &str) {
    assert!(
        logged(logs, needle),
        "want {needle:?} in {:?}",
        logs.tail_lines(20)
    );
}

/// Whether `logs` holds a line containing `needle`.
fn logged(logs: &LogBuffer, needle: &str) -> bool {
    logs.tail_lines(usize::MAX)
        .iter()
        .any(|l| l.contains(needle))
}

/// The live processes tagged with `marker`, other than `except`.
pub fn tagged(marker: &str, except: &[u32]) -> Vec<u32> {
    testkit::processes_with_marker(marker)
        .into_iter()
        .filter(|pid| !except.contains(pid))
        .collect()
}

/// A tiny HTTP server that plays a readiness sequence, then serves forever:
/// `python3 server.py PORT PATH KEY PHASE...` where KEY is `-` for none and each PHASE is
/// `refuse=SECONDS` (not listening yet, only first), `CODE*N` (the next N answers on PATH),
/// `CODE=SECONDS` or `CODE` (the last one, forever): PATH answers CODE during that phase;
/// counted phases keep a test independent of how slowly a loaded machine runs it. With a
/// KEY, PATH answers 401 unless `x-api-key` and `Authorization: Bearer` both carry it.
/// Every request is printed as `probe PATH CODE`.
pub const HTTP_SERVER: &str = r#"
import http.server, sys, time
port, path, key, phases = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
if phases and phases[0].startswith("refuse="):
    print("loading", flush=True)
    time.sleep(float(phases[0].split("=")[1]))
    phases = phases[1:]
counted = []
while phases and "*" in phases[0]:
    code, _, n = phases.pop(0).partition("*")
    counted += [int(code)] * int(n)
schedule, t = [], time.monotonic()
for phase in phases:
    code, _, seconds = phase.partition("=")
    t = t + float(seconds) if seconds else float("inf")
    schedule.append((int(code), t))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 404
        if self.path == path:
            now = time.monotonic()
            if counted:
                code = counted.pop(0)
            else:
                code = next((c for c, until in schedule if now < until), schedule[-1][0])
            if key != "-" and (self.headers.get("x-api-key") != key
                               or self.headers.get("Authorization") != "Bearer " + key):
                code = 401
        print("probe", self.path, code, flush=True)
        body = b"{}"
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
print("listening", flush=True)
server.serve_forever()
"#;

/// Writes [`HTTP_SERVER`] into `dir` and returns the command running it.
pub fn http_server(dir: &Path, port: u16, path: &str, key: &str, phases: &[&str]) -> Vec<String> {
    let script = dir.join("server.py");
    std::fs::write(&script, HTTP_SERVER).expect("write server.py");
    let mut command = vec![
        python3(),
        script.display().to_string(),
        port.to_string(),
        path.into(),
        key.into(),
    ];
    command.extend(phases.iter().map(|p| p.to_string()));
    command
}

/// The system python3 (a pyenv shim is slow to start and wants its own environment).
pub fn python3() -> String {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3".into()
    } else {
        "python3".into()
    }
}
