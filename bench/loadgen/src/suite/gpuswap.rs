//! gpuswap under test: a supervisor and a gateway on a bench configuration
//! whose models are mock backends.
//!
//! GPU layout of the bench config (no GPU is needed: the numbers only decide
//! which models conflict):
//! - 0: `bench` (no token delay), 1: `bench-paced` (25 tokens/s), 2: `scale-slow`:
//!   the load and scale measurements; they never conflict, so they stay loaded.
//! - 3: two models per swap flavor (`swap-<flavor>-a`/`-b`), all conflicting.
//! - 4: the stop cases, 5: the log flood.
//! - 6: the router race's two real llama-server models (`router-a`/`-b`), when it runs.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;

use super::procs::{self, Proc, free_port, http_get};
use crate::{stop, swap::ReadyProbe};

/// Which readiness the swap models imitate.
#[derive(Debug, Clone, Copy)]
pub struct Flavor {
    pub flavor: &'static str,
    pub health_path: &'static str,
    pub api_key: Option<&'static str>,
}

pub const SWAP_FLAVORS: [Flavor; 3] = [
    Flavor {
        flavor: "sglang",
        health_path: "/health",
        api_key: None,
    },
    Flavor {
        flavor: "tabbyapi",
        health_path: "/v1/model",
        api_key: Some("bench-tabby-key"),
    },
    Flavor {
        flavor: "llama-server",
        health_path: "/health",
        api_key: None,
    },
];

/// A stop case: a model and the mock arguments that make it behave that way.
#[derive(Debug, Clone)]
pub struct StopCase {
    pub model: &'static str,
    pub title: &'static str,
    pub flavor: &'static str,
    pub extra: &'static [&'static str],
    pub stop_timeout: Duration,
}

pub fn stop_cases() -> Vec<StopCase> {
    vec![
        StopCase {
            model: "stop-prompt",
            title: "a backend that exits promptly on SIGTERM (vllm-like)",
            flavor: "vllm",
            extra: &[],
            stop_timeout: Duration::from_secs(5),
        },
        StopCase {
            model: "stop-tree",
            title: "a backend with worker grandchildren (sglang-like, 2 workers)",
            flavor: "sglang",
            extra: &["--workers", "2"],
            stop_timeout: Duration::from_secs(5),
        },
        StopCase {
            model: "stop-stubborn",
            title: "a backend that ignores SIGTERM (stop_timeout 1s)",
            flavor: "vllm",
            extra: &["--fault", "ignore-sigterm"],
            stop_timeout: Duration::from_secs(1),
        },
    ]
}

pub struct Settings<'a> {
    pub bin_dir: &'a Path,
    pub swap_load_time: Duration,
    pub scale_tokens_per_second: f64,
    pub flood_bytes: u64,
    /// The router race's two real llama-server models (GPU 6), when it runs.
    pub router: Option<&'a super::router::RouterSetup>,
}

/// One configured mock model.
#[derive(Debug, Clone)]
pub struct Model {
    pub id: String,
    pub kind: String,
    pub port: u16,
    pub gpu: u32,
    pub command: Vec<String>,
    pub api_key: Option<String>,
    pub stop_timeout: Duration,
    pub health_path: String,
}

impl Model {
    pub fn probe(&self) -> ReadyProbe {
        ReadyProbe {
            addr: ([127, 0, 0, 1], self.port).into(),
            path: self.health_path.clone(),
            headers: self
                .api_key
                .iter()
                .map(|k| format!("Authorization: Bearer {k}"))
                .collect(),
        }
    }
}

pub fn mock_command(
    bin_dir: &Path,
    flavor: &str,
    port: u16,
    model: &str,
    load_time: Duration,
    tokens_per_second: f64,
    extra: &[&str],
) -> Vec<String> {
    let mut command = vec![
        bin_dir.join("gpuswap-mock-backend").display().to_string(),
        "--flavor".into(),
        flavor.into(),
        "--port".into(),
        port.to_string(),
        "--model".into(),
        model.into(),
        "--load-time".into(),
        humantime::format_duration(load_time).to_string(),
        "--tokens-per-second".into(),
        tokens_per_second.to_string(),
    ];
    command.extend(extra.iter().map(|s| s.to_string()));
    command
}

/// What differs between the bench's mock models.
struct MockSpec<'a> {
    id: &'a str,
    flavor: &'a str,
    gpu: u32,
    load_time: Duration,
    tokens_per_second: f64,
    extra: &'a [&'a str],
    api_key: Option<&'a str>,
    stop_timeout: Duration,
    health_path: &'a str,
}

impl MockSpec<'_> {
    /// A vLLM-like model that loads at once and streams without delay.
    fn vllm(id: &str, gpu: u32) -> MockSpec<'_> {
        MockSpec {
            id,
            flavor: "vllm",
            gpu,
            load_time: Duration::ZERO,
            tokens_per_second: 0.0,
            extra: &[],
            api_key: None,
            stop_timeout: Duration::from_secs(5),
            health_path: "/health",
        }
    }

    fn build(&self, bin_dir: &Path) -> Result<Model> {
        let port = free_port()?;
        let mut command = mock_command(
            bin_dir,
            self.flavor,
            port,
            self.id,
            self.load_time,
            self.tokens_per_second,
            self.extra,
        );
        if let Some(key) = self.api_key {
            command.extend(["--api-key".into(), key.into()]);
        }
        Ok(Model {
            id: self.id.into(),
            // The mock's flavors are named like the supervisor's kinds.
            kind: self.flavor.into(),
            port,
            gpu: self.gpu,
            command,
            api_key: self.api_key.map(str::to_owned),
            stop_timeout: self.stop_timeout,
            health_path: self.health_path.into(),
        })
    }
}

pub fn bench_models(settings: &Settings) -> Result<Vec<Model>> {
    let bin = settings.bin_dir;
    let mut models = vec![
        MockSpec::vllm("bench", 0).build(bin)?,
        MockSpec {
            tokens_per_second: 25.0,
            ..MockSpec::vllm("bench-paced", 1)
        }
        .build(bin)?,
        MockSpec {
            tokens_per_second: settings.scale_tokens_per_second,
            ..MockSpec::vllm("scale-slow", 2)
        }
        .build(bin)?,
    ];
    for f in SWAP_FLAVORS {
        for side in ["a", "b"] {
            let id = format!("swap-{}-{side}", f.flavor);
            models.push(
                MockSpec {
                    flavor: f.flavor,
                    load_time: settings.swap_load_time,
                    api_key: f.api_key,
                    health_path: f.health_path,
                    ..MockSpec::vllm(&id, 3)
                }
                .build(bin)?,
            );
        }
    }
    for case in stop_cases() {
        models.push(
            MockSpec {
                flavor: case.flavor,
                extra: case.extra,
                stop_timeout: case.stop_timeout,
                ..MockSpec::vllm(case.model, 4)
            }
            .build(bin)?,
        );
    }
    let flood = format!("flood:{}", settings.flood_bytes);
    let flood_args = ["--fault", flood.as_str()];
    models.push(
        MockSpec {
            extra: &flood_args,
            ..MockSpec::vllm("flood", 5)
        }
        .build(bin)?,
    );
    if let Some(router) = settings.router {
        for (i, id) in super::router::ROUTER_MODELS.iter().enumerate() {
            let port = free_port()?;
            models.push(Model {
                id: (*id).into(),
                kind: "llama-server".into(),
                port,
                gpu: 6,
                command: router.server_command(i, port),
                api_key: None,
                stop_timeout: Duration::from_secs(10),
                health_path: "/health".into(),
            });
        }
    }
    Ok(models)
}

fn toml_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

pub struct Endpoints {
    pub supervisor: String,
    pub gateway_port: u16,
}

pub fn config_text(models: &[Model], dir: &Path) -> Result<(String, Endpoints)> {
    let socket = format!("unix://{}", dir.join("supervisor.sock").display());
    let gateway_port = free_port()?;
    let mut text = format!(
        "[supervisor]\nlisten = {sock}\nstate_file = {state}\ndrain_timeout = \"5s\"\n\
         min_residency = \"0s\"\n\n[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\n\
         supervisor = {sock}\nqueue_timeout = \"2m\"\nidle_ttl = \"0s\"\n\
         upstream_idle_timeout = \"300s\"\n",
        sock = toml_string(&socket),
        state = toml_string(&dir.join("supervisor.state").display().to_string()),
    );
    for m in models {
        let command: Vec<String> = m.command.iter().map(|c| toml_string(c)).collect();
        write!(
            text,
            "\n[models.{id}]\nkind = \"{kind}\"\ncommand = [{command}]\nport = {port}\n\
             gpus = [{gpu}]\nstartup_timeout = \"60s\"\nstop_timeout = \"{stop}\"\n",
            id = toml_string(&m.id),
            kind = m.kind,
            command = command.join(", "),
            port = m.port,
            gpu = m.gpu,
            stop = humantime::format_duration(m.stop_timeout),
        )?;
        if let Some(key) = &m.api_key {
            writeln!(text, "api_key = {}", toml_string(key))?;
        }
    }
    Ok((
        text,
        Endpoints {
            supervisor: socket,
            gateway_port,
        },
    ))
}

pub struct Gpuswap {
    pub supervisor: Proc,
    pub gateway: Proc,
    pub endpoints: Endpoints,
    pub models: Vec<Model>,
}

impl Gpuswap {
    pub fn model(&self, id: &str) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    pub fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            self.endpoints.gateway_port
        )
    }
}

/// Starts the supervisor and the gateway and waits until the gateway lists the models.
pub async fn start(settings: &Settings<'_>, dir: &Path, logs: &Path) -> Result<Gpuswap> {
    let models = bench_models(settings)?;
    let (text, endpoints) = config_text(&models, dir)?;
    let config = dir.join("gpuswap.toml");
    std::fs::write(&config, text)?;
    let config_arg = config.display().to_string();
    // Per-request logging would cost the gateway what nginx's access_log off saves it.
    let env = [("RUST_LOG".to_owned(), "warn".to_owned())];
    let mut supervisor = procs::spawn(
        "supervisor",
        &[
            settings
                .bin_dir
                .join("gpuswap-supervisor")
                .display()
                .to_string(),
            "--config".into(),
            config_arg.clone(),
        ],
        &env,
        logs,
    )?;
    let client = stop::client(&endpoints.supervisor)?;
    procs::wait_until(
        "the supervisor answering Status",
        &mut supervisor,
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            async move { client.status(gpuswap::pb::StatusRequest {}).await.is_ok() }
        },
    )
    .await?;
    let mut gateway = procs::spawn(
        "gateway",
        &[
            settings
                .bin_dir
                .join("gpuswap-gateway")
                .display()
                .to_string(),
            "--config".into(),
            config_arg,
        ],
        &env,
        logs,
    )?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], endpoints.gateway_port));
    procs::wait_until(
        "the gateway listing the bench models in /v1/models",
        &mut gateway,
        Duration::from_secs(30),
        || async move {
            matches!(http_get(addr, "/v1/models", None).await,
                     Some((200, body)) if body.contains("\"bench-paced\""))
        },
    )
    .await?;
    Ok(Gpuswap {
        supervisor,
        gateway,
        endpoints,
        models,
    })
}

pub async fn stop_all(g: &mut Gpuswap) {
    g.gateway.stop(Duration::from_secs(5)).await;
    // The supervisor stops its backends on SIGTERM.
    g.supervisor.stop(Duration::from_secs(15)).await;
}
