//! Harness of the picker's tests: real boxes (each its own supervisor, gateway on its own
//! loopback address 127.0.0.N, and mock backends), the real `gpuswap-epp` and a real Envoy
//! running `deploy/envoy/envoy.yaml`, all over real sockets.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use testkit::{DEADLINE, MockModel, Proc, StackBase};

/// One GPU box: a supervisor on a Unix socket (testkit's stack) and a gateway on `ip:port`.
pub struct GpuBox {
    pub base: StackBase,
    pub name: String,
    pub ip: String,
    pub port: u16,
    pub gateway: Option<Proc>,
    runs: usize,
}

impl std::ops::Deref for GpuBox {
    type Target = StackBase;
    fn deref(&self) -> &StackBase {
        &self.base
    }
}

impl GpuBox {
    /// Starts a box named `name` whose gateway listens on `ip` with `models` (each on its
    /// own port, GPU 0 unless told otherwise: the box's GPUs are its own).
    pub async fn start(test: &str, name: &str, ip: &str, models: Vec<MockModel>) -> GpuBox {
        Self::start_with(test, name, ip, models, |_| Vec::new()).await
    }

    /// As [`start`](Self::start), with extra `[gateway]` lines made from the gateway's
    /// `ip:port` (e.g. its etcd registration).
    pub async fn start_with(
        test: &str,
        name: &str,
        ip: &str,
        models: Vec<MockModel>,
        gateway_lines: impl Fn(&str) -> Vec<String>,
    ) -> GpuBox {
        let port = testkit::free_port();
        Self::start_configured(test, name, (ip, port), models, &[], gateway_lines).await
    }

    /// As [`start_with`](Self::start_with), with the gateway on `ip:port` (boxes on several
    /// addresses may share a port, as pods do) and extra `[supervisor]` lines.
    pub async fn start_configured(
        test: &str,
        name: &str,
        (ip, port): (&str, u16),
        models: Vec<MockModel>,
        supervisor_lines: &[&str],
        gateway_lines: impl Fn(&str) -> Vec<String>,
    ) -> GpuBox {
        let mut builder = testkit::StackBuilder::<GpuBox>::new(&format!("{test}-{name}"));
        for line in supervisor_lines {
            builder = builder.supervisor(line);
        }
        for line in gateway_lines(&format!("{ip}:{port}")) {
            builder = builder.gateway(&line);
        }
        for model in models {
            builder = builder.model(model);
        }
        let base = builder.write(200, |model, marker| model.render(marker));
        let mut gpu_box = GpuBox {
            base,
            name: name.into(),
            ip: ip.into(),
            port,
            gateway: None,
            runs: 0,
        };
        gpu_box.start_supervisor().await;
        gpu_box.start_gateway().await;
        gpu_box
    }

    pub fn gateway_addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// The requests for `model` in flight in the box's gateway (its `/health`); None while
    /// the gateway does not answer.
    pub async fn in_flight(&self, model: &str) -> Option<u64> {
        let url = format!("http://{}/health", self.gateway_addr());
        let health = testkit::http::get_json(&url).await?;
        let entry = testkit::model_entry(&health, "models", model);
        Some(entry.map_or(0, |m| m["in_flight"].as_u64().unwrap_or(0)))
    }

    pub async fn start_supervisor(&mut self) {
        self.base.start_supervisor_with("info", Proc::spawn).await;
    }

    /// Starts (or restarts) the gateway and waits until it sees its supervisor.
    pub async fn start_gateway(&mut self) {
        let log = self.base.gateway_log(self.runs);
        self.runs += 1;
        let command = self.base.gateway_command_on(&self.gateway_addr(), &log);
        self.gateway = Some(Proc::spawn(command));
        let health = format!("http://{}/health", self.gateway_addr());
        testkit::http::wait_gateway_connected(&health).await;
    }

    /// `kill -9` of the gateway.
    pub fn kill_gateway(&mut self) {
        if let Some(mut proc) = self.gateway.take() {
            proc.signal(libc::SIGKILL);
            proc.wait_exit(DEADLINE);
        }
    }

    /// Makes `model` ready on this box (through its own gateway, as a client would).
    pub async fn load(&self, model: &str) {
        let url = format!("http://{}/v1/chat/completions", self.gateway_addr());
        let answer = testkit::http::client()
            .post(&url)
            .json(&testkit::chat_body(model, false, 1))
            .send()
            .await;
        let status = answer.as_ref().map(|a| a.status().as_u16()).ok();
        assert_eq!(
            status,
            Some(200),
            "load {model} on {}: {answer:?}",
            self.name
        );
    }

    /// A streaming chat request straight to this box's gateway (another front's traffic,
    /// which the picker sees only in the gateway's metrics), read to its end.
    pub async fn stream_direct(&self, model: &str, max_tokens: u32) -> Result<String, String> {
        let url = format!("http://{}/v1/chat/completions", self.gateway_addr());
        let response = testkit::http::client()
            .post(&url)
            .json(&testkit::chat_body(model, true, max_tokens))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    }

    pub fn log_paths(&self) -> Vec<PathBuf> {
        (0..self.runs).map(|n| self.base.gateway_log(n)).collect()
    }
}

/// Envoy's config as the tests change it: a function of the file's text.
pub type EnvoyPatch = fn(String) -> String;

/// One `gpuswap-epp`.
pub struct Picker {
    pub proc: Option<Proc>,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Picker {
    pub fn start(&mut self) {
        self.proc = Some(spawn_picker(&self.config, &self.log));
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal(libc::SIGKILL);
            proc.wait_exit(DEADLINE);
        }
    }

    /// SIGTERM, and waits until it has exited.
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.signal(libc::SIGTERM);
            proc.wait_exit(DEADLINE);
        }
    }

    /// The gRPC health status of `service` (None: no answer).
    pub async fn health(&self, service: &str) -> Option<i32> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let url = format!("http://127.0.0.1:{}", self.port);
        let channel = tonic::transport::Endpoint::from_shared(url)
            .ok()?
            .connect()
            .await
            .ok()?;
        let request = HealthCheckRequest {
            service: service.into(),
        };
        let answer = HealthClient::new(channel).check(request).await.ok()?;
        Some(answer.into_inner().status)
    }
}

/// Boxes, the picker(s) and Envoy in front.
pub struct Front {
    pub boxes: Vec<GpuBox>,
    pub dir: tempfile::TempDir,
    pub pickers: Vec<Picker>,
    /// The first picker's port.
    pub picker_port: u16,
    /// Envoy runs as long as the front.
    _envoy: Proc,
    pub front_port: u16,
}

/// The Envoy binary (installed by `epp/tests/tools/make-venv.sh`, run once per machine).
pub fn envoy_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let venv = tools_venv();
        let path = std::fs::read_to_string(venv.join("envoy-path")).expect("envoy-path");
        PathBuf::from(path.trim())
    })
    .clone()
}

/// The venv of Envoy and kubernetes-validate (made on first use).
pub fn tools_venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let script = repo().join("epp/tests/tools/make-venv.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
        assert!(out.status.success(), "{} failed", script.display());
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

impl Front {
    /// Starts the picker on `boxes` (with extra `[epp]` lines) and Envoy on the deploy config
    /// changed by `patch`; waits until `/v1/models` through Envoy lists every box's models.
    pub async fn start(boxes: Vec<GpuBox>, epp_lines: &[&str], patch: EnvoyPatch) -> Front {
        let config = picker_toml(&boxes, epp_lines);
        Self::start_pickers(boxes, &[config], patch).await
    }

    /// As [`start`](Self::start), with one picker per `[epp]` text (its `listen` is added),
    /// all listed in Envoy's picker cluster.
    pub async fn start_pickers(boxes: Vec<GpuBox>, configs: &[String], patch: EnvoyPatch) -> Front {
        let dir = testkit::short_tempdir();
        let mut pickers = Vec::new();
        for (i, text) in configs.iter().enumerate() {
            let port = testkit::free_port();
            let config = dir.path().join(format!("epp{i}.toml"));
            let text = text.replacen(
                "[epp]\n",
                &format!("[epp]\nlisten = \"127.0.0.1:{port}\"\n"),
                1,
            );
            std::fs::write(&config, text).unwrap();
            let log = dir.path().join(format!("epp{i}.log"));
            let mut picker = Picker {
                proc: None,
                port,
                config,
                log,
            };
            picker.start();
            pickers.push(picker);
        }
        let front_port = testkit::free_port();
        let admin_port = testkit::free_port();
        let envoy_config = dir.path().join("envoy.yaml");
        let text = std::fs::read_to_string(repo().join("deploy/envoy/envoy.yaml")).unwrap();
        let ports: Vec<u16> = pickers.iter().map(|p| p.port).collect();
        let text = patch(envoy_ports(&text, front_port, admin_port, &ports));
        std::fs::write(&envoy_config, text).unwrap();
        let front = Front {
            boxes,
            picker_port: pickers[0].port,
            pickers,
            _envoy: spawn_envoy(&envoy_config, &dir.path().join("envoy.log")),
            dir,
            front_port,
        };
        front.wait_models_listed().await;
        front
    }

    /// Until `/v1/models` through Envoy lists a model of every box.
    pub async fn wait_models_listed(&self) {
        let expected: Vec<(String, String)> = self
            .boxes
            .iter()
            .flat_map(|b| b.models.iter().map(|m| (b.name.clone(), m.name.clone())))
            .collect();
        let url = self.url("/v1/models");
        testkit::wait_for("every box's models through Envoy", DEADLINE, || {
            let (url, expected) = (url.clone(), expected.clone());
            async move {
                let body = testkit::http::get_json(&url).await?;
                let listed = |b: &str, m: &str| {
                    body["data"].as_array().into_iter().flatten().any(|e| {
                        e["id"] == m
                            && e["gpuswap"]["boxes"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|x| x["box"] == b)
                    })
                };
                expected.iter().all(|(b, m)| listed(b, m)).then_some(())
            }
        })
        .await;
    }

    /// [`testkit::wait_for`] that shows every log when it times out.
    pub async fn wait_logged<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let wait = testkit::wait_for(what, Duration::from_secs(3600), check);
        match tokio::time::timeout(DEADLINE, wait).await {
            Ok(value) => value,
            Err(_) => panic!("timed out waiting for {what}\n{}", self.logs()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.front_port)
    }

    /// The box whose gateway served a response (Envoy's `x-gpuswap-upstream`).
    pub fn served_by(&self, response: &reqwest::Response) -> String {
        let upstream = response
            .headers()
            .get("x-gpuswap-upstream")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.boxes
            .iter()
            .find(|b| b.gateway_addr() == upstream)
            .map(|b| b.name.clone())
            .unwrap_or_else(|| format!("<none: upstream {upstream:?}>"))
    }

    /// Until the boxes' gateways together count `count` requests for `model` in flight: a
    /// test's requests have been placed and reached their backends (instead of a guessed pause).
    pub async fn wait_in_flight(&self, model: &str, count: u64) {
        let what = format!("{count} request(s) for {model} in flight");
        testkit::wait_for(&what, DEADLINE, || async {
            let mut total = 0;
            for b in &self.boxes {
                total += b.in_flight(model).await?;
            }
            (total == count).then_some(())
        })
        .await;
    }

    pub fn gpu_box(&self, name: &str) -> &GpuBox {
        self.boxes.iter().find(|b| b.name == name).expect("box")
    }

    pub fn gpu_box_mut(&mut self, name: &str) -> &mut GpuBox {
        self.boxes.iter_mut().find(|b| b.name == name).expect("box")
    }

    /// A chat request through Envoy: status, serving box, body text.
    pub async fn chat(&self, model: &str, stream: bool, max_tokens: u32) -> (u16, String, String) {
        let response = testkit::http::client()
            .post(self.url("/v1/chat/completions"))
            .json(&testkit::chat_body(model, stream, max_tokens))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST through Envoy: {e}"));
        let status = response.status().as_u16();
        let by = self.served_by(&response);
        let text = response.text().await.unwrap_or_default();
        (status, by, text)
    }

    /// A plain chat with `model` that must be answered (200): the serving box and the body.
    pub async fn chat_ok(&self, model: &str, max_tokens: u32) -> (String, String) {
        let (status, by, text) = self.chat(model, false, max_tokens).await;
        assert_eq!(status, 200, "{model}: {text}\n{}", self.logs());
        (by, text)
    }

    /// A plain chat with `model` that box `expected` must answer (200): the body.
    pub async fn assert_served_by(&self, model: &str, max_tokens: u32, expected: &str) -> String {
        let (status, by, text) = self.chat(model, false, max_tokens).await;
        assert_eq!(
            (status, by.as_str()),
            (200, expected),
            "{model}: {text}\n{}",
            self.logs()
        );
        text
    }

    /// Each `(box, model)` of `loaded` is ready there: nothing stopped it.
    pub async fn assert_ready(&self, loaded: &[(&str, &str)]) {
        let ready = gpuswap::pb::ModelState::Ready as i32;
        for &(box_name, model) in loaded {
            let state = self.gpu_box(box_name).status(model).await.state;
            assert_eq!(state, ready, "{model} on {box_name}");
        }
    }

    /// Models started on each box so far (from their supervisors' Watch).
    pub fn starts(&self) -> Vec<(String, String)> {
        self.boxes
            .iter()
            .flat_map(|b| b.starts().into_iter().map(|m| (b.name.clone(), m)))
            .collect()
    }

    /// Until the first picker's log has a line with every one of `parts`.
    pub async fn wait_picker_logged(&self, what: &str, parts: &[&str]) {
        let log = self.pickers[0].log.clone();
        self.wait_logged(what, || {
            let text = without_colors(&testkit::read_lossy(&log));
            let found = text.lines().any(|l| parts.iter().all(|p| l.contains(p)));
            async move { found.then_some(()) }
        })
        .await;
    }

    /// Every log, for assertion messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for b in &self.boxes {
            text.push_str(&format!("\n===== box {}", b.name));
            text.push_str(&b.logs_with(b.log_paths()));
        }
        let logs = self.pickers.iter().map(|p| p.log.clone());
        for path in logs.chain([self.dir.path().join("envoy.log")]) {
            let name = path.display();
            let log = testkit::read_lossy(&path);
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            text.push_str(&format!("\n--- {name} (last lines)\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

/// The `[epp]` configuration of a picker in front of `boxes` (its `listen` is added later).
pub fn picker_toml(boxes: &[GpuBox], extra: &[&str]) -> String {
    let list: Vec<String> = boxes
        .iter()
        .map(|b| {
            format!(
                "{{ name = \"{}\", gateway = \"{}\", supervisor = \"unix://{}\" }}",
                b.name,
                b.gateway_addr(),
                b.socket.display()
            )
        })
        .collect();
    let mut text = format!("[epp]\nboxes = [\n  {}\n]\n", list.join(",\n  "));
    for line in extra {
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// The deploy config's ports replaced: the front, the admin, and the pickers (one endpoint
/// each); everything on loopback.
pub fn envoy_ports(text: &str, front: u16, admin: u16, pickers: &[u16]) -> String {
    let endpoint = "        - endpoint:\n            address:\n              socket_address: { address: 127.0.0.1, port_value: 9002 }\n";
    assert!(
        text.contains(endpoint),
        "deploy/envoy/envoy.yaml changed shape"
    );
    let endpoints: String = pickers
        .iter()
        .map(|p| endpoint.replace("port_value: 9002", &format!("port_value: {p}")))
        .collect();
    let replaced = text
        .replace(endpoint, &endpoints)
        .replace("port_value: 8080", &format!("port_value: {front}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    assert!(!replaced.contains("port_value: 8080") && !replaced.contains("port_value: 9901"));
    replaced
}

pub fn spawn_envoy(config: &Path, log: &Path) -> Proc {
    let mut command = Command::new(envoy_binary());
    command
        .arg("-c")
        .arg(config)
        .args([
            "--disable-hot-restart",
            "--concurrency",
            "2",
            "-l",
            "warning",
        ])
        .arg("--log-path")
        .arg(log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn(command)
}

pub fn spawn_picker(config: &Path, log: &Path) -> Proc {
    let out = testkit::append_log(log);
    let mut command = Command::new(testkit::bin("gpuswap-epp"));
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,gpuswap_epp=debug")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    Proc::spawn(command)
}

/// A streaming chat request through Envoy, read to its end: the serving box, the arrival
/// time of each body chunk since the request, and the text (or the error that cut it).
pub async fn stream_timed(
    front: &Front,
    model: &str,
    max_tokens: u32,
) -> (String, Vec<Duration>, Result<String, String>) {
    let start = Instant::now();
    let response = testkit::http::client()
        .post(front.url("/v1/chat/completions"))
        .json(&testkit::chat_body(model, true, max_tokens))
        .send()
        .await
        .expect("streaming POST");
    let by = front.served_by(&response);
    let mut times = Vec::new();
    let mut text = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                times.push(start.elapsed());
                text.extend_from_slice(&bytes);
            }
            Err(e) => {
                return (
                    by,
                    times,
                    Err(format!("{e}: after {:?}", String::from_utf8_lossy(&text))),
                );
            }
        }
    }
    (by, times, Ok(String::from_utf8_lossy(&text).into_owned()))
}

/// A single-member etcd (Debian's `etcd-server`, which `.ci/run` installs) on loopback, its
/// data in a temporary directory.
pub struct EtcdServer {
    /// etcd runs as long as this.
    _proc: Proc,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    pub async fn start() -> EtcdServer {
        let dir = testkit::short_tempdir();
        let (client, peer) = (testkit::free_port(), testkit::free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = testkit::append_log(&dir.path().join("etcd.log"));
        let mut command = Command::new("etcd");
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--name", "test", "--listen-client-urls", &url])
            .args([
                "--advertise-client-urls",
                &url,
                "--listen-peer-urls",
                &peer_url,
            ])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let proc = Proc::spawn(command);
        let etcd = gpuswap::etcd::Etcd::connect(std::slice::from_ref(&url)).unwrap();
        testkit::wait_for("etcd to answer", DEADLINE, || {
            let etcd = etcd.clone();
            async move { etcd.list("/").await.ok().map(|_| ()) }
        })
        .await;
        EtcdServer {
            _proc: proc,
            url,
            _dir: dir,
        }
    }
}

/// `text` without its ANSI color sequences (the daemons color their logs).
pub fn without_colors(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}
