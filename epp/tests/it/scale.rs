//! Scale bench of the picker, outside the normal run (timings on a loaded 2-core machine are
//! figures, not pass/fail). Run it in release, alone:
//!   cargo build --release --workspace --bins
//!   cargo test --release -p gpuswap-epp --test it scale:: -- --ignored --nocapture --test-threads 1
//! Figures go to bench/RESULTS.md ("Endpoint picker").

use std::{
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::common::{self, Front, GpuBox};
use gpuswap::{config::BoxConfig, pb};
use gpuswap_epp::{
    fleet::Fleet,
    picker::{Decision, Picker},
};
use testkit::MockModel;

/// A fleet of `boxes` boxes with `models` models each; on each box two models are ready (one
/// on GPU 0, one on GPU 1) and the rest stopped, spread so that every model is ready somewhere
/// once there are enough boxes; `model-cold` (GPU 0) is stopped everywhere.
pub fn fleet(boxes: usize, models: usize) -> Picker {
    let fleet = Arc::new(Fleet::default());
    let configs: Vec<BoxConfig> = (0..boxes)
        .map(|b| BoxConfig {
            name: format!("gpu{b}"),
            gateway: format!("10.0.{}.{}:8002", b / 250, b % 250 + 1),
            supervisor: "unix:///nowhere.sock".into(),
            token_file: None,
            ca_file: None,
        })
        .collect();
    let (added, _) = fleet.set_boxes(configs);
    for (b, entry) in added.iter().enumerate() {
        let statuses = (0..=models)
            .map(|m| {
                if m == models {
                    return pb::ModelStatus {
                        name: "model-cold".into(),
                        state: pb::ModelState::Stopped as i32,
                        gpus: vec![0],
                        port: 29999,
                        host: "127.0.0.1".into(),
                        ..Default::default()
                    };
                }
                let ready = m == (2 * b) % models || m == (2 * b + 1) % models;
                pb::ModelStatus {
                    name: format!("model-{m}"),
                    state: if ready {
                        pb::ModelState::Ready
                    } else {
                        pb::ModelState::Stopped
                    } as i32,
                    gpus: vec![(m % 2) as u32],
                    port: 30000 + m as u32,
                    host: "127.0.0.1".into(),
                    holders: u32::from(ready),
                    ..Default::default()
                }
            })
            .collect();
        entry.apply_snapshot(statuses, Vec::new());
        entry.set_gateway_up(true);
    }
    Picker {
        fleet,
        max_in_flight: 0,
        fallbacks: 0,
    }
}

/// The mean time of one decision; `forget` clears the record of cold placements first, so that
/// each decision for a cold model is made afresh (not joined to the previous one).
fn time_decisions(picker: &Picker, model: &str, n: u32, forget: bool) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        if forget {
            picker.fleet.pending.lock().unwrap().clear();
        }
        match picker.decide(Some(model), None) {
            Decision::Route { in_flight, .. } => drop(in_flight),
            Decision::Refuse { message, .. } => panic!("{message}"),
        }
    }
    start.elapsed() / n
}

#[test]
#[ignore = "bench: run in release with --ignored"]
fn placement_decision_time() {
    println!("| boxes | models per box | ready model | cold model (placed afresh) |");
    println!("|---:|---:|---:|---:|");
    for boxes in [3, 10, 50, 200] {
        let picker = fleet(boxes, 20);
        let n = 20_000 / boxes as u32 * 10;
        time_decisions(&picker, "model-0", 100, false);
        let ready = time_decisions(&picker, "model-0", n, false);
        let cold = time_decisions(&picker, "model-cold", n, true);
        println!(
            "| {boxes} | 21 | {:.1} µs | {:.1} µs |",
            micros(ready),
            micros(cold)
        );
    }
}

fn micros(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1000.0
}

/// `gpuswap-loadgen load` at `url` for model a: requests per second and median latency.
fn load(url: &str, concurrency: u32, secs: u32) -> (f64, f64, u64) {
    let out = Command::new(testkit::bin("gpuswap-loadgen"))
        .args(["load", "--url", url, "--model", "a", "--max-tokens", "4"])
        .args([
            "-c",
            &concurrency.to_string(),
            "--duration",
            &format!("{secs}s"),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("gpuswap-loadgen");
    let report = testkit::json(&String::from_utf8_lossy(&out.stdout));
    (
        report["rps"].as_f64().unwrap_or(0.0),
        report["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
        report["errors"].as_u64().unwrap_or(0),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench: run in release with --ignored"]
async fn requests_per_second_through_envoy_and_the_picker() {
    let b = GpuBox::start("scale", "gpu2", "127.0.0.2", vec![MockModel::new("a")]).await;
    b.load("a").await;
    let gateway = b.gateway_addr();
    let front = Front::start(vec![b], &[], |t| t).await;
    // Envoy alone: the same config without the ext_proc filter, routing to the one box.
    let alone_port = testkit::free_port();
    let alone_admin = testkit::free_port();
    let text = std::fs::read_to_string(common::repo().join("deploy/envoy/envoy.yaml")).unwrap();
    let text = common::envoy_ports(&text, alone_port, alone_admin, &[front.picker_port]);
    let start = text
        .find("          - name: envoy.filters.http.ext_proc")
        .unwrap();
    let end = text
        .find("          - name: envoy.filters.http.router")
        .unwrap();
    let (ip, port) = gateway.split_once(':').unwrap();
    let direct = format!(
        "  - name: direct\n    type: STATIC\n    connect_timeout: 2s\n    load_assignment:\n      cluster_name: direct\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              socket_address: {{ address: {ip}, port_value: {port} }}\n"
    );
    let text = format!("{}{}", &text[..start], &text[end..])
        .replace(
            "                  cluster: boxes\n",
            "                  cluster: direct\n",
        )
        .replace("  clusters:\n", &format!("  clusters:\n{direct}"));
    let config = front.dir.path().join("envoy-alone.yaml");
    std::fs::write(&config, text).unwrap();
    let _alone = common::spawn_envoy(&config, &front.dir.path().join("envoy-alone.log"));
    let alone_url = format!("http://127.0.0.1:{alone_port}/v1/chat/completions");
    testkit::wait_for("Envoy alone", testkit::DEADLINE, || {
        let url = alone_url.clone();
        async move {
            let answer = testkit::http::client()
                .post(&url)
                .json(&testkit::chat_body("a", false, 1))
                .send()
                .await
                .ok()?;
            (answer.status() == 200).then_some(())
        }
    })
    .await;
    let targets = [
        (
            "box gateway alone",
            format!("http://{gateway}/v1/chat/completions"),
        ),
        ("Envoy alone", alone_url),
        ("Envoy + gpuswap-epp", front.url("/v1/chat/completions")),
    ];
    println!("| path | concurrency | req/s | p50 latency | errors |");
    println!("|---|---:|---:|---:|---:|");
    for concurrency in [1, 16] {
        for (name, url) in &targets {
            let (rps, p50, errors) = tokio::task::block_in_place(|| load(url, concurrency, 5));
            println!("| {name} | {concurrency} | {rps:.0} | {p50:.2} ms | {errors} |");
        }
    }
}
