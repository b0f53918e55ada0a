//! GPU memory release after a stop: waits until no stopped process is on a GPU any more.
//!
//! A backend's processes may be reaped while the driver still tears down their CUDA
//! contexts; the next model would then find its memory taken and fail with out-of-memory.
//! So a stop waits, bounded by `gpu_release_timeout`, until none of the stopped pids is in
//! any GPU's running compute or graphics process list.
//!
//! NVML is loaded at run time (`nvml-wrapper` dlopens `libnvidia-ml.so.1`): the binary runs
//! on machines without a driver, which this module announces once and then skips. NVML is
//! initialised once, on first use, and shared by every stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpuswap::config::format_bytes;
use gpuswap::pb::LogStream;
use nvml_wrapper::{
    Device, Nvml, enums::device::UsedGpuMemory, error::NvmlError,
    struct_wrappers::device::ProcessInfo,
};

use super::logs::LogBuffer;

/// The first pause between two looks at the GPU process lists; it doubles up to
/// [`MAX_PAUSE`]. Memory that is already free costs one look and no pause.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// What a stop says (once per supervisor) when it cannot see the GPUs.
const NO_DRIVER_NOTICE: &str = "no NVIDIA driver found, skipping GPU release checks";

/// NVML, or why it is unusable; set by the first stop that asks.
static NVML: OnceLock<Result<Nvml, NvmlUnusable>> = OnceLock::new();

/// Why NVML cannot be used on this machine.
#[derive(Debug, thiserror::Error)]
enum NvmlUnusable {
    /// The library is not installed: no driver on this machine. (NVML's own error repeats
    /// its source in its message: the source is taken from it.)
    #[error("cannot load the NVML library")]
    NoLibrary(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("NVML")]
    Init(#[source] NvmlError),
    #[error("NVML initialisation panicked")]
    Panicked,
}

/// Why the GPUs' process lists could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuQueryError {
    #[error("counting GPUs: {0}")]
    Count(#[source] NvmlError),
    #[error("GPU {index}: {source}")]
    Device {
        index: u32,
        #[source]
        source: NvmlError,
    },
    /// `kind`: compute or graphics.
    #[error("GPU {index}: listing {kind} processes: {source}")]
    Processes {
        index: u32,
        kind: &'static str,
        #[source]
        source: NvmlError,
    },
    #[error("the NVML query panicked: {0}")]
    Panicked(#[source] tokio::task::JoinError),
}

/// Why a sleeping backend's GPU memory was not seen released.
#[derive(Debug, thiserror::Error)]
pub enum NotReleased {
    #[error("NVML did not answer within {0:?}")]
    NoAnswer(Duration),
    /// `held`: how much on which GPU, e.g. "40 GiB on GPU 0".
    #[error("its processes still hold {held} {timeout:?} after the sleep (gpu_release_timeout)")]
    StillHeld { held: String, timeout: Duration },
    #[error(transparent)]
    Query(#[from] GpuQueryError),
}

/// Whether [`NO_DRIVER_NOTICE`] has been said.
static ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// Waits (bounded by `timeout`) until no process of `tree` holds a context on any GPU.
/// Without a usable NVML it says so once (here and in `logs`) and returns at once.
pub async fn wait_released(tree: &[i32], timeout: Duration, logs: &LogBuffer) {
    let started = Instant::now();
    let Some(nvml) = shared_nvml(timeout, logs).await else {
        return;
    };
    // Negative or zero pids never come from NVML; a pid of the tree is a u32 there.
    let tree: Arc<BTreeSet<u32>> = Arc::new(
        tree.iter()
            .filter_map(|&pid| u32::try_from(pid).ok())
            .filter(|&pid| pid > 0)
            .collect(),
    );
    if tree.is_empty() {
        return;
    }
    wait_gone(timeout.saturating_sub(started.elapsed()), logs, || {
        let tree = Arc::clone(&tree);
        async move {
            // NVML calls are ioctls that may block for milliseconds on a busy GPU.
            tokio::task::spawn_blocking(move || tree_on_gpus(nvml, &tree))
                .await
                .unwrap_or_else(|e| Err(GpuQueryError::Panicked(e)))
        }
    })
    .await;
}

/// NVML shared by every stop, initialised on first use (off the runtime's workers: dlopen
/// and nvmlInit may take a while). None, after saying so once, when it cannot be used; None
/// for this stop when the initialisation takes longer than `timeout` (it goes on meanwhile).
async fn shared_nvml(timeout: Duration, logs: &LogBuffer) -> Option<&'static Nvml> {
    let nvml = match NVML.get() {
        Some(nvml) => nvml,
        None => {
            let init = tokio::task::spawn_blocking(|| NVML.get_or_init(init_nvml));
            match tokio::time::timeout(timeout, init).await {
                Ok(Ok(nvml)) => nvml,
                Ok(Err(_)) => NVML.get_or_init(|| Err(NvmlUnusable::Panicked)),
                Err(_) => {
                    let line = format!(
                        "NVML did not initialise within {timeout:?} (gpu_release_timeout): \
                         not waiting for GPU memory"
                    );
                    tracing::warn!(model = %logs.model(), "{line}");
                    logs.push(LogStream::Supervisor, line);
                    return None;
                }
            }
        }
    };
    match nvml {
        Ok(nvml) => Some(nvml),
        Err(why) => {
            if !ANNOUNCED.swap(true, Ordering::Relaxed) {
                let why = gpuswap::error_chain(why);
                tracing::info!(reason = %why, "{NO_DRIVER_NOTICE}");
                logs.push(LogStream::Supervisor, format!("{NO_DRIVER_NOTICE} ({why})"));
            }
            None
        }
    }
}

/// One GPU's memory, as NVML reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryReading {
    pub total: u64,
    pub used: u64,
}

/// Every GPU's memory by NVML index; None without a usable NVML (or when it does not answer
/// within `timeout`).
pub async fn memory(timeout: Duration) -> Option<BTreeMap<u32, MemoryReading>> {
    let look = tokio::task::spawn_blocking(|| {
        let nvml = NVML.get_or_init(init_nvml).as_ref().ok()?;
        let count = nvml.device_count().ok()?;
        let mut readings = BTreeMap::new();
        for index in 0..count {
            // A GPU that cannot be read is left out (it keeps its configured size).
            if let Ok(info) = nvml.device_by_index(index).and_then(|d| d.memory_info()) {
                readings.insert(
                    index,
                    MemoryReading {
                        total: info.total,
                        used: info.used,
                    },
                );
            }
        }
        Some(readings)
    });
    tokio::time::timeout(timeout, look).await.ok()?.ok()?
}

fn init_nvml() -> Result<Nvml, NvmlUnusable> {
    Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(e) => NvmlUnusable::NoLibrary(Box::new(e)),
        e => NvmlUnusable::Init(e),
    })
}

/// The pids of `tree` that some GPU lists as running a compute or graphics context.
fn tree_on_gpus(nvml: &Nvml, tree: &BTreeSet<u32>) -> Result<BTreeSet<u32>, GpuQueryError> {
    let mut on_gpus = BTreeSet::new();
    for_each_gpu(nvml, |index, device, compute| {
        let graphics = match device.running_graphics_processes() {
            Ok(processes) => processes,
            // Compute-only boards have no graphics contexts to list.
            Err(NvmlError::NotSupported) => Vec::new(),
            Err(source) => {
                return Err(GpuQueryError::Processes {
                    index,
                    kind: "graphics",
                    source,
                });
            }
        };
        on_gpus.extend(
            compute
                .iter()
                .chain(&graphics)
                .map(|process| process.pid)
                .filter(|pid| tree.contains(pid)),
        );
        Ok(())
    })?;
    Ok(on_gpus)
}

/// Calls `each` with every GPU's index, handle and compute processes; the first error ends
/// the walk. Every GPU is visited: NVML's device order need not match CUDA_VISIBLE_DEVICES'.
fn for_each_gpu(
    nvml: &Nvml,
    mut each: impl FnMut(u32, &Device<'_>, Vec<ProcessInfo>) -> Result<(), GpuQueryError>,
) -> Result<(), GpuQueryError> {
    let count = nvml.device_count().map_err(GpuQueryError::Count)?;
    for index in 0..count {
        let device = nvml
            .device_by_index(index)
            .map_err(|source| GpuQueryError::Device { index, source })?;
        let compute =
            device
                .running_compute_processes()
                .map_err(|source| GpuQueryError::Processes {
                    index,
                    kind: "compute",
                    source,
                })?;
        each(index, &device, compute)?;
    }
    Ok(())
}

/// Polls `on_gpus` (1 ms doubling to 50 ms) until it lists nothing, for at most `timeout`
/// (a look that hangs included: a GPU that fell off the bus can block NVML for long).
/// Says in `logs` how long it waited, that it gave up, or that it could not look.
async fn wait_gone<F, Fut, E>(timeout: Duration, logs: &LogBuffer, mut on_gpus: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BTreeSet<u32>, E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let deadline = started + timeout;
    let mut pause = FIRST_PAUSE;
    let mut waited = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(look) = tokio::time::timeout(left, on_gpus()).await else {
            let line = format!(
                "NVML did not answer within {timeout:?} (gpu_release_timeout): \
                 stopped waiting for GPU memory"
            );
            tracing::warn!(model = %logs.model(), "{line}");
            logs.push(LogStream::Supervisor, line);
            return;
        };
        match look {
            Ok(held) if held.is_empty() => {
                if waited {
                    logs.push(
                        LogStream::Supervisor,
                        format!("GPU memory released {:?} after the stop", started.elapsed()),
                    );
                }
                return;
            }
            Ok(held) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let pids: Vec<String> = held.iter().map(u32::to_string).collect();
                    let line = format!(
                        "pids {} still hold GPU memory {timeout:?} after the stop \
                         (gpu_release_timeout): the next model may not fit",
                        pids.join(", ")
                    );
                    tracing::warn!(model = %logs.model(), "{line}");
                    logs.push(LogStream::Supervisor, line);
                    return;
                }
                waited = true;
                tokio::time::sleep(pause.min(left)).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(why) => {
                let line = format!(
                    "cannot list the processes on the GPUs ({why}): not waiting for GPU memory"
                );
                tracing::warn!(model = %logs.model(), "{line}");
                logs.push(LogStream::Supervisor, line);
                return;
            }
        }
    }
}

/// What a sleeping backend's processes may keep on one GPU: its CUDA context and allocator
/// pools (vLLM keeps a few hundred MiB after `/sleep`). More means the sleep did not free
/// the GPU.
pub const SLEEP_RESIDUE: u64 = 2 << 30;

/// Waits (bounded by `timeout`) until the processes of `tree` hold at most
/// [`SLEEP_RESIDUE`] on every GPU. Err says what they still hold. Without a usable NVML it
/// cannot look, says so once (as a stop does) and returns Ok.
pub async fn wait_sleep_released(
    tree: &[i32],
    timeout: Duration,
    logs: &LogBuffer,
) -> Result<(), NotReleased> {
    let started = Instant::now();
    let Some(nvml) = shared_nvml(timeout, logs).await else {
        return Ok(());
    };
    let tree: Arc<BTreeSet<u32>> = Arc::new(
        tree.iter()
            .filter_map(|&pid| u32::try_from(pid).ok())
            .filter(|&pid| pid > 0)
            .collect(),
    );
    wait_below(
        timeout.saturating_sub(started.elapsed()),
        SLEEP_RESIDUE,
        || {
            let tree = Arc::clone(&tree);
            async move {
                tokio::task::spawn_blocking(move || tree_memory(nvml, &tree))
                    .await
                    .unwrap_or_else(|e| Err(GpuQueryError::Panicked(e)))
            }
        },
    )
    .await
}

/// The GPU memory the processes of `tree` use, by GPU index (a process whose use NVML
/// cannot tell counts as nothing).
fn tree_memory(nvml: &Nvml, tree: &BTreeSet<u32>) -> Result<BTreeMap<u32, u64>, GpuQueryError> {
    let mut used = BTreeMap::new();
    for_each_gpu(nvml, |index, _, compute| {
        let bytes: u64 = compute
            .iter()
            .filter(|process| tree.contains(&process.pid))
            .map(|process| match process.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => bytes,
                UsedGpuMemory::Unavailable => 0,
            })
            .sum();
        if bytes > 0 {
            used.insert(index, bytes);
        }
        Ok(())
    })?;
    Ok(used)
}

/// Polls `used` (1 ms doubling to 50 ms) until no GPU shows more than `residue`, for at most
/// `timeout`.
async fn wait_below<F, Fut>(timeout: Duration, residue: u64, mut used: F) -> Result<(), NotReleased>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<BTreeMap<u32, u64>, GpuQueryError>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_PAUSE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let look = tokio::time::timeout(left, used())
            .await
            .map_err(|_| NotReleased::NoAnswer(timeout))??;
        let over: Vec<String> = look
            .iter()
            .filter(|(_, bytes)| **bytes > residue)
            .map(|(gpu, bytes)| format!("{} on GPU {gpu}", format_bytes(*bytes)))
            .collect();
        if over.is_empty() {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(NotReleased::StillHeld {
                held: over.join(", "),
                timeout,
            });
        }
        tokio::time::sleep(pause.min(left)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A fake GPU process list that answers `answers` in turn, then the last one for ever.
    struct FakeGpus {
        answers: Vec<Result<Vec<u32>, String>>,
        calls: Mutex<usize>,
    }

    impl FakeGpus {
        fn new(answers: Vec<Result<Vec<u32>, String>>) -> Self {
            Self {
                answers,
                calls: Mutex::new(0),
            }
        }

        fn list(&self) -> std::future::Ready<Result<BTreeSet<u32>, String>> {
            let mut calls = self.calls.lock().unwrap();
            let answer = self.answers[(*calls).min(self.answers.len() - 1)].clone();
            *calls += 1;
            std::future::ready(answer.map(|pids| pids.into_iter().collect()))
        }

        fn calls(&self) -> usize {
            *self.calls.lock().unwrap()
        }
    }

    fn lines(logs: &LogBuffer) -> Vec<String> {
        logs.tail_lines(usize::MAX)
    }

    /// Waits (for long) until GPUs answering `answers` in turn list nothing; returns how many
    /// looks it took and the log lines it wrote.
    async fn wait_on(answers: Vec<Result<Vec<u32>, String>>) -> (usize, Vec<String>) {
        let logs = LogBuffer::new("m", 100);
        let gpus = FakeGpus::new(answers);
        wait_gone(Duration::from_secs(600), &logs, || gpus.list()).await;
        (gpus.calls(), lines(&logs))
    }

    #[tokio::test]
    async fn free_memory_costs_one_look_and_no_log_line() {
        let (calls, lines) = wait_on(vec![Ok(vec![])]).await;
        assert_eq!(calls, 1);
        assert!(lines.is_empty(), "{lines:?}");
    }

    #[tokio::test]
    async fn waits_until_the_processes_leave_the_gpus() {
        let (calls, lines) =
            wait_on(vec![Ok(vec![7, 8]), Ok(vec![8]), Ok(vec![8]), Ok(vec![])]).await;
        assert_eq!(calls, 4);
        assert!(
            lines.len() == 1 && lines[0].contains("GPU memory released"),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn gives_up_after_the_timeout() {
        let logs = LogBuffer::new("m", 100);
        let gpus = FakeGpus::new(vec![Ok(vec![42])]);
        let timeout = Duration::from_millis(100);
        let started = Instant::now();
        wait_gone(timeout, &logs, || gpus.list()).await;
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        // Backoff: 1+2+4+...+50 ms; far fewer looks than one per millisecond.
        let calls = gpus.calls();
        assert!(calls >= 3, "{calls} looks");
        let lines = lines(&logs);
        assert!(
            lines.len() == 1
                && lines[0].contains("pids 42 still hold GPU memory")
                && lines[0].contains("gpu_release_timeout"),
            "{lines:?}"
        );
    }

    #[tokio::test]
    async fn a_look_that_hangs_is_bounded_by_the_timeout() {
        let logs = LogBuffer::new("m", 100);
        let timeout = Duration::from_millis(50);
        let started = Instant::now();
        wait_gone(timeout, &logs, std::future::pending::<Result<_, String>>).await;
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        let lines = lines(&logs);
        assert!(
            lines.len() == 1 && lines[0].contains("NVML did not answer"),
            "{lines:?}"
        );
    }

    /// A fake reading of the tree's GPU memory: `answers` in turn, then the last for ever.
    fn readings(
        answers: Vec<u64>,
    ) -> impl FnMut() -> std::future::Ready<Result<BTreeMap<u32, u64>, GpuQueryError>> {
        let mut calls = 0;
        move || {
            let bytes = answers[calls.min(answers.len() - 1)];
            calls += 1;
            std::future::ready(Ok(BTreeMap::from([(0, bytes)])))
        }
    }

    #[tokio::test]
    async fn a_sleep_is_released_once_the_tree_holds_no_more_than_the_residue() {
        let gib = 1u64 << 30;
        let looks = readings(vec![40 * gib, 20 * gib, gib / 2]);
        let result = wait_below(Duration::from_secs(600), SLEEP_RESIDUE, looks).await;
        assert!(result.is_ok(), "{result:?}");
    }

    #[tokio::test]
    async fn a_sleep_that_keeps_the_memory_fails_naming_it() {
        let looks = readings(vec![40 << 30]);
        let timeout = Duration::from_millis(50);
        let started = Instant::now();
        let result = wait_below(timeout, SLEEP_RESIDUE, looks).await;
        assert!(started.elapsed() >= timeout);
        let why = result.unwrap_err().to_string();
        assert!(why.contains("40 GiB on GPU 0"), "{why}");
    }

    #[tokio::test]
    async fn an_nvml_error_ends_the_wait_with_a_log_line() {
        let (calls, lines) = wait_on(vec![Ok(vec![3]), Err("GPU 0: GPU is lost".into())]).await;
        assert_eq!(calls, 2);
        assert!(
            lines.len() == 1 && lines[0].contains("GPU 0: GPU is lost"),
            "{lines:?}"
        );
    }
}
