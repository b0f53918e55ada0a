//! The end: every stream ends, every backend stops (in parallel), then deactivations are answered.

use super::{actor::Actor, policy::Action};

impl Actor {
    pub(super) async fn shutdown(&mut self) {
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
        let mut stops = Vec::new();
        for (name, model) in &mut self.models {
            if let Some(run) = model.run.take() {
                let name = name.clone();
                stops.push(async move {
                    let info = run.backend.stop().await;
                    tracing::info!(model = name, %info, "stopped");
                });
            }
        }
        futures_util::future::join_all(stops).await;
        for action in answers {
            self.apply(action);
        }
    }
}
