//! A model whose port is still held by a foreign process: the start fails at once with an
//! error that names the port (not a silent wait until startup_timeout, nor a TabbyAPI that
//! quietly moves to the next port), and the model starts once the port is free.

use std::time::{Duration, Instant};

use crate::e2e_common::{Model, Stack, Verdict, judge, openai_error};
use serde_json::Value;

/// One line that says the port is in use (a backend's command line `--port N`, or its own
/// bind error, which gives the address but not "port N", do not count).
fn names_busy_port(line: &str, port: u16) -> bool {
    line.contains(&format!("port {port} ")) && line.contains("in use")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_a_foreign_process_fails_the_start_at_once_naming_the_port() {
    let stack = Stack::builder("e2e-port-busy")
        .model(Model::new("alpha").toml("startup_timeout = \"60s\""))
        // TabbyAPI would move to port+1 by itself and never answer on its own port.
        .model(
            Model::new("tabby")
                .flavor("tabbyapi")
                .gpus(&[1])
                .toml("startup_timeout = \"60s\""),
        )
        .start()
        .await;
    let mut foreign = Vec::new();
    for name in ["alpha", "tabby"] {
        let port = stack.model(name).port;
        foreign.push(std::net::TcpListener::bind(("127.0.0.1", port)).expect("hold the port"));
    }

    for (name, stream) in [("alpha", false), ("tabby", false), ("alpha", true)] {
        let port = stack.model(name).port;
        let asked = Instant::now();
        let reply = stack.chat(name, stream, 2).await;
        let took = asked.elapsed();
        let body: Value = if stream {
            assert_eq!(reply.status, 200, "{reply:?}");
            let data = testkit::sse_data(&reply.text);
            serde_json::from_str(data.last().expect("an event")).expect("JSON")
        } else {
            assert_eq!(reply.status, 503, "{reply:?}{}", stack.logs());
            serde_json::from_str(&reply.text).expect("JSON")
        };
        let (code, message) = openai_error(&body).unwrap_or_else(|| panic!("{reply:?}"));
        assert_eq!(code, "model_start_failed", "{message}");
        // The reason itself (the first line; the log tail follows) names the port.
        let reason = message.lines().next().unwrap_or_default();
        assert!(
            names_busy_port(reason, port),
            "the reason does not name the busy port {port}: {message}"
        );
        // And who holds it: this test process.
        assert!(
            reason.contains(&format!("pid {}", std::process::id())),
            "the reason does not name the holder: {message}"
        );
        assert!(
            took < Duration::from_secs(10),
            "{name}: the failure took {took:?}, its startup_timeout is 60 s"
        );
    }
    // The operator sees the same reason.
    let ctl = stack.ctl(&["activate", "alpha"]).await;
    let port = stack.model("alpha").port;
    assert_eq!(ctl.code, Some(1), "{ctl:?}");
    assert!(
        format!("{}\n{}", ctl.stdout, ctl.stderr)
            .lines()
            .any(|line| names_busy_port(line, port)),
        "{ctl:?}"
    );
    assert!(ctl.took < Duration::from_secs(10), "{ctl:?}");
    assert!(stack.backend_processes().is_empty());

    // Once the port is free the models start (after the gateway's failure backoff).
    drop(foreign);
    for name in ["alpha", "tabby"] {
        testkit::wait_for(&format!("{name} to serve"), testkit::DEADLINE, || async {
            let reply = stack.chat(name, false, 2).await;
            match judge(name, false, &reply) {
                Verdict::Served => Some(()),
                Verdict::Error { status: 503, .. } => None,
                other => panic!("{name}: {other:?}"),
            }
        })
        .await;
    }
}
