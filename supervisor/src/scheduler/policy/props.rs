//! Property tests of the scheduling policy: random sequences of activations, holds,
//! releases, start results, crashes, stops, deactivations and clock steps, driven through
//! the pure [`Policy`] by a small simulated world (processes, client streams). After every
//! step the invariants hold:
//! - the processes alive together fit (no shared port, memory fits on every shared GPU);
//! - a pinned model is never stopped to make room;
//! - a held model is stopped to make room only after its drain timed out (or with force);
//! - a ready model is stopped to make room only after its `min_residency`;
//! - the same holds for a model put to sleep to make room, and a model that cannot sleep
//!   never is; no hold is left on a model put to sleep, and no activation is granted while
//!   its model's process is asleep, falling asleep or waking (no request reaches a sleeper);
//! - sleeping models (and those still stopping after a sleep) never hold more host memory
//!   than the budget;
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
    super::placement::{Capacity, Placement},
    Action, FailureKind, Notice, Policy, Settings, State, StreamId,
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
    SleepOk(usize),
    SleepErr(usize),
    WakeOk(usize),
    WakeErr(usize),
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
        2 => any::<usize>().prop_map(Ev::SleepOk),
        1 => any::<usize>().prop_map(Ev::SleepErr),
        2 => any::<usize>().prop_map(Ev::WakeOk),
        1 => any::<usize>().prop_map(Ev::WakeErr),
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
        prop::option::weighted(0.5, prop::sample::select(vec![20u64, 40, 60])),
    )
        .prop_map(|(gpus, port, vram, pinned, sleep)| Placement {
            gpus,
            port,
            host: "127.0.0.1".into(),
            vram: vram.map(|g| g * GIB),
            pinned,
            sleep: sleep.map(|g| g * GIB),
        })
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        prop::bool::weighted(0.8),
        prop::sample::select(vec![0u64, 3]),
        prop::sample::select(vec![0u64, 50, 100]),
    )
        .prop_map(|(sized, residency, host)| Settings {
            drain_timeout: DRAIN_TIMEOUT,
            min_residency: Duration::from_secs(residency),
            capacity: Capacity::new(sized.then_some(GpuMemory::Every(96 * GIB)), BTreeMap::new()),
            host_memory: host * GIB,
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
    model: String,
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

/// A live process as the simulated world sees it.
#[derive(Debug)]
struct Process {
    generation: u64,
    /// Where it was started (awake).
    placement: Placement,
    /// Passed its readiness check or woke, and was not asked to sleep since.
    awake: bool,
    /// Its GPU memory is released (its sleep succeeded, no wake asked since).
    asleep: bool,
    /// Host memory it holds (asked to sleep, not woken since).
    host: u64,
}

/// A step the world has begun and the policy waits to hear the end of.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Start,
    Stop,
    Sleep,
    Wake,
}

struct World {
    policy: Policy,
    now: Instant,
    min_residency: Duration,
    clients: BTreeMap<StreamId, Client>,
    next_stream: StreamId,
    processes: BTreeMap<String, Process>,
    starting: Vec<(String, u64)>,
    stopping: Vec<(String, u64)>,
    sleeping: Vec<(String, u64)>,
    waking: Vec<(String, u64)>,
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
            sleeping: Vec::new(),
            waking: Vec::new(),
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
                        model: MODELS[*model].to_string(),
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
            Ev::StartOk(k) => self.succeed_one(Pending::Start, *k),
            Ev::StartErr(k) => {
                if let Some((model, generation)) = self.take_pending(Pending::Start, *k) {
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
                    .map(|(m, p)| (m.clone(), p.generation))
                    .collect();
                if let Some((model, generation)) = pick(&running, *k) {
                    self.policy
                        .exited(&model, generation, "exited: crashed".into(), now);
                }
            }
            Ev::StopDone(k) => self.succeed_one(Pending::Stop, *k),
            Ev::SleepOk(k) => self.succeed_one(Pending::Sleep, *k),
            Ev::SleepErr(k) => {
                if let Some((model, generation)) = self.take_pending(Pending::Sleep, *k) {
                    self.policy
                        .sleep_failed(&model, generation, "refused".into(), now);
                }
            }
            Ev::WakeOk(k) => self.succeed_one(Pending::Wake, *k),
            Ev::WakeErr(k) => {
                if let Some((model, generation)) = self.take_pending(Pending::Wake, *k) {
                    self.policy
                        .wake_failed(&model, generation, "refused".into(), now);
                }
            }
            Ev::Deactivate { model, force } => {
                let models = match model {
                    Some(m) => vec![MODELS[*m].to_string()],
                    None => MODELS.iter().map(|m| m.to_string()).collect(),
                };
                let id = self.next_deactivation;
                self.next_deactivation += 1;
                self.policy.deactivate(id, models, *force, false, now);
            }
            Ev::Used(model) => self.policy.used(MODELS[*model], now),
            Ev::Clock(ms) => self.now += Duration::from_millis(*ms),
        }
    }

    fn process(&mut self, model: &str, generation: u64) -> Option<&mut Process> {
        self.processes
            .get_mut(model)
            .filter(|p| p.generation == generation)
    }

    fn pending(&mut self, kind: Pending) -> &mut Vec<(String, u64)> {
        match kind {
            Pending::Start => &mut self.starting,
            Pending::Stop => &mut self.stopping,
            Pending::Sleep => &mut self.sleeping,
            Pending::Wake => &mut self.waking,
        }
    }

    /// Picks the k-th pending step of `kind` (its model and generation) and ends it.
    fn take_pending(&mut self, kind: Pending, k: usize) -> Option<(String, u64)> {
        let pending = self.pending(kind);
        let step = pick(pending, k)?;
        pending.retain(|s| *s != step);
        Some(step)
    }

    /// The k-th pending step of `kind` succeeds.
    fn succeed_one(&mut self, kind: Pending, k: usize) {
        if let Some((model, generation)) = self.take_pending(kind, k) {
            self.succeed(kind, &model, generation);
        }
    }

    /// Every pending step of these kinds succeeds, kind after kind.
    fn succeed_all(&mut self, kinds: &[Pending]) {
        for &kind in kinds {
            for (model, generation) in std::mem::take(self.pending(kind)) {
                self.succeed(kind, &model, generation);
            }
        }
    }

    /// The process does what it was told, and the policy hears of it.
    fn succeed(&mut self, kind: Pending, model: &str, generation: u64) {
        let now = self.now;
        match kind {
            Pending::Start => {
                if let Some(p) = self.process(model, generation) {
                    p.awake = true;
                }
                self.policy.start_succeeded(model, generation, now);
            }
            Pending::Stop => {
                if self.process(model, generation).is_some() {
                    self.processes.remove(model);
                }
                self.policy.stop_finished(model, generation);
            }
            Pending::Sleep => {
                if let Some(p) = self.process(model, generation) {
                    p.asleep = true;
                }
                self.policy.sleep_finished(model, generation);
            }
            Pending::Wake => {
                if let Some(p) = self.process(model, generation) {
                    p.awake = true;
                    p.host = 0;
                }
                self.policy.wake_succeeded(model, generation, now);
            }
        }
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
        self.check_fit()?;
        self.check_host_memory()
    }

    /// A model stopped or put to sleep to make room for the waiter `stream`.
    fn check_made_room(
        &self,
        before: &BTreeMap<String, Before>,
        model: &str,
        stream: StreamId,
    ) -> Result<(), TestCaseError> {
        let b = &before[model];
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
            b.holds == 0 || forced || b.drain_deadline.is_some_and(|d| d <= self.now),
            "held {model} stopped before its drain ended"
        );
        Ok(())
    }

    fn carry_out(&mut self, before: &BTreeMap<String, Before>) -> Result<(), TestCaseError> {
        for action in self.policy.take_actions() {
            if let Action::Stop {
                model,
                swap: Some(stream),
                ..
            }
            | Action::Sleep {
                model,
                swap: Some(stream),
                ..
            } = &action
            {
                self.check_made_room(before, model, *stream)?;
            }
            match action {
                Action::Spawn {
                    model, generation, ..
                } => {
                    let placement = self.policy.slot(&model).expect("model").occupied().clone();
                    prop_assert!(
                        !self.processes.contains_key(&model),
                        "{model} spawned twice"
                    );
                    self.processes.insert(
                        model.clone(),
                        Process {
                            generation,
                            placement,
                            awake: false,
                            asleep: false,
                            host: 0,
                        },
                    );
                    // The actor reports the spawn as soon as the process exists.
                    self.policy.spawned(&model, generation);
                    self.starting.push((model, generation));
                }
                Action::Stop {
                    model, generation, ..
                } => {
                    let key = (model.clone(), generation);
                    self.starting.retain(|s| *s != key);
                    self.sleeping.retain(|s| *s != key);
                    self.waking.retain(|s| *s != key);
                    self.stopping.push(key);
                }
                Action::Sleep {
                    model, generation, ..
                } => {
                    prop_assert_eq!(before[&model].state, State::Ready);
                    let held = self
                        .clients
                        .values()
                        .any(|c| c.model == model && c.phase == Phase::Held);
                    prop_assert!(!held, "{model} put to sleep while a client holds it");
                    let process = self.process(&model, generation).expect("a live process");
                    let Some(host) = process.placement.sleep else {
                        return Err(TestCaseError::fail(format!("{model} cannot sleep")));
                    };
                    process.awake = false;
                    process.host = host;
                    self.sleeping.push((model, generation));
                }
                Action::Wake {
                    model, generation, ..
                } => {
                    let process = self.process(&model, generation).expect("a live process");
                    prop_assert!(process.asleep, "{model} woken while not asleep");
                    // From now on it takes its GPU memory again.
                    process.asleep = false;
                    self.waking.push((model, generation));
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
                            let awake = self.processes.get(&client.model).is_some_and(|p| p.awake);
                            prop_assert!(awake, "{} granted while not awake", client.model);
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
        let asleep: Vec<(&str, Placement)> = self
            .processes
            .iter()
            .map(|(m, p)| {
                let taken = if p.asleep {
                    p.placement.asleep()
                } else {
                    p.placement.clone()
                };
                (m.as_str(), taken)
            })
            .collect();
        let members: Vec<(&str, &Placement)> = asleep.iter().map(|(m, p)| (*m, p)).collect();
        let clash = self.policy.settings().capacity.clash(&members);
        prop_assert!(clash.is_none(), "running together: {clash:?}");
        Ok(())
    }

    fn check_host_memory(&self) -> Result<(), TestCaseError> {
        let held: u64 = self.processes.values().map(|p| p.host).sum();
        let budget = self.policy.settings().host_memory;
        prop_assert!(
            held <= budget,
            "sleepers hold {held} bytes of host memory, over the budget of {budget}"
        );
        Ok(())
    }

    /// Holders asked to drain let go.
    fn let_go_when_asked(&mut self) {
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
    }

    /// Clients ask for nothing more; holders let go when asked; every start succeeds and
    /// every stop finishes; time passes. Then every activation must have its answer.
    fn settle(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..200 {
            self.let_go_when_asked();
            self.succeed_all(&[Pending::Start, Pending::Sleep, Pending::Wake, Pending::Stop]);
            self.step(&Ev::Clock(1_000))?;
            if self.policy.queue().next().is_none()
                && self.starting.is_empty()
                && self.waking.is_empty()
            {
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

/// The scenarios of the issue, step by step through the policy alone.
mod scenarios;
