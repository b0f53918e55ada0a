//! The scheduler: one actor task owns the gateway's model state.
//!
//! Requests for a model without an accepting route wait here in per-model FIFO
//! queues. The actor keeps at most one `Activate(hold = true)` stream per model;
//! when it reports Ready, a route is published and every waiter of that model
//! is released together (collation: A B A B arrivals run as A A B B). When the
//! supervisor asks for a drain, the route stops accepting, and the hold is
//! released once the last request in flight finished. Waiters left behind by a
//! released hold trigger a new activation, which the supervisor queues fairly.
//!
//! Named as in the supervisor: [`Scheduler`] is the handle request handlers hold, [`Actor`]
//! the task that owns the state, [`Message`] what the actor receives.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use gpuswap::{SupervisorClient, pb};
use gpuswap_telemetry::GatewayMetrics;
use http::{HeaderValue, uri::Authority};
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument as _, Span};

use crate::{
    catalog::{CatalogHandle, EventKind, describe_status},
    error::ApiError,
    route::{InFlight, Route, RouteTable},
};

/// What a waiting streaming client is told while its model loads.
#[derive(Clone, Debug)]
pub struct Progress {
    pub phase: &'static str,
    pub text: String,
    pub queue_position: Option<u32>,
    /// The backend's own load percentage, when it prints one.
    pub percent: Option<f32>,
}

/// One request waiting for its model.
#[derive(Debug)]
pub struct Waiter {
    id: u64,
    reply: oneshot::Sender<Result<InFlight, ApiError>>,
    progress: Option<mpsc::Sender<Progress>>,
    /// The request's span: an activation it triggers continues its trace.
    span: Span,
    /// Counted in `swaps_total` (its model was started while it waited).
    swap_counted: bool,
}

#[derive(Debug)]
pub enum Message {
    Wait {
        model: Arc<str>,
        waiter: Waiter,
    },
    /// The client of a waiter went away (or its queue timeout passed).
    WaiterGone {
        model: Arc<str>,
        id: u64,
    },
    Event {
        model: Arc<str>,
        activation: u64,
        event: pb::activate_event::Event,
    },
    /// An activation stream ended (error: the call itself failed).
    Ended {
        model: Arc<str>,
        activation: u64,
        error: Option<tonic::Status>,
    },
    /// The last request of a route that stopped accepting finished.
    Drained {
        model: Arc<str>,
        generation: u64,
    },
    /// After an idle release: no client holds the model any more (in `generation`).
    IdleUnheld {
        model: Arc<str>,
        generation: u64,
    },
}

/// The handle request handlers use to wait for a model.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Message>,
    next_waiter: Arc<AtomicU64>,
}

impl Scheduler {
    /// Queues a request for `model`; await the ticket for the grant. Call it
    /// inside the request's span.
    pub fn wait(&self, model: Arc<str>, progress: Option<mpsc::Sender<Progress>>) -> WaitTicket {
        let id = self.next_waiter.fetch_add(1, SeqCst);
        let (reply, rx) = oneshot::channel();
        let span = if gpuswap_telemetry::exporting() {
            Span::current()
        } else {
            Span::none()
        };
        let waiter = Waiter {
            id,
            reply,
            progress,
            span,
            swap_counted: false,
        };
        let _ = self.tx.send(Message::Wait {
            model: Arc::clone(&model),
            waiter,
        });
        WaitTicket {
            id,
            model,
            tx: self.tx.clone(),
            rx,
            settled: false,
        }
    }
}

/// A queued request. Dropping it before the grant leaves the queue at once.
pub struct WaitTicket {
    id: u64,
    model: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
    rx: oneshot::Receiver<Result<InFlight, ApiError>>,
    settled: bool,
}

impl std::future::Future for WaitTicket {
    type Output = Result<InFlight, ApiError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = std::pin::Pin::new(&mut self.rx).poll(cx);
        polled.map(|result| {
            self.settled = true;
            result.unwrap_or_else(|_| {
                Err(ApiError::new(
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "scheduler_stopped",
                    "The gateway's scheduler stopped",
                ))
            })
        })
    }
}

impl Drop for WaitTicket {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.tx.send(Message::WaiterGone {
                model: Arc::clone(&self.model),
                id: self.id,
            });
        }
    }
}

/// Settings of the scheduler.
pub struct SchedulerOptions {
    /// Shown in the supervisor's status: `gateway@host:pid`.
    pub client_name: String,
    /// Idle time after which a model's hold is released (0: never); a model's own wins.
    pub idle_ttl: Duration,
    pub preload: Vec<String>,
    /// How long idle backend connections are kept.
    pub upstream_idle_timeout: Duration,
    /// Start failures carry the backend's last log lines to HTTP clients.
    pub expose_log_tail: bool,
}

/// An open Activate stream. Dropping it ends the stream, which releases the hold.
struct Activation {
    id: u64,
    _release: oneshot::Sender<()>,
    ready_at: Option<Instant>,
    /// The model was asleep (or the supervisor said it wakes it): progress says "Waking",
    /// not "Loading", from the first step on.
    wakes: bool,
}

#[derive(Default)]
struct Slot {
    waiters: VecDeque<Waiter>,
    activation: Option<Activation>,
    /// The published route while the hold is live (accepting or draining).
    route: Option<Arc<Route>>,
    progress: Option<Progress>,
    /// The last start failure, answered at once until it expires.
    failure: Option<(ApiError, Instant)>,
    failures: u32,
    /// Holds that ended without the gateway releasing them, in a row.
    churn: u32,
    retry_at: Option<Instant>,
    /// Preloaded: activate even without waiters, until it was ready once.
    keep: bool,
}

impl Slot {
    fn has_live_waiters(&self) -> bool {
        self.waiters.iter().any(|w| !w.reply.is_closed())
    }
}

const TICK: Duration = Duration::from_millis(100);
/// The progress phase once the supervisor starts the model.
const STARTING: &str = "starting";
/// A hold that lived this long was healthy: the next loss starts backoff afresh.
const HEALTHY_HOLD: Duration = Duration::from_secs(10);

pub struct Actor {
    rx: mpsc::UnboundedReceiver<Message>,
    tx: mpsc::UnboundedSender<Message>,
    client: SupervisorClient,
    catalog: Arc<CatalogHandle>,
    routes: Arc<RouteTable>,
    config: SchedulerOptions,
    slots: HashMap<Arc<str>, Slot>,
    next_activation: u64,
    /// The `last_done` of each route last reported to the supervisor.
    reported_use: HashMap<Arc<str>, u64>,
    /// A ReportUse call is under way (the next waits for it).
    reporting: Arc<std::sync::atomic::AtomicBool>,
    metrics: GatewayMetrics,
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
        let handle = Scheduler {
            tx: tx.clone(),
            next_waiter: Arc::new(AtomicU64::new(1)),
        };
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
    fn ensure_activation(&mut self, model: &Arc<str>) {
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

    fn on_event(&mut self, model: Arc<str>, activation: u64, event: pb::activate_event::Event) {
        use pb::activate_event::Event as E;
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        let Some(activation) = slot.activation.as_mut().filter(|a| a.id == activation) else {
            return; // a stream we already let go of
        };
        // A sleeping model wakes in its own process: much faster than a load.
        if matches!(&event, E::Progress(p) if p.phase == "waking") {
            activation.wakes = true;
        }
        let verb = if activation.wakes {
            "Waking"
        } else {
            "Loading"
        };
        let progress = match event {
            E::Queued(q) => Progress {
                phase: "queued",
                text: if q.behind.is_empty() {
                    format!("Waiting to load {model} (queue position {})", q.position)
                } else {
                    format!(
                        "Waiting to load {model}: queued behind {} (position {})",
                        q.behind, q.position
                    )
                },
                queue_position: Some(q.position),
                percent: None,
            },
            E::Draining(d) => Progress {
                phase: "draining",
                text: if d.residency_ms > 0 {
                    format!(
                        "{verb} {model}: {} keeps the GPU {} s more, then finishes its requests",
                        d.model,
                        d.residency_ms.div_ceil(1000)
                    )
                } else {
                    format!(
                        "{verb} {model}: waiting for {} to finish its requests",
                        d.model
                    )
                },
                queue_position: None,
                percent: None,
            },
            E::Stopping(s) => Progress {
                phase: "stopping",
                text: format!("{verb} {model} (stopping {})", s.model),
                queue_position: None,
                percent: None,
            },
            E::Starting(_) => {
                for waiter in slot.waiters.iter_mut().filter(|w| !w.swap_counted) {
                    self.metrics.swap_waited(&model);
                    waiter.swap_counted = true;
                }
                Progress {
                    phase: STARTING,
                    text: format!("{verb} {model}"),
                    queue_position: None,
                    percent: None,
                }
            }
            E::Progress(p) => {
                let said = gpuswap::progress_text(&p);
                Progress {
                    phase: STARTING,
                    text: if said.is_empty() {
                        format!("{verb} {model}")
                    } else {
                        format!("{verb} {model}: {said}")
                    },
                    queue_position: None,
                    percent: p.percent,
                }
            }
            E::Log(line) => {
                // The status page shows what a loading backend prints.
                self.catalog.publish(
                    model,
                    EventKind::Progress {
                        phase: STARTING,
                        text: line.line,
                    },
                );
                return;
            }
            E::Ready(ready) => return self.on_ready(model, ready),
            E::Failed(failed) => return self.on_failed(model, failed),
            E::DrainRequested(d) => return self.on_drain_requested(model, d),
            E::HoldLost(lost) => {
                tracing::info!(%model, reason = %lost.reason, "hold lost");
                return self.on_hold_ended(&model, None);
            }
        };
        for waiter in &slot.waiters {
            if let Some(tx) = &waiter.progress {
                let _ = tx.try_send(progress.clone());
            }
        }
        self.catalog.publish(
            Arc::clone(&model),
            EventKind::Progress {
                phase: progress.phase,
                text: progress.text.clone(),
            },
        );
        slot.progress = Some(progress);
    }

    fn on_ready(&mut self, model: Arc<str>, ready: pb::Ready) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        let upstream = match upstream_authority(&ready.address) {
            Ok(a) => a,
            Err(why) => {
                let error = ApiError::backend_unavailable(&model, gpuswap::error_chain(&why));
                fail_waiters(slot, &error);
                slot.activation = None;
                return;
            }
        };
        let served_name = if ready.served_name.is_empty() {
            model.to_string()
        } else {
            ready.served_name
        };
        let api_key = backend_key_headers(&ready.api_key);
        let route = Arc::new(Route::new(
            Arc::clone(&model),
            upstream,
            served_name,
            api_key,
            ready.generation,
            self.tx.clone(),
            self.config.upstream_idle_timeout,
        ));
        if let Some(old) = slot.route.take() {
            old.accepting.store(false, SeqCst);
            self.routes.unpublish(&model, old.generation);
        }
        tracing::info!(
            %model,
            generation = ready.generation,
            address = %ready.address,
            startup_ms = ready.startup_ms,
            waiters = slot.waiters.len(),
            "ready"
        );
        self.routes.publish(Arc::clone(&route));
        if let Some(a) = slot.activation.as_mut() {
            a.ready_at = Some(Instant::now());
        }
        slot.route = Some(Arc::clone(&route));
        slot.failure = None;
        slot.failures = 0;
        slot.progress = None;
        slot.keep = false;
        // Every waiter gets its request counted in before the grant, so a drain
        // that starts between the grant and the forward waits for it.
        while let Some(waiter) = slot.waiters.pop_front() {
            if waiter.reply.is_closed() {
                continue;
            }
            let _ = waiter.reply.send(Ok(route.enter_unchecked()));
        }
    }

    fn on_failed(&mut self, model: Arc<str>, failed: pb::Failed) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        tracing::warn!(%model, reason = %failed.reason, "start failed");
        let log_tail = if self.config.expose_log_tail {
            failed.log_tail
        } else {
            Vec::new()
        };
        let error = ApiError::start_failed(&model, &failed.reason, log_tail);
        fail_waiters(slot, &error);
        slot.failures += 1;
        let backoff = failure_backoff(slot.failures);
        let until = Instant::now() + backoff;
        slot.failure = Some((error, until));
        slot.retry_at = Some(until);
        slot.activation = None;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(&model, route.generation);
        }
    }

    fn on_drain_requested(&mut self, model: Arc<str>, drain: pb::DrainRequested) {
        let Some(slot) = self.slots.get_mut(&model) else {
            return;
        };
        tracing::info!(%model, wanted_by = %drain.wanted_by, "drain requested");
        match &slot.route {
            Some(route) => {
                route.accepting.store(false, SeqCst);
                self.routes.unpublish(&model, route.generation);
                if route.in_flight.load(SeqCst) == 0 {
                    self.release(&model);
                }
            }
            None => self.release(&model),
        }
    }

    fn on_drained(&mut self, model: &Arc<str>, generation: u64) {
        let Some(slot) = self.slots.get(model) else {
            return;
        };
        let done = slot.route.as_ref().is_some_and(|r| {
            r.generation == generation && !r.accepting.load(SeqCst) && r.in_flight.load(SeqCst) == 0
        });
        if done {
            self.release(model);
        }
    }

    /// Lets go of a hold whose requests all finished (drain or idle); waiters
    /// that queued meanwhile get a new activation behind the other model.
    fn release(&mut self, model: &Arc<str>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        tracing::debug!(%model, waiters = slot.waiters.len(), "releasing the hold");
        slot.activation = None;
        slot.churn = 0;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(model, route.generation);
        }
        self.ensure_activation(model);
    }

    fn on_ended(&mut self, model: &Arc<str>, activation: u64, error: Option<tonic::Status>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        if slot.activation.as_ref().map(|a| a.id) != Some(activation) {
            return;
        }
        let was_ready = slot
            .activation
            .as_ref()
            .is_some_and(|a| a.ready_at.is_some());
        if let Some(status) = &error
            && !was_ready
        {
            let api_error = if status.code() == tonic::Code::NotFound {
                ApiError::model_not_found(model)
            } else {
                ApiError::supervisor_unavailable(describe_status(status))
            };
            tracing::warn!(%model, "activation failed: {}", describe_status(status));
            fail_waiters(slot, &api_error);
        }
        self.on_hold_ended(model, error.as_ref());
    }

    /// The supervisor ended a hold (lost, crashed, or the stream broke):
    /// forget the route at once; waiters get a new activation after a backoff
    /// that grows while holds keep ending early.
    fn on_hold_ended(&mut self, model: &Arc<str>, error: Option<&tonic::Status>) {
        let Some(slot) = self.slots.get_mut(model) else {
            return;
        };
        let lived = slot
            .activation
            .as_ref()
            .and_then(|a| a.ready_at)
            .map(|t| t.elapsed());
        slot.activation = None;
        slot.progress = None;
        if let Some(route) = slot.route.take() {
            route.accepting.store(false, SeqCst);
            self.routes.unpublish(model, route.generation);
        }
        if lived.is_some_and(|l| l >= HEALTHY_HOLD) {
            slot.churn = 0;
        } else {
            slot.churn += 1;
        }
        let mut delay = churn_backoff(slot.churn);
        if error.is_some() {
            delay = delay.max(Duration::from_millis(200));
        }
        slot.retry_at = (!delay.is_zero()).then(|| Instant::now() + delay);
        self.ensure_activation(model);
    }

    fn on_idle_unheld(&mut self, model: Arc<str>, generation: u64) {
        let Some(slot) = self.slots.get(&model) else {
            return;
        };
        if slot.activation.is_some() || !slot.waiters.is_empty() {
            return; // wanted again meanwhile
        }
        let mut client = self.client.clone();
        tokio::spawn(async move {
            // Only if still idle as seen: a request from another client that came in since
            // the Status poll keeps its model (no drain, no reload).
            let request = pb::DeactivateRequest {
                model: model.to_string(),
                all: false,
                force: false,
                if_idle_generation: Some(generation),
                sleep: false,
            };
            match client.deactivate(request).await {
                Ok(response) if response.get_ref().stopped.is_empty() => {
                    tracing::info!(%model, generation, "idle: in use again, left running")
                }
                Ok(_) => tracing::info!(%model, "idle: deactivated"),
                Err(status) => {
                    tracing::warn!(%model, "idle deactivation failed: {}", describe_status(&status))
                }
            }
        });
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

    /// Tells the supervisor when the models with a route were last used (requests in flight:
    /// now), so that the least recently used one is stopped to make room. One call at a
    /// time, only for models used since the last report.
    fn report_use(&mut self) {
        if self.reporting.load(SeqCst) {
            return;
        }
        let mut uses = Vec::new();
        for (model, slot) in &self.slots {
            let Some(route) = &slot.route else { continue };
            let last_done = route.last_done.load(SeqCst);
            let busy = route.in_flight.load(SeqCst) > 0;
            if !busy && self.reported_use.get(model) == Some(&last_done) {
                continue;
            }
            self.reported_use.insert(Arc::clone(model), last_done);
            uses.push(pb::ModelUse {
                model: model.to_string(),
                idle_ms: if busy { 0 } else { millis(route.idle_for()) },
            });
        }
        if uses.is_empty() {
            return;
        }
        self.reporting.store(true, SeqCst);
        let (mut client, reporting) = (self.client.clone(), Arc::clone(&self.reporting));
        tokio::spawn(async move {
            if let Err(status) = client.report_use(pb::ReportUseRequest { uses }).await {
                tracing::debug!("reporting model use failed: {}", describe_status(&status));
            }
            reporting.store(false, SeqCst);
        });
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

    fn release_if_idle(&mut self, model: &Arc<str>) {
        let Some(slot) = self.slots.get(model) else {
            return;
        };
        let Some(route) = &slot.route else { return };
        if !slot.waiters.is_empty() || !route.accepting.load(SeqCst) {
            return;
        }
        let ttl = self
            .catalog
            .load()
            .resolve(model)
            .and_then(|m| m.idle_ttl)
            .unwrap_or(self.config.idle_ttl);
        if ttl.is_zero() || route.in_flight.load(SeqCst) != 0 || route.idle_for() < ttl {
            return;
        }
        // Stop admitting first, then look again: a request that entered in
        // between is seen here (or sees the flag and queues as a waiter).
        route.accepting.store(false, SeqCst);
        if route.in_flight.load(SeqCst) != 0 {
            route.accepting.store(true, SeqCst);
            return;
        }
        tracing::info!(%model, idle_s = route.idle_for().as_secs(), "idle: releasing the hold");
        self.release(model);
        tokio::spawn(report_when_unheld(
            self.client.clone(),
            Arc::clone(model),
            self.tx.clone(),
        ));
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

/// After an idle release, waits until the supervisor shows no holder of the
/// model (another client may hold it: then leave it running).
async fn report_when_unheld(
    mut client: SupervisorClient,
    model: Arc<str>,
    tx: mpsc::UnboundedSender<Message>,
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let Ok(status) = client.status(pb::StatusRequest {}).await else {
            return;
        };
        let Some(m) = status
            .into_inner()
            .models
            .into_iter()
            .find(|m| *m.name == *model)
        else {
            return;
        };
        if m.state() != pb::ModelState::Ready {
            return;
        }
        if m.holders == 0 {
            let generation = m.generation;
            let _ = tx.send(Message::IdleUnheld { model, generation });
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs one Activate stream, forwarding its events to the actor, until the
/// actor lets go of it (dropping the release sender), which closes the stream.
///
/// `span` covers the activation until the model is ready (or failed), not
/// the hold that follows, which may last for hours.
async fn activation_stream(
    mut client: SupervisorClient,
    model: Arc<str>,
    activation: u64,
    client_name: String,
    tx: mpsc::UnboundedSender<Message>,
    mut release: oneshot::Receiver<()>,
    mut span: Span,
) {
    let mut request = tonic::Request::new(pb::ActivateRequest {
        model: model.to_string(),
        hold: true,
        force: false,
        client: client_name,
    });
    span.in_scope(|| gpuswap_telemetry::inject_grpc(request.metadata_mut()));
    let ended = |error| Message::Ended {
        model: Arc::clone(&model),
        activation,
        error,
    };
    let response = tokio::select! {
        _ = &mut release => return,
        response = client.activate(request).instrument(span.clone()) => response,
    };
    let mut stream = match response {
        Ok(response) => response.into_inner(),
        Err(status) => {
            span.record("outcome", "error");
            let _ = tx.send(ended(Some(status)));
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut release => return,
            message = stream.message() => match message {
                Ok(Some(pb::ActivateEvent { event: Some(event), .. })) => {
                    use pb::activate_event::Event as E;
                    let outcome = match &event {
                        E::Ready(_) => Some("ready"),
                        E::Failed(_) => Some("failed"),
                        _ => None,
                    };
                    if let Some(outcome) = outcome {
                        span.record("outcome", outcome);
                        span = Span::none();
                    }
                    let _ = tx.send(Message::Event { model: Arc::clone(&model), activation, event });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    let _ = tx.send(ended(None));
                    return;
                }
                Err(status) => {
                    let _ = tx.send(ended(Some(status)));
                    return;
                }
            },
        }
    }
}

fn fail_waiters(slot: &mut Slot, error: &ApiError) {
    for waiter in slot.waiters.drain(..) {
        let _ = waiter.reply.send(Err(error.clone()));
    }
}

/// 1 s, 2 s, 4 s ... 30 s after consecutive start failures.
fn failure_backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(5);
    (Duration::from_secs(1) * (1 << shift)).min(Duration::from_secs(30))
}

/// 0, 100 ms, 200 ms ... 5 s after consecutive early hold losses.
fn churn_backoff(churn: u32) -> Duration {
    if churn <= 1 {
        return Duration::ZERO;
    }
    let shift = (churn - 2).min(6);
    (Duration::from_millis(100) * (1 << shift)).min(Duration::from_secs(5))
}

#[derive(Debug, thiserror::Error)]
#[error("the supervisor reported an invalid address {address:?}")]
struct InvalidAddress {
    address: String,
    source: http::uri::InvalidUri,
}

/// The authority to connect to; a wildcard bind address means this host.
fn upstream_authority(address: &str) -> Result<Authority, InvalidAddress> {
    let address = if let Some(port) = address.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = address.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        address.to_owned()
    };
    address
        .parse::<Authority>()
        .map_err(|source| InvalidAddress { address, source })
}

fn backend_key_headers(key: &str) -> Option<(HeaderValue, HeaderValue)> {
    if key.is_empty() {
        return None;
    }
    let mut bearer = HeaderValue::from_str(&format!("Bearer {key}")).ok()?;
    let mut plain = HeaderValue::from_str(key).ok()?;
    bearer.set_sensitive(true);
    plain.set_sensitive(true);
    Some((bearer, plain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoffs_grow_and_cap() {
        assert_eq!(failure_backoff(1), Duration::from_secs(1));
        assert_eq!(failure_backoff(3), Duration::from_secs(4));
        assert_eq!(failure_backoff(50), Duration::from_secs(30));
        assert_eq!(churn_backoff(1), Duration::ZERO);
        assert_eq!(churn_backoff(2), Duration::from_millis(100));
        assert_eq!(churn_backoff(60), Duration::from_secs(5));
    }

    #[test]
    fn wildcard_addresses_become_loopback() {
        assert_eq!(
            upstream_authority("0.0.0.0:30000").unwrap().as_str(),
            "127.0.0.1:30000"
        );
        assert_eq!(upstream_authority("[::]:1").unwrap().as_str(), "[::1]:1");
        assert_eq!(
            upstream_authority("10.0.0.1:5").unwrap().port_u16(),
            Some(5)
        );
        assert!(upstream_authority("not an address").is_err());
    }
}
