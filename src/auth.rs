//! Bearer tokens for remote (TLS) supervisor access.

use tonic::{Request, Status, metadata::MetadataValue, service::Interceptor};

/// Client side: adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Default)]
pub struct TokenInterceptor {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl TokenInterceptor {
    pub fn new(token: Option<&str>) -> Result<Self, Status> {
        let header = token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| Status::invalid_argument("token is not valid ASCII"))
            })
            .transpose()?;
        Ok(Self { header })
    }
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
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
