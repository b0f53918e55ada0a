//! `requires` paths, looked at without stalling the actor: a stat on a hung mount (NFS,
//! FUSE) can block for minutes. Each look runs on a thread of its own and gets
//! [`LOOK_BOUND`]; a path whose look still hangs is reported as not answering, at once and
//! without a new thread, until that look returns.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, mpsc},
    time::Duration,
};

use gpuswap::config::ModelConfig;

/// How long the actor waits for one look (a stat takes microseconds when the disk answers).
const LOOK_BOUND: Duration = Duration::from_millis(20);

/// Why a model cannot start now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unmet {
    Missing(PathBuf),
    NotAnswering(PathBuf),
}

impl std::fmt::Display for Unmet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unmet::Missing(path) => write!(f, "missing {}", path.display()),
            Unmet::NotAnswering(path) => write!(
                f,
                "cannot tell whether {} exists: its file system does not answer",
                path.display()
            ),
        }
    }
}

pub(super) struct Requirements {
    /// Paths whose look has not returned yet.
    hanging: Arc<Mutex<HashSet<PathBuf>>>,
    exists: fn(&Path) -> bool,
}

impl Default for Requirements {
    fn default() -> Self {
        Self::with(Path::exists)
    }
}

impl Requirements {
    fn with(exists: fn(&Path) -> bool) -> Self {
        Requirements {
            hanging: Arc::default(),
            exists,
        }
    }

    /// The first path of `requires` that is missing or does not answer.
    pub(super) fn unmet(&self, config: &ModelConfig) -> Option<Unmet> {
        config.requires.iter().find_map(|path| self.look(path))
    }

    fn look(&self, path: &Path) -> Option<Unmet> {
        let not_answering = || Some(Unmet::NotAnswering(path.to_owned()));
        {
            let mut hanging = self.hanging.lock().unwrap_or_else(PoisonError::into_inner);
            if !hanging.insert(path.to_owned()) {
                return not_answering();
            }
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let (hanging, exists, owned) = (self.hanging.clone(), self.exists, path.to_owned());
        let spawned = std::thread::Builder::new()
            .name("gpuswap-requires".into())
            .spawn(move || {
                let found = exists(&owned);
                hanging
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&owned);
                let _ = tx.send(found);
            });
        if spawned.is_err() {
            self.hanging
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(path);
            return not_answering();
        }
        match rx.recv_timeout(LOOK_BOUND) {
            Ok(true) => None,
            Ok(false) => Some(Unmet::Missing(path.to_owned())),
            Err(_) => not_answering(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// A stat that hangs (a mount that does not answer) for paths named `hung`.
    fn hangs_on_hung(path: &Path) -> bool {
        if path.ends_with("hung") {
            std::thread::sleep(Duration::from_secs(2));
        }
        path.exists()
    }

    fn requiring(paths: &[&Path]) -> ModelConfig {
        let list: Vec<String> = paths
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        let text = format!(
            "[models.m]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\nrequires = [{}]\n",
            list.join(", ")
        );
        gpuswap::config::Config::from_toml(&text)
            .expect("config")
            .models["m"]
            .clone()
    }

    /// A look at a path on a hung mount costs the actor [`LOOK_BOUND`] once, then nothing
    /// while it still hangs; other paths are looked at as usual.
    #[test]
    fn a_path_that_does_not_answer_stalls_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (present, absent, hung) = (
            dir.path().join("present"),
            dir.path().join("absent"),
            dir.path().join("hung"),
        );
        std::fs::write(&present, b"x").expect("write");
        let requirements = Requirements::with(hangs_on_hung);
        assert_eq!(requirements.unmet(&requiring(&[&present])), None);
        assert_eq!(
            requirements.unmet(&requiring(&[&present, &absent])),
            Some(Unmet::Missing(absent.clone()))
        );
        for _ in 0..3 {
            let began = Instant::now();
            let unmet = requirements.unmet(&requiring(&[&present, &hung]));
            assert_eq!(unmet, Some(Unmet::NotAnswering(hung.clone())));
            assert!(
                began.elapsed() < Duration::from_millis(500),
                "{:?}",
                began.elapsed()
            );
        }
        assert!(
            requirements
                .unmet(&requiring(&[&hung]))
                .expect("unmet")
                .to_string()
                .contains("does not answer")
        );
    }
}
