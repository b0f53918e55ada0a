//! Mixed-model soak: thousands of requests for three models (two of them swap on one GPU),
//! streamed and not, some clients leaving mid-stream. Nothing is misrouted or lost, the
//! conflicting models never run at once, and every request in flight is counted out.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::e2e_common::{self, Model, Stack, Verdict, judge};
use gpuswap::pb::ModelState;
use testkit::{chat_body, http};

const REQUESTS: usize = 2_000;
const CONCURRENCY: usize = 32;
/// A bound far above a normal run (about 30 s on a loaded 2-core machine).
const SOAK_LIMIT: Duration = Duration::from_secs(150);
/// Percent of clients that leave mid-stream.
const DISCONNECT_PERCENT: u64 = 5;

/// A deterministic pseudo-random number per request (xorshift of the index).
fn draw(seed: u64, i: usize) -> u64 {
    let mut x = seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

/// How one request ended.
#[derive(Debug)]
struct Record {
    model: &'static str,
    stream: bool,
    verdict: Verdict,
    /// A client that left after the first routed chunk.
    left: bool,
}

/// Opens a stream, reads up to the first chunk from the backend (it names the model that
/// got the request), checks it, and goes away.
async fn leave_mid_stream(url: &str, model: &'static str) -> Verdict {
    let mut opened =
        match http::open(http::client().post(url).json(&chat_body(model, true, 400))).await {
            Ok(opened) => opened,
            Err(e) => return Verdict::Lost(e),
        };
    if opened.status != 200 {
        let reply = http::Reply {
            status: opened.status,
            text: opened.read_until(|_| false).await.unwrap_or_else(|e| e),
            ..http::Reply::default()
        };
        return judge(model, false, &reply);
    }
    match opened
        .read_until(|text| text.contains("gpuswap_mock"))
        .await
    {
        Ok(text) => {
            let routed = testkit::sse_data(&text)
                .into_iter()
                .filter_map(|d| serde_json::from_str::<serde_json::Value>(&d).ok())
                .find(|chunk| chunk["gpuswap_mock"].is_object());
            match routed {
                Some(chunk) if chunk["gpuswap_mock"]["request_model"] == model => Verdict::Served,
                _ => Verdict::Misroute(format!("asked {model}, got {text}")),
            }
        }
        // Ended before any routed chunk: it must be an error event then.
        Err(text) => {
            let reply = http::Reply {
                status: 200,
                text: text.trim_start_matches("the body ended: ").to_owned(),
                ..http::Reply::default()
            };
            judge(model, true, &reply)
        }
    }
    // Dropping `opened` here closes the connection mid-stream.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_models_under_concurrent_load_are_never_misrouted_or_lost() {
    let stack = Stack::builder("e2e-soak")
        .supervisor("drain_timeout = \"30s\"")
        .model(
            Model::new("alpha")
                .load_time("200ms")
                .tokens_per_second(200),
        )
        .model(
            Model::new("beta")
                .flavor("tabbyapi")
                .load_time("250ms")
                .tokens_per_second(200),
        )
        .model(
            Model::new("gamma")
                .flavor("sglang")
                .gpus(&[1])
                .load_time("300ms")
                .tokens_per_second(200),
        )
        .start()
        .await;
    let models: [&'static str; 3] = ["alpha", "beta", "gamma"];
    let sampler = stack.sampler(&[("alpha", "beta")]);
    let seed = 0x5eed_0f9a_u64;
    let next = Arc::new(AtomicUsize::new(0));
    let url = stack.url("/v1/chat/completions");
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CONCURRENCY {
        let (next, url) = (Arc::clone(&next), url.clone());
        clients.push(tokio::spawn(async move {
            let mut records = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= REQUESTS {
                    return records;
                }
                let r = draw(seed, i);
                let model = models[(r % 3) as usize];
                let stream = (r >> 8) & 1 == 0;
                let left = stream && (r >> 16) % 100 < DISCONNECT_PERCENT;
                let verdict = if left {
                    leave_mid_stream(&url, model).await
                } else {
                    let max_tokens = 1 + ((r >> 24) % 6) as u32;
                    let reply = http::post(&url, &chat_body(model, stream, max_tokens)).await;
                    judge(model, stream, &reply)
                };
                records.push(Record {
                    model,
                    stream,
                    verdict,
                    left,
                });
            }
        }));
    }
    let records = tokio::time::timeout(SOAK_LIMIT, e2e_common::records_of(clients))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "only {} of {REQUESTS} requests were sent within {SOAK_LIMIT:?}{}",
                next.load(Ordering::Relaxed).min(REQUESTS),
                stack.logs()
            )
        });
    let elapsed = started.elapsed();
    let report = sampler.finish();

    assert_eq!(records.len(), REQUESTS, "every request has an outcome");
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for record in &records {
        let key = match &record.verdict {
            Verdict::Served if record.left => "served (left mid-stream)".to_owned(),
            Verdict::Served => "served".to_owned(),
            Verdict::Error { status, code } => format!("error {status} {code}"),
            Verdict::Misroute(_) => "MISROUTED".to_owned(),
            Verdict::Lost(_) => "LOST".to_owned(),
            Verdict::Malformed(_) => "MALFORMED".to_owned(),
        };
        *tally.entry(key).or_default() += 1;
        // No fault is injected here: even a well-formed error is a regression.
        if record.verdict != Verdict::Served {
            bad.push(record);
        }
    }
    let mut per_model: BTreeMap<&str, usize> = BTreeMap::new();
    for record in records.iter().filter(|r| r.verdict == Verdict::Served) {
        *per_model.entry(record.model).or_default() += 1;
    }
    let starts = stack.starts();
    let generation = stack
        .statuses()
        .await
        .models
        .iter()
        .map(|m| m.generation)
        .max()
        .unwrap_or(0);
    eprintln!(
        "{REQUESTS} requests at concurrency {CONCURRENCY} in {elapsed:?}: {tally:?} {per_model:?}; {} starts \
         ({} swaps between alpha and beta), last generation {generation}; sampler: {} samples, \
         max servers {:?}",
        starts.len(),
        starts
            .iter()
            .filter(|m| *m != "gamma")
            .count()
            .saturating_sub(1),
        report.samples,
        report.max_leaders,
    );
    testkit::assert_none_failed(
        &bad,
        REQUESTS,
        "requests failed, misrouted, lost or malformed",
        &format!("\n{tally:?}{}", stack.logs()),
    );
    let streamed = records.iter().filter(|r| r.stream).count();
    let left = records.iter().filter(|r| r.left).count();
    assert!(
        streamed > REQUESTS / 3 && left > 0,
        "the mix is off: {streamed} streamed, {left} left"
    );
    report.assert_clean(&stack.logs());

    // Every request is counted out, the clients that left included ...
    testkit::wait_for(
        "no request in flight in the gateway",
        testkit::DEADLINE,
        || async {
            let in_flight = stack.in_flight().await;
            in_flight.values().all(|n| *n == 0).then_some(())
        },
    )
    .await;
    let status = stack.statuses().await;
    for model in &status.models {
        assert!(model.holders <= 1, "{model:?}");
    }
    assert!(status.supervisor.unwrap().queue.is_empty());
    // ... so a swap drains at once, far below the 30 s drain timeout: a leaked in-flight
    // count would hold the drain until the timeout.
    let resident = if stack.status("alpha").await.state() == ModelState::Ready {
        "alpha"
    } else {
        "beta"
    };
    let other = if resident == "alpha" { "beta" } else { "alpha" };
    if stack.status(resident).await.state() != ModelState::Ready {
        stack.served_chat(resident, false, 1).await;
    }
    let swap = Instant::now();
    stack.served_chat(other, false, 1).await;
    assert!(
        swap.elapsed() < Duration::from_secs(15),
        "the swap to {other} waited {:?}: a request of {resident} was never counted out{}",
        swap.elapsed(),
        stack.logs()
    );
    assert_eq!(stack.status(resident).await.state(), ModelState::Stopped);
}
