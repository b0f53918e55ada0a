//! What an https supervisor serves with: its certificate and key (given, or made on first start
//! under `supervisor.tls_dir` from a CA of its own) and the bearer tokens it accepts (re-read on
//! reload, the replaced one honoured for `supervisor.token_grace`).

use std::{
    io::{Read, Write},
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use gpuswap::config::SupervisorConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::{Request, Status};

/// The files of `tls_dir`.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";
const SERVER_CERT: &str = "server.pem";
const SERVER_KEY: &str = "server-key.pem";
/// The names the server certificate was made for, one a line: a change makes a new one.
const SERVER_NAMES: &str = "server.names";
const TOKEN: &str = "token";

/// Mode of keys and the token: the supervisor's user alone.
const PRIVATE: u32 = 0o600;
/// Mode of certificates: public by nature (clients need ca.pem).
const PUBLIC: u32 = 0o644;

/// What the https listener needs.
pub struct TlsSetup {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub token_file: PathBuf,
    /// The directory of a CA and certificate the supervisor made itself (None: given ones).
    pub made_in: Option<PathBuf>,
}

/// Reads the configured certificate, key and token, or makes those that are not configured
/// under `tls_dir` (reusing what an earlier start made there). `listen` is the address the
/// supervisor binds, which the made certificate must name when it is a specific one.
pub fn prepare(config: &SupervisorConfig, listen: IpAddr) -> anyhow::Result<TlsSetup> {
    let dir = std::path::absolute(config.tls_dir()).unwrap_or_else(|_| config.tls_dir());
    let (cert, key, made_in) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert_path), Some(key_path)) => {
            let cert = std::fs::read(cert_path).with_context(|| {
                format!("supervisor.tls_cert: cannot read {}", cert_path.display())
            })?;
            let key = std::fs::read(key_path).with_context(|| {
                format!("supervisor.tls_key: cannot read {}", key_path.display())
            })?;
            (cert, key, None)
        }
        _ => {
            make_dir(&dir)?;
            let names = certificate_names(&config.tls_names, listen);
            let (cert, key) = server_certificate(&dir, &names)?;
            (cert, key, Some(dir.clone()))
        }
    };
    let token_file = match &config.token_file {
        Some(path) => path.clone(),
        None => {
            make_dir(&dir)?;
            let path = dir.join(TOKEN);
            if path.exists() {
                tighten(&path)?;
            } else {
                write_file(&path, format!("{}\n", random_hex(32)?).as_bytes(), PRIVATE)?;
                tracing::info!(token = %path.display(), "made a bearer token for https clients");
            }
            path
        }
    };
    if made_in.is_some() || config.token_file.is_none() {
        warn_if_volatile(&dir);
    }
    Ok(TlsSetup {
        cert,
        key,
        token_file,
        made_in,
    })
}

/// Files on a tmpfs (the default beside a state file under /run) are gone after a reboot, and
/// systemd removes the service's RuntimeDirectory when it stops: the supervisor then makes a
/// new CA and token, and every client's copies stop working.
fn warn_if_volatile(dir: &Path) {
    if nix::sys::statfs::statfs(dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    {
        tracing::warn!(
            tls_dir = %dir.display(),
            "the CA, certificate and token are on a tmpfs: a reboot (or systemd stopping the \
             service) removes them and clients need new copies; set supervisor.tls_dir to a \
             lasting directory such as /var/lib/gpuswap/tls"
        );
    }
}

/// The command a person runs on another machine to reach this supervisor, with copies of the
/// made CA and token.
pub fn client_command(made_in: &Path, token_file: &Path, listen: std::net::SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        host_name().unwrap_or_else(|| "HOST".into())
    } else {
        match listen.ip() {
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        }
    };
    format!(
        "gpuswapctl --endpoint https://{host}:{port} --ca-file {ca} --token-file {token} status",
        port = listen.port(),
        ca = made_in.join(CA_CERT).display(),
        token = token_file.display(),
    )
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("supervisor.tls_dir: cannot create {}", dir.display()))?;
        // Holds keys: listable by others (ca.pem is for everyone) but not writable.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("supervisor.tls_dir: cannot chmod {}", dir.display()))?;
    }
    Ok(())
}

/// The CA made on the first start, read back on later ones. The CA certificate is written
/// once and never again, so its fingerprint (which clients trust) stays the same.
fn certificate_authority(dir: &Path) -> anyhow::Result<(Issuer<'static, KeyPair>, bool)> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            tighten(&key_path)?;
            let pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("cannot read {}", key_path.display()))?;
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a private key", key_path.display()))?;
            Ok((Issuer::new(ca_params(&key), key), false))
        }
        (false, false) => {
            let key = KeyPair::generate().context("cannot make the CA's key")?;
            let cert = ca_params(&key)
                .self_signed(&key)
                .context("cannot make the CA certificate")?;
            // The key before the certificate: a certificate without its key would be a CA
            // that can sign nothing more.
            write_file(&key_path, key.serialize_pem().as_bytes(), PRIVATE)?;
            write_file(&cert_path, cert.pem().as_bytes(), PUBLIC)?;
            tracing::info!(ca = %cert_path.display(), "made a certificate authority for https clients");
            Ok((Issuer::new(ca_params(&key), key), true))
        }
        (true, false) => bail!(
            "supervisor.tls_dir: {} is there but not {}: put the CA's key back, or remove {} \
             to make a new CA (every client then needs the new one)",
            cert_path.display(),
            key_path.display(),
            cert_path.display()
        ),
        (false, true) => bail!(
            "supervisor.tls_dir: {} is there but not {}: put the CA certificate back (clients \
             have a copy), or remove {} to make a new CA (every client then needs the new one)",
            key_path.display(),
            cert_path.display(),
            key_path.display()
        ),
    }
}

/// The CA's parameters, derived from its key alone, so that a later start signs with the same
/// issuer name as the ca.pem made on the first one without parsing it back.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    // Bytes of the public key tell one supervisor's CA from another's in a client's store.
    let id: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("gpuswap supervisor CA {id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // rcgen's default dates (1975 to 4096): a CA nobody renews must not one day lock every
    // client out; a new CA is one `rm` and a restart away.
    params
}

/// The server's certificate and key: the ones made before when they name the same `names`,
/// else new ones signed by the CA.
fn server_certificate(dir: &Path, names: &[String]) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let (issuer, new_ca) = certificate_authority(dir)?;
    let (cert_path, key_path, names_path) = (
        dir.join(SERVER_CERT),
        dir.join(SERVER_KEY),
        dir.join(SERVER_NAMES),
    );
    let wanted = names.join("\n") + "\n";
    let made_for = std::fs::read_to_string(&names_path).ok();
    if !new_ca && made_for.as_deref() == Some(&wanted) && cert_path.exists() && key_path.exists() {
        tighten(&key_path)?;
        let cert = std::fs::read(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        let key = std::fs::read(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        return Ok((cert, key));
    }
    let key = KeyPair::generate().context("cannot make the server's key")?;
    let mut params = CertificateParams::new(names.to_vec())
        .context("supervisor.tls_names: a name cannot go in a certificate")?;
    params
        .distinguished_name
        .push(DnType::CommonName, names[0].clone());
    // An explicit CA:FALSE: the certificate is the server's own, never an issuer.
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(&key, &issuer)
        .context("cannot sign the server certificate")?;
    write_file(&key_path, key.serialize_pem().as_bytes(), PRIVATE)?;
    write_file(&cert_path, cert.pem().as_bytes(), PUBLIC)?;
    // Last: a start cut short before it makes the certificate again.
    write_file(&names_path, wanted.as_bytes(), PUBLIC)?;
    tracing::info!(cert = %cert_path.display(), names = %names.join(", "), "made the server certificate");
    Ok((cert.pem().into_bytes(), key.serialize_pem().into_bytes()))
}

/// The names a made certificate is valid for: the host's name, localhost, the addresses of the
/// host's interfaces (and the listen address), and the configured `tls_names`; the host's name
/// first (it is the certificate's common name).
fn certificate_names(extra: &[String], listen: IpAddr) -> Vec<String> {
    let mut names: Vec<String> = host_name().into_iter().collect();
    names.push("localhost".into());
    let mut addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|interfaces| {
            interfaces
                .filter_map(|interface| interface.address)
                .filter_map(|address| {
                    address
                        .as_sockaddr_in()
                        .map(|a| IpAddr::V4(a.ip()))
                        .or_else(|| address.as_sockaddr_in6().map(|a| IpAddr::V6(a.ip())))
                })
                // Link-local IPv6 addresses need a zone, which no URL or certificate carries.
                .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
                .collect()
        })
        .unwrap_or_default();
    if !listen.is_unspecified() {
        addresses.push(listen);
    }
    addresses.sort();
    names.extend(addresses.into_iter().map(|ip| ip.to_string()));
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|name| seen.insert(name.clone()));
    names
}

fn host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
}

/// Writes `contents` to `path` with `mode` from the first byte (never briefly readable by
/// others), atomically: a crash leaves the old file or the new one, not half of one.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".new");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temporary)?;
        // The umask may have taken bits off; the mode is what it is meant to be, no more.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

/// Takes group and other permissions off a key or token someone opened up.
fn tighten(path: &Path) -> anyhow::Result<()> {
    let mode = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(PRIVATE))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        tracing::warn!(
            file = %path.display(),
            "a secret was readable by others (mode {:o}): made it 0600",
            mode & 0o7777
        );
    }
    Ok(())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut random = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .context("cannot read /dev/urandom for a token")?;
    Ok(random.iter().map(|b| format!("{b:02x}")).collect())
}

/// The bearer tokens an https supervisor accepts: the token file's, and for `grace` after a
/// reload picked up a new one, the one it replaced.
pub struct Tokens {
    path: PathBuf,
    grace: Duration,
    accepted: Mutex<Accepted>,
}

struct Accepted {
    current: String,
    replaced: Option<(String, Instant)>,
}

impl Tokens {
    pub fn load(path: &Path, grace: Duration) -> anyhow::Result<Self> {
        let current = read_token(path)?;
        Ok(Self {
            path: path.to_owned(),
            grace,
            accepted: Mutex::new(Accepted {
                current,
                replaced: None,
            }),
        })
    }

    /// Reads the token file again; a new token replaces the current one, which keeps working
    /// for the grace period. An unreadable or empty file changes nothing.
    pub fn reload(&self) -> anyhow::Result<()> {
        let token = read_token(&self.path)?;
        let mut accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        if token != accepted.current {
            let old = std::mem::replace(&mut accepted.current, token);
            accepted.replaced = Some((old, Instant::now() + self.grace));
            tracing::info!(
                token_file = %self.path.display(),
                grace = ?self.grace,
                "a new bearer token: the previous one works until the grace period ends"
            );
        }
        Ok(())
    }

    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let accepted = self.accepted.lock().unwrap_or_else(|e| e.into_inner());
        match &accepted.replaced {
            Some((old, until)) if Instant::now() < *until => {
                gpuswap::auth::check_bearer(request, &[&accepted.current, old])
            }
            _ => gpuswap::auth::check_bearer(request, &[&accepted.current]),
        }
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    gpuswap::auth::read_token_file(path)
        .with_context(|| format!("supervisor.token_file: cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_files_are_reused_and_the_certificate_follows_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SupervisorConfig {
            tls_dir: Some(dir.path().join("tls")),
            ..Default::default()
        };
        let listen = IpAddr::from([127, 0, 0, 1]);
        let read = |name: &str| std::fs::read(dir.path().join("tls").join(name)).unwrap();
        let first = prepare(&config, listen).unwrap();
        assert_eq!(
            first.made_in.as_deref(),
            Some(dir.path().join("tls").as_path())
        );
        assert_eq!(first.token_file, dir.path().join("tls/token"));
        let (ca, server, token) = (read(CA_CERT), read(SERVER_CERT), read(TOKEN));
        assert_eq!(first.cert, server);

        let again = prepare(&config, listen).unwrap();
        assert_eq!(again.cert, server, "same names: the same certificate");
        assert_eq!((read(CA_CERT), read(TOKEN)), (ca.clone(), token.clone()));

        config.tls_names = vec!["gpu1.example.com".into()];
        let renamed = prepare(&config, listen).unwrap();
        assert_ne!(renamed.cert, server, "a new name: a new certificate");
        assert_eq!(read(CA_CERT), ca, "by the same CA");
        assert!(
            std::fs::read_to_string(dir.path().join("tls").join(SERVER_NAMES))
                .unwrap()
                .contains("gpu1.example.com")
        );
        // No temporary file is left behind.
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("tls"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                CA_KEY,
                CA_CERT,
                SERVER_KEY,
                SERVER_NAMES,
                SERVER_CERT,
                TOKEN
            ]
        );

        // A CA certificate without its key is not silently replaced: clients trust it.
        std::fs::remove_file(dir.path().join("tls").join(CA_KEY)).unwrap();
        let error = format!("{:#}", prepare(&config, listen).err().expect("refused"));
        assert!(
            error.contains("ca-key.pem") && error.contains("put the CA's key back"),
            "{error}"
        );
    }

    #[test]
    fn a_reloaded_token_replaces_the_old_one_which_works_for_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let with = |token: &str| {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            request
        };
        let tokens = Tokens::load(&path, Duration::from_secs(3600)).unwrap();
        assert!(tokens.check(&with("first")).is_ok());
        std::fs::write(&path, "second\n").unwrap();
        tokens.reload().unwrap();
        assert!(tokens.check(&with("second")).is_ok());
        assert!(
            tokens.check(&with("first")).is_ok(),
            "within the grace period"
        );
        assert!(tokens.check(&with("third")).is_err());
        // An empty file is refused and changes nothing.
        std::fs::write(&path, "\n").unwrap();
        assert!(tokens.reload().is_err());
        assert!(tokens.check(&with("second")).is_ok());

        let no_grace = Tokens::load(&path.with_file_name("other"), Duration::ZERO);
        assert!(no_grace.is_err(), "a missing token file");
        std::fs::write(&path, "first\n").unwrap();
        let tokens = Tokens::load(&path, Duration::ZERO).unwrap();
        std::fs::write(&path, "second\n").unwrap();
        tokens.reload().unwrap();
        assert!(
            tokens.check(&with("first")).is_err(),
            "no grace: gone at once"
        );
        assert!(tokens.check(&with("second")).is_ok());
    }
}
