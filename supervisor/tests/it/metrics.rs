//! `GET /metrics` on `supervisor.metrics_listen`: swaps, their phases and model states
//! after a real activation and a real swap, in a text `promtool` accepts.

use crate::common;
use crate::common::{Mock, Supervisor, http};
use gpuswap::pb::ModelState;
use testkit::DEADLINE;

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

fn state(text: &str, model: &str, state: &str) -> Option<f64> {
    sample(
        text,
        &format!("gpuswap_supervisor_model_state{{model=\"{model}\",state=\"{state}\"}}"),
    )
}

fn phase_count(text: &str, phase: &str) -> f64 {
    sample(
        text,
        &format!("gpuswap_supervisor_swap_phase_duration_seconds_count{{phase=\"{phase}\"}}"),
    )
    .unwrap_or(0.0)
}

fn swaps(text: &str, model: &str) -> Option<f64> {
    sample(
        text,
        &format!("gpuswap_supervisor_swaps_total{{model=\"{model}\"}}"),
    )
}

async fn scrape(address: &str) -> String {
    let (code, body) = http(address, "GET", "/metrics", None)
        .await
        .expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// Scrapes until the text satisfies `ready`: the actor records a change right after
/// it sends the event the test waited on, so a scrape may briefly lag behind.
async fn scrape_when(address: &str, what: &str, ready: impl Fn(&str) -> bool) -> String {
    testkit::wait_for(what, DEADLINE, || async {
        let text = scrape(address).await;
        ready(&text).then_some(text)
    })
    .await
}

/// A supervisor of `models` that serves its metrics, and the address it serves them on.
async fn with_metrics(test: &str, models: Vec<Mock>) -> (Supervisor, String) {
    let metrics = format!("127.0.0.1:{}", testkit::free_port());
    let listen = format!("metrics_listen = \"{metrics}\"");
    (Supervisor::start(test, &[&listen], models).await, metrics)
}

/// The metrics once `model_state` shows `model` in `state`.
async fn scrape_in_state(address: &str, model: &str, state_name: &str) -> String {
    let what = format!("{model} {state_name} in model_state");
    scrape_when(address, &what, |text| {
        state(text, model, state_name) == Some(1.0)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_swaps_their_phases_and_model_states() {
    // Both on GPU 0: activating one stops the other.
    let (sup, metrics) = with_metrics("metrics", vec![Mock::new("alpha"), Mock::new("beta")]).await;

    let text = scrape(&metrics).await;
    for model in ["alpha", "beta"] {
        assert_eq!(state(&text, model, "stopped"), Some(1.0), "{text}");
        assert_eq!(state(&text, model, "ready"), Some(0.0), "{text}");
    }

    // An activation that starts alpha, kept as a hold.
    let mut hold = sup.activate("alpha", true).await;
    hold.ready().await;
    let text = scrape_in_state(&metrics, "alpha", "ready").await;
    assert_eq!(state(&text, "alpha", "stopped"), Some(0.0), "{text}");
    assert_eq!(swaps(&text, "alpha"), Some(1.0), "{text}");
    assert_eq!(phase_count(&text, "start"), 1.0, "{text}");
    assert_eq!(phase_count(&text, "ready"), 1.0, "{text}");

    // A swap: beta needs GPU 0, so alpha's holder is asked to let go.
    let mut swap = sup.activate("beta", false).await;
    hold.drain_requested().await;
    let text = scrape_in_state(&metrics, "alpha", "draining").await;
    assert_eq!(state(&text, "alpha", "ready"), Some(0.0), "{text}");
    // The holder lets go: the drain ends, alpha stops, beta starts.
    drop(hold);
    swap.ready().await;
    sup.wait_state("alpha", ModelState::Stopped).await;
    let text = scrape_when(&metrics, "the swap to beta recorded", |text| {
        state(text, "beta", "ready") == Some(1.0) && state(text, "alpha", "stopped") == Some(1.0)
    })
    .await;
    assert!(swaps(&text, "beta").unwrap_or(0.0) >= 1.0, "{text}");
    assert_eq!(swaps(&text, "alpha"), Some(1.0), "{text}");
    for phase in ["drain", "stop"] {
        assert_eq!(phase_count(&text, phase), 1.0, "{phase}: {text}");
    }
    for phase in ["start", "ready"] {
        assert_eq!(phase_count(&text, phase), 2.0, "{phase}: {text}");
    }
    let stop_seconds = sample(
        &text,
        r#"gpuswap_supervisor_swap_phase_duration_seconds_sum{phase="stop"}"#,
    )
    .expect("stop sum");
    assert!(stop_seconds > 0.0, "{text}");
    // Nothing failed or restarted.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("gpuswap_supervisor_backend_failures_total{")),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"gpuswap_supervisor_backend_restarts_total{model="beta"}"#
        ),
        Some(0.0),
        "{text}"
    );
    testkit::promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_and_restarts_are_counted_by_reason() {
    let broken = Mock::new("broken").args(&["--fault", "exit-during-load"]);
    let (sup, metrics) = with_metrics("metrics-fail", vec![broken]).await;
    let failed = sup.activate("broken", false).await.failed().await;
    assert!(failed.reason.contains("exited"), "{failed:?}");
    // The failure counted.
    let text = scrape_in_state(&metrics, "broken", "failed").await;
    assert_eq!(
        sample(
            &text,
            r#"gpuswap_supervisor_backend_failures_total{model="broken",reason="exited"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // The next activation starts it again after the backoff: a restart.
    let failed = sup.activate("broken", false).await.failed().await;
    assert!(failed.reason.contains("exited"), "{failed:?}");
    let text = scrape_when(&metrics, "the restart counted", |text| {
        sample(
            text,
            r#"gpuswap_supervisor_backend_failures_total{model="broken",reason="exited"}"#,
        ) == Some(2.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            r#"gpuswap_supervisor_backend_restarts_total{model="broken"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(swaps(&text, "broken"), Some(2.0), "{text}");
    testkit::promtool_check(&text);
}

#[test]
fn a_busy_metrics_port_fails_the_start_and_names_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = testkit::short_tempdir();
    let config = dir.path().join("gpuswap.toml");
    std::fs::write(
        &config,
        format!(
            "[supervisor]\nlisten = \"unix://{}\"\nstate_file = \"{}\"\nmetrics_listen = \"{addr}\"\n",
            dir.path().join("s.sock").display(),
            dir.path().join("state.json").display()
        ),
    )
    .expect("write config");
    let (code, stderr) =
        common::run_to_exit(&["--config", config.to_str().expect("utf-8")], dir.path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("supervisor.metrics_listen"), "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
}
