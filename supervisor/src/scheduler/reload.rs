//! A new configuration: settings, and models added, removed or changed.

use gpuswap::{config::Config, pb};
use tokio::time::Instant;

use super::{
    actor::{Actor, Model, settings},
    placement::Placement,
};

impl Actor {
    pub(super) fn reload(&mut self, config: Config) -> pb::ReloadResponse {
        // Fault injection for the tests, in debug builds only: a bug in the actor.
        #[cfg(debug_assertions)]
        if std::env::var_os("GPUSWAP_TEST_FAULT").is_some_and(|f| f == "actor-panic-on-reload") {
            panic!("injected fault: actor-panic-on-reload");
        }
        let supervisor = &config.supervisor;
        self.policy.set_settings(settings(&config, &self.measured));
        self.log_lines = supervisor.log_lines;
        self.gpu_release_timeout = supervisor.gpu_release_timeout;
        let now = Instant::now();
        let mut response = pb::ReloadResponse::default();
        let names: Vec<String> = self.models.keys().cloned().collect();
        for name in names {
            let removed = self.policy.slot(&name).is_none_or(|s| s.removed);
            let model = self.models.get_mut(&name).expect("listed above");
            match config.models.get(&name) {
                None if removed => {}
                None => {
                    response.removed.push(name.clone());
                    self.policy.remove_model(&name, now);
                }
                Some(new) if removed || *new != model.config => {
                    model.config = new.clone();
                    model
                        .logs
                        .set_secrets(new.secrets().iter().map(String::as_str));
                    response.changed.push(name.clone());
                    self.policy
                        .change_model(&name, Placement::of(&name, new), now);
                }
                Some(_) => {}
            }
        }
        for (name, new) in &config.models {
            if !self.models.contains_key(name) {
                self.models
                    .insert(name.clone(), Model::new(name, new.clone(), self.log_lines));
                self.policy.add_model(name, Placement::of(name, new));
                response.added.push(name.clone());
            }
        }
        self.carry_out();
        tracing::info!(added = ?response.added, removed = ?response.removed, changed = ?response.changed, "configuration reloaded");
        response
    }
}
