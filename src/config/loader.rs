//! The layers of a daemon's configuration: defaults, the file, `GPUSWAP__*` environment
//! overrides, the daemon's flags; then validation, at start and on every reload. The flags
//! themselves are [`DaemonArgs`], which every daemon's command line flattens.

use std::path::PathBuf;

use clap::{CommandFactory as _, FromArgMatches as _};

use super::{Config, ConfigError, LogFormat};

/// A daemon's command-line flags: the last layer, above the file and the environment. They
/// are applied before [`Config::validate`], so a flag is checked like the key it sets (an
/// error names both), and again on every reload, so a flag is kept.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    /// gpuswap-supervisor's `--listen`: `supervisor.listen`.
    pub supervisor_listen: Option<String>,
    /// gpuswap-gateway's `--listen`: `gateway.listen`.
    pub gateway_listen: Option<String>,
    /// gpuswap-epp's `--listen`: `epp.listen`.
    pub epp_listen: Option<String>,
    /// `--log-format`: `telemetry.log_format`.
    pub log_format: Option<LogFormat>,
}

/// The gpuswap daemons: each one's `--listen` sets its own section's `listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Daemon {
    Supervisor,
    Gateway,
    Epp,
}

impl Daemon {
    /// The program's name (its `--version`, the start of its errors).
    pub fn program(self) -> &'static str {
        match self {
            Daemon::Supervisor => "gpuswap-supervisor",
            Daemon::Gateway => "gpuswap-gateway",
            Daemon::Epp => "gpuswap-epp",
        }
    }
}

/// The flags every gpuswap daemon takes: the configuration file and the [`Flags`] layer on
/// top of it. The whole command line of a daemon without flags of its own
/// ([`DaemonArgs::parse_for`]); flattened (`#[command(flatten)]`) into the others'.
#[derive(clap::Parser, Clone, Debug)]
#[command(version)]
pub struct DaemonArgs {
    /// The configuration file (TOML).
    #[arg(long, env = "GPUSWAP_CONFIG")]
    pub config: PathBuf,
    /// Address to listen on: overrides the daemon's own listen key (supervisor.listen:
    /// unix:///path.sock or https://ip:port; gateway.listen, epp.listen: ip:port), and is
    /// checked like it.
    #[arg(long)]
    pub listen: Option<String>,
    /// Log format on stderr, text or json (overrides telemetry.log_format and GPUSWAP_LOG_FORMAT).
    #[arg(long)]
    pub log_format: Option<LogFormat>,
}

impl DaemonArgs {
    /// Parses the command line of `daemon`, which takes no flags of its own; `about` opens
    /// its `--help`. Exits as clap does on `--help`, `--version` and errors.
    pub fn parse_for(daemon: Daemon, about: &'static str) -> Self {
        let matches = Self::command_for(daemon, about).get_matches();
        Self::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }

    fn command_for(daemon: Daemon, about: &'static str) -> clap::Command {
        Self::command().name(daemon.program()).about(about)
    }

    /// Where `daemon`'s configuration comes from: the file, these flags on top.
    pub fn loader(&self, daemon: Daemon) -> ConfigLoader {
        let listen = |of: Daemon| self.listen.clone().filter(|_| of == daemon);
        let flags = Flags {
            supervisor_listen: listen(Daemon::Supervisor),
            gateway_listen: listen(Daemon::Gateway),
            epp_listen: listen(Daemon::Epp),
            log_format: self.log_format,
        };
        ConfigLoader::new(&self.config, flags)
    }
}

impl Flags {
    /// Sets the keys that flags were given for; returns each key with its flag.
    fn apply(&self, config: &mut Config) -> Vec<(&'static str, &'static str)> {
        let mut set = Vec::new();
        let mut listen = |flag: &Option<String>, key, field: &mut String| {
            if let Some(value) = flag {
                field.clone_from(value);
                set.push((key, "--listen"));
            }
        };
        listen(
            &self.supervisor_listen,
            "supervisor.listen",
            &mut config.supervisor.listen,
        );
        listen(
            &self.gateway_listen,
            "gateway.listen",
            &mut config.gateway.listen,
        );
        listen(&self.epp_listen, "epp.listen", &mut config.epp.listen);
        if let Some(format) = self.log_format {
            config.telemetry.log_format = Some(format);
            set.push(("telemetry.log_format", "--log-format"));
        }
        set
    }
}

/// Where a daemon's configuration comes from: its file and its flags. A daemon that reloads
/// keeps it, so that the reloaded file gets the same flags on top.
#[derive(Clone, Debug)]
pub struct ConfigLoader {
    pub path: PathBuf,
    pub flags: Flags,
}

impl ConfigLoader {
    pub fn new(path: impl Into<PathBuf>, flags: Flags) -> Self {
        Self {
            path: path.into(),
            flags,
        }
    }

    /// Defaults, the file, `GPUSWAP__*` environment overrides, the flags; then validates.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = Config::read(&self.path)?;
        let flagged = self.flags.apply(&mut config);
        config.validate().map_err(|error| match error {
            ConfigError::Invalid { key, message } => {
                match flagged.iter().find(|(flagged, _)| *flagged == key) {
                    Some((_, flag)) => ConfigError::Invalid {
                        key: format!("{key} (set by {flag})"),
                        message,
                    },
                    None => ConfigError::Invalid { key, message },
                }
            }
            other => other,
        })?;
        Ok(config)
    }

    /// `load` for a daemon's start: an invalid configuration is said on stderr (the error
    /// and its sources, after `program`) and ends the process with [`EXIT_BAD_CONFIG`], the
    /// status `--check` uses, so that a service manager can tell it from a crash.
    pub fn load_or_exit(&self, program: &str) -> Config {
        self.load().unwrap_or_else(|error| {
            eprintln!("{program}: {}", crate::error_chain(&error));
            std::process::exit(EXIT_BAD_CONFIG.into())
        })
    }
}

/// The exit status of every gpuswap daemon whose configuration is invalid.
pub const EXIT_BAD_CONFIG: u8 = 2;

impl Config {
    /// Loads defaults, then `path`, then `GPUSWAP__*` environment overrides, and validates
    /// (a daemon's flags too: [`ConfigLoader`]).
    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        ConfigLoader::new(path, Flags::default()).load()
    }

    /// The layers below the flags, not validated.
    fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: path.to_owned(),
            source: Box::new(source),
        };
        if !path.exists() {
            return Err(ConfigError::NotFound {
                path: path.to_owned(),
            });
        }
        let layered = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("GPUSWAP")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("gateway.api_keys")
                    .with_list_parse_key("gateway.admin_keys")
                    .with_list_parse_key("gateway.preload")
                    .with_list_parse_key("supervisor.tls_names")
                    .with_list_parse_key("gateway.cors_origins")
                    .with_list_parse_key("gateway.allowed_hosts")
                    .try_parsing(true),
            )
            .build()
            .map_err(load_err)?;
        layered.try_deserialize().map_err(load_err)
    }

    /// Parses TOML text alone (no environment), then validates.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: "<inline>".into(),
            source: Box::new(source),
        };
        let config: Config = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()
            .and_then(|layered| layered.try_deserialize())
            .map_err(load_err)?;
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// A daemon's command line, as each main.rs declares it.
    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        daemon: DaemonArgs,
    }

    #[test]
    fn the_daemon_flags_set_the_keys_of_the_daemon_that_parsed_them() {
        let args = Args::try_parse_from([
            "gpuswap-x",
            "--config",
            "/etc/gpuswap/gpuswap.toml",
            "--listen",
            "127.0.0.1:9000",
            "--log-format",
            "JSON",
        ])
        .unwrap();
        let loader = args.daemon.loader(Daemon::Epp);
        assert_eq!(loader.path, PathBuf::from("/etc/gpuswap/gpuswap.toml"));
        assert_eq!(
            loader.flags,
            Flags {
                epp_listen: Some("127.0.0.1:9000".into()),
                log_format: Some(LogFormat::Json),
                ..Flags::default()
            }
        );
        let loader = args.daemon.loader(Daemon::Supervisor);
        assert_eq!(
            loader.flags.supervisor_listen.as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            (loader.flags.gateway_listen, loader.flags.epp_listen),
            (None, None)
        );
        let bare = Args::try_parse_from(["gpuswap-x", "--config", "c.toml"]).unwrap();
        assert_eq!(bare.daemon.loader(Daemon::Gateway).flags, Flags::default());
        assert!(
            Args::try_parse_from(["gpuswap-x", "--config", "c", "--log-format", "yaml"]).is_err()
        );
    }

    #[test]
    fn a_daemon_without_flags_of_its_own_is_named_and_described_on_its_command_line() {
        let mut command = DaemonArgs::command_for(Daemon::Epp, "Picks the box.");
        assert_eq!(
            command.render_version(),
            format!("gpuswap-epp {}\n", env!("CARGO_PKG_VERSION"))
        );
        let help = command.render_help().to_string();
        assert!(
            help.starts_with("Picks the box.") && help.contains("--log-format"),
            "{help}"
        );
        let matches = command
            .try_get_matches_from([
                "gpuswap-epp",
                "--config",
                "c.toml",
                "--listen",
                "127.0.0.1:1",
            ])
            .unwrap();
        let args = DaemonArgs::from_arg_matches(&matches).unwrap();
        assert_eq!(
            args.loader(Daemon::Epp).flags.epp_listen.as_deref(),
            Some("127.0.0.1:1")
        );
    }

    #[test]
    fn flags_are_a_layer_under_validation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpuswap.toml");
        std::fs::write(
            &path,
            "[gateway]\nlisten = \"127.0.0.1:8002\"\n[telemetry]\nlog_format = \"json\"\n",
        )
        .unwrap();
        let flags = Flags {
            gateway_listen: Some("127.0.0.1:9000".into()),
            log_format: Some(LogFormat::Text),
            ..Flags::default()
        };
        let c = ConfigLoader::new(&path, flags).load().unwrap();
        assert_eq!(c.gateway.listen, "127.0.0.1:9000");
        assert_eq!(c.telemetry.log_format, Some(LogFormat::Text));

        // A flag is checked like its key, and the error names both.
        let flags = Flags {
            gateway_listen: Some("localhost:9000".into()),
            ..Flags::default()
        };
        let e = ConfigLoader::new(&path, flags)
            .load()
            .unwrap_err()
            .to_string();
        assert!(e.contains("gateway.listen (set by --listen)"), "{e}");

        // The file's value is not checked when a flag replaces it.
        std::fs::write(&path, "[supervisor]\nlisten = \"nowhere\"\n").unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("supervisor.listen") && !e.contains("--listen"),
            "{e}"
        );
        let flags = Flags {
            supervisor_listen: Some("unix:///run/gpuswap/s.sock".into()),
            ..Flags::default()
        };
        let c = ConfigLoader::new(&path, flags).load().unwrap();
        assert_eq!(c.supervisor.listen, "unix:///run/gpuswap/s.sock");
    }
}
