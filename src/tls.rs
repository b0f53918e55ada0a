//! The client's side of TLS to an https supervisor.
//!
//! tonic's own TLS trusts CA certificates only and reports a refused certificate in rustls's
//! words (`invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))`). This one also
//! trusts a certificate by pinning it (a self-signed server certificate, such as the one
//! `openssl req -x509` makes, given as the CA file), and says why a certificate was refused in
//! words that tell a person what to do.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{
    CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};

/// Where the words of a refused certificate point: both clients take the same CA file.
const CA_FILE_SETTING: &str = "gpuswapctl --ca-file, or ca_file in the gateway's configuration";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA file {path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    Empty { path: PathBuf },
    #[error("CA file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The TLS settings of a client of `host`: trusts what `ca_file` holds (as CAs, and each
/// certificate exactly as it is), offers HTTP/2.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = SupervisorVerifier::new(ca_file, &provider)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Invalid {
            path: ca_file.map(Path::to_owned).unwrap_or_default(),
            message: e.to_string(),
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Trusts a server certificate that is one of the CA file's certificates (pinned), or that
/// chains to one of them as a CA (the usual webpki checks: issuer, name, dates, usage).
/// Either way the handshake signature is checked against the certificate's key, so a server
/// that merely replays a pinned certificate without its key is refused.
#[derive(Debug)]
struct SupervisorVerifier {
    pinned: Vec<CertificateDer<'static>>,
    /// None without a CA file (or with one whose certificates cannot be CAs): then only
    /// a pinned certificate is trusted.
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SupervisorVerifier {
    fn new(ca_file: Option<&Path>, provider: &Arc<CryptoProvider>) -> Result<Self, TlsSetupError> {
        let algorithms = provider.signature_verification_algorithms;
        let Some(path) = ca_file else {
            return Ok(Self {
                pinned: Vec::new(),
                chain: None,
                algorithms,
            });
        };
        let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
            path: path.to_owned(),
            source,
        })?;
        let pinned = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsSetupError::Invalid {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        if pinned.is_empty() {
            return Err(TlsSetupError::Empty {
                path: path.to_owned(),
            });
        }
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(pinned.iter().cloned());
        let chain = if roots.is_empty() {
            None
        } else {
            let verifier =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| TlsSetupError::Invalid {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
            Some(verifier)
        };
        Ok(Self {
            pinned,
            chain,
            algorithms,
        })
    }
}

impl ServerCertVerifier for SupervisorVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pinned.iter().any(|pinned| pinned == end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        match &self.chain {
            Some(chain) => {
                chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            None => Err(CertificateError::UnknownIssuer.into()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS handshake with a supervisor that failed, in words that say what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandshakeError(pub String);

/// Says what a failed handshake with the supervisor at `host` means and what to do about it;
/// `ca_file` is the file the client was given.
pub fn explain(error: &rustls::Error, host: &str, ca_file: Option<&Path>) -> HandshakeError {
    let ca = ca_file.map(|p| p.display().to_string());
    let made = "the ca.pem in the supervisor's tls_dir if it made its own certificates";
    let words = match error {
        rustls::Error::InvalidCertificate(cause) => match (cause, &ca) {
            (CertificateError::UnknownIssuer, None) => format!(
                "the supervisor's certificate cannot be checked without a CA file: give the \
                 CA that signed it ({made}; or the certificate itself when it is self-signed) \
                 with {CA_FILE_SETTING}"
            ),
            (CertificateError::UnknownIssuer, Some(ca)) => format!(
                "the supervisor's certificate is not signed by a CA in {ca}, nor is it one of \
                 its certificates: give the CA that signed it ({made}), or the supervisor's \
                 own certificate to trust exactly that one"
            ),
            (
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                _,
            ) => {
                format!(
                    "the supervisor's certificate is not valid for {host:?} ({cause}): connect \
                     with a name or address the certificate lists, or add {host:?} to \
                     [supervisor] tls_names (the supervisor then makes a new certificate \
                     when it restarts) or to the subjectAltName of the certificate you made"
                )
            }
            (
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
                _,
            ) => format!(
                "the supervisor's certificate is outside its dates ({cause}): check the clocks \
                 of both machines, or make the supervisor a new certificate"
            ),
            (CertificateError::Other(other), _)
                if matches!(
                    other.0.downcast_ref::<webpki::Error>(),
                    Some(webpki::Error::CaUsedAsEndEntity)
                ) =>
            {
                "the supervisor's certificate is a CA certificate used as the server's own, \
                 which TLS refuses: give the client that very certificate (to trust exactly \
                 it), or make the server's certificate with basicConstraints=critical,CA:FALSE \
                 signed by the CA you give the client, or let gpuswap make its certificates \
                 (no tls_cert / tls_key)"
                    .to_owned()
            }
            (CertificateError::BadSignature, _) => format!(
                "the supervisor's certificate does not carry a valid signature of the CA \
                 that it names: give the CA that really signed it with {CA_FILE_SETTING}"
            ),
            _ => format!(
                "the supervisor's certificate was refused ({cause}): give the CA that signed \
                 it, or the certificate itself, with {CA_FILE_SETTING}"
            ),
        },
        rustls::Error::InvalidMessage(_) => format!(
            "the server at {host:?} does not speak TLS ({error}): is its supervisor.listen \
             an https:// address, and is this its port?"
        ),
        other => format!("TLS handshake with the supervisor failed: {other}"),
    };
    HandshakeError(words)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA and what it signs, as PEM and DER.
    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn make_ca(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn leaf(
        ca: &Ca,
        names: &[&str],
        shape: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        shape(&mut params);
        params.signed_by(&key, &ca.issuer).unwrap().der().clone()
    }

    /// The words a client given `ca_pem` (None: no CA file) says when the supervisor at
    /// `host` shows `cert`; None when it is trusted.
    fn outcome(ca_pem: Option<&str>, cert: &CertificateDer<'_>, host: &str) -> Option<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        if let Some(pem) = ca_pem {
            std::fs::write(&path, pem).unwrap();
        }
        let ca_file = ca_pem.map(|_| path.as_path());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = SupervisorVerifier::new(ca_file, &provider).unwrap();
        let name = ServerName::try_from(host.to_owned()).unwrap();
        match verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now()) {
            Ok(_) => None,
            Err(error) => Some(explain(&error, host, ca_file).0),
        }
    }

    #[track_caller]
    fn refused_with(outcome: Option<String>, words: &str) {
        let message = outcome.expect("refused");
        assert!(message.contains(words), "{message}");
    }

    #[test]
    fn a_certificate_signed_by_the_ca_is_trusted_for_its_names_only() {
        let ca = make_ca("test CA");
        let cert = leaf(&ca, &["localhost", "127.0.0.1"], |_| {});
        assert_eq!(outcome(Some(&ca.pem), &cert, "localhost"), None);
        assert_eq!(outcome(Some(&ca.pem), &cert, "127.0.0.1"), None);
        refused_with(
            outcome(Some(&ca.pem), &cert, "gpu-box.example"),
            "add \"gpu-box.example\" to [supervisor] tls_names",
        );
    }

    #[test]
    fn a_self_signed_certificate_given_as_the_ca_file_is_pinned() {
        // openssl req -x509: self-signed and a CA, which webpki refuses as a server's own.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(outcome(Some(&cert.pem()), cert.der(), "localhost"), None);
        // Pinned means exactly that certificate: another with the same names is not.
        let other = make_ca("other");
        let impostor = leaf(&other, &["localhost"], |_| {});
        refused_with(
            outcome(Some(&cert.pem()), &impostor, "localhost"),
            "is not signed by a CA in",
        );
    }

    #[test]
    fn every_refusal_says_what_to_do() {
        let ca = make_ca("test CA");
        let cert = leaf(&ca, &["localhost"], |_| {});
        refused_with(
            outcome(None, &cert, "localhost"),
            "cannot be checked without a CA file: give the CA that signed it",
        );
        refused_with(
            outcome(Some(&make_ca("another CA").pem), &cert, "localhost"),
            "give the CA that signed it",
        );
        let used_as_own = leaf(&ca, &["localhost"], |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        });
        refused_with(
            outcome(Some(&ca.pem), &used_as_own, "localhost"),
            "is a CA certificate used as the server's own",
        );
        let expired = leaf(&ca, &["localhost"], |p| {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        });
        refused_with(
            outcome(Some(&ca.pem), &expired, "localhost"),
            "is outside its dates",
        );
    }
}
