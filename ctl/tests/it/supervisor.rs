//! gpuswapctl against a real gpuswap-supervisor running gpuswap-mock-backend models.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::mpsc,
    time::Duration,
};

use serde_json::Value;
use testkit::{DEADLINE, Proc};

use crate::common::{assert_says, gpuswapctl, text};

/// A mock model for the config: its name, aliases and extra mock flags.
struct Model {
    name: &'static str,
    aliases: &'static [&'static str],
    extra: &'static [&'static str],
    /// Extra lines of its `[models.NAME]` table.
    toml: &'static [&'static str],
}

const fn model(name: &'static str) -> Model {
    Model {
        name,
        aliases: &[],
        extra: &[],
        toml: &[],
    }
}

/// Starts `gpuswap-supervisor --config CONFIG`, its output in `supervisor.log` beside the
/// configuration.
fn spawn_supervisor(config: &Path) -> Proc {
    let log = config.with_file_name("supervisor.log");
    let log = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(testkit::bin("gpuswap-supervisor"));
    command
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log);
    Proc::spawn(command)
}

/// One supervisor with its own socket, state file and ports.
struct Harness {
    dir: tempfile::TempDir,
    endpoint: String,
    ports: Vec<(&'static str, u16)>,
    supervisor: Proc,
}

impl Harness {
    fn start(models: &[Model]) -> Self {
        let dir = testkit::short_tempdir();
        let root = dir.path().display().to_string();
        let endpoint = format!("unix://{root}/s.sock");
        let mock = testkit::bin("gpuswap-mock-backend");
        let mut config = format!(
            "[supervisor]\nlisten = \"{endpoint}\"\nstate_file = \"{root}/state\"\nmin_residency = \"0s\"\n"
        );
        let mut ports = Vec::new();
        for model in models {
            let port = testkit::free_port();
            ports.push((model.name, port));
            let mut command: Vec<String> = [
                mock.to_str().expect("utf-8 path"),
                "--flavor",
                "vllm",
                "--port",
                &port.to_string(),
                "--model",
                model.name,
                "--load-time",
                "200ms",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            command.extend(model.extra.iter().map(|s| s.to_string()));
            config.push_str(&format!(
                "\n[models.{name}]\nkind = \"vllm\"\nport = {port}\ncommand = {command:?}\naliases = {aliases:?}\n",
                name = model.name,
                aliases = model.aliases,
            ));
            for line in model.toml {
                config.push_str(&format!("{line}\n"));
            }
        }
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).expect("write config");
        let harness = Self {
            endpoint,
            ports,
            supervisor: spawn_supervisor(&config_path),
            dir,
        };
        testkit::wait_for_blocking(
            "the supervisor to answer gpuswapctl status",
            DEADLINE,
            || harness.ctl(&["status"]).status.success().then_some(()),
        );
        harness
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = gpuswapctl(args);
        command
            .env("GPUSWAP_ENDPOINT", &self.endpoint)
            .stdin(Stdio::null());
        command
    }

    fn ctl(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run gpuswapctl")
    }

    /// Runs gpuswapctl and checks its exit code, showing everything on a mismatch.
    fn expect(&self, args: &[&str], code: i32) -> Output {
        let out = self.ctl(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "gpuswapctl {args:?}\nstdout:\n{}\nstderr:\n{}\nsupervisor log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            self.supervisor_log()
        );
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend(args);
        testkit::json(&text(&self.expect(&all, 0).stdout))
    }

    fn model_json(&self, name: &str) -> Value {
        self.json(&["status", name])
    }

    fn port(&self, name: &str) -> u16 {
        self.ports
            .iter()
            .find(|(n, _)| *n == name)
            .expect("model port")
            .1
    }

    fn supervisor_log(&self) -> String {
        testkit::read_lossy(&self.dir.path().join("supervisor.log"))
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }
}

/// A running gpuswapctl whose stdout lines arrive on a channel.
struct Follower {
    proc: Proc,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    fn spawn(mut command: Command) -> Self {
        command.stdout(Stdio::piped()).stderr(Stdio::null());
        let mut proc = Proc::spawn(command);
        let stdout = proc.child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self { proc, lines }
    }

    /// Waits for a line that satisfies `wanted`, returning it.
    fn wait_line(&self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let mut seen = Vec::new();
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) if wanted(&line) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!("no line with {what}; saw:\n{}", seen.join("\n")),
            }
        }
    }

    /// Ctrl-C, then the exit code.
    fn interrupt(mut self) -> Option<i32> {
        self.proc.signal(libc::SIGINT);
        self.proc.wait_exit(DEADLINE).code()
    }
}

#[test]
fn status_shows_a_header_and_a_row_per_model() {
    let h = Harness::start(&[
        Model {
            aliases: &["first"],
            ..model("m1")
        },
        model("m2"),
    ]);
    let out = h.expect(&["status"], 0);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("gpuswap-supervisor "), "{stdout}");
    assert!(
        lines[0].contains(&format!("(pid {})", h.supervisor.pid())),
        "{stdout}"
    );
    assert!(lines[0].contains("queue: empty"), "{stdout}");
    let header = lines
        .iter()
        .find(|l| l.starts_with("MODEL"))
        .unwrap_or_else(|| panic!("no table header in:\n{stdout}"));
    let mut last = 0;
    for column in [
        "MODEL",
        "ALIASES",
        "STATE",
        "PID",
        "UPTIME",
        "GPUS",
        "PORT",
        "HOLDERS",
        "RESTARTS",
        "LAST ERROR",
    ] {
        let at = header
            .find(column)
            .unwrap_or_else(|| panic!("{column} missing: {header}"));
        assert!(at >= last, "{column} out of order: {header}");
        last = at;
    }
    let row = |name: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{stdout}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    let m1 = row("m1");
    assert_eq!(m1[1], "first");
    assert_eq!(m1[2], "stopped");
    assert!(m1.contains(&h.port("m1").to_string()), "{m1:?}");
    assert_eq!(row("m2")[2], "stopped");
    // Not a terminal: no color codes.
    assert!(!stdout.contains('\x1b'), "{stdout:?}");

    h.expect(&["activate", "m1"], 0);
    let stdout = text(&h.expect(&["status"], 0).stdout);
    let m1: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("m1 "))
        .expect("m1 row")
        .split_whitespace()
        .collect();
    assert_eq!(m1[2], "ready", "{stdout}");
    let pid: u32 = m1[3]
        .parse()
        .unwrap_or_else(|_| panic!("pid column: {stdout}"));
    assert!(testkit::alive(pid), "the PID column names a live process");
}

#[test]
fn status_json_has_the_supervisor_and_every_model() {
    let h = Harness::start(&[
        Model {
            aliases: &["first"],
            ..model("m1")
        },
        model("m2"),
    ]);
    let all = h.json(&["status"]);
    assert_eq!(all["supervisor"]["pid"], h.supervisor.pid());
    assert!(
        all["supervisor"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{all}"
    );
    assert!(
        all["supervisor"]["queue"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "{all}"
    );
    let models = all["models"].as_array().expect("models array");
    let mut names: Vec<&str> = models.iter().filter_map(|m| m["name"].as_str()).collect();
    names.sort();
    assert_eq!(names, ["m1", "m2"]);
    let m1 = models.iter().find(|m| m["name"] == "m1").expect("m1");
    assert_eq!(m1["state"], "stopped");
    assert_eq!(m1["kind"], "vllm");
    assert_eq!(m1["port"], h.port("m1"));
    assert_eq!(m1["aliases"], serde_json::json!(["first"]));
    assert_eq!(m1["pid"], Value::Null);

    h.expect(&["activate", "m1"], 0);
    // An alias finds the model too; one model is one object.
    let m1 = h.model_json("first");
    assert_eq!(m1["name"], "m1");
    assert_eq!(m1["state"], "ready");
    let pid = m1["pid"].as_u64().expect("pid of a ready model") as u32;
    assert!(testkit::alive(pid));
    assert!(m1["generation"].as_u64().is_some_and(|g| g >= 1), "{m1}");
    assert_eq!(m1["holders"], 0);
    let out = h.expect(&["status", "nope"], 4);
    assert_says(&out.stderr, "unknown model \"nope\"");
}

#[test]
fn models_prints_one_model_per_line() {
    let h = Harness::start(&[
        Model {
            aliases: &["first", "one"],
            ..model("m1")
        },
        model("m2"),
    ]);
    h.expect(&["activate", "m2"], 0);
    let stdout = text(&h.expect(&["models"], 0).stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows.contains(&vec!["m1", "vllm", "stopped", "first,one"]),
        "{stdout}"
    );
    assert!(rows.contains(&vec!["m2", "vllm", "ready", "-"]), "{stdout}");
}

#[test]
fn activate_prints_the_address_and_exits_0() {
    let h = Harness::start(&[model("m1")]);
    let out = h.expect(&["activate", "m1"], 0);
    let stdout = text(&out.stdout);
    let address = format!("127.0.0.1:{}", h.port("m1"));
    let prefix = format!("m1 ready at {address} (generation ");
    assert!(stdout.starts_with(&prefix), "{stdout}");
    assert!(stdout.contains("started in "), "{stdout}");
    // Not a terminal: one plain progress line per event on stderr.
    let stderr = text(&out.stderr);
    assert!(stderr.contains("starting m1 (pid "), "{stderr}");
    std::net::TcpStream::connect(&address).expect("the backend listens at the printed address");

    // Activating a ready model is granted at once.
    let again = text(&h.expect(&["activate", "m1"], 0).stdout);
    assert!(again.contains("already running"), "{again}");
}

#[test]
fn activate_json_prints_one_event_per_line_ending_in_ready() {
    let h = Harness::start(&[model("m1")]);
    let stdout = text(&h.expect(&["activate", "m1", "--json"], 0).stdout);
    let events: Vec<Value> = stdout.lines().map(testkit::json).collect();
    assert!(events.iter().any(|e| e["event"] == "starting"), "{stdout}");
    let ready = events.last().expect("events");
    assert_eq!(ready["event"], "ready", "{stdout}");
    assert_eq!(ready["address"], format!("127.0.0.1:{}", h.port("m1")));
    assert_eq!(ready["model"], "m1");
}

#[test]
fn activate_shows_the_backends_own_load_percentage() {
    // The mock prints vLLM's shard lines: "Loading safetensors checkpoint shards:  50% Completed | 2/4".
    let h = Harness::start(&[Model {
        extra: &["--shards", "4"],
        ..model("m1")
    }]);
    let stdout = text(&h.expect(&["activate", "m1", "--json"], 0).stdout);
    let percents: Vec<f64> = stdout
        .lines()
        .map(testkit::json)
        .filter(|e| e["event"] == "progress")
        .filter_map(|e| e["percent"].as_f64())
        .collect();
    assert!(
        percents.iter().any(|p| *p > 0.0 && *p < 100.0),
        "progress events with the backend's percentage: {stdout}"
    );
    h.expect(&["deactivate", "m1"], 0);
    // Without a terminal: one line per step, with the percentage and the shards.
    let out = h.expect(&["activate", "m1"], 0);
    let stderr = text(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("starting m1") && l.contains("% (") && l.contains("/4 shards)")),
        "{stderr}"
    );
}

#[test]
fn activate_of_an_unknown_model_exits_4() {
    let h = Harness::start(&[model("m1")]);
    let out = h.expect(&["activate", "nope"], 4);
    assert_says(&out.stderr, "nope");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_backend_that_fails_to_load_exits_1_with_its_log_tail() {
    let h = Harness::start(&[Model {
        extra: &["--fault", "exit-during-load"],
        ..model("bad")
    }]);
    let out = h.expect(&["activate", "bad"], 1);
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: activation of bad failed: "),
        "{stderr}"
    );
    let (_, tail) = stderr
        .split_once("last log lines of bad:\n")
        .unwrap_or_else(|| panic!("no log tail in:\n{stderr}"));
    let tail: Vec<&str> = tail
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!tail.is_empty(), "{stderr}");
    // The tail is the backend's real output, as `logs` shows it.
    let logs = text(&h.expect(&["logs", "bad", "-n", "1000"], 0).stdout);
    assert!(
        tail.iter().all(|line| logs.contains(line)),
        "tail {tail:?} not in logs:\n{logs}"
    );

    // The model is failed now: `status bad` says so with exit code 1.
    let out = h.expect(&["status", "bad"], 1);
    assert_says(&out.stdout, "failed");
}

#[test]
fn deactivate_sleep_puts_the_model_to_sleep_in_its_process_and_activate_wakes_it() {
    let h = Harness::start(&[
        Model {
            extra: &["--enable-sleep-mode"],
            toml: &[
                "sleep = true",
                "host_memory = \"1GiB\"",
                "env = { VLLM_SERVER_DEV_MODE = \"1\" }",
            ],
            ..model("m1")
        },
        model("m2"),
    ]);
    h.expect(&["activate", "m1"], 0);
    let pid = h.model_json("m1")["pid"].as_u64().expect("pid");
    let stdout = text(&h.expect(&["deactivate", "m1", "--sleep"], 0).stdout);
    assert_eq!(stdout.trim(), "m1 is asleep");
    let asleep = h.model_json("m1");
    assert_eq!(
        (&asleep["state"], asleep["pid"].as_u64()),
        (&"sleeping".into(), Some(pid))
    );
    h.expect(&["activate", "m1"], 0);
    let awake = h.model_json("m1");
    assert_eq!(
        (&awake["state"], awake["pid"].as_u64()),
        (&"ready".into(), Some(pid))
    );

    h.expect(&["activate", "m2"], 0);
    let refused = h.ctl(&["deactivate", "m2", "--sleep"]);
    assert_ne!(refused.status.code(), Some(0));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("m2 has no sleep protocol"), "{stderr}");
    assert_eq!(h.model_json("m2")["state"], "ready");
}

#[test]
fn deactivate_stops_the_backend() {
    let h = Harness::start(&[model("m1"), model("m2")]);
    h.expect(&["activate", "m1"], 0);
    let pid = h.model_json("m1")["pid"].as_u64().expect("pid") as u32;
    let stdout = text(&h.expect(&["deactivate", "m1"], 0).stdout);
    assert_eq!(stdout.trim(), "stopped m1");
    // Deactivate returns once the processes are gone.
    assert!(!testkit::alive(pid), "backend {pid} outlived deactivate");
    assert_eq!(h.model_json("m1")["state"], "stopped");

    let again = text(&h.expect(&["deactivate", "m1"], 0).stdout);
    assert_eq!(again.trim(), "m1 was not running");
    h.expect(&["deactivate", "nope"], 4);

    h.expect(&["activate", "m2"], 0);
    let stopped = h.json(&["deactivate", "--all"]);
    assert_eq!(stopped, serde_json::json!({"stopped": ["m2"]}));
}

/// Runs `read` between two reads of the model's whole log until no line arrived
/// in between, so the comparison never races a backend that is still writing.
fn with_stable_log<T>(h: &Harness, model: &str, read: impl Fn() -> T) -> (Vec<String>, T) {
    testkit::wait_for_blocking("a quiet moment in the log", DEADLINE, || {
        let all = || text(&h.expect(&["logs", model, "-n", "1000"], 0).stdout);
        let before = all();
        let value = read();
        (all() == before).then(|| (before.lines().map(str::to_owned).collect(), value))
    })
}

#[test]
fn logs_shows_the_last_n_lines() {
    let h = Harness::start(&[model("m1"), model("m2")]);
    h.expect(&["activate", "m1"], 0);
    let (all, three) = with_stable_log(&h, "m1", || {
        text(&h.expect(&["logs", "m1", "-n", "3"], 0).stdout)
    });
    assert!(all.len() > 3, "{all:?}");
    let three: Vec<&str> = three.lines().collect();
    assert_eq!(
        three,
        all[all.len() - 3..],
        "one model: no prefix, the last 3 lines"
    );

    // Every model: each line names its model (only m1 ever ran).
    let mixed = text(&h.expect(&["logs", "-n", "5"], 0).stdout);
    assert_eq!(mixed.lines().count(), 5, "{mixed}");
    assert!(mixed.lines().all(|l| l.starts_with("m1 | ")), "{mixed}");

    let (all, json) = with_stable_log(&h, "m1", || {
        text(&h.expect(&["logs", "m1", "-n", "2", "--json"], 0).stdout)
    });
    let lines: Vec<Value> = json.lines().map(testkit::json).collect();
    assert_eq!(lines.len(), 2, "{json}");
    for (line, expected) in lines.iter().zip(&all[all.len() - 2..]) {
        assert_eq!(line["model"], "m1");
        assert_eq!(line["line"], expected.as_str());
        assert!(
            line["stream"].is_string() && line["time_ms"].is_u64(),
            "{line}"
        );
    }
    h.expect(&["logs", "nope"], 4);
}

#[test]
fn logs_follow_prints_new_lines_until_ctrl_c() {
    let h = Harness::start(&[model("m1")]);
    h.expect(&["activate", "m1"], 0);
    let follower = Follower::spawn(h.command(&["logs", "m1", "-n", "1", "-f"]));
    // The one past line first: the follower is subscribed from here on.
    let first = follower.wait_line("the last past line", |_| true);
    let pid = h.model_json("m1")["pid"].as_u64().expect("pid");
    h.expect(&["deactivate", "m1"], 0);
    // The backend is gone, so the log's last line now was written by the stop.
    let after_stop = text(&h.expect(&["logs", "m1", "-n", "1"], 0).stdout);
    let after_stop = after_stop.trim_end();
    assert_ne!(after_stop, first, "the stop wrote no log line");
    follower.wait_line("the last line of the stop", |l| l == after_stop);
    assert_eq!(
        follower.interrupt(),
        Some(0),
        "Ctrl-C ends a follow successfully"
    );
    assert!(!testkit::alive(pid as u32));
}

#[test]
fn activate_hold_holds_until_ctrl_c() {
    let h = Harness::start(&[model("m1")]);
    let holder = Follower::spawn(h.command(&["activate", "m1", "--hold"]));
    holder.wait_line("the ready line", |l| l.starts_with("m1 ready at "));
    assert_eq!(h.model_json("m1")["holders"], 1);
    assert_eq!(holder.interrupt(), Some(0));
    testkit::wait_for_blocking("the hold to be released", DEADLINE, || {
        (h.model_json("m1")["holders"] == 0).then_some(())
    });
}

#[test]
fn a_hold_is_released_when_another_model_needs_the_gpus() {
    let h = Harness::start(&[model("m1"), model("m2")]);
    let mut holder = Follower::spawn(h.command(&["activate", "m1", "--hold"]));
    holder.wait_line("the ready line", |l| l.starts_with("m1 ready at "));
    // m1 and m2 share every GPU: m2 asks m1's holder to drain, and it does.
    let out = h.expect(&["activate", "m2"], 0);
    assert_says(&out.stderr, "draining m1");
    assert_eq!(holder.proc.wait_exit(DEADLINE).code(), Some(0));
}

#[test]
fn watch_prints_a_line_per_change() {
    let h = Harness::start(&[model("m1")]);
    let watcher = Follower::spawn(h.command(&["watch"]));
    watcher.wait_line("the snapshot row of m1", |l| {
        l.contains(" m1 ") && l.contains("stopped")
    });
    h.expect(&["activate", "m1"], 0);
    let ready = watcher.wait_line("m1 becoming ready", |l| {
        l.contains(" m1 ") && l.contains(" ready ")
    });
    // The line says what changed (normally "was starting").
    assert!(ready.contains("was "), "{ready}");
    assert_eq!(watcher.interrupt(), Some(0));
}

#[test]
fn reload_reports_added_and_removed_models() {
    let h = Harness::start(&[model("m1"), model("m2")]);
    let config = std::fs::read_to_string(h.config_path()).expect("config");
    // Rename m2 to m3: one model removed, one added.
    std::fs::write(
        h.config_path(),
        config.replace("[models.m2]", "[models.m3]"),
    )
    .expect("config");
    let out = h.expect(&["reload"], 0);
    let stdout = text(&out.stdout);
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(rows.contains(&vec!["added", "m3"]), "{stdout}");
    assert!(rows.contains(&vec!["removed", "m2"]), "{stdout}");
    let names: Vec<String> = text(&h.expect(&["models"], 0).stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(names, ["m1", "m3"]);
    let again = h.json(&["reload"]);
    assert_eq!(
        again,
        serde_json::json!({"added": [], "removed": [], "changed": [], "needs_restart": []})
    );
}

#[test]
fn an_https_supervisor_needs_the_right_token_and_ca() {
    let dir = testkit::short_tempdir();
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cert = fixtures.join("tls-cert.pem");
    let key = fixtures.join("tls-key.pem");
    let token = dir.path().join("token");
    let wrong = dir.path().join("wrong");
    std::fs::write(&token, "s3cret-for-tests\n").expect("token");
    std::fs::write(&wrong, "not-the-token\n").expect("token");
    let port = testkit::free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\nlisten = \"https://127.0.0.1:{port}\"\nstate_file = {state:?}\n\
             tls_cert = {cert:?}\ntls_key = {key:?}\ntoken_file = {token:?}\n",
            state = dir.path().join("state"),
        ),
    )
    .expect("config");
    let _supervisor = spawn_supervisor(&config);
    let endpoint = format!("https://127.0.0.1:{port}");
    let ctl = |token: &PathBuf, ca: Option<&PathBuf>| {
        let mut command = gpuswapctl(&["status", "--endpoint", &endpoint]);
        command.env("GPUSWAP_TOKEN_FILE", token);
        if let Some(ca) = ca {
            command.arg("--ca-file").arg(ca);
        }
        command.output().expect("run gpuswapctl")
    };
    testkit::wait_for_blocking("the https supervisor to answer", DEADLINE, || {
        ctl(&token, Some(&cert)).status.success().then_some(())
    });
    let out = ctl(&wrong, Some(&cert));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_says(&out.stderr, "authentication denied");
    // Without the CA the certificate is not trusted: no connection.
    let out = ctl(&token, None);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_says(&out.stderr, "--ca-file");
}

#[test]
fn an_activation_behind_another_reports_its_queue_position() {
    let h = Harness::start(&[
        model("m1"),
        Model {
            extra: &["--fault", "never-ready"],
            ..model("stuck")
        },
    ]);
    // `stuck` never becomes ready, so its activation holds the head of the queue.
    let _first = Follower::spawn(h.command(&["activate", "stuck"]));
    testkit::wait_for_blocking("stuck to be starting", DEADLINE, || {
        (h.model_json("stuck")["state"] == "starting").then_some(())
    });
    let second = Follower::spawn(h.command(&["activate", "m1", "--json"]));
    let queued = testkit::json(&second.wait_line("a queued event", |l| l.contains("\"queued\"")));
    assert_eq!(queued["behind"], "stuck", "{queued}");
    assert!(
        queued["position"].as_u64().is_some_and(|p| p >= 1),
        "{queued}"
    );
    let header = text(&h.expect(&["status"], 0).stdout);
    let header = header.lines().next().unwrap_or_default();
    assert!(
        header.contains("queue: ") && header.contains("m1"),
        "{header}"
    );
}
