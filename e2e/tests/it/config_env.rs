//! Environment overrides (`GPUSWAP__SECTION__KEY`) sit on top of the file. The checks set
//! and remove process environment variables, which every other test's children would
//! inherit: they run alone in a child process of this test binary.

use std::path::{Path, PathBuf};

use gpuswap::config::Config;

/// Set in the child process that runs the checks.
const CHILD_ENV: &str = "GPUSWAP_TEST_CONFIG_ENV_CHILD";

#[test]
fn env_overrides_the_file_and_is_validated() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return testkit::run_test_in_child(
            module_path!(),
            "env_overrides_the_file_and_is_validated",
            |child| {
                child.env(CHILD_ENV, "1");
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        "g.toml",
        "[gateway]\nlisten = \"127.0.0.1:8002\"\n[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 8000\n",
    );
    set_env(&[
        ("GPUSWAP__GATEWAY__LISTEN", Some("127.0.0.1:9999")),
        ("GPUSWAP__SUPERVISOR__MIN_RESIDENCY", Some("2s")),
    ]);
    let c = Config::load(&path).unwrap();
    assert_eq!(c.gateway.listen, "127.0.0.1:9999");
    assert_eq!(
        c.supervisor.min_residency,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(c.models["a"].port, 8000);

    set_env(&[("GPUSWAP__GATEWAY__LISTEN", Some("not an address"))]);
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("gateway.listen"), "{e}");

    set_env(&[("GPUSWAP__GATEWAY__LISTEN", None)]);

    // The Kubernetes DaemonSet names each box and its pod address this way
    // (deploy/kubernetes/boxes.yaml): keys inside the file's `register` table.
    let registered = write_config(
        dir.path(),
        "r.toml",
        "[gateway]\nregister = { etcd = [\"http://e:2379\"], name = \"set-by-env\", advertise = \"0.0.0.0:8002\" }\n",
    );
    set_env(&[
        ("GPUSWAP__GATEWAY__REGISTER__NAME", Some("node-7")),
        (
            "GPUSWAP__GATEWAY__REGISTER__ADVERTISE",
            Some("10.1.2.3:8002"),
        ),
    ]);
    let register = Config::load(&registered).unwrap().gateway.register.unwrap();
    assert_eq!(
        (register.name.as_str(), register.advertise.as_str()),
        ("node-7", "10.1.2.3:8002")
    );
    assert_eq!(register.etcd, ["http://e:2379"]);
    set_env(&[
        ("GPUSWAP__GATEWAY__REGISTER__NAME", None),
        ("GPUSWAP__GATEWAY__REGISTER__ADVERTISE", None),
    ]);

    let e = Config::load(&dir.path().join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml") && e.contains("not found"), "{e}");
}

/// Writes `text` to the configuration file `name` in `dir`.
fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Sets (a value) or removes (None) process environment variables.
fn set_env(vars: &[(&str, Option<&str>)]) {
    for (name, value) in vars {
        // SAFETY: the only test in this process (it runs alone in its child); nothing reads
        // the environment concurrently.
        unsafe {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
}
