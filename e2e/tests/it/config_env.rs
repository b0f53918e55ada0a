//! Environment overrides (`GPUSWAP__SECTION__KEY`) sit on top of the file. The checks set
//! and remove process environment variables, which every other test's children would
//! inherit: they run alone in a child process of this test binary.

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
    let path = dir.path().join("g.toml");
    std::fs::write(
        &path,
        "[gateway]\nlisten = \"127.0.0.1:8002\"\n[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 8000\n",
    )
    .unwrap();
    // SAFETY: the only test in this process; nothing reads the environment concurrently.
    unsafe {
        std::env::set_var("GPUSWAP__GATEWAY__LISTEN", "127.0.0.1:9999");
        std::env::set_var("GPUSWAP__SUPERVISOR__MIN_RESIDENCY", "2s");
    }
    let c = Config::load(&path).unwrap();
    assert_eq!(c.gateway.listen, "127.0.0.1:9999");
    assert_eq!(
        c.supervisor.min_residency,
        std::time::Duration::from_secs(2)
    );
    assert_eq!(c.models["a"].port, 8000);

    unsafe { std::env::set_var("GPUSWAP__GATEWAY__LISTEN", "not an address") };
    let e = Config::load(&path).unwrap_err().to_string();
    assert!(e.contains("gateway.listen"), "{e}");

    unsafe { std::env::remove_var("GPUSWAP__GATEWAY__LISTEN") };

    // The Kubernetes DaemonSet names each box and its pod address this way
    // (deploy/kubernetes/boxes.yaml): keys inside the file's `register` table.
    let registered = dir.path().join("r.toml");
    std::fs::write(
        &registered,
        "[gateway]\nregister = { etcd = [\"http://e:2379\"], name = \"set-by-env\", advertise = \"0.0.0.0:8002\" }\n",
    )
    .unwrap();
    unsafe {
        std::env::set_var("GPUSWAP__GATEWAY__REGISTER__NAME", "node-7");
        std::env::set_var("GPUSWAP__GATEWAY__REGISTER__ADVERTISE", "10.1.2.3:8002");
    }
    let register = Config::load(&registered).unwrap().gateway.register.unwrap();
    assert_eq!(
        (register.name.as_str(), register.advertise.as_str()),
        ("node-7", "10.1.2.3:8002")
    );
    assert_eq!(register.etcd, ["http://e:2379"]);
    unsafe {
        std::env::remove_var("GPUSWAP__GATEWAY__REGISTER__NAME");
        std::env::remove_var("GPUSWAP__GATEWAY__REGISTER__ADVERTISE");
    }

    let e = Config::load(&dir.path().join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml") && e.contains("not found"), "{e}");
}
