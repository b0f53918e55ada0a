//! gpuswapctl: the operator's command line over the supervisor's gRPC API.

mod activate;
mod exit;
mod logs;
mod output;
mod reload;
mod status;
mod watch;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use gpuswap::{ClientOptions, Endpoint, SupervisorClient};

use crate::{
    exit::{Code, Failure},
    output::Style,
};

const DEFAULT_ENDPOINT: &str = "unix:///run/gpuswap/supervisor.sock";

#[derive(Parser)]
#[command(
    name = "gpuswapctl",
    version,
    about = "Operate a gpuswap supervisor: see, start, stop and follow its models",
    after_help = exit::HELP
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct GlobalArgs {
    /// The supervisor: unix:///path/to.sock or https://host:port
    #[arg(
        long,
        global = true,
        env = "GPUSWAP_ENDPOINT",
        default_value = DEFAULT_ENDPOINT,
        value_name = "URL"
    )]
    endpoint: Endpoint,
    /// File holding the bearer token for an https endpoint
    #[arg(long, global = true, env = "GPUSWAP_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM file of the CA that signed an https supervisor's certificate, or of that certificate
    /// itself (trusted exactly)
    #[arg(long, global = true, env = "GPUSWAP_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Print JSON for scripts instead of text
    #[arg(long, global = true)]
    json: bool,
    /// No colors (also off when NO_COLOR is set or output is not a terminal)
    #[arg(long, global = true)]
    no_color: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Show the supervisor and every model (or one model, with its recent log lines)
    #[command(after_help = "`status MODEL` exits 1 when that model has failed.")]
    Status {
        /// A model name or alias
        model: Option<String>,
        /// Recent log lines shown with MODEL (0: none)
        #[arg(short = 'n', long, default_value_t = 10, value_name = "N")]
        lines: u32,
    },
    /// List the models, one per line: NAME KIND STATE ALIASES
    Models,
    /// Make a model ready, showing progress; prints its address
    Activate {
        /// A model name or alias
        model: String,
        /// Revoke the holds of conflicting models at once instead of draining them
        #[arg(long)]
        force: bool,
        /// Keep holding the model after it is ready, until Ctrl-C (or until the
        /// supervisor asks to drain it)
        #[arg(long)]
        hold: bool,
    },
    /// Stop a model, or every model
    #[command(group = clap::ArgGroup::new("target").required(true).args(["model", "all"]))]
    Deactivate {
        /// A model name or alias
        model: Option<String>,
        /// Stop every model
        #[arg(long)]
        all: bool,
        /// Revoke holds at once instead of letting holders drain
        #[arg(long)]
        force: bool,
        /// Put the model to sleep instead of stopping it (it needs a sleep protocol);
        /// `activate` wakes it in the same process
        #[arg(long, conflicts_with = "all")]
        sleep: bool,
    },
    /// Show the captured output of a model (or of every model)
    Logs {
        /// A model name or alias (default: every model)
        model: Option<String>,
        /// Past lines to show first
        #[arg(short = 'n', long, default_value_t = 100, value_name = "N")]
        lines: u32,
        /// Keep following new lines until Ctrl-C
        #[arg(short, long)]
        follow: bool,
        /// Prefix each line with its UTC time
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Follow model state changes until Ctrl-C
    Watch {
        /// Redraw the status table in place (top-style) instead of one line per change
        #[arg(long)]
        table: bool,
    },
    /// Make the supervisor re-read its configuration file
    Reload,
    /// Print a shell completion script
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// What every command needs: a client, how to print, and where errors point.
pub struct Ctx {
    pub client: SupervisorClient,
    pub json: bool,
    pub out: Style,
    pub err: Style,
}

fn command() -> clap::Command {
    // Every subcommand's --help documents the exit codes too.
    Cli::command().mut_subcommands(|sub| {
        let extra = sub
            .get_after_help()
            .map(|text| format!("{text}\n\n{}", exit::HELP))
            .unwrap_or_else(|| exit::HELP.to_owned());
        sub.after_help(extra)
    })
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let err_style = Style::stderr(cli.global.no_color);
    let endpoint = cli.global.endpoint.clone();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!(
                "{}: cannot start the runtime: {error}",
                err_style.paint(output::RED, "error")
            );
            return Code::Failed.into();
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code.into(),
        Err(error) => {
            let (code, message) = exit::classify(&error, &endpoint);
            if let Some(message) = message {
                eprintln!("{}: {message}", err_style.paint("1;31", "error"));
            }
            code.into()
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<Code> {
    let global = cli.global;
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut command(), "gpuswapctl", &mut std::io::stdout());
        return Ok(Code::Success);
    }
    let ctx = Ctx {
        client: connect(&global)?,
        json: global.json,
        out: Style::stdout(global.no_color),
        err: Style::stderr(global.no_color),
    };
    match cli.command {
        Command::Status { model, lines } => status::status(ctx, model, lines).await,
        Command::Models => status::models(ctx).await,
        Command::Activate { model, force, hold } => {
            activate::activate(ctx, model, force, hold).await
        }
        Command::Deactivate {
            model,
            all,
            force,
            sleep,
        } => activate::deactivate(ctx, model, all, force, sleep).await,
        Command::Logs {
            model,
            lines,
            follow,
            timestamps,
        } => logs::logs(ctx, model, lines, follow, timestamps).await,
        Command::Watch { table } => watch::watch(ctx, table).await,
        Command::Reload => reload::reload(ctx).await,
        Command::Completions { .. } => Ok(Code::Success),
    }
}

fn connect(global: &GlobalArgs) -> anyhow::Result<SupervisorClient> {
    let token = match &global.token_file {
        Some(path) => Some(gpuswap::auth::read_token_file(path).map_err(|error| {
            Failure::new(
                Code::Usage,
                format!("cannot read token file {}: {error}", path.display()),
            )
        })?),
        None => None,
    };
    // Read here (a short-lived command needs no re-reading) so that an unreadable file is a
    // usage error.
    let options = ClientOptions {
        token,
        token_file: None,
        ca_file: global.ca_file.clone(),
        ..ClientOptions::default()
    };
    gpuswap::connect(&global.endpoint, &options)
        .map_err(|error| Failure::new(Code::Usage, error.to_string()).into())
}
