//! uplinkctl: the operator's CLI for one uplink gateway or a whole fleet.
//!
//! Data goes to stdout, diagnostics to stderr. With several gateways the exit code is a
//! set of bit flags, as Ansible's: 2 = some gateway returned an error, 4 = some gateway
//! was unreachable (0 = all succeeded).

mod answer;
mod certs;
mod fleet;
mod output;
mod when;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use uplink_api::v1;

#[derive(Parser)]
#[command(
    name = "uplinkctl",
    version,
    about = "Manage uplink gateways: one, or a whole fleet"
)]
struct Cli {
    /// One gateway, HOST:PORT.
    #[arg(long, global = true, conflicts_with = "inventory")]
    gateway: Option<String>,
    /// A fleet: a TOML file of [[gateway]] name, address, labels.
    #[arg(long, global = true, env = "UPLINKCTL_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Inventory selector: key=value[,key=value...]; all must match.
    #[arg(short = 'l', long = "selector", global = true)]
    selector: Option<String>,
    /// CA certificate (PEM) the gateways' certificates are checked against.
    #[arg(long, global = true, env = "UPLINKCTL_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) carrying your role.
    #[arg(long, global = true, env = "UPLINKCTL_CERT")]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "UPLINKCTL_KEY")]
    key: Option<PathBuf>,
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Gateways contacted at once.
    #[arg(long, global = true, default_value_t = 32)]
    parallel: usize,
    /// Deadline per gateway, e.g. "5s".
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Apply a write batch by batch, checking each gateway's health after its step.
    #[arg(long, global = true)]
    rolling: bool,
    /// Gateways per batch of a rolling write.
    #[arg(long, global = true, requires = "rolling", value_parser = clap::value_parser!(u32).range(1..))]
    batch: Option<u32>,
    /// Wait between the batches of a rolling write, e.g. "30s".
    #[arg(long, global = true, requires = "rolling", value_parser = parse_duration)]
    pause: Option<Duration>,
    /// Stop a rolling write at the first gateway that fails its step or its health check.
    #[arg(long, global = true, requires = "rolling")]
    stop_on_error: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Cmd {
    /// Agent status.
    Status,
    /// Uplinks with state, clients, RTT and loss.
    Uplinks,
    /// Clients, optionally those on one uplink.
    Clients {
        #[arg(long)]
        uplink: Option<String>,
    },
    /// The client addresses that moved the most bytes over the last minute
    /// (lan.client_usage).
    Top {
        #[arg(long)]
        uplink: Option<String>,
        /// How many (1–1000).
        #[arg(short = 'n', default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        count: u32,
    },
    /// Pin a client (by IP) to an uplink.
    Pin {
        client: String,
        uplink: String,
        /// Expire the pin after this long, e.g. "2h".
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Remove a client's pin.
    Unpin {
        client: String,
    },
    /// Move an uplink's clients away; established flows finish on it.
    Drain {
        uplink: String,
    },
    Undrain {
        uplink: String,
    },
    /// Bring an uplink's clients home (failback = "manual").
    Failback {
        uplink: String,
    },
    /// An uplink's data cap: start the period's count again, or set the cap.
    Quota {
        #[command(subcommand)]
        cmd: QuotaCmd,
    },
    /// Traffic policies: what each uses now, and why not the others.
    Policies,
    /// Rules in order, with the packets each decided.
    Rules,
    /// Which rule, policy and uplink a new flow takes now, and why.
    Explain {
        /// Client address.
        src: String,
        /// Destination address.
        dst: String,
        /// tcp, udp, icmp, icmpv6 (default: udp with a port, else any).
        #[arg(long)]
        proto: Option<String>,
        #[arg(long)]
        sport: Option<u16>,
        #[arg(long)]
        dport: Option<u16>,
        /// DSCP name (ef, af41, cs1, …) or number.
        #[arg(long)]
        dscp: Option<String>,
        /// The LAN interface the flow arrives on.
        #[arg(long)]
        iif: Option<String>,
    },
    /// Named sets and their elements.
    Sets,
    /// Add or remove elements of a set (not an external one); kept across restarts.
    Set {
        #[command(subcommand)]
        cmd: SetCmd,
    },
    /// Reload the agent's configuration.
    Reload,
    /// The event log; --follow keeps streaming.
    Events {
        #[arg(long)]
        follow: bool,
    },
    /// Certificates for agents and operators.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Shell completion script.
    Completion {
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum QuotaCmd {
    /// Count the uplink's usage of this period from zero again; a held uplink returns.
    Reset { uplink: String },
    /// Cap the uplink at SIZE per period (e.g. 30GB, decimal; 20GiB, binary), over the
    /// config's quota until a reload changes that.
    Set {
        uplink: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
}

#[derive(Subcommand)]
enum SetCmd {
    /// Add CIDRs or addresses to set NAME.
    Add {
        name: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
    /// Remove CIDRs or addresses from set NAME.
    Del {
        name: String,
        #[arg(required = true)]
        elements: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a new CA in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate signed by DIR's CA.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// An agent (server) certificate; give its addresses or names with --san.
        #[arg(long, group = "who")]
        agent: Option<String>,
        #[arg(long, requires = "agent")]
        san: Vec<String>,
        #[arg(long, group = "who")]
        operator: Option<String>,
        #[arg(long, group = "who")]
        viewer: Option<String>,
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Replace an existing certificate and key of that name.
        #[arg(long)]
        force: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. \"30s\", \"2h\""))?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_size(s: &str) -> Result<u64, String> {
    match uplink_api::size::parse(s)? {
        0 => Err("a quota of 0 allows nothing; give at least 1 byte".into()),
        n => Ok(n),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("uplinkctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<u8> {
    match &cli.command {
        Cmd::Completion { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "uplinkctl",
                &mut std::io::stdout(),
            );
            return Ok(0);
        }
        Cmd::Certs { cmd } => {
            match cmd {
                CertsCmd::Init { dir, days } => certs::init(dir, *days)?,
                CertsCmd::Issue {
                    dir,
                    agent,
                    san,
                    operator,
                    viewer,
                    days,
                    force,
                } => {
                    let subject = match (agent, operator, viewer) {
                        (Some(a), _, _) => certs::Subject::Agent {
                            name: a.clone(),
                            sans: san.clone(),
                        },
                        (_, Some(o), _) => certs::Subject::Operator(o.clone()),
                        (_, _, Some(v)) => certs::Subject::Viewer(v.clone()),
                        _ => anyhow::bail!(
                            "certs issue needs one of --agent NAME, --operator NAME, --viewer NAME"
                        ),
                    };
                    certs::issue(dir, subject, *days, *force)?;
                }
            }
            return Ok(0);
        }
        _ => {}
    }
    let targets = fleet::targets(
        cli.gateway.as_deref(),
        cli.inventory.as_deref(),
        cli.selector.as_deref(),
    )?;
    let creds =
        fleet::Credentials::load(cli.ca.as_deref(), cli.cert.as_deref(), cli.key.as_deref())?;
    let request = request_of(&cli.command)?;
    if cli.rolling && !request.is_write() {
        anyhow::bail!(
            "--rolling applies to writes (drain, undrain, failback, pin, unpin, quota reset|set, reload, set add|del); this command only reads"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        if let Cmd::Events { follow: true } = &cli.command {
            let out = cli.output;
            return fleet::follow_events(&targets, &creds, cli.timeout, |e, gateway| {
                output::event_line(e, out, gateway)
            })
            .await;
        }
        if cli.rolling {
            return rolling(&cli, &targets, &creds, &request).await;
        }
        let results = fleet::fan_out(&targets, &creds, &request, cli.parallel, cli.timeout).await;
        output::print(&results, cli.output, cli.gateway.is_some());
        Ok(fleet::exit_code(&results))
    })
}

/// A write, batch by batch: each batch's results as it finishes, then a summary of what
/// was done where.
async fn rolling(
    cli: &Cli,
    targets: &[fleet::Target],
    creds: &fleet::Credentials,
    request: &fleet::Request,
) -> Result<u8> {
    let plan = fleet::Rolling {
        batch: cli.batch.unwrap_or(1) as usize,
        pause: cli.pause.unwrap_or_default(),
        stop_on_error: cli.stop_on_error,
    };
    let batches = targets.len().div_ceil(plan.batch);
    let (results, untouched) = fleet::roll(targets, creds, request, &plan, cli.timeout, |n, r| {
        let names: Vec<&str> = r.iter().map(|r| r.target.name.as_str()).collect();
        eprintln!(
            "rolling: batch {} of {batches}: {}",
            n + 1,
            names.join(", ")
        );
        output::print(r, cli.output, false);
    })
    .await;
    let done: Vec<&str> = results
        .iter()
        .filter(|r| r.result.is_ok())
        .map(|r| r.target.name.as_str())
        .collect();
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.result.is_err())
        .map(|r| r.target.name.as_str())
        .collect();
    let list = |v: &[&str]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    eprintln!(
        "rolling: done on {}; failed on {}",
        list(&done),
        list(&failed)
    );
    if !untouched.is_empty() {
        let names: Vec<&str> = untouched.iter().map(|t| t.name.as_str()).collect();
        eprintln!(
            "rolling: stopped at the first failure (--stop-on-error); not done on {}",
            names.join(", ")
        );
    }
    Ok(fleet::exit_code(&results))
}

/// The RPC a command makes; validated before any gateway is contacted.
fn request_of(cmd: &Cmd) -> Result<fleet::Request> {
    use fleet::Request as R;
    let ip = |s: &str| -> Result<String> {
        s.trim()
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.to_string())
            .map_err(|_| anyhow::anyhow!("{s:?} is not an IPv4 or IPv6 address"))
    };
    Ok(match cmd {
        Cmd::Status => R::Status,
        Cmd::Uplinks => R::Uplinks,
        Cmd::Clients { uplink } => R::Clients(uplink.clone().unwrap_or_default()),
        Cmd::Top { uplink, count } => R::Top(v1::ListTopTalkersRequest {
            uplink: uplink.clone().unwrap_or_default(),
            limit: *count,
        }),
        Cmd::Pin {
            client,
            uplink,
            duration,
        } => R::Pin(v1::SetOverrideRequest {
            client: ip(client)?,
            uplink: uplink.clone(),
            duration: duration
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default(),
        }),
        Cmd::Unpin { client } => R::Unpin(ip(client)?),
        Cmd::Drain { uplink } => R::Drain(uplink.clone()),
        Cmd::Undrain { uplink } => R::Undrain(uplink.clone()),
        Cmd::Failback { uplink } => R::Failback(uplink.clone()),
        Cmd::Quota {
            cmd: QuotaCmd::Reset { uplink },
        } => R::QuotaReset(uplink.clone()),
        Cmd::Quota {
            cmd: QuotaCmd::Set { uplink, size },
        } => R::QuotaSet(v1::SetQuotaRequest {
            uplink: uplink.clone(),
            bytes: *size,
        }),
        Cmd::Reload => R::Reload,
        Cmd::Policies => R::Policies,
        Cmd::Sets => R::Sets,
        Cmd::Set { cmd } => {
            let cidrs = |list: &[String]| -> Result<Vec<String>> {
                list.iter()
                    .map(|e| {
                        let t = e.trim();
                        t.parse::<ipnet::IpNet>()
                            .map(|n| n.to_string())
                            .or_else(|_| t.parse::<std::net::IpAddr>().map(|a| a.to_string()))
                            .map_err(|_| {
                                anyhow::anyhow!(
                                    "{t:?} is not a CIDR or address (e.g. 198.51.100.0/24)"
                                )
                            })
                    })
                    .collect()
            };
            let (set, add, del) = match cmd {
                SetCmd::Add { name, elements } => (name, cidrs(elements)?, Vec::new()),
                SetCmd::Del { name, elements } => (name, Vec::new(), cidrs(elements)?),
            };
            R::UpdateSet(v1::UpdateSetRequest {
                set: set.clone(),
                add,
                del,
            })
        }
        Cmd::Rules => R::Rules,
        Cmd::Explain {
            src,
            dst,
            proto,
            sport,
            dport,
            dscp,
            iif,
        } => R::Explain(v1::ExplainRequest {
            src: ip(src)?,
            dst: ip(dst)?,
            proto: proto.clone().unwrap_or_default(),
            sport: sport.unwrap_or(0).into(),
            dport: dport.unwrap_or(0).into(),
            dscp: dscp.clone().unwrap_or_default(),
            iif: iif.clone().unwrap_or_default(),
        }),
        Cmd::Events { .. } => R::Events,
        Cmd::Certs { .. } | Cmd::Completion { .. } => unreachable!("handled before"),
    })
}
