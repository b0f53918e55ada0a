//! Who may call from a browser: CORS by `gateway.cors_origins`, and the
//! `Host` header by `gateway.allowed_hosts` (a DNS-rebinding page reaches the
//! gateway under its own host name).

use http::{HeaderValue, uri::Authority};

/// The browser-facing access rules.
#[derive(Debug, Default)]
pub struct BrowserAccess {
    /// `["*"]` was written: any origin, answered with `*`.
    any_origin: bool,
    /// Lower-cased origins, as browsers send them.
    origins: Vec<String>,
    /// Lower-cased hosts; a port, when given, must match too.
    hosts: Vec<(String, Option<u16>)>,
}

impl BrowserAccess {
    /// From the validated `cors_origins` and `allowed_hosts`.
    pub fn new(cors_origins: &[String], allowed_hosts: &[String]) -> Self {
        let any_origin = cors_origins.iter().any(|o| o == "*");
        let origins = cors_origins
            .iter()
            .filter(|o| *o != "*")
            .map(|o| o.to_ascii_lowercase())
            .collect();
        let hosts = allowed_hosts
            .iter()
            .filter_map(|h| Authority::try_from(h.as_str()).ok())
            .map(|a| (a.host().to_ascii_lowercase(), a.port_u16()))
            .collect();
        Self {
            any_origin,
            origins,
            hosts,
        }
    }

    /// The `Access-Control-Allow-Origin` for a request from `origin`; None:
    /// the origin is not allowed.
    pub fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        if self.any_origin {
            return Some(HeaderValue::from_static("*"));
        }
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }

    /// Whether a request with this `Host` header is served (any, when no
    /// hosts are listed; none without a Host header when some are).
    pub fn host_allowed(&self, host: Option<&HeaderValue>) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let Some(authority) = host
            .and_then(|h| h.to_str().ok())
            .and_then(|h| Authority::try_from(h).ok())
        else {
            return false;
        };
        let name = authority.host();
        let port = authority.port_u16();
        self.hosts.iter().any(|(allowed, allowed_port)| {
            allowed.eq_ignore_ascii_case(name) && allowed_port.is_none_or(|p| Some(p) == port)
        })
    }
}

/// True when `origin` is the origin the request was sent to (its `Host`): a
/// page the gateway served itself. A DNS-rebinding page is such a page too,
/// under its own name: `allowed_hosts` is what refuses it.
pub fn same_origin(origin: &HeaderValue, host: Option<&HeaderValue>) -> bool {
    let (Ok(origin), Some(Ok(host))) = (origin.to_str(), host.map(HeaderValue::to_str)) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &'static str) -> HeaderValue {
        HeaderValue::from_static(text)
    }

    #[test]
    fn origins_are_allowed_only_when_listed() {
        let none = BrowserAccess::new(&[], &[]);
        assert_eq!(none.allow_origin(&value("http://evil.example")), None);
        let listed = BrowserAccess::new(&["http://WebUI.lan:3000".into()], &[]);
        assert_eq!(
            listed.allow_origin(&value("http://webui.lan:3000")),
            Some(value("http://webui.lan:3000"))
        );
        assert_eq!(listed.allow_origin(&value("http://webui.lan")), None);
        assert_eq!(listed.allow_origin(&value("null")), None);
        let any = BrowserAccess::new(&["*".into()], &[]);
        assert_eq!(any.allow_origin(&value("null")), Some(value("*")));
    }

    #[test]
    fn a_page_of_the_host_it_calls_is_same_origin() {
        let host = value("gpu.lan:8002");
        assert!(same_origin(&value("http://GPU.lan:8002"), Some(&host)));
        assert!(!same_origin(&value("http://gpu.lan:8003"), Some(&host)));
        assert!(!same_origin(&value("http://evil.example"), Some(&host)));
        assert!(!same_origin(&value("null"), Some(&host)));
        assert!(!same_origin(&value("http://gpu.lan:8002"), None));
    }

    #[test]
    fn hosts_match_by_name_and_listed_port() {
        let open = BrowserAccess::new(&[], &[]);
        assert!(open.host_allowed(None));
        assert!(open.host_allowed(Some(&value("anything:1"))));
        let hosts = BrowserAccess::new(
            &[],
            &["localhost".into(), "gpu.lan:8002".into(), "[::1]".into()],
        );
        assert!(hosts.host_allowed(Some(&value("LOCALHOST:8002"))));
        assert!(hosts.host_allowed(Some(&value("localhost"))));
        assert!(hosts.host_allowed(Some(&value("gpu.lan:8002"))));
        assert!(!hosts.host_allowed(Some(&value("gpu.lan:9000"))));
        assert!(!hosts.host_allowed(Some(&value("gpu.lan"))));
        assert!(hosts.host_allowed(Some(&value("[::1]:8002"))));
        assert!(!hosts.host_allowed(Some(&value("rebound.evil.example:8002"))));
        assert!(!hosts.host_allowed(None));
    }
}
