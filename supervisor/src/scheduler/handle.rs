//! The handle the gRPC service holds: each call is a message to the actor and its answer.

use std::sync::Arc;

use gpuswap::{
    config::{Config, ConfigLoader, SupervisorConfig},
    pb,
};
use gpuswap_telemetry::SupervisorMetrics;
use tokio::{
    sync::{broadcast, mpsc, oneshot},
    time::Instant,
};
use tonic::Status;

use super::{ActivateArgs, Command, EventSender, Message, SchedulerOptions, actor::Actor};
use crate::backend::logs::LogBuffer;

/// A handle to the scheduler actor. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Message>,
    metrics: SupervisorMetrics,
    /// Reads the configuration again for Reload (here, not on the actor: reading it may block).
    config_loader: Option<ConfigLoader>,
    /// The `[supervisor]` section the daemon started with: what a reload cannot change.
    started_with: Arc<SupervisorConfig>,
}

fn gone() -> Status {
    Status::unavailable("the supervisor is shutting down")
}

impl Scheduler {
    /// Starts the actor on the current tokio runtime.
    pub fn spawn(
        config: Config,
        options: SchedulerOptions,
    ) -> (Scheduler, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = options.metrics.clone();
        let config_loader = options.config_loader.clone();
        let started_with = Arc::new(config.supervisor.clone());
        let actor = Actor::new(config, options, tx.downgrade());
        let task = tokio::spawn(actor.run(rx));
        (
            Scheduler {
                tx,
                metrics,
                config_loader,
                started_with,
            },
            task,
        )
    }

    /// The supervisor's metrics (the service counts the log lines its followers lose).
    pub fn metrics(&self) -> &SupervisorMetrics {
        &self.metrics
    }

    fn send(&self, command: Command) -> Result<(), Status> {
        self.tx.send(Message::Command(command)).map_err(|_| gone())
    }

    /// Queues an activation; events arrive on `events`. Fails at once for an unknown model.
    pub async fn activate(&self, args: ActivateArgs, events: EventSender) -> Result<(), Status> {
        let (accepted, answer) = oneshot::channel();
        self.send(Command::Activate {
            args,
            received: Instant::now(),
            events,
            accepted,
        })?;
        answer.await.map_err(|_| gone())?
    }

    /// Drains and stops `model` (None: every model); returns the names that were stopped.
    /// With `if_idle_generation`, stops nothing unless the model is still Ready in that
    /// generation with no holder and no waiter. With `sleep`, puts it to sleep instead
    /// (refused with FailedPrecondition when it cannot sleep).
    pub async fn deactivate(
        &self,
        model: Option<String>,
        force: bool,
        sleep: bool,
        if_idle_generation: Option<u64>,
    ) -> Result<Vec<String>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Deactivate {
            model,
            force,
            sleep,
            if_idle_generation,
            reply,
        })?;
        answer.await.map_err(|_| gone())?
    }

    pub async fn status(&self) -> Result<pb::StatusResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Status { reply })?;
        answer.await.map_err(|_| gone())
    }

    /// A snapshot and the changes after it (no change falls between the two).
    pub async fn watch(
        &self,
    ) -> Result<(pb::StatusResponse, broadcast::Receiver<pb::WatchEvent>), Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Watch { reply })?;
        answer.await.map_err(|_| gone())
    }

    /// The log buffers of `model` (None: every model).
    pub async fn logs(&self, model: Option<String>) -> Result<Vec<LogBuffer>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Logs { model, reply })?;
        answer.await.map_err(|_| gone())?
    }

    /// Re-reads the configuration file, with the daemon's flags on top (on a blocking thread:
    /// the actor never waits for a slow disk) and hands the new configuration to the actor.
    pub async fn reload(&self) -> Result<pb::ReloadResponse, Status> {
        let Some(loader) = self.config_loader.clone() else {
            return Err(Status::failed_precondition(
                "no configuration file to reload",
            ));
        };
        let config = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| Status::internal(format!("reading the configuration: {e}")))?
            .map_err(|e| Status::invalid_argument(gpuswap::error_chain(&e)))?;
        let needs_restart: Vec<String> = self
            .started_with
            .keys_needing_restart(&config.supervisor)
            .into_iter()
            .map(|key| format!("supervisor.{key}"))
            .collect();
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reload {
            config: Box::new(config),
            reply,
        })?;
        let mut response = answer.await.map_err(|_| gone())??;
        if !needs_restart.is_empty() {
            tracing::warn!(keys = ?needs_restart, "reload: these changes take effect only after a restart");
        }
        response.needs_restart = needs_restart;
        Ok(response)
    }

    /// Records when models were last used (they are then the last to be stopped).
    pub fn report_use(&self, uses: Vec<pb::ModelUse>) -> Result<(), Status> {
        self.send(Command::ReportUse {
            uses,
            received: Instant::now(),
        })
    }

    /// Ends every stream, stops every backend (in parallel) and ends the actor.
    pub async fn shutdown(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Shutdown { reply }).is_ok() {
            let _ = answer.await;
        }
    }
}
