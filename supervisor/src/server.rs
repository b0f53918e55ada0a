//! Listeners: a Unix socket guarded by its file mode, group and the peer's credentials, or
//! TCP with TLS and a bearer token. Both serve the Supervisor service, grpc.health.v1 and
//! server reflection (so grpcurl works); the access check runs on every call of each.

use std::{
    future::Future,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::{FileTypeExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use anyhow::{Context, bail};
use gpuswap::{
    Endpoint,
    config::{SupervisorConfig, parse_mode},
    pb::supervisor_server::SupervisorServer,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, UnixListener, UnixStream},
};
use tokio_stream::{
    StreamExt,
    wrappers::{TcpListenerStream, UnixListenerStream},
};
use tonic::{
    Request, Status,
    service::{Interceptor, InterceptorLayer},
    transport::{Identity, Server, ServerTlsConfig, server::Connected},
};

use crate::{
    backend::process_tree,
    scheduler::Scheduler,
    service::SupervisorService,
    tls::{self, Tokens},
};

/// Who may call.
#[derive(Clone)]
pub enum Access {
    /// Unix socket peers: root, or a listed uid, or a member of a listed gid; empty lists
    /// let in every peer the socket's mode lets in.
    Peers { uids: Arc<[u32]>, gids: Arc<[u32]> },
    /// TCP: `authorization: Bearer <token>`.
    Token(Arc<Tokens>),
}

impl Access {
    fn check_peer(uids: &[u32], gids: &[u32], peer: Option<&Peer>) -> Result<(), Status> {
        if uids.is_empty() && gids.is_empty() {
            return Ok(());
        }
        let Some(peer) = peer else {
            return Err(Status::permission_denied("peer credentials unavailable"));
        };
        let uid = peer.uid;
        if uid == 0
            || uids.contains(&uid)
            || gids.contains(&peer.gid)
            || peer.groups.iter().any(|g| gids.contains(g))
        {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "uid {uid} (gid {}) may not use this supervisor (supervisor.allowed_uids / allowed_gids)",
            peer.gid
        )))
    }
}

impl Interceptor for Access {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match self {
            Access::Peers { uids, gids } => {
                Self::check_peer(
                    uids,
                    gids,
                    request
                        .extensions()
                        .get::<Option<Peer>>()
                        .and_then(Option::as_ref),
                )?;
            }
            Access::Token(tokens) => tokens.check(&request)?,
        }
        Ok(request)
    }
}

/// Who connected to the Unix socket, as the kernel recorded it at connect(): never read
/// again later by pid, which another process may have by then.
#[derive(Clone, Debug)]
pub struct Peer {
    uid: u32,
    gid: u32,
    /// Supplementary groups.
    groups: Arc<[u32]>,
}

/// An accepted Unix-socket connection that carries its [`Peer`] to every call on it.
pub struct PeerStream {
    stream: UnixStream,
    peer: Option<Peer>,
}

impl PeerStream {
    fn new(stream: UnixStream) -> Self {
        let peer = stream.peer_cred().ok().map(|cred| Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            groups: peer_groups(&stream, cred.pid()).into(),
        });
        Self { stream, peer }
    }
}

/// SO_PEERGROUPS (Linux 4.13), whose number is the asm-generic one on these architectures.
const SO_PEERGROUPS: Option<libc::c_int> = if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x"
)) {
    Some(59)
} else {
    None
};

/// The peer's supplementary groups from the socket (SO_PEERGROUPS); where the kernel cannot
/// tell, from /proc at accept time, the closest to connect() that is left.
fn peer_groups(stream: &UnixStream, pid: Option<i32>) -> Vec<u32> {
    if let Some(option) = SO_PEERGROUPS {
        let mut groups: Vec<libc::gid_t> = vec![0; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into the buffer, which has them.
            let rc = unsafe {
                libc::getsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let wanted = len as usize / std::mem::size_of::<libc::gid_t>();
            if rc == 0 {
                groups.truncate(wanted);
                return groups;
            }
            // ERANGE: the buffer was too small; `len` says how large it must be.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE)
                || wanted <= groups.len()
            {
                break;
            }
            groups.resize(wanted, 0);
        }
    }
    pid.map(process_tree::supplementary_groups)
        .unwrap_or_default()
}

impl Connected for PeerStream {
    type ConnectInfo = Option<Peer>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A Unix stream socket bound to `path`, not listening yet (connections are refused).
fn bind_unix_socket(path: &Path) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
    let socket = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    bind(socket.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(socket)
}

/// Starts listening on a socket from [`bind_unix_socket`] (on the current tokio runtime).
fn listen_unix(socket: OwnedFd) -> std::io::Result<UnixListener> {
    nix::sys::socket::listen(&socket, nix::sys::socket::Backlog::MAXCONN)?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(socket))
}

/// A bound listener, ready to serve.
pub struct Listener {
    kind: Kind,
    access: Access,
    keepalive: gpuswap::Keepalive,
}

enum Kind {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tls {
        listener: TcpListener,
        tls: ServerTlsConfig,
    },
}

/// Binds `endpoint` with the access rules of `config`. Refuses a Unix socket another live
/// supervisor listens on.
pub async fn bind(config: &SupervisorConfig, endpoint: &Endpoint) -> anyhow::Result<Listener> {
    let (kind, access) = bind_kind(config, endpoint).await?;
    Ok(Listener {
        kind,
        access,
        keepalive: gpuswap::Keepalive {
            interval: config.keepalive_interval,
            timeout: config.keepalive_timeout,
        },
    })
}

async fn bind_kind(
    config: &SupervisorConfig,
    endpoint: &Endpoint,
) -> anyhow::Result<(Kind, Access)> {
    match endpoint {
        Endpoint::Unix(path) => bind_unix(config, path),
        Endpoint::Https { .. } => {
            let addr = endpoint.bind_addr().with_context(|| {
                format!("{endpoint}: an https listen address needs an IP address")
            })?;
            // Bound first: a second supervisor on the same port stops here, before it
            // touches the files of the first one's tls_dir. Nothing is served before the
            // certificate and token are ready.
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            let setup = tls::prepare(config, addr.ip())?;
            let tokens = Arc::new(Tokens::load(&setup.token_file, config.token_grace)?);
            let tls = ServerTlsConfig::new().identity(Identity::from_pem(setup.cert, setup.key));
            if let Some(dir) = &setup.made_in {
                let bound = listener.local_addr().unwrap_or(addr);
                tracing::info!(
                    "remote management: copy {ca} and {token} to the client machine, open TCP \
                     port {port}, and run there (with the paths of the copies): {command}",
                    ca = dir.join("ca.pem").display(),
                    token = setup.token_file.display(),
                    port = bound.port(),
                    command = tls::client_command(dir, &setup.token_file, bound),
                );
            }
            Ok((Kind::Tls { listener, tls }, Access::Token(tokens)))
        }
    }
}

fn bind_unix(config: &SupervisorConfig, path: &Path) -> anyhow::Result<(Kind, Access)> {
    let mode = parse_mode(&config.socket_mode)
        .context("supervisor.socket_mode: must be an octal file mode")?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another supervisor is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // bind -> chmod/chown -> listen: until listen() nobody can connect (a bound socket that
    // does not listen refuses connections), so the umask's default mode of the fresh file
    // never lets anyone in, and no process-wide umask change is needed.
    let socket =
        bind_unix_socket(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", path.display()))?;
    if let Some(group) = &config.socket_group {
        let gid = nix::unistd::Group::from_name(group)
            .with_context(|| format!("supervisor.socket_group: cannot look up group {group:?}"))?
            .with_context(|| format!("supervisor.socket_group: no group named {group:?}"))?
            .gid;
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("cannot give {} to group {group}", path.display()))?;
    }
    let listener =
        listen_unix(socket).with_context(|| format!("cannot listen on {}", path.display()))?;
    let kind = Kind::Unix {
        listener,
        path: path.to_owned(),
    };
    let access = Access::Peers {
        uids: config.allowed_uids.clone().into(),
        gids: config.allowed_gids.clone().into(),
    };
    Ok((kind, access))
}

impl Listener {
    /// The bearer tokens of an https listener, to re-read on reload.
    pub fn tokens(&self) -> Option<Arc<Tokens>> {
        match &self.access {
            Access::Token(tokens) => Some(tokens.clone()),
            Access::Peers { .. } => None,
        }
    }

    /// Where it listens, for logs.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Unix { path, .. } => format!("unix://{}", path.display()),
            Kind::Tls { listener, .. } => listener
                .local_addr()
                .map(|a| format!("https://{a}"))
                .unwrap_or_else(|_| "https://?".into()),
        }
    }

    /// Serves until `shutdown` resolves and the open calls have ended; removes the socket.
    pub async fn serve(
        self,
        scheduler: Scheduler,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<SupervisorServer<SupervisorService>>()
            .await;
        // Both reflection versions: grpcurl before 1.8.9 and some other tools speak only
        // v1alpha. The health service is described too, and each version lists both
        // reflection services (by default each would list only itself), so both versions
        // describe the same server.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(gpuswap::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(
                    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
                )
        };
        let reflection_v1 = reflection().build_v1().context("reflection service")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("reflection service")?;
        let supervisor = SupervisorServer::new(SupervisorService::new(scheduler, self.tokens()));
        // A client that stops answering pings (its host died or froze) is disconnected: its
        // streams end, and with them its holds.
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(self.keepalive.interval))
            .http2_keepalive_timeout(Some(self.keepalive.timeout));
        match self.kind {
            Kind::Unix { listener, path } => {
                let result = builder
                    .layer(InterceptorLayer::new(self.access))
                    .add_service(supervisor)
                    .add_service(health)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .serve_with_incoming_shutdown(
                        UnixListenerStream::new(listener)
                            .map(|accepted| accepted.map(PeerStream::new)),
                        shutdown,
                    )
                    .await;
                let _ = std::fs::remove_file(&path);
                result.context("gRPC server")
            }
            Kind::Tls { listener, tls } => {
                builder = builder.tls_config(tls).context("TLS configuration")?;
                builder
                    .layer(InterceptorLayer::new(self.access))
                    .add_service(supervisor)
                    .add_service(health)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                    .await
                    .context("gRPC server")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the bind -> chmod -> listen order relies on: until listen(), the socket file
    /// (whatever mode the umask gave it) refuses every connection; after it, the file has
    /// exactly the configured mode.
    #[tokio::test]
    async fn a_bound_socket_refuses_connections_until_it_listens_with_its_mode() {
        let dir = testkit::short_tempdir();
        let path = dir.path().join("s.sock");
        let socket = bind_unix_socket(&path).expect("bind");
        let refused = std::os::unix::net::UnixStream::connect(&path).expect_err("not listening");
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let listener = listen_unix(socket).expect("listen");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (client, accepted) = tokio::join!(UnixStream::connect(&path), listener.accept());
        client.expect("connects once listening");
        accepted.expect("accepted");
    }
}
