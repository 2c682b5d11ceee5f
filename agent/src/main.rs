use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use uplinkd::config::{Config, DEFAULT_CONFIG_PATH};

/// uplinkd: dispatches LAN clients over several ISP uplinks.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Log format on stderr: human text, or one JSON object per line for collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the default).
    Run,
    /// Validate a configuration file without touching anything.
    CheckConfig {
        /// File to check (defaults to --config).
        path: Option<PathBuf>,
    },
    /// Remove everything uplinkd owns in the kernel (nft table, ip rules, routes).
    Cleanup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = match &cli.command {
        Some(Command::CheckConfig { path: Some(p) }) => p.clone(),
        _ => cli.config.clone(),
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _rt = runtime.enter();
    let telemetry = match uplinkd::telemetry::init(
        cli.log_format == LogFormat::Json,
        std::io::stderr().is_terminal(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = run(cli.command.unwrap_or(Command::Run), config, path, &runtime);
    telemetry.shutdown();
    code
}

fn run(
    command: Command,
    config: Config,
    path: PathBuf,
    runtime: &tokio::runtime::Runtime,
) -> ExitCode {
    match command {
        Command::CheckConfig { .. } => {
            println!(
                "{}: ok ({} uplinks, LAN {})",
                path.display(),
                config.uplinks.len(),
                config.lan.interfaces.join(", ")
            );
            ExitCode::SUCCESS
        }
        Command::Run => match runtime.block_on(uplinkd::daemon::run(config, path)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Cleanup => match runtime.block_on(uplinkd::daemon::cleanup(&config)) {
            Ok(errors) if errors.is_empty() => ExitCode::SUCCESS,
            Ok(errors) => {
                for e in errors {
                    eprintln!("error: {e}");
                }
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
