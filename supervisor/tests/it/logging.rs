//! The log format: `telemetry.log_format`, overridden by `--log-format`.

use crate::common::run_to_exit;

/// A configuration whose daemon logs an error and exits 1 at once: its metrics port is
/// taken (by `taken`, which the caller keeps open).
fn failing_config(dir: &std::path::Path, taken: &std::net::TcpListener, format: &str) -> String {
    let config = dir.join("gpuswap.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\nlisten = \"unix://{}\"\nstate_file = \"{}\"\nmetrics_listen = \"{}\"\n\n\
             [telemetry]\nlog_format = \"{format}\"\n",
            dir.join("s.sock").display(),
            dir.join("state.json").display(),
            taken.local_addr().expect("addr"),
        ),
    )
    .expect("write config");
    config.to_str().expect("utf-8 path").to_owned()
}

fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[test]
fn the_log_format_flag_overrides_the_configuration() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = testkit::short_tempdir();

    let config = failing_config(dir.path(), &taken, "json");
    let (code, stderr) = run_to_exit(&["--config", &config], dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    let logged = json_lines(&stderr);
    assert!(
        logged.iter().any(|line| line["level"] == "ERROR"
            && line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("supervisor.metrics_listen"))),
        "telemetry.log_format = json logs JSON lines: {stderr}"
    );

    let (code, stderr) = run_to_exit(&["--config", &config, "--log-format", "text"], dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        json_lines(&stderr).is_empty(),
        "--log-format text: {stderr}"
    );
    assert!(stderr.contains("ERROR"), "{stderr}");

    let config = failing_config(dir.path(), &taken, "text");
    let (code, stderr) = run_to_exit(&["--config", &config, "--log-format", "json"], dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        json_lines(&stderr)
            .iter()
            .any(|line| line["level"] == "ERROR"),
        "--log-format json overrides the configuration: {stderr}"
    );
}

#[test]
fn an_unknown_log_format_exits_2_and_names_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = testkit::short_tempdir();
    let config = failing_config(dir.path(), &taken, "yaml");
    let (code, stderr) = run_to_exit(&["--config", &config], dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("telemetry.log_format"), "{stderr}");
}
