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
                _ => Err(format!(
                    "unknown fault {text:?}: expected exit-during-load, never-ready, \
                     crash-after:N, hang-up:N, ignore-sigterm, flood:BYTES or exit-after-ready"
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
fn parse_bytes(text: &str) -> Result<u64, String> {
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
