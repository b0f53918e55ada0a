//! The exposition served on `GET /metrics` is valid: checked by a small
//! structural parser here and, where installed, by `promtool check metrics`.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use gpuswap_telemetry::{CONTENT_TYPE, Metrics, ModelState, SwapPhase, serve_metrics};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Metrics of both daemons with every family holding samples, label values
/// that need escaping included.
fn populated() -> Metrics {
    let mut metrics = Metrics::new();
    let gateway = metrics.gateway();
    for model in ["llama-3.3-70b", "quote\"back\\slash"] {
        let mut request = gateway.request(model);
        request.forwarding();
        request.first_byte();
        request.add_tokens(12);
        request.finish(200);
        drop(gateway.request(model));
        gateway.swap_waited(model);
        let _waiting = gateway.request(model);
    }
    let supervisor = metrics.supervisor();
    supervisor.swap_started("llama-3.3-70b");
    for phase in [
        SwapPhase::Drain,
        SwapPhase::Stop,
        SwapPhase::Start,
        SwapPhase::Ready,
    ] {
        supervisor.phase_finished(phase, Duration::from_millis(120));
    }
    supervisor.backend_restarted("llama-3.3-70b");
    supervisor.backend_failed("llama-3.3-70b", "startup_timeout");
    supervisor.set_model_state("llama-3.3-70b", ModelState::Ready);
    supervisor.log_lines_dropped("llama-3.3-70b", 3);
    metrics
}

/// Fetches `path` from the server with a plain HTTP/1.1 request; returns the
/// status line, the headers and the body.
async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("{method} {path} HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(testkit::DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a header block");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

/// Prometheus text format 0.0.4: every sample line is `name[{labels}] value`
/// and belongs to a family declared with `# TYPE` (counters by their `_total`
/// name, histograms by their base name); no OpenMetrics-only lines.
fn check_structure(text: &str) -> BTreeSet<String> {
    let mut families = BTreeSet::new();
    let mut samples = BTreeSet::new();
    for line in text.lines() {
        assert!(
            !line.starts_with("# EOF") && !line.starts_with("# UNIT"),
            "OpenMetrics-only line: {line}"
        );
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "unexpected type in {line}"
            );
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "counters, and only they, are named *_total: {line}"
            );
            families.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("a sample has a value");
        let name = &line[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        let value = line.rsplit(' ').next().expect("value");
        assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let family = families
            .iter()
            .find(|family| {
                name == family.as_str()
                    || name
                        .strip_prefix(family.as_str())
                        .is_some_and(|suffix| ["_bucket", "_sum", "_count"].contains(&suffix))
            })
            .unwrap_or_else(|| panic!("sample {name} belongs to no declared family"));
        samples.insert(family.clone());
    }
    assert_eq!(samples, families, "every family has samples");
    families
}

#[tokio::test]
async fn served_metrics_are_valid_exposition_text() {
    let metrics = Arc::new(populated());
    let render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let server = serve_metrics("127.0.0.1:0".parse().unwrap(), render)
        .await
        .expect("bind");

    let (status, headers, body) = get(server.local_addr(), "GET", "/metrics").await;
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains(&format!("content-type: {CONTENT_TYPE}")),
        "{headers}"
    );

    let families = check_structure(&body);
    for expected in [
        "gpuswap_gateway_requests_total",
        "gpuswap_gateway_queue_depth",
        "gpuswap_gateway_in_flight",
        "gpuswap_gateway_time_to_first_byte_seconds",
        "gpuswap_gateway_request_duration_seconds",
        "gpuswap_gateway_generated_tokens_total",
        "gpuswap_gateway_tokens_per_second",
        "gpuswap_gateway_swaps_total",
        "gpuswap_supervisor_swaps_total",
        "gpuswap_supervisor_swap_phase_duration_seconds",
        "gpuswap_supervisor_backend_restarts_total",
        "gpuswap_supervisor_backend_failures_total",
        "gpuswap_supervisor_model_state",
        "gpuswap_supervisor_log_lines_dropped_total",
    ] {
        assert!(
            families.contains(expected),
            "{expected} missing from {families:?}"
        );
    }
    assert!(
        body.contains(r#"model="quote\"back\\slash""#),
        "label values are escaped:\n{body}"
    );
    testkit::promtool_check(&body);

    let (status, _, _) = get(server.local_addr(), "GET", "/other").await;
    assert!(status.contains(" 404 "), "{status}");
    let (status, headers, _) = get(server.local_addr(), "POST", "/metrics").await;
    assert!(status.contains(" 405 "), "{status}");
    assert!(headers.contains("allow: get, head"), "{headers}");
}
