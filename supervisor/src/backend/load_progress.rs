//! How far a backend's load has come, read from what the server itself prints, and how long
//! its recent loads took (kept in the state directory), so that a client sees
//! "45 % (9/20 shards), about 25 s left; last loads took 52 s" instead of a bare "Loading".
//!
//! What each kind prints while it loads (checked against the servers' code):
//! - vLLM and SGLang read safetensors shards under a tqdm bar whose format ends in a newline, so
//!   every step is a line: `Loading safetensors checkpoint shards:  45% Completed | 9/20
//!   [00:05<00:06,  1.50it/s]` (vLLM's engine process prefixes it with `(EngineCore_DP0 pid=N)`,
//!   and tqdm starts it with a carriage return).
//! - llama-server prints its load steps (metadata, tensors, a line of dots, the context, the
//!   warm-up, "model loaded"); the dots come one per percent on a single line, so only the
//!   steps are seen line by line.
//! - TabbyAPI prints a rich progress bar only to a terminal; its load endpoint streams
//!   `{"module": N, "modules": M, ...}` events, which parse here too.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use gpuswap::config::BackendKind;
use serde::{Deserialize, Serialize};

/// Where a load stands, as the backend said it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadProgress {
    /// 0-100, when the backend's output gives one.
    pub percent: Option<f32>,
    /// What it is doing, in the server's terms ("9/20 shards", "loading tensors").
    pub detail: String,
}

/// The progress a line of `kind`'s output reports, if any.
pub fn parse_line(kind: BackendKind, line: &str) -> Option<LoadProgress> {
    let line = line.trim_start_matches('\r').trim();
    if let Some(progress) = tqdm_bar(line) {
        return Some(progress);
    }
    match kind {
        BackendKind::LlamaServer => llama_server_step(line),
        BackendKind::Tabbyapi => tabby_module_event(line),
        _ => None,
    }
}

/// `DESC:  45% Completed | 9/20 [...]`: the bar format of vLLM's and SGLang's weight loaders.
fn tqdm_bar(line: &str) -> Option<LoadProgress> {
    let marker = line.find("% Completed |")?;
    let before = &line[..marker];
    let percent_start = before
        .rfind(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or(0, |i| i + 1);
    let percent: f32 = before[percent_start..].parse().ok()?;
    let after = line[marker + "% Completed |".len()..].trim_start();
    let counts = after.split_whitespace().next()?;
    let (done, total) = counts.split_once('/')?;
    let (done, total): (u32, u32) = (done.parse().ok()?, total.parse().ok()?);
    let description = before[..percent_start].trim_end().trim_end_matches(':');
    let unit = if description.contains("shards") {
        " shards"
    } else {
        ""
    };
    Some(LoadProgress {
        percent: Some(percent.clamp(0.0, 100.0)),
        detail: format!("{done}/{total}{unit}"),
    })
}

/// llama-server's load steps, in the order it prints them.
fn llama_server_step(line: &str) -> Option<LoadProgress> {
    // Older builds print `main: ...` and the loader's own lines; current ones (llama.cpp as
    // vendored by llama-cpp-python 0.3.36) print `srv    load_model: loading model 'FILE'` and
    // `srv  llama_server: model loaded`.
    const STEPS: &[(&str, f32, &str)] = &[
        ("main: loading model", 2.0, "reading the model"),
        ("load_model: loading model", 2.0, "reading the model"),
        (
            "llama_model_loader: loaded meta data",
            5.0,
            "reading metadata",
        ),
        (
            "load_tensors: loading model tensors",
            10.0,
            "loading tensors",
        ),
        ("llama_context: constructing", 85.0, "creating the context"),
        ("warming up the model", 90.0, "warming up"),
        ("main: model loaded", 99.0, "model loaded"),
        ("llama_server: model loaded", 99.0, "model loaded"),
    ];
    if line.len() >= 8 && line.bytes().all(|b| b == b'.') {
        return Some(LoadProgress {
            percent: Some(80.0),
            detail: "tensors loaded".into(),
        });
    }
    STEPS
        .iter()
        .find(|(prefix, _, _)| line.contains(prefix))
        .map(|(_, percent, detail)| LoadProgress {
            percent: Some(*percent),
            detail: (*detail).into(),
        })
}

/// One event of TabbyAPI's load stream: `{"model_type":"model","module":3,"modules":40,...}`.
fn tabby_module_event(line: &str) -> Option<LoadProgress> {
    let json = line.strip_prefix("data:").map_or(line, str::trim);
    #[derive(Deserialize)]
    struct Event {
        module: u32,
        modules: u32,
        #[serde(default)]
        model_type: Option<String>,
    }
    let event: Event = serde_json::from_str(json).ok()?;
    if event.modules == 0 {
        return None;
    }
    let kind = event.model_type.unwrap_or_else(|| "model".into());
    Some(LoadProgress {
        percent: Some(100.0 * event.module.min(event.modules) as f32 / event.modules as f32),
        detail: format!("{}/{} {kind} modules", event.module, event.modules),
    })
}

/// What is being waited for: a start from nothing, or a wake from sleep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Load,
    Wake,
}

/// How many past durations are kept per model and operation.
const KEPT: usize = 5;

/// Each model's recent load and wake durations, kept in a small JSON file so that a restarted
/// supervisor still knows them. Writes are best effort: losing the history only loses the
/// estimate.
pub struct LoadHistory {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, BTreeMap<Operation, VecDeque<u64>>>>,
}

impl LoadHistory {
    /// The history beside `state_file` (None: kept in memory only).
    pub fn open(state_file: Option<&Path>) -> Self {
        let path = state_file.map(|f| {
            f.parent()
                .unwrap_or_else(|| Path::new("."))
                .join("load-times.json")
        });
        let entries = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        LoadHistory {
            path,
            entries: Mutex::new(entries),
        }
    }

    /// Records that `operation` of `model` took `took`.
    pub fn record(&self, model: &str, operation: Operation, took: Duration) {
        let snapshot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let kept = entries
                .entry(model.to_owned())
                .or_default()
                .entry(operation)
                .or_default();
            kept.push_back(took.as_millis().min(u128::from(u64::MAX)) as u64);
            while kept.len() > KEPT {
                kept.pop_front();
            }
            serde_json::to_vec_pretty(&*entries)
        };
        if let (Some(path), Ok(bytes)) = (&self.path, snapshot) {
            // Written aside and renamed, so a crash never leaves half a file.
            let aside = path.with_extension("json.new");
            let written =
                std::fs::write(&aside, bytes).and_then(|()| std::fs::rename(&aside, path));
            if let Err(error) = written {
                tracing::debug!(path = %path.display(), %error, "load history not saved");
            }
        }
    }

    /// The median of the recent durations of `operation` (None: never seen).
    pub fn typical(&self, model: &str, operation: Operation) -> Option<Duration> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept: Vec<u64> = entries
            .get(model)?
            .get(&operation)?
            .iter()
            .copied()
            .collect();
        if kept.is_empty() {
            return None;
        }
        kept.sort_unstable();
        Some(Duration::from_millis(kept[kept.len() / 2]))
    }
}

/// The time left of a load `elapsed` into it: from the backend's own percentage once it is
/// past the first tenth (earlier it is mostly start-up, not loading), else from the typical
/// duration of past loads.
pub fn time_left(
    elapsed: Duration,
    percent: Option<f32>,
    typical: Option<Duration>,
) -> Option<Duration> {
    match (percent, typical) {
        (Some(p), _) if (10.0..100.0).contains(&p) => {
            Some(elapsed.mul_f64(f64::from(100.0 - p) / f64::from(p)))
        }
        (_, Some(typical)) => Some(typical.saturating_sub(elapsed)),
        (Some(_), None) | (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(percent: f32, detail: &str) -> Option<LoadProgress> {
        Some(LoadProgress {
            percent: Some(percent),
            detail: detail.into(),
        })
    }

    #[test]
    fn vllm_and_sglang_shard_bars() {
        let vllm = "(EngineCore_DP0 pid=4242) \rLoading safetensors checkpoint shards:  45% Completed | 9/20 [00:05<00:06,  1.50it/s]";
        assert_eq!(
            parse_line(BackendKind::Vllm, vllm),
            progress(45.0, "9/20 shards")
        );
        let sglang = "\rLoading safetensors checkpoint shards: 100% Completed | 2/2 [00:01<00:00,  1.05it/s]";
        assert_eq!(
            parse_line(BackendKind::Sglang, sglang).and_then(|p| p.percent),
            Some(100.0)
        );
        let start = "Loading safetensors checkpoint shards:   0% Completed | 0/4 [00:00<?, ?it/s]";
        assert_eq!(
            parse_line(BackendKind::Vllm, start),
            progress(0.0, "0/4 shards")
        );
        assert_eq!(
            parse_line(BackendKind::Vllm, "INFO:     Application startup complete."),
            None
        );
        assert_eq!(parse_line(BackendKind::Vllm, "100% Completed | x/y"), None);
    }

    #[test]
    fn llama_server_steps() {
        let step = |line| parse_line(BackendKind::LlamaServer, line).and_then(|p| p.percent);
        assert_eq!(
            step("load_tensors: loading model tensors, this can take a while... (mmap = true)"),
            Some(10.0)
        );
        assert_eq!(
            step(".........................................."),
            Some(80.0)
        );
        assert_eq!(step("main: model loaded"), Some(99.0));
        assert_eq!(
            step("0.00.003.101 I srv    load_model: loading model '/m/tiny.gguf'"),
            Some(2.0)
        );
        assert_eq!(
            step("0.00.200.000 I srv  llama_server: model loaded"),
            Some(99.0)
        );
        assert_eq!(step("..."), None);
        assert_eq!(step("srv  update_slots: all slots are idle"), None);
    }

    #[test]
    fn tabby_load_stream_events() {
        let event =
            r#"data: {"model_type":"model","module":10,"modules":40,"status":"processing"}"#;
        assert_eq!(
            parse_line(BackendKind::Tabbyapi, event),
            progress(25.0, "10/40 model modules")
        );
        assert_eq!(parse_line(BackendKind::Tabbyapi, "{}"), None);
    }

    #[test]
    fn the_history_keeps_the_last_durations_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("supervisor.state");
        let history = LoadHistory::open(Some(&state));
        assert_eq!(history.typical("m", Operation::Load), None);
        for secs in [50, 52, 90, 51, 53, 54] {
            history.record("m", Operation::Load, Duration::from_secs(secs));
        }
        history.record("m", Operation::Wake, Duration::from_secs(2));
        // 50 fell out (five kept): 52, 90, 51, 53, 54 -> median 53.
        let reopened = LoadHistory::open(Some(&state));
        assert_eq!(
            reopened.typical("m", Operation::Load),
            Some(Duration::from_secs(53))
        );
        assert_eq!(
            reopened.typical("m", Operation::Wake),
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn time_left_prefers_the_backends_percentage() {
        let s = Duration::from_secs;
        assert_eq!(time_left(s(10), Some(50.0), Some(s(100))), Some(s(10)));
        assert_eq!(time_left(s(10), Some(5.0), Some(s(30))), Some(s(20)));
        assert_eq!(time_left(s(40), None, Some(s(30))), Some(s(0)));
        assert_eq!(time_left(s(10), None, None), None);
    }
}
