//! Which box gets a request for a model: a pure function of what the boxes report, so that
//! it is tested without processes and timed by the bench.
//!
//! The order (llm-d's LoRA-affinity order, at box level: loaded > loading > free slot > full):
//! 1. a box where the model is ready and not draining (fewest requests in flight);
//! 2. a box where it is starting (join that load), or where this picker just placed it;
//!    then a box where it is asleep (its process lives: a wake takes seconds, a start minutes);
//! 3. a box where it fits without stopping anything: no port in common with a live model,
//!    and on each of its GPUs either no live model or room for its `vram` next to what the
//!    supervisor reports reserved there (a model without `vram`, or a GPU of unknown size,
//!    takes the GPU whole: the supervisor's own rule);
//! 4. a box where every model in its way is ready and has no request in flight (from this
//!    picker, or any other front as the box's gateway reports): the one whose most recently
//!    used such model has been idle longest (the later of this picker's last request and the
//!    last use the box's clients report to its supervisor; never used counts as the idlest);
//! 5. else the box with the fewest requests in flight (its supervisor drains the holders
//!    first: nothing is cut off).
//!
//! A box where a pinned model is in the way (it would have to stop and never does) is never
//! chosen for a cold model: when every box that has the model is such a box, 503.
//!
//! Ties in 2-5 go to the highest rendezvous hash of (box, model), so that every picker that
//! sees the same boxes makes the same choice for a cold model.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use gpuswap::pb::ModelState;

use crate::fleet::{BoxModels, ModelView, OtherLoad, Usage};

/// One box as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub name: &'a str,
    pub models: &'a BoxModels,
    /// Requests in flight there: this picker's, and the others its gateway reports.
    pub in_flight: u32,
    /// Per model: requests in flight and last use, through this picker.
    pub usage: &'a HashMap<String, Usage>,
    /// Per model: requests in flight or queued there from other fronts and clients.
    pub others: &'a OtherLoad,
    /// Its gateway answers and its supervisor is watched.
    pub routable: bool,
}

/// Why a box was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Ready,
    Starting,
    /// Placed there by an earlier request that Watch does not show yet.
    Pending,
    /// Asleep there: the request wakes it.
    Sleeping,
    Fits,
    Evicts,
    Busy,
    /// A pinned model is in the way: never chosen.
    Blocked,
}

impl Reason {
    /// A placement that makes the box load the model: later requests must follow it.
    pub fn is_cold(self) -> bool {
        matches!(
            self,
            Reason::Sleeping | Reason::Fits | Reason::Evicts | Reason::Busy
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Ready => "ready",
            Reason::Starting => "starting",
            Reason::Pending => "pending",
            Reason::Sleeping => "sleeping",
            Reason::Fits => "fits",
            Reason::Evicts => "evicts-idle",
            Reason::Busy => "busy",
            Reason::Blocked => "blocked-by-pinned",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Indexes into the candidates: the chosen box first, then fallbacks.
    Route {
        boxes: Vec<usize>,
        reason: Reason,
        /// The model's own name on the chosen box (the request may use an alias).
        model: String,
    },
    /// Every box that could serve it is at `max_in_flight`: 429.
    Shed,
    /// Some box has it, but none can take requests now: 503.
    Unavailable(String),
    /// No box knows the model: 404.
    UnknownModel,
}

/// How long a cold placement steers later requests for the model before Watch shows the
/// load (the box's gateway asks for it within milliseconds; this covers a slow network).
pub const PENDING_FOR: Duration = Duration::from_secs(10);

/// Places a request for `model` (a name or alias). `pending` maps a model's name to the box
/// a cold placement chose and when. `max_in_flight` 0 = no limit.
pub fn place(
    model: &str,
    candidates: &[Candidate<'_>],
    pending: &HashMap<String, (String, Instant)>,
    now: Instant,
    max_in_flight: u32,
    fallbacks: usize,
) -> Placement {
    let mut known = false;
    let mut serving: Vec<(usize, &ModelView)> = Vec::new();
    for (i, candidate) in candidates.iter().enumerate() {
        let Some(view) = find(candidate.models, model) else {
            continue;
        };
        known = true;
        if candidate.routable && view.state != ModelState::Unavailable {
            serving.push((i, view));
        }
    }
    if serving.is_empty() {
        return if known {
            Placement::Unavailable(format!(
                "no box that has model {model:?} can take requests now"
            ))
        } else {
            Placement::UnknownModel
        };
    }
    let open: Vec<(usize, &ModelView)> = serving
        .iter()
        .copied()
        .filter(|(i, _)| max_in_flight == 0 || candidates[*i].in_flight < max_in_flight)
        .collect();
    if open.is_empty() {
        return Placement::Shed;
    }
    let name = open[0].1.name.clone();
    let hash = |i: usize| rendezvous(candidates[i].name, &name);
    // Where the model is loaded or loading, and no fallback is wanted, the cold ranking of
    // every other box (a walk over its models) is not needed.
    let warm: Vec<(usize, &ModelView)> = open
        .iter()
        .copied()
        .filter(|(i, view)| {
            matches!(view.state, ModelState::Ready if !view.draining)
                || view.state == ModelState::Starting
                || view.state == ModelState::Sleeping
                || is_pending(pending, &view.name, candidates[*i].name, now)
        })
        .collect();
    let considered = if fallbacks == 0 && !warm.is_empty() {
        &warm
    } else {
        &open
    };
    let mut ranked = rank(considered, candidates, pending, now, hash);
    ranked.retain(|(reason, _)| *reason != Reason::Blocked);
    let Some(&(first_reason, _)) = ranked.first() else {
        return Placement::Unavailable(format!(
            "every box that has model {name:?} would have to stop a pinned model to start it"
        ));
    };
    let boxes: Vec<usize> = ranked.iter().take(1 + fallbacks).map(|(_, i)| *i).collect();
    Placement::Route {
        boxes,
        reason: first_reason,
        model: name,
    }
}

/// Every open box, best first, with the reason it would be chosen.
fn rank(
    open: &[(usize, &ModelView)],
    candidates: &[Candidate<'_>],
    pending: &HashMap<String, (String, Instant)>,
    now: Instant,
    hash: impl Fn(usize) -> u64,
) -> Vec<(Reason, usize)> {
    // Sort keys: lower is better.
    let mut keyed: Vec<((u8, u64, u64), Reason, usize)> = open
        .iter()
        .map(|&(i, view)| {
            let candidate = &candidates[i];
            let tie = u64::MAX - hash(i);
            let (reason, key) = match view.state {
                ModelState::Ready if !view.draining => {
                    (Reason::Ready, (0, candidate.in_flight as u64, tie))
                }
                ModelState::Starting => (Reason::Starting, (1, 0, tie)),
                _ if is_pending(pending, &view.name, candidate.name, now) => {
                    (Reason::Pending, (1, 0, tie))
                }
                ModelState::Sleeping => (Reason::Sleeping, (2, candidate.in_flight as u64, tie)),
                _ => cold_rank(view, candidate, pending, now, tie),
            };
            (key, reason, i)
        })
        .collect();
    keyed.sort_by_key(|(key, _, _)| *key);
    keyed
        .into_iter()
        .map(|(_, reason, i)| (reason, i))
        .collect()
}

/// Where a model that is not loaded on this box stands: fits, evicts idle models, busy,
/// or blocked by a pinned model.
fn cold_rank(
    view: &ModelView,
    candidate: &Candidate<'_>,
    pending: &HashMap<String, (String, Instant)>,
    now: Instant,
    tie: u64,
) -> (Reason, (u8, u64, u64)) {
    // Models placed here but not yet seen loading count as residents: two cold models in
    // one burst must not both pick the same free GPU.
    let placed_here: Vec<&ModelView> = pending
        .iter()
        .filter(|(model, (b, at))| {
            b == candidate.name && now.duration_since(*at) < PENDING_FOR && **model != view.name
        })
        .filter_map(|(model, _)| candidate.models.models.get(model))
        .collect();
    let Some(in_the_way) = in_the_way(view, candidate.models, &placed_here) else {
        return (Reason::Blocked, (6, 0, tie));
    };
    if in_the_way.is_empty() {
        return (Reason::Fits, (3, 0, tie));
    }
    let usage = |name: &str| candidate.usage.get(name).copied().unwrap_or_default();
    let idle = |other: &ModelView| {
        usage(&other.name).in_flight == 0 && !candidate.others.models.contains_key(&other.name)
    };
    let evictable = in_the_way.iter().all(|other| {
        let asleep_or_idle_ready = other.state == ModelState::Sleeping
            || (other.state == ModelState::Ready && !other.draining && idle(other));
        asleep_or_idle_ready && !is_pending(pending, &other.name, candidate.name, now)
    }) || in_the_way
        .iter()
        .all(|other| other.state == ModelState::Stopping);
    if evictable {
        // The most recently used model in the way decides: the longer it has been idle,
        // the better.
        let newest_idle = in_the_way
            .iter()
            .map(|other| {
                let last_used = usage(&other.name).last_used.max(other.last_used);
                last_used.map_or(u64::MAX, |at| {
                    now.saturating_duration_since(at).as_millis() as u64
                })
            })
            .min()
            .unwrap_or(u64::MAX);
        return (Reason::Evicts, (4, u64::MAX - newest_idle, tie));
    }
    (Reason::Busy, (5, candidate.in_flight as u64, tie))
}

/// Stands for "every GPU" on a box that reports no GPU by index.
const EVERY_GPU: u32 = u32::MAX;

/// The models on a box that must stop for `view` to start there (empty: it fits), from the
/// live models and `placed_here`; None when a pinned model would have to stop.
fn in_the_way<'a>(
    view: &ModelView,
    models: &'a BoxModels,
    placed_here: &[&'a ModelView],
) -> Option<Vec<&'a ModelView>> {
    let live: Vec<&ModelView> = models
        .models
        .values()
        .filter(|other| other.name != view.name && other.is_resident())
        .chain(placed_here.iter().copied())
        .collect();
    // A sleeping model keeps its process and port, not its GPU memory.
    let mut stop: Vec<&ModelView> = live
        .iter()
        .copied()
        .chain(
            models
                .models
                .values()
                .filter(|other| other.name != view.name && other.state == ModelState::Sleeping),
        )
        .filter(|other| {
            other.port == view.port && gpuswap::config::hosts_overlap(&other.host, &view.host)
        })
        .collect();
    if stop.iter().any(|other| other.pinned) {
        return None;
    }
    let uses = |model: &ModelView, gpu: u32| {
        gpu == EVERY_GPU || model.gpus.is_empty() || model.gpus.contains(&gpu)
    };
    let mut gpus: Vec<u32> = if view.gpus.is_empty() {
        let mut known: Vec<u32> = models.gpus.keys().copied().collect();
        known.extend(live.iter().flat_map(|m| m.gpus.iter().copied()));
        known.sort_unstable();
        known.dedup();
        known
    } else {
        view.gpus.clone()
    };
    if gpus.is_empty() {
        gpus.push(EVERY_GPU);
    }
    for gpu in gpus {
        let users: Vec<&ModelView> = live.iter().copied().filter(|m| uses(m, gpu)).collect();
        if users.is_empty() {
            continue;
        }
        let capacity = models.gpus.get(&gpu).and_then(|g| g.capacity);
        // What `who` take on this GPU; None: unknown, so the GPU is theirs whole.
        let need = |who: &mut dyn Iterator<Item = &&ModelView>| -> Option<u64> {
            who.map(|m| m.vram.or(capacity))
                .try_fold(0u64, |sum, v| Some(sum.saturating_add(v?)))
        };
        let room = |taken: Option<u64>| match (capacity, view.vram, taken) {
            (Some(capacity), Some(vram), Some(taken)) => taken.saturating_add(vram) <= capacity,
            _ => false,
        };
        // The supervisor's reservation covers its live models; placements it has not
        // seen yet come on top.
        let reserved = models.gpus.get(&gpu).map(|g| g.reserved);
        let placed = need(&mut users.iter().filter(|m| !m.is_resident()));
        if room(reserved.zip(placed).map(|(r, p)| r.saturating_add(p))) {
            continue;
        }
        let pinned = need(&mut users.iter().filter(|m| m.pinned));
        if users.iter().any(|m| m.pinned) && !room(pinned) {
            return None;
        }
        stop.extend(users.into_iter().filter(|m| !m.pinned));
    }
    stop.sort_by(|a, b| a.name.cmp(&b.name));
    stop.dedup_by(|a, b| a.name == b.name);
    Some(stop)
}

fn is_pending(
    pending: &HashMap<String, (String, Instant)>,
    model: &str,
    box_name: &str,
    now: Instant,
) -> bool {
    pending
        .get(model)
        .is_some_and(|(b, at)| b == box_name && now.duration_since(*at) < PENDING_FOR)
}

/// The model `id` (a name or alias) on a box.
pub fn find<'a>(models: &'a BoxModels, id: &str) -> Option<&'a ModelView> {
    models
        .models
        .get(id)
        .or_else(|| models.models.values().find(|m| m.is_named(id)))
}

/// Rendezvous (highest random weight) hash of a box and a model: FNV-1a 64, stable across
/// builds and platforms so that every picker agrees.
pub fn rendezvous(box_name: &str, model: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in box_name.bytes().chain([0xff]).chain(model.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly for short keys: finish with a 64-bit avalanche (splitmix64).
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn model(name: &str, state: ModelState, gpus: &[u32], port: u32) -> ModelView {
        ModelView {
            name: name.into(),
            aliases: Vec::new(),
            state,
            draining: false,
            holders: 1,
            gpus: gpus.to_vec(),
            port,
            host: "127.0.0.1".into(),
            vram: None,
            pinned: false,
            last_used: None,
        }
    }

    fn models(list: Vec<ModelView>) -> BoxModels {
        BoxModels {
            watching: true,
            models: list
                .into_iter()
                .map(|m| (m.name.clone(), m))
                .collect::<BTreeMap<_, _>>(),
            gpus: BTreeMap::new(),
        }
    }

    static NO_USAGE: std::sync::LazyLock<HashMap<String, Usage>> =
        std::sync::LazyLock::new(HashMap::new);
    static NO_OTHERS: std::sync::LazyLock<OtherLoad> = std::sync::LazyLock::new(OtherLoad::default);

    fn candidates<'a>(boxes: &'a [(&'a str, BoxModels)]) -> Vec<Candidate<'a>> {
        boxes
            .iter()
            .map(|(name, models)| Candidate {
                name,
                models,
                in_flight: 0,
                usage: &NO_USAGE,
                others: &NO_OTHERS,
                routable: true,
            })
            .collect()
    }

    fn used(in_flight: u32, last_used: Option<Instant>) -> HashMap<String, Usage> {
        [(
            "b".to_string(),
            Usage {
                in_flight,
                last_used,
            },
        )]
        .into()
    }

    fn chosen(p: &Placement) -> (usize, Reason) {
        match p {
            Placement::Route { boxes, reason, .. } => (boxes[0], *reason),
            other => panic!("not routed: {other:?}"),
        }
    }

    /// Places `model` at `now` with nothing pending, no in-flight limit and no fallbacks.
    fn place_at(model: &str, c: &[Candidate<'_>], now: Instant) -> Placement {
        place(model, c, &HashMap::new(), now, 0, 0)
    }

    fn place_now(model: &str, c: &[Candidate<'_>]) -> Placement {
        place_at(model, c, Instant::now())
    }

    /// Three boxes, each with models a (GPU 0) and b (GPU 0) and c (GPU 1).
    fn three(states: [[ModelState; 3]; 3]) -> Vec<(&'static str, BoxModels)> {
        ["gpu1", "gpu2", "gpu3"]
            .into_iter()
            .zip(states)
            .map(|(name, [a, b, c])| {
                (
                    name,
                    models(vec![
                        model("a", a, &[0], 1),
                        model("b", b, &[0], 2),
                        model("c", c, &[1], 3),
                    ]),
                )
            })
            .collect()
    }

    use ModelState::{Ready as R, Starting as St, Stopped as S};

    #[test]
    fn ready_wins_then_fewest_in_flight() {
        let boxes = three([[S, S, S], [R, S, S], [S, S, S]]);
        let c = candidates(&boxes);
        assert_eq!(chosen(&place_now("a", &c)), (1, Reason::Ready));
        let boxes = three([[R, S, S], [R, S, S], [S, S, S]]);
        let mut c = candidates(&boxes);
        c[0].in_flight = 5;
        c[1].in_flight = 2;
        assert_eq!(chosen(&place_now("a", &c)), (1, Reason::Ready));
    }

    #[test]
    fn draining_or_unroutable_is_not_ready() {
        let mut boxes = three([[R, S, S], [S, S, S], [S, S, S]]);
        boxes[0].1.models.get_mut("a").unwrap().draining = true;
        let c = candidates(&boxes);
        assert_ne!(chosen(&place_now("a", &c)).1, Reason::Ready);
        let boxes = three([[R, S, S], [S, S, S], [S, S, S]]);
        let mut c = candidates(&boxes);
        c[0].routable = false;
        assert_ne!(chosen(&place_now("a", &c)).0, 0);
    }

    #[test]
    fn starting_is_joined() {
        let boxes = three([[S, S, S], [S, S, S], [St, S, S]]);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))),
            (2, Reason::Starting)
        );
    }

    #[test]
    fn cold_model_goes_where_it_fits_not_where_it_evicts() {
        // b is ready on gpu1 and gpu2 (GPU 0 taken): a fits only on gpu3.
        let boxes = three([[S, R, S], [S, R, S], [S, S, S]]);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))),
            (2, Reason::Fits)
        );
        // c (GPU 1) fits everywhere: the rendezvous hash decides, the same every time.
        let boxes = three([[S, R, S], [S, R, S], [S, S, S]]);
        let first = chosen(&place_now("c", &candidates(&boxes)));
        assert_eq!(first.1, Reason::Fits);
        for _ in 0..10 {
            assert_eq!(chosen(&place_now("c", &candidates(&boxes))), first);
        }
    }

    #[test]
    fn a_busy_model_is_not_evicted_while_an_idle_box_can_take_it() {
        let mut boxes = three([[S, R, S], [S, R, S], [S, S, S]]);
        boxes.truncate(2);
        let now = Instant::now();
        let (busy, idle) = (used(1, Some(now)), used(0, Some(now)));
        let mut c = candidates(&boxes);
        c[0].usage = &busy;
        c[1].usage = &idle;
        assert_eq!(chosen(&place_at("a", &c, now)), (1, Reason::Evicts));
        // Both busy: the one with fewer requests in flight, and it is "busy" (drain first).
        let busier = used(3, Some(now));
        let mut c = candidates(&boxes);
        c[0].usage = &busier;
        c[0].in_flight = 3;
        c[1].usage = &busy;
        c[1].in_flight = 1;
        assert_eq!(chosen(&place_at("a", &c, now)), (1, Reason::Busy));
    }

    #[test]
    fn the_longest_idle_box_is_evicted_first() {
        let boxes = three([[S, R, S], [S, R, S], [S, R, S]]);
        let now = Instant::now();
        let usages: Vec<_> = [5u64, 60, 20]
            .into_iter()
            .map(|idle| used(0, Some(now - Duration::from_secs(idle))))
            .collect();
        let mut c = candidates(&boxes);
        for (candidate, usage) in c.iter_mut().zip(&usages) {
            candidate.usage = usage;
        }
        assert_eq!(chosen(&place_at("a", &c, now)), (1, Reason::Evicts));
        // A model never used through the picker is the idlest of all.
        c[2].usage = &NO_USAGE;
        assert_eq!(chosen(&place_at("a", &c, now)), (2, Reason::Evicts));
    }

    #[test]
    fn a_pending_placement_is_followed_and_occupies_its_box() {
        let boxes = three([[S, S, S], [S, S, S], [S, S, S]]);
        let c = candidates(&boxes);
        let now = Instant::now();
        let first = chosen(&place_at("a", &c, now));
        assert_eq!(first.1, Reason::Fits);
        let mut pending = HashMap::new();
        pending.insert("a".to_string(), (c[first.0].name.to_string(), now));
        assert_eq!(
            chosen(&place("a", &c, &pending, now, 0, 0)),
            (first.0, Reason::Pending)
        );
        // b conflicts with the pending a: it does not go to the same box.
        let b = chosen(&place("b", &c, &pending, now, 0, 0));
        assert_eq!(b.1, Reason::Fits);
        assert_ne!(b.0, first.0);
        // An old pending placement is forgotten.
        let later = now + PENDING_FOR + Duration::from_millis(1);
        assert_eq!(
            chosen(&place("a", &c, &pending, later, 0, 0)).1,
            Reason::Fits
        );
    }

    #[test]
    fn shed_unavailable_unknown_and_fallbacks() {
        let boxes = three([[R, S, S], [R, S, S], [S, S, S]]);
        let mut c = candidates(&boxes);
        for candidate in &mut c {
            candidate.in_flight = 4;
        }
        assert_eq!(
            place("a", &c, &HashMap::new(), Instant::now(), 4, 0),
            Placement::Shed
        );
        for candidate in &mut c {
            candidate.routable = false;
        }
        assert!(matches!(place_now("a", &c), Placement::Unavailable(_)));
        assert_eq!(place_now("nope", &c), Placement::UnknownModel);
        let c = candidates(&boxes);
        match place("a", &c, &HashMap::new(), Instant::now(), 0, 2) {
            Placement::Route { boxes, .. } => {
                assert_eq!(boxes.len(), 3);
                assert!(
                    boxes[..2].contains(&0) && boxes[..2].contains(&1),
                    "{boxes:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aliases_resolve_to_the_model() {
        let mut boxes = three([[S, S, S], [R, S, S], [S, S, S]]);
        for (_, m) in &mut boxes {
            m.models.get_mut("a").unwrap().aliases.push("alpha".into());
        }
        match place_now("alpha", &candidates(&boxes)) {
            Placement::Route { boxes, model, .. } => {
                assert_eq!((boxes[0], model.as_str()), (1, "a"))
            }
            other => panic!("{other:?}"),
        }
    }

    const GIB: u64 = 1 << 30;

    fn memory(boxes: &mut [(&str, BoxModels)], capacity: u64) {
        for (_, models) in boxes {
            let live = |gpu: u32| {
                models
                    .models
                    .values()
                    .filter(|m| m.is_resident() && (m.gpus.is_empty() || m.gpus.contains(&gpu)))
                    .map(|m| m.vram.unwrap_or(capacity))
                    .sum()
            };
            models.gpus = [0, 1]
                .into_iter()
                .map(|gpu| {
                    let view = crate::fleet::GpuView {
                        capacity: Some(capacity),
                        reserved: live(gpu),
                    };
                    (gpu, view)
                })
                .collect();
        }
    }

    fn set(boxes: &mut [(&str, BoxModels)], model: &str, change: impl Fn(&mut ModelView)) {
        for (_, models) in boxes {
            change(models.models.get_mut(model).unwrap());
        }
    }

    #[test]
    fn a_model_fits_next_to_another_where_the_gpu_has_room() {
        // a and b share GPU 0: with vram 10 + 10 GiB on 24 GiB GPUs both fit, so a goes
        // next to the ready b (fits) rather than wherever the hash says.
        let mut boxes = three([[S, R, S], [S, S, S], [S, S, S]]);
        set(&mut boxes, "a", |m| m.vram = Some(10 * GIB));
        set(&mut boxes, "b", |m| m.vram = Some(10 * GIB));
        // Boxes 2 and 3 are busy elsewhere: b's GPU on box 1 has room.
        boxes[1].1.models.get_mut("b").unwrap().state = R;
        boxes[2].1.models.get_mut("b").unwrap().state = R;
        memory(&mut boxes, 24 * GIB);
        let c = candidates(&boxes);
        let (_, reason) = chosen(&place_now("a", &c));
        assert_eq!(reason, Reason::Fits);
        // 20 GiB each: no longer fits next to b anywhere; they are all "evict idle".
        set(&mut boxes, "a", |m| m.vram = Some(20 * GIB));
        memory(&mut boxes, 24 * GIB);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))).1,
            Reason::Evicts
        );
        // Without a known GPU size the GPU is taken whole, whatever the vram.
        set(&mut boxes, "a", |m| m.vram = Some(GIB));
        for (_, models) in &mut boxes {
            models.gpus.clear();
        }
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))).1,
            Reason::Evicts
        );
    }

    #[test]
    fn a_pinned_model_is_never_in_the_way() {
        // b (GPU 0) is ready everywhere; pinned on gpu1 and gpu2: a goes to gpu3, even
        // though gpu3's b was used more recently.
        let mut boxes = three([[S, R, S], [S, R, S], [S, R, S]]);
        boxes[0].1.models.get_mut("b").unwrap().pinned = true;
        boxes[1].1.models.get_mut("b").unwrap().pinned = true;
        let now = Instant::now();
        let recent = used(0, Some(now));
        let mut c = candidates(&boxes);
        c[2].usage = &recent;
        assert_eq!(chosen(&place_at("a", &c, now)), (2, Reason::Evicts));
        // Even busy there: busy beats blocked.
        let busy = used(3, Some(now));
        c[2].usage = &busy;
        assert_eq!(chosen(&place_at("a", &c, now)), (2, Reason::Busy));
        // Pinned everywhere: no box can start it.
        boxes[2].1.models.get_mut("b").unwrap().pinned = true;
        assert!(matches!(
            place_at("a", &candidates(&boxes), now),
            Placement::Unavailable(m) if m.contains("pinned")
        ));
        // A pinned model that leaves room on its GPU does not block.
        set(&mut boxes, "a", |m| m.vram = Some(4 * GIB));
        set(&mut boxes, "b", |m| m.vram = Some(4 * GIB));
        memory(&mut boxes, 24 * GIB);
        assert_eq!(chosen(&place_now("a", &candidates(&boxes))).1, Reason::Fits);
    }

    #[test]
    fn other_fronts_requests_make_a_model_busy_and_a_box_loaded() {
        let boxes = three([[S, R, S], [S, R, S], [S, S, S]]);
        let mut boxes = boxes;
        boxes.truncate(2);
        // Box 0's b is busy with another front's requests (its gateway reports them).
        let others = OtherLoad {
            total: 2,
            models: [("b".to_string(), 2)].into(),
        };
        // Box 1's b was used through this picker just now; box 0's never was (the idlest,
        // were its other requests not counted).
        let now = Instant::now();
        let just_used = used(0, Some(now));
        let mut c = candidates(&boxes);
        c[0].others = &others;
        c[0].in_flight = 2;
        c[1].usage = &just_used;
        assert_eq!(chosen(&place_at("a", &c, now)), (1, Reason::Evicts));
        // Ready on both: the less loaded one, counting the others' requests.
        let boxes = three([[R, S, S], [R, S, S], [S, S, S]]);
        let mut c = candidates(&boxes);
        c[1].others = &others;
        c[1].in_flight = 2;
        c[0].in_flight = 1;
        assert_eq!(chosen(&place_now("a", &c)), (0, Reason::Ready));
    }

    #[test]
    fn the_supervisors_last_use_counts_as_use() {
        // The b on gpu2 was never used through this picker but another front used it just
        // now (the supervisor's last use): gpu1's b, idle for a minute, is the one to go.
        let mut boxes = three([[S, R, S], [S, R, S], [S, S, S]]);
        boxes.truncate(2);
        let now = Instant::now();
        boxes[1].1.models.get_mut("b").unwrap().last_used = Some(now);
        let minute = used(0, Some(now - Duration::from_secs(60)));
        let mut c = candidates(&boxes);
        c[0].usage = &minute;
        assert_eq!(chosen(&place_at("a", &c, now)), (0, Reason::Evicts));
    }

    #[test]
    fn a_sleeping_model_wakes_before_a_cold_start_but_after_ready() {
        use ModelState::Sleeping as Z;
        // Asleep on gpu2, fits cold on gpu1 and gpu3: it wakes on gpu2.
        let boxes = three([[S, S, S], [Z, S, S], [S, S, S]]);
        let c = candidates(&boxes);
        assert_eq!(chosen(&place_now("a", &c)), (1, Reason::Sleeping));
        assert!(Reason::Sleeping.is_cold());
        // Ready on gpu3: the ready one wins; starting on gpu3: joining that load wins.
        let boxes = three([[S, S, S], [Z, S, S], [R, S, S]]);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))),
            (2, Reason::Ready)
        );
        let boxes = three([[S, S, S], [Z, S, S], [St, S, S]]);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))),
            (2, Reason::Starting)
        );
        // A sleeping b (GPU 0) frees its GPU: a (GPU 0) fits next to it; a model on b's
        // port is in its way, and evicting a sleeper is evicting an idle model.
        let boxes = three([[S, Z, S], [S, Z, S], [S, Z, S]]);
        assert_eq!(chosen(&place_now("a", &candidates(&boxes))).1, Reason::Fits);
        let mut boxes = three([[S, Z, S], [S, Z, S], [S, Z, S]]);
        set(&mut boxes, "a", |m| m.port = 2);
        assert_eq!(
            chosen(&place_now("a", &candidates(&boxes))).1,
            Reason::Evicts
        );
    }

    #[test]
    fn rendezvous_spreads_models() {
        let boxes = ["gpu1", "gpu2", "gpu3", "gpu4"];
        let mut wins = [0u32; 4];
        for m in 0..400 {
            let model = format!("model-{m}");
            let best = (0..4)
                .max_by_key(|&i| rendezvous(boxes[i], &model))
                .unwrap();
            wins[best] += 1;
        }
        assert!(wins.iter().all(|&w| w > 60), "{wins:?}");
    }
}
