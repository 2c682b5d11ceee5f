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
    /// Write a starter config from what the kernel shows now (LAN, uplinks and their
    /// gateways, free rule and table ranges), each choice explained; changes nothing.
    Init {
        /// Write it to this file instead of stdout (refused if the file exists).
        #[arg(long)]
        write: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long, requires = "write")]
        force: bool,
    },
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    if let Some(Command::Init { write, force }) = &cli.command {
        return init(write.as_deref(), *force);
    }
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
    let runtime = match start_runtime(tokio::runtime::Builder::new_multi_thread().worker_threads(2))
    {
        Ok(r) => r,
        Err(code) => return code,
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

/// The tokio runtime, or the exit code after saying why it cannot start.
fn start_runtime(
    builder: &mut tokio::runtime::Builder,
) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start runtime: {e}");
        ExitCode::FAILURE
    })
}

/// `uplinkd init`: needs no config (it writes one) and only reads the kernel.
fn init(write: Option<&std::path::Path>, force: bool) -> ExitCode {
    if let Some(p) = write
        && p.exists()
        && !force
    {
        eprintln!(
            "error: {} exists; uplinkd init does not overwrite it (--force replaces it)",
            p.display()
        );
        return ExitCode::from(2);
    }
    let runtime = match start_runtime(&mut tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let facts = runtime.block_on(async {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        uplinkd::init::gather(&handle)
            .await
            .map_err(std::io::Error::other)
    });
    let text = match facts {
        Ok(f) => uplinkd::init::render(&f, &uplinkd::config::DataplaneConfig::defaults()),
        Err(e) => {
            eprintln!("error: cannot read the kernel's links and routes: {e}");
            return ExitCode::FAILURE;
        }
    };
    match write {
        None => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Some(p) => {
            // Beside the target, then renamed: a half-written config never exists. Created
            // afresh (a link or a left-over file in its place is refused, not followed) with
            // the conffile's mode, 0600, whatever the umask.
            let tmp = p.with_extension("toml.tmp");
            let done = write_new(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, p));
            match done {
                Ok(()) => {
                    eprintln!(
                        "wrote {}; check it with: uplinkd check-config {}",
                        p.display(),
                        p.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    eprintln!("error: cannot write {}: {e}", p.display());
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Writes a file that must not exist yet, mode 0600, and syncs it.
fn write_new(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
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
        Command::Init { .. } => unreachable!("handled before the config is read"),
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

/// glibc gives each thread that allocates an arena of its own (up to 8 per core), and
/// memory freed into one is never reused by another: the loop, the executor, the serving
/// runtime and the blocking pool each kept their own peak, about 12 MB of the 83 MB an
/// agent reached while starting with 100k clients. Two arenas cover the two threads that
/// allocate most (the loop and the executor). `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a tunable; called before any thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
