//! Who may call: socket mode, peer credentials, TLS with a bearer token; health service.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    process::{Command, Stdio},
};

use crate::common;
use crate::common::{Mock, Supervisor};
use gpuswap::{ClientOptions, Endpoint, pb};
use testkit::{DEADLINE, Proc};

/// Set in the environment of the child that probes the socket as another user.
const PROBE_SOCKET_ENV: &str = "GPUSWAP_TEST_PROBE_SOCKET";

/// Runs inside a child process started by `peer_credentials_are_checked`, as another user:
/// prints the outcome of one Status call. Ignored in normal runs.
/// A supervisor whose socket every user can reach (mode 0666 in a directory of mode 0755):
/// only its peer check, `check` (an allowed_uids or allowed_gids line), lets them in.
async fn open_to_everyone(test: &str, check: &str) -> Supervisor {
    let sup = Supervisor::prepare(test, &[check, "socket_mode = \"0666\""], vec![]);
    std::fs::set_permissions(sup.dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    sup.write_config();
    sup.launch().await
}

#[tokio::test]
#[ignore = "run by peer_credentials_are_checked as another user"]
async fn probe_socket_as_another_user() {
    let Ok(socket) = std::env::var(PROBE_SOCKET_ENV) else {
        return;
    };
    let mut client = gpuswap::connect(&Endpoint::Unix(socket.into()), &ClientOptions::default())
        .expect("client");
    println!("PROBE_RESULT={}", status_outcome(&mut client).await);
}

/// The outcome of one Status call: "ok" or the gRPC code.
async fn status_outcome(client: &mut gpuswap::SupervisorClient) -> String {
    match client.status(pb::StatusRequest {}).await {
        Ok(_) => "ok".to_owned(),
        Err(status) => format!("{:?}", status.code()),
    }
}

/// The user, and its one supplementary group, of `probe_socket_then_leave_the_group`.
const PEER_USER: u32 = 4545;
const PEER_GROUP: u32 = 4646;

/// Runs inside a child process (as root) started by
/// `supplementary_groups_are_those_the_peer_connected_with`: becomes `PEER_USER` with the one
/// supplementary group `PEER_GROUP` (keeping root as its saved uid), calls Status, leaves the
/// group, and calls again on the same connection. Ignored in normal runs.
#[tokio::test]
#[ignore = "run by supplementary_groups_are_those_the_peer_connected_with"]
async fn probe_socket_then_leave_the_group() {
    let Ok(socket) = std::env::var(PROBE_SOCKET_ENV) else {
        return;
    };
    let changed = |rc: libc::c_int, what: &str| assert_eq!(rc, 0, "{what}");
    // SAFETY: plain system calls; glibc applies them to every thread of the process.
    unsafe {
        changed(libc::setgroups(1, [PEER_GROUP].as_ptr()), "join the group");
        changed(
            libc::setresgid(PEER_USER, PEER_USER, PEER_USER),
            "setresgid",
        );
        changed(libc::setresuid(PEER_USER, PEER_USER, 0), "setresuid");
    }
    let mut client = gpuswap::connect(&Endpoint::Unix(socket.into()), &ClientOptions::default())
        .expect("client");
    let member = status_outcome(&mut client).await;
    // SAFETY: as above.
    unsafe {
        changed(libc::seteuid(0), "regain root through the saved uid");
        changed(libc::setgroups(0, std::ptr::null()), "leave the group");
        changed(libc::seteuid(PEER_USER), "back to the user");
    }
    let left = status_outcome(&mut client).await;
    println!("PROBE_RESULT={member},{left}");
}

/// Calls Status as `uid` from a child process; returns "ok" or the gRPC code.
fn status_as(uid: u32, socket: &std::path::Path, dir: &std::path::Path) -> String {
    run_probe("probe_socket_as_another_user", socket, dir, |command| {
        command.uid(uid).gid(uid);
    })
}

/// Runs the ignored test `probe` of this binary in a child process whose credentials
/// `credentials` sets; returns what it printed as its result.
fn run_probe(
    probe: &str,
    socket: &std::path::Path,
    dir: &std::path::Path,
    credentials: impl FnOnce(&mut Command),
) -> String {
    let out_path = dir.join(format!("{probe}.out"));
    let out = std::fs::File::create(&out_path).expect("probe output");
    let mut command = Command::new(std::env::current_exe().expect("test binary"));
    command
        .args(["--exact", &testkit::test_name(module_path!(), probe)])
        .args(["--include-ignored", "--nocapture"])
        .env(PROBE_SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stderr(out.try_clone().expect("probe output"))
        .stdout(out);
    credentials(&mut command);
    let mut child = Proc::spawn(command);
    let status = child.wait_exit(DEADLINE);
    let output = testkit::read_lossy(&out_path);
    assert!(status.success(), "{probe} failed: {output}");
    output
        .lines()
        .find_map(|l| l.strip_prefix("PROBE_RESULT="))
        .unwrap_or_else(|| panic!("no probe result: {output}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_credentials_are_checked() {
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 {
        // Not root: the only peer at hand is ourselves.
        let sup =
            Supervisor::start("peer", &[&format!("allowed_uids = [{}]", me + 1)], vec![]).await;
        let mut client = sup.client.clone();
        let error = client
            .status(pb::StatusRequest {})
            .await
            .expect_err("denied");
        assert_eq!(error.code(), tonic::Code::PermissionDenied, "{error:?}");
        return;
    }
    let allowed = 4242;
    let other = 4343;
    let sup = open_to_everyone("peer", &format!("allowed_uids = [{allowed}]")).await;
    let (socket, dir) = (sup.socket.clone(), sup.dir.path().to_owned());
    let results = tokio::task::spawn_blocking(move || {
        (
            status_as(allowed, &socket, &dir),
            status_as(other, &socket, &dir),
        )
    })
    .await
    .expect("probes");
    assert_eq!(results.0, "ok", "a listed uid is let in");
    assert_eq!(results.1, "PermissionDenied", "an unlisted uid is refused");
    // Root always is.
    sup.status().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplementary_groups_are_those_the_peer_connected_with() {
    testkit::require_root("calling as another user with other groups");
    let sup = open_to_everyone("peergroups", &format!("allowed_gids = [{PEER_GROUP}]")).await;
    let (socket, dir) = (sup.socket.clone(), sup.dir.path().to_owned());
    let result = tokio::task::spawn_blocking(move || {
        run_probe("probe_socket_then_leave_the_group", &socket, &dir, |_| {})
    })
    .await
    .expect("probe");
    // The peer was a member when it connected: what it did later (or whoever has its pid
    // by now) does not change who is on the other end of that connection.
    assert_eq!(result, "ok,ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_gets_the_configured_mode_and_group() {
    use std::os::unix::fs::MetadataExt;
    let sup = Supervisor::start("mode", &["socket_mode = \"0600\""], vec![]).await;
    let mode = std::fs::metadata(&sup.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Any group of this system other than our own will do.
    let me = nix::unistd::getegid();
    let group = ["daemon", "nogroup", "users", "root"]
        .into_iter()
        .filter_map(|name| nix::unistd::Group::from_name(name).ok().flatten())
        .find(|g| g.gid != me)
        .expect("a system group");
    if nix::unistd::geteuid().is_root() {
        let sup = Supervisor::start(
            "group",
            &[&format!("socket_group = \"{}\"", group.name)],
            vec![],
        )
        .await;
        let meta = std::fs::metadata(&sup.socket).expect("socket");
        assert_eq!(meta.gid(), group.gid.as_raw());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660, "the default mode");
    }

    let sup = Supervisor::prepare(
        "nogroup",
        &["socket_group = \"no-such-group-gpuswap\""],
        vec![],
    );
    sup.write_config();
    let config = sup.config_path.to_str().expect("utf-8 path");
    let (code, stderr) = common::run_to_exit(&["--config", config], sup.dir.path());
    assert_ne!(code, Some(0));
    assert!(stderr.contains("supervisor.socket_group"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let sup = Supervisor::start("health", &[], vec![Mock::new("alpha")]).await;
    let socket = sup.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .expect("channel");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "gpuswap.v1.Supervisor"] {
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            answer.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }

    // Both reflection versions list the service and the health service.
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::{
                ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut answers = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .expect("reflection")
                .into_inner();
            let answer = answers
                .message()
                .await
                .expect("reflection stream")
                .expect("an answer");
            let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
                panic!("not a service list: {answer:?}");
            };
            list.service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>()
        }};
    }
    let (mut v1, mut v1alpha) = (list_services!(v1), list_services!(v1alpha));
    for service in [
        "gpuswap.v1.Supervisor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(v1.iter().any(|n| n == service), "{service}: {v1:?}");
    }
    // Both versions describe the same server.
    v1.sort();
    v1alpha.sort();
    assert_eq!(v1, v1alpha);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_pinned_self_signed_certificate_and_a_rotated_token() {
    let port = testkit::free_port();
    let mut sup = Supervisor::prepare("tls", &[], vec![Mock::new("alpha")]);
    let dir = sup.dir.path().to_owned();
    let (cert, key, token_file) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("token"));
    // The certificate a person makes first (the README's command): self-signed, and a CA
    // (openssl's default), which rustls alone refuses as a server's own; the client trusts
    // it by pinning, given it as the CA file.
    let openssl = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(openssl.success());
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    sup.settings = vec![
        format!("listen = \"https://127.0.0.1:{port}\""),
        format!("tls_cert = \"{}\"", cert.display()),
        format!("tls_key = \"{}\"", key.display()),
        format!("token_file = \"{}\"", token_file.display()),
    ];
    let endpoint: Endpoint = format!("https://localhost:{port}")
        .parse()
        .expect("endpoint");
    let client_with = |token: Option<&str>| {
        gpuswap::connect(
            &endpoint,
            &ClientOptions {
                token: token.map(str::to_owned),
                token_file: None,
                ca_file: Some(cert.clone()),
                ..ClientOptions::default()
            },
        )
        .expect("client")
    };
    sup.client = client_with(Some("s3cret-token"));
    sup.write_config();
    let sup = sup.launch().await;
    assert_eq!(sup.status().await.models.len(), 1);
    sup.activate("alpha", false).await.ready().await;

    for token in [Some("wrong-token"), Some("s3cret-token-and-more"), None] {
        let mut client = client_with(token);
        assert_unauthenticated(client.status(pb::StatusRequest {}).await, token);
        let activate = client
            .activate(pb::ActivateRequest {
                model: "alpha".into(),
                ..Default::default()
            })
            .await;
        assert_unauthenticated(activate, token);
    }

    // A new token, picked up by a Reload call: both work for the grace period (10 minutes
    // by default), so that clients can be given the new one.
    std::fs::write(&token_file, "rotated-token\n").expect("token");
    sup.client
        .clone()
        .reload(pb::ReloadRequest {})
        .await
        .expect("reload with the old token");
    for token in ["rotated-token", "s3cret-token"] {
        client_with(Some(token))
            .status(pb::StatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("{token} after the reload: {e:?}"));
    }
    // And by SIGHUP.
    std::fs::write(&token_file, "third-token\n").expect("token");
    sup.proc.as_ref().expect("running").signal(libc::SIGHUP);
    testkit::wait_for("SIGHUP to pick up the third token", DEADLINE, || async {
        client_with(Some("third-token"))
            .status(pb::StatusRequest {})
            .await
            .ok()
    })
    .await;
    assert_unauthenticated(
        client_with(Some("wrong-token"))
            .status(pb::StatusRequest {})
            .await,
        Some("wrong-token"),
    );
}

/// Asserts that a call made with `token` was refused as unauthenticated.
#[track_caller]
fn assert_unauthenticated<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    token: Option<&str>,
) {
    let error = result.expect_err("refused");
    assert_eq!(
        error.code(),
        tonic::Code::Unauthenticated,
        "{token:?}: {error:?}"
    );
}
