//! Bearer tokens for remote (TLS) supervisor access.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

/// Client side: adds `authorization: Bearer <token>` to every call. A token from a file is
/// read again when the file changes, so a long-running client (a gateway) follows a token
/// rotation without a restart.
#[derive(Clone, Default)]
pub struct TokenInterceptor {
    source: Option<Arc<TokenSource>>,
}

enum TokenSource {
    Fixed(MetadataValue<Ascii>),
    File {
        path: PathBuf,
        /// The header, and the modification time and length of the file it was read from.
        read: Mutex<(FileStamp, MetadataValue<Ascii>)>,
    },
}

type FileStamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> FileStamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

fn bearer_header(token: &str) -> Result<MetadataValue<Ascii>, Status> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::invalid_argument("token is not valid ASCII"))
}

impl TokenInterceptor {
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let source = token
            .map(|t| bearer_header(t).map(|h| Arc::new(TokenSource::Fixed(h))))
            .transpose()?;
        Ok(Self { source })
    }

    /// The token of `path` (see [`read_token_file`]), read now and again whenever the file
    /// changes; a file that cannot be read then (being rewritten) keeps the last token.
    pub fn from_file(path: &Path) -> std::io::Result<Self> {
        let stamp = stamp(path);
        let header = bearer_header(&read_token_file(path)?).map_err(|status| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, status.message().to_owned())
        })?;
        Ok(Self {
            source: Some(Arc::new(TokenSource::File {
                path: path.to_owned(),
                read: Mutex::new((stamp, header)),
            })),
        })
    }

    fn header(&self) -> Option<MetadataValue<Ascii>> {
        match self.source.as_deref()? {
            TokenSource::Fixed(header) => Some(header.clone()),
            TokenSource::File { path, read } => {
                let mut read = read.lock().unwrap_or_else(|e| e.into_inner());
                let now = stamp(path);
                if now != read.0
                    && let Some(header) = read_token_file(path)
                        .ok()
                        .and_then(|token| bearer_header(&token).ok())
                {
                    *read = (now, header);
                }
                Some(read.1.clone())
            }
        }
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = self.header() {
            request.metadata_mut().insert("authorization", header);
        }
        Ok(request)
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn secrets_equal(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

/// Server side: accepts a request whose `authorization` header carries `Bearer <token>` for
/// one of the `accepted` tokens (several while a replaced token is still honoured).
pub fn check_bearer<T>(request: &Request<T>, accepted: &[&str]) -> Result<(), Status> {
    let given = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
    // Every token is compared, so the time taken does not tell which one matched.
    let matched = accepted.iter().fold(false, |matched, expected| {
        matched | secrets_equal(given.as_bytes(), expected.as_bytes())
    });
    if matched {
        Ok(())
    } else {
        Err(Status::unauthenticated("invalid bearer token"))
    }
}

/// Reads a token file: the first line, trimmed; empty files are an error.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("token file {} is empty", path.display()),
        ));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let mut interceptor = TokenInterceptor::from_file(&path).unwrap();
        let mut sent = || {
            let request = interceptor.call(Request::new(())).unwrap();
            request.metadata().get("authorization").unwrap().clone()
        };
        assert_eq!(sent(), "Bearer first");
        std::fs::write(&path, "second-and-longer\n").unwrap();
        assert_eq!(sent(), "Bearer second-and-longer");
        // Caught mid-rewrite (empty) or gone: the last token is kept.
        std::fs::write(&path, "").unwrap();
        assert_eq!(sent(), "Bearer second-and-longer");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(sent(), "Bearer second-and-longer");
        assert!(TokenInterceptor::from_file(&path).is_err());
    }

    #[test]
    fn bearer_check_accepts_only_the_exact_token() {
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(check_bearer(&ok, &["s3cret"]).is_ok());
        assert!(check_bearer(&ok, &["new-one", "s3cret"]).is_ok());
        assert!(check_bearer(&ok, &["s3cret2"]).is_err());
        assert!(check_bearer(&ok, &[]).is_err());
        assert!(check_bearer(&Request::new(()), &["s3cret"]).is_err());
        let mut wrong = Request::new(());
        wrong
            .metadata_mut()
            .insert("authorization", "Basic s3cret".parse().unwrap());
        assert_eq!(
            check_bearer(&wrong, &["s3cret"]).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
