//! The end-to-end suite: every binary together, driven by real clients (and, ignored by default, real inference servers and OpenWebUI).
//! One test binary (one link) for the crate; a module per suite.

mod clients_common;
mod e2e_common;

mod clients_anthropic;
mod clients_demo;
mod clients_grpcio;
mod clients_grpcurl;
mod clients_openai;
mod clients_openwebui;
mod clients_systemd;
mod config_env;
mod deploy_configs;
mod e2e_backend_crash;
mod e2e_failed_starts;
mod e2e_gateway_restart;
mod e2e_port_busy;
mod e2e_races;
mod e2e_requires;
mod e2e_secrets;
mod e2e_soak;
mod e2e_supervisor_death;
mod e2e_trace;
mod real_servers;
mod remote_management;
