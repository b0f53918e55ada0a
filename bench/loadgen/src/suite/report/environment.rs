//! The machine and versions a run measured on, for the report's header.

use std::{path::Path, process::Command};

pub struct Environment {
    pub date: String,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub nginx: String,
    pub litellm: String,
    pub gpuswap: String,
    pub rustc: String,
    /// 1-minute load average before and after the run.
    pub load: (String, String),
}

/// The 1-minute load average.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    (!text.is_empty()).then_some(text)
}

impl Environment {
    pub fn collect(nginx: &str, litellm: &str, load_before: String) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let python = Path::new(litellm).with_file_name("python");
        let litellm_version = command_output(
            &python.display().to_string(),
            &[
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ],
        )
        .unwrap_or_else(|| "not installed".into());
        let commit = command_output("git", &["rev-parse", "--short", "HEAD"])
            .unwrap_or_else(|| "unknown commit".into());
        Self {
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_else(|| "unknown".into()),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: command_output("uname", &["-r"]).unwrap_or_default(),
            nginx: command_output(nginx, &["-v"])
                .map(|v| v.trim_start_matches("nginx version: nginx/").to_owned())
                .unwrap_or_else(|| "not installed".into()),
            litellm: litellm_version,
            gpuswap: format!("{} (commit {commit})", env!("CARGO_PKG_VERSION")),
            rustc: command_output("rustc", &["--version"]).unwrap_or_default(),
            load: (load_before, load_average()),
        }
    }
}
