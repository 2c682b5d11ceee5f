//! Policies in the plan: each policy's verdict (which `up_` chains it spreads new
//! connections over, and how), and `explain`, which walks the same rules and verdicts for
//! one flow.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{addr_bytes, jhash_bucket, key_bucket, spread};
use crate::config::{
    AddrMatch, Config, LocalPolicy, Mode, Proto, RuleConfig, SetConfig, Target, WhenNone,
};
use crate::model::Model;
use crate::model::sla::{Choice, Outcome};

/// What a policy chain does with a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// `goto up_<uplink>`.
    Uplink(String),
    /// A hash (or random number) into buckets of `up_` chains, each uplink in proportion
    /// to its weight.
    Spread {
        key: SpreadKey,
        buckets: Vec<String>,
    },
    /// The client sets (each client's home), then, for clients without an assignment
    /// yet, `goto unassigned` (see `Unassigned`).
    Clients,
    /// The default policy's chain.
    Default,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpreadKey {
    /// `jhash saddr`: sticky per client.
    Source,
    /// `jhash saddr . daddr`: sticky per client and server.
    Destination,
    /// `numgen random`: each connection anew.
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftPolicy {
    pub name: String,
    pub verdict: Verdict,
    /// A policy with an SLA: its id in the conntrack mark's policy bits, written on the
    /// connections it classifies, so that an SLA break deletes exactly its flows.
    pub ct_mark: Option<u32>,
}

/// Verdict and choice of policy `p` (config index).
pub fn policy_verdict(config: &Config, model: &Model, p: usize) -> (Verdict, Choice) {
    let pc = &config.policies[p];
    let sla = pc.sla.is_set().then_some(p);
    verdict_for(config, model, &pc.uplinks, pc.mode, sla, Some(pc.when_none))
}

/// Verdict and choice of the default policy (`dispatch.balance` over every uplink).
pub fn default_verdict(config: &Config, model: &Model) -> (Verdict, Choice) {
    let all: Vec<usize> = (0..config.uplinks.len()).collect();
    verdict_for(config, model, &all, config.dispatch, None, None)
}

fn verdict_for(
    config: &Config,
    model: &Model,
    members: &[usize],
    mode: Mode,
    sla: Option<usize>,
    when_none: Option<WhenNone>,
) -> (Verdict, Choice) {
    let choice = model.choose(members, sla, mode != Mode::Failover);
    let lowest_tier = || {
        let tier = members.iter().map(|&i| config.uplinks[i].tier).min();
        members
            .iter()
            .copied()
            .filter(|&i| Some(config.uplinks[i].tier) == tier)
            .collect::<Vec<usize>>()
    };
    let using = if choice.using.is_empty() {
        match when_none {
            Some(WhenNone::Default) => return (Verdict::Default, choice),
            Some(WhenNone::Drop) => return (Verdict::Drop, choice),
            // The default policy has nowhere else to go: its first tier, as if healthy.
            None => lowest_tier(),
        }
    } else {
        choice.using.clone()
    };
    let name = |i: usize| config.uplinks[i].name.clone();
    let verdict = match mode {
        Mode::Failover => Verdict::Uplink(name(using[0])),
        Mode::Client if when_none.is_none() => Verdict::Clients,
        Mode::Connection => Verdict::Spread {
            key: SpreadKey::Random,
            buckets: spread(config, &using),
        },
        Mode::Client | Mode::Destination => {
            // Buckets of the healthy layout keep their uplink while it is used; only the
            // buckets of an uplink the policy stopped using move, so only its clients (or
            // servers) change uplink, and they come back when it does.
            let primary = spread(config, &lowest_tier());
            let survivors = spread(config, &using);
            let buckets = primary
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if using.iter().any(|&u| config.uplinks[u].name == *b) {
                        b.clone()
                    } else {
                        survivors[i % survivors.len()].clone()
                    }
                })
                .collect();
            let key = if mode == Mode::Client {
                SpreadKey::Source
            } else {
                SpreadKey::Destination
            };
            Verdict::Spread { key, buckets }
        }
    };
    (verdict, choice)
}

/// The output chain's verdict for the gateway's own new connections.
pub fn local_verdict(config: &Config, model: &Model) -> Option<super::LocalVerdict> {
    match config.local {
        LocalPolicy::Main => None,
        LocalPolicy::Policy(p) => {
            Some(super::LocalVerdict::Policy(config.policies[p].name.clone()))
        }
        LocalPolicy::Default => {
            let all: Vec<usize> = (0..config.uplinks.len()).collect();
            let mode = match config.dispatch {
                Mode::Client => Mode::Connection,
                m => m,
            };
            Some(super::LocalVerdict::Spread(
                verdict_for(config, model, &all, mode, None, None).0,
            ))
        }
    }
}

/// The uplink whose table answers the first route lookup of the gateway's own traffic of
/// one family: the `[local]` policy's first choice among the candidates that carry the
/// family (its first candidate while none is usable).
pub fn local_first(config: &Config, model: &Model, v6: bool) -> Option<usize> {
    let (members, sla, spread): (Vec<usize>, Option<usize>, bool) = match config.local {
        LocalPolicy::Main => return None,
        LocalPolicy::Default => ((0..config.uplinks.len()).collect(), None, true),
        LocalPolicy::Policy(p) => {
            let pc = &config.policies[p];
            (
                pc.uplinks.clone(),
                pc.sla.is_set().then_some(p),
                pc.mode != Mode::Failover,
            )
        }
    };
    let members: Vec<usize> = members
        .into_iter()
        .filter(|&i| !v6 || config.uplinks[i].ipv6)
        .collect();
    let choice = model.choose(&members, sla, spread);
    choice.using.first().or(members.first()).copied()
}

/// Where the default policy in client mode sends a client without an assignment yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unassigned {
    /// `home_<uplink>`: where the next assignment will put it, so its first flow and its
    /// later ones leave alike.
    Next(String),
    /// The LAN is at `lan.max_clients` and no assignment will come: a hash of the address
    /// over the survivors (`overflow`).
    Overflow,
}

pub fn unassigned(config: &Config, model: &Model) -> Unassigned {
    if model.clients().len() < config.lan.max_clients {
        Unassigned::Next(model.next_home())
    } else {
        Unassigned::Overflow
    }
}

/// One new flow's fields, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub dscp: u8,
    /// The LAN interface it arrives on; `None`: any (rules with `iif` are then skipped
    /// with that reason).
    pub iif: Option<String>,
}

/// Why a new flow leaves where it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The rule that matched, if any.
    pub rule: Option<String>,
    /// "default", "main" or a policy name.
    pub policy: String,
    /// The uplink, or `None` for main and drop.
    pub uplink: Option<String>,
    /// One line, e.g. "rule sip → policy voip → isp1; lte skipped: rtt 210ms > max_rtt 150ms".
    pub summary: String,
    /// Each step, in order.
    pub steps: Vec<String>,
}

/// `sets` holds each set's elements as the dataplane has them (config, API additions,
/// and external sets as read from the kernel), in config order.
pub fn explain(config: &Config, model: &Model, sets: &[Vec<IpNet>], flow: &Flow) -> Explanation {
    let mut steps = Vec::new();
    if let Some(c) = model
        .client_by_addr(&flow.src)
        .filter(|c| c.mac.is_routed())
    {
        steps.push(format!(
            "{} is a host behind the LAN router {}, a client of its own (home {})",
            flow.src,
            model.via(c),
            c.home
        ));
    } else if let Some(p) = model
        .routed_prefixes()
        .into_iter()
        .find(|p| p.contains(&flow.src))
    {
        steps.push(format!(
            "{} is behind a LAN router (routed prefix {p}) and not placed yet: its first connection places it",
            flow.src
        ));
    }
    // A connection already open keeps its uplink; explain speaks of new ones.
    if let Some((o, i)) = model.overrides.get(&flow.src).and_then(|o| {
        model
            .uplinks
            .iter()
            .position(|u| u.name == o.uplink)
            .map(|i| (o, i))
    }) {
        steps.push(format!(
            "{} is pinned to {}: a pin moves all of the client's traffic, rules included",
            flow.src, o.uplink
        ));
        let (uplink, why) = if model.pin_direct(i) {
            (Some(o.uplink.clone()), String::new())
        } else {
            let to = home_spread(config, model, i, flow.src);
            let shown = to.as_deref().unwrap_or(BLOCKED);
            (
                to.clone(),
                format!(" ({} cannot carry traffic now: {shown})", o.uplink),
            )
        };
        return Explanation {
            rule: None,
            policy: "pin".into(),
            summary: format!("pin → {}{why}", uplink.as_deref().unwrap_or(BLOCKED)),
            uplink,
            steps,
        };
    }
    let mut rule = None;
    let mut target = Target::Default;
    for r in config.rules.iter() {
        match rule_matches(r, &config.sets, sets, flow) {
            Ok(()) => {
                steps.push(format!("rule {} matches", r.name));
                rule = Some(r.name.clone());
                target = r.target;
                break;
            }
            Err(why) => steps.push(format!("rule {}: {why}", r.name)),
        }
    }
    let lead = rule
        .as_ref()
        .map(|r| format!("rule {r} → "))
        .unwrap_or_else(|| "no rule matches → ".into());
    let p = match target {
        Target::Main => {
            return Explanation {
                rule,
                policy: "main".into(),
                uplink: None,
                summary: format!("{lead}main: left to the main routing table"),
                steps,
            };
        }
        Target::Default => None,
        Target::Policy(p) => Some(p),
    };
    let mut policy_name = p
        .map(|p| config.policies[p].name.clone())
        .unwrap_or_else(|| "default".into());
    let (mut verdict, mut choice) = match p {
        Some(p) => policy_verdict(config, model, p),
        None => default_verdict(config, model),
    };
    let mut notes: Vec<String> = choice.skipped.iter().map(|(_, why)| why.clone()).collect();
    if choice.outcome == Outcome::BestEffort {
        notes.push("no candidate meets the SLA: the best usable one carries it".into());
    }
    if verdict == Verdict::Default {
        notes.push(format!(
            "no candidate of {policy_name} is usable: falls back to the default policy"
        ));
        policy_name = format!("{policy_name} → default");
        (verdict, choice) = default_verdict(config, model);
        notes.extend(choice.skipped.iter().map(|(_, why)| why.clone()));
    }
    let uplink = match &verdict {
        Verdict::Drop => {
            notes.push("no candidate is usable and when_none = \"drop\"".into());
            None
        }
        Verdict::Uplink(u) => Some(u.clone()),
        Verdict::Clients => match model.client_by_addr(&flow.src) {
            Some(c) => {
                let i = config
                    .uplinks
                    .iter()
                    .position(|u| u.name == c.home)
                    .unwrap_or_default();
                if model.home_target(i).is_direct() {
                    steps.push(format!("client mode: {} is homed on {}", flow.src, c.home));
                    Some(c.home.clone())
                } else {
                    let to = home_spread(config, model, i, flow.src);
                    notes.push(match to {
                        Some(_) => format!("home {} failed over", c.home),
                        None => format!("home {} {BLOCKED}", c.home),
                    });
                    to
                }
            }
            None => match unassigned(config, model) {
                Unassigned::Next(next) => {
                    steps.push(format!(
                        "client mode: {} has no assignment yet; its first flows take {next}, where it will be placed",
                        flow.src
                    ));
                    Some(next)
                }
                Unassigned::Overflow => {
                    let b = super::overflow_buckets(config, model);
                    notes.push(format!(
                        "{} is not tracked (lan.max_clients reached): hashed over the survivors",
                        flow.src
                    ));
                    Some(b[jhash_bucket(flow.src, b.len())].clone())
                }
            },
        },
        Verdict::Spread { key, buckets } => Some(match key {
            SpreadKey::Random => {
                let mut shares: Vec<String> = Vec::new();
                for b in buckets {
                    if !shares.iter().any(|s| s.starts_with(&format!("{b} "))) {
                        let n = buckets.iter().filter(|x| *x == b).count();
                        shares.push(format!("{b} {n}/{}", buckets.len()));
                    }
                }
                notes.push(format!(
                    "connection mode: each new connection picks at random by weight ({}) and keeps it",
                    shares.join(", ")
                ));
                return Explanation {
                    summary: format!(
                        "{lead}policy {policy_name} → one of {}{}",
                        dedup(buckets).join(", "),
                        suffix(&notes)
                    ),
                    rule,
                    policy: policy_name,
                    uplink: None,
                    steps,
                };
            }
            SpreadKey::Source => buckets[jhash_bucket(flow.src, buckets.len())].clone(),
            SpreadKey::Destination => {
                if flow.src.is_ipv4() != flow.dst.is_ipv4() {
                    notes.push("source and destination families differ".into());
                }
                let mut key = addr_bytes(flow.src);
                key.extend(addr_bytes(flow.dst));
                buckets[key_bucket(&key, buckets.len())].clone()
            }
        }),
        Verdict::Default => unreachable!("resolved above"),
    };
    let to = uplink.clone().unwrap_or_else(|| "drop".into());
    Explanation {
        summary: format!("{lead}policy {policy_name} → {to}{}", suffix(&notes)),
        rule,
        policy: policy_name,
        uplink,
        steps,
    }
}

fn suffix(notes: &[String]) -> String {
    if notes.is_empty() {
        String::new()
    } else {
        format!("; {}", notes.join("; "))
    }
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}

/// Why a stopped uplink's clients go nowhere.
pub const BLOCKED: &str = "is over its quota (quota_action = \"stop\") and no other uplink can carry its clients: dropped";

/// Where uplink `i`'s home chain sends `src`: the uplink itself, or (failed over) where
/// its `jhash saddr` spread over the survivors puts the address; `None`: nowhere
/// (`HomeTarget::Blocked`).
pub fn home_spread(config: &Config, model: &Model, i: usize, src: IpAddr) -> Option<String> {
    match model.home_target(i) {
        crate::model::failover::HomeTarget::Direct => Some(config.uplinks[i].name.clone()),
        crate::model::failover::HomeTarget::Spread(to) => {
            let b = spread(config, &to);
            Some(b[jhash_bucket(src, b.len())].clone())
        }
        crate::model::failover::HomeTarget::Blocked => None,
    }
}

fn rule_matches(
    r: &RuleConfig,
    decl: &[SetConfig],
    sets: &[Vec<IpNet>],
    f: &Flow,
) -> Result<(), String> {
    let v6 = f.src.is_ipv6();
    if (v6 && !r.v6) || (!v6 && !r.v4) {
        return Err(format!(
            "matches {} only",
            if r.v4 { "IPv4" } else { "IPv6" }
        ));
    }
    let addr_ok = |list: &[AddrMatch], ip: IpAddr| {
        list.is_empty()
            || list.iter().any(|a| match a {
                AddrMatch::Net(n) => n.contains(&ip),
                AddrMatch::Set(s) => sets
                    .get(*s)
                    .is_some_and(|e| e.iter().any(|n| n.contains(&ip))),
            })
    };
    let names = |list: &[AddrMatch]| {
        list.iter()
            .map(|a| match a {
                AddrMatch::Net(n) => n.to_string(),
                AddrMatch::Set(s) => format!("@{}", decl[*s].name),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !addr_ok(&r.src, f.src) {
        return Err(format!("src {} not in {}", f.src, names(&r.src)));
    }
    if !addr_ok(&r.dst, f.dst) {
        return Err(format!("dst {} not in {}", f.dst, names(&r.dst)));
    }
    if r.proto != Proto::Any && r.proto != f.proto {
        return Err(format!(
            "proto {} is not {}",
            f.proto.as_str(),
            r.proto.as_str()
        ));
    }
    let ports_ok = |list: &[(u16, u16)], p: Option<u16>, which: &str| -> Result<(), String> {
        if list.is_empty() {
            return Ok(());
        }
        if !matches!(f.proto, Proto::Tcp | Proto::Udp) {
            return Err(format!("{which} needs tcp or udp"));
        }
        match p {
            Some(p) if list.iter().any(|(a, b)| (*a..=*b).contains(&p)) => Ok(()),
            Some(p) => Err(format!("{which} {p} not in the rule's ports")),
            None => Err(format!("no {which} given")),
        }
    };
    ports_ok(&r.sport, f.sport, "sport")?;
    ports_ok(&r.dport, f.dport, "dport")?;
    if !r.dscp.is_empty() && !r.dscp.contains(&f.dscp) {
        return Err(format!("dscp {} not in {:?}", f.dscp, r.dscp));
    }
    if !r.iif.is_empty() {
        match &f.iif {
            Some(i) if r.iif.contains(i) => {}
            Some(i) => return Err(format!("iif {i} not in {}", r.iif.join(", "))),
            None => return Err(format!("needs iif ({}); none given", r.iif.join(", "))),
        }
    }
    Ok(())
}
