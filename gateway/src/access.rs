//! Who may do what: API keys (every model), named keys limited to some models, admin keys.
//!
//! A request is granted by the key it carries (`Authorization: Bearer K` or `x-api-key: K`).
//! Keys are compared in constant time, all of them every time, and never logged. A key
//! that may not use a model does not learn that it exists: the model is missing from its
//! `/v1/models`, and a request for it gets the same 404 as an unknown model.

use std::{net::IpAddr, sync::Arc};

use anyhow::Context as _;
use gpuswap::config::GatewayConfig;
use http::{HeaderMap, header};

use crate::catalog::ModelInfo;

/// One accepted key.
struct Key {
    secret: Box<[u8]>,
    /// Glob patterns over names and aliases; None: every model.
    models: Option<Arc<[String]>>,
    admin: bool,
}

/// The keys of the gateway (no `Debug`: it holds secrets).
pub struct Access {
    keys: Vec<Key>,
    /// Neither `api_keys` nor named keys: model traffic needs no key.
    open: bool,
    /// Some key is an admin key: admin actions need one (else loopback callers may).
    admin_keyed: bool,
}

/// What a request may do (cheap to clone: streams keep one).
#[derive(Clone, Debug)]
pub struct Grant {
    models: Option<Arc<[String]>>,
    admin: bool,
}

impl Grant {
    /// Every model, no admin (an open gateway's anonymous caller).
    pub const OPEN: Grant = Grant {
        models: None,
        admin: false,
    };

    /// True when the key may use `model` (one of its patterns matches its name or an alias).
    pub fn allows(&self, model: &ModelInfo) -> bool {
        self.allows_names(&model.name, model.aliases.iter().map(String::as_str))
    }

    /// True when one of the key's patterns matches `name` or one of `aliases`.
    pub fn allows_names<'n>(&self, name: &'n str, aliases: impl Iterator<Item = &'n str>) -> bool {
        let Some(patterns) = &self.models else {
            return true;
        };
        let names: Vec<&str> = std::iter::once(name).chain(aliases).collect();
        patterns
            .iter()
            .any(|p| names.iter().any(|n| glob_match(p, n)))
    }

    pub fn is_admin(&self) -> bool {
        self.admin
    }
}

impl Access {
    /// The keys of `config`, reading the `key_file`s now.
    pub fn from_config(config: &GatewayConfig) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for key in &config.api_keys {
            keys.push(Key {
                secret: key.as_bytes().into(),
                models: None,
                admin: false,
            });
        }
        for key in &config.admin_keys {
            keys.push(Key {
                secret: key.as_bytes().into(),
                models: None,
                admin: true,
            });
        }
        for (name, key) in &config.keys {
            let secret = key.secret().with_context(|| {
                format!("gateway.keys.{name}.key_file: cannot read the key file")
            })?;
            keys.push(Key {
                secret: secret.as_bytes().into(),
                models: key.models.as_deref().map(Arc::from),
                admin: key.admin,
            });
        }
        Ok(Self {
            keys,
            open: config.api_keys.is_empty() && config.keys.is_empty(),
            admin_keyed: !config.admin_keys.is_empty() || config.keys.values().any(|k| k.admin),
        })
    }

    /// Keys given directly (tests).
    pub fn with_api_keys(api_keys: &[&str]) -> Self {
        let config = GatewayConfig {
            api_keys: api_keys.iter().map(|k| k.to_string()).collect(),
            ..GatewayConfig::default()
        };
        // No key file to read: cannot fail.
        Self::from_config(&config).unwrap_or_else(|_| unreachable!())
    }

    /// What the request's key grants; None when a key is required and none given matches.
    pub fn grant(&self, headers: &HeaderMap) -> Option<Grant> {
        let bearer = headers.get(header::AUTHORIZATION).and_then(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        });
        let plain = headers.get("x-api-key").map(|v| v.as_bytes());
        // Every key is compared, whatever matched before: the time taken says nothing
        // about which key (or how much of one) was right.
        let mut matched: Option<&Key> = None;
        for given in [bearer, plain].into_iter().flatten() {
            for key in &self.keys {
                if gpuswap::auth::secrets_equal(given, &key.secret) && matched.is_none() {
                    matched = Some(key);
                }
            }
        }
        match matched {
            Some(key) => Some(Grant {
                models: key.models.clone(),
                admin: key.admin,
            }),
            None if self.open => Some(Grant::OPEN),
            None => None,
        }
    }

    /// Admin actions: an admin key, or, when no admin key is configured, a loopback caller.
    pub fn may_administer(&self, grant: &Grant, peer: Option<IpAddr>) -> bool {
        grant.admin || (!self.admin_keyed && peer.is_some_and(|ip| ip.to_canonical().is_loopback()))
    }
}

pub use gpuswap::glob_match;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use gpuswap::config::KeyConfig;

    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("llama-*", "llama-3.3-70b"));
        assert!(glob_match("*", ""));
        assert!(glob_match("q?en", "qwen"));
        assert!(glob_match("*-awq", "llama-70b-awq"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("llama-*", "qwen"));
        assert!(!glob_match("qwen", "qwen2"));
        assert!(!glob_match("a*b", "aXbY"));
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    fn model(name: &str, aliases: &[&str]) -> ModelInfo {
        ModelInfo::for_test(name, aliases)
    }

    #[test]
    fn api_keys_by_bearer_or_header() {
        let access = Access::with_api_keys(&["k1", "k2"]);
        let ok = |name: &str, value: &str| access.grant(&headers(name, value)).is_some();
        assert!(ok("authorization", "Bearer k2"));
        assert!(ok("authorization", "bearer k1"));
        assert!(ok("x-api-key", "k1"));
        assert!(!ok("authorization", "Bearer k3"));
        assert!(!ok("authorization", "k1"));
        assert!(!ok("x-api-key", "k"));
        assert!(access.grant(&HeaderMap::new()).is_none());
    }

    #[test]
    fn named_keys_limit_models_and_admin_needs_a_key_or_loopback() {
        let mut keys = BTreeMap::new();
        keys.insert(
            "alice".to_owned(),
            KeyConfig {
                key: Some("alice-key".into()),
                models: Some(vec!["llama-*".into(), "qwen".into()]),
                ..KeyConfig::default()
            },
        );
        let config = GatewayConfig {
            keys,
            admin_keys: vec!["root".into()],
            ..GatewayConfig::default()
        };
        let access = Access::from_config(&config).unwrap();
        let alice = access
            .grant(&headers("authorization", "Bearer alice-key"))
            .unwrap();
        assert!(alice.allows(&model("llama-70b", &[])));
        assert!(alice.allows(&model("big", &["qwen"])));
        assert!(!alice.allows(&model("mistral", &["m"])));
        let loopback = Some("127.0.0.1".parse().unwrap());
        assert!(!access.may_administer(&alice, loopback));
        let root = access.grant(&headers("x-api-key", "root")).unwrap();
        assert!(root.allows(&model("mistral", &[])));
        assert!(access.may_administer(&root, None));
        // Named keys close the gateway.
        assert!(access.grant(&HeaderMap::new()).is_none());

        // No admin key: loopback callers (v4, v6, v4-mapped v6) may, others may not.
        let open = Access::from_config(&GatewayConfig::default()).unwrap();
        let anyone = open.grant(&HeaderMap::new()).unwrap();
        for ip in ["127.0.0.1", "::1", "::ffff:127.0.0.1"] {
            assert!(
                open.may_administer(&anyone, Some(ip.parse().unwrap())),
                "{ip}"
            );
        }
        assert!(!open.may_administer(&anyone, Some("192.168.1.9".parse().unwrap())));
        assert!(!open.may_administer(&anyone, None));
    }
}
