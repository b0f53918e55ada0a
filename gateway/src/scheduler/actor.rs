//! The actor itself: its state, its loop, waiters queueing and activations starting.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use gpuswap::{SupervisorClient, pb};
use gpuswap_telemetry::GatewayMetrics;
use tokio::sync::{mpsc, oneshot};
use tracing::Span;

use super::{
    Message, Progress, SchedulerOptions, Waiter, handle::Scheduler, stream::activation_stream,
};
use crate::{
    catalog::CatalogHandle,
    error::ApiError,
    route::{Route, RouteTable},
};

/// An open Activate stream. Dropping it ends the stream, which releases the hold.
pub(super) struct Activation {
    pub(super) id: u64,
    pub(super) _release: oneshot::Sender<()>,
    pub(super) ready_at: Option<Instant>,
    /// The model was asleep (or the supervisor said it wakes it): progress says "Waking",
    /// not "Loading", from the first step on.
    pub(super) wakes: bool,
}

#[derive(Default)]
pub(super) struct Slot {
    pub(super) waiters: VecDeque<Waiter>,
    pub(super) activation: Option<Activation>,
    /// The published route while the hold is live (accepting or draining).
    pub(super) route: Option<Arc<Route>>,
    pub(super) progress: Option<Progress>,
    /// The last start failure, answered at once until it expires.
    pub(super) failure: Option<(ApiError, Instant)>,
    pub(super) failures: u32,
    /// Holds that ended without the gateway releasing them, in a row.
    pub(super) churn: u32,
    pub(super) retry_at: Option<Instant>,
    /// Preloaded: activate even without waiters, until it was ready once.
    pub(super) keep: bool,
}

impl Slot {
    fn has_live_waiters(&self) -> bool {
        self.waiters.iter().any(|w| !w.reply.is_closed())
    }
}

const TICK: Duration = Duration::from_millis(100);
/// The progress phase once the supervisor starts the model.
pub(super) const STARTING: &str = "starting";

pub struct Actor {
    pub(super) rx: mpsc::UnboundedReceiver<Message>,
    pub(super) tx: mpsc::UnboundedSender<Message>,
    pub(super) client: SupervisorClient,
    pub(super) catalog: Arc<CatalogHandle>,
    pub(super) routes: Arc<RouteTable>,
    pub(super) config: SchedulerOptions,
    pub(super) slots: HashMap<Arc<str>, Slot>,
    pub(super) next_activation: u64,
    /// The `last_done` of each route last reported to the supervisor.
    pub(super) reported_use: HashMap<Arc<str>, u64>,
    /// A ReportUse call is under way (the next waits for it).
    pub(super) reporting: Arc<std::sync::atomic::AtomicBool>,
    pub(super) metrics: GatewayMetrics,
}

impl Actor {
    pub fn new(
        client: SupervisorClient,
        catalog: Arc<CatalogHandle>,
        routes: Arc<RouteTable>,
        config: SchedulerOptions,
        metrics: GatewayMetrics,
    ) -> (Self, Scheduler) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Scheduler::new(tx.clone());
        let actor = Self {
            rx,
            tx,
            client,
            catalog,
            routes,
            config,
            slots: HashMap::new(),
            next_activation: 1,
            reported_use: HashMap::new(),
            reporting: Arc::default(),
            metrics,
        };
        (actor, handle)
    }

    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tick.tick() => self.housekeeping(),
            }
        }
    }

    fn handle(&mut self, msg: Message) {
        match msg {
            Message::Wait { model, waiter } => self.on_wait(model, waiter),
            Message::WaiterGone { model, id } => self.on_waiter_gone(&model, id),
            Message::Event {
                model,
                activation,
                event,
            } => self.on_event(model, activation, event),
            Message::Ended {
                model,
                activation,
                error,
            } => self.on_ended(&model, activation, error),
            Message::Drained { model, generation } => self.on_drained(&model, generation),
            Message::IdleUnheld { model, generation } => self.on_idle_unheld(model, generation),
        }
    }

    fn on_wait(&mut self, model: Arc<str>, mut waiter: Waiter) {
        let slot = self.slots.entry(Arc::clone(&model)).or_default();
        if let Some(route) = &slot.route
            && let Some(guard) = route.try_enter()
        {
            let _ = waiter.reply.send(Ok(guard));
            return;
        }
        if slot.activation.is_none()
            && let Some((error, until)) = &slot.failure
            && Instant::now() < *until
        {
            let _ = waiter.reply.send(Err(error.clone()));
            return;
        }
        if let (Some(progress), Some(tx)) = (&slot.progress, &waiter.progress) {
            let _ = tx.try_send(progress.clone());
        }
        if slot.progress.as_ref().is_some_and(|p| p.phase == STARTING) {
            self.metrics.swap_waited(&model);
            waiter.swap_counted = true;
        }
        slot.waiters.push_back(waiter);
        self.ensure_activation(&model);
    }

    fn on_waiter_gone(&mut self, model: &str, id: u64) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        slot.waiters.retain(|w| w.id != id);
        Self::cancel_if_unwanted(model, slot);
    }

    /// Cancels an activation that nobody waits for any more and that holds nothing yet.
    fn cancel_if_unwanted(model: &str, slot: &mut Slot) {
        let pending = slot
            .activation
            .as_ref()
            .is_some_and(|a| a.ready_at.is_none());
        if pending && !slot.keep && !slot.has_live_waiters() {
            tracing::info!(
                model,
                "no request waits any more: cancelling the activation"
            );
            slot.waiters.clear();
            slot.activation = None;
            slot.progress = None;
        }
    }

    /// Starts an activation for a model that has waiters (or is preloaded) and none running.
    pub(super) fn ensure_activation(&mut self, model: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        // A draining route still holds the model: the release starts the next activation.
        if slot.activation.is_some() || slot.route.is_some() {
            return;
        }
        if slot.waiters.is_empty() && !slot.keep {
            return;
        }
        if slot.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        slot.retry_at = None;
        let id = self.next_activation;
        self.next_activation += 1;
        let (release_tx, release_rx) = oneshot::channel();
        let asleep = self
            .catalog
            .load()
            .resolve(model)
            .is_some_and(|m| m.state == pb::ModelState::Sleeping);
        slot.activation = Some(Activation {
            id,
            _release: release_tx,
            ready_at: None,
            wakes: asleep,
        });
        let progress = Progress {
            phase: "queued",
            text: format!("Waiting for {model}"),
            queue_position: None,
            percent: None,
        };
        slot.progress = Some(progress);
        tracing::debug!(%model, activation = id, "activating");
        // A child of the first waiter's request (the actor's own span would
        // cut the trace from the request to the supervisor).
        let span = match slot.waiters.front() {
            _ if !gpuswap_telemetry::exporting() => Span::none(),
            Some(first) => tracing::info_span!(
                parent: &first.span,
                "activate",
                otel.kind = "client",
                model = %model,
                outcome = tracing::field::Empty,
            ),
            None => tracing::info_span!(
                "activate",
                otel.kind = "client",
                model = %model,
                outcome = tracing::field::Empty,
            ),
        };
        tokio::spawn(activation_stream(
            self.client.clone(),
            Arc::clone(model),
            id,
            self.config.client_name.clone(),
            self.tx.clone(),
            release_rx,
            span,
        ));
    }

    fn housekeeping(&mut self) {
        if !self.config.preload.is_empty() && self.catalog.connected() {
            self.start_preloads();
        }
        self.report_use();
        let models: Vec<Arc<str>> = self.slots.keys().cloned().collect();
        for model in models {
            let Some(slot) = self.slots.get_mut(&model) else {
                continue;
            };
            // Normally WaiterGone removes these at once; this is the backstop.
            slot.waiters.retain(|w| !w.reply.is_closed());
            Self::cancel_if_unwanted(&model, slot);
            if slot.activation.is_none() {
                if slot
                    .failure
                    .as_ref()
                    .is_some_and(|(_, until)| Instant::now() >= *until)
                {
                    slot.failure = None;
                }
                self.ensure_activation(&model);
                continue;
            }
            self.release_if_idle(&model);
        }
    }

    fn start_preloads(&mut self) {
        let catalog = self.catalog.load();
        for name in std::mem::take(&mut self.config.preload) {
            let Some(info) = catalog.resolve(&name) else {
                tracing::warn!(model = %name, "preload: no such model");
                continue;
            };
            let model = Arc::clone(&info.name);
            tracing::info!(%model, "preloading");
            self.slots.entry(Arc::clone(&model)).or_default().keep = true;
            self.ensure_activation(&model);
        }
    }
}

pub(super) fn fail_waiters(slot: &mut Slot, error: &ApiError) {
    for waiter in slot.waiters.drain(..) {
        let _ = waiter.reply.send(Err(error.clone()));
    }
}
