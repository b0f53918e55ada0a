//! The GPU release wait after a stop, on a machine without an NVIDIA driver: the stop does
//! not wait for the release timeout, and the model's log says once that the check is skipped.
//! (One test in its own binary: the notice is said once per process.)

use std::time::{Duration, Instant};

use crate::process_support::{logs, model, sh, spec};
use gpuswap_supervisor::backend::Backend;
use serde_json::json;
use testkit::{DEADLINE, free_port};

#[tokio::test]
async fn stops_without_a_driver_skip_the_gpu_wait_and_say_so_once() {
    // Where NVML works (a GPU machine), the notice must not appear at all.
    let driver = nvml_wrapper::Nvml::init().is_ok();
    let logs = logs("gpu");
    for round in 0..2 {
        let command = sh("exec sleep 1000");
        let command: Vec<&str> = command.iter().map(String::as_str).collect();
        let config = model("vllm", &command, free_port(), json!({ "gpus": [0] }));
        let mut spec = spec("gpu", config);
        // Far beyond the test's deadline: a stop that waited for it would time out below.
        spec.gpu_release_timeout = Duration::from_secs(3600);
        let backend = Backend::spawn(&spec, logs.clone()).expect("spawn");
        let stopping = Instant::now();
        let info = tokio::time::timeout(DEADLINE, backend.stop())
            .await
            .unwrap_or_else(|_| panic!("stop {round} still running after {DEADLINE:?}"));
        eprintln!("stop {round} took {:?} ({info})", stopping.elapsed());
        assert!(backend.exit_info().is_some(), "stop {round} returned early");
    }
    let lines = logs.tail_lines(usize::MAX);
    let notices = lines
        .iter()
        .filter(|l| l.contains("no NVIDIA driver found, skipping GPU release checks"))
        .count();
    let expected = if driver { 0 } else { 1 };
    assert_eq!(
        notices, expected,
        "notices of the skipped GPU check (driver present: {driver}): {lines:#?}"
    );
}
