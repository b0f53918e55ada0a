//! The end: every stream ends, every backend stops (in parallel), then deactivations are answered.

use tokio::sync::mpsc;

use super::{Internal, Message, actor::Actor, policy::Action};
use crate::backend::Backend;

impl Actor {
    /// `rx` brings the outcome of spawns still under way: those backends are stopped too.
    pub(super) async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Message>) {
        tracing::info!("stopping every backend");
        self.policy.shutdown();
        // Deactivations are answered once the processes are gone.
        let (answers, others): (Vec<Action>, Vec<Action>) = self
            .policy
            .take_actions()
            .into_iter()
            .partition(|a| matches!(a, Action::Deactivated { .. }));
        for action in others {
            self.apply(action);
        }
        let mut backends: Vec<(String, Backend)> = Vec::new();
        for (name, model) in &mut self.models {
            if let Some(run) = model.run.take() {
                backends.push((name.clone(), run.backend));
            }
        }
        // Other messages are dropped: their callers hear that the supervisor is going.
        while self.models.values().any(|m| m.spawning.is_some()) {
            let Some(message) = rx.recv().await else {
                break;
            };
            if let Message::Internal(Internal::Spawned(spawned)) = message
                && let Some(model) = self.models.get_mut(&spawned.model)
                && model.spawning == Some(spawned.generation)
            {
                model.spawning = None;
                if let Ok(backend) = spawned.result {
                    backends.push((spawned.model, backend));
                }
            }
        }
        let stops = backends.into_iter().map(|(name, backend)| async move {
            let info = backend.stop().await;
            tracing::info!(model = name, %info, "stopped");
        });
        futures_util::future::join_all(stops).await;
        for action in answers {
            self.apply(action);
        }
    }
}
