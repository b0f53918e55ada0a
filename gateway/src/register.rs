//! `[gateway] register`: the box's entry in etcd for the endpoint pickers, under a lease this
//! gateway keeps alive. A gateway that dies or hangs stops renewing, and etcd drops the entry
//! when the lease runs out; a gateway whose lease was lost registers again.

use std::time::Duration;

use gpuswap::{config::RegisterConfig, etcd::Etcd};

/// Registers the box and keeps it registered; returns only on a configuration error.
pub async fn run(config: RegisterConfig, supervisor: String) -> anyhow::Result<()> {
    let etcd = Etcd::connect(&config.etcd)?;
    let key = format!("{}{}", config.prefix, config.name);
    let value = serde_json::json!({
        "name": config.name,
        "gateway": config.advertise,
        "supervisor": config.supervisor.clone().unwrap_or(supervisor),
    })
    .to_string()
    .into_bytes();
    loop {
        let error = match register_once(&etcd, &key, value.clone(), config.ttl).await {
            Ok(lease) => {
                tracing::info!(%key, lease = format!("{lease:x}"), "registered in etcd");
                etcd.keep_alive(lease, config.ttl).await
            }
            Err(error) => error,
        };
        tracing::warn!(%key, %error, "etcd registration lost; registering again");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn register_once(
    etcd: &Etcd,
    key: &str,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<i64, gpuswap::etcd::EtcdError> {
    let lease = etcd.grant(ttl).await?;
    etcd.put(key, value, lease).await?;
    Ok(lease)
}
