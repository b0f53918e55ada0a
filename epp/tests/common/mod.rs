//! Harness of the picker's tests: real boxes (each its own supervisor, gateway on its own
//! loopback address 127.0.0.N, and mock backends), the real `gpuswap-epp` and a real Envoy
//! running `deploy/envoy/envoy.yaml`, all over real sockets.
#![allow(dead_code)] // each test binary uses a different part

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use serde_json::Value;
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
        let mut builder = testkit::StackBuilder::<GpuBox>::new(&format!("{test}-{name}"));
        for model in models {
            builder = builder.model(model);
        }
        let base = builder.write(200, |model, marker| model.render(marker));
        let mut gpu_box = GpuBox {
            base,
            name: name.into(),
            ip: ip.into(),
            port: testkit::free_port(),
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
        testkit::wait_for("the box gateway to see its supervisor", DEADLINE, || {
            let health = health.clone();
            async move {
                let body: Value = http().get(&health).send().await.ok()?.json().await.ok()?;
                (body["supervisor"]["connected"] == true).then_some(())
            }
        })
        .await;
    }

    /// `kill -9` of the gateway.
    pub fn kill_gateway(&mut self) {
        if let Some(mut proc) = self.gateway.take() {
            proc.signal(libc::SIGKILL);
            proc.wait_exit(DEADLINE);
        }
    }

    /// `kill -9` of the supervisor (its backends go with it).
    pub fn kill_supervisor(&mut self) {
        if let Some(mut proc) = self.base.supervisor.take() {
            proc.signal(libc::SIGKILL);
            proc.wait_exit(DEADLINE);
        }
    }

    /// Makes `model` ready on this box (through its own gateway, as a client would).
    pub async fn load(&self, model: &str) {
        let url = format!("http://{}/v1/chat/completions", self.gateway_addr());
        let answer = http()
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

    pub fn log_paths(&self) -> Vec<PathBuf> {
        (0..self.runs).map(|n| self.base.gateway_log(n)).collect()
    }
}

/// Envoy's config as the tests change it: a function of the file's text.
pub type EnvoyPatch = fn(String) -> String;

/// Boxes, the picker and Envoy in front.
pub struct Front {
    pub boxes: Vec<GpuBox>,
    pub dir: tempfile::TempDir,
    pub picker: Option<Proc>,
    pub picker_port: u16,
    picker_config: PathBuf,
    pub envoy: Proc,
    pub front_port: u16,
    pub admin_port: u16,
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

/// One shared client: no proxy, connections kept.
pub fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(128)
            .build()
            .expect("http client")
    })
}

impl Front {
    /// Starts the picker on `boxes` (with extra `[epp]` lines) and Envoy on the deploy config
    /// changed by `patch`; waits until `/v1/models` through Envoy lists every box's models.
    pub async fn start(boxes: Vec<GpuBox>, epp_lines: &[&str], patch: EnvoyPatch) -> Front {
        let dir = testkit::short_tempdir();
        let picker_port = testkit::free_port();
        let picker_config = dir.path().join("epp.toml");
        std::fs::write(&picker_config, picker_toml(picker_port, &boxes, epp_lines)).unwrap();
        let front_port = testkit::free_port();
        let admin_port = testkit::free_port();
        let envoy_config = dir.path().join("envoy.yaml");
        let text = std::fs::read_to_string(repo().join("deploy/envoy/envoy.yaml")).unwrap();
        let text = patch(envoy_ports(&text, front_port, admin_port, &[picker_port]));
        std::fs::write(&envoy_config, text).unwrap();
        let mut front = Front {
            boxes,
            picker: None,
            picker_port,
            picker_config,
            envoy: spawn_envoy(&envoy_config, &dir.path().join("envoy.log")),
            dir,
            front_port,
            admin_port,
        };
        front.start_picker().await;
        front.wait_models_listed().await;
        front
    }

    pub async fn start_picker(&mut self) {
        self.picker = Some(spawn_picker(
            &self.picker_config,
            &self.dir.path().join("epp.log"),
        ));
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
                let body: Value = http().get(&url).send().await.ok()?.json().await.ok()?;
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

    pub fn gpu_box(&self, name: &str) -> &GpuBox {
        self.boxes.iter().find(|b| b.name == name).expect("box")
    }

    pub fn gpu_box_mut(&mut self, name: &str) -> &mut GpuBox {
        self.boxes.iter_mut().find(|b| b.name == name).expect("box")
    }

    /// A chat request through Envoy: status, serving box, body text.
    pub async fn chat(&self, model: &str, stream: bool, max_tokens: u32) -> (u16, String, String) {
        let response = http()
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

    /// Models started on each box so far (from their supervisors' Watch).
    pub fn starts(&self) -> Vec<(String, String)> {
        self.boxes
            .iter()
            .flat_map(|b| b.starts().into_iter().map(|m| (b.name.clone(), m)))
            .collect()
    }

    /// Every log, for assertion messages.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for b in &self.boxes {
            text.push_str(&format!("\n===== box {}", b.name));
            text.push_str(&b.logs_with(b.log_paths()));
        }
        for name in ["epp.log", "envoy.log"] {
            let log = testkit::read_lossy(&self.dir.path().join(name));
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

/// The `[epp]` configuration of a picker on `port` in front of `boxes`.
pub fn picker_toml(port: u16, boxes: &[GpuBox], extra: &[&str]) -> String {
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
    let mut text = format!(
        "[epp]\nlisten = \"127.0.0.1:{port}\"\nboxes = [\n  {}\n]\n",
        list.join(",\n  ")
    );
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
    let response = http()
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
