//! gpuswapctl without a supervisor: help, completions, usage errors, and the
//! exit code of an unreachable endpoint.

use std::process::{Command, Output};

use crate::common::{assert_says, gpuswapctl, text};

fn ctl(args: &[&str]) -> Output {
    gpuswapctl(args).output().expect("run gpuswapctl")
}

#[test]
fn help_lists_the_commands_the_global_flags_and_the_exit_codes() {
    let out = ctl(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for command in [
        "status",
        "models",
        "activate",
        "deactivate",
        "logs",
        "watch",
        "reload",
        "completions",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from:\n{help}"
        );
    }
    for flag in [
        "--endpoint",
        "--token-file",
        "--ca-file",
        "--json",
        "--no-color",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    assert!(help.contains("GPUSWAP_ENDPOINT"), "{help}");
    assert!(
        help.contains("unix:///run/gpuswap/supervisor.sock"),
        "{help}"
    );
    for code in [
        "0    success",
        "1    the operation failed",
        "2    usage or configuration error",
        "3    supervisor unreachable",
        "4    unknown model",
        "5    permission or authentication denied",
    ] {
        assert!(
            help.contains(code),
            "exit code line {code:?} missing from:\n{help}"
        );
    }
}

#[test]
fn subcommand_help_shows_its_flags_and_the_exit_codes() {
    let activate = text(&ctl(&["activate", "--help"]).stdout);
    assert!(
        activate.contains("--hold") && activate.contains("--force"),
        "{activate}"
    );
    assert!(activate.contains("4    unknown model"), "{activate}");
    let logs = text(&ctl(&["logs", "--help"]).stdout);
    assert!(
        logs.contains("--follow") && logs.contains("[default: 100]"),
        "{logs}"
    );
    let deactivate = text(&ctl(&["deactivate", "--help"]).stdout);
    assert!(deactivate.contains("--all"), "{deactivate}");
}

#[test]
fn completions_are_generated_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef gpuswapctl"),
        ("fish", "complete -c gpuswapctl"),
    ] {
        let out = ctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell} script lacks {marker:?}");
        assert!(
            script.contains("activate") && script.contains("deactivate"),
            "{shell}"
        );
    }
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["no-such-command"][..],
        &["deactivate"],
        &["activate"],
        &["logs", "-n", "many"],
        &["--endpoint", "http://127.0.0.1:7070", "status"],
        &["--endpoint", "unix://relative.sock", "status"],
        &["completions", "tcsh"],
    ] {
        let out = ctl(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn an_unreadable_token_file_is_a_configuration_error() {
    let dir = testkit::short_tempdir();
    let missing = dir.path().join("token");
    let out = ctl(&["--token-file", missing.to_str().unwrap(), "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert_says(&out.stderr, "token file");
}

#[test]
fn a_missing_socket_exits_3_and_names_the_endpoint() {
    let dir = testkit::short_tempdir();
    let endpoint = format!("unix://{}/absent.sock", dir.path().display());
    for args in [
        &["status"][..],
        &["models"],
        &["activate", "m1"],
        &["logs"],
        &["deactivate", "--all"],
    ] {
        let out = gpuswapctl(args)
            .env("GPUSWAP_ENDPOINT", &endpoint)
            .output()
            .expect("run gpuswapctl");
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains(&endpoint), "{args:?}: {stderr}");
        assert!(stderr.contains("no socket"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_socket_nobody_listens_on_exits_3_with_connection_refused() {
    let dir = testkit::short_tempdir();
    let path = dir.path().join("dead.sock");
    // A closed listener leaves its socket file behind: connect(2) is refused.
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    assert!(path.exists());
    let endpoint = format!("unix://{}", path.display());
    let out = ctl(&["--endpoint", &endpoint, "status"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("refused"), "{stderr}");
}

#[test]
fn a_socket_the_user_may_not_open_exits_5() {
    use std::os::unix::fs::PermissionsExt;
    let dir = testkit::short_tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("chmod dir");
    let path = dir.path().join("s.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod socket");
    let endpoint = format!("unix://{}", path.display());
    let ctl = env!("CARGO_BIN_EXE_gpuswapctl");
    // SAFETY: geteuid(2) cannot fail.
    let out = if unsafe { libc::geteuid() } == 0 {
        // Root passes every permission check: run as nobody instead.
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", ctl])
            .args(["--endpoint", &endpoint, "status"])
            .output()
            .expect("setpriv (util-linux) runs gpuswapctl as nobody")
    } else {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000))
            .expect("chmod socket");
        Command::new(ctl)
            .args(["--endpoint", &endpoint, "status"])
            .output()
            .expect("run gpuswapctl")
    };
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("permission denied"), "{stderr}");
}
