//! The README's "Remote management" section, step by step, on 127.0.0.1: its configuration
//! blocks, commands and the command the supervisor logs are taken from the README (and the
//! log) as written, with only the host, port and directories put in; real TLS handshakes
//! between the real supervisor, gpuswapctl and gateway.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use testkit::{DEADLINE, MockModel, Proc};

/// The fenced blocks of the README's "Remote management" section, in order.
fn readme_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let start = readme
        .find("\n## Remote management\n")
        .expect("a Remote management section");
    let section = &readme[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut blocks = Vec::new();
    let mut open: Option<String> = None;
    for line in section.lines() {
        match (&mut open, line.starts_with("```")) {
            (None, true) => open = Some(String::new()),
            (Some(_), true) => blocks.extend(open.take()),
            (Some(block), false) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, false) => {}
        }
    }
    blocks
}

/// Which block is which (the test fails here first when the README changes shape).
struct Readme {
    made_config: String,
    logged: String,
    openssl: String,
    given_config: String,
    client: String,
    gateway_config: String,
}

fn readme() -> Readme {
    let blocks = readme_blocks();
    assert_eq!(
        blocks.len(),
        6,
        "six blocks in Remote management: {blocks:#?}"
    );
    let mut blocks = blocks.into_iter();
    // Each block in order, known by a piece of its text.
    let mut next = |marker: &str| {
        let block = blocks.next().expect("a block");
        assert!(block.contains(marker), "{marker:?} in {block}");
        block
    };
    Readme {
        made_config: next("listen = \"https://0.0.0.0:7070\""),
        logged: next("remote management: "),
        openssl: next("openssl req -x509"),
        given_config: next("tls_cert"),
        client: next("gpuswapctl"),
        gateway_config: next("[gateway]"),
    }
}

/// One machine of the walk-through: a directory, and the README's names put on it.
struct Setting {
    port: u16,
    dir: tempfile::TempDir,
}

impl Setting {
    fn new() -> Self {
        Self {
            port: testkit::free_port(),
            dir: testkit::short_tempdir(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        path
    }

    /// The README's text with this test's host, port and directories: the GPU box's
    /// `/var/lib/gpuswap` and `/etc/gpuswap` are `box/`, the client's `~/.config/gpuswap`
    /// and `/etc/gpuswap` are `client/`.
    fn on_box(&self, text: &str) -> String {
        let root = self.dir.path().display();
        text.replace("0.0.0.0:7070", &format!("127.0.0.1:{}", self.port))
            .replace("/var/lib/gpuswap/", &format!("{root}/box/"))
            .replace("/etc/gpuswap/", &format!("{root}/box/"))
    }

    fn on_client(&self, text: &str) -> String {
        let root = self.dir.path().display();
        text.replace("gpu1:7070", &format!("127.0.0.1:{}", self.port))
            .replace("~/.config/gpuswap/", &format!("{root}/client/"))
            .replace("/etc/gpuswap/", &format!("{root}/client/"))
    }

    /// The supervisor on `config` (a README block, on the box) plus its state file and
    /// `models`; its output goes to `supervisor.log`, appended on restarts.
    fn supervisor(&self, config: &str, models: &[MockModel]) -> Proc {
        let mut text = format!(
            "{}state_file = \"{}\"\nmin_residency = \"0s\"\n",
            self.on_box(config),
            self.path("box/state").display()
        );
        for model in models {
            text.push_str(&model.render(&testkit::unique_marker("remote")));
        }
        let config_path = self.path("box/gpuswap.toml");
        std::fs::write(&config_path, text).expect("config");
        let log = testkit::append_log(&self.path("supervisor.log"));
        let mut command = testkit::supervisor_command(&config_path, "info");
        command.stdout(log.try_clone().expect("log")).stderr(log);
        Proc::spawn(command)
    }

    fn log(&self) -> String {
        testkit::read_lossy(&self.path("supervisor.log"))
    }
}

/// The README's client command line (the `gpuswapctl` line of its block), on the client.
fn ctl_line(readme: &Readme, setting: &Setting) -> String {
    let line = readme
        .client
        .lines()
        .find(|l| l.starts_with("gpuswapctl "))
        .expect("a gpuswapctl line");
    setting.on_client(line)
}

#[track_caller]
fn assert_ran(out: &Output, what: &str, log: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nsupervisor log:\n{log}",
        testkit::described(out)
    );
}

async fn ctl_until_it_answers(line: &str) -> Output {
    testkit::wait_for(
        "the https supervisor to answer gpuswapctl",
        DEADLINE,
        || async {
            let out = testkit::run_ctl_line(line).await;
            out.status.success().then_some(out)
        },
    )
    .await
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Copies `names` from the box's `from` directory to the client's directory, as scp does
/// (modes kept).
fn copy_to_client(setting: &Setting, from: &str, names: &[&str]) {
    for name in names {
        let to = setting.path(&format!("client/{name}"));
        std::fs::copy(setting.path(&format!("{from}/{name}")), &to).expect("copy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_with_certificates_the_supervisor_makes() {
    let readme = readme();
    let setting = Setting::new();
    let model = MockModel::new("alpha");
    let tls_dir = setting.path("box/tls");

    // 1. An https address and nothing else: the supervisor makes what it needs and logs the
    // client's command, the one the README shows.
    let mut supervisor = setting.supervisor(&readme.made_config, std::slice::from_ref(&model));
    let prefix = readme.logged.split(": gpuswapctl").next().expect("prefix");
    let prefix = setting
        .on_box(prefix)
        .replace("7070", &setting.port.to_string());
    let logged = testkit::wait_for("the client's command in the log", DEADLINE, || async {
        let log = setting.log();
        let line = log.lines().find(|l| l.contains(&prefix))?;
        let command = line[line.find(&prefix)? + prefix.len()..].trim_start_matches(": ");
        Some(command.split('\u{1b}').next()?.trim().to_owned())
    })
    .await;
    assert_eq!(
        logged,
        format!(
            "gpuswapctl --endpoint https://127.0.0.1:{port} --ca-file {dir}/ca.pem \
             --token-file {dir}/token status",
            port = setting.port,
            dir = tls_dir.display()
        )
    );
    for (file, expected) in [
        ("ca.pem", 0o644),
        ("ca-key.pem", 0o600),
        ("server.pem", 0o644),
        ("server-key.pem", 0o600),
        ("token", 0o600),
    ] {
        assert_eq!(mode(&tls_dir.join(file)), expected, "{file}");
    }
    let out = ctl_until_it_answers(&logged).await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("gpuswap-supervisor"),
        "{out:?}"
    );

    // 3. gpuswapctl on "another machine", with copies of ca.pem and the token.
    copy_to_client(&setting, "box/tls", &["ca.pem", "token"]);
    let client_line = ctl_line(&readme, &setting);
    let out = testkit::run_ctl_line(&client_line).await;
    assert_ran(&out, &client_line, &setting.log());

    // 4. A gateway on "another host", pointed at the supervisor.
    let gateway_config = setting.path("client/gateway.toml");
    std::fs::write(&gateway_config, setting.on_client(&readme.gateway_config)).expect("config");
    let gateway_port = testkit::free_port();
    let gateway_log = setting.path("gateway.log");
    let mut gateway = Command::new(testkit::bin("gpuswap-gateway"));
    gateway
        .arg("--config")
        .arg(&gateway_config)
        .arg("--listen")
        .arg(format!("127.0.0.1:{gateway_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&gateway_log).expect("log"));
    let _gateway = Proc::spawn(gateway);
    let http = testkit::http::client();
    // Waits (`what` for) until a chat through the gateway is answered, and asserts that the
    // model answered it.
    let answered = |what: &'static str| {
        let (model, gateway_log, setting) = (&model, &gateway_log, &setting);
        async move {
            let url = format!("http://127.0.0.1:{gateway_port}/v1/chat/completions");
            let answer = testkit::wait_for(what, DEADLINE, || async {
                let body = testkit::chat_body("alpha", false, 8);
                let response = http.post(&url).json(&body).send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                response.text().await.ok()
            })
            .await;
            assert!(
                answer.contains(&model.signature()),
                "{answer}\ngateway log:\n{}\nsupervisor log:\n{}",
                testkit::read_lossy(gateway_log),
                setting.log()
            );
        }
    };
    answered("an answer through the gateway").await;

    // Later starts reuse the CA, certificate and token: the copies keep working.
    let made: Vec<Vec<u8>> = ["ca.pem", "server.pem", "token"]
        .iter()
        .map(|f| std::fs::read(tls_dir.join(f)).expect("read"))
        .collect();
    supervisor.signal(libc::SIGTERM);
    supervisor.wait_exit(DEADLINE);
    let log_before = setting.log().len();
    let mut supervisor = setting.supervisor(&readme.made_config, std::slice::from_ref(&model));
    ctl_until_it_answers(&client_line).await;
    let again: Vec<Vec<u8>> = ["ca.pem", "server.pem", "token"]
        .iter()
        .map(|f| std::fs::read(tls_dir.join(f)).expect("read"))
        .collect();
    assert!(made == again, "the second start made new files");
    let second_run = setting.log()[log_before..].to_owned();
    assert!(!second_run.contains("made "), "{second_run}");

    // Rotating the token: a reload picks it up, the old one keeps working for token_grace.
    std::fs::write(tls_dir.join("token"), "a-new-token\n").expect("token");
    let reload = client_line.replace(" status", " reload");
    assert_ran(
        &testkit::run_ctl_line(&reload).await,
        &reload,
        &setting.log(),
    );
    assert_ran(
        &testkit::run_ctl_line(&client_line).await,
        "the old token within the grace period",
        &setting.log(),
    );
    copy_to_client(&setting, "box/tls", &["token"]);
    assert_ran(
        &testkit::run_ctl_line(&client_line).await,
        "the new token",
        &setting.log(),
    );

    // The gateway follows a rotation without a restart: with no grace the old token is
    // refused at once, and the gateway's next call carries the token of its replaced copy.
    supervisor.signal(libc::SIGTERM);
    supervisor.wait_exit(DEADLINE);
    let no_grace = format!("{}token_grace = \"0s\"\n", readme.made_config);
    let _supervisor = setting.supervisor(&no_grace, std::slice::from_ref(&model));
    ctl_until_it_answers(&client_line).await;
    std::fs::write(tls_dir.join("token"), "the-third-token\n").expect("token");
    assert_ran(
        &testkit::run_ctl_line(&reload).await,
        &reload,
        &setting.log(),
    );
    let refused = testkit::run_ctl_line(&client_line).await;
    assert_eq!(refused.status.code(), Some(5), "{refused:?}");
    copy_to_client(&setting, "box/tls", &["token"]);
    // Stopping the model makes the gateway call the supervisor for the next request.
    let stop = client_line.replace(" status", " deactivate alpha --force");
    assert_ran(&testkit::run_ctl_line(&stop).await, &stop, &setting.log());
    // The gateway's connection to the restarted supervisor may still be coming back (a
    // transient 503 then): what must hold is that it gets through with the replaced token,
    // without a restart, which a gateway that read its token once never does.
    answered("an answer with the rotated token").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_with_a_certificate_made_by_openssl() {
    let readme = readme();
    let setting = Setting::new();
    // The README's openssl commands, run as written in the box's /etc/gpuswap.
    let etc = setting.path("box");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let openssl = Command::new("sh")
        .args(["-e", "-c", &readme.openssl])
        .current_dir(&etc)
        .output()
        .expect("sh");
    testkit::assert_success(&openssl, "the README's openssl commands");
    assert_eq!(mode(&etc.join("key.pem")), 0o600);
    assert_eq!(mode(&etc.join("token")), 0o600);

    let _supervisor = setting.supervisor(&readme.given_config, &[]);
    // The self-signed certificate (a CA, as openssl makes it) is the client's CA file.
    std::fs::copy(etc.join("cert.pem"), setting.path("client/ca.pem")).expect("copy");
    copy_to_client(&setting, "box", &["token"]);
    let client_line = ctl_line(&readme, &setting);
    ctl_until_it_answers(&client_line).await;
    // The supervisor made nothing: everything was given.
    assert!(!setting.path("box/tls").exists());

    // Without the CA file, the refusal says what to do.
    let without_ca = client_line.replace(
        &format!("--ca-file {}", setting.path("client/ca.pem").display()),
        "",
    );
    let out = testkit::run_ctl_line(&without_ca).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("give the CA that signed it") && stderr.contains("--ca-file"),
        "{stderr}"
    );
}
