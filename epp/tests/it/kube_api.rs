//! A fake Kubernetes API server for the picker's Kubernetes discovery and Lease election.
//! No real kube-apiserver can be installed here (no Debian or PyPI package ships one, nor
//! k3s or kind), so this serves, over https with a bearer token as in a pod, the exact JSON
//! shapes of the parts of the API the picker uses: `PodList` and pod watch streams
//! (newline-delimited `{"type","object"}` events with resourceVersions, and BOOKMARKs), and
//! `coordination.k8s.io/v1` Leases (GET, POST with 409 AlreadyExists, PUT with 409 Conflict
//! when `metadata.resourceVersion` is not the current one), 401 without the token, 404 with
//! a `Status` object.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

pub const NAMESPACE: &str = "gpuswap";
const TOKEN: &str = "fake-service-account-token";

/// What the fake server holds: objects by name, one resourceVersion counter for all (as
/// etcd's revision behind the real one), and the pod events for watches.
#[derive(Default)]
struct State {
    version: u64,
    pods: BTreeMap<String, Value>,
    leases: BTreeMap<String, Value>,
    /// (resourceVersion, event) of every pod change.
    events: Vec<(u64, Value)>,
    conflicts: u32,
    /// The next Lease update is refused with 409 as if another writer came first.
    conflict_next_put: bool,
    unauthorized: u32,
}

pub struct FakeApi {
    pub url: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pod of the box DaemonSet: `ready` as its Ready condition, with its supervisor named by
/// the annotation the picker reads.
pub fn box_pod(name: &str, ip: &str, ready: bool, supervisor: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": { "app.kubernetes.io/name": "gpuswap-box" },
            "annotations": { "gpuswap.io/supervisor": supervisor },
        },
        "spec": { "containers": [{ "name": "gateway", "image": "gpuswap:latest" }] },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{ "ip": ip }],
            "conditions": [
                { "type": "Initialized", "status": "True" },
                { "type": "Ready", "status": if ready { "True" } else { "False" } },
            ],
        },
    })
}

impl FakeApi {
    pub async fn start() -> FakeApi {
        let dir = testkit::short_tempdir();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kubernetes");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_file = dir.path().join("ca.crt");
        let token_file = dir.path().join("token");
        std::fs::write(&ca_file, ca_pem).unwrap();
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let (changed, _) = watch::channel(0);
        let server = Server {
            state: Arc::clone(&state),
            changed: changed.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, server) = (acceptor.clone(), server.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeApi {
            url,
            ca_file,
            token_file,
            state,
            changed,
            _dir: dir,
            task,
        }
    }

    /// Adds or replaces a pod (an ADDED or MODIFIED event for the watches).
    pub fn put_pod(&self, mut pod: Value) {
        let mut state = self.state.lock().unwrap();
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        let version = state.bump();
        pod["metadata"]["resourceVersion"] = json!(version.to_string());
        let kind = if state.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.pods.insert(name, pod.clone());
        state
            .events
            .push((version, json!({ "type": kind, "object": pod })));
        drop(state);
        self.changed.send_replace(version);
    }

    pub fn delete_pod(&self, name: &str) {
        let mut state = self.state.lock().unwrap();
        let version = state.bump();
        if let Some(mut pod) = state.pods.remove(name) {
            pod["metadata"]["resourceVersion"] = json!(version.to_string());
            state
                .events
                .push((version, json!({ "type": "DELETED", "object": pod })));
        }
        drop(state);
        self.changed.send_replace(version);
    }

    /// The next Lease update gets 409 Conflict, as when another writer updated it between
    /// the picker's read and its write.
    pub fn conflict_next_put(&self) {
        self.state.lock().unwrap().conflict_next_put = true;
    }

    /// Another holder writes the Lease (and then never renews it).
    pub fn steal_lease(&self, name: &str, holder: &str) {
        let mut state = self.state.lock().unwrap();
        let version = state.bump();
        let lease = state.leases.get_mut(name).expect("the Lease exists");
        let transitions = lease["spec"]["leaseTransitions"].as_u64().unwrap_or(0);
        lease["spec"]["leaseTransitions"] = json!(transitions + 1);
        lease["spec"]["holderIdentity"] = json!(holder);
        lease["spec"]["renewTime"] =
            json!(humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string());
        lease["metadata"]["resourceVersion"] = json!(version.to_string());
    }

    pub fn lease(&self, name: &str) -> Option<Value> {
        self.state.lock().unwrap().leases.get(name).cloned()
    }

    /// Writes refused with 409 so far.
    pub fn conflicts(&self) -> u32 {
        self.state.lock().unwrap().conflicts
    }

    pub fn unauthorized(&self) -> u32 {
        self.state.lock().unwrap().unauthorized
    }
}

impl State {
    fn bump(&mut self) -> u64 {
        self.version += 1;
        self.version
    }
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<u64>,
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .unwrap()
}

/// The API's `Status` object for a refusal.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

fn query(request: &Request<Incoming>) -> BTreeMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decoded(v)))
        .collect()
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// Equality-based selectors (`k=v,k2=v2`): what the picker's configuration uses.
fn selected(pod: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|s| !s.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => pod["metadata"]["labels"][k.trim()] == v.trim(),
            None => false,
        })
}

impl Server {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let authorized = request
            .headers()
            .get("authorization")
            .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
        if !authorized {
            self.state.lock().unwrap().unauthorized += 1;
            return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
        }
        let path = request.uri().path().to_owned();
        let pods = format!("/api/v1/namespaces/{NAMESPACE}/pods");
        let leases = format!("/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases");
        let query = query(&request);
        let method = request.method().clone();
        let bytes = match request.into_body().collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(_) => Bytes::new(),
        };
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if path == pods && method == Method::GET {
            let selector = query.get("labelSelector").cloned().unwrap_or_default();
            if query.get("watch").map(String::as_str) == Some("true") {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return self.watch_pods(selector, from);
            }
            let state = self.state.lock().unwrap();
            let items: Vec<Value> = state
                .pods
                .values()
                .filter(|p| selected(p, &selector))
                .cloned()
                .collect();
            return full(
                StatusCode::OK,
                &json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": { "resourceVersion": state.version.to_string() },
                    "items": items,
                }),
            );
        }
        if path == leases && method == Method::POST {
            let mut state = self.state.lock().unwrap();
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if state.leases.contains_key(&name) {
                state.conflicts += 1;
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("leases.coordination.k8s.io \"{name}\" already exists"),
                );
            }
            let version = state.bump();
            let mut lease = body;
            lease["metadata"]["resourceVersion"] = json!(version.to_string());
            lease["metadata"]["namespace"] = json!(NAMESPACE);
            state.leases.insert(name, lease.clone());
            return full(StatusCode::CREATED, &lease);
        }
        if let Some(name) = path.strip_prefix(&format!("{leases}/")) {
            let mut state = self.state.lock().unwrap();
            let not_found = || {
                status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("leases.coordination.k8s.io \"{name}\" not found"),
                )
            };
            return match method {
                Method::GET => match state.leases.get(name) {
                    Some(lease) => full(StatusCode::OK, lease),
                    None => not_found(),
                },
                Method::PUT => {
                    let raced = std::mem::take(&mut state.conflict_next_put);
                    let Some(current) = state.leases.get(name) else {
                        return not_found();
                    };
                    if raced
                        || body["metadata"]["resourceVersion"]
                            != current["metadata"]["resourceVersion"]
                    {
                        state.conflicts += 1;
                        return status(
                            StatusCode::CONFLICT,
                            "Conflict",
                            &format!(
                                "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                            ),
                        );
                    }
                    let version = state.bump();
                    let mut lease = body;
                    lease["metadata"]["resourceVersion"] = json!(version.to_string());
                    state.leases.insert(name.to_owned(), lease.clone());
                    full(StatusCode::OK, &lease)
                }
                _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "no"),
            };
        }
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// A watch: the events after `from`, then each new one as it happens, as JSON lines; a
    /// BOOKMARK when nothing else is sent for a while.
    fn watch_pods(&self, selector: String, from: u64) -> Response<Body> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
        let state = Arc::clone(&self.state);
        let mut changed = self.changed.subscribe();
        tokio::spawn(async move {
            let mut sent = from;
            loop {
                let lines: Vec<String> = {
                    let state = state.lock().unwrap();
                    let lines = state
                        .events
                        .iter()
                        .filter(|(v, e)| *v > sent && selected(&e["object"], &selector))
                        .map(|(_, e)| e.to_string())
                        .collect();
                    sent = sent.max(state.version);
                    lines
                };
                for line in lines {
                    let frame = Frame::data(Bytes::from(format!("{line}\n")));
                    if tx.send(Ok(frame)).await.is_err() {
                        return;
                    }
                }
                let bookmark = tokio::time::sleep(std::time::Duration::from_secs(1));
                tokio::select! {
                    result = changed.changed() => if result.is_err() { return },
                    _ = bookmark => {
                        let mark = json!({
                            "type": "BOOKMARK",
                            "object": { "kind": "Pod", "apiVersion": "v1",
                                        "metadata": { "resourceVersion": sent.to_string() } },
                        });
                        let frame = Frame::data(Bytes::from(format!("{mark}\n")));
                        if tx.send(Ok(frame)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(ReceiverStream::new(rx)).boxed())
            .unwrap()
    }
}
