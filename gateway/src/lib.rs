//! gpuswap-gateway: the OpenAI-compatible HTTP front.
//!
//! - [`catalog`]: the models the supervisor knows, from its Watch stream.
//! - [`route`]: the lock-free route table and in-flight counts.
//! - [`scheduler`]: the actor that orders requests and holds models.
//! - [`proxy`]: the hot path; [`waiting`]: streams that wait for a swap.
//! - [`upstream`]: keep-alive backend connections, driven by the requests using them.
//! - [`tokens`]: completion tokens counted from response bytes in passing.
//! - [`server`]: the HTTP endpoints (`/metrics` included) and the accept loop.
//! - [`limits`]: the bounds on queued requests and their bodies.
//! - [`browser`]: CORS origins and allowed `Host` headers.
//! - [`operator`]: the status API, llama-server's router API and the status page.
//! - [`access`]: API keys, what each may see, who may administer.

pub mod access;
pub mod browser;
pub mod catalog;
pub mod error;
pub mod limits;
pub mod operator;
pub mod proxy;
mod register;
pub mod route;
pub mod scheduler;
pub mod server;
pub mod tokens;
pub mod upstream;
pub mod waiting;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{
    access::Access,
    browser::BrowserAccess,
    catalog::CatalogHandle,
    limits::QueueLimits,
    operator::{Swaps, TokenRates},
    route::RouteTable,
    scheduler::{Actor, Scheduler, SchedulerOptions},
};
use anyhow::Context as _;
use gpuswap::{ClientOptions, Endpoint, SupervisorClient, config::GatewayConfig};
use gpuswap_telemetry::{GatewayMetrics, Metrics};

/// What every request handler shares.
pub struct Gateway {
    pub catalog: Arc<CatalogHandle>,
    pub routes: Arc<RouteTable>,
    pub scheduler: Scheduler,
    pub access: Access,
    /// For the operator's calls (logs, unload).
    pub supervisor: SupervisorClient,
    pub token_rates: TokenRates,
    pub swaps: Swaps,
    pub max_body: u64,
    /// Deadline for a request body (408 past it).
    pub body_timeout: Duration,
    /// `queue_memory` and `max_queued`.
    pub limits: Arc<QueueLimits>,
    /// `cors_origins` and `allowed_hosts`.
    pub browser: BrowserAccess,
    pub queue_timeout: Duration,
    pub keepalive_interval: Duration,
    pub stream_progress: bool,
    /// Shown as `created` in the model list.
    pub started_unix: u64,
    pub supervisor_endpoint: String,
    /// The registry served on `GET /metrics`.
    pub metrics: Arc<Metrics>,
    pub gw_metrics: GatewayMetrics,
}

/// Closes backend connections left idle: a pool is otherwise trimmed only
/// when it is used, and the connections of a burst would stay open.
async fn close_stale_connections(routes: Arc<RouteTable>) {
    let mut tick = tokio::time::interval(upstream::IDLE_SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        for route in routes.snapshot().values() {
            route.pool.close_stale();
        }
    }
}

/// Connections the kernel queues for the accept loop (capped by
/// `net.core.somaxconn`). The usual 128 overflows when a burst of clients
/// connects at once: their handshakes then wait for SYN retries (a second or
/// more), or an idle one is lost without either side knowing.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(listen: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(listen).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // Like std's bind: a restarted gateway may rebind while old
        // connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// Descriptors kept free of client connections, at least: the listener, the
/// supervisor's channel, the runtime's own, logs and traces.
const RESERVED_FDS: u64 = 256;

/// `max_connections`, lowered to what the open-file limit can serve with a
/// margin: a quarter of the descriptors (at least [`RESERVED_FDS`]) stays for
/// backend connections, which only requests in flight use, and the gateway's
/// own. Past the limit, accept would fail with EMFILE for every later client,
/// and the backend connections of requests already accepted would fail too.
fn connection_cap(configured: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return configured;
    }
    let margin = (limit.rlim_cur / 4).max(RESERVED_FDS);
    let fits = usize::try_from(limit.rlim_cur.saturating_sub(margin))
        .unwrap_or(usize::MAX)
        .max(1);
    if fits < configured {
        tracing::warn!(
            configured,
            serving = fits,
            open_file_limit = limit.rlim_cur,
            "gateway.max_connections is above what the open file limit allows: lowered"
        );
    }
    configured.min(fits)
}

/// `gateway@host:pid`, shown in the supervisor's status.
fn client_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("gateway@{host}:{}", std::process::id())
}

/// Runs the gateway until the process is told to stop.
pub async fn run(config: GatewayConfig) -> anyhow::Result<()> {
    let access = Access::from_config(&config)?;
    let endpoint: Endpoint = config.supervisor.parse().context("gateway.supervisor")?;
    // The token file, not its token: the client reads it again when it changes, so a
    // rotated supervisor token reaches this gateway without a restart.
    let options = ClientOptions {
        token: None,
        token_file: config.token_file.clone(),
        ca_file: config.ca_file.clone(),
        keepalive: gpuswap::Keepalive {
            interval: config.supervisor_keepalive_interval,
            timeout: config.supervisor_keepalive_timeout,
        },
    };
    let supervisor = gpuswap::connect(&endpoint, &options)
        .context("connecting to the supervisor (gateway.token_file, gateway.ca_file)")?;
    let listener = bind(&config.listen)
        .await
        .with_context(|| format!("gateway.listen: cannot listen on {}", config.listen))?;

    let mut metrics = Metrics::new();
    let gw_metrics = metrics.gateway();
    let catalog = Arc::new(CatalogHandle::default());
    let routes = Arc::new(RouteTable::default());
    let (actor, scheduler) = Actor::new(
        supervisor.clone(),
        Arc::clone(&catalog),
        Arc::clone(&routes),
        SchedulerOptions {
            client_name: client_name(),
            idle_ttl: config.idle_ttl,
            preload: config.preload.clone(),
            upstream_idle_timeout: config.upstream_idle_timeout,
            expose_log_tail: config.expose_log_tail,
        },
        gw_metrics.clone(),
    );
    tokio::spawn(catalog::watch(
        supervisor.clone(),
        Arc::clone(&catalog),
        endpoint.to_string(),
    ));
    if let Some(register) = config.register.clone() {
        let supervisor = config.supervisor.clone();
        tokio::spawn(async move {
            if let Err(error) = register::run(register, supervisor).await {
                tracing::error!(%error, "gateway.register: cannot register in etcd");
            }
        });
    }
    tokio::spawn(actor.run());
    tokio::spawn(close_stale_connections(Arc::clone(&routes)));

    let gateway = Arc::new(Gateway {
        catalog,
        routes,
        scheduler,
        access,
        supervisor,
        token_rates: TokenRates::default(),
        swaps: Swaps::default(),
        max_body: config.max_body,
        body_timeout: config.body_timeout,
        limits: QueueLimits::new(config.queue_memory, config.max_queued),
        browser: BrowserAccess::new(&config.cors_origins, &config.allowed_hosts),
        queue_timeout: config.queue_timeout,
        keepalive_interval: config.keepalive_interval,
        stream_progress: config.stream_progress,
        started_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        supervisor_endpoint: endpoint.to_string(),
        metrics: Arc::new(metrics),
        gw_metrics,
    });
    tokio::spawn(TokenRates::sample(Arc::clone(&gateway)));
    tokio::spawn(Swaps::follow(Arc::clone(&gateway)));
    let max_connections = connection_cap(config.max_connections);
    tracing::info!(listen = %listener.local_addr()?, supervisor = %endpoint, max_connections, "gpuswap-gateway listening");
    server::serve(listener, gateway, config.header_timeout, max_connections).await;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A gateway whose supervisor is nowhere, for tests of the pure parts.
    pub fn test_gateway() -> Arc<Gateway> {
        let endpoint: Endpoint = "unix:///nonexistent/gs.sock".parse().unwrap();
        let supervisor = gpuswap::connect(&endpoint, &ClientOptions::default()).unwrap();
        let catalog = Arc::new(CatalogHandle::default());
        let routes = Arc::new(RouteTable::default());
        let mut metrics = Metrics::new();
        let gw_metrics = metrics.gateway();
        let (_actor, scheduler) = Actor::new(
            supervisor.clone(),
            Arc::clone(&catalog),
            Arc::clone(&routes),
            SchedulerOptions {
                client_name: "test".into(),
                idle_ttl: Duration::ZERO,
                preload: Vec::new(),
                upstream_idle_timeout: Duration::from_secs(90),
                expose_log_tail: false,
            },
            gw_metrics.clone(),
        );
        Arc::new(Gateway {
            catalog,
            routes,
            scheduler,
            access: Access::with_api_keys(&["k1", "k2"]),
            supervisor,
            token_rates: TokenRates::default(),
            swaps: Swaps::default(),
            max_body: 1 << 20,
            body_timeout: Duration::from_secs(1),
            limits: QueueLimits::new(1 << 20, 4),
            browser: BrowserAccess::default(),
            queue_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            stream_progress: true,
            started_unix: 0,
            supervisor_endpoint: endpoint.to_string(),
            metrics: Arc::new(metrics),
            gw_metrics,
        })
    }
}
