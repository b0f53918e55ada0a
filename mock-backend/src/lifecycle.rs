//! The start-up sequence of each flavor, and shutdown on SIGTERM/SIGINT.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use axum::serve::ListenerExt;
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    api,
    cli::{Args, Fault, Flavor},
    flood,
    log::{self, timestamp},
    state::{Phase, Shared},
    workers::Workers,
};

pub async fn run(args: Args) -> anyhow::Result<()> {
    let shared = Arc::new(Shared::new(args));
    if let Some(bytes) = shared.args.flood_bytes() {
        flood::start(bytes);
    }
    // Installed before anything slow, so an early SIGTERM is handled too
    // (TabbyAPI and the others exit at once during load).
    let workers = Workers::default();
    let stop = StopHandler::install(shared.clone())?;
    let workers = if shared.args.workers() > 0 {
        Workers::spawn(shared.args.workers(), shared.args.worker_escape)?
    } else {
        workers
    };
    stop.start(workers.clone());
    let startup = Startup { shared, workers };
    match startup.shared.flavor() {
        Flavor::Sglang => startup.sglang().await,
        Flavor::Vllm => startup.vllm().await,
        Flavor::LlamaServer => startup.llama_server().await,
        Flavor::Tabbyapi => startup.tabbyapi().await,
    }
}

struct Startup {
    shared: Arc<Shared>,
    workers: Workers,
}

type Server = tokio::task::JoinHandle<std::io::Result<()>>;

impl Startup {
    fn args(&self) -> &Args {
        &self.shared.args
    }

    fn fault(&self, fault: Fault) -> bool {
        self.args().has_fault(fault)
    }

    async fn sglang(self) -> anyhow::Result<()> {
        let (model, host, port) = (self.shared.model(), &self.args().host, self.args().port);
        // SGLang stamps each line, and a tensor-parallel worker's lines name it (`TP0`).
        let line = |worker: &str, text: &str| format!("[{}{worker}] {text}", timestamp());
        log::out(line(
            "",
            &format!(
                "server_args=ServerArgs(model_path='{model}', served_model_name='{model}', host='{host}', \
                 port={port}, mem_fraction_static=0.88, tp_size={}, api_key={})",
                self.args().workers().max(1),
                if self.args().api_key.is_some() {
                    "'***'"
                } else {
                    "None"
                }
            ),
        ));
        log::out(line(" TP0", "Load weight begin. avail mem=78.50 GB"));
        self.load().await;
        log::out(line(
            " TP0",
            "Load weight end. type=LlamaForCausalLM, dtype=torch.float16, avail mem=62.10 GB, mem usage=16.40 GB.",
        ));
        log::out(line(
            " TP0",
            "KV Cache is allocated. #tokens: 120000, K size: 5.00 GB, V size: 5.00 GB",
        ));
        let server = self.listen_as_uvicorn().await;
        self.warm_up().await;
        self.become_ready(&line("", "The server is fired up and ready to roll!"));
        self.serve_until_exit(server).await
    }

    async fn vllm(self) -> anyhow::Result<()> {
        let (model, host, pid) = (self.shared.model(), &self.args().host, self.shared.pid);
        // vLLM 0.32 prefixes each line with the process that wrote it (its API server, engine
        // core and worker are separate processes), stamps it `MM-DD HH:MM:SS` and names the
        // source line that logged it.
        let say = |process: &str, source: &str, text: &str| {
            let stamp = &log::timestamp()[5..];
            log::out(format!(
                "({process} pid={pid}) INFO {stamp} [{source}] {text}"
            ));
        };
        say(
            "APIServer",
            "api_utils.py:347",
            "vLLM version 0.32.0 (gpuswap mock)",
        );
        say(
            "APIServer",
            "api_utils.py:286",
            &format!("non-default args: {{'model': '{model}', 'served_model_name': ['{model}']}}"),
        );
        say(
            "EngineCore",
            "core.py:133",
            &format!("Initializing a V1 LLM engine (v0.32.0) with config: model='{model}'"),
        );
        say(
            "Worker",
            "cpu_model_runner.py:68",
            &format!("Starting to load model {model}..."),
        );
        self.load().await;
        say(
            "Worker",
            "default_loader.py:501",
            &format!(
                "Loading weights took {:.2} seconds",
                self.args().load_time.as_secs_f64()
            ),
        );
        let server = self.listen().await;
        let port = self.shared.port();
        say(
            "APIServer",
            "entry.py:140",
            &format!("Starting vLLM server on http://{host}:{port}"),
        );
        log::out(format!("INFO:     Started server process [{pid}]"));
        log::out("INFO:     Waiting for application startup.");
        self.warm_up().await;
        self.become_ready("INFO:     Application startup complete.");
        self.serve_until_exit(server).await
    }

    async fn llama_server(self) -> anyhow::Result<()> {
        let (model, host, port) = (self.shared.model(), &self.args().host, self.args().port);
        // HTTP is up while it loads, answering 503 "Loading model"; "listening on" comes only
        // once the model is loaded, as llama.cpp (llama-cpp-python 0.3.36's) prints it. The
        // loading lines are an older llama.cpp's, which the supervisor's load progress reads
        // (docs/backends.md lists the difference).
        log::out("0.00.002.282 I srv  llama_server: initializing ...");
        let server = self.listen().await;
        let port = if port == 0 { self.shared.port() } else { port };
        log::out(format!(
            "main: HTTP server is listening, hostname: {host}, port: {port}, http threads: 15"
        ));
        log::out("main: loading model");
        log::err(format!(
            "llama_model_loader: loaded meta data with 30 key-value pairs and 291 tensors from {model}.gguf (version GGUF V3 (latest))"
        ));
        log::err("load_tensors: loading model tensors, this can take a while... (mmap = true)");
        self.load().await;
        log::err("load_tensors: offloaded 33/33 layers to GPU");
        // llama.cpp prints a dot per percent of the load on one line.
        log::err(".".repeat(100));
        log::err("llama_context: constructing llama_context");
        self.warm_up().await;
        log::out("main: model loaded");
        self.become_ready(&format!(
            "0.00.237.727 I srv  llama_server: listening on http://{host}:{port}"
        ));
        log::out("srv  update_slots: all slots are idle");
        self.serve_until_exit(server).await
    }

    async fn tabbyapi(self) -> anyhow::Result<()> {
        let model = self.shared.model();
        log::out("INFO:     ExllamaV2 version: 0.3.2");
        if self.args().api_key.is_some() {
            log::out("INFO:     Your API key is: (set with --api-key)");
        }
        log::out(format!("INFO:     Loading model: /models/{model}"));
        log::out("INFO:     Loading with a max sequence length of 8192");
        // TabbyAPI never hangs in loading: a model that fails to load leaves
        // it serving with no model (/health 200, /v1/model 503).
        let never_ready = self.fault(Fault::NeverReady);
        if never_ready {
            self.load_or_exit(self.args().load_time).await;
            log::err(format!(
                "ERROR:    Model {model} failed to load; starting without a model"
            ));
        } else {
            self.load().await;
            log::out("INFO:     Model successfully loaded.");
        }
        let server = self.listen_as_uvicorn().await;
        if !never_ready {
            self.warm_up().await;
            self.become_ready(&format!("INFO:     Model {model} is ready"));
        }
        self.serve_until_exit(server).await
    }

    /// Loading the weights; `never-ready` hangs here (except where a flavor says otherwise).
    async fn load(&self) {
        if let Some(path) = &self.args().load_file {
            let path = path.clone();
            let started = std::time::Instant::now();
            let read = tokio::task::spawn_blocking(move || read_whole(&path)).await;
            match read {
                Ok(Ok(bytes)) => log::out(format!(
                    "Read {bytes} bytes of weights in {:.3} s",
                    started.elapsed().as_secs_f64()
                )),
                Ok(Err(e)) => self.exit_with(1, &format!("ERROR: reading the weights: {e}")),
                Err(e) => self.exit_with(1, &format!("ERROR: reading the weights: {e}")),
            }
        }
        match self.shared.flavor() {
            // Their safetensors loaders print a tqdm line per shard (the bar format ends in
            // a newline); vLLM's comes from its engine process, which prefixes its name.
            Flavor::Vllm | Flavor::Sglang if self.args().shards > 0 => {
                let shards = self.args().shards;
                let prefix = if self.shared.flavor() == Flavor::Vllm {
                    format!("(EngineCore_DP0 pid={}) ", self.shared.pid)
                } else {
                    String::new()
                };
                let step = self.args().load_time / shards;
                let started = std::time::Instant::now();
                for done in 0..=shards {
                    if done > 0 {
                        self.load_or_exit(step).await;
                    }
                    log::err(format!(
                        "{prefix}{}",
                        shard_bar(done, shards, started.elapsed(), step)
                    ));
                }
            }
            _ => self.load_or_exit(self.args().load_time).await,
        }
        if self.fault(Fault::NeverReady) {
            log::out("Loading is taking a long time...");
            std::future::pending::<()>().await;
        }
    }

    /// Sleeps `duration`; with `exit-during-load` dies half-way through like a CUDA OOM.
    async fn load_or_exit(&self, duration: Duration) {
        if self.fault(Fault::ExitDuringLoad) {
            tokio::time::sleep(duration / 2).await;
            log::err(
                "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. \
                 GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.",
            );
            self.exit_with(1, "Error while loading the model; exiting");
        }
        tokio::time::sleep(duration).await;
    }

    /// Warm-up: listening, health 503 (TabbyAPI: /v1/model 503).
    async fn warm_up(&self) {
        self.shared.set_phase(Phase::Warming);
        tokio::time::sleep(self.args().warmup()).await;
    }

    fn become_ready(&self, ready_line: &str) {
        self.shared.set_phase(Phase::Ready);
        crate::sleep::publish(&self.shared);
        if self.shared.flavor() == Flavor::LlamaServer {
            crate::sleep::watch_idle(self.shared.clone());
        }
        log::out(ready_line);
        if let Some(extra) = &self.args().ready_log_line {
            log::out(extra);
        }
    }

    /// Binds and serves. TabbyAPI moves to port+1 when the port is busy (with
    /// only a warning), like the real one; the others exit with an error.
    /// Starts serving, and prints what uvicorn (the server of SGLang and TabbyAPI) prints
    /// once it does.
    async fn listen_as_uvicorn(&self) -> Server {
        let server = self.listen().await;
        let (host, port, pid) = (&self.args().host, self.shared.port(), self.shared.pid);
        log::out(format!("INFO:     Started server process [{pid}]"));
        log::out("INFO:     Waiting for application startup.");
        log::out("INFO:     Application startup complete.");
        log::out(format!(
            "INFO:     Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)"
        ));
        server
    }

    async fn listen(&self) -> Server {
        let host = self.args().host.as_str();
        let port = self.args().port;
        let listener = match TcpListener::bind((host, port)).await {
            Ok(listener) => listener,
            Err(e) if self.shared.flavor() == Flavor::Tabbyapi && port < u16::MAX => {
                log::out(format!(
                    "WARNING:  Port {port} is currently in use ({e}). Switching to {}.",
                    port + 1
                ));
                match TcpListener::bind((host, port + 1)).await {
                    Ok(listener) => listener,
                    Err(e) => self.exit_with(1, &format!("ERROR:    could not bind {host}:{}: {e}", port + 1)),
                }
            }
            Err(e) => self.exit_with(
                1,
                &format!("ERROR:    [Errno 98] error while attempting to bind on address ('{host}', {port}): {e}"),
            ),
        };
        if let Ok(address) = listener.local_addr() {
            self.shared.set_port(address.port());
        }
        let router = api::router(self.shared.clone());
        // Like the real servers (uvicorn sets it): without TCP_NODELAY a
        // stream's second small write waits for the client's delayed ACK, so
        // every first token on a reused connection came ~40 ms late.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        // The peer's address: uvicorn's access lines name the client's port.
        let service = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, service).await })
    }

    async fn serve_until_exit(self, server: Server) -> anyhow::Result<()> {
        let result = server.await.context("server task")?;
        self.workers.kill_unless_escaped();
        result.context("serving HTTP")
    }

    fn exit_with(&self, code: i32, line: &str) -> ! {
        log::err(line);
        self.workers.kill_unless_escaped();
        std::process::exit(code);
    }
}

/// Reads `path` to the end (the bytes are dropped) and says how many there were.
pub(crate) fn read_whole(path: &std::path::Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    std::io::copy(&mut file, &mut std::io::sink())
}

/// One line of the shard loader's tqdm bar, in its format
/// `{desc}: {percentage:3.0f}% Completed | {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]`.
fn shard_bar(done: u32, shards: u32, elapsed: Duration, step: Duration) -> String {
    let clock = |d: Duration| format!("{:02}:{:02}", d.as_secs() / 60, d.as_secs() % 60);
    let (remaining, rate) = if done == 0 {
        ("?".to_owned(), "?it/s".to_owned())
    } else {
        let per = elapsed.as_secs_f64() / f64::from(done);
        (
            clock(Duration::from_secs_f64(per * f64::from(shards - done))),
            format!("{:5.2}s/it", step.as_secs_f64()),
        )
    };
    format!(
        "\rLoading safetensors checkpoint shards: {:3.0}% Completed | {done}/{shards} [{}<{remaining}, {rate}]",
        100.0 * f64::from(done) / f64::from(shards),
        clock(elapsed),
    )
}

/// SIGTERM/SIGINT: log, linger `--stop-delay` (still serving), kill own
/// workers, exit 0. `ignore-sigterm` logs and carries on.
struct StopHandler {
    shared: Arc<Shared>,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopHandler {
    fn install(shared: Arc<Shared>) -> anyhow::Result<Self> {
        Ok(Self {
            shared,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    fn start(mut self, workers: Workers) {
        tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    _ = self.terminate.recv() => "SIGTERM",
                    _ = self.interrupt.recv() => "SIGINT",
                };
                if self.shared.args.has_fault(Fault::IgnoreSigterm) {
                    log::out(format!(
                        "Received {name}; ignoring it (fault ignore-sigterm)"
                    ));
                    continue;
                }
                self.stop(name, &workers).await;
            }
        });
    }

    async fn stop(&self, signal_name: &str, workers: &Workers) -> ! {
        let pid = self.shared.pid;
        match self.shared.flavor() {
            Flavor::Sglang => log::out(format!(
                "[{}] Received {signal_name}, shutting down; draining requests",
                timestamp()
            )),
            Flavor::LlamaServer => log::out(format!(
                "srv    operator(): received {signal_name}, cleaning up before exit..."
            )),
            Flavor::Vllm | Flavor::Tabbyapi => {
                log::out(format!("INFO:     Received {signal_name}; Shutting down"))
            }
        }
        tokio::time::sleep(self.shared.args.stop_delay).await;
        workers.kill_unless_escaped();
        log::out(format!("INFO:     Finished server process [{pid}]"));
        std::process::exit(0);
    }
}
