//! Configuration: TOML in, validated typed config out. Every error names the file, the
//! line, the key and what would be valid; nothing here touches the kernel.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

mod traffic;
pub use traffic::{
    AddrMatch, DSCP_NAMES, MAX_SET_ELEMENTS, Mode, PolicyConfig, Proto, RuleConfig, SetConfig, Sla,
    Target, WhenNone, dscp_by_name, parse_net,
};
use traffic::{RawDispatch, RawPolicy, RawRule, RawSet};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/uplink/uplinkd.toml";

/// How many ip-rule priorities uplinkd owns, starting at `dataplane.rule_priority`.
pub const RULE_PRIORITY_BAND: u32 = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub lan: LanConfig,
    pub dataplane: DataplaneConfig,
    pub health: HealthConfig,
    pub failover: FailoverConfig,
    /// The gRPC API; absent without an `[api]` table.
    pub api: Option<ApiConfig>,
    /// Prometheus `/metrics`; `None` when `[metrics] enabled = false`.
    pub metrics: Option<MetricsConfig>,
    pub uplinks: Vec<UplinkConfig>,
    /// Mode of the default policy: what traffic no rule matches gets.
    pub dispatch: Mode,
    /// Shared with every plan while no set is edited through the API.
    pub sets: std::sync::Arc<Vec<SetConfig>>,
    pub policies: Vec<PolicyConfig>,
    /// In order; the first match wins. Shared with every plan (up to 4,096 of them).
    pub rules: std::sync::Arc<Vec<RuleConfig>>,
    /// The gateway's own outbound traffic (`[local] policy`).
    pub local: LocalPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: std::net::SocketAddr,
    /// Connections open at once; more are closed at once (and counted).
    pub max_connections: usize,
    /// HTTPS with this certificate and key (PEM) instead of plain HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// mTLS gRPC; there is no plaintext gRPC port.
    pub listen: std::net::SocketAddr,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Plaintext `/healthz` and `/readyz` for probes that cannot present certificates.
    pub health_listen: std::net::SocketAddr,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// One probe round per uplink this often.
    pub interval: Duration,
    /// A probe without a reply this long is lost (sooner when the uplink is silent).
    pub timeout: Duration,
    /// Consecutive failed rounds that take an uplink down.
    pub down_after: u32,
    /// Consecutive good rounds that bring it back up.
    pub up_after: u32,
    /// Degraded above this loss ratio over the window (0..=1).
    pub max_loss: Option<f64>,
    /// Degraded above this median RTT over the window.
    pub max_rtt: Option<Duration>,
    /// Probes kept for RTT, loss and jitter.
    pub stats_window: u32,
    /// A failed round does not count toward `down_after` while the uplink forwards traffic
    /// from the internet (its inbound forwarded-packet counter grew during the round).
    pub passive: bool,
    /// At most this many failed rounds in a row are excused by passive evidence; the next
    /// one counts toward `down_after` whatever the traffic.
    pub passive_max_rounds: u32,
    /// LAN packets that left by an uplink and got no reply at all for this long make it
    /// suspect: its probes are sent in a burst at once (passive evidence of failure).
    pub passive_window: Duration,
    /// Probes per target in a burst, `burst_interval` apart; the uplink goes down when
    /// none is answered.
    pub burst_count: u32,
    pub burst_interval: Duration,
    /// An uplink without probes goes down on passive evidence alone when its LAN traffic
    /// to at least this many destinations went unanswered.
    pub passive_min_destinations: u32,
    /// The probe interval of a metered uplink that carries nothing.
    pub standby_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    Auto,
    Manual,
}

/// The billing period an uplink's usage is counted in; it starts at midnight, local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPeriod {
    Day,
    /// From the given weekday (1 = Monday … 7 = Sunday).
    Week {
        starts: u32,
    },
    /// From the given day of the month (1–28).
    Month {
        starts: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawQuotaPeriod {
    Day,
    Week,
    Month,
}

/// What an uplink over its quota does (`quota_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaAction {
    /// Carries traffic only while no other uplink can: its clients and their flows move
    /// to the others, as a failover moves them.
    #[default]
    Standby,
    /// Carries nothing: no new flows, its established ones are deleted.
    Stop,
    /// Events and metrics only.
    Alert,
}

impl QuotaAction {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaAction::Standby => "standby",
            QuotaAction::Stop => "stop",
            QuotaAction::Alert => "alert",
        }
    }
}

/// What happens on failback to the flows the failover put on other uplinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailbackFlows {
    /// They finish where they are; only new connections go home.
    Keep,
    /// They are deleted once the home is back, so that they reopen through it.
    Move,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailoverConfig {
    pub failback: Failback,
    pub failback_flows: FailbackFlows,
    /// Continuous health needed before clients return home (auto).
    pub failback_delay: Duration,
    /// More state changes than this within `window` hold an uplink down for `hold`.
    pub max_flaps: u32,
    pub window: Duration,
    pub hold: Duration,
}

/// One active probe target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    Icmp(std::net::IpAddr),
    Tcp(std::net::SocketAddr),
    /// `http://ADDRESS[:PORT]/PATH`: healthy on a 2xx answer (containing the uplink's
    /// `probe_expect`, when set); a 3xx is a captive portal.
    Http {
        addr: std::net::SocketAddr,
        path: String,
    },
    /// `dns:SERVER[:PORT]/NAME`: healthy on an answer with NOERROR.
    Dns {
        server: std::net::SocketAddr,
        name: String,
    },
}

impl Probe {
    pub fn addr(&self) -> std::net::IpAddr {
        match self {
            Probe::Icmp(a) => *a,
            Probe::Tcp(s) => s.ip(),
            Probe::Http { addr, .. } => addr.ip(),
            Probe::Dns { server, .. } => server.ip(),
        }
    }
}

/// `ADDRESS` or `ADDRESS:PORT` (`[V6]`, `[V6]:PORT`), with `port` when none is given.
fn host_port(text: &str, port: u16) -> Option<std::net::SocketAddr> {
    if let Ok(a) = text.parse::<std::net::SocketAddr>() {
        return Some(a);
    }
    text.trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| std::net::SocketAddr::new(ip, port))
}

/// `host_port` written back, the default port left out (also an HTTP `Host` header).
pub fn show_host(a: &std::net::SocketAddr, default: u16) -> String {
    match (a.ip(), a.port() == default) {
        (std::net::IpAddr::V4(ip), true) => ip.to_string(),
        (std::net::IpAddr::V6(ip), true) => format!("[{ip}]"),
        _ => a.to_string(),
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Icmp(a) => write!(f, "icmp:{a}"),
            Probe::Tcp(s) => write!(f, "tcp:{s}"),
            Probe::Http { addr, path } => write!(f, "http://{}{path}", show_host(addr, 80)),
            Probe::Dns { server, name } => write!(f, "dns:{}/{name}", show_host(server, 53)),
        }
    }
}

impl std::str::FromStr for Probe {
    type Err = String;

    fn from_str(s: &str) -> Result<Probe, String> {
        let bad = || {
            format!(
                "invalid probe {s:?}; use \"icmp:ADDRESS\", \"tcp:ADDRESS:PORT\" (IPv6: \"tcp:[2001:db8::1]:80\"), \"http://ADDRESS[:PORT]/PATH\" or \"dns:SERVER[:PORT]/NAME\""
            )
        };
        if let Some(rest) = s.strip_prefix("http://") {
            let (host, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            let addr = host_port(host, 80).ok_or_else(|| {
                format!(
                    "invalid probe {s:?}: the host must be an address (http://203.0.113.10/generate_204, http://[2001:db8::10]:8080/), since a name would be resolved outside the uplink"
                )
            })?;
            if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "invalid probe {s:?}: the path has spaces or control characters"
                ));
            }
            return Ok(Probe::Http {
                addr,
                path: path.to_string(),
            });
        }
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "icmp" => rest
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .map(Probe::Icmp)
                .map_err(|_| bad()),
            "tcp" => rest.parse().map(Probe::Tcp).map_err(|_| bad()),
            "dns" => {
                let (server, name) = rest.rsplit_once('/').ok_or_else(bad)?;
                let server = host_port(server, 53).ok_or_else(bad)?;
                let name = name.trim_end_matches('.');
                let valid = !name.is_empty()
                    && name.len() <= 253
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.chars()
                                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    });
                if !valid {
                    return Err(format!(
                        "invalid probe {s:?}: {name:?} is not a DNS name (letters, digits, '-', '_', dot-separated labels of at most 63)"
                    ));
                }
                Ok(Probe::Dns {
                    server,
                    name: name.to_string(),
                })
            }
            _ => Err(bad()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub name: String,
    pub state_dir: PathBuf,
    /// Re-read links, neighbours, rules, routes and the nft table's structure.
    pub resync_interval: Duration,
    /// Also re-read every map element (costly at 100k clients).
    pub full_resync_interval: Duration,
    /// The client assignments are written at most this often.
    pub state_save_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LanConfig {
    pub interfaces: Vec<String>,
    pub prefixes: Vec<IpNet>,
    pub client_idle_timeout: Duration,
    /// Clients (MACs) tracked at most; more are hashed over the survivors and counted.
    pub max_clients: usize,
    /// Addresses per client at most; more are hashed over the survivors and counted.
    pub max_addresses_per_client: usize,
    /// Prefixes behind routers on the LAN whose hosts are clients of their own
    /// (`lan.routed`); `None`: the kernel's routes via LAN interfaces say.
    pub routed: Option<Vec<IpNet>>,
    /// Count each client's bytes per uplink (`uplinkctl clients -o wide`, `top`): a
    /// dynamic-set update per forwarded packet, so off unless asked for.
    pub client_usage: bool,
}

/// Group 0 is what `log group` means without a number, and low numbers are what other
/// tools (ulogd) are configured with: uplinkd's default stays clear of both.
const DEFAULT_NFLOG_GROUP: i64 = 4623;

/// Conntrack-mark bits for policy ids by default (in the conntrack mark only: the
/// packet-mark bits other tools use are not touched): the 8 bits just below `fwmark_mask` (0x00ff0000 below the default), or just above it
/// when fewer than 8 lie below: beside uplinkd's own bits, whatever the operator chose.
fn default_policy_mark_mask(fwmark_mask: u32) -> u32 {
    let low = fwmark_mask.trailing_zeros();
    let high = 32 - fwmark_mask.leading_zeros();
    if low >= 8 {
        0xff << (low - 8)
    } else {
        // fwmark_mask has at most 16 bits, so with fewer than 8 below, 8 fit above.
        0xff << high
    }
}

/// What uplinkd owns in the kernel. Everything outside these bounds is never touched.
#[derive(Debug, Clone, PartialEq)]
pub struct DataplaneConfig {
    /// Name of the one nft table (family inet) uplinkd owns.
    pub nft_table: String,
    /// Bits of the packet and conntrack mark that uplinkd owns.
    pub fwmark_mask: u32,
    /// Bits of the conntrack mark (never the packet mark) that name the `[[policy]]` with
    /// an SLA a connection was classified by, so that a policy whose SLA breaks on an
    /// uplink can move its own flows off it. 0: its flows stay where they started.
    pub policy_mark_mask: u32,
    /// First of the `RULE_PRIORITY_BAND` ip-rule priorities uplinkd owns.
    pub rule_priority: u32,
    /// Uplink tables are `table_base + 1 ..= table_base + max mark id`.
    pub table_base: u32,
    /// rtm protocol stamped on uplinkd's routes and rules.
    pub route_protocol: u8,
    /// Path of the `nft` binary.
    pub nft: PathBuf,
    /// Path of the `conntrack` binary (conntrack-tools).
    pub conntrack: PathBuf,
    /// An `nft` or `conntrack` run that takes longer is killed and retried with backoff.
    pub command_timeout: Duration,
    pub conntrack_flush: ConntrackFlush,
    /// The NFLOG group the first packet of an unplaced host behind a LAN router is
    /// logged to (uplinkd reads it to place the host).
    pub nflog_group: u16,
}

impl DataplaneConfig {
    /// Largest mark id that fits in the mask.
    pub fn max_mark_id(&self) -> u32 {
        self.fwmark_mask >> self.fwmark_mask.trailing_zeros()
    }

    /// The packet mark value for a mark id, shifted into the owned bits.
    pub fn fwmark(&self, mark_id: u32) -> u32 {
        mark_id << self.fwmark_mask.trailing_zeros()
    }

    /// Largest policy id that fits in `policy_mark_mask` (0 when it is 0).
    pub fn max_policy_id(&self) -> u32 {
        self.policy_mark_mask
            .checked_shr(self.policy_mark_mask.trailing_zeros())
            .unwrap_or(0)
    }

    /// The conntrack mark bits of `[[policy]]` number `p` (config index): its position,
    /// from 1, shifted into `policy_mark_mask`. `None` without policy bits.
    pub fn policy_ctmark(&self, p: usize) -> Option<u32> {
        (self.policy_mark_mask != 0)
            .then(|| (p as u32 + 1) << self.policy_mark_mask.trailing_zeros())
    }

    /// The conntrack mark bits, in `policy_mark_mask`, of the connections a failover of
    /// the uplink with mark id `mark_id` placed on other uplinks (`failback_flows =
    /// "move"`): ids from the top of the policy ids down, so that they never meet those of
    /// the policies with an SLA, counted from 1 up. `None` without policy bits or room.
    pub fn away_ctmark(&self, mark_id: u32) -> Option<u32> {
        let id = (self.max_policy_id() + 1).checked_sub(mark_id)?;
        (id > 0).then(|| id << self.policy_mark_mask.trailing_zeros())
    }

    pub fn owned_tables(&self) -> std::ops::RangeInclusive<u32> {
        self.table_base + 1..=self.table_base + self.max_mark_id()
    }

    pub fn owned_priorities(&self) -> std::ops::RangeInclusive<u32> {
        self.rule_priority..=self.rule_priority + RULE_PRIORITY_BAND - 1
    }

    /// The defaults, as a config without a `[dataplane]` table gets them.
    pub fn defaults() -> DataplaneConfig {
        let v = Validator {
            path: Path::new("(defaults)"),
            text: "",
        };
        v.dataplane(RawDataplane::default())
            .expect("the defaults are valid")
    }
}

/// How a dead uplink's conntrack entries are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConntrackFlush {
    /// One ctnetlink message: the kernel deletes every entry with the mark.
    Netlink,
    /// `conntrack -D -m MARK/MASK` per family.
    Tool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    pub name: String,
    pub interface: String,
    /// `None` on point-to-point links: route by device only.
    pub gateway: Option<NextHop<Ipv4Addr>>,
    pub gateway6: Option<NextHop<Ipv6Addr>>,
    /// Whether the uplink carries IPv6 (a default route in its table).
    pub ipv6: bool,
    pub weight: u32,
    pub masquerade: bool,
    /// Small id, shifted into `fwmark_mask` to give the packet mark.
    pub mark: u32,
    pub table: u32,
    pub probes: Vec<Probe>,
    /// Text an HTTP probe's 2xx answer must contain (a portal's page lacks it).
    pub probe_expect: Option<String>,
    /// Probes of a round that must answer for the round to count as good.
    pub probe_quorum: u32,
    /// Lower tiers carry clients; a higher tier only while every lower one is down.
    pub tier: u32,
    /// Paid by volume: probed every `health.standby_interval` while it carries nothing,
    /// and the flows a failover placed on it leave it on failback.
    pub metered: bool,
    /// The period its usage is counted in.
    pub quota_period: QuotaPeriod,
    /// Bytes in and out allowed per period; `None`: no cap.
    pub quota: Option<u64>,
    pub quota_action: QuotaAction,
}

impl UplinkConfig {
    pub fn point_to_point(&self) -> bool {
        self.gateway.is_none()
    }
}

/// An uplink's next hop: written in the config, or learned from the kernel's default
/// routes on its interface (`"auto"`: DHCP, router adverts, PPP and LTE scripts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop<A> {
    Static(A),
    Auto,
}

impl<A: Copy> NextHop<A> {
    pub fn fixed(&self) -> Option<A> {
        match self {
            NextHop::Static(a) => Some(*a),
            NextHop::Auto => None,
        }
    }
}

/// Where the gateway's own outbound traffic goes (`[local] policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalPolicy {
    /// The main routing table decides, as without uplinkd.
    #[default]
    Main,
    /// The default policy's uplinks, each new connection drawn by weight.
    Default,
    /// A `[[policy]]`, by config index.
    Policy(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// Raw, as written. Spanned fields are the ones validated after parsing, so their errors
// can point at a line.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    lan: Option<Spanned<RawLan>>,
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    failover: RawFailover,
    api: Option<Spanned<RawApi>>,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    uplink: Vec<Spanned<RawUplink>>,
    #[serde(default)]
    dispatch: RawDispatch,
    #[serde(default)]
    set: Vec<Spanned<RawSet>>,
    #[serde(default)]
    policy: Vec<Spanned<RawPolicy>>,
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
    #[serde(default)]
    local: RawLocal,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    policy: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<Spanned<String>>,
    max_connections: Option<Spanned<i64>>,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Spanned<String>>,
    ca: Spanned<PathBuf>,
    cert: Spanned<PathBuf>,
    key: Spanned<PathBuf>,
    health_listen: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    down_after: Option<Spanned<i64>>,
    up_after: Option<Spanned<i64>>,
    max_loss: Option<Spanned<f64>>,
    max_rtt: Option<Spanned<String>>,
    stats_window: Option<Spanned<i64>>,
    passive: Option<bool>,
    passive_max_rounds: Option<Spanned<i64>>,
    passive_window: Option<Spanned<String>>,
    burst_count: Option<Spanned<i64>>,
    burst_interval: Option<Spanned<String>>,
    passive_min_destinations: Option<Spanned<i64>>,
    standby_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFailover {
    failback: Option<Failback>,
    failback_flows: Option<FailbackFlows>,
    failback_delay: Option<Spanned<String>>,
    max_flaps: Option<Spanned<i64>>,
    window: Option<Spanned<String>>,
    hold: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    name: Option<Spanned<String>>,
    state_dir: Option<PathBuf>,
    resync_interval: Option<Spanned<String>>,
    full_resync_interval: Option<Spanned<String>>,
    state_save_interval: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLan {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
    routed: Option<Vec<Spanned<String>>>,
    client_idle_timeout: Option<Spanned<String>>,
    max_clients: Option<Spanned<i64>>,
    max_addresses_per_client: Option<Spanned<i64>>,
    client_usage: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    nft_table: Option<Spanned<String>>,
    fwmark_mask: Option<Spanned<u32>>,
    policy_mark_mask: Option<Spanned<u32>>,
    rule_priority: Option<Spanned<u32>>,
    table_base: Option<Spanned<u32>>,
    route_protocol: Option<Spanned<u32>>,
    nft: Option<PathBuf>,
    conntrack: Option<PathBuf>,
    command_timeout: Option<Spanned<String>>,
    conntrack_flush: Option<ConntrackFlush>,
    nflog_group: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    name: Spanned<String>,
    interface: Spanned<String>,
    gateway: Option<Spanned<String>>,
    gateway6: Option<Spanned<String>>,
    ipv6: Option<bool>,
    weight: Option<Spanned<i64>>,
    masquerade: Option<bool>,
    mark: Option<Spanned<i64>>,
    table: Option<Spanned<i64>>,
    /// Removed: refused with a pointer to `dispatch.balance` / `policy.balance`.
    balance: Option<Spanned<toml::Value>>,
    #[serde(default)]
    probes: Vec<Spanned<String>>,
    probe_quorum: Option<Spanned<i64>>,
    probe_expect: Option<Spanned<String>>,
    tier: Option<Spanned<i64>>,
    metered: Option<bool>,
    quota_period: Option<RawQuotaPeriod>,
    quota_reset: Option<Spanned<i64>>,
    /// A size ("20GB", "20GiB") or a number of bytes.
    quota: Option<Spanned<toml::Value>>,
    quota_action: Option<QuotaAction>,
}

impl Config {
    /// Whether some failback deletes the connections its failover placed: all of them
    /// (`failback_flows = "move"`), or those on metered uplinks.
    pub fn failback_moves_flows(&self) -> bool {
        failback_moves_flows(&self.failover, &self.uplinks)
    }
}

fn failback_moves_flows(failover: &FailoverConfig, uplinks: &[UplinkConfig]) -> bool {
    failover.failback_flows == FailbackFlows::Move || uplinks.iter().any(|u| u.metered)
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_owned(),
            line: None,
            key: String::new(),
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates config text; `path` only labels errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let v = Validator { path, text };
        let raw: RawConfig = toml::from_str(text).map_err(|e| v.toml_error(&e))?;
        v.validate(raw)
    }
}

struct Validator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Validator<'_> {
    fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text[..end].matches('\n').count() + 1
    }

    fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            path: self.path.to_owned(),
            line: span.map(|s| self.line_of(&s)),
            key: key.into(),
            message: message.into(),
        }
    }

    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().to_string();
        let key = if message.starts_with("unknown field") || message.starts_with("missing field") {
            // serde names the offending key in backticks ("unknown field `wieght`",
            // "missing field `name`"); surface it as the key.
            message.split('`').nth(1).unwrap_or_default().to_string()
        } else {
            // A bad value ("unknown variant `year`"): the key is the one it is written at.
            e.span()
                .and_then(|s| self.key_at(s.start))
                .unwrap_or_default()
        };
        self.err(e.span(), key, message)
    }

    /// The full key (`uplink[1].quota_action`, `failover.failback_flows`) of the
    /// `key = value` line holding byte `at`.
    fn key_at(&self, at: usize) -> Option<String> {
        let at = at.min(self.text.len());
        let line_start = self.text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?;
        let key = line.split_once('=')?.0.trim().trim_matches('"');
        let before = &self.text[..line_start];
        let header = before
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['));
        Some(match header {
            None => key.to_string(),
            Some(h) if h.starts_with("[[") => {
                let name = h.trim_matches(|c| c == '[' || c == ']').trim();
                let index = before.lines().filter(|l| l.trim() == h).count() - 1;
                format!("{name}[{index}].{key}")
            }
            Some(h) => format!("{}.{key}", h.trim_matches(|c| c == '[' || c == ']').trim()),
        })
    }

    fn duration(
        &self,
        key: &str,
        value: Option<Spanned<String>>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let d = humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
            self.err(
                Some(value.span()),
                key,
                format!("invalid duration {:?} ({e}); use a number with a unit, e.g. \"250ms\", \"10s\", \"10m\"", value.get_ref()),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(Some(value.span()), key, "must be greater than zero"));
        }
        Ok(d)
    }

    fn ifname(&self, key: &str, value: &Spanned<String>) -> Result<String, ConfigError> {
        let name = value.get_ref();
        // IFNAMSIZ is 16 including the NUL.
        let valid = !name.is_empty()
            && name.len() <= 15
            && name != "."
            && name != ".."
            // The kernel allows more, but uplinkd writes these names into nft rules, where
            // a trailing '*' is a wildcard and '@' names a set.
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid {
            return Err(self.err(
                Some(value.span()),
                key,
                format!("invalid interface name {name:?}: 1-15 characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        Ok(name.clone())
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let agent = self.agent(raw.agent)?;

        let lan = self.lan(raw.lan)?;
        let dataplane = self.dataplane(raw.dataplane)?;

        let uplinks = self.uplinks(raw.uplink, &lan, &dataplane)?;

        let health = self.health(raw.health)?;
        let failover = self.failover(raw.failover)?;
        let api = match raw.api {
            None => None,
            Some(a) => Some(self.api(a.into_inner())?),
        };
        let metrics = self.metrics(raw.metrics)?;
        let p = self.policies(
            raw.dispatch,
            raw.set,
            raw.policy,
            raw.rule,
            &uplinks,
            &lan.interfaces,
        )?;
        if dataplane.policy_mark_mask != 0
            && let Some(i) = (0..p.policies.len())
                .find(|&i| p.policies[i].sla.is_set() && i as u32 + 1 > dataplane.max_policy_id())
        {
            return Err(self.err(
                None,
                format!("policy[{i}]"),
                format!(
                    "a policy with an SLA takes its position as its id in dataplane.policy_mark_mask {:#x}, which holds ids 1..={}: move it up the list, or widen the mask",
                    dataplane.policy_mark_mask,
                    dataplane.max_policy_id()
                ),
            ));
        }
        if failback_moves_flows(&failover, &uplinks) {
            self.room_for_failback_flows(&dataplane, &uplinks, &p.policies)?;
        }
        let local = self.local(raw.local, &p.policies)?;
        Ok(Config {
            agent,
            lan,
            dataplane,
            health,
            failover,
            api,
            metrics,
            uplinks,
            dispatch: p.dispatch,
            sets: std::sync::Arc::new(p.sets),
            policies: p.policies,
            rules: std::sync::Arc::new(p.rules),
            local,
        })
    }

    /// `[agent]`.
    fn agent(&self, raw: RawAgent) -> Result<AgentConfig, ConfigError> {
        Ok(AgentConfig {
            name: match raw.name {
                Some(n) if n.get_ref().trim().is_empty() => {
                    return Err(self.err(Some(n.span()), "agent.name", "must not be empty"));
                }
                Some(n) => n.into_inner(),
                None => hostname(),
            },
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/uplinkd")),
            resync_interval: self.duration(
                "agent.resync_interval",
                raw.resync_interval,
                Duration::from_secs(10),
            )?,
            full_resync_interval: self.duration(
                "agent.full_resync_interval",
                raw.full_resync_interval,
                Duration::from_secs(300),
            )?,
            state_save_interval: self.duration(
                "agent.state_save_interval",
                raw.state_save_interval,
                Duration::from_secs(5),
            )?,
        })
    }

    /// `[lan]`.
    fn lan(&self, raw: Option<Spanned<RawLan>>) -> Result<LanConfig, ConfigError> {
        let Some(lan) = raw else {
            return Err(self.err(
                None,
                "lan",
                "missing [lan] table; it needs at least `interfaces = [\"br-lan\"]`",
            ));
        };
        let lan_raw = lan.into_inner();
        if lan_raw.interfaces.get_ref().is_empty() {
            return Err(self.err(
                Some(lan_raw.interfaces.span()),
                "lan.interfaces",
                "at least one LAN interface is required, e.g. [\"br-lan\"]",
            ));
        }
        let mut lan_ifs = Vec::new();
        for (i, name) in lan_raw.interfaces.get_ref().iter().enumerate() {
            let n = self.ifname(&format!("lan.interfaces[{i}]"), name)?;
            if lan_ifs.contains(&n) {
                return Err(self.err(
                    Some(name.span()),
                    format!("lan.interfaces[{i}]"),
                    format!("duplicate interface {n:?}"),
                ));
            }
            lan_ifs.push(n);
        }
        let mut prefixes = Vec::new();
        for (i, p) in lan_raw.prefixes.iter().enumerate() {
            let net: IpNet = p.get_ref().trim().parse().map_err(|_| {
                self.err(
                    Some(p.span()),
                    format!("lan.prefixes[{i}]"),
                    format!(
                        "invalid CIDR {:?}; use e.g. \"192.168.1.0/24\" or \"2001:db8::/64\"",
                        p.get_ref()
                    ),
                )
            })?;
            prefixes.push(net.trunc());
        }
        let routed = match &lan_raw.routed {
            None => None,
            Some(list) => {
                let mut nets = Vec::new();
                for (i, p) in list.iter().enumerate() {
                    let key = format!("lan.routed[{i}]");
                    let net = traffic::parse_net(p.get_ref())
                        .filter(|n| n.prefix_len() > 0)
                        .ok_or_else(|| {
                            self.err(
                                Some(p.span()),
                                &key,
                                format!(
                                    "invalid prefix {:?}; use the CIDR a LAN router routes, e.g. \"10.20.0.0/24\" or \"2001:db8:20::/48\" (not a default route)",
                                    p.get_ref()
                                ),
                            )
                        })?;
                    nets.push(net);
                }
                Some(IpNet::aggregate(&nets))
            }
        };
        Ok(LanConfig {
            interfaces: lan_ifs,
            prefixes,
            routed,
            client_idle_timeout: self.duration(
                "lan.client_idle_timeout",
                lan_raw.client_idle_timeout,
                Duration::from_secs(600),
            )?,
            max_clients: self.int(
                "lan.max_clients",
                lan_raw.max_clients.as_ref(),
                100_000,
                1..=1_000_000,
            )? as usize,
            max_addresses_per_client: self.int(
                "lan.max_addresses_per_client",
                lan_raw.max_addresses_per_client.as_ref(),
                16,
                1..=1024,
            )? as usize,
            client_usage: lan_raw.client_usage.unwrap_or(false),
        })
    }

    /// `[[uplink]]`: names, interfaces, next hops, marks and tables.
    fn uplinks(
        &self,
        raw: Vec<Spanned<RawUplink>>,
        lan: &LanConfig,
        dataplane: &DataplaneConfig,
    ) -> Result<Vec<UplinkConfig>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err(None, "uplink", "at least one [[uplink]] is required"));
        }
        let mut uplinks: Vec<UplinkConfig> = Vec::new();
        let (mut names, mut ifaces) = (HashSet::new(), HashSet::new());
        let (mut marks, mut tables) = (HashMap::new(), HashMap::new());
        for (i, u) in raw.into_iter().enumerate() {
            let span = u.span();
            let u = u.into_inner();
            let key = |k: &str| format!("uplink[{i}].{k}");
            let name = u.name.get_ref().trim().to_string();
            let valid_name = !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name {
                return Err(self.err(
                    Some(u.name.span()),
                    key("name"),
                    format!(
                        "invalid uplink name {:?}: 1-32 characters of A-Z a-z 0-9 - _",
                        u.name.get_ref()
                    ),
                ));
            }
            if !names.insert(name.clone()) {
                return Err(self.err(
                    Some(u.name.span()),
                    key("name"),
                    format!("duplicate uplink name {name:?}; names must be unique"),
                ));
            }
            if let Some(b) = &u.balance {
                return Err(self.err(
                    Some(b.span()),
                    key("balance"),
                    "uplink.balance is gone (it never changed anything): set the spreading mode in [dispatch] balance = \"client\" | \"connection\" | \"destination\", or per [[policy]] with `balance`",
                ));
            }
            let interface = self.ifname(&key("interface"), &u.interface)?;
            if !ifaces.insert(interface.clone()) {
                return Err(self.err(
                    Some(u.interface.span()),
                    key("interface"),
                    format!("interface {interface:?} is already used by another uplink; interfaces must be unique"),
                ));
            }
            if lan.interfaces.contains(&interface) {
                return Err(self.err(
                    Some(u.interface.span()),
                    key("interface"),
                    format!("interface {interface:?} is also listed in lan.interfaces"),
                ));
            }
            let gateway = match &u.gateway {
                None => None,
                Some(g) if g.get_ref().trim() == "auto" => Some(NextHop::Auto),
                Some(g) => Some(NextHop::Static(g.get_ref().trim().parse::<Ipv4Addr>().map_err(|_| {
                    self.err(
                        Some(g.span()),
                        key("gateway"),
                        format!(
                            "invalid IPv4 address {:?}; use an address, \"auto\" (learned from the default route on the interface: DHCP, PPP), or omit the key on point-to-point links",
                            g.get_ref()
                        ),
                    )
                })?)),
            };
            let gateway6 = match &u.gateway6 {
                None => None,
                Some(g) if g.get_ref().trim() == "auto" => Some(NextHop::Auto),
                Some(g) => Some(NextHop::Static(g.get_ref().trim().parse::<Ipv6Addr>().map_err(|_| {
                    self.err(
                        Some(g.span()),
                        key("gateway6"),
                        format!("invalid IPv6 address {:?}; use an address or \"auto\" (learned from router adverts)", g.get_ref()),
                    )
                })?)),
            };
            let weight = match &u.weight {
                None => 1,
                Some(w) => {
                    let v = *w.get_ref();
                    if !(1..=1000).contains(&v) {
                        return Err(self.err(
                            Some(w.span()),
                            key("weight"),
                            format!("must be between 1 and 1000 (got {v})"),
                        ));
                    }
                    v as u32
                }
            };
            let max_mark = dataplane.max_mark_id();
            let mark = match &u.mark {
                None => i as u32 + 1,
                Some(m) => {
                    let v = *m.get_ref();
                    if v < 1 || v > max_mark as i64 {
                        return Err(self.err(
                            Some(m.span()),
                            key("mark"),
                            format!("must be between 1 and {max_mark} to fit dataplane.fwmark_mask {:#x} (got {v})", dataplane.fwmark_mask),
                        ));
                    }
                    v as u32
                }
            };
            if mark > max_mark {
                return Err(self.err(
                    Some(span.clone()),
                    key("mark"),
                    format!("more uplinks than dataplane.fwmark_mask {:#x} has mark ids (1..={max_mark})", dataplane.fwmark_mask),
                ));
            }
            if let Some(other) = marks.insert(mark, i) {
                let implicit = if u.mark.is_none() {
                    " (the default: position in the list)"
                } else {
                    ""
                };
                return Err(self.err(
                    Some(u.mark.as_ref().map(|m| m.span()).unwrap_or(span.clone())),
                    key("mark"),
                    format!("mark {mark}{implicit} is already used by uplink[{other}]; marks must be unique"),
                ));
            }
            let owned = dataplane.owned_tables();
            let table = match &u.table {
                None => dataplane.table_base + mark,
                Some(t) => {
                    let v = *t.get_ref();
                    if v < *owned.start() as i64 || v > *owned.end() as i64 {
                        return Err(self.err(
                            Some(t.span()),
                            key("table"),
                            format!("must be within uplinkd's tables {}..={} (dataplane.table_base + 1 ..) (got {v})", owned.start(), owned.end()),
                        ));
                    }
                    v as u32
                }
            };
            if let Some(other) = tables.insert(table, i) {
                let implicit = if u.table.is_none() {
                    " (the default: table_base + mark)"
                } else {
                    ""
                };
                return Err(self.err(
                    Some(u.table.as_ref().map(|t| t.span()).unwrap_or(span.clone())),
                    key("table"),
                    format!("routing table {table}{implicit} is already used by uplink[{other}]; tables must be unique"),
                ));
            }
            let mut probes = Vec::new();
            for (j, p) in u.probes.iter().enumerate() {
                let probe: Probe = p.get_ref().trim().parse().map_err(|e: String| {
                    self.err(Some(p.span()), key(&format!("probes[{j}]")), e)
                })?;
                if probes.contains(&probe) {
                    return Err(self.err(
                        Some(p.span()),
                        key(&format!("probes[{j}]")),
                        format!("duplicate probe {probe}"),
                    ));
                }
                probes.push(probe);
            }
            let probe_quorum = self.int(
                &key("probe_quorum"),
                u.probe_quorum.as_ref(),
                1,
                1..=probes.len().max(1) as i64,
            )? as u32;
            let tier = self.int(&key("tier"), u.tier.as_ref(), 1, 1..=9)? as u32;
            let quota_period = match u.quota_period.unwrap_or(RawQuotaPeriod::Month) {
                RawQuotaPeriod::Day => {
                    if let Some(r) = &u.quota_reset {
                        return Err(self.err(
                            Some(r.span()),
                            key("quota_reset"),
                            "a daily period starts at midnight: quota_reset applies to \"week\" (1 = Monday … 7 = Sunday) and \"month\" (day 1–28)",
                        ));
                    }
                    QuotaPeriod::Day
                }
                RawQuotaPeriod::Week => QuotaPeriod::Week {
                    starts: self.int(&key("quota_reset"), u.quota_reset.as_ref(), 1, 1..=7)? as u32,
                },
                RawQuotaPeriod::Month => QuotaPeriod::Month {
                    starts: self.int(&key("quota_reset"), u.quota_reset.as_ref(), 1, 1..=28)?
                        as u32,
                },
            };
            let probe_expect = match &u.probe_expect {
                None => None,
                Some(e) if e.get_ref().is_empty() => {
                    return Err(self.err(
                        Some(e.span()),
                        key("probe_expect"),
                        "empty text matches every answer; leave probe_expect out instead",
                    ));
                }
                Some(_) if !probes.iter().any(|p| matches!(p, Probe::Http { .. })) => {
                    return Err(self.err(
                        u.probe_expect.as_ref().map(|e| e.span()),
                        key("probe_expect"),
                        "probe_expect is the text an HTTP probe's answer must contain: add an \"http://ADDRESS/PATH\" probe, or remove it",
                    ));
                }
                Some(e) => Some(e.get_ref().clone()),
            };
            uplinks.push(UplinkConfig {
                name,
                interface,
                gateway,
                gateway6,
                ipv6: u.ipv6.unwrap_or(gateway6.is_some() || gateway.is_none()),
                weight,
                masquerade: u.masquerade.unwrap_or(true),
                mark,
                table,
                probes,
                probe_quorum,
                probe_expect,
                tier,
                metered: u.metered.unwrap_or(false),
                quota_period,
                quota: match &u.quota {
                    None => None,
                    Some(q) => Some(self.size(&key("quota"), q)?),
                },
                quota_action: u.quota_action.unwrap_or_default(),
            });
            if u.quota.is_none() && u.quota_action.is_some() {
                return Err(self.err(
                    None,
                    key("quota_action"),
                    "quota_action applies once usage reaches quota: set quota too (e.g. quota = \"20GB\"), or remove quota_action",
                ));
            }
        }
        for u in &uplinks {
            if u.ipv6 && u.gateway6.is_none() && !u.point_to_point() {
                let i = uplinks
                    .iter()
                    .position(|x| x.name == u.name)
                    .unwrap_or_default();
                return Err(self.err(
                    None,
                    format!("uplink[{i}].ipv6"),
                    "ipv6 = true needs gateway6 unless the link is point-to-point (no gateway)",
                ));
            }
        }
        Ok(uplinks)
    }

    /// `[metrics]`: `None` when disabled.
    fn metrics(&self, raw: RawMetrics) -> Result<Option<MetricsConfig>, ConfigError> {
        Ok(match raw.enabled {
            Some(false) => None,
            _ => {
                let listen = match raw.listen {
                    // Loopback by default: the gateway's WAN side must not read its
                    // metrics unless the operator opens them deliberately.
                    None => "127.0.0.1:9477".parse().expect("default address parses"),
                    Some(v) => v.get_ref().trim().parse().map_err(|_| {
                        self.err(
                            Some(v.span()),
                            "metrics.listen",
                            format!(
                                "invalid address {:?}; use IP:PORT, e.g. \"0.0.0.0:9477\"",
                                v.get_ref()
                            ),
                        )
                    })?,
                };
                let tls = match (raw.cert, raw.key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => {
                        for (key, p) in [("metrics.cert", &c), ("metrics.key", &k)] {
                            if !p.get_ref().is_file() {
                                return Err(self.err(
                                    Some(p.span()),
                                    key,
                                    format!(
                                        "{} is not a readable file (PEM)",
                                        p.get_ref().display()
                                    ),
                                ));
                            }
                        }
                        Some((c.into_inner(), k.into_inner()))
                    }
                    (Some(c), None) => {
                        return Err(self.err(
                            Some(c.span()),
                            "metrics.key",
                            "metrics.cert needs metrics.key too",
                        ));
                    }
                    (None, Some(k)) => {
                        return Err(self.err(
                            Some(k.span()),
                            "metrics.cert",
                            "metrics.key needs metrics.cert too",
                        ));
                    }
                };
                let max_connections = self.int(
                    "metrics.max_connections",
                    raw.max_connections.as_ref(),
                    64,
                    1..=10_000,
                )? as usize;
                Some(MetricsConfig {
                    listen,
                    max_connections,
                    tls,
                })
            }
        })
    }

    /// `[local]`: where the gateway's own connections go.
    fn local(&self, raw: RawLocal, policies: &[PolicyConfig]) -> Result<LocalPolicy, ConfigError> {
        Ok(match raw.policy {
            None => LocalPolicy::Main,
            Some(v) => match v.get_ref().trim() {
                "main" => LocalPolicy::Main,
                "default" => LocalPolicy::Default,
                name => match policies.iter().position(|x| x.name == name) {
                    Some(i) => LocalPolicy::Policy(i),
                    None => {
                        let mut valid = vec!["\"main\"".to_string(), "\"default\"".to_string()];
                        valid.extend(policies.iter().map(|x| format!("{:?}", x.name)));
                        return Err(self.err(
                            Some(v.span()),
                            "local.policy",
                            format!("unknown policy {name:?}; use one of {}", valid.join(", ")),
                        ));
                    }
                },
            },
        })
    }

    /// An integer key with a default and a valid range.
    fn int(
        &self,
        key: &str,
        value: Option<&Spanned<i64>>,
        default: i64,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<i64, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        if !range.contains(v.get_ref()) {
            return Err(self.err(
                Some(v.span()),
                key,
                format!(
                    "must be between {} and {} (got {})",
                    range.start(),
                    range.end(),
                    v.get_ref()
                ),
            ));
        }
        Ok(*v.get_ref())
    }

    /// A size in bytes: "20GB", "20GiB" or a number; at least one byte.
    fn size(&self, key: &str, v: &Spanned<toml::Value>) -> Result<u64, ConfigError> {
        let parsed = match v.get_ref() {
            toml::Value::String(text) => uplink_api::size::parse(text),
            toml::Value::Integer(n) => u64::try_from(*n).map_err(|_| format!("{n} is negative")),
            other => Err(format!(
                "{other} is not a size: write a string such as \"20GB\" or \"20GiB\", or a number of bytes"
            )),
        };
        match parsed {
            Ok(0) => Err(self.err(
                Some(v.span()),
                key,
                "a quota of 0 bytes allows nothing; leave quota out for no cap",
            )),
            Ok(n) => Ok(n),
            Err(e) => Err(self.err(Some(v.span()), key, e)),
        }
    }

    fn api(&self, raw: RawApi) -> Result<ApiConfig, ConfigError> {
        let addr = |key: &str,
                    v: Option<Spanned<String>>,
                    default: &str|
         -> Result<std::net::SocketAddr, ConfigError> {
            match v {
                None => Ok(default.parse().expect("default address parses")),
                Some(v) => v.get_ref().trim().parse().map_err(|_| self.err(Some(v.span()), key, format!("invalid address {:?}; use IP:PORT, e.g. \"0.0.0.0:7443\" or \"[::]:7443\"", v.get_ref()))),
            }
        };
        for (key, p) in [
            ("api.ca", &raw.ca),
            ("api.cert", &raw.cert),
            ("api.key", &raw.key),
        ] {
            if !p.get_ref().is_file() {
                return Err(self.err(
                    Some(p.span()),
                    key,
                    format!("{} is not a readable file (PEM)", p.get_ref().display()),
                ));
            }
        }
        Ok(ApiConfig {
            listen: addr("api.listen", raw.listen, "0.0.0.0:7443")?,
            ca: raw.ca.into_inner(),
            cert: raw.cert.into_inner(),
            key: raw.key.into_inner(),
            health_listen: addr("api.health_listen", raw.health_listen, "127.0.0.1:7444")?,
        })
    }

    fn health(&self, raw: RawHealth) -> Result<HealthConfig, ConfigError> {
        let timeout_span = raw.timeout.as_ref().map(|t| t.span());
        let h = HealthConfig {
            interval: self.duration("health.interval", raw.interval, Duration::from_millis(200))?,
            timeout: self.duration("health.timeout", raw.timeout, Duration::from_millis(600))?,
            down_after: self.int("health.down_after", raw.down_after.as_ref(), 3, 1..=100)? as u32,
            up_after: self.int("health.up_after", raw.up_after.as_ref(), 5, 1..=100)? as u32,
            max_loss: match raw.max_loss {
                None => None,
                Some(l) if (0.0..=1.0).contains(l.get_ref()) => Some(*l.get_ref()),
                Some(l) => {
                    return Err(self.err(
                        Some(l.span()),
                        "health.max_loss",
                        format!("must be a ratio between 0.0 and 1.0 (got {})", l.get_ref()),
                    ));
                }
            },
            max_rtt: match raw.max_rtt {
                None => None,
                some => Some(self.duration("health.max_rtt", some, Duration::ZERO)?),
            },
            stats_window: self.int(
                "health.stats_window",
                raw.stats_window.as_ref(),
                50,
                2..=10_000,
            )? as u32,
            passive: raw.passive.unwrap_or(true),
            passive_max_rounds: self.int(
                "health.passive_max_rounds",
                raw.passive_max_rounds.as_ref(),
                50,
                1..=10_000,
            )? as u32,
            passive_window: self.duration(
                "health.passive_window",
                raw.passive_window,
                Duration::from_millis(150),
            )?,
            burst_count: self.int("health.burst_count", raw.burst_count.as_ref(), 3, 1..=20)?
                as u32,
            burst_interval: self.duration(
                "health.burst_interval",
                raw.burst_interval,
                Duration::from_millis(20),
            )?,
            passive_min_destinations: self.int(
                "health.passive_min_destinations",
                raw.passive_min_destinations.as_ref(),
                3,
                1..=1000,
            )? as u32,
            standby_interval: self.duration(
                "health.standby_interval",
                raw.standby_interval,
                Duration::from_secs(5),
            )?,
        };
        if h.interval < Duration::from_millis(10) {
            return Err(self.err(None, "health.interval", "must be at least 10ms"));
        }
        if h.timeout > Duration::from_secs(60) {
            return Err(self.err(timeout_span, "health.timeout", "must be at most 60s"));
        }
        if h.passive_window < Duration::from_millis(20)
            || h.passive_window > Duration::from_secs(10)
        {
            return Err(self.err(
                None,
                "health.passive_window",
                "must be between 20ms and 10s",
            ));
        }
        if h.burst_interval < Duration::from_millis(1) || h.burst_interval > Duration::from_secs(1)
        {
            return Err(self.err(None, "health.burst_interval", "must be between 1ms and 1s"));
        }
        if h.standby_interval < h.interval || h.standby_interval > Duration::from_secs(3600) {
            return Err(self.err(
                None,
                "health.standby_interval",
                format!(
                    "must be between health.interval ({}) and 1h",
                    humantime::format_duration(h.interval)
                ),
            ));
        }
        Ok(h)
    }

    /// `failback_flows = "move"` marks the connections a failover places, with one id per
    /// uplink in the conntrack-mark bits of policy ids, taken from the top: they must not
    /// reach the ids of the policies with an SLA.
    fn room_for_failback_flows(
        &self,
        dp: &DataplaneConfig,
        uplinks: &[UplinkConfig],
        policies: &[PolicyConfig],
    ) -> Result<(), ConfigError> {
        let highest_mark = uplinks.iter().map(|u| u.mark).max().unwrap_or(0);
        let highest_sla = policies
            .iter()
            .rposition(|p| p.sla.is_set())
            .map_or(0, |i| i as u32 + 1);
        if dp.policy_mark_mask == 0 || highest_sla + highest_mark > dp.max_policy_id() {
            return Err(self.err(
                None,
                "failover.failback_flows",
                format!(
                    "\"move\" (and a metered uplink, whose flows always move) marks the flows a failover moves with one id per uplink in dataplane.policy_mark_mask ({:#x}, ids 1..={}), from the top down; uplink mark ids up to {} and policies with an SLA up to id {} do not fit: widen the mask, or use \"keep\"",
                    dp.policy_mark_mask,
                    dp.max_policy_id(),
                    highest_mark,
                    highest_sla
                ),
            ));
        }
        Ok(())
    }

    fn failover(&self, raw: RawFailover) -> Result<FailoverConfig, ConfigError> {
        Ok(FailoverConfig {
            failback: raw.failback.unwrap_or(Failback::Auto),
            failback_flows: raw.failback_flows.unwrap_or(FailbackFlows::Keep),
            failback_delay: match raw.failback_delay {
                Some(d) if d.get_ref().trim() == "0s" => Duration::ZERO,
                d => self.duration("failover.failback_delay", d, Duration::from_secs(30))?,
            },
            max_flaps: self.int("failover.max_flaps", raw.max_flaps.as_ref(), 5, 1..=1000)? as u32,
            window: self.duration("failover.window", raw.window, Duration::from_secs(300))?,
            hold: self.duration("failover.hold", raw.hold, Duration::from_secs(300))?,
        })
    }

    fn dataplane(&self, raw: RawDataplane) -> Result<DataplaneConfig, ConfigError> {
        let nft_table = match raw.nft_table {
            None => "uplinkd".to_string(),
            Some(t) => {
                let s = t.get_ref();
                let valid = !s.is_empty()
                    && s.len() <= 64
                    && s.starts_with(|c: char| c.is_ascii_alphabetic())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !valid {
                    return Err(self.err(
                        Some(t.span()),
                        "dataplane.nft_table",
                        format!(
                            "invalid table name {s:?}: a letter, then letters, digits, '_' or '-'"
                        ),
                    ));
                }
                s.clone()
            }
        };
        // Contiguous, non-empty: ids are shifted into it.
        let contiguous = |v: u32| {
            v != 0
                && (v >> v.trailing_zeros()).count_ones()
                    == 32 - (v >> v.trailing_zeros()).leading_zeros()
        };
        let fwmark_mask = match raw.fwmark_mask {
            None => 0x3f00_0000,
            Some(m) => {
                let v = *m.get_ref();
                if !contiguous(v) || v.count_ones() > 16 {
                    return Err(self.err(
                        Some(m.span()),
                        "dataplane.fwmark_mask",
                        format!("must be one contiguous run of 1 to 16 bits, e.g. 0x3f000000 (got {v:#x})"),
                    ));
                }
                v
            }
        };
        let policy_mark_mask = match raw.policy_mark_mask {
            None => default_policy_mark_mask(fwmark_mask),
            Some(m) => {
                let v = *m.get_ref();
                if v != 0 && (!contiguous(v) || v.count_ones() > 16) {
                    return Err(self.err(
                        Some(m.span()),
                        "dataplane.policy_mark_mask",
                        format!("must be 0 or one contiguous run of 1 to 16 bits, e.g. 0xff0000 (got {v:#x})"),
                    ));
                }
                if v & fwmark_mask != 0 {
                    return Err(self.err(
                        Some(m.span()),
                        "dataplane.policy_mark_mask",
                        format!("{v:#x} overlaps dataplane.fwmark_mask {fwmark_mask:#x}: the two must own different bits"),
                    ));
                }
                v
            }
        };
        let rule_priority = match raw.rule_priority {
            None => 10000,
            Some(p) => {
                let v = *p.get_ref();
                if !(1..=32765 - RULE_PRIORITY_BAND).contains(&v) {
                    return Err(self.err(
                        Some(p.span()),
                        "dataplane.rule_priority",
                        format!("must be between 1 and {} so the band of {RULE_PRIORITY_BAND} stays before the main table's rule (got {v})", 32765 - RULE_PRIORITY_BAND),
                    ));
                }
                v
            }
        };
        let route_protocol = match raw.route_protocol {
            None => 171,
            Some(p) => {
                let v = *p.get_ref();
                // 0-4 are the kernel's own (unspec, redirect, kernel, boot, static).
                if !(5..=254).contains(&v) {
                    return Err(self.err(
                        Some(p.span()),
                        "dataplane.route_protocol",
                        format!("must be between 5 and 254 (got {v})"),
                    ));
                }
                v as u8
            }
        };
        let mut dp = DataplaneConfig {
            nft_table,
            fwmark_mask,
            policy_mark_mask,
            rule_priority,
            table_base: 1000,
            route_protocol,
            nft: raw.nft.unwrap_or_else(|| system_binary("nft")),
            conntrack: raw.conntrack.unwrap_or_else(|| system_binary("conntrack")),
            command_timeout: self.duration(
                "dataplane.command_timeout",
                raw.command_timeout,
                Duration::from_secs(10),
            )?,
            conntrack_flush: raw.conntrack_flush.unwrap_or(ConntrackFlush::Netlink),
            nflog_group: self.int(
                "dataplane.nflog_group",
                raw.nflog_group.as_ref(),
                DEFAULT_NFLOG_GROUP,
                1..=65535,
            )? as u16,
        };
        if let Some(b) = raw.table_base {
            let v = *b.get_ref();
            dp.table_base = v;
            // 253-255 are default/main/local; 0 is unspec.
            let reserved = dp.owned_tables().any(|t| (253..=255).contains(&t))
                || v.checked_add(dp.max_mark_id()).is_none();
            if v == 0 || reserved {
                return Err(self.err(
                    Some(b.span()),
                    "dataplane.table_base",
                    format!(
                        "tables {}..={} would include a reserved table (0, 253 default, 254 main, 255 local) or overflow; pick e.g. 1000",
                        v.saturating_add(1),
                        v.saturating_add(dp.max_mark_id())
                    ),
                ));
            }
        }
        Ok(dp)
    }
}

/// A root daemon does not search PATH for the tools it runs: the default is the absolute
/// path where the distribution installs them (the first that exists).
fn system_binary(name: &str) -> PathBuf {
    let candidates = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(|d| Path::new(d).join(name));
    candidates
        .iter()
        .find(|p| p.is_file())
        .unwrap_or(&candidates[0])
        .clone()
}

fn hostname() -> String {
    nix_hostname().unwrap_or_else(|| "uplinkd".to_string())
}

fn nix_hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let s = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
name = "gw-01"
state_dir = "/tmp/x"
resync_interval = "10s"

[lan]
interfaces = ["br-lan"]
prefixes = ["192.168.1.0/24", "2001:db8:1::/64"]
client_idle_timeout = "10m"

[[uplink]]
name = "isp1"
interface = "wan1"
gateway = "100.64.1.1"
gateway6 = "fe80::1"
weight = 2

[[uplink]]
name = "lte"
interface = "ppp0"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    #[test]
    fn parses_contract_keys_and_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.agent.name, "gw-01");
        assert_eq!(c.agent.resync_interval, Duration::from_secs(10));
        assert_eq!(c.lan.client_idle_timeout, Duration::from_secs(600));
        assert_eq!(c.uplinks.len(), 2);
        assert_eq!(c.uplinks[0].weight, 2);
        assert!(c.uplinks[0].ipv6);
        assert_eq!(c.uplinks[0].mark, 1);
        assert_eq!(c.uplinks[0].table, 1001);
        assert!(c.uplinks[1].point_to_point());
        assert!(
            c.uplinks[1].ipv6,
            "point-to-point links route IPv6 by device"
        );
        assert!(c.uplinks[1].masquerade);
        assert_eq!(c.dataplane.fwmark(1), 0x0100_0000);
        assert_eq!(c.dataplane.max_mark_id(), 63);
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = GOOD.replace("weight = 2", "weight = 0");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key, "uplink[0].weight");
        assert_eq!(e.line, Some(17));
        assert!(
            e.to_string()
                .starts_with("t.toml:17: uplink[0].weight: must be between 1 and 1000"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_is_an_error_with_line() {
        let bad = GOOD.replace("weight = 2", "wieght = 2");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.key, "wieght");
        assert_eq!(e.line, Some(17));
    }

    #[test]
    fn interface_names_with_nft_wildcard_or_set_characters_are_refused() {
        for bad in ["wan*", "wan@x", "{wan}"] {
            let e = parse(&GOOD.replace("\"wan1\"", &format!("{bad:?}"))).unwrap_err();
            assert_eq!(e.key, "uplink[0].interface", "{bad}: {e}");
        }
        assert!(parse(&GOOD.replace("\"wan1\"", "\"wan1.100\"")).is_ok());
    }

    #[test]
    fn policy_mark_mask_sits_beside_fwmark_mask_and_never_overlaps_it() {
        assert_eq!(DataplaneConfig::defaults().policy_mark_mask, 0x00ff_0000);
        let c = parse(&format!("[dataplane]\nfwmark_mask = 0x0f00\n{GOOD}")).unwrap();
        assert_eq!(c.dataplane.policy_mark_mask, 0xff);
        let e = parse(&format!(
            "[dataplane]\nfwmark_mask = 0xff00\npolicy_mark_mask = 0x1f000\n{GOOD}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "dataplane.policy_mark_mask");
        assert!(
            e.message.contains("overlaps dataplane.fwmark_mask 0xff00"),
            "{e}"
        );
        let off = parse(&format!("[dataplane]\npolicy_mark_mask = 0\n{GOOD}")).unwrap();
        assert_eq!(off.dataplane.policy_ctmark(0), None);
        let on = DataplaneConfig::defaults();
        assert_eq!(on.policy_ctmark(0), Some(0x0001_0000));
        assert_eq!(on.max_policy_id(), 255);
    }

    #[test]
    fn failback_flows_move_takes_ids_from_the_top_of_the_policy_bits() {
        let c = parse(&format!("[failover]\nfailback_flows = \"move\"\n{GOOD}")).unwrap();
        assert_eq!(c.failover.failback_flows, FailbackFlows::Move);
        let dp = &c.dataplane;
        assert_eq!(dp.away_ctmark(1), Some(0x00ff_0000));
        assert_eq!(dp.away_ctmark(2), Some(0x00fe_0000));
        assert_eq!(dp.away_ctmark(256), None);
        assert_eq!(
            parse(GOOD).unwrap().failover.failback_flows,
            FailbackFlows::Keep
        );
        // Without policy bits there is nowhere to mark the flows a failover placed.
        let e = parse(&format!(
            "[failover]\nfailback_flows = \"move\"\n[dataplane]\npolicy_mark_mask = 0\n{GOOD}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "failover.failback_flows");
        assert!(e.message.contains("widen the mask, or use \"keep\""), "{e}");
        // One bit holds one id: not enough for two uplinks.
        let e = parse(&format!(
            "[failover]\nfailback_flows = \"move\"\n[dataplane]\npolicy_mark_mask = 0x10000\n{GOOD}"
        ))
        .unwrap_err();
        assert_eq!(e.key, "failover.failback_flows", "{e}");
        let e = parse(&format!(
            "[failover]\nfailback_flows = \"teleport\"\n{GOOD}"
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("keep") && e.to_string().contains("move"),
            "{e}"
        );
        assert_eq!(e.key, "failover.failback_flows");
    }

    #[test]
    fn usage_periods_start_on_a_day_of_the_month_or_week_or_at_midnight() {
        let with = |keys: &str| GOOD.replacen("weight = 2", &format!("weight = 2\n{keys}"), 1);
        let c = parse(GOOD).unwrap();
        assert_eq!(c.uplinks[0].quota_period, QuotaPeriod::Month { starts: 1 });
        let c = parse(&with("quota_period = \"week\"\nquota_reset = 7")).unwrap();
        assert_eq!(c.uplinks[0].quota_period, QuotaPeriod::Week { starts: 7 });
        let c = parse(&with("quota_reset = 28")).unwrap();
        assert_eq!(c.uplinks[0].quota_period, QuotaPeriod::Month { starts: 28 });
        let e = parse(&with("quota_reset = 29")).unwrap_err();
        assert_eq!(e.key, "uplink[0].quota_reset", "{e}");
        let e = parse(&with("quota_period = \"week\"\nquota_reset = 8")).unwrap_err();
        assert_eq!(e.key, "uplink[0].quota_reset", "{e}");
        let e = parse(&with("quota_period = \"day\"\nquota_reset = 1")).unwrap_err();
        assert!(e.message.contains("starts at midnight"), "{e}");
        let e = parse(&with("quota_period = \"year\"")).unwrap_err();
        assert!(e.to_string().contains("month"), "{e}");
        assert_eq!(e.key, "uplink[0].quota_period", "a bad value names its key");
    }

    #[test]
    fn http_and_dns_probes_parse_and_print_back() {
        for text in [
            "http://203.0.113.80/generate_204",
            "http://[2001:db8::80]:8080/",
            "dns:203.0.113.53/uplink.test",
            "dns:[2001:db8::53]:5353/example.org",
            "icmp:203.0.113.10",
            "tcp:203.0.113.10:443",
        ] {
            let p: Probe = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
        }
        assert_eq!(
            "http://203.0.113.80".parse::<Probe>().unwrap(),
            Probe::Http {
                addr: "203.0.113.80:80".parse().unwrap(),
                path: "/".into()
            }
        );
        let e = "http://example.com/".parse::<Probe>().unwrap_err();
        assert!(e.contains("must be an address"), "{e}");
        assert!("dns:203.0.113.53/".parse::<Probe>().is_err());
        assert!("dns:203.0.113.53/bad name".parse::<Probe>().is_err());
        assert!("https://203.0.113.80/".parse::<Probe>().is_err());
        let with = |keys: &str| GOOD.replacen("weight = 2", &format!("weight = 2\n{keys}"), 1);
        let c = parse(&with(
            "probes = [\"http://203.0.113.80/ok\"]\nprobe_expect = \"uplink-ok\"",
        ))
        .unwrap();
        assert_eq!(c.uplinks[0].probe_expect.as_deref(), Some("uplink-ok"));
        let e = parse(&with(
            "probes = [\"icmp:203.0.113.10\"]\nprobe_expect = \"x\"",
        ))
        .unwrap_err();
        assert_eq!(e.key, "uplink[0].probe_expect", "{e}");
    }

    #[test]
    fn quotas_are_sizes_with_an_action() {
        let with = |keys: &str| GOOD.replacen("weight = 2", &format!("weight = 2\n{keys}"), 1);
        let c = parse(GOOD).unwrap();
        assert_eq!(c.uplinks[0].quota, None);
        let c = parse(&with("quota = \"20GB\"")).unwrap();
        assert_eq!(c.uplinks[0].quota, Some(20_000_000_000));
        assert_eq!(c.uplinks[0].quota_action, QuotaAction::Standby);
        let c = parse(&with("quota = \"1GiB\"\nquota_action = \"stop\"")).unwrap();
        assert_eq!(
            (c.uplinks[0].quota, c.uplinks[0].quota_action),
            (Some(1 << 30), QuotaAction::Stop)
        );
        let c = parse(&with("quota = 1000000\nquota_action = \"alert\"")).unwrap();
        assert_eq!(c.uplinks[0].quota, Some(1_000_000));
        for bad in [
            "quota = \"20XB\"",
            "quota = 0",
            "quota = -5",
            "quota = true",
        ] {
            let e = parse(&with(bad)).unwrap_err();
            assert_eq!(e.key, "uplink[0].quota", "{bad}: {e}");
        }
        let e = parse(&with("quota = \"20GB\"\nquota_action = \"throttle\"")).unwrap_err();
        assert!(e.to_string().contains("standby"), "{e}");
        let e = parse(&with("quota_action = \"stop\"")).unwrap_err();
        assert_eq!(e.key, "uplink[0].quota_action", "{e}");
    }

    #[test]
    fn fwmark_mask_must_be_contiguous() {
        let e = parse(&format!("[dataplane]\nfwmark_mask = 0x0f0f\n{GOOD}")).unwrap_err();
        assert_eq!(e.key, "dataplane.fwmark_mask");
    }
}
