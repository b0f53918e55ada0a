//! The demo the README offers (deploy/demo.sh on deploy/demo.toml), end to end
//! without the script's build step: supervisor + gateway on the demo's
//! configuration with the mock on PATH, the README's two requests, then Ctrl-C.
//! Only the ports and paths are moved to free ones, so that it runs beside
//! other tests and a demo someone left running.

mod clients_common;

use std::{collections::BTreeSet, ffi::OsString, net::TcpStream, time::Duration};

use futures_util::StreamExt;
use gpuswap::config::Config;
use serde_json::{Value, json};
use testkit::DEADLINE;

const DEMO: &str = "deploy/demo.toml";
/// Where demo.toml keeps its socket and state file.
const DEMO_DIR: &str = "/tmp/gpuswap-demo";

/// demo.toml with its ports and paths moved and every model tagged with
/// `marker`; the configuration it parses to.
fn relocated_demo(dir: &std::path::Path, gateway_port: u16, marker: &str) -> (String, Config) {
    let text = std::fs::read_to_string(clients_common::repo().join(DEMO)).expect("demo.toml");
    let original = Config::from_toml(&text).expect("demo.toml parses");
    let mut text = text.replace(DEMO_DIR, &dir.display().to_string());
    text = text.replace(
        &format!("\"{}\"", original.gateway.listen),
        &format!("\"127.0.0.1:{gateway_port}\""),
    );
    let ports: BTreeSet<u16> = original.models.values().map(|m| m.port).collect();
    for port in ports {
        let free = testkit::free_port();
        text = text
            .replace(
                &format!("\"--port\", \"{port}\""),
                &format!("\"--port\", \"{free}\""),
            )
            .replace(&format!("\nport = {port}\n"), &format!("\nport = {free}\n"));
    }
    // Each model's processes carry the marker in their environment.
    let mut tagged = String::new();
    for line in text.lines() {
        tagged.push_str(line);
        tagged.push('\n');
        if line.starts_with("[models.") {
            tagged.push_str(&format!("env = {{ GPUSWAP_TEST_MARKER = \"{marker}\" }}\n"));
        }
    }
    let relocated =
        Config::from_toml(&tagged).unwrap_or_else(|e| panic!("relocated demo.toml: {e}\n{tagged}"));
    // The relocation must have moved everything the demo binds or creates.
    assert!(!tagged.contains(DEMO_DIR), "{tagged}");
    assert_eq!(
        relocated.gateway.listen,
        format!("127.0.0.1:{gateway_port}")
    );
    assert_eq!(relocated.models.len(), original.models.len());
    for (name, model) in &relocated.models {
        let before = &original.models[name];
        assert_ne!(model.port, before.port, "{name}: port not moved");
        let port_arg = model.command.iter().position(|a| a == "--port");
        assert_eq!(
            port_arg.and_then(|i| model.command.get(i + 1)),
            Some(&model.port.to_string()),
            "{name}: the command serves on the model's port"
        );
        assert_eq!(
            model.env.get("GPUSWAP_TEST_MARKER").map(String::as_str),
            Some(marker)
        );
    }
    (tagged, relocated)
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_the_readme_requests_and_ctrl_c_leaves_nothing_behind() {
    let dir = testkit::short_tempdir();
    let marker = testkit::unique_marker("demo");
    let gateway_port = testkit::free_port();
    let (text, config) = relocated_demo(dir.path(), gateway_port, &marker);
    let config_path = dir.path().join("demo.toml");
    std::fs::write(&config_path, text).expect("write config");
    let socket = dir.path().join("supervisor.sock");
    assert_eq!(
        config.supervisor.listen,
        format!("unix://{}", socket.display())
    );

    // As demo.sh: the mock found on PATH, the gateway started once the supervisor answers.
    let binaries = testkit::bin("gpuswap-mock-backend")
        .parent()
        .expect("target dir")
        .to_owned();
    let mut path = OsString::from(binaries);
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    let (sup_log, gw_log) = (dir.path().join("sup.log"), dir.path().join("gw.log"));
    let logs = || clients_common::log_tails(&[sup_log.clone(), gw_log.clone()]);
    let mut supervisor =
        clients_common::spawn_supervisor(&config_path, &socket, &sup_log, Some(path)).await;
    let base = format!("http://127.0.0.1:{gateway_port}");
    let mut gateway = clients_common::spawn_gateway(&config_path, &base, &gw_log).await;
    let http = reqwest::Client::new();

    // curl -s localhost:8002/v1/models
    let models: Value = http
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .expect("GET /v1/models")
        .json()
        .await
        .expect("models JSON");
    let listed: BTreeSet<&str> = models["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a model list: {models}"))
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    let mut expected: BTreeSet<&str> = config.models.keys().map(String::as_str).collect();
    assert_eq!(
        expected,
        BTreeSet::from(["llama-sglang", "monstral-tabby", "phi-vllm", "qwen-sglang"]),
        "the demo's four models"
    );
    expected.extend(
        config
            .models
            .values()
            .flat_map(|m| m.aliases.iter().map(String::as_str)),
    );
    assert_eq!(
        listed, expected,
        "the four models and their aliases: {models}"
    );

    // curl -sN localhost:8002/v1/chat/completions -d '{"model":"llama-sglang","stream":true,...}'
    let request = json!({
        "model": "llama-sglang",
        "stream": true,
        "messages": [{"role": "user", "content": "hi"}],
    });
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&request)
        .send()
        .await
        .expect("POST chat");
    assert_eq!(response.status(), 200, "{}", logs());
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let read = tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.expect("stream chunk"));
        }
    })
    .await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(
        read.is_ok(),
        "the stream ended within {DEADLINE:?}: {body}{}",
        logs()
    );
    let events: Vec<&str> = body
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let answer: String = events
        .iter()
        .filter(|e| **e != "[DONE]")
        .map(|e| testkit::json(e))
        .filter(|chunk| chunk["id"] != "gpuswap-progress")
        .filter_map(|chunk| {
            chunk["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let served = config.models["llama-sglang"]
        .served_name
        .as_deref()
        .expect("llama-sglang has a served_name");
    assert!(
        answer.contains(&format!("[served by {served}]")),
        "the answer names llama's served name {served:?}: {answer:?}\n{body}"
    );
    let llama_port = config.models["llama-sglang"].port;
    assert!(
        TcpStream::connect(("127.0.0.1", llama_port)).is_ok(),
        "llama's mock serves on its port"
    );
    assert!(
        !testkit::processes_with_marker(&marker).is_empty(),
        "the marker finds the demo's backend processes"
    );

    // Ctrl-C: the terminal sends SIGINT to both daemons at once.
    supervisor.signal(libc::SIGINT);
    gateway.signal(libc::SIGINT);
    let supervisor_exit = supervisor.wait_exit(DEADLINE);
    let gateway_exit = gateway.wait_exit(DEADLINE);
    assert!(
        supervisor_exit.success(),
        "supervisor: {supervisor_exit}{}",
        logs()
    );
    assert!(gateway_exit.success(), "gateway: {gateway_exit}{}", logs());
    // The supervisor ends every backend before it exits: nothing may remain.
    let left = testkit::processes_with_marker(&marker);
    let described: Vec<String> = left
        .iter()
        .map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            format!(
                "{pid}: {}",
                String::from_utf8_lossy(&cmdline).replace('\0', " ")
            )
        })
        .collect();
    assert!(
        left.is_empty(),
        "processes left after Ctrl-C: {described:#?}{}",
        logs()
    );
    assert!(
        TcpStream::connect_timeout(&([127, 0, 0, 1], llama_port).into(), Duration::from_secs(5))
            .is_err(),
        "nothing listens on llama's port after Ctrl-C"
    );
    assert!(!socket.exists(), "the supervisor removed its socket");
}
