//! What the suite measured, as written to results.json and read by the report.

use serde::Serialize;

use super::router::RouterReport;
use crate::{
    load::LoadReport,
    procfs::ProcUsage,
    stop::{DeactivateSample, OwnExitSample},
    swap::SwapSample,
};

#[derive(Debug, Clone, Serialize)]
pub struct LoadRun {
    pub round: usize,
    pub scenario: &'static str,
    pub target: &'static str,
    pub report: LoadReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapRun {
    pub flavor: &'static str,
    pub sample: SwapSample,
}

#[derive(Debug, Clone, Serialize)]
pub struct StopRun {
    pub case: &'static str,
    pub title: &'static str,
    pub stop_timeout_ms: u128,
    pub own_exit: Vec<OwnExitSample>,
    pub deactivate: Vec<DeactivateSample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub bytes_written: u64,
    pub secs: f64,
    pub supervisor: Option<ProcUsage>,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub load: Vec<LoadRun>,
    pub swap: Vec<SwapRun>,
    pub stop: Vec<StopRun>,
    pub scale: Option<LoadReport>,
    pub flood: Option<FloodReport>,
    /// llama-server's router mode against gpuswap (when given the server and models).
    pub router: Option<RouterReport>,
    /// What failed to run (not missed targets).
    pub failures: Vec<String>,
}

impl Results {
    pub fn failed(&mut self, what: &str, error: anyhow::Error) {
        let line = format!("{what}: {error:#}");
        eprintln!("bench: FAILED {line}");
        self.failures.push(line);
    }
}
