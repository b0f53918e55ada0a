//! Kubernetes discovery (`[epp] discovery.kubernetes`): the boxes are the ready pods that the
//! label selector matches (the InferencePool's), listed and then watched through the API
//! server's REST API; and the pickers elect the active one with a `coordination.k8s.io/v1`
//! Lease, as client-go's leader election does (acquire, renew, take over once it expired).
//!
//! In a pod everything comes from the service account (token, CA, namespace) and the
//! `KUBERNETES_SERVICE_*` variables; outside one (the tests) from `api`, `api_token_file`,
//! `api_ca_file` and `namespace`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use gpuswap::config::{BoxConfig, DiscoveryConfig, KubernetesConfig, SERVICE_ACCOUNT_DIR};
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    discovery::Discovery,
    http::{HttpError, Server},
};

/// How long to wait before trying the API again after a failure.
const RETRY: Duration = Duration::from_millis(500);
/// A watch is ended by the server after this long (then listed again).
const WATCH_SECONDS: u32 = 300;
/// The pod annotation that names a box's supervisor (instead of the configured template).
pub const SUPERVISOR_ANNOTATION: &str = "gpuswap.io/supervisor";

/// A client of the API server.
#[derive(Clone, Debug)]
pub struct Api {
    server: Server,
    token_file: PathBuf,
    pub namespace: String,
}

impl Api {
    pub fn new(config: &KubernetesConfig) -> anyhow::Result<Api> {
        let account = PathBuf::from(SERVICE_ACCOUNT_DIR);
        let base = match &config.api {
            Some(api) => api.clone(),
            None => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST").context(
                    "epp.discovery.kubernetes.api is unset and KUBERNETES_SERVICE_HOST too (not in a pod)",
                )?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                format!("https://{host}:{port}")
            }
        };
        let ca_file = config
            .api_ca_file
            .clone()
            .unwrap_or_else(|| account.join("ca.crt"));
        let tls = if base.starts_with("https://") {
            Some(crate::http::tls_config(Some(&ca_file))?)
        } else {
            None
        };
        let namespace = match &config.namespace {
            Some(namespace) => namespace.clone(),
            None => std::fs::read_to_string(account.join("namespace"))
                .map(|n| n.trim().to_owned())
                .unwrap_or_else(|_| "default".into()),
        };
        Ok(Api {
            server: Server::new(&base, tls)?,
            token_file: config
                .api_token_file
                .clone()
                .unwrap_or_else(|| account.join("token")),
            namespace,
        })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<http::Request<Full<Bytes>>> {
        // Read for every request: projected service account tokens are rotated.
        let token = gpuswap::auth::read_token_file(&self.token_file).with_context(|| {
            format!(
                "cannot read the Kubernetes API token {}",
                self.token_file.display()
            )
        })?;
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        Ok(http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?)
    }

    /// One call; the answer's JSON, or the API's refusal (its status and Status object).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Result<Value, (StatusCode, String)>> {
        let request = self.request(method, path, body)?;
        match self.server.call(request).await {
            Ok((_, bytes)) => Ok(Ok(serde_json::from_slice(&bytes)
                .with_context(|| format!("{path}: the answer is not JSON"))?)),
            Err(HttpError::Status { status, body, .. }) => Ok(Err((status, body))),
            Err(error) => Err(error.into()),
        }
    }
}

/// `text` as a URL query value.
fn query_value(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The box pods.
pub struct KubernetesBoxes {
    pub api: Api,
    pub config: KubernetesConfig,
    pub discovery: DiscoveryConfig,
}

impl Discovery for KubernetesBoxes {
    async fn run(self, boxes: watch::Sender<Vec<BoxConfig>>) -> anyhow::Result<()> {
        let pods = format!(
            "/api/v1/namespaces/{}/pods?labelSelector={}",
            self.api.namespace,
            query_value(&self.config.selector)
        );
        loop {
            if let Err(error) = self.list_and_watch(&pods, &boxes).await {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "kubernetes: listing or watching the box pods failed"
                );
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

impl KubernetesBoxes {
    /// Lists the pods, then follows their changes until the watch ends (the server ends it
    /// after [`WATCH_SECONDS`], or with 410 Gone when the version is too old).
    async fn list_and_watch(
        &self,
        pods: &str,
        boxes: &watch::Sender<Vec<BoxConfig>>,
    ) -> anyhow::Result<()> {
        let list = self
            .api
            .call(Method::GET, pods, None)
            .await?
            .map_err(|(status, body)| anyhow::anyhow!("{pods}: {status}: {body}"))?;
        let mut version = list["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let mut known: BTreeMap<String, Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|pod| Some((pod["metadata"]["name"].as_str()?.to_owned(), pod.clone())))
            .collect();
        self.publish(&known, boxes);
        let watch = format!(
            "{pods}&watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}&resourceVersion={}",
            query_value(&version)
        );
        let request = self.api.request(Method::GET, &watch, None)?;
        let response = self.api.server.send(request).await?;
        anyhow::ensure!(
            response.status().is_success(),
            "{watch}: {}",
            response.status()
        );
        let mut body = response.into_body();
        let mut pending = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line = pending.split_to(end + 1);
                let event: Value = serde_json::from_slice(&line)
                    .context("kubernetes: a watch event is not JSON")?;
                let object = &event["object"];
                if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
                    version = v.to_owned();
                }
                let name = object["metadata"]["name"].as_str().unwrap_or_default();
                match event["type"].as_str().unwrap_or_default() {
                    "ADDED" | "MODIFIED" => {
                        known.insert(name.to_owned(), object.clone());
                    }
                    "DELETED" => {
                        known.remove(name);
                    }
                    "BOOKMARK" => continue,
                    _ => anyhow::bail!(
                        "the watch of the box pods ended with {} (at version {version})",
                        object
                    ),
                }
                self.publish(&known, boxes);
            }
        }
        tracing::debug!(%version, "kubernetes: the watch of the box pods ended; listing again");
        Ok(())
    }

    fn publish(&self, pods: &BTreeMap<String, Value>, boxes: &watch::Sender<Vec<BoxConfig>>) {
        let list: Vec<BoxConfig> = pods.values().filter_map(|p| self.box_of(p)).collect();
        boxes.send_if_modified(|current| {
            let changed = *current != list;
            if changed {
                *current = list;
            }
            changed
        });
    }

    /// A pod as a box: only a ready pod with an IP that is not being deleted.
    fn box_of(&self, pod: &Value) -> Option<BoxConfig> {
        let name = pod["metadata"]["name"].as_str()?;
        if !pod["metadata"]["deletionTimestamp"].is_null() {
            return None;
        }
        let ready = pod["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let ip = pod["status"]["podIP"]
            .as_str()
            .filter(|ip| !ip.is_empty())?;
        if !ready {
            return None;
        }
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_owned()
        };
        let supervisor = pod["metadata"]["annotations"][SUPERVISOR_ANNOTATION]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| self.config.supervisor.replace("{ip}", &host));
        let config = BoxConfig {
            name: name.to_owned(),
            gateway: format!("{host}:{}", self.config.gateway_port),
            supervisor,
            token_file: self.discovery.token_file.clone(),
            ca_file: self.discovery.ca_file.clone(),
        };
        match config.validate(&format!("pod {name}")) {
            Ok(()) => Some(config),
            Err(error) => {
                tracing::warn!(pod = name, %error, "kubernetes: ignoring a pod");
                None
            }
        }
    }
}

/// Holds the Lease `name` while this picker is the active one: `leader` is true meanwhile.
/// Tries every third of `ttl`; a held Lease is taken over once its holder has not renewed it
/// for `leaseDurationSeconds` as this picker observed (its own clock, never the holder's
/// timestamps); a leader that cannot renew within two thirds of `ttl` steps down first, so
/// two pickers never both lead. Every write carries the version read: a 409 Conflict means
/// another writer came first (the round is tried again; a leader stays one until its renew
/// deadline, as client-go's does).
pub async fn elect(api: Api, name: String, ttl: Duration, me: String, leader: watch::Sender<bool>) {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{name}",
        api.namespace
    );
    let retry = (ttl / 3).max(Duration::from_millis(100));
    let renew_deadline = ttl * 2 / 3;
    let mut observed: Option<(Value, Instant)> = None;
    let mut renewed: Option<Instant> = None;
    loop {
        let round = try_to_lead(&api, &path, &name, ttl, &me, &mut observed).await;
        match round {
            Ok(Round::Lead) => {
                if !leader.send_replace(true) {
                    tracing::info!(lease = %name, "this picker is the active one");
                }
                renewed = Some(Instant::now());
            }
            Ok(Round::Follow) => {
                if leader.send_replace(false) {
                    tracing::warn!(lease = %name, "lost the picker leadership");
                }
                renewed = None;
            }
            Ok(Round::Conflict) | Err(_) => {
                match &round {
                    Err(error) => {
                        tracing::warn!(lease = %name, error = format!("{error:#}"), "kubernetes: the Lease could not be read or written")
                    }
                    _ => {
                        tracing::info!(lease = %name, "the Lease changed under this picker's write (409 Conflict); trying again")
                    }
                }
                if renewed.is_some_and(|at| at.elapsed() >= renew_deadline) {
                    leader.send_replace(false);
                    renewed = None;
                    tracing::warn!(lease = %name, "stepped down: the Lease was not renewed in time");
                }
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Hands the Lease back if this picker holds it (as client-go's ReleaseOnCancel): no holder,
/// so a standby takes it at its next round instead of waiting for it to expire.
pub async fn release(api: &Api, name: &str, me: &str) -> anyhow::Result<()> {
    let path = format!(
        "/apis/coordination.k8s.io/v1/namespaces/{}/leases/{name}",
        api.namespace
    );
    let mut lease = match api.call(Method::GET, &path, None).await? {
        Ok(lease) => lease,
        Err((status, body)) => anyhow::bail!("reading the Lease: {status}: {body}"),
    };
    if lease["spec"]["holderIdentity"] != me {
        return Ok(());
    }
    lease["spec"]["holderIdentity"] = json!("");
    lease["spec"]["leaseDurationSeconds"] = json!(1);
    lease["spec"]["renewTime"] =
        json!(humantime::format_rfc3339_micros(SystemTime::now()).to_string());
    match api.call(Method::PUT, &path, Some(&lease)).await? {
        Ok(_) => {
            tracing::info!(lease = name, "released the Lease");
            Ok(())
        }
        Err((status, body)) => anyhow::bail!("releasing the Lease: {status}: {body}"),
    }
}

/// The outcome of one round.
enum Round {
    /// This picker holds the Lease.
    Lead,
    /// Another picker holds it, unexpired.
    Follow,
    /// Another writer came between this picker's read and its write (409): nothing is
    /// known; a leader stays one until its renew deadline.
    Conflict,
}

/// One round: read the Lease, then create, renew or take it over if this picker may.
async fn try_to_lead(
    api: &Api,
    path: &str,
    name: &str,
    ttl: Duration,
    me: &str,
    observed: &mut Option<(Value, Instant)>,
) -> anyhow::Result<Round> {
    let now = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let duration = ttl.as_secs().max(1);
    let current = match api.call(Method::GET, path, None).await? {
        Ok(lease) => lease,
        Err((StatusCode::NOT_FOUND, _)) => {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": { "name": name, "namespace": api.namespace },
                "spec": {
                    "holderIdentity": me,
                    "leaseDurationSeconds": duration,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            });
            let collection = path.rsplit_once('/').map_or(path, |(c, _)| c);
            return match api.call(Method::POST, collection, Some(&lease)).await? {
                Ok(_) => Ok(Round::Lead),
                Err((StatusCode::CONFLICT, _)) => Ok(Round::Conflict),
                Err((status, body)) => anyhow::bail!("creating the Lease: {status}: {body}"),
            };
        }
        Err((status, body)) => anyhow::bail!("reading the Lease: {status}: {body}"),
    };
    let spec = &current["spec"];
    let holder = spec["holderIdentity"].as_str().unwrap_or_default();
    // Expiry by this picker's clock: from when it saw the record last change.
    let record = json!([holder, spec["renewTime"], spec["acquireTime"]]);
    let since = match observed {
        Some((seen, at)) if *seen == record => *at,
        _ => {
            let at = Instant::now();
            *observed = Some((record, at));
            at
        }
    };
    let held_for = Duration::from_secs(spec["leaseDurationSeconds"].as_u64().unwrap_or(duration));
    if !holder.is_empty() && holder != me && since.elapsed() < held_for {
        return Ok(Round::Follow);
    }
    let mut lease = current.clone();
    let transitions = spec["leaseTransitions"].as_u64().unwrap_or(0);
    lease["spec"]["holderIdentity"] = json!(me);
    lease["spec"]["leaseDurationSeconds"] = json!(duration);
    lease["spec"]["renewTime"] = json!(now);
    if holder != me {
        lease["spec"]["acquireTime"] = json!(now);
        lease["spec"]["leaseTransitions"] = json!(transitions + 1);
        tracing::info!(lease = name, previous = holder, "taking over the Lease");
    }
    match api.call(Method::PUT, path, Some(&lease)).await? {
        Ok(_) => Ok(Round::Lead),
        Err((StatusCode::CONFLICT, _)) => Ok(Round::Conflict),
        Err((status, body)) => anyhow::bail!("writing the Lease: {status}: {body}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_escaped_for_the_query() {
        assert_eq!(
            query_value("app=gpuswap-box,tier in (gpu)"),
            "app%3Dgpuswap-box%2Ctier%20in%20%28gpu%29"
        );
    }
}
