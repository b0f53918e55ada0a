//! `[telemetry]`: the log format and the trace exporter.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer};

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// None: `GPUSWAP_LOG_FORMAT`, else text.
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC endpoint for traces; `OTEL_EXPORTER_OTLP_ENDPOINT` also works.
    pub otlp_endpoint: Option<String>,
}

/// How a daemon writes its log lines on stderr (`[telemetry] log_format`, `--log-format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a log format (expected \"text\" or \"json\")")]
pub struct UnknownLogFormat(String);

/// Either case ("JSON" too), as the environment variable always took it.
impl FromStr for LogFormat {
    type Err = UnknownLogFormat;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(UnknownLogFormat(text.to_owned())),
        }
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, tests::error_of};

    #[test]
    fn log_formats_parse_in_either_case_and_bad_ones_name_the_key() {
        assert_eq!("JSON".parse::<LogFormat>().unwrap(), LogFormat::Json);
        assert_eq!(" text ".parse::<LogFormat>().unwrap(), LogFormat::Text);
        let c = Config::from_toml("[telemetry]\nlog_format = \"Json\"\n").unwrap();
        assert_eq!(c.telemetry.log_format, Some(LogFormat::Json));
        let e = error_of("[telemetry]\nlog_format = \"yaml\"\n");
        assert!(
            e.contains("telemetry.log_format") && e.contains("\"yaml\" is not a log format"),
            "{e}"
        );
    }
}
