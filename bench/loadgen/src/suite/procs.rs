//! The processes the suite starts: each in its own process group, its output
//! in a log file, all of them ended (group-wide) when the suite finishes.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

pub struct Proc {
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: tokio::process::Child,
}

impl Proc {
    /// True if it already exited (its status is then in the error).
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited: {status}; last output:\n{}",
                self.name,
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    fn signal_group(&self, signal: libc::c_int) {
        if let Ok(pgid) = libc::pid_t::try_from(self.pid) {
            // SAFETY: kill(2) on the process group this suite created.
            unsafe { libc::kill(-pgid, signal) };
        }
    }

    /// SIGTERM to the group, SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        self.signal_group(libc::SIGTERM);
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            self.signal_group(libc::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Anything left in the group (workers) goes too.
        self.signal_group(libc::SIGKILL);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Backstop when the suite ends early (error, panic): no process outlives it.
        self.signal_group(libc::SIGKILL);
    }
}

/// The last lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Starts `command` with its output going to `log_dir/name.log`.
pub fn spawn(
    name: &str,
    command: &[String],
    env: &[(String, String)],
    log_dir: &Path,
) -> Result<Proc> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow!("empty command"))?;
    let log = log_dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = tokio::process::Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {name}: {program}"))?;
    let pid = child.id().ok_or_else(|| anyhow!("{name} has no pid"))?;
    Ok(Proc {
        name: name.to_owned(),
        pid,
        log,
        child,
    })
}

/// A port nothing listens on right now (the kernel picks it).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `check` every 20 ms until it succeeds, `proc` dies or `timeout` passes.
pub async fn wait_until<F, Fut>(
    what: &str,
    proc: &mut Proc,
    timeout: Duration,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return Ok(());
        }
        proc.check_running()
            .with_context(|| format!("while waiting for {what}"))?;
        if Instant::now() > deadline {
            bail!(
                "{what}: not after {timeout:?}; last output of {}:\n{}",
                proc.name,
                log_tail(&proc.log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `GET path` on 127.0.0.1:`port` answers 200, as [`wait_until`] does.
pub async fn wait_answering(
    what: &str,
    proc: &mut Proc,
    timeout: Duration,
    port: u16,
    path: &str,
) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_until(what, proc, timeout, || async move {
        matches!(http_get(addr, path, None).await, Some((200, _)))
    })
    .await
}

/// One GET over a fresh connection: the status and body, or None when it fails.
pub async fn http_get(addr: SocketAddr, path: &str, bearer: Option<&str>) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let mut request = http::Request::get(path).header(http::header::HOST, addr.to_string());
    if let Some(token) = bearer {
        request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request.body(Empty::<bytes::Bytes>::new()).ok()?;
    let exchange = async {
        let response = sender.send_request(request).await.ok()?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()
        .flatten()
}
