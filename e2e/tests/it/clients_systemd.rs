//! The systemd units in deploy/systemd: systemd's own checker accepts them,
//! they keep the hardening the design asks for, and the identities and
//! permissions they set up (with the README's install steps) let the
//! unprivileged gateway reach the root supervisor's socket.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use crate::clients_common;
use gpuswap::config::Config;

const SUPERVISOR_UNIT: &str = "deploy/systemd/gpuswap-supervisor.service";
const GATEWAY_UNIT: &str = "deploy/systemd/gpuswap-gateway.service";
/// Where the units (and the README) install the binaries.
const INSTALLED_BIN: &str = "/usr/local/bin";
/// The configurations the units may run with.
const DEPLOY_CONFIGS: [&str; 2] = ["deploy/demo.toml", "deploy/examples/blackwell.toml"];
/// The example a GPU box starts from; the README installs it as the config.
const EXAMPLE_CONFIG: &str = "deploy/examples/blackwell.toml";

/// The `[Service]` settings of a unit file, in order (a key may repeat).
struct Unit {
    path: PathBuf,
    service: Vec<(String, String)>,
}

impl Unit {
    fn load(path: &str) -> Unit {
        let path = clients_common::repo().join(path);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {}", path.display(), gpuswap::error_chain(&e)));
        let mut section = String::new();
        let mut service = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if section == "Service"
                && let Some((key, value)) = line.split_once('=')
            {
                service.push((key.trim().to_owned(), value.trim().to_owned()));
            }
        }
        Unit { path, service }
    }

    /// The effective value of a setting (the last assignment wins).
    fn get(&self, key: &str) -> Option<&str> {
        self.service
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn expect(&self, key: &str) -> &str {
        self.get(key)
            .unwrap_or_else(|| panic!("{} has no {key}=", self.path.display()))
    }

    fn is_yes(&self, key: &str) -> bool {
        matches!(self.get(key), Some("yes" | "true" | "1" | "on"))
    }
}

/// A systemd time span ("120", "2min", "90s"); a bare number is seconds.
fn time_span(value: &str) -> Duration {
    if let Ok(seconds) = value.parse::<u64>() {
        return Duration::from_secs(seconds);
    }
    humantime::parse_duration(value).unwrap_or_else(|e| panic!("time span {value:?}: {e}"))
}

fn load_config(path: &str) -> Config {
    let path = clients_common::repo().join(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), gpuswap::error_chain(&e)));
    Config::from_toml(&text)
        .unwrap_or_else(|e| panic!("{}: {}", path.display(), gpuswap::error_chain(&e)))
}

#[test]
fn systemd_analyze_verify_accepts_both_units() {
    assert!(
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-analyze is not installed: `apt-get install systemd` (.ci/run does), or leave \
         this test out with `-- --skip systemd_analyze_verify_accepts_both_units`"
    );
    // Copies whose binaries exist: verify checks that ExecStart is executable.
    let dir = testkit::short_tempdir();
    let mut copies = Vec::new();
    for unit in [SUPERVISOR_UNIT, GATEWAY_UNIT] {
        let source = clients_common::repo().join(unit);
        let mut text = std::fs::read_to_string(&source).expect("unit file");
        for binary in ["gpuswap-supervisor", "gpuswap-gateway"] {
            text = text.replace(
                &format!("{INSTALLED_BIN}/{binary}"),
                &testkit::bin(binary).display().to_string(),
            );
        }
        assert!(
            !text.contains(INSTALLED_BIN),
            "{unit}: a binary path left to rewrite:\n{text}"
        );
        let copy = dir.path().join(source.file_name().expect("unit name"));
        std::fs::write(&copy, text).expect("write unit copy");
        copies.push(copy);
    }
    // Both at once, so that the gateway's Wants=/After= find the supervisor.
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .current_dir(dir.path())
        .output()
        .expect("run systemd-analyze");
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // verify exits 0 on settings it ignores (unknown keys, bad values), so its
    // output must be empty too.
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify ({}):\n{complaints}",
        output.status
    );
}

#[test]
fn units_keep_the_hardening_the_design_asks_for() {
    let supervisor = Unit::load(SUPERVISOR_UNIT);
    let gateway = Unit::load(GATEWAY_UNIT);

    // The supervisor is root (it drops to each model's user), and systemd ends
    // whatever is left in its cgroup, after the backends' own stop timeouts.
    assert_eq!(supervisor.get("User").unwrap_or("root"), "root");
    assert_eq!(supervisor.expect("KillMode"), "control-group");
    let stop_timeout = time_span(supervisor.expect("TimeoutStopSec"));
    for path in DEPLOY_CONFIGS {
        for (name, model) in &load_config(path).models {
            assert!(
                stop_timeout > model.stop_timeout,
                "TimeoutStopSec={stop_timeout:?} must exceed {path} {name}'s stop_timeout {:?}",
                model.stop_timeout
            );
        }
    }
    let runtime = format!("/run/{}/", supervisor.expect("RuntimeDirectory"));
    let example = load_config(EXAMPLE_CONFIG).supervisor;
    for (what, path) in [
        (
            "listen",
            example.listen.trim_start_matches("unix://").to_owned(),
        ),
        ("state_file", example.state_file.display().to_string()),
    ] {
        assert!(
            path.starts_with(&runtime),
            "{EXAMPLE_CONFIG}: supervisor.{what} {path} is outside the unit's RuntimeDirectory {runtime}"
        );
    }

    // The gateway is unprivileged, reaches the socket through its group, and
    // is confined.
    assert!(
        gateway.is_yes("DynamicUser") || gateway.get("User").is_some_and(|u| u != "root"),
        "the gateway runs as DynamicUser or a dedicated user"
    );
    let socket_group = example
        .socket_group
        .unwrap_or_else(|| panic!("{EXAMPLE_CONFIG} names the socket's group"));
    let groups: Vec<&str> = gateway
        .get("SupplementaryGroups")
        .unwrap_or_default()
        .split_whitespace()
        .chain(gateway.get("Group"))
        .collect();
    assert!(
        groups.contains(&socket_group.as_str()),
        "the gateway is in the socket's group {socket_group}: {groups:?}"
    );
    assert!(gateway.is_yes("NoNewPrivileges"));
    assert!(gateway.is_yes("PrivateTmp"));
    assert!(
        matches!(
            gateway.get("ProtectSystem"),
            Some("strict" | "full" | "yes")
        ),
        "ProtectSystem={:?}",
        gateway.get("ProtectSystem")
    );
}

/// The mode and group the README's install step gives the config file.
fn readme_config_install() -> (u32, Option<String>) {
    let readme = std::fs::read_to_string(clients_common::repo().join("README.md")).expect("README");
    let line = readme
        .lines()
        .find(|l| l.contains("install ") && l.contains("/etc/gpuswap/gpuswap.toml"))
        .expect("the README installs /etc/gpuswap/gpuswap.toml");
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |flag: &str| {
        words
            .iter()
            .position(|w| *w == flag)
            .and_then(|i| words.get(i + 1))
            .map(|w| w.to_string())
    };
    let mode = after("-m").unwrap_or_else(|| "755".into());
    let mode = u32::from_str_radix(&mode, 8).unwrap_or_else(|e| panic!("mode {mode}: {e}"));
    (mode, after("-g"))
}

/// The gid of a group in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name))
                .then(|| fields.get(2)?.parse().ok())
                .flatten()
        })
}

/// The identity systemd gives a DynamicUser= service (from its 61184–65519 range).
const DYNAMIC_UID: u32 = 61_184;

/// Lays out what systemd and the README's install steps create (the runtime
/// directory with the supervisor unit's mode and owner, the socket with the
/// example's mode and group, the config file with the README's mode and group)
/// and runs the gateway as the gateway unit's identity would be: an
/// unprivileged uid whose only extra group is the unit's SupplementaryGroups.
/// The real group (gpuswap) does not exist here: an existing unprivileged
/// group stands in for it everywhere.
#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_units_user_reaches_the_supervisor_units_socket() {
    testkit::require_root("taking the units' identities");
    let supervisor_unit = Unit::load(SUPERVISOR_UNIT);
    let gateway_unit = Unit::load(GATEWAY_UNIT);
    let example = load_config(EXAMPLE_CONFIG).supervisor;
    let unit_group = example.socket_group.clone().expect("socket_group");
    let (stand_in, stand_in_gid) = ["nogroup", "users"]
        .into_iter()
        .find_map(|g| Some((g, group_id(g)?)))
        .expect("an unprivileged group to stand in for the socket's group");
    let gid_of = |group: &str| {
        if group == unit_group {
            stand_in_gid
        } else {
            group_id(group).unwrap_or_else(|| panic!("no group {group} here"))
        }
    };

    let root = testkit::short_tempdir();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // RuntimeDirectory=: owned by the unit's User/Group, with RuntimeDirectoryMode (default 0755).
    let runtime = root
        .path()
        .join("run")
        .join(supervisor_unit.expect("RuntimeDirectory"));
    std::fs::create_dir_all(&runtime).expect("runtime dir");
    let runtime_mode = supervisor_unit
        .get("RuntimeDirectoryMode")
        .unwrap_or("0755");
    let runtime_mode = u32::from_str_radix(runtime_mode, 8).expect("RuntimeDirectoryMode");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(runtime_mode))
        .expect("chmod runtime dir");
    assert_eq!(supervisor_unit.get("User").unwrap_or("root"), "root");
    let runtime_gid = supervisor_unit.get("Group").map(gid_of).unwrap_or(0);
    std::os::unix::fs::chown(&runtime, Some(0), Some(runtime_gid)).expect("chown runtime dir");

    let socket = runtime.join("supervisor.sock");
    let gateway_port = testkit::free_port();
    let config = format!(
        "[supervisor]\nlisten = \"unix://{socket}\"\nsocket_mode = \"{mode}\"\nsocket_group = \"{stand_in}\"\n\
         state_file = \"{state}\"\n\n[gateway]\nlisten = \"127.0.0.1:{gateway_port}\"\n\
         supervisor = \"unix://{socket}\"\n",
        socket = socket.display(),
        mode = example.socket_mode,
        state = runtime.join("supervisor.state").display(),
    );
    // `install -D -m MODE [-g GROUP]` as root: owner root, group root unless named.
    let etc = root.path().join("etc/gpuswap");
    std::fs::create_dir_all(&etc).expect("etc dir");
    let config_path = etc.join("gpuswap.toml");
    std::fs::write(&config_path, config).expect("write config");
    let (config_mode, config_group) = readme_config_install();
    std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(config_mode))
        .expect("chmod config");
    let config_gid = config_group.as_deref().map(gid_of).unwrap_or(0);
    std::os::unix::fs::chown(&config_path, Some(0), Some(config_gid)).expect("chown config");

    let logs = root.path().join("logs");
    std::fs::create_dir_all(&logs).expect("log dir");
    let _supervisor =
        clients_common::spawn_supervisor(&config_path, &socket, &logs.join("sup.log")).await;

    // The gateway unit's identity: its own uid and gid, plus SupplementaryGroups.
    let (uid, gid) = if gateway_unit.is_yes("DynamicUser") {
        (DYNAMIC_UID, DYNAMIC_UID)
    } else {
        // A dedicated user: any unprivileged uid stands in for it.
        (
            DYNAMIC_UID,
            gateway_unit.get("Group").map(gid_of).unwrap_or(DYNAMIC_UID),
        )
    };
    let groups: Vec<libc::gid_t> = gateway_unit
        .get("SupplementaryGroups")
        .unwrap_or_default()
        .split_whitespace()
        .map(gid_of)
        .collect();
    let mut command = Command::new(testkit::bin("gpuswap-gateway"));
    command.arg("--config").arg(&config_path);
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _gateway = clients_common::spawn_gateway_command(
        command,
        &format!("http://127.0.0.1:{gateway_port}"),
        &logs.join("gw.log"),
    )
    .await;
}
