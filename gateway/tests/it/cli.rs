//! The command line: the log format from `[telemetry]`, overridden by
//! `--log-format`, and bad formats refused; `--listen` checked like `gateway.listen`.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use testkit::{DEADLINE, Proc};

/// A configuration whose supervisor is nowhere: the gateway starts, listens
/// and logs, and keeps retrying the supervisor.
fn config(dir: &Path, log_format: Option<&str>) -> String {
    let mut text = format!(
        "[gateway]\nlisten = \"127.0.0.1:{}\"\nsupervisor = \"unix://{}\"\n",
        testkit::free_port(),
        dir.join("nobody.sock").display()
    );
    if let Some(format) = log_format {
        text.push_str(&format!("\n[telemetry]\nlog_format = \"{format}\"\n"));
    }
    let path = dir.join(format!("gpuswap-{}.toml", log_format.unwrap_or("default")));
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn gateway(args: &[&str], log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    let mut command = Command::new(testkit::bin("gpuswap-gateway"));
    command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("GPUSWAP_LOG_FORMAT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    Proc::spawn(command)
}

/// The gateway's "listening" log line, once it is written.
fn listening_line(log: &Path) -> String {
    testkit::wait_for_blocking("the gateway to log that it listens", DEADLINE, || {
        testkit::read_lossy(log)
            .lines()
            .find(|line| line.contains("gpuswap-gateway listening"))
            .map(str::to_owned)
    })
}

fn is_json(line: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object())
}

#[test]
fn the_log_format_comes_from_the_configuration_and_the_flag_overrides_it() {
    let dir = testkit::short_tempdir();
    let log = dir.path().join("gateway.log");
    let json_config = config(dir.path(), Some("json"));

    let _gateway = gateway(&["--config", &json_config], &log);
    let line = listening_line(&log);
    assert!(is_json(&line), "telemetry.log_format = json: {line}");
    drop(_gateway);

    let _gateway = gateway(&["--config", &json_config, "--log-format", "text"], &log);
    let line = listening_line(&log);
    assert!(
        !is_json(&line) && line.contains("INFO"),
        "--log-format text: {line}"
    );
    drop(_gateway);

    let text_config = config(dir.path(), None);
    let _gateway = gateway(&["--config", &text_config, "--log-format", "json"], &log);
    let line = listening_line(&log);
    assert!(is_json(&line), "--log-format json: {line}");
}

#[test]
fn unknown_log_formats_are_refused() {
    let dir = testkit::short_tempdir();
    let log = dir.path().join("gateway.log");
    let text_config = config(dir.path(), None);
    let mut flag = gateway(&["--config", &text_config, "--log-format", "yaml"], &log);
    assert_eq!(flag.wait_exit(DEADLINE).code(), Some(2));
    assert!(testkit::read_lossy(&log).contains("yaml"));

    let yaml_config = config(dir.path(), Some("yaml"));
    let mut configured = gateway(&["--config", &yaml_config], &log);
    assert!(!configured.wait_exit(DEADLINE).success());
    let stderr = testkit::read_lossy(&log);
    assert!(stderr.contains("telemetry.log_format"), "{stderr}");
}

#[test]
fn the_listen_flag_is_checked_like_the_key_it_sets() {
    let dir = testkit::short_tempdir();
    let log = dir.path().join("gateway.log");
    let config = config(dir.path(), None);

    // gateway.listen takes an address, not a host name; the flag, a layer under the same
    // validation, is refused the same way, naming the key and the flag.
    for listen in ["localhost:0", "nowhere"] {
        let mut refused = gateway(&["--config", &config, "--listen", listen], &log);
        assert_eq!(
            refused.wait_exit(DEADLINE).code(),
            Some(2),
            "--listen {listen}: an invalid configuration exits 2, as the supervisor does"
        );
        let stderr = testkit::read_lossy(&log);
        assert!(
            stderr.contains("gateway.listen (set by --listen)"),
            "--listen {listen}: {stderr}"
        );
    }

    let listen = format!("127.0.0.1:{}", testkit::free_port());
    let _gateway = gateway(&["--config", &config, "--listen", &listen], &log);
    let line = listening_line(&log);
    assert!(line.contains(&listen), "--listen {listen}: {line}");
}
