//! The value parsers: durations, byte sizes and file modes, as text or number, with the
//! serde forms the sections' keys use.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::{ConfigError, invalid};

/// The longest duration a setting may take. Deadlines are computed as now + duration, which
/// overflows (a panic) a few hundred billion years out; anything past a century is a typo.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // humantime's "100y"

/// Refuses a duration longer than [`MAX_DURATION`], naming its key.
pub(super) fn check_duration(key: impl Into<String>, value: Duration) -> Result<(), ConfigError> {
    if value > MAX_DURATION {
        return Err(invalid(
            key,
            format!(
                "{} is too long (at most 100 years)",
                humantime::format_duration(value)
            ),
        ));
    }
    Ok(())
}

/// Refuses a zero duration (a timeout or an interval that must pass), naming its key.
pub(super) fn check_positive(key: impl Into<String>, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(key, "must be more than 0s"));
    }
    Ok(())
}

/// Parses an octal file mode ("0660", "660", "0o660").
pub fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.trim_start_matches("0o");
    u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
}

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {text:?}")]
pub struct InvalidDuration {
    text: String,
    source: humantime::DurationError,
}

/// Parses "10m", "5s", "1h 30m", "250ms"; a bare number means seconds.
pub fn parse_duration(text: &str) -> Result<Duration, InvalidDuration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|source| InvalidDuration {
        text: text.to_owned(),
        source,
    })
}

/// A size for people: "40 GiB", "1.5 GiB", "512 MiB", "100 B".
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            return if whole * size == bytes {
                format!("{whole} {unit}")
            } else {
                format!("{:.1} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} B")
}

#[derive(Debug, thiserror::Error)]
pub enum InvalidSize {
    #[error("invalid size {0:?}: expected a number with an optional unit")]
    NotANumber(String),
    #[error("invalid size {text:?}: unknown unit {unit:?}")]
    UnknownUnit { text: String, unit: String },
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
}

/// Parses "32MiB", "512KB", "1048576".
pub fn parse_byte_size(text: &str) -> Result<u64, InvalidSize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| InvalidSize::NotANumber(text.to_owned()))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(InvalidSize::UnknownUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| InvalidSize::TooLarge(text.to_owned()))
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum TextOrNumber {
    Text(String),
    Number(u64),
}

/// A deserializer's error says one line: the error with its sources.
fn de_error<E: serde::de::Error>(error: &dyn std::error::Error) -> E {
    E::custom(crate::error_chain(error))
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match TextOrNumber::deserialize(d)? {
        TextOrNumber::Text(t) => parse_duration(&t).map_err(|e| de_error(&e)),
        TextOrNumber::Number(n) => Ok(Duration::from_secs(n)),
    }
}

pub(super) fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub(super) fn opt_byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    byte_size(d).map(Some)
}

pub(super) fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match TextOrNumber::deserialize(d)? {
        TextOrNumber::Text(t) => parse_byte_size(&t).map_err(|e| de_error(&e)),
        TextOrNumber::Number(n) => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, tests::error_of};

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_byte_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_byte_size("10").unwrap(), 10);
        assert!(parse_byte_size("10XB").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        let error = parse_duration("soon").unwrap_err();
        assert!(std::error::Error::source(&error).is_some(), "{error:?}");
        // A file's bad duration says which and why, under the key.
        let e = error_of("[supervisor]\ndrain_timeout = \"soon\"\n");
        assert!(
            e.contains("invalid duration \"soon\": ") && e.contains("supervisor.drain_timeout"),
            "{e}"
        );
    }

    #[test]
    fn absurd_durations_are_refused_with_their_key() {
        let model = "[models.a]\nkind = \"vllm\"\ncommand = [\"x\"]\nport = 1\n";
        for (extra, key) in [
            (
                "[supervisor]\ndrain_timeout = \"300000000000y\"\n",
                "supervisor.drain_timeout",
            ),
            ("[gateway]\nidle_ttl = \"101y\"\n", "gateway.idle_ttl"),
            ("", "models.\"a\".stop_timeout"),
        ] {
            let mut text = format!("{extra}{model}");
            if extra.is_empty() {
                text.push_str("stop_timeout = \"1000000y\"\n");
            }
            let error = Config::from_toml(&text).expect_err(key).to_string();
            assert!(error.contains(key), "{error}");
        }
        let century = "[supervisor]\ndrain_timeout = \"100y\"\n";
        assert!(Config::from_toml(century).is_ok());
    }
}
