//! `[gateway.keys.NAME]`: named API keys, each limited to some models, some admin.

use std::{fmt, path::PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// One named key of `[gateway.keys.NAME]`.
#[derive(Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// A file whose first line is the key (kept out of the configuration file).
    pub key_file: Option<PathBuf>,
    pub key: Option<String>,
    /// Glob patterns (`*`, `?`) over model names and aliases; unset: every model.
    pub models: Option<Vec<String>>,
    /// May load, unload and read logs.
    #[serde(default)]
    pub admin: bool,
}

/// Never prints the key itself.
impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("key_file", &self.key_file)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("models", &self.models)
            .field("admin", &self.admin)
            .finish()
    }
}

impl KeyConfig {
    /// The key: `key`, or the first line of `key_file` (read now).
    pub fn secret(&self) -> std::io::Result<String> {
        match (&self.key, &self.key_file) {
            (Some(key), _) => Ok(key.clone()),
            (None, Some(path)) => crate::auth::read_token_file(path),
            (None, None) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither key nor key_file is set",
            )),
        }
    }

    /// Checks the key named `name`: one of `key` and `key_file`, and no empty model pattern.
    pub(super) fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let field = |k: &str| format!("gateway.keys.{name}.{k}");
        match (&self.key, &self.key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(field("key"), "set key or key_file, not both"));
            }
            (None, None) => return Err(invalid(field("key"), "set key or key_file")),
            (Some(k), None) if k.trim().is_empty() => {
                return Err(invalid(field("key"), "must not be empty"));
            }
            (None, Some(path)) if !path.is_absolute() => {
                return Err(invalid(field("key_file"), "must be an absolute path"));
            }
            _ => {}
        }
        if let Some(models) = &self.models
            && models.iter().any(|m| m.trim().is_empty())
        {
            return Err(invalid(field("models"), "patterns must not be empty"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::assert_refused_naming};

    #[test]
    fn gateway_keys_are_validated_and_never_printed() {
        let c = Config::from_toml(
            "[gateway]\nadmin_keys = [\"root\"]\n[gateway.keys.alice]\nkey = \"s3cret\"\nmodels = [\"llama-*\"]\n",
        )
        .unwrap();
        let alice = &c.gateway.keys["alice"];
        assert_eq!(alice.secret().unwrap(), "s3cret");
        assert_eq!(alice.models.as_deref(), Some(&["llama-*".to_owned()][..]));
        assert!(!alice.admin);
        assert!(!format!("{alice:?}").contains("s3cret"));
        assert_refused_naming([
            (
                "[gateway.keys.bob]\nmodels = [\"a\"]\n",
                "gateway.keys.bob.key",
            ),
            (
                "[gateway.keys.bob]\nkey = \"k\"\nkey_file = \"/k\"\n",
                "gateway.keys.bob.key",
            ),
            (
                "[gateway.keys.bob]\nkey_file = \"k\"\n",
                "gateway.keys.bob.key_file",
            ),
            (
                "[gateway.keys.bob]\nkey = \"k\"\nmodels = [\"\"]\n",
                "gateway.keys.bob.models",
            ),
            ("[gateway.keys.bob]\nkey = \"k\"\nadmn = true\n", "admn"),
            ("[gateway]\nadmin_keys = [\" \"]\n", "gateway.admin_keys"),
        ]);
    }
}
