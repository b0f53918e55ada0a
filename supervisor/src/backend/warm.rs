//! Warm weights: while a swap drains and stops the old model, the next model's weight files
//! are read into the page cache, so that the backend's own load reads them from RAM instead
//! of the disk. Most of a cold load of a large model is this read (40-70 GB).
//!
//! The read runs on a blocking thread beside the swap and never delays it: the swap starts
//! the backend when the GPUs are free, whether the warming is done or not (the two then share
//! the page cache). It stops at a budget of the memory the kernel says is available, so it
//! never pushes out more than the system can spare, and when the swap no longer needs it.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuswap::{config::ModelConfig, pb::LogStream};

use super::logs::LogBuffer;

/// The share of the available memory that warming may fill.
const BUDGET_SHARE: f64 = 0.5;
/// Read size: large enough to keep the disk streaming, small enough to stop soon when asked.
const CHUNK: usize = 4 << 20;
/// Files found by walking a directory named in `requires`, at the most.
const MAX_FILES: usize = 10_000;

/// What one warming did.
#[derive(Debug, Default, PartialEq)]
pub struct Warmed {
    pub files: usize,
    pub bytes: u64,
    /// Bytes left cold because the budget ran out (or the warming was cancelled).
    pub skipped: u64,
    pub took: Duration,
}

/// The files whose contents the model's load reads: its `weights` patterns, or else every
/// file under its `requires` paths.
pub fn weight_files(config: &ModelConfig) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if config.weights.is_empty() {
        for path in &config.requires {
            walk(path, &mut files);
        }
    } else {
        for pattern in &config.weights {
            expand(Path::new(pattern), &mut files);
        }
    }
    files.sort();
    files.dedup();
    files
}

/// `dir/*.safetensors`: a pattern in the last component only (the usual shape of a weights
/// glob); a path without one is taken as it is.
fn expand(pattern: &Path, files: &mut Vec<PathBuf>) {
    let name = pattern
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        walk(pattern, files);
        return;
    }
    let Some(dir) = pattern.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if gpuswap::glob_match(&name, &entry.file_name().to_string_lossy()) {
            walk(&entry.path(), files);
        }
    }
}

/// A file, or the regular files below a directory.
fn walk(path: &Path, files: &mut Vec<PathBuf>) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_file() {
        if files.len() < MAX_FILES {
            files.push(path.to_owned());
        }
    } else if meta.is_dir()
        && let Ok(entries) = std::fs::read_dir(path)
    {
        for entry in entries.flatten() {
            walk(&entry.path(), files);
        }
    }
}

/// The memory the kernel can give without swapping (`MemAvailable`), in bytes.
pub fn available_memory() -> Option<u64> {
    use procfs::Current as _;
    let meminfo = procfs::Meminfo::current().ok()?;
    meminfo.mem_available
}

/// How much warming may read now.
pub fn budget() -> u64 {
    available_memory().map_or(0, |bytes| (bytes as f64 * BUDGET_SHARE) as u64)
}

/// Reads `files` through the page cache, up to `budget` bytes, until `cancelled` is set.
/// Blocking: run it on a blocking thread.
pub fn warm(files: &[PathBuf], budget: u64, cancelled: &AtomicBool) -> Warmed {
    let started = Instant::now();
    let mut warmed = Warmed::default();
    let mut buffer = vec![0u8; CHUNK];
    for path in files {
        let Ok(mut file) = File::open(path) else {
            continue;
        };
        let size = file.metadata().map_or(0, |m| m.len());
        if cancelled.load(Ordering::Relaxed) || warmed.bytes + size > budget {
            warmed.skipped += size;
            continue;
        }
        warmed.files += 1;
        loop {
            if cancelled.load(Ordering::Relaxed) {
                break;
            }
            match file.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => warmed.bytes += n as u64,
            }
        }
    }
    warmed.took = started.elapsed();
    warmed
}

/// A warming under way; dropping it cancels what is left (the swap it served is over).
pub struct WarmGuard {
    cancelled: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
}

impl WarmGuard {
    /// The warming has read all it was going to.
    pub fn finished(&self) -> bool {
        self.finished.load(Ordering::Relaxed)
    }
}

impl Drop for WarmGuard {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }
}

/// Lists `config`'s weight files and reads them into the page cache, both on a blocking
/// thread (listing a large cache, or one on a network mount, takes a while); says so in
/// `logs`, before and after. Nothing to do (and nothing said) without weight files.
pub fn start(config: ModelConfig, logs: LogBuffer) -> WarmGuard {
    let guard = WarmGuard {
        cancelled: Arc::new(AtomicBool::new(false)),
        finished: Arc::new(AtomicBool::new(false)),
    };
    let (cancelled, finished) = (guard.cancelled.clone(), guard.finished.clone());
    tokio::task::spawn_blocking(move || {
        let files = weight_files(&config);
        if !files.is_empty() {
            logs.push(
                LogStream::Supervisor,
                format!(
                    "warming {} weight file(s) into the page cache while the GPUs are freed",
                    files.len()
                ),
            );
            let warmed = warm(&files, budget(), &cancelled);
            logs.push(
                LogStream::Supervisor,
                format!(
                    "weights warmed: {} in {} file(s) in {:.2} s ({} left cold)",
                    human_bytes(warmed.bytes),
                    warmed.files,
                    warmed.took.as_secs_f64(),
                    human_bytes(warmed.skipped),
                ),
            );
        }
        finished.store(true, Ordering::Relaxed);
    });
    guard
}

/// `bytes` for a person: "1.5 GiB", "12 MiB", "900 B".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    UNITS.iter().find(|(_, size)| bytes >= *size).map_or_else(
        || format!("{bytes} B"),
        |(unit, size)| format!("{:.1} {unit}", bytes as f64 / *size as f64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(toml: &str) -> ModelConfig {
        let text = format!("[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n{toml}");
        let mut config = gpuswap::config::Config::from_toml(&text).expect("model config");
        config.models.remove("m").expect("model m")
    }

    #[test]
    fn weights_patterns_and_requires_directories_name_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        for name in ["a.safetensors", "b.safetensors", "config.json", "sub/c.bin"] {
            std::fs::write(root.join(name), b"xyz").unwrap();
        }
        let by_glob = weight_files(&model(&format!(
            "weights = [\"{}/*.safetensors\"]",
            root.display()
        )));
        assert_eq!(
            by_glob,
            vec![root.join("a.safetensors"), root.join("b.safetensors")]
        );
        let by_requires = weight_files(&model(&format!("requires = [\"{}\"]", root.display())));
        assert_eq!(by_requires.len(), 4, "{by_requires:?}");
    }

    #[test]
    fn warming_reads_up_to_the_budget_and_stops_when_cancelled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files: Vec<PathBuf> = (0..3)
            .map(|i| {
                let path = dir.path().join(format!("w{i}"));
                std::fs::write(&path, vec![7u8; 1000]).unwrap();
                path
            })
            .collect();
        let all = warm(&files, u64::MAX, &AtomicBool::new(false));
        assert_eq!((all.files, all.bytes, all.skipped), (3, 3000, 0));
        let some = warm(&files, 2500, &AtomicBool::new(false));
        assert_eq!((some.files, some.bytes, some.skipped), (2, 2000, 1000));
        let none = warm(&files, u64::MAX, &AtomicBool::new(true));
        assert_eq!((none.files, none.bytes, none.skipped), (0, 0, 3000));
        assert!(available_memory().is_some_and(|m| m > 0));
    }
}
