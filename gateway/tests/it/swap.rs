//! Swaps through the gateway: routing under swaps, collation, concurrent load,
//! two gateways on one supervisor, and a backend that crashes mid-stream.

use std::time::{Duration, Instant};

use crate::common::{Model, Stack, post_to, read_stream};
use serde_json::Value;
use testkit::stream_content;

/// Checks that a chat answer came from `model`: non-stream JSON or SSE text.
fn assert_served_by(model: &Model, stream: bool, status: u16, text: &str) {
    assert_eq!(status, 200, "{}: {text}", model.name);
    if stream {
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "{}: {text}",
            model.name
        );
        let content = stream_content(text);
        assert!(
            content.starts_with(&model.signature()),
            "{}: {content}",
            model.name
        );
    } else {
        let body = testkit::json(text);
        assert_eq!(body["model"], model.served(), "{text}");
        assert_eq!(
            body["gpuswap_mock"]["request_model"],
            model.served(),
            "{text}"
        );
        let content = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        assert!(
            content.starts_with(&model.signature()),
            "{}: {text}",
            model.name
        );
    }
}

/// A chat through the first gateway that must be answered by `name`'s own backend.
async fn served_chat(stack: &Stack, name: &str, stream: bool, max_tokens: u32) {
    let (s, t) = chat(stack, 0, name, stream, max_tokens).await;
    assert_served_by(stack.model(name), stream, s, &t);
}

async fn chat(
    stack: &Stack,
    gateway: usize,
    model: &str,
    stream: bool,
    max_tokens: u32,
) -> (u16, String) {
    let url = stack.gateways[gateway].url("/v1/chat/completions");
    let response = stack
        .http
        .post(&url)
        .json(&Stack::chat(model, stream, max_tokens))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = response.status().as_u16();
    (status, read_stream(response).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_then_b_then_a_each_answer_names_the_model_asked_for() {
    let stack = Stack::builder("aba")
        .model(Model::new("alpha").served_name("alpha-served").alias("a"))
        .model(Model::new("beta").flavor("sglang"))
        .start()
        .await;
    let alpha = stack.model("alpha").clone();
    let (s, t) = chat(&stack, 0, "a", false, 3).await;
    assert_served_by(&alpha, false, s, &t);
    served_chat(&stack, "beta", true, 3).await;
    served_chat(&stack, "alpha", false, 3).await;
    served_chat(&stack, "alpha", true, 3).await;
    testkit::wait_for("three starts", testkit::DEADLINE, || async {
        (stack.starts().len() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        stack.starts(),
        ["alpha", "beta", "alpha"],
        "{}",
        stack.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternating_arrivals_are_collated() {
    let stack = Stack::builder("collate")
        // Every request arrives while the first model still loads.
        .model(Model::new("alpha").load_time("1500ms"))
        .model(Model::new("beta").load_time("300ms"))
        .start()
        .await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let name = if i % 2 == 0 { "alpha" } else { "beta" };
        let model = stack.model(name).clone();
        let (http, url) = (stack.http.clone(), stack.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let (s, t) = post_to(&http, &url, &Stack::chat(&model.name, false, 2)).await;
            assert_served_by(&model, false, s, &t);
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in tasks {
        task.await.unwrap_or_else(|e| panic!("{e}{}", stack.logs()));
    }
    // 15 alternations in the arrival order, served as one batch per model.
    let starts = stack.starts();
    assert!(starts.len() <= 3, "{starts:?}{}", stack.logs());
    assert_eq!(&starts[..2], ["alpha", "beta"], "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_load_has_no_misroute_and_no_loss() {
    let stack = Stack::builder("mixed")
        .model(Model::new("m1").load_time("200ms"))
        .model(Model::new("m2").load_time("200ms").flavor("sglang"))
        .model(Model::new("m3").load_time("200ms").flavor("tabbyapi"))
        .start()
        .await;
    let models: Vec<Model> = ["m1", "m2", "m3"]
        .iter()
        .map(|m| stack.model(m).clone())
        .collect();
    // 200 requests per model in a shuffled order, half of them streamed.
    let mut order: Vec<usize> = (0..600).map(|i| i % 3).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, m) in order.iter().enumerate() {
        let model = models[*m].clone();
        let stream = i % 2 == 0;
        let (http, url) = (stack.http.clone(), stack.url("/v1/chat/completions"));
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(&url)
                .json(&Stack::chat(&model.name, stream, 3))
                .send()
                .await
                .map_err(|e| format!("{}: {e}", model.name))?;
            let status = response.status().as_u16();
            let text = response
                .text()
                .await
                .map_err(|e| format!("{}: {e}", model.name))?;
            assert_served_by(&model, stream, status, &text);
            Ok::<_, String>(())
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(e),
            Err(panic) => failures.push(panic.to_string()),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 600 failed: {:?}{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        stack.logs()
    );
    let starts = stack.starts();
    eprintln!(
        "600 requests in {:?} with {} starts",
        started.elapsed(),
        starts.len()
    );
    assert!(starts.len() < 60, "{starts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_alternating_models_do_not_thrash() {
    let residency = Duration::from_secs(1);
    let mut stack = Stack::builder("two-gateways")
        .supervisor("min_residency = \"1s\"")
        .model(Model::new("alpha").load_time("200ms"))
        .model(Model::new("beta").load_time("200ms"))
        .start()
        .await;
    stack.add_gateway().await;
    let run_for = Duration::from_secs(5);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (gateway, name) in [(0, "alpha"), (1, "beta")] {
        let model = stack.model(name).clone();
        let (http, url) = (
            stack.http.clone(),
            stack.gateways[gateway].url("/v1/chat/completions"),
        );
        tasks.push(tokio::spawn(async move {
            let mut served = 0;
            while started.elapsed() < run_for {
                let (s, t) = post_to(&http, &url, &Stack::chat(&model.name, false, 2)).await;
                assert_served_by(&model, false, s, &t);
                served += 1;
            }
            served
        }));
    }
    let mut served = Vec::new();
    for task in tasks {
        served.push(task.await.unwrap_or_else(|e| panic!("{e}{}", stack.logs())));
    }
    let elapsed = started.elapsed();
    let starts = stack.starts();
    // Each model keeps the GPU at least min_residency: at most one start per residency.
    let bound = (elapsed.as_secs_f64() / residency.as_secs_f64()).ceil() as usize + 2;
    eprintln!(
        "served {served:?} in {elapsed:?} with {} starts (bound {bound})",
        starts.len()
    );
    assert!(
        starts.len() <= bound,
        "{} starts > {bound}: {starts:?}{}",
        starts.len(),
        stack.logs()
    );
    assert!(served.iter().all(|n| *n >= 1), "{served:?}");
    assert!(
        served.iter().sum::<usize>() > starts.len() * 2,
        "requests were not batched: {served:?} vs {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_crash_mid_stream_ends_with_an_error_and_the_next_request_restarts_it() {
    let stack = Stack::builder("crash")
        .model(Model::new("alpha").args(&["--fault", "crash-after:3"]))
        .start()
        .await;
    let (s, t) = chat(&stack, 0, "alpha", true, 10).await;
    assert_eq!(s, 200, "{t}");
    assert!(!t.contains("[DONE]"), "{t}");
    let data = testkit::sse_data(&t);
    let last: Value = testkit::json(data.last().unwrap());
    assert_eq!(last["error"]["code"], "backend_unavailable", "{t}");
    assert!(stream_content(&t).starts_with("[served by alpha]"), "{t}");

    // The hold ended with the process; the next request starts it again.
    served_chat(&stack, "alpha", false, 2).await;
    testkit::wait_for("the second start", testkit::DEADLINE, || async {
        (stack.starts().len() >= 2).then_some(())
    })
    .await;
    assert_eq!(stack.starts(), ["alpha", "alpha"], "{}", stack.logs());
}

/// `[supervisor] gpu_memory` of the placement tests: one 96 GiB GPU.
const GPU_96_GIB: &str = "gpu_memory = \"96GiB\"";

/// A model of `gib` GiB on GPU 0.
fn sized(name: &str, gib: u32) -> Model {
    Model::new(name).toml(&format!("vram = \"{gib}GiB\""))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_that_fit_share_the_gpu_and_a_bigger_one_stops_both() {
    let stack = Stack::builder("fit")
        .supervisor(GPU_96_GIB)
        // Slow answers: the second model is asked for while the first one streams.
        .model(sized("a40", 40).tokens_per_second(20))
        .model(sized("b40", 40).tokens_per_second(20))
        .model(sized("c70", 70))
        .start()
        .await;
    let (a, b, c) = (
        stack.model("a40").clone(),
        stack.model("b40").clone(),
        stack.model("c70").clone(),
    );
    let (s, t) = chat(&stack, 0, "a40", false, 1).await;
    assert_served_by(&a, false, s, &t);
    let a_pid = stack.status("a40").await.pid;
    // a40 streams 40 tokens at 20 per second; b40 starts and answers meanwhile.
    let (http, url) = (stack.http.clone(), stack.url("/v1/chat/completions"));
    let streaming = tokio::spawn(async move {
        let response = http
            .post(&url)
            .json(&Stack::chat("a40", true, 40))
            .send()
            .await
            .expect("a40 stream");
        (response.status().as_u16(), read_stream(response).await)
    });
    let (s, t) = chat(&stack, 0, "b40", false, 1).await;
    assert_served_by(&b, false, s, &t);
    assert!(
        !streaming.is_finished(),
        "b40 answered only after a40's stream ended{}",
        stack.logs()
    );
    let (s, t) = streaming.await.expect("a40 stream task");
    assert_served_by(&a, true, s, &t);
    assert_eq!(stack.starts(), ["a40", "b40"], "{}", stack.logs());
    let a_status = stack.status("a40").await;
    assert_eq!(a_status.pid, a_pid, "a40 was restarted{}", stack.logs());
    assert_eq!(a_status.state(), gpuswap::pb::ModelState::Ready);
    let status = stack.statuses().await;
    let gpu = status.gpus.iter().find(|g| g.index == 0).expect("GPU 0");
    assert_eq!(gpu.capacity_bytes, Some(96 << 30));
    assert_eq!(gpu.reserved_bytes, 80 << 30, "{gpu:?}");
    // The gateway's model list shows the same, from its Watch stream.
    let list = testkit::wait_for(
        "/v1/models with 80 GiB reserved",
        testkit::DEADLINE,
        || async {
            let list = stack.get_json("/v1/models").await?;
            (list["gpuswap"]["gpus"][0]["reserved_bytes"] == 80u64 << 30).then_some(list)
        },
    )
    .await;
    assert_eq!(list["gpuswap"]["gpus"][0]["capacity_bytes"], 96u64 << 30);
    let entry = testkit::model_entry(&list, "data", "a40")
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["gpuswap"]["vram_bytes"], 40u64 << 30, "{entry}");
    assert_eq!(entry["gpuswap"]["pinned"], false, "{entry}");
    assert!(entry["gpuswap"]["last_used_ms"].is_u64(), "{entry}");
    // 70 GiB fits only alone: both 40 GiB models go.
    let (s, t) = chat(&stack, 0, "c70", false, 1).await;
    assert_served_by(&c, false, s, &t);
    assert_eq!(stack.starts(), ["a40", "b40", "c70"], "{}", stack.logs());
    for name in ["a40", "b40"] {
        stack
            .wait_state(name, gpuswap::pb::ModelState::Stopped)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_does_not_fit_next_to_a_pinned_one_fails_fast() {
    let stack = Stack::builder("pinned")
        .supervisor(GPU_96_GIB)
        .model(sized("p30", 30).toml("pinned = true"))
        .model(sized("big70", 70))
        .start()
        .await;
    served_chat(&stack, "p30", false, 1).await;
    let before = stack.status("p30").await;
    let began = Instant::now();
    let (s, t) = chat(&stack, 0, "big70", false, 1).await;
    let took = began.elapsed();
    assert_eq!(s, 503, "{t}");
    let message = testkit::json(&t)["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("pinned model p30"),
        "the reason names the pinned model: {message}"
    );
    assert!(took < Duration::from_secs(2), "failed after {took:?}");
    // The pinned model never stopped, and still serves.
    served_chat(&stack, "p30", false, 1).await;
    let after = stack.status("p30").await;
    assert_eq!(
        (after.pid, after.generation, after.state()),
        (
            before.pid,
            before.generation,
            gpuswap::pb::ModelState::Ready
        )
    );
    assert!(after.pinned);
    assert_eq!(stack.starts(), ["p30"], "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_model_makes_room() {
    let stack = Stack::builder("lru")
        .supervisor(GPU_96_GIB)
        .model(sized("a", 40))
        .model(sized("b", 40))
        .model(sized("c", 40))
        .start()
        .await;
    for name in ["a", "b", "a"] {
        served_chat(&stack, name, false, 1).await;
    }
    // The gateway reports each model's last use to the supervisor.
    testkit::wait_for("a used after b", testkit::DEADLINE, || async {
        let (a, b) = (stack.status("a").await, stack.status("b").await);
        (a.last_used_ms? > b.last_used_ms?).then_some(())
    })
    .await;
    let a_pid = stack.status("a").await.pid;
    served_chat(&stack, "c", false, 1).await;
    stack
        .wait_state("b", gpuswap::pb::ModelState::Stopped)
        .await;
    let a = stack.status("a").await;
    assert_eq!(
        (a.state(), a.pid),
        (gpuswap::pb::ModelState::Ready, a_pid),
        "{}",
        stack.logs()
    );
    assert_eq!(stack.starts(), ["a", "b", "c"], "{}", stack.logs());
}

/// One 96 GiB GPU, and host RAM for two sleepers of 40 GiB (the default, 80 % of this
/// machine's memory, may be less).
const SLEEPERS_96_GIB: &str = "gpu_memory = \"96GiB\"\nhost_memory = \"100GiB\"";

/// A vLLM model of 70 GiB (two do not fit in 96) that sleeps with vLLM's own protocol, its
/// weights kept in `host_gib` of host RAM.
fn sleeper(name: &str, host_gib: u32) -> Model {
    sized(name, 70)
        .load_time("1s")
        .args(&["--enable-sleep-mode"])
        .env("VLLM_SERVER_DEV_MODE", "1")
        .toml("sleep = true")
        .toml(&format!("host_memory = \"{host_gib}GiB\""))
}

/// What the mock says of its own memory (`GET /gpuswap_mock/memory`).
async fn mock_memory(stack: &Stack, name: &str) -> Value {
    let url = format!("http://{}/gpuswap_mock/memory", stack.model(name).address());
    let response = stack.http.get(&url).send().await.expect("mock memory");
    response.json().await.expect("mock memory JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_model_makes_room_and_wakes_in_its_own_process() {
    use gpuswap::pb::ModelState;
    let stack = Stack::builder("sleep")
        .supervisor(SLEEPERS_96_GIB)
        .model(sleeper("a", 40))
        .model(sleeper("b", 40))
        .start()
        .await;
    let (a, b) = (stack.model("a").clone(), stack.model("b").clone());
    served_chat(&stack, "a", false, 1).await;
    let first = stack.status("a").await;
    // b needs the GPU: a sleeps (its process and port kept, its GPU memory freed).
    let (s, t) = chat(&stack, 0, "b", false, 1).await;
    assert_served_by(&b, false, s, &t);
    let asleep = stack.wait_state("a", ModelState::Sleeping).await;
    assert_eq!(
        (asleep.pid, asleep.generation),
        (first.pid, first.generation)
    );
    let memory = mock_memory(&stack, "a").await;
    assert_eq!(memory["asleep"], true, "{memory}");
    assert_eq!(memory["gpu_memory_bytes"], 0, "{memory}");
    let listed = testkit::wait_for(
        "/v1/models to show a sleeping",
        testkit::DEADLINE,
        || async {
            let list = stack.get_json("/v1/models").await?;
            let entry = testkit::model_entry(&list, "data", "a")?.clone();
            (entry["gpuswap"]["state"] == "sleeping").then_some(entry)
        },
    )
    .await;
    assert_eq!(listed["id"], "a");
    // a again: b sleeps, a wakes in the same process (no second start), streamed too.
    let began = Instant::now();
    let (s, t) = chat(&stack, 0, "a", true, 2).await;
    let woke_in = began.elapsed();
    assert_served_by(&a, true, s, &t);
    // The streamed waiter is told that this is a wake, not a load, from the first step on.
    assert!(
        t.contains("Waking a"),
        "no \"Waking a\" progress chunk: {t}"
    );
    assert!(!t.contains("Loading a"), "a wake called a load: {t}");
    stack.assert_woke_in_place("a", &first, &stack.logs()).await;
    stack.wait_state("b", ModelState::Sleeping).await;
    assert_eq!(stack.starts(), ["a", "b"], "{}", stack.logs());
    // The mock wakes in load time / 20 (50 ms): far below a cold start's 1 s.
    assert!(woke_in < Duration::from_millis(900), "woke in {woke_in:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wake_falls_back_to_a_cold_start() {
    use gpuswap::pb::ModelState;
    let stack = Stack::builder("wake-fails")
        .supervisor(SLEEPERS_96_GIB)
        .model(sleeper("a", 40).args(&["--fault", "wake-fails"]))
        .model(sleeper("b", 40))
        .start()
        .await;
    let b = stack.model("b").clone();
    served_chat(&stack, "a", false, 1).await;
    let first = stack.status("a").await;
    let (s, t) = chat(&stack, 0, "b", false, 1).await;
    assert_served_by(&b, false, s, &t);
    stack.wait_state("a", ModelState::Sleeping).await;
    // The wake fails: a is stopped and started cold, and the request is still served.
    served_chat(&stack, "a", false, 1).await;
    let again = stack.status("a").await;
    assert_eq!(again.state(), ModelState::Ready);
    assert_ne!(again.pid, first.pid, "{}", stack.logs());
    assert!(again.generation > first.generation);
    assert_eq!(stack.starts(), ["a", "b", "a"], "{}", stack.logs());
    let logs = stack.logs();
    assert!(logs.contains("wake failed"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_memory_budget_stops_the_least_recently_used_sleeper() {
    use gpuswap::pb::ModelState;
    let stack = Stack::builder("sleep-budget")
        .supervisor(SLEEPERS_96_GIB)
        .model(sleeper("a", 40))
        .model(sleeper("b", 40))
        .model(sleeper("c", 40))
        .start()
        .await;
    for name in ["a", "b", "c"] {
        served_chat(&stack, name, false, 1).await;
    }
    // a and b sleep (80 of 100 GiB); a again: c must sleep, b (used before c) is stopped.
    stack.wait_state("b", ModelState::Sleeping).await;
    let a_pid = stack.status("a").await.pid;
    served_chat(&stack, "a", false, 1).await;
    assert_eq!(stack.status("a").await.pid, a_pid, "{}", stack.logs());
    stack.wait_state("b", ModelState::Stopped).await;
    stack.wait_state("c", ModelState::Sleeping).await;
    assert_eq!(stack.starts(), ["a", "b", "c"], "{}", stack.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_reaches_a_sleeping_backend_under_mixed_load() {
    // SGLang's mock answers 500 to a request that reaches it while its memory is released,
    // and refuses to sleep while requests run: both would show as a failed request.
    let sglang = |name: &str| {
        sized(name, 70)
            .flavor("sglang")
            .load_time("1s")
            .args(&["--enable-memory-saver", "--enable-weights-cpu-backup"])
            .toml("sleep = true")
            .toml("host_memory = \"40GiB\"")
    };
    let stack = Stack::builder("sleep-mixed")
        .supervisor(SLEEPERS_96_GIB)
        .model(sglang("s1"))
        .model(sglang("s2"))
        .start()
        .await;
    let models = [stack.model("s1").clone(), stack.model("s2").clone()];
    // Ten rounds of 6 requests to each model at once (half of them streamed). Only one model
    // fits, so each round after the first has to wake the one asleep at its start: at least
    // nine wakes, however the gateway collates the requests of a round.
    const ROUNDS: usize = 10;
    let mut failures = Vec::new();
    for _ in 0..ROUNDS {
        let mut tasks = Vec::new();
        for i in 0..12 {
            let model = models[i % 2].clone();
            let stream = (i / 2) % 2 == 0;
            let (http, url) = (stack.http.clone(), stack.url("/v1/chat/completions"));
            tasks.push(tokio::spawn(async move {
                let (status, text) =
                    post_to(&http, &url, &Stack::chat(&model.name, stream, 3)).await;
                assert_served_by(&model, stream, status, &text);
            }));
        }
        for task in tasks {
            if let Err(panic) = task.await {
                failures.push(panic.to_string());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed: {:?}{}",
        failures.len(),
        ROUNDS * 12,
        &failures[..failures.len().min(3)],
        stack.logs()
    );
    let mut starts = stack.starts();
    starts.sort();
    assert_eq!(
        starts,
        ["s1", "s2"],
        "each started once, then slept and woke{}",
        stack.logs()
    );
    let log = testkit::read_lossy(&stack.dir.path().join("supervisor.log"));
    let wakes = log.lines().filter(|l| l.contains("wake_ms")).count();
    assert!(wakes >= ROUNDS - 1, "{wakes} wakes{}", stack.logs());
}
