//! The accept loop under hostile or heavy connection patterns: clients that
//! stall inside their headers, and ten thousand idle connections.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use crate::common::{Model, Stack};
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

fn gateway_addr(stack: &Stack) -> SocketAddr {
    stack
        .gateway()
        .base
        .strip_prefix("http://")
        .and_then(|a| a.parse().ok())
        .expect("the gateway's address")
}

async fn assert_serves(stack: &Stack) {
    let health: Value = stack
        .http
        .get(stack.url("/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET /health: {e}{}", stack.logs()))
        .json()
        .await
        .expect("health JSON");
    assert_eq!(health["status"], "ok", "{health}");
    stack.chat_ok("alpha", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_in_its_headers_is_closed_and_others_are_served() {
    let stack = Stack::alpha_with("header-timeout", &["header_timeout = \"1s\""]).await;
    let mut stalled = TcpStream::connect(gateway_addr(&stack)).await.unwrap();
    stalled
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Le")
        .await
        .unwrap();
    let since = Instant::now();
    assert_serves(&stack).await;
    // Closed without an answer: end of stream, or a reset. hyper's own
    // default is 30 s, so a close well before it is the configured timeout.
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("the stalled connection is still open{}", stack.logs()));
    let waited = since.elapsed();
    assert!(
        read.is_err() || answer.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert_serves(&stack).await;
}

fn fd_limit() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

fn set_soft_fd_limit(soft: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: fd_limit().rlim_max,
    };
    // SAFETY: setrlimit reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_are_held_while_the_gateway_serves() {
    const WANTED: u64 = 10_000;
    let hard = fd_limit().rlim_max;
    // Started under the usual soft limit of 1024, the gateway must raise its own.
    set_soft_fd_limit(1024.min(hard));
    let stack = Stack::builder("idle-connections")
        // Idle connections are closed by the header timeout; on a loaded
        // machine the first would go before the last were accepted.
        .gateway("header_timeout = \"10m\"")
        // More than the default 4096 (the cap is lowered to what the open
        // file limit allows, which this test also checks is enough).
        .gateway("max_connections = 12000")
        .model(Model::new("alpha"))
        .start()
        .await;
    set_soft_fd_limit(hard);
    let pid = stack.gateway().proc.pid();
    let (soft, gateway_hard) = testkit::open_files_limit(pid);
    assert_eq!(
        soft, gateway_hard,
        "the gateway did not raise its soft limit"
    );
    // Room for the rest of this process and of the gateway.
    let count = WANTED
        .min(hard.saturating_sub(512))
        .min(soft.saturating_sub(512));
    if count < WANTED {
        eprintln!("NOTE: the open file limit ({hard}) allows only {count} idle connections");
    }

    let addr = gateway_addr(&stack);
    // In batches well below the listen backlog (the gateway asks for 4096,
    // the kernel caps it at somaxconn): a connection that overflows the accept
    // queue can be completed by a SYN cookie on the client side only, and an
    // idle client never learns that it was lost.
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(128);
    let batch_size = (somaxconn / 2).clamp(16, 500);
    // Descriptors of the gateway's own (listener, supervisor, runtime) may
    // come and go meanwhile.
    const SLACK: usize = 16;
    let baseline = testkit::open_fds(pid);
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(count as usize);
    let mut left = count;
    while left > 0 {
        let batch = left.min(batch_size);
        left -= batch;
        let connected: Vec<_> = futures_util::stream::iter(0..batch)
            .map(|_| async move {
                tokio::time::timeout(testkit::DEADLINE, TcpStream::connect(addr)).await
            })
            .buffer_unordered(batch_size as usize)
            .collect()
            .await;
        for connection in connected {
            match connection {
                Ok(Ok(stream)) => idle.push(stream),
                Ok(Err(error)) => panic!("connection {} refused: {error}", idle.len()),
                Err(_) => panic!("connection {} timed out{}", idle.len(), stack.logs()),
            }
        }
        // Every one accepted: the gateway holds a descriptor for each.
        let wanted = baseline + idle.len() - SLACK.min(baseline);
        let waiting = Instant::now();
        while testkit::open_fds(pid) < wanted {
            if waiting.elapsed() > testkit::DEADLINE {
                let listen = Command::new("ss")
                    .args(["-tln", &format!("sport = :{}", addr.port())])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                panic!(
                    "the gateway accepted {} of {} connections (fds {baseline} before)\n{listen}{}",
                    testkit::open_fds(pid) - baseline,
                    idle.len(),
                    stack.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let wanted_fds = idle.len();
    eprintln!(
        "{wanted_fds} connections accepted in {:?}",
        started.elapsed()
    );
    assert_serves(&stack).await;
    drop(idle);
    assert!(testkit::alive(pid), "the gateway died{}", stack.logs());
    assert_serves(&stack).await;
    testkit::wait_for(
        "the idle connections to be closed",
        testkit::DEADLINE,
        || async { (testkit::open_fds(pid) < wanted_fds / 10).then_some(()) },
    )
    .await;
}
