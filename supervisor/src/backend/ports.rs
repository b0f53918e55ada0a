//! Ports: whether a model's port is free, and who holds it (from the kernel's TCP tables and
//! the processes' descriptors).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use procfs::{
    net::TcpState,
    process::{FDTarget, Process},
};

use super::StartError;

/// True when `host:port` can be bound now (SO_REUSEADDR, like the servers themselves).
pub(super) fn port_is_free(host: &str, port: u16) -> bool {
    bind_error(host, port).is_none()
}

pub(super) fn bind_error(host: &str, port: u16) -> Option<std::io::Error> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match std::net::TcpListener::bind((host, port)) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Some(e),
        // Not ours to judge (an address not on this box, a privileged port): the backend
        // will report it itself.
        Err(_) => None,
    }
}

pub(super) fn ensure_port_free(host: &str, port: u16) -> Result<(), StartError> {
    if bind_error(host, port).is_none() {
        return Ok(());
    }
    let detail = describe(port)
        .map(|holder| format!(" by {holder}"))
        .unwrap_or_default();
    Err(StartError::PortBusy { port, detail })
}

/// Polls (from 1 ms, doubling) until the port can be bound; false after `timeout`.
pub(super) async fn wait_port_free(host: &str, port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if port_is_free(host, port) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Who listens where a connection to the port goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// Every such socket is held by the given process tree.
    Tree,
    /// Another process: `pid N (command line)`.
    Foreign(String),
    /// Not knowable from here (no such socket in this network namespace, or its holder's
    /// descriptors cannot be read).
    Unknown(String),
}

/// Who holds the sockets that take connections to `addr` (any listener on `port` when
/// None), judged against the processes `tree`.
pub(super) fn owner(addr: Option<SocketAddr>, port: u16, tree: &[i32]) -> Owner {
    let sockets = listening_inodes(port, addr.map(|a| a.ip()));
    if sockets.is_empty() {
        return Owner::Unknown(format!("no listening socket on port {port} is visible"));
    }
    let ours = socket_inodes_of(tree.iter().copied());
    let others: BTreeSet<u64> = sockets.difference(&ours).copied().collect();
    if others.is_empty() {
        return Owner::Tree;
    }
    match holder(&others) {
        Some(holder) => Owner::Foreign(holder),
        None if sockets.len() > others.len() => Owner::Tree,
        None => Owner::Unknown(format!(
            "the holder of the socket on port {port} is not readable"
        )),
    }
}

/// `pid N (command line)` of a process that listens on `port`, if any.
pub(super) fn describe(port: u16) -> Option<String> {
    let sockets = listening_inodes(port, None);
    if sockets.is_empty() {
        return None;
    }
    holder(&sockets)
}

/// The first process (in pid order) with a descriptor on one of `sockets`.
fn holder(sockets: &BTreeSet<u64>) -> Option<String> {
    let processes = procfs::process::all_processes().ok()?;
    for process in processes.flatten() {
        if socket_inodes(&process).is_some_and(|held| !held.is_disjoint(sockets)) {
            let command = process.cmdline().unwrap_or_default().join(" ");
            return Some(format!("pid {} ({command})", process.pid()));
        }
    }
    None
}

fn socket_inodes(process: &Process) -> Option<BTreeSet<u64>> {
    let fds = process.fd().ok()?;
    Some(
        fds.flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) => Some(inode),
                _ => None,
            })
            .collect(),
    )
}

fn socket_inodes_of(pids: impl Iterator<Item = i32>) -> BTreeSet<u64> {
    pids.filter_map(|pid| socket_inodes(&Process::new(pid).ok()?))
        .flatten()
        .collect()
}

/// The inodes of the sockets listening on `port` that a connection to `ip` reaches:
/// those bound to that very address, else the wildcards (the kernel prefers the exact
/// bind); every listener on the port when `ip` is None.
fn listening_inodes(port: u16, ip: Option<IpAddr>) -> BTreeSet<u64> {
    let tables = [procfs::net::tcp(), procfs::net::tcp6()];
    let listeners: Vec<(IpAddr, u64)> = tables
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.state == TcpState::Listen && e.local_address.port() == port)
        .map(|e| (e.local_address.ip().to_canonical(), e.inode))
        .collect();
    let Some(ip) = ip.map(|ip| ip.to_canonical()) else {
        return listeners.into_iter().map(|(_, inode)| inode).collect();
    };
    let exact: BTreeSet<u64> = listeners
        .iter()
        .filter(|(bound, _)| *bound == ip)
        .map(|(_, inode)| *inode)
        .collect();
    if !exact.is_empty() {
        return exact;
    }
    listeners
        .iter()
        // `::` takes IPv4 connections too, unless IPV6_V6ONLY (not visible here).
        .filter(|(bound, _)| bound.is_unspecified() && (bound.is_ipv6() || ip.is_ipv4()))
        .map(|(_, inode)| *inode)
        .collect()
}
