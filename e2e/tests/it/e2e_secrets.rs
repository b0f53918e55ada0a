//! Secrets never leak, and the gateway needs no privileges: the real supervisor, gateway and
//! gpuswapctl with a TabbyAPI-flavoured mock that demands a backend key, and a gateway that
//! demands its own client key.
//!
//! - Neither key appears in the daemons' stderr (RUST_LOG=debug), `gpuswapctl status --json`,
//!   Status or Watch, `/v1/models`, or any error body, after good requests, requests with a
//!   wrong or no key, and a failed start; the gateway sends the backend key itself.
//! - Activate of a name that is not configured (paths, shell metacharacters) is NotFound and
//!   starts nothing.
//! - Run as `nobody` (setpriv) against a socket of mode 0666, the gateway serves end to end.
//!
//! Needs the binaries: `cargo build --bins -p gpuswap-supervisor -p gpuswap-gateway
//! -p gpuswap-ctl -p gpuswap-mock-backend`.

use std::{
    hash::{BuildHasher, RandomState},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use gpuswap::{SupervisorClient, pb};
use serde_json::{Value, json};
use testkit::{DEADLINE, Proc, http};

/// A random token no log line could contain by chance.
fn random_token(prefix: &str) -> String {
    let a = RandomState::new().hash_one(std::process::id());
    let b = RandomState::new().hash_one(std::time::Instant::now());
    format!("{prefix}{a:016x}{b:016x}")
}

/// The backend's key (the mock demands it) and the gateway's client key.
#[derive(Clone)]
struct Secrets {
    backend: String,
    gateway: String,
}

impl Secrets {
    fn new() -> Self {
        Self {
            backend: random_token("tabbykey"),
            gateway: random_token("gatewaykey"),
        }
    }

    /// Panics when `text` (named `what`) holds either key.
    fn assert_absent(&self, what: &str, text: &str) {
        for (name, key) in [("backend", &self.backend), ("gateway", &self.gateway)] {
            if let Some(at) = text.find(key.as_str()) {
                let start = text[..at]
                    .char_indices()
                    .rev()
                    .nth(300)
                    .map_or(0, |(i, _)| i);
                let end = (at + key.len() + 200).min(text.len());
                let end = (end..=text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                panic!(
                    "the {name} key leaks in {what}:\n...{}...",
                    &text[start..end]
                );
            }
        }
    }
}

/// A mock TabbyAPI model demanding `key`; `extra` are more mock arguments.
fn tabby_model(name: &str, port: u16, key: &str, marker: &str, extra: &[&str]) -> String {
    testkit::MockModel::new(name)
        .flavor("tabbyapi")
        .port(port)
        .load_time("200ms")
        .args(&["--api-key", key])
        .args(extra)
        .toml(&format!("api_key = \"{key}\""))
        .alias(&format!("{name}-alias"))
        .render(marker)
}

/// A backend that prints its own key while starting, then dies loading, like vLLM
/// (`non-default args: {..., 'api_key': [...]}`) or SGLang (`server_args=ServerArgs(...)`).
fn chatty_model(port: u16, key: &str, marker: &str) -> String {
    let mock = testkit::bin("gpuswap-mock-backend").display().to_string();
    let script = format!(
        "echo \"server_args=ServerArgs(port={port}, api_key='{key}')\"; exec {mock} --flavor tabbyapi \
         --port {port} --model chatty --load-time 200ms --api-key {key} --fault exit-during-load"
    );
    format!(
        "\n[models.chatty]\nkind = \"tabbyapi\"\ncommand = {}\nport = {port}\ngpus = [0]\n\
         api_key = \"{key}\"\nstartup_timeout = \"30s\"\nstop_timeout = \"10s\"\n\
         env = {{ {MARKER_ENV} = \"{marker}\" }}\n",
        testkit::toml_list(&["sh".into(), "-c".into(), script]),
        MARKER_ENV = testkit::MARKER_ENV,
    )
}

/// Supervisor + gateway + mock TabbyAPI models: `tabby` works, `broken` dies loading.
struct Stack {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    socket: PathBuf,
    marker: String,
    secrets: Secrets,
    tabby_port: u16,
    gateway_port: u16,
    supervisor: Option<Proc>,
    gateway: Option<Proc>,
    client: SupervisorClient,
    /// Every Watch event, as text.
    watched: Arc<Mutex<String>>,
}

impl Stack {
    /// Starts the supervisor (socket mode 0666) and the gateway, as `nobody` when
    /// `unprivileged_gateway`, and waits until the gateway sees the supervisor.
    /// The gateway exposes log tails in start failures (off by default): the
    /// tails must not leak a key even then.
    async fn start(test: &str, unprivileged_gateway: bool) -> Stack {
        let dir = testkit::short_tempdir();
        // `nobody` must reach the socket and read the configuration.
        set_mode(dir.path(), 0o755);
        let socket = dir.path().join("s.sock");
        let secrets = Secrets::new();
        let marker = testkit::unique_marker(test);
        let tabby_port = testkit::free_port();
        let mut config = format!(
            "[supervisor]\nlisten = \"unix://{socket}\"\nsocket_mode = \"0666\"\n\
             state_file = \"{state}\"\nmin_residency = \"0s\"\ndrain_timeout = \"60s\"\n\
             log_lines = 300\n\n[gateway]\nsupervisor = \"unix://{socket}\"\n\
             api_keys = [\"{gateway_key}\"]\nqueue_timeout = \"120s\"\nkeepalive_interval = \"200ms\"\n\
             expose_log_tail = true\n",
            socket = socket.display(),
            state = dir.path().join("state.json").display(),
            gateway_key = secrets.gateway,
        );
        config.push_str(&tabby_model(
            "tabby",
            tabby_port,
            &secrets.backend,
            &marker,
            &[],
        ));
        config.push_str(&tabby_model(
            "broken",
            testkit::free_port(),
            &secrets.backend,
            &marker,
            &["--fault", "exit-during-load"],
        ));
        config.push_str(&chatty_model(
            testkit::free_port(),
            &secrets.backend,
            &marker,
        ));
        let config_path = dir.path().join("gpuswap.toml");
        std::fs::write(&config_path, config).expect("write config");
        set_mode(&config_path, 0o644);

        let client = testkit::supervisor_client(&socket);
        let mut stack = Stack {
            dir,
            config_path,
            socket,
            marker,
            secrets,
            tabby_port,
            gateway_port: testkit::free_port(),
            supervisor: None,
            gateway: None,
            client,
            watched: Arc::default(),
        };
        stack.start_supervisor().await;
        stack.start_gateway(unprivileged_gateway).await;
        stack
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn start_supervisor(&mut self) {
        let log_path = self.log_path("supervisor.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let mut command = testkit::supervisor_command(&self.config_path, "debug");
        command.stdout(log.try_clone().expect("log fd")).stderr(log);
        let proc = self.supervisor.insert(Proc::spawn(command));
        testkit::wait_until_answering(&self.client, proc, &log_path).await;
        let mut client = self.client.clone();
        let watched = Arc::clone(&self.watched);
        let mut stream = client
            .watch(pb::WatchRequest {})
            .await
            .expect("Watch")
            .into_inner();
        tokio::spawn(async move {
            while let Ok(Some(event)) = stream.message().await {
                let mut text = watched.lock().unwrap();
                text.push_str(&format!("{event:?}\n"));
            }
        });
    }

    async fn start_gateway(&mut self, unprivileged: bool) {
        let log = std::fs::File::create(self.log_path("gateway.log")).expect("log");
        let gateway = testkit::bin("gpuswap-gateway");
        let mut command = if unprivileged {
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .arg(gateway);
            command
        } else {
            Command::new(gateway)
        };
        command
            .arg("--config")
            .arg(&self.config_path)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.gateway_port))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.gateway = Some(Proc::spawn(command));
        http::wait_gateway_connected(&self.url("/health")).await;
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.gateway_port)
    }

    /// GET with optional (header, value); (status, body), status 0 when nothing answered.
    async fn get(&self, path: &str, auth: Option<(&str, &str)>) -> (u16, String) {
        let mut request = http::client().get(self.url(path));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        let reply = http::send(request).await;
        (reply.status, reply.text)
    }

    /// POSTs a chat request for `model`; (status, whole body).
    async fn chat(&self, model: &str, stream: bool, auth: Option<(&str, &str)>) -> (u16, String) {
        let mut request = http::client()
            .post(self.url("/v1/chat/completions"))
            .json(&json!({
                "model": model,
                "stream": stream,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "hello"}],
            }));
        if let Some((name, value)) = auth {
            request = request.header(name, value);
        }
        let reply = http::send(request).await;
        if let Some(error) = reply.error {
            panic!("POST for {model}: {error}");
        }
        (reply.status, reply.text)
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.secrets.gateway)
    }

    async fn status(&self) -> pb::StatusResponse {
        testkit::status(&self.client).await
    }

    async fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let output = testkit::run_ctl(&format!("unix://{}", self.socket.display()), args).await;
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Stops both daemons with SIGTERM (so their shutdown lines are logged too) and waits.
    fn stop_daemons(&mut self) {
        for proc in [self.gateway.take(), self.supervisor.take()]
            .into_iter()
            .flatten()
        {
            let mut proc = proc;
            proc.signal(libc::SIGTERM);
            proc.wait_exit(DEADLINE);
        }
    }

    fn read_log(&self, name: &str) -> String {
        testkit::read_lossy(&self.log_path(name))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = ["supervisor.log", "gateway.log"].map(|name| self.log_path(name));
            eprintln!("{}", testkit::log_tails(logs));
        }
        drop(self.gateway.take());
        drop(self.supervisor.take());
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The status and the `error.code` of an OpenAI error body.
fn error_code(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("<not an OpenAI error: {body}>"))
}

/// The last event of an SSE stream that is not `[DONE]`.
fn last_event(text: &str) -> String {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("data: "))
        .rfind(|d| *d != "[DONE]")
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_reach_logs_status_or_answers() {
    let mut stack = Stack::start("secrets", false).await;
    let secrets = stack.secrets.clone();
    let bearer = stack.bearer();
    let mut seen = Vec::<(String, String)>::new();

    // The client key is required everywhere but /health.
    for (what, auth) in [
        ("no key", None),
        (
            "a wrong bearer key",
            Some(("authorization", "Bearer wrong-key")),
        ),
        ("a wrong x-api-key", Some(("x-api-key", "wrong-key"))),
        // The backend's key is no client key.
        (
            "the backend key",
            Some(("x-api-key", secrets.backend.as_str())),
        ),
    ] {
        let (status, body) = stack.chat("tabby", false, auth).await;
        assert_eq!(status, 401, "chat with {what}: {body}");
        assert_eq!(error_code(&body), "invalid_api_key", "chat with {what}");
        seen.push((format!("chat with {what}"), body));
        let (status, body) = stack.get("/v1/models", auth).await;
        assert_eq!(status, 401, "/v1/models with {what}: {body}");
        seen.push((format!("/v1/models with {what}"), body));
    }

    // The mock really demands its key: unanswered without it, so a 200 through the
    // gateway proves the gateway sent it.
    let (status, _) = stack
        .chat("tabby", false, Some(("authorization", &bearer)))
        .await;
    assert_eq!(status, 200, "a good request");
    let direct = http::client()
        .post(format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            stack.tabby_port
        ))
        .json(&json!({"model": "tabby", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("the backend answers");
    assert_eq!(direct.status().as_u16(), 401, "the mock without its key");

    for (what, auth, stream) in [
        ("bearer", ("authorization", bearer.as_str()), false),
        ("x-api-key", ("x-api-key", secrets.gateway.as_str()), false),
        ("bearer, streamed", ("authorization", bearer.as_str()), true),
    ] {
        let (status, body) = stack.chat("tabby-alias", stream, Some(auth)).await;
        assert_eq!(status, 200, "{what}: {body}");
        assert!(body.contains("[served by tabby]"), "{what}: {body}");
        seen.push((format!("answer ({what})"), body));
    }

    // A failed start, waited for plainly and streamed.
    let (status, body) = stack
        .chat("broken", false, Some(("authorization", &bearer)))
        .await;
    assert_eq!(status, 503, "a failed start: {body}");
    assert_eq!(error_code(&body), "model_start_failed", "{body}");
    seen.push(("the failed start's error".into(), body));
    let (status, body) = stack
        .chat("broken", true, Some(("authorization", &bearer)))
        .await;
    let event = last_event(&body);
    assert!(
        status == 503 && error_code(&body) == "model_start_failed"
            || status == 200 && error_code(&event) == "model_start_failed",
        "a failed start, streamed: {status} {body}"
    );
    seen.push(("the failed start's error, streamed".into(), body));

    // Unknown models and paths.
    let (status, body) = stack
        .chat("../../etc/passwd", false, Some(("authorization", &bearer)))
        .await;
    assert_eq!(status, 404, "{body}");
    seen.push(("an unknown model's error".into(), body));
    let with_key = Some(("authorization", bearer.as_str()));
    // (what, path, key, status, what the answer names)
    for (what, path, key, expected, names) in [
        (
            "an unknown path's error",
            "/v2/nothing",
            with_key,
            404,
            &[][..],
        ),
        (
            "/v1/models",
            "/v1/models",
            with_key,
            200,
            &["\"tabby\"", "\"broken\""],
        ),
        ("/v1/models/tabby", "/v1/models/tabby", with_key, 200, &[]),
        ("/health", "/health", None, 200, &[]),
        ("/metrics", "/metrics", None, 200, &[]),
    ] {
        let (status, body) = stack.get(path, key).await;
        assert_eq!(status, expected, "{path}: {body}");
        assert!(
            names.iter().all(|name| body.contains(name)),
            "{path}: {body}"
        );
        seen.push((what.into(), body));
    }

    // The supervisor does know the key: it hands it to Activate callers (the gateway), and
    // nowhere else.
    let mut client = stack.client.clone();
    let mut events = client
        .activate(activation("tabby"))
        .await
        .expect("Activate")
        .into_inner();
    let ready = loop {
        match events.message().await.expect("Activate events") {
            Some(pb::ActivateEvent {
                event: Some(pb::activate_event::Event::Ready(ready)),
                ..
            }) => break ready,
            Some(_) => continue,
            None => panic!("Activate ended without Ready"),
        }
    };
    assert_eq!(
        ready.api_key, secrets.backend,
        "Ready carries the backend key"
    );
    let (code, stdout, stderr) = stack.ctl(&["activate", "tabby"]).await;
    assert_eq!(code, Some(0), "gpuswapctl activate: {stderr}");
    seen.push(("gpuswapctl activate".into(), stdout + &stderr));

    // What operators see.
    let status = stack.status().await;
    assert!(
        status
            .models
            .iter()
            .any(|m| m.name == "broken" && !m.last_error.is_empty()),
        "the failed start is in Status: {status:?}"
    );
    seen.push(("Status".into(), format!("{status:?}")));
    let mut lines = String::new();
    for line in testkit::log_lines(&client, "", 1000).await {
        lines.push_str(&format!("{line:?}\n"));
    }
    assert!(
        lines.contains("starting: "),
        "Logs has the start lines: {lines}"
    );
    seen.push(("Logs".into(), lines));
    let (code, stdout, stderr) = stack.ctl(&["status", "--json"]).await;
    assert_eq!(code, Some(0), "gpuswapctl status --json: {stderr}");
    assert!(stdout.contains("tabby"), "{stdout}");
    seen.push(("gpuswapctl status --json".into(), stdout + &stderr));
    let (_, stdout, stderr) = stack.ctl(&["status", "broken", "--json"]).await;
    seen.push(("gpuswapctl status broken --json".into(), stdout + &stderr));

    for (what, text) in &seen {
        secrets.assert_absent(what, text);
    }

    stack.stop_daemons();
    let watched = stack.watched.lock().unwrap().clone();
    assert!(
        watched.contains("Ready") && watched.contains("broken"),
        "Watch saw the starts: {watched}"
    );
    secrets.assert_absent("Watch", &watched);
    for name in ["supervisor.log", "gateway.log"] {
        let log = stack.read_log(name);
        assert!(log.contains("DEBUG"), "{name} has debug lines: {log}");
        secrets.assert_absent(&format!("{name} (RUST_LOG=debug)"), &log);
    }
}

/// Names that are not configured: paths, shell metacharacters, near misses.
fn hostile_names(dir: &Path) -> Vec<String> {
    let pwned = dir.join("pwned");
    let pwned = pwned.display();
    vec![
        "../tabby".into(),
        "../../../../etc/passwd".into(),
        "tabby/../tabby".into(),
        "/usr/bin/env".into(),
        "./tabby".into(),
        format!("tabby; touch {pwned}"),
        format!("$(touch {pwned})"),
        format!("`touch {pwned}`"),
        format!("tabby && touch {pwned}"),
        "tabby\n".into(),
        " tabby".into(),
        "TABBY".into(),
        "tabby\0".into(),
        "%2e%2e%2ftabby".into(),
        "*".into(),
    ]
}

/// An activation of `model` by this suite, without a hold.
fn activation(model: &str) -> pb::ActivateRequest {
    pb::ActivateRequest {
        model: model.into(),
        client: "e2e_secrets".into(),
        ..Default::default()
    }
}

/// Activates `model`: the supervisor's refusal, or the first event of the activation.
async fn first_event(
    stack: &Stack,
    model: &str,
) -> Result<Option<pb::ActivateEvent>, tonic::Status> {
    let mut client = stack.client.clone();
    match client.activate(activation(model)).await {
        Err(status) => Err(status),
        Ok(response) => response.into_inner().message().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activating_unconfigured_names_is_not_found_and_starts_nothing() {
    let stack = Stack::start("names", false).await;
    let bearer = stack.bearer();
    for name in hostile_names(stack.dir.path()) {
        let mut client = stack.client.clone();
        match first_event(&stack, &name).await {
            Err(status) => assert_eq!(
                status.code(),
                tonic::Code::NotFound,
                "Activate({name:?}): {status:?}"
            ),
            Ok(event) => panic!("Activate({name:?}) was accepted: {event:?}"),
        }
        let deactivated = client
            .deactivate(pb::DeactivateRequest {
                model: name.clone(),
                all: false,
                force: false,
                if_idle_generation: None,
                sleep: false,
            })
            .await;
        assert_eq!(
            deactivated.map_err(|s| s.code()).err(),
            Some(tonic::Code::NotFound),
            "Deactivate({name:?})"
        );
        let (status, body) = stack
            .chat(&name, false, Some(("authorization", &bearer)))
            .await;
        assert_eq!(status, 404, "chat for {name:?}: {body}");
        assert_eq!(error_code(&body), "model_not_found", "chat for {name:?}");
        // (No NUL byte fits in a command line.)
        if !name.contains('\0') {
            let (code, _, stderr) = stack.ctl(&["activate", &name]).await;
            assert_ne!(code, Some(0), "gpuswapctl activate {name:?}: {stderr}");
        }
    }
    // An empty name is refused as such.
    let empty = match first_event(&stack, "").await {
        Err(status) => status.code(),
        Ok(event) => panic!("Activate(\"\") was accepted: {event:?}"),
    };
    assert_eq!(empty, tonic::Code::InvalidArgument);

    // Nothing started: no backend process, no generation, no file from a shell.
    assert!(
        !stack.dir.path().join("pwned").exists(),
        "a model name reached a shell"
    );
    assert_eq!(
        testkit::processes_with_marker(&stack.marker),
        Vec::<u32>::new(),
        "backend processes after refused activations"
    );
    let status = stack.status().await;
    for model in &status.models {
        assert!(
            model.generation == 0 && model.state() == pb::ModelState::Stopped,
            "{} was touched: {model:?}",
            model.name
        );
    }
    let log = stack.read_log("supervisor.log");
    assert!(
        !log.contains("starting"),
        "the supervisor started something: {log}"
    );

    // The control: a configured alias does start.
    let (status, body) = stack
        .chat("tabby-alias", false, Some(("authorization", &bearer)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(!testkit::processes_with_marker(&stack.marker).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_as_an_unprivileged_user() {
    assert_eq!(
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() },
        0,
        "this test runs as root to drop the gateway's privileges"
    );
    let stack = Stack::start("unprivileged", true).await;
    let gateway_pid = stack.gateway.as_ref().expect("a gateway").pid();
    let status = testkit::proc_status(gateway_pid).expect("the gateway's status");
    assert_eq!(
        [status.ruid, status.euid, status.suid, status.fuid],
        [65534; 4],
        "the gateway runs as nobody"
    );
    assert_eq!(
        [status.rgid, status.egid, status.sgid, status.fgid],
        [65534; 4],
        "the gateway runs as nogroup"
    );
    assert!(status.groups.is_empty(), "no supplementary groups");
    assert_eq!(status.capeff, 0, "the gateway has no capabilities");

    let bearer = stack.bearer();
    for stream in [false, true] {
        let (status, body) = stack
            .chat("tabby", stream, Some(("authorization", &bearer)))
            .await;
        assert_eq!(status, 200, "stream {stream}: {body}");
        assert!(
            body.contains("[served by tabby]"),
            "stream {stream}: {body}"
        );
    }
    let (status, body) = stack
        .get("/v1/models", Some(("authorization", &bearer)))
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ready\""), "tabby is ready: {body}");
}

/// Found while writing these tests: the supervisor masks the key in its own `starting:` line,
/// but not in what the backend prints. vLLM and SGLang print their arguments, key included,
/// at start; when the start fails, those lines travel in `Failed.log_tail` to the gateway,
/// which puts them in the error body of every waiting client (and in Logs and
/// `gpuswapctl status MODEL`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_printed_by_the_backend_stays_out_of_failed_start_errors() {
    let stack = Stack::start("chatty", false).await;
    let (status, body) = stack
        .chat("chatty", false, Some(("authorization", &stack.bearer())))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_code(&body), "model_start_failed", "{body}");
    assert!(
        body.contains("server_args"),
        "the backend's line is in the tail: {body}"
    );
    stack
        .secrets
        .assert_absent("the failed start's error", &body);
}
