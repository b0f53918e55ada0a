//! The shipped configurations must pass the same validation the daemons run.

use gpuswap::config::{BackendKind, Config};

/// Loads a configuration by its path from the repository root.
fn load(path: &str) -> Config {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{path}: {e}"));
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{path}: {}", gpuswap::error_chain(&e)))
}

#[test]
fn demo_config_has_the_four_mock_models() {
    let c = load("deploy/demo.toml");
    assert_eq!(c.models.len(), 4);
    let (a, b) = (&c.models["qwen-sglang"], &c.models["llama-sglang"]);
    assert!(
        a.conflicts_with(b),
        "the two SGLang-like models share GPU 0 and port 30000"
    );
    assert!(
        !a.conflicts_with(&c.models["phi-vllm"]),
        "the vLLM-like model runs beside them"
    );
    assert!(c.models["monstral-tabby"].api_key.is_some());
}

#[test]
fn blackwell_example_is_the_seed_setup() {
    let c = load("deploy/examples/blackwell.toml");
    let sglang: Vec<_> = c
        .models
        .iter()
        .filter(|(_, m)| m.kind == BackendKind::Sglang)
        .collect();
    assert_eq!(sglang.len(), 5);
    for (name, m) in &sglang {
        assert_eq!(m.port, 30000, "{name}");
        let cmd = m.command.join(" ");
        for flag in [
            "--attention-backend triton",
            "--mem-fraction-static 0.88",
            "--chunked-prefill-size 8192",
        ] {
            assert!(cmd.contains(flag), "{name}: {flag} missing");
        }
    }
    for (name, m) in &sglang {
        // --mem-fraction-static 0.88 of a 96 GB card, plus CUDA context and graphs.
        assert_eq!(m.vram, Some(87 << 30), "{name}");
    }
    let tabby = &c.models["monstral-123b-exl2-4bpw"];
    assert_eq!(tabby.vram, Some(70 << 30));
    assert_eq!(tabby.kind, BackendKind::Tabbyapi);
    assert_eq!(tabby.port, 5000);
    assert!(!tabby.requires.is_empty());
}
