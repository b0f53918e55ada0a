//! Property tests of the scheduling policy: random sequences of activations, holds,
//! releases, start results, crashes, stops, deactivations and clock steps, driven through
//! the pure [`Policy`] by a small simulated world (processes, client streams). After every
//! step the invariants hold:
//! - the processes alive together fit (no shared port, memory fits on every shared GPU);
//! - a pinned model is never stopped to make room;
//! - a held model is stopped to make room only after its drain timed out (or with force);
//! - a ready model is stopped to make room only after its `min_residency`;
//!
//! and once clients stop asking and every process does what it is told, every activation
//! was granted or failed (no starvation, no deadlock).

use std::{
    collections::{BTreeMap, HashSet},
    time::Duration,
};

use gpuswap::{config::GpuMemory, pb::activate_event::Event};
use proptest::prelude::*;
use tokio::time::Instant;

use super::{
    placement::{Capacity, Placement},
    policy::{Action, FailureKind, Notice, Policy, Settings, State, StreamId},
};

const GIB: u64 = 1 << 30;
const MODELS: [&str; 4] = ["a", "b", "c", "d"];
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
enum Ev {
    Activate {
        model: usize,
        hold: bool,
        force: bool,
    },
    /// The client closes the k-th open stream (a waiter gives up, a holder lets go).
    Close(usize),
    StartOk(usize),
    StartErr(usize),
    Crash(usize),
    StopDone(usize),
    Deactivate {
        model: Option<usize>,
        force: bool,
    },
    Used(usize),
    Clock(u64),
}

fn event() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (0..MODELS.len(), any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(model, hold, force)| Ev::Activate { model, hold, force }),
        2 => any::<usize>().prop_map(Ev::Close),
        3 => any::<usize>().prop_map(Ev::StartOk),
        1 => any::<usize>().prop_map(Ev::StartErr),
        1 => any::<usize>().prop_map(Ev::Crash),
        3 => any::<usize>().prop_map(Ev::StopDone),
        1 => (prop::option::of(0..MODELS.len()), any::<bool>())
            .prop_map(|(model, force)| Ev::Deactivate { model, force }),
        1 => (0..MODELS.len()).prop_map(Ev::Used),
        2 => (0u64..15_000).prop_map(Ev::Clock),
    ]
}

fn placement() -> impl Strategy<Value = Placement> {
    (
        prop_oneof![
            Just(Some(vec![0])),
            Just(Some(vec![1])),
            Just(Some(vec![0, 1])),
            Just(None)
        ],
        1u16..=3,
        prop::option::of(prop::sample::select(vec![20, 40, 60, 70])),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(gpus, port, vram, pinned)| Placement {
            gpus,
            port,
            host: "127.0.0.1".into(),
            vram: vram.map(|g| g * GIB),
            pinned,
        })
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop::bool::weighted(0.8),
        prop::sample::select(vec![0u64, 3]),
    )
        .prop_map(|(sized, residency)| Settings {
            drain_timeout: DRAIN_TIMEOUT,
            min_residency: Duration::from_secs(residency),
            capacity: Capacity::new(sized.then_some(GpuMemory::Every(96 * GIB)), BTreeMap::new()),
        })
}

#[derive(Debug, PartialEq)]
enum Phase {
    Waiting,
    Held,
    Done,
}

#[derive(Debug)]
struct Client {
    force: bool,
    phase: Phase,
    /// Ready or Failed came (or the client gave up).
    answered: bool,
    drain_requested: bool,
}

/// What a model looked like before the policy's turn.
struct Before {
    state: State,
    ready_at: Option<Instant>,
    holds: usize,
    drain_deadline: Option<Instant>,
    pinned: bool,
}

struct World {
    policy: Policy,
    now: Instant,
    min_residency: Duration,
    clients: BTreeMap<StreamId, Client>,
    next_stream: StreamId,
    /// Live processes: model -> (generation, placement).
    processes: BTreeMap<String, (u64, Placement)>,
    starting: Vec<(String, u64)>,
    stopping: Vec<(String, u64)>,
    next_deactivation: u64,
}

fn pick<T: Clone>(items: &[T], k: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[k % items.len()].clone())
}

impl World {
    fn new(settings: Settings, placements: Vec<Placement>) -> Self {
        let min_residency = settings.min_residency;
        let mut policy = Policy::new(settings, 1);
        for (name, placement) in MODELS.iter().zip(placements) {
            policy.add_model(name, placement);
        }
        World {
            policy,
            now: Instant::now(),
            min_residency,
            clients: BTreeMap::new(),
            next_stream: 1,
            processes: BTreeMap::new(),
            starting: Vec::new(),
            stopping: Vec::new(),
            next_deactivation: 1,
        }
    }

    fn open_streams(&self) -> Vec<StreamId> {
        self.clients
            .iter()
            .filter(|(_, c)| c.phase != Phase::Done)
            .map(|(id, _)| *id)
            .collect()
    }

    fn apply(&mut self, ev: &Ev) {
        let now = self.now;
        match ev {
            Ev::Activate { model, hold, force } => {
                let id = self.next_stream;
                self.next_stream += 1;
                self.clients.insert(
                    id,
                    Client {
                        force: *force,
                        phase: Phase::Waiting,
                        answered: false,
                        drain_requested: false,
                    },
                );
                self.policy.activate(id, MODELS[*model], *hold, *force);
            }
            Ev::Close(k) => {
                if let Some(id) = pick(&self.open_streams(), *k) {
                    let client = self.clients.get_mut(&id).expect("open");
                    client.phase = Phase::Done;
                    client.answered = true;
                    self.policy.stream_closed(id, now);
                }
            }
            Ev::StartOk(k) => {
                if let Some((model, generation)) = pick(&self.starting, *k) {
                    self.starting.retain(|s| *s != (model.clone(), generation));
                    self.policy.start_succeeded(&model, generation, now);
                }
            }
            Ev::StartErr(k) => {
                if let Some((model, generation)) = pick(&self.starting, *k) {
                    self.starting.retain(|s| *s != (model.clone(), generation));
                    let kind = FailureKind::Start;
                    self.policy.start_failed(
                        &model,
                        generation,
                        "boom".into(),
                        "exited",
                        kind,
                        now,
                    );
                }
            }
            Ev::Crash(k) => {
                let running: Vec<(String, u64)> = self
                    .processes
                    .iter()
                    .map(|(m, (g, _))| (m.clone(), *g))
                    .collect();
                if let Some((model, generation)) = pick(&running, *k) {
                    self.policy
                        .exited(&model, generation, "exited: crashed".into(), now);
                }
            }
            Ev::StopDone(k) => {
                if let Some((model, generation)) = pick(&self.stopping, *k) {
                    self.stop_done(&model, generation);
                }
            }
            Ev::Deactivate { model, force } => {
                let models = match model {
                    Some(m) => vec![MODELS[*m].to_string()],
                    None => MODELS.iter().map(|m| m.to_string()).collect(),
                };
                let id = self.next_deactivation;
                self.next_deactivation += 1;
                self.policy.deactivate(id, models, *force, now);
            }
            Ev::Used(model) => self.policy.used(MODELS[*model], now),
            Ev::Clock(ms) => self.now += Duration::from_millis(*ms),
        }
    }

    fn stop_done(&mut self, model: &str, generation: u64) {
        self.stopping
            .retain(|s| *s != (model.to_owned(), generation));
        if self
            .processes
            .get(model)
            .is_some_and(|(g, _)| *g == generation)
        {
            self.processes.remove(model);
        }
        self.policy.stop_finished(model, generation);
    }

    fn before(&self) -> BTreeMap<String, Before> {
        self.policy
            .slots()
            .map(|(name, slot)| {
                (
                    name.clone(),
                    Before {
                        state: slot.state,
                        ready_at: slot.ready_at,
                        holds: slot.holds.len(),
                        drain_deadline: slot.drain.as_ref().map(|d| d.deadline),
                        pinned: slot.occupied().pinned,
                    },
                )
            })
            .collect()
    }

    /// One event, then the policy's turn; checks what it did against the invariants.
    fn step(&mut self, ev: &Ev) -> Result<(), TestCaseError> {
        self.apply(ev);
        let before = self.before();
        self.policy.pump(self.now, &|_| None);
        self.carry_out(&before)?;
        self.check_fit()
    }

    fn carry_out(&mut self, before: &BTreeMap<String, Before>) -> Result<(), TestCaseError> {
        for action in self.policy.take_actions() {
            match action {
                Action::Spawn {
                    model, generation, ..
                } => {
                    let placement = self.policy.slot(&model).expect("model").occupied().clone();
                    prop_assert!(
                        !self.processes.contains_key(&model),
                        "{model} spawned twice"
                    );
                    self.processes
                        .insert(model.clone(), (generation, placement));
                    // The actor reports the spawn as soon as the process exists.
                    self.policy.spawned(&model, generation);
                    self.starting.push((model, generation));
                }
                Action::Stop {
                    model,
                    generation,
                    swap,
                    ..
                } => {
                    if let Some(stream) = swap {
                        let b = &before[&model];
                        prop_assert!(!b.pinned, "pinned {model} stopped to make room");
                        if b.state == State::Ready {
                            prop_assert!(
                                b.ready_at
                                    .is_some_and(|t| t + self.min_residency <= self.now),
                                "{model} stopped within its min_residency"
                            );
                        }
                        let forced = self.clients.get(&stream).is_some_and(|c| c.force);
                        prop_assert!(
                            b.holds == 0
                                || forced
                                || b.drain_deadline.is_some_and(|d| d <= self.now),
                            "held {model} stopped before its drain ended"
                        );
                    }
                    self.starting.retain(|s| *s != (model.clone(), generation));
                    self.stopping.push((model, generation));
                }
                Action::Send { stream, notice, .. } => {
                    let Some(client) = self.clients.get_mut(&stream) else {
                        continue;
                    };
                    prop_assert!(
                        client.phase != Phase::Done,
                        "event after the end: {notice:?}"
                    );
                    match notice {
                        Notice::Ready { hold, .. } => {
                            prop_assert!(!client.answered, "answered twice");
                            client.answered = true;
                            if hold {
                                client.phase = Phase::Held;
                            }
                        }
                        Notice::Failed { .. } => {
                            prop_assert!(!client.answered, "answered twice");
                            client.answered = true;
                        }
                        Notice::Event(Event::DrainRequested(_)) => client.drain_requested = true,
                        _ => {}
                    }
                }
                Action::Close { stream } => {
                    if let Some(client) = self.clients.get_mut(&stream) {
                        client.phase = Phase::Done;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn check_fit(&self) -> Result<(), TestCaseError> {
        let members: Vec<(&str, &Placement)> = self
            .processes
            .iter()
            .map(|(m, (_, p))| (m.as_str(), p))
            .collect();
        let clash = self.policy.settings().capacity.clash(&members);
        prop_assert!(clash.is_none(), "running together: {clash:?}");
        Ok(())
    }

    /// Clients ask for nothing more; holders let go when asked; every start succeeds and
    /// every stop finishes; time passes. Then every activation must have its answer.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..200 {
            let polite: Vec<StreamId> = self
                .clients
                .iter()
                .filter(|(_, c)| c.phase == Phase::Held && c.drain_requested)
                .map(|(id, _)| *id)
                .collect();
            for id in polite {
                self.clients.get_mut(&id).expect("held").phase = Phase::Done;
                self.policy.stream_closed(id, self.now);
            }
            for (model, generation) in std::mem::take(&mut self.starting) {
                self.policy.start_succeeded(&model, generation, self.now);
            }
            for (model, generation) in self.stopping.clone() {
                self.stop_done(&model, generation);
            }
            self.step(&Ev::Clock(1_000))?;
            if self.policy.queue().next().is_none() && self.starting.is_empty() {
                break;
            }
        }
        let unanswered: Vec<(&StreamId, &Client)> =
            self.clients.iter().filter(|(_, c)| !c.answered).collect();
        prop_assert!(unanswered.is_empty(), "never answered: {unanswered:?}");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold_after_every_step(
        settings in settings(),
        placements in prop::collection::vec(placement(), MODELS.len()),
        events in prop::collection::vec(event(), 1..80),
    ) {
        let mut world = World::new(settings, placements);
        for ev in &events {
            world.step(ev)?;
        }
        world.settle()?;
    }
}

/// The three scenarios of the issue, step by step through the policy alone.
mod scenarios {
    use super::*;

    fn gib(gpus: &[u32], port: u16, vram: u64, pinned: bool) -> Placement {
        Placement {
            gpus: Some(gpus.to_vec()),
            port,
            host: "127.0.0.1".into(),
            vram: Some(vram * GIB),
            pinned,
        }
    }

    fn world(placements: Vec<Placement>) -> World {
        let settings = Settings {
            drain_timeout: DRAIN_TIMEOUT,
            min_residency: Duration::ZERO,
            capacity: Capacity::new(Some(GpuMemory::Every(96 * GIB)), BTreeMap::new()),
        };
        World::new(settings, placements)
    }

    /// Activates `model` (hold) and lets it start; returns the stream.
    fn ready(w: &mut World, model: usize) -> StreamId {
        let id = w.next_stream;
        w.step(&Ev::Activate {
            model,
            hold: true,
            force: false,
        })
        .unwrap();
        for _ in 0..10 {
            let polite: Vec<StreamId> = w
                .clients
                .iter()
                .filter(|(_, c)| c.phase == Phase::Held && c.drain_requested)
                .map(|(id, _)| *id)
                .collect();
            for held in polite {
                w.clients.get_mut(&held).unwrap().phase = Phase::Done;
                w.policy.stream_closed(held, w.now);
            }
            for (m, g) in w.stopping.clone() {
                w.stop_done(&m, g);
            }
            for (m, g) in std::mem::take(&mut w.starting) {
                w.policy.start_succeeded(&m, g, w.now);
            }
            w.step(&Ev::Clock(10)).unwrap();
            if w.clients[&id].answered {
                break;
            }
        }
        id
    }

    fn running(w: &World) -> HashSet<String> {
        w.processes.keys().cloned().collect()
    }

    #[test]
    fn two_forties_share_and_the_seventy_stops_both() {
        let mut w = world(vec![
            gib(&[0], 1, 40, false),
            gib(&[0], 2, 40, false),
            gib(&[0], 3, 70, false),
        ]);
        ready(&mut w, 0);
        ready(&mut w, 1);
        assert_eq!(running(&w), HashSet::from(["a".into(), "b".into()]));
        let c = ready(&mut w, 2);
        assert!(w.clients[&c].answered);
        assert_eq!(running(&w), HashSet::from(["c".into()]));
    }

    #[test]
    fn a_model_in_the_way_of_a_pinned_one_fails_at_once() {
        let mut w = world(vec![gib(&[0], 1, 30, true), gib(&[0], 2, 70, false)]);
        ready(&mut w, 0);
        w.step(&Ev::Activate {
            model: 1,
            hold: false,
            force: false,
        })
        .unwrap();
        let (_, client) = w.clients.iter().next_back().unwrap();
        assert!(client.answered && client.phase == Phase::Done);
        assert_eq!(running(&w), HashSet::from(["a".into()]));
        assert!(w.stopping.is_empty());
    }

    #[test]
    fn the_least_recently_used_goes() {
        let mut w = world(vec![
            gib(&[0], 1, 40, false),
            gib(&[0], 2, 40, false),
            gib(&[0], 3, 40, false),
        ]);
        ready(&mut w, 0);
        w.step(&Ev::Clock(1_000)).unwrap();
        ready(&mut w, 1);
        w.step(&Ev::Clock(1_000)).unwrap();
        w.step(&Ev::Used(0)).unwrap();
        w.step(&Ev::Clock(1_000)).unwrap();
        ready(&mut w, 2);
        assert_eq!(running(&w), HashSet::from(["a".into(), "c".into()]));
    }
}
