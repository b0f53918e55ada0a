//! The proxies gpuswap is compared with: nginx as a plain streaming reverse
//! proxy, and the LiteLLM proxy. Each gets its own config in the work dir.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result};

use super::procs::{self, Proc, free_port, http_get};

/// An upstream a peer proxies to: the name clients ask for and the mock's port.
pub struct Upstream {
    pub model: String,
    pub port: u16,
}

/// nginx in the foreground; one listen port per upstream (same order).
pub async fn start_nginx(
    nginx: &str,
    upstreams: &[Upstream],
    dir: &Path,
    logs: &Path,
) -> Result<(Proc, Vec<u16>)> {
    let prefix = dir.join("nginx");
    for sub in ["client", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(prefix.join("tmp").join(sub))?;
    }
    let p = prefix.display();
    let mut conf = format!(
        "worker_processes auto;\ndaemon off;\npid {p}/nginx.pid;\nerror_log {p}/error.log warn;\n\
         worker_rlimit_nofile 16384;\nevents {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n\
         \x20 client_body_temp_path {p}/tmp/client;\n  proxy_temp_path {p}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {p}/tmp/fastcgi;\n  uwsgi_temp_path {p}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {p}/tmp/scgi;\n"
    );
    let mut ports = Vec::new();
    for (i, upstream) in upstreams.iter().enumerate() {
        let listen = free_port()?;
        ports.push(listen);
        write!(
            conf,
            "  upstream u{i} {{ server 127.0.0.1:{port}; keepalive 256; keepalive_requests 1000000; \
             keepalive_timeout 300s; }}\n\
             \x20 server {{\n    listen 127.0.0.1:{listen};\n    location / {{\n\
             \x20     proxy_pass http://u{i};\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_buffering off;\n\
             \x20     proxy_request_buffering off;\n      proxy_read_timeout 600s;\n    }}\n  }}\n",
            port = upstream.port
        )?;
    }
    conf.push_str("}\n");
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut proc = procs::spawn(
        "nginx",
        &[
            nginx.to_owned(),
            "-p".into(),
            prefix.display().to_string(),
            "-c".into(),
            conf_path.display().to_string(),
        ],
        &[],
        logs,
    )?;
    for &port in &ports {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        procs::wait_until(
            "nginx listening",
            &mut proc,
            Duration::from_secs(20),
            || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
        )
        .await?;
    }
    Ok((proc, ports))
}

/// The LiteLLM proxy with one `openai/<model>` entry per upstream; not waited for
/// (it takes 6-17 s to start): see [`wait_litellm`].
pub fn start_litellm(
    litellm: &str,
    master_key: &str,
    upstreams: &[Upstream],
    dir: &Path,
    logs: &Path,
) -> Result<(Proc, u16)> {
    let mut conf = String::from("model_list:\n");
    for upstream in upstreams {
        write!(
            conf,
            "  - model_name: {model}\n    litellm_params:\n      model: openai/{model}\n\
             \x20     api_base: http://127.0.0.1:{port}/v1\n      api_key: none\n",
            model = upstream.model,
            port = upstream.port
        )?;
    }
    conf.push_str(
        "litellm_settings:\n  telemetry: false\n  set_verbose: false\n\
         general_settings:\n  master_key: os.environ/LITELLM_MASTER_KEY\n",
    );
    let conf_path = dir.join("litellm.yaml");
    std::fs::write(&conf_path, conf).context("write litellm.yaml")?;
    let port = free_port()?;
    let proc = procs::spawn(
        "litellm",
        &[
            litellm.to_owned(),
            "--config".into(),
            conf_path.display().to_string(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--num_workers".into(),
            "1".into(),
        ],
        &[
            ("LITELLM_MASTER_KEY".into(), master_key.into()),
            // No network here: use the bundled model cost map.
            ("LITELLM_LOCAL_MODEL_COST_MAP".into(), "True".into()),
            ("LITELLM_LOG".into(), "ERROR".into()),
            ("NO_DOCS".into(), "True".into()),
        ],
        logs,
    )?;
    Ok((proc, port))
}

pub async fn wait_litellm(proc: &mut Proc, port: u16, master_key: &str) -> Result<()> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    procs::wait_until(
        "LiteLLM answering /v1/models",
        proc,
        Duration::from_secs(120),
        || async move {
            matches!(
                http_get(addr, "/v1/models", Some(master_key)).await,
                Some((200, _))
            )
        },
    )
    .await
}
