//! The log format: `telemetry.log_format`, overridden by `--log-format`.

use crate::common::run_to_exit;

/// Runs the supervisor with `flags` after `--config` on a configuration (with
/// `log_format`) whose daemon logs an error and exits 1 at once: its metrics port is taken.
/// Returns its exit code and stderr.
fn run_failing(format: &str, flags: &[&str]) -> (Option<i32>, String) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = testkit::short_tempdir();
    let dir = dir.path();
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
    let mut args = vec!["--config", config.to_str().expect("utf-8 path")];
    args.extend(flags);
    run_to_exit(&args, dir)
}

fn json_lines(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[test]
fn the_log_format_flag_overrides_the_configuration() {
    let (code, stderr) = run_failing("json", &[]);
    assert_eq!(code, Some(1), "{stderr}");
    let logged = json_lines(&stderr);
    assert!(
        logged.iter().any(|line| line["level"] == "ERROR"
            && line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("supervisor.metrics_listen"))),
        "telemetry.log_format = json logs JSON lines: {stderr}"
    );

    let (code, stderr) = run_failing("json", &["--log-format", "text"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        json_lines(&stderr).is_empty(),
        "--log-format text: {stderr}"
    );
    assert!(stderr.contains("ERROR"), "{stderr}");

    let (code, stderr) = run_failing("text", &["--log-format", "json"]);
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
    let (code, stderr) = run_failing("yaml", &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("telemetry.log_format"), "{stderr}");
}
