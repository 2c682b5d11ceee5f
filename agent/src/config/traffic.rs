//! Traffic policy in the config: `[dispatch]`, `[[set]]`, `[[policy]]` and `[[rule]]`,
//! validated into typed values that name uplinks, sets and policies by index.

use std::time::Duration;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, UplinkConfig, Validator};

/// Rules at most; each is one or two nft rules evaluated in order for a new connection.
pub const MAX_RULES: usize = 4096;
/// Elements per set at most (config and API together).
pub const MAX_SET_ELEMENTS: usize = 65_536;

/// How a policy spreads new connections over its usable candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sticky per client (the default policy: least-loaded homes; a `[[policy]]`: a hash
    /// of the client's address over the candidates, by weight).
    Client,
    /// Each new connection picks an uplink by weight and keeps it for its life.
    Connection,
    /// Sticky per (client, destination address), by weight.
    Destination,
    /// The first usable uplink in the policy's list order.
    Failover,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Client => "client",
            Mode::Connection => "connection",
            Mode::Destination => "destination",
            Mode::Failover => "failover",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "client" => Mode::Client,
            "connection" => Mode::Connection,
            "destination" => Mode::Destination,
            "failover" => Mode::Failover,
            _ => return None,
        })
    }
}

/// What a policy does when none of its candidates can carry traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenNone {
    /// Falls back to the default policy.
    Default,
    Drop,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sla {
    pub max_rtt: Option<Duration>,
    pub max_loss: Option<f64>,
    pub max_jitter: Option<Duration>,
}

impl Sla {
    pub fn is_set(&self) -> bool {
        self.max_rtt.is_some() || self.max_loss.is_some() || self.max_jitter.is_some()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    pub name: String,
    /// Candidate uplinks (indices into `Config::uplinks`), in the listed order.
    pub uplinks: Vec<usize>,
    pub mode: Mode,
    pub sla: Sla,
    pub when_none: WhenNone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetConfig {
    pub name: String,
    pub v4: Vec<Ipv4Net>,
    pub v6: Vec<Ipv6Net>,
    /// Created by uplinkd, filled by someone else (e.g. dnsmasq `--nftset`).
    pub external: bool,
}

/// One side of an address match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrMatch {
    Net(IpNet),
    /// Index into `Config::sets`.
    Set(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Any => "any",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Icmpv6 => "icmpv6",
        }
    }

    pub fn parse(s: &str) -> Option<Proto> {
        Some(match s {
            "any" => Proto::Any,
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            "icmp" => Proto::Icmp,
            "icmpv6" => Proto::Icmpv6,
            _ => return None,
        })
    }

    /// IP protocol number; `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Proto::Any => None,
            Proto::Tcp => Some(6),
            Proto::Udp => Some(17),
            Proto::Icmp => Some(1),
            Proto::Icmpv6 => Some(58),
        }
    }
}

/// Where a rule sends what it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Index into `Config::policies`.
    Policy(usize),
    /// The default policy (what unmatched traffic gets), ending rule evaluation.
    Default,
    /// Left to the main routing table: no mark.
    Main,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub name: String,
    pub src: Vec<AddrMatch>,
    pub dst: Vec<AddrMatch>,
    pub proto: Proto,
    /// Inclusive port ranges; a single port is `(p, p)`.
    pub sport: Vec<(u16, u16)>,
    pub dport: Vec<(u16, u16)>,
    pub dscp: Vec<u8>,
    pub iif: Vec<String>,
    pub target: Target,
    /// Whether the rule can match IPv4 and IPv6 packets.
    pub v4: bool,
    pub v6: bool,
}

/// DSCP names nft and operators use, with their code points.
pub const DSCP_NAMES: &[(&str, u8)] = &[
    ("cs0", 0),
    ("be", 0),
    ("le", 1),
    ("cs1", 8),
    ("af11", 10),
    ("af12", 12),
    ("af13", 14),
    ("cs2", 16),
    ("af21", 18),
    ("af22", 20),
    ("af23", 22),
    ("cs3", 24),
    ("af31", 26),
    ("af32", 28),
    ("af33", 30),
    ("cs4", 32),
    ("af41", 34),
    ("af42", 36),
    ("af43", 38),
    ("cs5", 40),
    ("va", 44),
    ("ef", 46),
    ("cs6", 48),
    ("cs7", 56),
];

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDispatch {
    balance: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSet {
    name: Spanned<String>,
    #[serde(default)]
    elements: Option<Spanned<Vec<Spanned<String>>>>,
    external: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    name: Spanned<String>,
    uplinks: Option<Spanned<Vec<Spanned<String>>>>,
    balance: Option<Spanned<String>>,
    max_rtt: Option<Spanned<String>>,
    max_loss: Option<Spanned<f64>>,
    max_jitter: Option<Spanned<String>>,
    when_none: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawDscp {
    Number(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    name: Spanned<String>,
    src: Option<Spanned<Vec<Spanned<String>>>>,
    dst: Option<Spanned<Vec<Spanned<String>>>>,
    proto: Option<Spanned<String>>,
    sport: Option<Spanned<Vec<Spanned<RawPort>>>>,
    dport: Option<Spanned<Vec<Spanned<RawPort>>>>,
    dscp: Option<Spanned<Vec<Spanned<RawDscp>>>>,
    iif: Option<Spanned<Vec<Spanned<String>>>>,
    policy: Spanned<String>,
}

/// Names of sets, policies and rules: they become nft object names and metric labels.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(super) struct Policies {
    pub dispatch: Mode,
    pub sets: Vec<SetConfig>,
    pub policies: Vec<PolicyConfig>,
    pub rules: Vec<RuleConfig>,
}

impl Validator<'_> {
    fn name(&self, key: &str, what: &str, v: &Spanned<String>) -> Result<String, ConfigError> {
        let name = v.get_ref().trim();
        if !valid_name(name) {
            return Err(self.err(
                Some(v.span()),
                key,
                format!(
                    "invalid {what} name {:?}: 1-32 characters of A-Z a-z 0-9 - _",
                    v.get_ref()
                ),
            ));
        }
        Ok(name.to_string())
    }

    /// A list key that is present must not be empty: an empty list matches nothing, which
    /// is never what an operator meant.
    fn non_empty<T>(&self, key: &str, v: &Spanned<Vec<T>>) -> Result<(), ConfigError> {
        if v.get_ref().is_empty() {
            return Err(self.err(
                Some(v.span()),
                key,
                "an empty list matches nothing; leave the key out to match any",
            ));
        }
        Ok(())
    }

    pub(super) fn policies(
        &self,
        dispatch: RawDispatch,
        raw_sets: Vec<Spanned<RawSet>>,
        raw_policies: Vec<Spanned<RawPolicy>>,
        raw_rules: Vec<Spanned<RawRule>>,
        uplinks: &[UplinkConfig],
        lan_interfaces: &[String],
    ) -> Result<Policies, ConfigError> {
        let dispatch = match dispatch.balance {
            None => Mode::Client,
            Some(b) => match Mode::parse(b.get_ref().trim()) {
                Some(m @ (Mode::Client | Mode::Connection | Mode::Destination)) => m,
                _ => {
                    return Err(self.err(
                        Some(b.span()),
                        "dispatch.balance",
                        format!(
                            "invalid mode {:?}; use \"client\", \"connection\" or \"destination\" (\"failover\" is for a [[policy]])",
                            b.get_ref()
                        ),
                    ));
                }
            },
        };

        let mut sets: Vec<SetConfig> = Vec::new();
        // Where each set is declared, so that a use above it can be named.
        let mut set_at: Vec<usize> = Vec::new();
        for (i, s) in raw_sets.into_iter().enumerate() {
            let at = s.span().start;
            let s = s.into_inner();
            let key = |k: &str| format!("set[{i}].{k}");
            let name = self.name(&key("name"), "set", &s.name)?;
            if sets.iter().any(|x| x.name == name) {
                return Err(self.err(
                    Some(s.name.span()),
                    key("name"),
                    format!("duplicate set name {name:?}; names must be unique"),
                ));
            }
            let external = s.external.unwrap_or(false);
            let (mut v4, mut v6) = (Vec::new(), Vec::new());
            if let Some(elements) = &s.elements {
                if external {
                    return Err(self.err(
                        Some(elements.span()),
                        key("elements"),
                        "an external set is filled by someone else (e.g. dnsmasq --nftset); remove `elements` or set external = false",
                    ));
                }
                if elements.get_ref().len() > MAX_SET_ELEMENTS {
                    return Err(self.err(
                        Some(elements.span()),
                        key("elements"),
                        format!("at most {MAX_SET_ELEMENTS} elements"),
                    ));
                }
                for (j, e) in elements.get_ref().iter().enumerate() {
                    match self.cidr(&key(&format!("elements[{j}]")), e)? {
                        IpNet::V4(n) => v4.push(n),
                        IpNet::V6(n) => v6.push(n),
                    }
                }
            }
            v4 = Ipv4Net::aggregate(&v4);
            v6 = Ipv6Net::aggregate(&v6);
            sets.push(SetConfig {
                name,
                v4,
                v6,
                external,
            });
            set_at.push(at);
        }

        let mut policies: Vec<PolicyConfig> = Vec::new();
        for (i, p) in raw_policies.into_iter().enumerate() {
            let p = p.into_inner();
            let key = |k: &str| format!("policy[{i}].{k}");
            let name = self.name(&key("name"), "policy", &p.name)?;
            if name == "default" || name == "main" {
                return Err(self.err(
                    Some(p.name.span()),
                    key("name"),
                    format!("{name:?} is reserved: \"default\" is what unmatched traffic gets (dispatch.balance), \"main\" the main routing table"),
                ));
            }
            if policies.iter().any(|x| x.name == name) {
                return Err(self.err(
                    Some(p.name.span()),
                    key("name"),
                    format!("duplicate policy name {name:?}; names must be unique"),
                ));
            }
            let members = match &p.uplinks {
                None => (0..uplinks.len()).collect(),
                Some(list) => {
                    if list.get_ref().is_empty() {
                        return Err(self.err(
                            Some(list.span()),
                            key("uplinks"),
                            "an empty list leaves the policy nothing; leave the key out for all uplinks",
                        ));
                    }
                    let mut members = Vec::new();
                    for (j, u) in list.get_ref().iter().enumerate() {
                        let k = key(&format!("uplinks[{j}]"));
                        let Some(idx) = uplinks.iter().position(|x| x.name == u.get_ref().trim())
                        else {
                            let known: Vec<&str> =
                                uplinks.iter().map(|x| x.name.as_str()).collect();
                            return Err(self.err(
                                Some(u.span()),
                                k,
                                format!(
                                    "unknown uplink {:?}; uplinks are: {}",
                                    u.get_ref(),
                                    known.join(", ")
                                ),
                            ));
                        };
                        if members.contains(&idx) {
                            return Err(self.err(
                                Some(u.span()),
                                k,
                                format!("uplink {:?} is listed twice", u.get_ref()),
                            ));
                        }
                        members.push(idx);
                    }
                    members
                }
            };
            let mode = match &p.balance {
                None => Mode::Client,
                Some(b) => Mode::parse(b.get_ref().trim()).ok_or_else(|| {
                    self.err(
                        Some(b.span()),
                        key("balance"),
                        format!("invalid mode {:?}; use \"client\", \"connection\", \"destination\" or \"failover\"", b.get_ref()),
                    )
                })?,
            };
            let max_loss = match &p.max_loss {
                None => None,
                Some(l) if (0.0..1.0).contains(l.get_ref()) => Some(*l.get_ref()),
                Some(l) => {
                    return Err(self.err(
                        Some(l.span()),
                        key("max_loss"),
                        format!(
                            "must be a ratio from 0.0 up to (not including) 1.0, e.g. 0.02 for 2 % (got {})",
                            l.get_ref()
                        ),
                    ));
                }
            };
            let opt_duration = |k: &str, v: Option<Spanned<String>>| match v {
                None => Ok(None),
                Some(v) => self.duration(&key(k), Some(v), Duration::ZERO).map(Some),
            };
            let sla = Sla {
                max_rtt: opt_duration("max_rtt", p.max_rtt)?,
                max_loss,
                max_jitter: opt_duration("max_jitter", p.max_jitter)?,
            };
            if sla.is_set() && !members.iter().any(|&m| !uplinks[m].probes.is_empty()) {
                return Err(self.err(
                    Some(p.name.span()),
                    key("max_rtt"),
                    "an SLA (max_rtt, max_loss, max_jitter) is checked against probes, and none of this policy's uplinks has `probes`",
                ));
            }
            let when_none = match &p.when_none {
                None => WhenNone::Default,
                Some(w) => match w.get_ref().trim() {
                    "default" => WhenNone::Default,
                    "drop" => WhenNone::Drop,
                    other => {
                        return Err(self.err(
                            Some(w.span()),
                            key("when_none"),
                            format!("invalid value {other:?}; use \"default\" or \"drop\""),
                        ));
                    }
                },
            };
            policies.push(PolicyConfig {
                name,
                uplinks: members,
                mode,
                sla,
                when_none,
            });
        }

        if raw_rules.len() > MAX_RULES {
            return Err(self.err(None, "rule", format!("at most {MAX_RULES} rules")));
        }
        let mut rules: Vec<RuleConfig> = Vec::new();
        for (i, r) in raw_rules.into_iter().enumerate() {
            let span = r.span();
            let r = r.into_inner();
            let key = |k: &str| format!("rule[{i}].{k}");
            let name = self.name(&key("name"), "rule", &r.name)?;
            if rules.iter().any(|x| x.name == name) {
                return Err(self.err(
                    Some(r.name.span()),
                    key("name"),
                    format!("duplicate rule name {name:?}; names must be unique"),
                ));
            }
            let addrs = |k: &str,
                         list: &Option<Spanned<Vec<Spanned<String>>>>|
             -> Result<Vec<AddrMatch>, ConfigError> {
                let Some(list) = list else {
                    return Ok(Vec::new());
                };
                self.non_empty(&key(k), list)?;
                let mut out = Vec::new();
                for (j, a) in list.get_ref().iter().enumerate() {
                    let kk = key(&format!("{k}[{j}]"));
                    let text = a.get_ref().trim();
                    if let Some(set) = text.strip_prefix('@') {
                        let Some(idx) = sets.iter().position(|s| s.name == set) else {
                            let known: Vec<String> =
                                sets.iter().map(|s| format!("@{}", s.name)).collect();
                            return Err(self.err(
                                Some(a.span()),
                                kk,
                                format!(
                                    "unknown set {text:?}; declared sets: {}",
                                    if known.is_empty() {
                                        "none".to_string()
                                    } else {
                                        known.join(", ")
                                    }
                                ),
                            ));
                        };
                        if set_at[idx] > a.span().start {
                            return Err(self.err(
                                Some(a.span()),
                                kk,
                                format!(
                                    "set {text:?} is used before its [[set]] (line {}); declare sets above the rules that use them",
                                    self.line_of(&(set_at[idx]..set_at[idx]))
                                ),
                            ));
                        }
                        out.push(AddrMatch::Set(idx));
                    } else {
                        out.push(AddrMatch::Net(self.cidr(&kk, a)?));
                    }
                }
                Ok(merge_nets(out))
            };
            let src = addrs("src", &r.src)?;
            let dst = addrs("dst", &r.dst)?;
            let proto = match &r.proto {
                None => Proto::Any,
                Some(p) => Proto::parse(p.get_ref().trim()).ok_or_else(|| {
                    self.err(
                        Some(p.span()),
                        key("proto"),
                        format!(
                            "invalid protocol {:?}; use tcp, udp, icmp, icmpv6 or any",
                            p.get_ref()
                        ),
                    )
                })?,
            };
            let ports = |k: &str,
                         list: &Option<Spanned<Vec<Spanned<RawPort>>>>|
             -> Result<Vec<(u16, u16)>, ConfigError> {
                let Some(list) = list else {
                    return Ok(Vec::new());
                };
                self.non_empty(&key(k), list)?;
                if matches!(proto, Proto::Icmp | Proto::Icmpv6) {
                    return Err(self.err(
                        Some(list.span()),
                        key(k),
                        format!(
                            "ports need proto = \"tcp\", \"udp\" or \"any\" (this rule has {:?})",
                            proto.as_str()
                        ),
                    ));
                }
                let ranges = list
                    .get_ref()
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        port_range(p.get_ref())
                            .map_err(|m| self.err(Some(p.span()), key(&format!("{k}[{j}]")), m))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(merge_ports(ranges))
            };
            let sport = ports("sport", &r.sport)?;
            let dport = ports("dport", &r.dport)?;
            let mut dscp = Vec::new();
            if let Some(list) = &r.dscp {
                self.non_empty(&key("dscp"), list)?;
                for (j, d) in list.get_ref().iter().enumerate() {
                    let v = dscp_value(d.get_ref())
                        .map_err(|m| self.err(Some(d.span()), key(&format!("dscp[{j}]")), m))?;
                    if !dscp.contains(&v) {
                        dscp.push(v);
                    }
                }
            }
            let mut iif = Vec::new();
            if let Some(list) = &r.iif {
                self.non_empty(&key("iif"), list)?;
                for (j, n) in list.get_ref().iter().enumerate() {
                    let k = key(&format!("iif[{j}]"));
                    let name = self.ifname(&k, n)?;
                    if !lan_interfaces.contains(&name) {
                        return Err(self.err(
                            Some(n.span()),
                            k,
                            format!(
                                "{name:?} is not a LAN interface; rules see traffic from lan.interfaces ({})",
                                lan_interfaces.join(", ")
                            ),
                        ));
                    }
                    if !iif.contains(&name) {
                        iif.push(name);
                    }
                }
            }
            if src.is_empty()
                && dst.is_empty()
                && proto == Proto::Any
                && sport.is_empty()
                && dport.is_empty()
                && dscp.is_empty()
                && iif.is_empty()
            {
                return Err(self.err(
                    Some(span),
                    key("name"),
                    "the rule matches nothing in particular; give it at least one of src, dst, proto, sport, dport, dscp, iif (to change what unmatched traffic does, set dispatch.balance)",
                ));
            }
            let target = match r.policy.get_ref().trim() {
                "main" => Target::Main,
                "default" => Target::Default,
                p => match policies.iter().position(|x| x.name == p) {
                    Some(idx) => Target::Policy(idx),
                    None => {
                        let mut known: Vec<&str> = vec!["main", "default"];
                        known.extend(policies.iter().map(|x| x.name.as_str()));
                        return Err(self.err(
                            Some(r.policy.span()),
                            key("policy"),
                            format!("unknown policy {p:?}; use one of: {}", known.join(", ")),
                        ));
                    }
                },
            };
            // A family is possible when every address list allows it. A set allows both:
            // the API (`uplinkctl set add`) and an external set's filler may add either
            // family later, and a rule compiled for one would ignore the other silently.
            let allows = |list: &[AddrMatch], v6: bool| {
                list.is_empty()
                    || list.iter().any(|a| match a {
                        AddrMatch::Net(n) => n.addr().is_ipv6() == v6,
                        AddrMatch::Set(_) => true,
                    })
            };
            let v4 = proto != Proto::Icmpv6 && allows(&src, false) && allows(&dst, false);
            let v6 = proto != Proto::Icmp && allows(&src, true) && allows(&dst, true);
            if !v4 && !v6 {
                return Err(self.err(
                    Some(span),
                    key("name"),
                    "the rule can match no packet: its src, dst and proto allow neither IPv4 nor IPv6 (e.g. IPv4 src with IPv6 dst)",
                ));
            }
            rules.push(RuleConfig {
                name,
                src,
                dst,
                proto,
                sport,
                dport,
                dscp,
                iif,
                target,
                v4,
                v6,
            });
        }
        Ok(Policies {
            dispatch,
            sets,
            policies,
            rules,
        })
    }

    fn cidr(&self, key: &str, v: &Spanned<String>) -> Result<IpNet, ConfigError> {
        let text = v.get_ref().trim();
        parse_net(text).ok_or_else(|| {
            self.err(
                Some(v.span()),
                key,
                format!(
                    "invalid address {text:?}; use a CIDR (\"198.51.100.0/24\", \"2001:db8::/48\"), an address, or \"@set\""
                ),
            )
        })
    }
}

/// A rule's literal prefixes merged (nested and adjacent ones): the kernel refuses an
/// interval set or map whose elements overlap ("conflicting intervals specified"), and a
/// rule matching any of them matches their union. Set references keep their place.
fn merge_nets(list: Vec<AddrMatch>) -> Vec<AddrMatch> {
    let (mut v4, mut v6, mut out) = (Vec::new(), Vec::new(), Vec::new());
    for a in list {
        match a {
            AddrMatch::Net(IpNet::V4(n)) => v4.push(n),
            AddrMatch::Net(IpNet::V6(n)) => v6.push(n),
            AddrMatch::Set(i) => {
                if !out.contains(&AddrMatch::Set(i)) {
                    out.push(AddrMatch::Set(i));
                }
            }
        }
    }
    let nets = Ipv4Net::aggregate(&v4)
        .into_iter()
        .map(IpNet::V4)
        .chain(Ipv6Net::aggregate(&v6).into_iter().map(IpNet::V6));
    nets.map(AddrMatch::Net).chain(out).collect()
}

/// Port ranges merged where they overlap or touch, in order, for the same reason.
fn merge_ports(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// A CIDR or a bare address (a host prefix), truncated to its network.
pub fn parse_net(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
        .ok()
        .map(|n| n.trunc())
}

/// A DSCP code point by name (`ef`, `af41`, `cs1`, …).
pub fn dscp_by_name(name: &str) -> Option<u8> {
    DSCP_NAMES.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

fn port_range(p: &RawPort) -> Result<(u16, u16), String> {
    let one = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
            _ => Err(format!(
                "invalid port {s:?}; use 1-65535, or a range \"a-b\" with a <= b"
            )),
        }
    };
    match p {
        RawPort::Number(n) => one(&n.to_string()).map(|n| (n, n)),
        RawPort::Text(t) => match t.split_once('-') {
            None => one(t).map(|n| (n, n)),
            Some((a, b)) => {
                let (a, b) = (one(a)?, one(b)?);
                if a > b {
                    return Err(format!(
                        "invalid port range {t:?}: the start is above the end; write \"{b}-{a}\""
                    ));
                }
                Ok((a, b))
            }
        },
    }
}

fn dscp_value(d: &RawDscp) -> Result<u8, String> {
    match d {
        RawDscp::Number(n) if (0..=63).contains(n) => Ok(*n as u8),
        RawDscp::Number(n) => Err(format!("DSCP {n} is out of range; use 0-63 or a name")),
        RawDscp::Text(t) => {
            let t = t.trim().to_ascii_lowercase();
            if let Ok(n) = t.parse::<i64>() {
                return dscp_value(&RawDscp::Number(n));
            }
            dscp_by_name(&t).ok_or_else(|| {
                let names: Vec<&str> = DSCP_NAMES.iter().map(|(n, _)| *n).collect();
                format!(
                    "unknown DSCP name {t:?}; use 0-63 or one of {}",
                    names.join(", ")
                )
            })
        }
    }
}
