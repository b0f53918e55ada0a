//! Command line of the mock server and of its hidden worker processes.

use std::{str::FromStr, time::Duration};

use clap::{Parser, ValueEnum};

/// Which real inference server to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Flavor {
    Sglang,
    Tabbyapi,
    Vllm,
    #[value(name = "llama-server")]
    LlamaServer,
}

/// A misbehaviour to inject (see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    ExitDuringLoad,
    NeverReady,
    CrashAfter(u64),
    /// The Nth completion request (from 1) is read whole, then its
    /// connection is closed unanswered, and the server serves on.
    HangUp(u64),
    IgnoreSigterm,
    Flood(u64),
    ExitAfterReady,
    /// The sleep request answers 500 and the server stays awake.
    SleepFails,
    /// The wake request fails (500; TabbyAPI: an error event in its load stream) and the
    /// server stays asleep.
    WakeFails,
    /// A sleep says it succeeded but frees no GPU memory.
    SleepKeepsMemory,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            None => match text {
                "exit-during-load" => Ok(Self::ExitDuringLoad),
                "never-ready" => Ok(Self::NeverReady),
                "ignore-sigterm" => Ok(Self::IgnoreSigterm),
                "exit-after-ready" => Ok(Self::ExitAfterReady),
                "sleep-fails" => Ok(Self::SleepFails),
                "wake-fails" => Ok(Self::WakeFails),
                "sleep-keeps-memory" => Ok(Self::SleepKeepsMemory),
                _ => Err(format!(
                    "unknown fault {text:?}: expected exit-during-load, never-ready, \
                     crash-after:N, hang-up:N, ignore-sigterm, flood:BYTES, exit-after-ready, \
                     sleep-fails, wake-fails or sleep-keeps-memory"
                )),
            },
            Some(("crash-after", n)) => n
                .parse()
                .map(Self::CrashAfter)
                .map_err(|e| format!("crash-after:{n}: {e}")),
            Some(("hang-up", n)) => n
                .parse()
                .map(Self::HangUp)
                .map_err(|e| format!("hang-up:{n}: {e}")),
            Some(("flood", bytes)) => parse_bytes(bytes).map(Self::Flood),
            Some(_) => Err(format!("unknown fault {text:?}")),
        }
    }
}

/// `1000`, `64K`/`64KiB`, `3M`/`3MiB`, `1G`/`1GiB` (binary multiples).
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|e| format!("flood:{text}: {e}"))?;
    let multiple = match unit {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(format!("flood:{text}: unknown unit {unit:?}")),
    };
    number
        .checked_mul(multiple)
        .ok_or_else(|| format!("flood:{text}: too large"))
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "gpuswap-mock-backend",
    version,
    about = "A fake inference server that behaves like SGLang, TabbyAPI, vLLM or llama-server"
)]
pub struct Args {
    #[arg(long, value_enum)]
    pub flavor: Flavor,
    #[arg(long)]
    pub port: u16,
    /// The served model name: every answer names it.
    #[arg(long)]
    pub model: String,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// How long "loading the weights" takes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub load_time: Duration,
    /// Listening but not ready yet (default 300ms for sglang, 0 otherwise).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Pace of streamed tokens; 0 sends them as fast as possible.
    #[arg(long, default_value_t = 25.0)]
    pub tokens_per_second: f64,
    /// Require this key on /v1 endpoints (`Authorization: Bearer K`; tabbyapi also `x-api-key: K`).
    #[arg(long)]
    pub api_key: Option<String>,
    /// Worker (scheduler) processes to spawn (default 1 for sglang, 0 otherwise).
    #[arg(long)]
    pub workers: Option<u32>,
    /// Workers call setsid() and so leave the process group.
    #[arg(long)]
    pub worker_escape: bool,
    /// How long to linger (still serving) after SIGTERM/SIGINT before exiting.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub stop_delay: Duration,
    /// Inject a fault; may be repeated.
    #[arg(long = "fault", value_name = "FAULT")]
    pub faults: Vec<Fault>,
    /// An extra log line printed at the moment the server becomes ready.
    #[arg(long)]
    pub ready_log_line: Option<String>,
    /// Weight shards the load goes through (vllm and sglang print a progress line per shard,
    /// as their safetensors loaders do).
    #[arg(long, default_value_t = 4)]
    pub shards: u32,
    /// A "weights" file read whole during the load (on top of --load-time), so that a load
    /// from the page cache is measurably faster than one from disk.
    #[arg(long)]
    pub load_file: Option<std::path::PathBuf>,
    /// vLLM: a sleep really frees the GPU memory. Without it `/sleep` still answers 200 and
    /// `/is_sleeping` says true, but nothing is freed (vLLM on CPU does that). Its sleep routes
    /// exist only with the environment variable VLLM_SERVER_DEV_MODE=1, as in vLLM.
    #[arg(long)]
    pub enable_sleep_mode: bool,
    /// SGLang: `/release_memory_occupation` really frees the GPU memory (without it, nothing).
    #[arg(long)]
    pub enable_memory_saver: bool,
    /// SGLang: released weights are kept in host RAM; without it they are lost until
    /// `/update_weights_from_disk` reloads them.
    #[arg(long)]
    pub enable_weights_cpu_backup: bool,
    /// TabbyAPI's admin key, needed by `/v1/model/load` and `/v1/model/unload` (it also passes
    /// where the API key does); default: --api-key.
    #[arg(long)]
    pub admin_key: Option<String>,
    /// llama-server: after this many seconds without a request the weights are dropped; the
    /// next request reloads them (-1: never).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub sleep_idle_seconds: i64,
    /// How long putting the model to sleep takes (default: --load-time / 40).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub sleep_time: Option<Duration>,
    /// How long a wake takes when the weights stayed in host RAM (default: --load-time / 20).
    /// Weights that were dropped take --load-time to reload.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub wake_time: Option<Duration>,
    /// The "GPU memory" the loaded model holds (`16G`, `512M`), reported by
    /// `GET /gpuswap_mock/memory` (and --gpu-memory-file): its weights are half, its KV cache
    /// the other half, and a sleep frees what it releases.
    #[arg(long, default_value = "16G", value_parser = parse_bytes)]
    pub gpu_memory: u64,
    /// A file rewritten (atomically) with what `GET /gpuswap_mock/memory` answers whenever it
    /// changes, for a test that stands in for NVML.
    #[arg(long)]
    pub gpu_memory_file: Option<std::path::PathBuf>,
}

impl Args {
    pub fn warmup(&self) -> Duration {
        self.warmup.unwrap_or(match self.flavor {
            Flavor::Sglang => Duration::from_millis(300),
            _ => Duration::ZERO,
        })
    }

    pub fn workers(&self) -> u32 {
        self.workers.unwrap_or(match self.flavor {
            Flavor::Sglang => 1,
            _ => 0,
        })
    }

    pub fn sleep_time(&self) -> Duration {
        self.sleep_time.unwrap_or(self.load_time / 40)
    }

    pub fn wake_time(&self) -> Duration {
        self.wake_time.unwrap_or(self.load_time / 20)
    }

    pub fn has_fault(&self, wanted: Fault) -> bool {
        self.faults.contains(&wanted)
    }

    pub fn crash_after(&self) -> Option<u64> {
        self.faults.iter().find_map(|fault| match fault {
            Fault::CrashAfter(n) => Some(*n),
            _ => None,
        })
    }

    pub fn hang_up_at(&self) -> Option<u64> {
        self.faults.iter().find_map(|fault| match fault {
            Fault::HangUp(n) => Some(*n),
            _ => None,
        })
    }

    pub fn flood_bytes(&self) -> Option<u64> {
        self.faults.iter().find_map(|fault| match fault {
            Fault::Flood(n) => Some(*n),
            _ => None,
        })
    }

    /// The pause between two streamed tokens.
    pub fn token_interval(&self) -> Duration {
        if self.tokens_per_second > 0.0 && self.tokens_per_second.is_finite() {
            Duration::from_secs_f64(1.0 / self.tokens_per_second)
        } else {
            Duration::ZERO
        }
    }
}

/// Arguments of the hidden `worker` subcommand (argv[1] == "worker").
#[derive(Debug, Parser)]
#[command(name = "gpuswap-mock-backend worker", hide = true)]
pub struct WorkerArgs {
    #[arg(long)]
    pub rank: u32,
    /// The server process; an orphaned worker gives up after a long while.
    #[arg(long)]
    pub parent: u32,
    #[arg(long)]
    pub escape: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse() {
        assert_eq!("never-ready".parse(), Ok(Fault::NeverReady));
        assert_eq!("exit-after-ready".parse(), Ok(Fault::ExitAfterReady));
        assert_eq!("wake-fails".parse(), Ok(Fault::WakeFails));
        assert_eq!("sleep-keeps-memory".parse(), Ok(Fault::SleepKeepsMemory));
        assert_eq!("crash-after:7".parse(), Ok(Fault::CrashAfter(7)));
        assert_eq!("hang-up:2".parse(), Ok(Fault::HangUp(2)));
        assert_eq!("flood:3M".parse(), Ok(Fault::Flood(3 << 20)));
        assert_eq!("flood:1000".parse(), Ok(Fault::Flood(1000)));
        assert!("crash-after:x".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
        assert!("flood:3Q".parse::<Fault>().is_err());
    }

    #[test]
    fn defaults_depend_on_flavor() {
        let sglang = Args::parse_from(["m", "--flavor", "sglang", "--port", "1", "--model", "a"]);
        assert_eq!(sglang.warmup(), Duration::from_millis(300));
        assert_eq!(sglang.workers(), 1);
        let vllm = Args::parse_from(["m", "--flavor", "vllm", "--port", "1", "--model", "a"]);
        assert_eq!(vllm.warmup(), Duration::ZERO);
        assert_eq!(vllm.workers(), 0);
        let llama = Args::parse_from([
            "m",
            "--flavor",
            "llama-server",
            "--port",
            "1",
            "--model",
            "a",
            "--load-time",
            "250ms",
        ]);
        assert_eq!(llama.load_time, Duration::from_millis(250));
    }
}
