//! The status page in a real browser: headless Chromium (Debian's `chromium`) driven over
//! WebDriver (Debian's `chromium-driver`) by a small client below.
//!
//! Without chromedriver the test fails (CI installs it); `GPUSWAP_SKIP_BROWSER=1` skips it
//! on a machine without a browser. `GPUSWAP_UI_SCREENSHOT=PATH` saves a screenshot of the
//! page with a model ready, the GPUs' memory and its log shown (docs/status-page.png is one).

use std::{path::Path, process::Command, time::Duration};

use crate::common::{Model, Stack};
use base64::Engine as _;
use serde_json::{Value, json};
use testkit::{DEADLINE, Proc};

/// One WebDriver session on a chromedriver of its own.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
    _driver: Proc,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let driver_bin = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect(
                "chromedriver is not installed (Debian: apt-get install chromium chromium-driver); \
                 GPUSWAP_SKIP_BROWSER=1 skips this test",
            );
        let port = testkit::free_port();
        let mut command = Command::new(driver_bin);
        command
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let driver = Proc::spawn(command);
        let base = format!("http://127.0.0.1:{port}");
        let http = testkit::http::client().clone();
        testkit::wait_for("chromedriver to answer", DEADLINE, || {
            let url = format!("{base}/status");
            async move {
                let body = testkit::http::get_json(&url).await?;
                (body["value"]["ready"] == true).then_some(())
            }
        })
        .await;
        let profile = testkit::short_tempdir();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1400,900",
            &format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut options = json!({ "args": args });
        if Path::new("/usr/bin/chromium").exists() {
            options["binary"] = json!("/usr/bin/chromium");
        }
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        }}});
        let response: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .timeout(DEADLINE)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("new session answer");
        let session = response["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {response}"));
        Browser {
            session: format!("{base}/session/{session}"),
            http,
            _profile: profile,
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.session))
            .timeout(DEADLINE);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {path}: {e}"))
            .json()
            .await
            .expect("webdriver answer");
        if answer["value"]["error"].is_string() {
            panic!("webdriver {path}: {answer}");
        }
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    async fn run(&self, script: &str) -> Value {
        let body = json!({ "script": script, "args": [] });
        self.call(reqwest::Method::POST, "/execute/sync", Some(body))
            .await
    }

    async fn click(&self, selector: &str) {
        let found = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": selector })),
            )
            .await;
        let id = found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {selector}: {found}"));
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Clicks the button of class `button` (load, unload, sleep, logs) in the row of `model`.
    async fn click_in_row(&self, model: &str, button: &str) {
        self.click(&format!("tr[data-model=\"{model}\"] button.{button}"))
            .await;
    }

    /// Waits until the row of `model` shows the state `want`.
    async fn wait_state(&self, model: &str, want: &str) {
        self.wait(&format!("{model} {want}"), &state_is(model, want))
            .await;
    }

    /// Polls `script` until it returns something other than null or false.
    async fn wait(&self, what: &str, script: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let value = self.run(script).await;
            if !value.is_null() && value != false {
                return value;
            }
            if tokio::time::Instant::now() > deadline {
                let page = self.run("return document.body.innerText").await;
                panic!(
                    "the page never showed {what}; it shows:\n{}",
                    page.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&self, path: &Path) {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 png"))
            .expect("png");
        std::fs::write(path, bytes).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends Chromium through its driver; the driver's process group goes with `_driver`.
        let session = self.session.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                // A client of its own: the shared one's connection to the driver is served
                // by the test's runtime, which waits on this thread.
                runtime.block_on(async {
                    let _ = testkit::http::new_client()
                        .delete(session)
                        .timeout(Duration::from_secs(10))
                        .send()
                        .await;
                });
            }
        })
        .join();
    }
}

/// True once the log view shows `text`.
fn log_shows(text: &str) -> String {
    format!("return document.getElementById('log').textContent.includes('{text}')")
}

fn state_is(model: &str, want: &str) -> String {
    format!(
        "const s = document.querySelector('tr[data-model=\"{model}\"] .state'); \
         return !!s && s.textContent === '{want}'"
    )
}

fn state_of(model: &str) -> String {
    format!(
        "const s = document.querySelector('tr[data-model=\"{model}\"] .state'); return s && s.textContent"
    )
}

/// A script that returns null until the GPU `index` row shows `want` (total, reserved by
/// models, models on it) and a free figure of total less reserved when there is no NVML
/// (with NVML, the real use counts too); then true.
fn gpu_row_is(index: u32, total: &str, reserved: &str, free: &str, models: &str) -> String {
    format!(
        "const r = document.querySelector('#gpus tr[data-gpu=\"{index}\"]'); \
         if (!r) return null; \
         const cell = (c) => r.querySelector('.' + c).textContent; \
         const freeOk = cell('used') !== 'no NVML' || cell('free') === '{free}'; \
         return cell('total') === '{total}' && cell('reserved') === '{reserved}' \
           && cell('models') === '{models}' && freeOk"
    )
}

fn memory_of(model: &str) -> String {
    format!(
        "const c = document.querySelector('tr[data-model=\"{model}\"] .memory'); \
         return c && [c.firstChild.textContent, !!c.querySelector('.pinned')]"
    )
}

/// True (and said) when GPUSWAP_SKIP_BROWSER asks to skip the browser tests.
fn browser_skipped() -> bool {
    let skipped = std::env::var_os("GPUSWAP_SKIP_BROWSER").is_some();
    if skipped {
        eprintln!("GPUSWAP_SKIP_BROWSER is set: the browser test is skipped");
    }
    skipped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_loads_follows_and_unloads_a_model_live() {
    if browser_skipped() {
        return;
    }
    let stack = Stack::builder("ui")
        // Two GPUs of known size: the page shows their memory before any model runs.
        .supervisor(r#"gpu_memory = { "0" = "96GiB", "1" = "48GiB" }"#)
        .model(
            Model::new("llama-70b")
                .alias("llama")
                .load_time("2s")
                .toml(r#"vram = "70GiB""#),
        )
        .model(
            Model::new("qwen-32b")
                .alias("qwen")
                .toml(r#"vram = "32GiB""#)
                .toml("pinned = true"),
        )
        .model(Model::new("mistral-small").gpus(&[1]))
        .start()
        .await;
    let browser = Browser::start().await;
    browser.open(&stack.url("/ui/")).await;
    for model in ["llama-70b", "qwen-32b", "mistral-small"] {
        let state = browser
            .wait(&format!("{model}'s row"), &state_of(model))
            .await;
        assert_eq!(state, "stopped", "{model}");
    }
    for (model, memory) in [
        ("llama-70b", json!(["70 GiB", false])),
        ("qwen-32b", json!(["32 GiB", true])),
        ("mistral-small", json!(["whole GPU", false])),
    ] {
        assert_eq!(browser.run(&memory_of(model)).await, memory, "{model}");
    }
    browser
        .wait(
            "GPU 0's memory, all free",
            &gpu_row_is(0, "96 GiB", "0 GiB", "96 GiB", ""),
        )
        .await;
    browser
        .wait(
            "GPU 1's memory, all free",
            &gpu_row_is(1, "48 GiB", "0 GiB", "48 GiB", ""),
        )
        .await;
    // Set in the page: still there at the end proves the page never reloaded.
    browser
        .run("window.gpuswapTestMarker = 42; return true")
        .await;

    browser.click_in_row("llama-70b", "load").await;
    let progress = browser
        .wait(
            "llama-70b loading with its progress",
            "const row = document.querySelector('tr[data-model=\"llama-70b\"]'); \
             const p = row.querySelector('.progress'); \
             return row.querySelector('.state').textContent === 'starting' && p && p.textContent",
        )
        .await;
    assert!(
        !progress.as_str().unwrap().is_empty(),
        "an empty progress line"
    );
    browser.wait_state("llama-70b", "ready").await;
    browser
        .wait(
            "GPU 0 with llama-70b's 70 GiB reserved",
            &gpu_row_is(0, "96 GiB", "70 GiB", "26 GiB", "llama-70b"),
        )
        .await;

    browser.click_in_row("llama-70b", "logs").await;
    browser
        .wait(
            "the backend's startup line in the log view",
            &log_shows("startup complete"),
        )
        .await;
    // Followed live: a line the backend prints now appears without any click.
    stack.chat_ok("llama", 3).await;
    browser
        .wait(
            "the chat's access line in the log view",
            &log_shows("POST /v1/chat/completions"),
        )
        .await;
    if let Some(path) = std::env::var_os("GPUSWAP_UI_SCREENSHOT") {
        browser.screenshot(Path::new(&path)).await;
    }

    browser.click_in_row("llama-70b", "unload").await;
    browser.wait_state("llama-70b", "stopped").await;
    browser
        .wait(
            "GPU 0's memory free again",
            &gpu_row_is(0, "96 GiB", "0 GiB", "96 GiB", ""),
        )
        .await;
    assert_eq!(browser.run("return window.gpuswapTestMarker").await, 42);
    assert_eq!(stack.starts(), ["llama-70b"]);
}

/// A vLLM mock of 70 GiB (two do not fit on one 96 GiB GPU) that sleeps with vLLM's protocol.
fn sleeper(name: &str) -> Model {
    Model::new(name)
        .load_time("1s")
        .args(&["--enable-sleep-mode"])
        .env("VLLM_SERVER_DEV_MODE", "1")
        .toml(r#"vram = "70GiB""#)
        .toml("sleep = true")
        .toml(r#"host_memory = "2GiB""#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_sleeping_model_and_unloads_it() {
    if browser_skipped() {
        return;
    }
    let stack = Stack::builder("ui-sleep")
        .supervisor(r#"gpu_memory = "96GiB""#)
        .model(sleeper("vllm-a"))
        .model(sleeper("vllm-b"))
        .start()
        .await;
    let browser = Browser::start().await;
    browser.open(&stack.url("/ui/")).await;
    browser.wait_state("vllm-a", "stopped").await;
    // b needs the GPU that a holds: a goes to sleep rather than stopping.
    for model in ["vllm-a", "vllm-b"] {
        stack.chat_ok(model, 2).await;
    }
    browser.wait_state("vllm-a", "sleeping").await;
    // llama-server's router calls it sleeping too (OpenWebUI counts that as loaded, with an
    // eject button), and a sleeping process is running: not loaded again.
    let list = stack.get_json("/models").await.expect("GET /models");
    let entry = testkit::listed(&list, "vllm-a");
    assert_eq!(entry["status"]["value"], "sleeping", "{entry}");
    let (s, t) = stack
        .post("/models/load", &json!({ "model": "vllm-a" }))
        .await;
    assert_eq!(s, 400, "{t}");
    assert!(t.contains("model is already running"), "{t}");

    // The page's unload stops the sleeping process.
    browser.click_in_row("vllm-a", "unload").await;
    browser.wait_state("vllm-a", "stopped").await;
    // a again: now b sleeps, and the router API's unload (OpenWebUI's eject) stops it.
    stack.chat_ok("vllm-a", 2).await;
    browser.wait_state("vllm-b", "sleeping").await;
    let (s, t) = stack
        .post("/models/unload", &json!({ "model": "vllm-b" }))
        .await;
    assert_eq!((s, t.as_str()), (200, r#"{"success":true}"#));
    browser.wait_state("vllm-b", "stopped").await;
    // The page's sleep button puts the ready a to sleep by hand; its load wakes it, in the
    // same process both times (no fourth start).
    let pid_of_a = || async {
        let status = stack
            .get_json("/api/status")
            .await
            .expect("GET /api/status");
        let a = testkit::model_entry(&status, "models", "vllm-a").expect("vllm-a");
        a["pid"].as_u64().expect("a pid")
    };
    let pid = pid_of_a().await;
    browser.click_in_row("vllm-a", "sleep").await;
    browser.wait_state("vllm-a", "sleeping").await;
    assert_eq!(pid_of_a().await, pid);
    browser.click_in_row("vllm-a", "load").await;
    browser.wait_state("vllm-a", "ready").await;
    assert_eq!(pid_of_a().await, pid);
    assert_eq!(
        stack.starts(),
        ["vllm-a", "vllm-b", "vllm-a"],
        "{}",
        stack.logs()
    );
}
