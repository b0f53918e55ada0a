//! A real model swapper as a peer: llama.cpp's `llama-server` in router mode
//! (`--models-dir DIR --models-max 1`), which starts a child `llama-server` per
//! loaded model and swaps on a request's `model`, against gpuswap with the same
//! two GGUF files as two `llama-server` models on one GPU.
//!
//! Swap time: alternating requests (A B A B ...), each streamed, from sending the
//! request to the first generated text; for gpuswap also the overhead beyond the
//! backend's own readiness (as in the swap section). Proxy overhead: small chats to
//! the loaded model through each, against a llama-server on the same file alone.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::{
    Plan,
    gpuswap::Gpuswap,
    procs::{self, Proc, free_port, http_get},
};
use crate::{
    load::{self, LoadReport, LoadSpec},
    swap::{self, SwapSample},
};

/// The two models, as named in gpuswap's catalog and (file stems) by the router.
pub const ROUTER_MODELS: [&str; 2] = ["router-a", "router-b"];

/// Where llama-server and the two GGUF files are (`--llama-server`, `--router-models`).
#[derive(Debug, Clone)]
pub struct RouterSetup {
    pub llama_server: PathBuf,
    pub models: [PathBuf; 2],
}

impl RouterSetup {
    pub fn new(llama_server: &Option<PathBuf>, models: &[PathBuf]) -> Result<Option<Self>> {
        match (llama_server, models) {
            (None, []) => Ok(None),
            (Some(bin), [a, b]) => {
                for path in [bin, a, b] {
                    if !path.exists() {
                        bail!("{} does not exist", path.display());
                    }
                }
                // Absolute: the router's directory links to them from elsewhere, and the
                // supervisor runs its backends in a directory of its own.
                Ok(Some(Self {
                    llama_server: std::path::absolute(bin)?,
                    models: [std::path::absolute(a)?, std::path::absolute(b)?],
                }))
            }
            _ => bail!("--llama-server and --router-models (two GGUF files) go together"),
        }
    }

    /// `llama-server` serving `model` alone on `port` (gpuswap's command, and the baseline).
    pub fn server_command(&self, model: usize, port: u16) -> Vec<String> {
        let mut command = vec![self.llama_server.display().to_string()];
        command.extend(
            [
                "-m",
                &self.models[model].display().to_string(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--alias",
                ROUTER_MODELS[model],
            ]
            .map(str::to_owned),
        );
        command.extend(SERVER_ARGS.iter().map(|a| a.to_string()));
        command
    }
}

/// The same context and threads everywhere (the router passes its own to its children).
const SERVER_ARGS: [&str; 2] = ["-c", "512"];

/// One swap through the router: request to first generated text.
#[derive(Debug, Clone, Serialize)]
pub struct RouterSwap {
    pub model: String,
    pub first_text_ms: f64,
    pub headers_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouterLatency {
    pub target: &'static str,
    pub report: LoadReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouterReport {
    pub model_bytes: Vec<u64>,
    pub llama_server_version: String,
    pub gpuswap_swaps: Vec<SwapSample>,
    pub router_swaps: Vec<RouterSwap>,
    pub latency: Vec<RouterLatency>,
}

/// A started router: its process and the id it gives each of [`ROUTER_MODELS`].
struct Router {
    proc: Proc,
    port: u16,
    ids: [String; 2],
}

async fn start_router(setup: &RouterSetup, work: &Path, logs: &Path) -> Result<Router> {
    // The router lists every GGUF of its directory under the file's stem.
    let dir = work.join("router-models");
    std::fs::create_dir_all(&dir)?;
    for (path, name) in setup.models.iter().zip(ROUTER_MODELS) {
        let link = dir.join(format!("{name}.gguf"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(path, &link).context("link a model into the router's dir")?;
    }
    let port = free_port()?;
    let mut command = vec![
        setup.llama_server.display().to_string(),
        "--models-dir".into(),
        dir.display().to_string(),
        "--models-max".into(),
        "1".into(),
        "--host".into(),
        "127.0.0.1".into(),
        "--port".into(),
        port.to_string(),
    ];
    command.extend(SERVER_ARGS.iter().map(|a| a.to_string()));
    let mut proc = procs::spawn("llama-router", &command, &[], logs)?;
    procs::wait_answering(
        "the llama-server router listing its models",
        &mut proc,
        Duration::from_secs(60),
        port,
        "/v1/models",
    )
    .await?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let (_, listing) = http_get(addr, "/v1/models", None)
        .await
        .context("the router's /v1/models")?;
    let models: serde_json::Value = serde_json::from_str(&listing).context("router /v1/models")?;
    let id_of = |name: &str| -> Result<String> {
        models["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .find(|id| id.contains(name))
            .map(str::to_owned)
            .with_context(|| format!("the router does not list {name}: {listing}"))
    };
    Ok(Router {
        proc,
        port,
        ids: [id_of(ROUTER_MODELS[0])?, id_of(ROUTER_MODELS[1])?],
    })
}

fn chat_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/v1/chat/completions")
}

pub async fn section(
    plan: &Plan,
    setup: &RouterSetup,
    g: &Gpuswap,
    work: &Path,
    logs: &Path,
) -> Result<RouterReport> {
    let mut router = start_router(setup, work, logs).await?;
    let router_url = chat_url(router.port);
    let mut report = RouterReport {
        model_bytes: setup
            .models
            .iter()
            .map(|m| std::fs::metadata(m).map_or(0, |m| m.len()))
            .collect(),
        llama_server_version: llama_server_version(&setup.llama_server),
        gpuswap_swaps: Vec::new(),
        router_swaps: Vec::new(),
        latency: Vec::new(),
    };
    let timeout = Duration::from_secs(300);
    // The first request of each is a start from nothing, measured the same way; then each
    // request names the model that is not loaded. Interleaved, so both see the same machine.
    let swaps = plan.router_swaps;
    let outcome: Result<()> = async {
        for i in 0..=swaps {
            let which = i % 2;
            let name = ROUTER_MODELS[which];
            eprintln!("bench: router peer: swap to {name} through gpuswap, then the router");
            let probe = g
                .model(name)
                .context("gpuswap has no router model")?
                .probe();
            let sample = swap::measure(&g.url(), name, name, None, probe, timeout)
                .await
                .with_context(|| format!("gpuswap swap to {name}"))?;
            report.gpuswap_swaps.push(sample);
            let streamed = swap::stream_once(&router_url, &router.ids[which], None, timeout)
                .await
                .with_context(|| format!("router swap to {name}"))?;
            report.router_swaps.push(RouterSwap {
                model: name.into(),
                first_text_ms: swap::signed_ms(streamed.first_text, streamed.started),
                headers_ms: streamed.headers.as_secs_f64() * 1000.0,
            });
        }
        // Both now hold the same model: small chats to it through each, and to a
        // llama-server of the same file alone.
        let loaded = swaps % 2;
        let direct_port = free_port()?;
        let mut direct = procs::spawn(
            "llama-direct",
            &setup.server_command(loaded, direct_port),
            &[],
            logs,
        )?;
        procs::wait_answering(
            "llama-server alone ready",
            &mut direct,
            Duration::from_secs(120),
            direct_port,
            "/health",
        )
        .await?;
        let targets = [
            (
                "direct",
                chat_url(direct_port),
                ROUTER_MODELS[loaded].to_owned(),
            ),
            ("gpuswap", g.url(), ROUTER_MODELS[loaded].to_owned()),
            ("router", router_url.clone(), router.ids[loaded].clone()),
        ];
        for (target, url, model) in targets {
            eprintln!("bench: router peer: small chats via {target}");
            let spec = LoadSpec {
                url,
                model,
                stream: false,
                max_tokens: 2,
                concurrency: 1,
                duration: None,
                requests: Some(plan.router_requests),
                grace: Duration::from_secs(120),
                bearer: None,
                watch: Vec::new(),
            };
            let load = load::run(spec).await?;
            if load.requests_ok == 0 {
                bail!("no chat via {target} succeeded: {:?}", load.error_samples);
            }
            report.latency.push(RouterLatency {
                target,
                report: load,
            });
        }
        direct.stop(Duration::from_secs(10)).await;
        Ok(())
    }
    .await;
    router.proc.stop(Duration::from_secs(10)).await;
    outcome.map(|()| report)
}

fn llama_server_version(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .find(|l| l.starts_with("version"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}
