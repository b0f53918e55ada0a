//! The demo the README offers, run by the script itself: `deploy/demo.sh
//! --smoke` (supervisor + gateway on demo.toml, the model list, a streaming
//! chat that starts a model and one that swaps it, Ctrl-C, nothing left). Only
//! the ports and paths are moved to free ones (`--config`), so that it runs
//! beside other tests and a demo someone left running, and the script's build
//! step is skipped (`--no-build`: cargo's lock is held while tests run); CI
//! runs the script with its build step on a fresh clone first.

use std::{
    collections::BTreeSet,
    net::TcpStream,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::clients_common;
use gpuswap::config::Config;

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
    let relocated = Config::from_toml(&tagged).unwrap_or_else(|e| {
        panic!(
            "relocated demo.toml: {}\n{tagged}",
            gpuswap::error_chain(&e)
        )
    });
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

/// Runs `deploy/demo.sh --smoke --no-build --config CONFIG` with the built binaries.
fn run_smoke(config: &Path) -> Output {
    let binaries = testkit::bin("gpuswap-mock-backend")
        .parent()
        .expect("target dir")
        .to_owned();
    Command::new(clients_common::repo().join("deploy/demo.sh"))
        .args(["--smoke", "--no-build", "--config"])
        .arg(config)
        .env("GPUSWAP_BIN_DIR", binaries)
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/demo.sh")
}

/// The marked processes still alive, with their command lines.
fn left_behind(marker: &str) -> Vec<String> {
    testkit::processes_with_marker(marker)
        .iter()
        .map(|&pid| {
            let cmdline = testkit::cmdline(pid).unwrap_or_default();
            format!("{pid}: {}", cmdline.join(" "))
        })
        .collect()
}

#[test]
fn demo_smoke_serves_the_readme_requests_and_ctrl_c_leaves_nothing_behind() {
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
    assert_eq!(
        config
            .models
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        BTreeSet::from(["llama-sglang", "monstral-tabby", "phi-vllm", "qwen-sglang"]),
        "the demo's four models"
    );

    let output = run_smoke(&config_path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", testkit::described(&output));
    // What the script checked, model by model: the answers came from each model's own backend.
    for model in ["llama-sglang", "qwen-sglang"] {
        let served = config.models[model]
            .served_name
            .as_deref()
            .expect("the demo's SGLang models have a served_name");
        assert!(
            stdout.contains(&format!(
                "a streaming chat with {model} was answered by its backend ({served})"
            )),
            "{}",
            testkit::described(&output)
        );
    }
    assert!(
        stdout.contains("demo smoke: OK"),
        "{}",
        testkit::described(&output)
    );

    // Checked here again, independently of the script: nothing of the demo is left.
    let left = left_behind(&marker);
    assert!(left.is_empty(), "processes left after Ctrl-C: {left:#?}");
    for model in config.models.values() {
        assert!(
            TcpStream::connect_timeout(
                &([127, 0, 0, 1], model.port).into(),
                Duration::from_secs(5)
            )
            .is_err(),
            "nothing listens on port {} after Ctrl-C",
            model.port
        );
    }
    assert!(!socket.exists(), "the supervisor removed its socket");
}

#[test]
fn demo_smoke_fails_when_a_model_cannot_be_served() {
    let dir = testkit::short_tempdir();
    let marker = testkit::unique_marker("demo-broken");
    let (text, _) = relocated_demo(dir.path(), testkit::free_port(), &marker);
    // qwen-sglang's backend exits at once: the swap to it cannot be answered.
    let broken = text.replacen(
        "command = [\"gpuswap-mock-backend\", \"--flavor\", \"sglang\"",
        "command = [\"false\", \"--flavor\", \"sglang\"",
        1,
    );
    assert_ne!(
        broken, text,
        "the first SGLang model's command was replaced"
    );
    let config_path = dir.path().join("demo.toml");
    std::fs::write(&config_path, broken).expect("write config");

    let output = run_smoke(&config_path);
    assert!(!output.status.success(), "{}", testkit::described(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("demo smoke: FAILED"),
        "{}",
        testkit::described(&output)
    );
    let left = left_behind(&marker);
    assert!(
        left.is_empty(),
        "processes left after a failed smoke: {left:#?}"
    );
}
