//! The model as the API shows it.

use crate::model::nexthop::Hop;
use std::net::IpAddr;

use uplink_api::v1;

use crate::config::Config;
use crate::health::UplinkState;
use crate::model::failover::{EventKind, FailbackPending, HomeTarget, LogEntry};
use crate::model::{Client, Model};

pub fn state(model: &Model, i: usize) -> v1::UplinkState {
    let u = &model.uplinks[i];
    match u.state() {
        UplinkState::Held => v1::UplinkState::Held,
        UplinkState::Down => v1::UplinkState::Down,
        _ if u.drained => v1::UplinkState::Draining,
        UplinkState::Degraded => v1::UplinkState::Degraded,
        UplinkState::Up => v1::UplinkState::Up,
    }
}

/// An uplink as the API shows it. Its traffic counters are left at 0: the API reads
/// them beside the loop and fills them in.
pub fn uplink(config: &Config, model: &Model, carried: &[usize], i: usize) -> v1::Uplink {
    let (c, m) = (&config.uplinks[i], &model.uplinks[i]);
    let pending = model.failback_pending(i, std::time::Instant::now(), &config.failover);
    let probing = !c.probes.is_empty();
    // How often it is probed now (a metered standby less often).
    let pace = probing.then(|| crate::plan::probe_interval(config, model, i));
    let stats = &m.health.stats;
    v1::Uplink {
        name: c.name.clone(),
        interface: c.interface.clone(),
        weight: c.weight,
        tier: c.tier,
        state: state(model, i) as i32,
        balance: v1::BalanceMode::Client as i32,
        fwmark: config.dataplane.fwmark(c.mark),
        table: c.table,
        clients: model.counts()[i] as u64,
        // RTT and jitter of a path that answers now; none while its rounds fail.
        rtt_ms: m
            .health
            .answering()
            .then(|| stats.median_rtt())
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0),
        loss_ratio: (probing && stats.samples() > 0).then(|| stats.loss()),
        jitter_ms: m
            .health
            .answering()
            .then(|| stats.jitter())
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0),
        serving: m.serving && model.open(i) && !m.drained,
        tx_packets: 0,
        tx_bytes: 0,
        rx_packets: 0,
        rx_bytes: 0,
        failback_in_ms: match pending {
            FailbackPending::In(d) => Some(d.as_millis() as u64),
            _ => None,
        },
        failback_manual: pending == FailbackPending::Manual,
        clients_carried: carried.get(i).copied().unwrap_or(0) as u64,
        down_reason: m.health.down_reason().unwrap_or_default(),
        gateway: hop_text(model.hops(config, i).0),
        gateway6: if c.ipv6 {
            hop_text(model.hops(config, i).1)
        } else {
            String::new()
        },
        addresses: m.addrs.iter().map(|a| a.to_string()).collect(),
        probe_interval_ms: pace.map(|p| p.as_secs_f64() * 1000.0),
        probe_bytes_per_day: pace.map(|p| crate::health::probe::bytes_per_day(&c.probes, p)),
        metered: c.metered,
        // Filled in beside the loop from the usage owner's ledger, as the traffic.
        used_rx_bytes: 0,
        used_tx_bytes: 0,
        period_start_ms: 0,
        quota_bytes: None,
        quota_set: false,
        // Cleared beside the loop when the ledger has no quota (an operator's may stand
        // where the config has none).
        quota_action: c.quota_action.as_str().into(),
        quota_level: String::new(),
        probe_results: m
            .health
            .last
            .iter()
            .map(|(probe, r)| match r {
                Ok(rtt) => format!("{probe}: {:.1} ms", rtt.as_secs_f64() * 1000.0),
                Err(Some(why)) => format!("{probe}: {why}"),
                Err(None) => format!("{probe}: no answer"),
            })
            .collect(),
    }
}

fn hop_text(h: Hop) -> String {
    match h {
        Hop::Via(g) => g.to_string(),
        Hop::Device => "dev".to_string(),
        Hop::Unknown => String::new(),
    }
}

/// The uplink a client's new connections use now, and why. `spread`: the default
/// policy's `spread_by_policy`, computed once by the caller for all its clients.
pub fn current(
    config: &Config,
    model: &Model,
    spread: Option<&[usize]>,
    c: &Client,
) -> (String, v1::AssignmentReason) {
    let pinned = c.addresses.keys().find_map(|ip| model.overrides.get(ip));
    let steer = pinned.map(|o| o.uplink.as_str()).unwrap_or(c.home.as_str());
    let Some(i) = model.uplinks.iter().position(|u| u.name == steer) else {
        return (c.home.clone(), v1::AssignmentReason::Auto);
    };
    if pinned.is_none()
        && let Some(using) = spread
    {
        let names: Vec<&str> = using
            .iter()
            .map(|&u| model.uplinks[u].name.as_str())
            .collect();
        return (names.join(","), v1::AssignmentReason::Policy);
    }
    let reason = if pinned.is_some() {
        v1::AssignmentReason::Override
    } else {
        v1::AssignmentReason::Auto
    };
    if pinned.is_some() && model.pin_direct(i) {
        return (steer.to_string(), reason);
    }
    if model.home_target(i).is_direct() {
        return (steer.to_string(), reason);
    }
    // nft hashes each address; the first IPv4 address stands for the client.
    let ip = c
        .addresses
        .keys()
        .find(|ip| ip.is_ipv4())
        .or_else(|| c.addresses.keys().next())
        .copied()
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    (
        crate::plan::verdict::home_spread(config, model, i, ip).unwrap_or_else(|| "-".into()),
        v1::AssignmentReason::Failover,
    )
}

/// Clients per uplink by the uplink their new connections use now (failovers, drains and
/// pins applied), in config order; with a default policy that spreads connections, a
/// client counts on every uplink it draws from. Only clients whose home does not serve them directly,
/// or who are pinned, are hashed; the rest count where they are homed.
pub fn carried(config: &Config, model: &Model) -> Vec<usize> {
    let mut out = vec![0; model.uplinks.len()];
    let direct: Vec<bool> = (0..model.uplinks.len())
        .map(|i| model.home_target(i) == HomeTarget::Direct)
        .collect();
    let index = |name: &str| model.uplinks.iter().position(|u| u.name == name);
    let spread = spread_by_policy(config, model);
    // Every client where it is homed: the kept counts, without a walk over the LAN (one
    // per event at 100k clients). Failovers, pins and spreading policies walk.
    let homed = model.counts();
    if spread.is_none()
        && model.overrides.is_empty()
        && (0..out.len()).all(|i| direct[i] || homed[i] == 0)
    {
        return homed.to_vec();
    }
    for c in model.clients().values() {
        let pinned = !model.overrides.is_empty()
            && c.addresses
                .keys()
                .any(|ip| model.overrides.contains_key(ip));
        if !pinned && let Some(using) = &spread {
            for &u in using {
                out[u] += 1;
            }
            continue;
        }
        let home = index(&c.home);
        let now = match home {
            Some(i) if direct[i] && !pinned => Some(i),
            _ => index(&current(config, model, spread.as_deref(), c).0),
        };
        if let Some(i) = now {
            out[i] += 1;
        }
    }
    out
}

/// The uplinks the default policy draws new connections from, when it spreads them per
/// connection or per destination rather than per client (`None` in client mode).
pub fn spread_by_policy(config: &Config, model: &Model) -> Option<Vec<usize>> {
    use crate::plan::verdict::{Verdict, default_verdict};
    if config.dispatch == crate::config::Mode::Client {
        return None;
    }
    match default_verdict(config, model).0 {
        Verdict::Spread { buckets, .. } => {
            let mut using: Vec<usize> = buckets
                .iter()
                .filter_map(|b| model.uplinks.iter().position(|u| u.name == *b))
                .collect();
            using.sort_unstable();
            using.dedup();
            Some(using)
        }
        _ => None,
    }
}

pub fn client(config: &Config, model: &Model, spread: Option<&[usize]>, c: &Client) -> v1::Client {
    let (current_uplink, reason) = current(config, model, spread, c);
    v1::Client {
        mac: if c.mac.is_routed() {
            String::new()
        } else {
            c.mac.to_string()
        },
        via: model.via(c),
        addresses: c.addresses.keys().map(|ip| ip.to_string()).collect(),
        home_uplink: c.home.clone(),
        current_uplink,
        reason: reason as i32,
        first_seen_ms: c.first_seen,
        last_seen_ms: c
            .addresses
            .values()
            .map(|a| a.last_seen)
            .max()
            .unwrap_or(c.first_seen),
        // Filled in beside the loop from the usage owner's per-client ledger.
        usage: Vec::new(),
    }
}

pub fn event(e: &LogEntry) -> v1::Event {
    let (from, to) = match &e.kind {
        EventKind::State { from, to } => (map_state(*from), map_state(*to)),
        _ => (v1::UplinkState::Unspecified, v1::UplinkState::Unspecified),
    };
    let kind = match &e.kind {
        EventKind::State { .. } => "state",
        EventKind::Failover => "failover",
        EventKind::Failback => "failback",
        EventKind::AllDown => "all_down",
        EventKind::Recovered => "recovered",
        EventKind::Override => "override",
        EventKind::Drain => "drain",
        EventKind::Undrain => "undrain",
        EventKind::Reload => "reload",
        EventKind::Sla { .. } => "sla",
        EventKind::Set => "set",
        EventKind::Gateway => "gateway",
        EventKind::Refused => "refused",
        EventKind::Quota => "quota",
    };
    v1::Event {
        at_ms: e.at,
        uplink: e.uplink.clone(),
        kind: kind.into(),
        from_state: from as i32,
        to_state: to as i32,
        cause: e.to_string(),
        clients_moved: e.clients_moved as u64,
    }
}

fn map_state(s: UplinkState) -> v1::UplinkState {
    match s {
        UplinkState::Up => v1::UplinkState::Up,
        UplinkState::Degraded => v1::UplinkState::Degraded,
        UplinkState::Down => v1::UplinkState::Down,
        UplinkState::Held => v1::UplinkState::Held,
    }
}

/// The default policy and every `[[policy]]`, with what each uses now and why.
pub fn policies(config: &Config, model: &Model) -> Vec<v1::Policy> {
    use crate::config::WhenNone;
    use crate::model::sla::Outcome;
    use crate::plan::verdict::{Verdict, default_verdict, policy_verdict};
    let name = |i: usize| config.uplinks[i].name.clone();
    let one = |pname: String,
               mode: crate::config::Mode,
               members: &[usize],
               sla: Option<(usize, &crate::config::Sla)>,
               when_none: Option<WhenNone>,
               (verdict, choice): (Verdict, crate::model::sla::Choice)| {
        let state = match (&verdict, choice.outcome) {
            (Verdict::Drop, _) => "drop",
            (Verdict::Default, _) => "fallback",
            (_, Outcome::BestEffort) => "best_effort",
            _ => "met",
        };
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        v1::Policy {
            name: pname,
            balance: mode.as_str().into(),
            uplinks: members.iter().map(|&i| name(i)).collect(),
            using: choice.using.iter().map(|&i| name(i)).collect(),
            skipped: choice.skipped.iter().map(|(_, w)| w.clone()).collect(),
            max_rtt_ms: sla.and_then(|(_, s)| s.max_rtt).map(ms),
            max_loss: sla.and_then(|(_, s)| s.max_loss),
            max_jitter_ms: sla.and_then(|(_, s)| s.max_jitter).map(ms),
            when_none: match when_none {
                None => String::new(),
                Some(WhenNone::Default) => "default".into(),
                Some(WhenNone::Drop) => "drop".into(),
            },
            state: state.into(),
            sla: sla
                .filter(|(_, s)| s.is_set())
                .map(|(p, _)| {
                    members
                        .iter()
                        .map(|&i| {
                            let broken = model
                                .sla
                                .get(p)
                                .and_then(|s| s.get(i))
                                .and_then(|s| s.broken.clone());
                            v1::PolicySla {
                                uplink: name(i),
                                met: broken.is_none(),
                                reason: broken.unwrap_or_default(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    };
    let all: Vec<usize> = (0..config.uplinks.len()).collect();
    let mut out = vec![one(
        "default".into(),
        config.dispatch,
        &all,
        None,
        None,
        default_verdict(config, model),
    )];
    for (p, pc) in config.policies.iter().enumerate() {
        out.push(one(
            pc.name.clone(),
            pc.mode,
            &pc.uplinks,
            Some((p, &pc.sla)),
            Some(pc.when_none),
            policy_verdict(config, model, p),
        ));
    }
    out
}

/// The rules in order; `counters` by rule name (packets, bytes).
pub fn rules(
    config: &Config,
    counters: &std::collections::BTreeMap<String, (u64, u64)>,
) -> Vec<v1::Rule> {
    use crate::config::{AddrMatch, Proto, Target};
    let addrs = |list: &[AddrMatch]| {
        list.iter()
            .map(|a| match a {
                AddrMatch::Net(n) => n.to_string(),
                AddrMatch::Set(s) => format!("@{}", config.sets[*s].name),
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let ports = |list: &[(u16, u16)]| {
        list.iter()
            .map(|(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    config
        .rules
        .iter()
        .map(|r| {
            let mut m = Vec::new();
            if !r.iif.is_empty() {
                m.push(format!("iif={}", r.iif.join(",")));
            }
            if !r.src.is_empty() {
                m.push(format!("src={}", addrs(&r.src)));
            }
            if !r.dst.is_empty() {
                m.push(format!("dst={}", addrs(&r.dst)));
            }
            if r.proto != Proto::Any {
                m.push(format!("proto={}", r.proto.as_str()));
            }
            if !r.sport.is_empty() {
                m.push(format!("sport={}", ports(&r.sport)));
            }
            if !r.dport.is_empty() {
                m.push(format!("dport={}", ports(&r.dport)));
            }
            if !r.dscp.is_empty() {
                let d: Vec<String> = r.dscp.iter().map(|d| d.to_string()).collect();
                m.push(format!("dscp={}", d.join(",")));
            }
            let (packets, bytes) = counters.get(&r.name).copied().unwrap_or_default();
            v1::Rule {
                name: r.name.clone(),
                r#match: m.join(" "),
                policy: match r.target {
                    Target::Main => "main".into(),
                    Target::Default => "default".into(),
                    Target::Policy(p) => config.policies[p].name.clone(),
                },
                packets,
                bytes,
            }
        })
        .collect()
}

pub fn explanation(e: crate::plan::verdict::Explanation) -> v1::Explanation {
    v1::Explanation {
        rule: e.rule.unwrap_or_default(),
        policy: e.policy,
        uplink: e.uplink.unwrap_or_default(),
        summary: e.summary,
        steps: e.steps,
    }
}

pub fn set(c: &crate::config::SetConfig, elements: &[ipnet::IpNet]) -> v1::Set {
    v1::Set {
        name: c.name.clone(),
        elements: elements.iter().map(|n| n.to_string()).collect(),
        external: c.external,
    }
}
