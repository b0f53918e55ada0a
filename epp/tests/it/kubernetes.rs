//! The Kubernetes manifests (deploy/kubernetes/), checked offline: there is no cluster here.
//! Kubernetes' own schemas (kubernetes-validate, strict), the CRD schemas of the InferencePool,
//! the HTTPRoute and the Gateway (vendored in deploy/kubernetes/crds/), the references between
//! the objects (the pickers' selector, port and RBAC too), and the ConfigMaps' gpuswap.toml
//! through the real loader.

use crate::common;
use std::process::Command;

#[test]
fn the_kubernetes_manifests_validate() {
    let venv = common::tools_venv();
    let out = Command::new(venv.join("bin/python"))
        .arg(common::repo().join("epp/tests/tools/check_manifests.py"))
        .arg(common::repo().join("deploy/kubernetes"))
        .output()
        .expect("run check_manifests.py");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let configs: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let configs = configs.as_object().expect("ConfigMaps");
    assert_eq!(configs.len(), 2, "{configs:?}");
    for (name, text) in configs {
        let text = text.as_str().unwrap();
        if let Err(error) = gpuswap::config::Config::from_toml(text) {
            panic!("ConfigMap {name}: {}\n{text}", gpuswap::error_chain(&error));
        }
    }
}
