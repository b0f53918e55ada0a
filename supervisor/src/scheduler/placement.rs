//! Which models may run together: no shared port, and on every GPU they share the sum of
//! their `vram` fits the GPU's memory. A model without `vram`, or a GPU of unknown size,
//! means the whole GPU (the rule from before memory-aware placement). And which models to
//! stop to make room for another: [`choose_evictions`].

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use gpuswap::config::{GpuMemory, ModelConfig, format_bytes, hosts_overlap};
use tokio::time::Instant;

/// Stands for "every GPU" when no GPU index is known at all (models without `gpus`, no
/// per-GPU sizes, no NVML).
const EVERY_GPU: u32 = u32::MAX;

/// Beyond this many candidates the eviction choice stops trying every combination.
const EXHAUSTIVE_CANDIDATES: usize = 16;

/// Where a model runs and what it takes there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// None: every GPU.
    pub gpus: Option<Vec<u32>>,
    pub port: u16,
    pub host: String,
    /// Memory on each of its GPUs; None: the whole GPU.
    pub vram: Option<u64>,
    /// Never stopped to make room for another model.
    pub pinned: bool,
    /// Host memory it holds while asleep; None: it cannot sleep (it is stopped instead).
    pub sleep: Option<u64>,
}

impl Placement {
    /// Where the model `name` of `config` runs (a validated configuration: its sleep
    /// protocol resolves).
    pub fn of(name: &str, config: &ModelConfig) -> Self {
        let sleep = config.sleep_protocol(name).ok().flatten();
        Placement {
            gpus: config.gpus.clone(),
            port: config.port,
            host: config.host.clone(),
            vram: config.vram,
            pinned: config.pinned,
            sleep: sleep.map(|protocol| protocol.host_memory),
        }
    }

    /// What it takes while asleep: its port, no GPU memory.
    pub fn asleep(&self) -> Placement {
        Placement {
            gpus: Some(Vec::new()),
            vram: Some(0),
            ..self.clone()
        }
    }

    fn uses(&self, gpu: u32) -> bool {
        self.gpus.as_ref().is_none_or(|gpus| gpus.contains(&gpu))
    }

    /// Whether it cannot run next to `other` whatever the GPUs hold.
    pub fn shares_port_with(&self, other: &Placement) -> bool {
        self.port == other.port && hosts_overlap(&self.host, &other.host)
    }
}

/// The memory of each GPU: `[supervisor] gpu_memory` first, else what NVML reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capacity {
    configured: Option<GpuMemory>,
    measured: BTreeMap<u32, u64>,
}

impl Capacity {
    pub fn new(configured: Option<GpuMemory>, measured: BTreeMap<u32, u64>) -> Self {
        Capacity {
            configured,
            measured,
        }
    }

    /// The same configuration with NVML's sizes `measured`.
    pub fn with_measured(self, measured: BTreeMap<u32, u64>) -> Self {
        Capacity { measured, ..self }
    }

    /// The memory of `gpu`; None: unknown (a model takes it whole).
    pub fn of(&self, gpu: u32) -> Option<u64> {
        if gpu == EVERY_GPU {
            return match &self.configured {
                Some(GpuMemory::Every(bytes)) => Some(*bytes),
                _ => None,
            };
        }
        self.configured
            .as_ref()
            .and_then(|c| c.of(gpu))
            .or_else(|| self.measured.get(&gpu).copied())
    }

    /// The GPUs known by index (configured per GPU, or seen by NVML).
    pub fn known(&self) -> BTreeSet<u32> {
        let mut known: BTreeSet<u32> = self.measured.keys().copied().collect();
        if let Some(GpuMemory::PerGpu(sizes)) = &self.configured {
            known.extend(sizes.keys());
        }
        known
    }

    /// The GPUs a model uses, given the others it is checked with: its own list, or for a
    /// model without one every GPU anybody knows of.
    fn gpus_of(&self, placement: &Placement, universe: &BTreeSet<u32>) -> Vec<u32> {
        match &placement.gpus {
            Some(gpus) => gpus.clone(),
            None => universe.iter().copied().collect(),
        }
    }

    fn universe<'a>(&self, members: impl Iterator<Item = &'a Placement>) -> BTreeSet<u32> {
        let mut universe = self.known();
        for placement in members {
            universe.extend(placement.gpus.iter().flatten());
        }
        if universe.is_empty() {
            universe.insert(EVERY_GPU);
        }
        universe
    }

    /// Why `placement` can never run, even alone: it needs more than a GPU has.
    pub fn too_big(&self, name: &str, placement: &Placement) -> Option<String> {
        let vram = placement.vram?;
        let universe = self.universe(std::iter::once(placement));
        self.gpus_of(placement, &universe)
            .into_iter()
            .find_map(|gpu| {
                let capacity = self.of(gpu)?;
                (vram > capacity).then(|| {
                    format!(
                        "model {name} needs {} but {} has {}",
                        format_bytes(vram),
                        gpu_name(gpu),
                        format_bytes(capacity)
                    )
                })
            })
    }

    /// The first reason the `members` cannot run together, if any.
    pub fn clash(&self, members: &[(&str, &Placement)]) -> Option<Clash> {
        for (i, (a, pa)) in members.iter().enumerate() {
            for (b, pb) in &members[i + 1..] {
                if pa.shares_port_with(pb) {
                    return Some(Clash::Port {
                        models: vec![a.to_string(), b.to_string()],
                        port: pa.port,
                    });
                }
            }
        }
        let universe = self.universe(members.iter().map(|(_, p)| *p));
        for gpu in universe {
            let users: Vec<&(&str, &Placement)> =
                members.iter().filter(|(_, p)| p.uses(gpu)).collect();
            if users.len() < 2 {
                continue;
            }
            let capacity = self.of(gpu);
            let fits = capacity.is_some_and(|capacity| {
                let needed = users
                    .iter()
                    .map(|(_, p)| p.vram.unwrap_or(capacity))
                    .fold(0u64, u64::saturating_add);
                needed <= capacity
            });
            if !fits {
                return Some(Clash::Memory {
                    models: users.iter().map(|(name, _)| name.to_string()).collect(),
                    gpu,
                    capacity,
                });
            }
        }
        None
    }

    pub fn fits(&self, members: &[(&str, &Placement)]) -> bool {
        self.clash(members).is_none()
    }

    /// What `placement` takes on `gpu` (None: the whole GPU, of unknown size).
    pub fn need(&self, placement: &Placement, gpu: u32) -> Option<u64> {
        placement.vram.or_else(|| self.of(gpu))
    }

    /// What `members` (the live models) reserve on each GPU known by index, or that one of
    /// them lists.
    pub fn reservations(&self, members: &[(&str, &Placement)]) -> Vec<Reservation> {
        let mut gpus = self.known();
        gpus.extend(members.iter().flat_map(|(_, p)| p.gpus.iter().flatten()));
        gpus.into_iter()
            .map(|gpu| {
                let users: Vec<&(&str, &Placement)> =
                    members.iter().filter(|(_, p)| p.uses(gpu)).collect();
                let capacity = self.of(gpu);
                Reservation {
                    gpu,
                    capacity,
                    reserved: users
                        .iter()
                        .filter_map(|(_, p)| p.vram.or(capacity))
                        .fold(0u64, u64::saturating_add),
                    models: users.iter().map(|(name, _)| name.to_string()).collect(),
                }
            })
            .collect()
    }

    /// Every GPU `placement` uses that has a known index.
    pub fn gpus_known_of(&self, placement: &Placement) -> Vec<u32> {
        let universe = self.universe(std::iter::once(placement));
        self.gpus_of(placement, &universe)
            .into_iter()
            .filter(|gpu| *gpu != EVERY_GPU)
            .collect()
    }
}

fn gpu_name(gpu: u32) -> String {
    if gpu == EVERY_GPU {
        "the GPU".into()
    } else {
        format!("GPU {gpu}")
    }
}

/// What gpuswap's live models reserve on one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub gpu: u32,
    pub capacity: Option<u64>,
    pub reserved: u64,
    pub models: Vec<String>,
}

/// Why some models cannot run together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Clash {
    Port {
        models: Vec<String>,
        port: u16,
    },
    Memory {
        models: Vec<String>,
        gpu: u32,
        /// None: the GPU's size is unknown, so each model takes it whole.
        capacity: Option<u64>,
    },
}

impl fmt::Display for Clash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clash::Port { models, port } => {
                write!(f, "{} share port {port}", models.join(" and "))
            }
            Clash::Memory {
                models,
                gpu,
                capacity: Some(capacity),
            } => write!(
                f,
                "{} do not fit together in the {} of {}",
                models.join(" and "),
                format_bytes(*capacity),
                gpu_name(*gpu)
            ),
            Clash::Memory { models, gpu, .. } => {
                write!(
                    f,
                    "{} each take {} whole",
                    models.join(" and "),
                    gpu_name(*gpu)
                )
            }
        }
    }
}

/// A running model that may be stopped to make room.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub placement: Placement,
    /// Some client holds it (it would have to drain first).
    pub held: bool,
    /// The end of its last use; None: never used.
    pub last_use: Option<Instant>,
    /// How long its last start took; None: never measured.
    pub load_time: Option<Duration>,
}

/// The fewest `candidates` whose stop lets `target` run next to `staying` (the running
/// models that are not candidates): among sets of the same size the one that comes first
/// when candidates are ordered unheld first, then least recently used, then shorter load
/// time (cheaper to bring back). None: no set is enough.
pub fn choose_evictions(
    capacity: &Capacity,
    target: (&str, &Placement),
    staying: &[(&str, &Placement)],
    candidates: &[Candidate],
) -> Option<Vec<String>> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by(|a, b| {
        (
            a.held,
            a.last_use,
            a.load_time.unwrap_or(Duration::MAX),
            &a.name,
        )
            .cmp(&(
                b.held,
                b.last_use,
                b.load_time.unwrap_or(Duration::MAX),
                &b.name,
            ))
    });
    let fits_without = |stopped: &[usize]| {
        let mut members: Vec<(&str, &Placement)> = vec![target];
        members.extend_from_slice(staying);
        members.extend(
            order
                .iter()
                .enumerate()
                .filter(|(i, _)| !stopped.contains(i))
                .map(|(_, c)| (c.name.as_str(), &c.placement)),
        );
        capacity.fits(&members)
    };
    let names = |stopped: &[usize]| stopped.iter().map(|&i| order[i].name.clone()).collect();
    let n = order.len();
    if n > EXHAUSTIVE_CANDIDATES {
        // Too many to try every set: stop them in order until the target fits.
        let all: Vec<usize> = (0..n).collect();
        return (0..=n)
            .find(|&k| fits_without(&all[..k]))
            .map(|k| names(&all[..k]));
    }
    for size in 0..=n {
        // Combinations of `size` indices in lexicographic order: the preferred set first.
        let mut pick: Vec<usize> = (0..size).collect();
        loop {
            if fits_without(&pick) {
                return Some(names(&pick));
            }
            let Some(i) = (0..size).rev().find(|&i| pick[i] < n - size + i) else {
                break;
            };
            pick[i] += 1;
            for j in i + 1..size {
                pick[j] = pick[j - 1] + 1;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn on(gpus: &[u32], port: u16, vram: Option<u64>) -> Placement {
        Placement {
            gpus: Some(gpus.to_vec()),
            port,
            host: "127.0.0.1".into(),
            vram,
            pinned: false,
            sleep: None,
        }
    }

    fn gpu0(port: u16, gib: u64) -> Placement {
        on(&[0], port, Some(gib * GIB))
    }

    fn capacity_96() -> Capacity {
        Capacity::new(Some(GpuMemory::Every(96 * GIB)), BTreeMap::new())
    }

    fn candidate(name: &str, placement: Placement, held: bool, used: u64) -> Candidate {
        let base = Instant::now();
        Candidate {
            name: name.into(),
            placement,
            held,
            last_use: Some(base + Duration::from_secs(used)),
            load_time: Some(Duration::from_secs(10)),
        }
    }

    #[test]
    fn memory_fit_ports_and_the_whole_gpu_rule() {
        let c = capacity_96();
        let (a, b, big) = (gpu0(1, 40), gpu0(2, 40), gpu0(3, 70));
        assert!(c.fits(&[("a", &a), ("b", &b)]));
        assert!(!c.fits(&[("a", &a), ("big", &big)]));
        let clash = c.clash(&[("a", &a), ("b", &b), ("big", &big)]).unwrap();
        assert!(clash.to_string().contains("96 GiB of GPU 0"), "{clash}");
        // Same port: never together, whatever the memory.
        let same_port = gpu0(1, 10);
        assert!(matches!(
            c.clash(&[("a", &a), ("p", &same_port)]),
            Some(Clash::Port { port: 1, .. })
        ));
        // Other GPUs: no memory shared.
        assert!(c.fits(&[("a", &on(&[0], 1, None)), ("x", &on(&[1], 2, None))]));
        // No vram: the whole GPU.
        assert!(!c.fits(&[("a", &a), ("whole", &on(&[0], 4, None))]));
        // Unknown size: every model takes the GPU whole (today's rule).
        let unknown = Capacity::default();
        assert!(!unknown.fits(&[("a", &a), ("b", &b)]));
        // No GPU list: every GPU, which shares the one a sized model uses.
        let everywhere = Placement {
            gpus: None,
            ..gpu0(5, 40)
        };
        assert!(c.fits(&[("a", &a), ("e", &everywhere)]));
        assert!(!c.fits(&[("a", &a), ("big", &big), ("e", &everywhere)]));
        assert!(!unknown.fits(&[("a", &a), ("e", &everywhere)]));
    }

    #[test]
    fn per_gpu_sizes_and_too_big() {
        let c = Capacity::new(
            Some(GpuMemory::PerGpu(BTreeMap::from([
                (0, 96 * GIB),
                (1, 48 * GIB),
            ]))),
            BTreeMap::from([(2, 24 * GIB)]),
        );
        assert_eq!(c.of(1), Some(48 * GIB));
        assert_eq!(c.of(2), Some(24 * GIB));
        assert!(c.fits(&[
            ("a", &on(&[0], 1, Some(50 * GIB))),
            ("b", &on(&[0], 2, Some(40 * GIB)))
        ]));
        assert!(!c.fits(&[
            ("a", &on(&[1], 1, Some(30 * GIB))),
            ("b", &on(&[1], 2, Some(30 * GIB)))
        ]));
        let why = c.too_big("m", &on(&[0, 2], 1, Some(30 * GIB))).unwrap();
        assert_eq!(why, "model m needs 30 GiB but GPU 2 has 24 GiB");
        assert!(c.too_big("m", &on(&[0, 1], 1, Some(30 * GIB))).is_none());
    }

    #[test]
    fn evicts_the_fewest_unheld_then_least_recently_used() {
        let c = capacity_96();
        let target = gpu0(9, 40);
        // What is chosen to make room for `target` among `cands`, nothing staying.
        let chosen = |target: &Placement, cands: &[Candidate]| {
            choose_evictions(&c, ("t", target), &[], cands)
        };
        // a used last (t=3), b at t=1: b goes.
        let cands = [
            candidate("a", gpu0(1, 40), false, 3),
            candidate("b", gpu0(2, 40), false, 1),
        ];
        assert_eq!(chosen(&target, &cands), Some(vec!["b".to_string()]));
        // Held models go after unheld ones, however recently used.
        let cands = [
            candidate("a", gpu0(1, 40), false, 3),
            candidate("b", gpu0(2, 40), true, 1),
        ];
        assert_eq!(chosen(&target, &cands), Some(vec!["a".to_string()]));
        // Fewest models: the one 60 GiB model (two small older ones are not enough).
        let big = gpu0(9, 70);
        let cands = [
            candidate("s1", gpu0(1, 10), false, 1),
            candidate("s2", gpu0(2, 10), false, 2),
            candidate("l", gpu0(3, 60), false, 9),
        ];
        assert_eq!(chosen(&big, &cands), Some(vec!["l".to_string()]));
        // Nothing to stop when it fits.
        assert_eq!(chosen(&gpu0(9, 5), &cands), Some(vec![]));
        // A port clash must go, whatever its rank.
        let cands = [
            candidate("old", gpu0(1, 10), false, 0),
            candidate("port", gpu0(9, 10), false, 5),
        ];
        assert_eq!(chosen(&target, &cands), Some(vec!["port".to_string()]));
        // What stays (pinned, wanted by earlier waiters) cannot be chosen: no set is enough.
        let pinned = gpu0(1, 30);
        assert_eq!(
            choose_evictions(&c, ("t", &big), &[("p", &pinned)], &[]),
            None
        );
    }

    #[test]
    fn ties_go_to_the_shorter_load_time() {
        let c = capacity_96();
        let used = Some(Instant::now());
        let slow = Candidate {
            name: "slow".into(),
            placement: gpu0(1, 40),
            held: false,
            last_use: used,
            load_time: Some(Duration::from_secs(90)),
        };
        let quick = Candidate {
            name: "quick".into(),
            placement: gpu0(2, 40),
            load_time: Some(Duration::from_secs(5)),
            ..slow.clone()
        };
        assert_eq!(
            choose_evictions(&c, ("t", &gpu0(9, 40)), &[], &[slow, quick]),
            Some(vec!["quick".to_string()])
        );
    }
}
