//! The scenarios of the issue, step by step through the policy alone (in the property
//! tests' simulated world).

use super::*;

fn gib(gpus: &[u32], port: u16, vram: u64, pinned: bool) -> Placement {
    Placement {
        gpus: Some(gpus.to_vec()),
        port,
        host: "127.0.0.1".into(),
        vram: Some(vram * GIB),
        pinned,
        sleep: None,
    }
}

fn world(placements: Vec<Placement>) -> World {
    let settings = Settings {
        drain_timeout: DRAIN_TIMEOUT,
        min_residency: Duration::ZERO,
        capacity: Capacity::new(Some(GpuMemory::Every(96 * GIB)), BTreeMap::new()),
        host_memory: 100 * GIB,
    };
    World::new(settings, placements)
}

/// Unpinned models on GPU 0, one a port, of these sizes (GiB).
fn on_gpu0(vram: &[u64]) -> World {
    world(
        vram.iter()
            .zip(1..)
            .map(|(&vram, port)| gib(&[0], port, vram, false))
            .collect(),
    )
}

/// A client asks for `model` (without force); returns its stream.
fn ask(w: &mut World, model: usize, hold: bool) -> StreamId {
    let id = w.next_stream;
    w.step(&Ev::Activate {
        model,
        hold,
        force: false,
    })
    .unwrap();
    id
}

/// Activates `model` (hold) and lets it start; returns the stream.
fn ready(w: &mut World, model: usize) -> StreamId {
    let id = ask(w, model, true);
    for _ in 0..10 {
        w.let_go_when_asked();
        // The policy also runs while stops are still under way (any event pumps it).
        for _ in 0..2 {
            w.step(&Ev::Clock(10)).unwrap();
        }
        w.succeed_all(&[Pending::Stop, Pending::Start, Pending::Sleep, Pending::Wake]);
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
    let mut w = on_gpu0(&[40, 40, 70]);
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
    let id = ask(&mut w, 1, false);
    let client = &w.clients[&id];
    assert!(client.answered && client.phase == Phase::Done);
    assert_eq!(running(&w), HashSet::from(["a".into()]));
    assert!(w.stopping.is_empty());
}

/// `n` models of 70 GiB on GPU 0 (one a port) that sleep in 40 GiB of host memory.
fn sleepers(n: u16) -> World {
    let sleepy = |port| Placement {
        sleep: Some(40 * GIB),
        ..gib(&[0], port, 70, false)
    };
    world((1..=n).map(sleepy).collect())
}

/// Two sleepers: a starts, then b (a is put to sleep for it); with a's generation.
fn a_sleeps_for_b() -> (World, u64) {
    let mut w = sleepers(2);
    ready(&mut w, 0);
    let first = w.processes["a"].generation;
    ready(&mut w, 1);
    (w, first)
}

fn state(w: &World, model: &str) -> State {
    w.policy.slot(model).unwrap().state
}

#[test]
fn a_sleeper_makes_room_and_wakes_in_the_same_process() {
    let (mut w, first) = a_sleeps_for_b();
    assert_eq!(state(&w, "a"), State::Sleeping);
    assert!(w.processes["a"].asleep);
    let again = ready(&mut w, 0);
    assert!(w.clients[&again].answered);
    assert_eq!(state(&w, "a"), State::Ready);
    assert_eq!(w.processes["a"].generation, first);
    assert_eq!(state(&w, "b"), State::Sleeping);
    assert!(w.stopping.is_empty());
}

#[test]
fn the_budget_stops_the_least_recently_used_sleeper() {
    let mut w = sleepers(3);
    for model in [0, 1, 2] {
        ready(&mut w, model);
        w.step(&Ev::Clock(1_000)).unwrap();
    }
    assert_eq!(
        (state(&w, "a"), state(&w, "b")),
        (State::Sleeping, State::Sleeping)
    );
    // a wakes: c must sleep, 3 x 40 GiB do not fit in 100: b (used before c) stops.
    ready(&mut w, 0);
    assert_eq!(state(&w, "a"), State::Ready);
    assert_eq!(state(&w, "b"), State::Stopped);
    assert_eq!(state(&w, "c"), State::Sleeping);
}

#[test]
fn a_failed_wake_stops_and_starts_cold() {
    let (mut w, first) = a_sleeps_for_b();
    let id = ask(&mut w, 0, false);
    // b's holder lets go when asked, b sleeps, a wakes.
    for _ in 0..5 {
        w.let_go_when_asked();
        w.succeed_all(&[Pending::Sleep]);
        w.step(&Ev::Clock(10)).unwrap();
    }
    assert_eq!(w.waking, vec![("a".to_string(), first)]);
    w.step(&Ev::WakeErr(0)).unwrap();
    assert_eq!(w.stopping, vec![("a".to_string(), first)]);
    w.step(&Ev::StopDone(0)).unwrap();
    w.step(&Ev::StartOk(0)).unwrap();
    assert!(w.clients[&id].answered);
    assert_eq!(state(&w, "a"), State::Ready);
    assert!(w.processes["a"].generation > first);
}

#[test]
fn the_least_recently_used_goes() {
    let mut w = on_gpu0(&[40, 40, 40]);
    ready(&mut w, 0);
    w.step(&Ev::Clock(1_000)).unwrap();
    ready(&mut w, 1);
    w.step(&Ev::Clock(1_000)).unwrap();
    w.step(&Ev::Used(0)).unwrap();
    w.step(&Ev::Clock(1_000)).unwrap();
    ready(&mut w, 2);
    assert_eq!(running(&w), HashSet::from(["a".into(), "c".into()]));
}
