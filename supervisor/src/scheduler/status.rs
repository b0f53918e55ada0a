//! What the actor shows: Status, Watch's changes, the `model_state` metric.

use gpuswap::pb;
use gpuswap_telemetry::ModelState as MetricState;
use tokio::time::Instant;

use super::{
    actor::{Actor, millis},
    placement::Placement,
    policy::{Slot, State},
};

impl Actor {
    pub(super) fn model_status(&self, name: &str) -> pb::ModelStatus {
        let model = &self.models[name];
        let slot = self
            .policy
            .slot(name)
            .expect("the policy knows every model");
        let config = &model.config;
        let mut state = match slot.state {
            State::Stopped => pb::ModelState::Stopped,
            State::Starting => pb::ModelState::Starting,
            State::Ready => pb::ModelState::Ready,
            State::Stopping => pb::ModelState::Stopping,
            State::Failed => pb::ModelState::Failed,
            State::FallingAsleep | State::Sleeping => pb::ModelState::Sleeping,
            State::Waking => pb::ModelState::Starting,
        };
        let mut detail = String::new();
        if slot.run.is_none()
            && let Some(unmet) = self.requirements.unmet(config)
        {
            state = pb::ModelState::Unavailable;
            detail = unmet.to_string();
        } else if let Some(drain) = &slot.drain {
            detail = format!(
                "draining: holds revoked in {} ms",
                millis(drain.deadline.saturating_duration_since(Instant::now()))
            );
        }
        let run = slot.run.as_ref();
        pb::ModelStatus {
            name: name.to_owned(),
            aliases: config.aliases.clone(),
            kind: config.kind.as_str().to_owned(),
            state: state as i32,
            pid: model.run.as_ref().map_or(0, |r| r.backend.pid()),
            uptime_ms: run.map_or(0, |r| millis(r.spawned_at.elapsed())),
            restarts: slot.restarts,
            last_error: slot.last_error.clone(),
            gpus: config.gpus.clone().unwrap_or_default(),
            port: u32::from(config.port),
            host: config.host.clone(),
            served_name: config.served_name(name).to_owned(),
            generation: slot.generation,
            holders: slot.holds.len() as u32,
            detail,
            last_startup_ms: slot.last_startup.map_or(0, millis),
            idle_ttl_ms: config.idle_ttl.map(millis),
            progress: self.load_progress(name),
            vram_bytes: config.vram,
            pinned: config.pinned,
            last_used_ms: slot.last_use.map(|at| self.unix_ms(at)),
            can_sleep: slot.awake().sleep.is_some(),
        }
    }

    /// The status without the fields that change by themselves (uptime, countdowns) or with
    /// every request (the last use, which a busy gateway reports ten times a second): a
    /// change of those alone is not published on Watch.
    pub(super) fn comparable_status(&self, name: &str) -> pb::ModelStatus {
        let mut status = self.model_status(name);
        status.uptime_ms = 0;
        status.last_used_ms = None;
        if let Some(progress) = status.progress.as_mut() {
            progress.elapsed_ms = 0;
            progress.eta_ms = None;
        }
        if status.detail.starts_with("draining") {
            status.detail = "draining".into();
        }
        status
    }

    /// The Unix time of `at`, in milliseconds (stable: from the actor's own start).
    pub(super) fn unix_ms(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.started) {
            Some(after) => self.started_unix_ms.saturating_add(millis(after)),
            None => self
                .started_unix_ms
                .saturating_sub(millis(self.started - at)),
        }
    }

    /// The memory of every GPU of known size (configured, or seen by NVML).
    pub(super) fn gpu_status(&self) -> Vec<pb::GpuStatus> {
        let live: Vec<(&str, &Placement)> = self
            .policy
            .slots()
            .filter(|(_, slot)| slot.run.is_some())
            .map(|(name, slot)| (name.as_str(), slot.occupied()))
            .collect();
        self.policy
            .settings()
            .capacity
            .reservations(&live)
            .into_iter()
            .filter(|r| r.capacity.is_some() || self.gpu_used.contains_key(&r.gpu))
            .map(|r| pb::GpuStatus {
                index: r.gpu,
                capacity_bytes: r.capacity,
                reserved_bytes: r.reserved,
                used_bytes: self.gpu_used.get(&r.gpu).copied(),
                models: r.models,
            })
            .collect()
    }

    /// The models a client sees: not those a reload removed.
    pub(super) fn listed(&self) -> Vec<String> {
        self.models
            .keys()
            .filter(|name| self.policy.slot(name).is_some_and(|s| !s.removed))
            .cloned()
            .collect()
    }

    pub(super) fn status_response(&self) -> pb::StatusResponse {
        pb::StatusResponse {
            models: self
                .listed()
                .iter()
                .map(|name| self.model_status(name))
                .collect(),
            supervisor: Some(pb::SupervisorInfo {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                uptime_ms: millis(self.started.elapsed()),
                queue: self.policy.queue().map(str::to_owned).collect(),
            }),
            gpus: self.gpu_status(),
        }
    }

    /// Brings `model_state` up to date. Called after every message, like
    /// [`Actor::publish_changes`], so no assignment of a state can be missed; a state that
    /// lasted less than one message (a spawn that failed at once) is never visible.
    pub(super) fn record_states(&mut self) {
        for (name, slot) in self.policy.slots() {
            let state = metric_state(slot);
            if self.recorded_states.get(name) != Some(&state) {
                self.metrics.set_model_state(name, state);
                self.recorded_states.insert(name.clone(), state);
            }
        }
        // A model removed by a reload is gone: it is no longer in any live state.
        let policy = &self.policy;
        let metrics = &self.metrics;
        self.recorded_states.retain(|name, state| {
            let kept = policy.slot(name).is_some();
            if !kept && *state != MetricState::Stopped {
                metrics.set_model_state(name, MetricState::Stopped);
            }
            kept
        });
    }

    /// Sends one `changed` per model whose state, holders or the like changed, and the GPUs'
    /// memory when it changed (NVML's use by a GiB or more).
    pub(super) fn publish_changes(&mut self) {
        let gpus = self.gpu_status();
        let comparable: Vec<pb::GpuStatus> = gpus
            .iter()
            .map(|g| pb::GpuStatus {
                used_bytes: g.used_bytes.map(|used| used >> 30),
                ..g.clone()
            })
            .collect();
        if comparable != self.published_gpus {
            self.published_gpus = comparable;
            let _ = self.watch.send(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Gpus(pb::GpuMemory { gpus })),
            });
        }
        for name in self.listed() {
            let status = self.comparable_status(&name);
            if self.published.get(&name) == Some(&status) {
                continue;
            }
            self.published.insert(name.clone(), status);
            let _ = self.watch.send(pb::WatchEvent {
                event: Some(pb::watch_event::Event::Changed(self.model_status(&name))),
            });
        }
    }
}

/// The `model_state` of a model: a Ready model whose holders are asked to let go is draining.
pub(super) fn metric_state(slot: &Slot) -> MetricState {
    match slot.state {
        State::Stopped => MetricState::Stopped,
        State::Starting => MetricState::Starting,
        State::Ready if slot.drain.is_some() && !slot.holds.is_empty() => MetricState::Draining,
        State::Ready => MetricState::Ready,
        State::Stopping => MetricState::Stopping,
        State::Failed => MetricState::Failed,
        State::FallingAsleep | State::Sleeping => MetricState::Sleeping,
        State::Waking => MetricState::Starting,
    }
}
