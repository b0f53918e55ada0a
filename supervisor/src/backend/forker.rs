//! All forks of guards happen on one thread that lives as long as the process: the
//! guard's parent-death signal fires when the thread that forked it exits, and a tokio
//! worker or blocking-pool thread may exit long before the supervisor does.

use std::sync::{Mutex, OnceLock, mpsc};

type Job = Box<dyn FnOnce() + Send>;

static JOBS: OnceLock<Option<Mutex<mpsc::Sender<Job>>>> = OnceLock::new();

fn jobs() -> Option<&'static Mutex<mpsc::Sender<Job>>> {
    JOBS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("gpuswap-forker".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    })
    .as_ref()
}

/// Spawns `command` from the forker thread, registered with the caller's runtime.
pub(super) fn spawn(
    mut command: tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    let runtime = tokio::runtime::Handle::current();
    let Some(jobs) = jobs() else {
        // No thread to be had: fork here, the best that is left.
        return command.spawn();
    };
    let (done_tx, done_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _entered = runtime.enter();
        let _ = done_tx.send(command.spawn());
    });
    let sent = jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if sent.is_err() {
        return Err(std::io::Error::other("the forker thread is gone"));
    }
    done_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the forker thread is gone")))
}
