//! Plan: the desired dataplane as a pure function of config and model. No I/O here; the
//! dataplane layer turns this into kernel objects.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::config::{Config, RuleConfig, SetConfig};
use crate::model::failover::HomeTarget;
use crate::model::nexthop::Hop;
use crate::model::{Model, Touched};

pub mod flush;
pub mod verdict;
pub use flush::{Flush, FlushOf, take_flushes};
pub use verdict::{NftPolicy, SpreadKey, Unassigned, Verdict};

/// Largest number of hash buckets the new-client fallback uses.
const MAX_FALLBACK_BUCKETS: u32 = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub nft: NftDesired,
    pub rules: BTreeSet<RuleSpec>,
    pub routes: BTreeSet<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftDesired {
    pub structure: NftStructure,
    /// Map element → the chain it jumps to. The key's kind names the map. In an
    /// incremental plan (`changed`), only the few elements that are not client addresses
    /// (sticky marks, pins).
    pub elements: BTreeMap<ElemKey, Arc<str>>,
    /// An incremental plan: the client addresses that may have changed since the last
    /// apply, each with its element now (`None`: it has none). The others are as the
    /// kernel has them.
    pub changed: Option<Vec<(ElemKey, Option<Arc<str>>)>>,
    /// Where a client without an assignment yet goes (client mode only). It changes with
    /// every placement, so it is kept out of the structure and applied on its own.
    pub unassigned: Option<Unassigned>,
}

/// Everything in the nft table except map elements. When the kernel's copy differs, the
/// chains that differ are rewritten in one transaction (the whole table only when its maps
/// or hooks differ).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftStructure {
    pub table: String,
    pub mask: u32,
    /// The conntrack-mark bits of policy ids (`dataplane.policy_mark_mask`).
    pub policy_mask: u32,
    pub lan_interfaces: Vec<String>,
    pub uplinks: Vec<NftUplink>,
    /// Named sets, in config order (`<name>_v4`, `<name>_v6` in nft).
    pub sets: Arc<Vec<SetConfig>>,
    /// In order, first match wins; each targets a policy by config index.
    pub rules: Arc<Vec<RuleConfig>>,
    /// Policy chains, in config order.
    pub policies: Vec<NftPolicy>,
    /// What traffic no rule matches gets.
    pub default: Verdict,
    /// Hash buckets (uplink names, by weight) for addresses uplinkd does not track
    /// (`lan.max_clients` reached): the survivors, or the first tier when none survives.
    pub overflow: Vec<String>,
    /// The gateway's own new connections (`[local] policy`): an output-hook chain that
    /// jumps here. `None` leaves them to the main table.
    pub local: Option<LocalVerdict>,
    /// Clients at `lan.max_addresses_per_client`: their further (untracked) addresses are
    /// hashed over the survivors, by the client's MAC.
    pub capped: Vec<crate::model::Mac>,
    /// Prefixes behind routers on the LAN: an unplaced host in one is logged to
    /// `nflog_group` (once per host every `ROUTED_RELOG`), and a placed one's new
    /// connections mark it active for `routed_idle`.
    pub routed: Vec<ipnet::IpNet>,
    pub routed_idle: std::time::Duration,
    pub nflog_group: u16,
    /// Count each client's bytes per uplink interface (`lan.client_usage`).
    pub client_usage: bool,
    /// The interfaces of uplinks without probes, while passive health is on: when each
    /// destination last had a LAN packet through them (passive evidence of failure needs
    /// `health.passive_min_destinations` of them unanswered).
    pub silent_dests: Vec<String>,
    /// Addresses of the uplinks the first route lookup of the gateway's own traffic does
    /// not pick: a packet from one was sent by a socket bound to it, and leaves by its
    /// uplink unmarked.
    pub local_bound: Vec<IpAddr>,
}

/// The interfaces of the uplinks that have no probes (each once), when passive health
/// is on.
pub fn silent_dests(config: &Config) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if config.health.passive {
        for u in config.uplinks.iter().filter(|u| u.probes.is_empty()) {
            if !out.contains(&u.interface) {
                out.push(u.interface.clone());
            }
        }
    }
    out
}

/// Where the output chain sends the gateway's own new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalVerdict {
    /// `goto policy_<name>`: a `[[policy]]`'s chain, shared with the LAN's traffic.
    Policy(String),
    /// The default policy's uplinks, each new connection drawn by weight (the gateway is
    /// one host: spreading its connections is what the client mode would not do).
    Spread(Verdict),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftUplink {
    pub name: String,
    pub interface: String,
    pub fwmark: u32,
    pub masquerade: bool,
    /// Where `home_<name>` sends the uplink's clients: to `up_<name>`, or (failed over)
    /// hashed over these uplinks' `up_` chains, each listed in proportion to its weight;
    /// none: dropped (over its quota with `quota_action = "stop"`, nothing else usable).
    pub home: Option<Vec<String>>,
    /// Failed over while a failback moves flows (`failback_flows = "move"`, or a metered
    /// uplink in the config): the conntrack-mark bits (in the policy bits) `home_<name>`
    /// gives the connections it places elsewhere, so that the failback can delete them.
    pub away_mark: Option<u32>,
    /// While the uplink has no IPv6 next hop (router advert withdrawn), `up_<name>` sends
    /// IPv6 connections to this uplink's `up_` chain instead.
    pub v6_detour: Option<String>,
    /// The interface's index while it exists: the accounting looks a packet's input
    /// and output interface up by it (a 4-byte load and key, not the 16-byte name).
    pub ifindex: Option<u32>,
    /// Usable and not stopped by its quota: its connections keep it (`STICKY_COMPARED`).
    pub open: bool,
}

/// The first uplinks (config order) whose mark an established connection's packet is
/// compared with, one rule each, before the `sticky` map is looked up for the others:
/// a comparison costs the kernel about a quarter of a map lookup, and nearly every packet
/// takes this path (measured: docs/benchmarks.md).
pub const STICKY_COMPARED: usize = 4;

/// A map element key; the variant decides the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ElemKey {
    /// A client address → `home_<uplink>`: an element of the plain set
    /// `client4.<uplink>` (not of a verdict map, whose every element the kernel walks to
    /// validate each commit that adds a `goto`).
    V4(Ipv4Addr),
    /// As `V4`, in `client6.<uplink>`.
    V6(Ipv6Addr),
    /// `sticky`: conntrack mark → `keep_<uplink>`, for connections that already have one.
    Mark(u32),
    /// `pin4`: operator override → `home_<uplink>`, looked up before `client4`. Its own
    /// map so that pinning adds an element instead of changing one (a change costs a
    /// delete, about 16 ms of kernel commit; an add about 2 ms).
    Pin4(Ipv4Addr),
    /// `pin6`: as `pin4`.
    Pin6(Ipv6Addr),
}

/// The client verdict maps of earlier versions, read only to adopt their assignments.
pub const MAP_CLIENT4: &str = "client4";
pub const MAP_CLIENT6: &str = "client6";
pub const MAP_STICKY: &str = "sticky";
pub const MAP_PIN4: &str = "pin4";
pub const MAP_PIN6: &str = "pin6";

/// The set of the client addresses homed on `uplink`, per family.
pub fn client_set(uplink: &str, v6: bool) -> String {
    format!("client{}.{uplink}", if v6 { 6 } else { 4 })
}

impl ElemKey {
    /// The map or set the element goes in, given the chain it leads to.
    pub fn container(&self, target: &str) -> Cow<'static, str> {
        let home = || target.strip_prefix("home_").unwrap_or(target);
        match self {
            ElemKey::V4(_) => Cow::Owned(client_set(home(), false)),
            ElemKey::V6(_) => Cow::Owned(client_set(home(), true)),
            ElemKey::Mark(_) => Cow::Borrowed(MAP_STICKY),
            ElemKey::Pin4(_) => Cow::Borrowed(MAP_PIN4),
            ElemKey::Pin6(_) => Cow::Borrowed(MAP_PIN6),
        }
    }

    /// A client address (a set element, without a verdict of its own).
    pub fn is_client(&self) -> bool {
        matches!(self, ElemKey::V4(_) | ElemKey::V6(_))
    }
}

pub fn home_chain(uplink: &str) -> String {
    format!("home_{uplink}")
}

/// Where the sticky map sends an established connection's packets: the uplink's packet
/// mark only (its conntrack mark already says the uplink).
pub fn keep_chain(uplink: &str) -> String {
    format!("keep_{uplink}")
}

pub fn up_chain(uplink: &str) -> String {
    format!("up_{uplink}")
}

/// A policy's chain; the default policy's is `policy_default` ("default" is reserved).
pub fn policy_chain(policy: &str) -> String {
    format!("policy_{policy}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleAction {
    /// `lookup main suppress_prefixlength 0`: the main table's specific routes (LAN, other
    /// local subnets) win over the uplink tables; its default route does not.
    MainSpecific,
    /// `fwmark mark/mask lookup table`.
    FwMark { mark: u32, mask: u32, table: u32 },
    /// `from addr lookup table`: traffic from an uplink's own address leaves through it.
    FromAddr { addr: IpAddr, table: u32 },
    /// `iif lo lookup table`: the first route lookup of the gateway's own traffic (before
    /// the output chain marks it) finds the `[local]` policy's first uplink, so a socket
    /// gets a route and a source address at all while main has no default route.
    Local { table: u32 },
    /// `oif IFNAME lookup table`: a socket bound to an uplink's device (SO_BINDTODEVICE,
    /// `curl --interface wan1`) is routed through that uplink's table, whatever its mark.
    Oif { ifname: IfName, table: u32 },
}

/// An interface name as the kernel keeps it (at most 15 bytes), kept inline so that rule
/// specs stay plain values.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName([u8; 16]);

impl IfName {
    /// `None` for a name the kernel could not have (validated names always fit).
    pub fn new(name: &str) -> Option<IfName> {
        let mut b = [0u8; 16];
        (name.len() < 16 && !name.is_empty()).then(|| {
            b[..name.len()].copy_from_slice(name.as_bytes());
            IfName(b)
        })
    }

    pub fn as_str(&self) -> &str {
        let end = self.0.iter().position(|&c| c == 0).unwrap_or(16);
        std::str::from_utf8(&self.0[..end]).unwrap_or_default()
    }
}

impl std::fmt::Debug for IfName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    pub family: Family,
    pub priority: u32,
    pub action: RuleAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteSpec {
    pub table: u32,
    pub family: Family,
    /// `None`: by device (point-to-point).
    pub gateway: Option<IpAddr>,
    pub oif: u32,
}

/// The whole desired state, every client address included.
pub fn plan(config: &Config, model: &Model) -> Desired {
    plan_touched(config, model, &Touched::All)
}

/// The desired state with only the `touched` client addresses (an incremental plan
/// unless every one is): what an event costs then does not grow with the LAN. The rest of
/// the table, the rules and the routes are whole, and small.
pub fn plan_touched(config: &Config, model: &Model, touched: &Touched) -> Desired {
    let dp = &config.dataplane;
    let buckets = |idx: &[usize]| spread(config, idx);
    let uplinks = config
        .uplinks
        .iter()
        .enumerate()
        .map(|(i, u)| NftUplink {
            name: u.name.clone(),
            interface: u.interface.clone(),
            fwmark: dp.fwmark(u.mark),
            masquerade: u.masquerade,
            home: match model.home_target(i) {
                HomeTarget::Direct => None,
                HomeTarget::Spread(to) => Some(buckets(&to)),
                HomeTarget::Blocked => Some(Vec::new()),
            },
            away_mark: match model.home_target(i) {
                HomeTarget::Spread(_) if config.failback_moves_flows() => dp.away_ctmark(u.mark),
                _ => None,
            },
            v6_detour: model
                .v6_detour(config, i)
                .map(|j| config.uplinks[j].name.clone()),
            ifindex: model.uplinks[i].link.ifindex,
            open: model.open(i),
        })
        .collect();
    let structure = NftStructure {
        table: dp.nft_table.clone(),
        mask: dp.fwmark_mask,
        policy_mask: dp.policy_mark_mask,
        lan_interfaces: config.lan.interfaces.clone(),
        uplinks,
        // Sets can hold tens of thousands of elements: shared unless edited.
        sets: match model.edited_sets() {
            Some(s) => s.clone(),
            None if model.set_edits.is_empty() => config.sets.clone(),
            // Edits not rebuilt yet (a model restored without `keep_set_edits`).
            None => Arc::new(config.sets.iter().map(|s| model.effective_set(s)).collect()),
        },
        rules: config.rules.clone(),
        policies: (0..config.policies.len())
            .map(|p| NftPolicy {
                name: config.policies[p].name.clone(),
                verdict: verdict::policy_verdict(config, model, p).0,
                ct_mark: config.policies[p]
                    .sla
                    .is_set()
                    .then(|| dp.policy_ctmark(p))
                    .flatten(),
            })
            .collect(),
        default: verdict::default_verdict(config, model).0,
        overflow: overflow_buckets(config, model),
        local: verdict::local_verdict(config, model),
        local_bound: local_bound(config, model),
        capped: model.capped_clients().copied().collect(),
        routed: model.routed_prefixes(),
        routed_idle: config.lan.client_idle_timeout,
        nflog_group: dp.nflog_group,
        client_usage: config.lan.client_usage,
        silent_dests: silent_dests(config),
    };
    let client_mode = structure.default == Verdict::Clients;
    let unassigned = client_mode.then(|| verdict::unassigned(config, model));

    let mut elements = BTreeMap::new();
    // A connection keeps its uplink only while that uplink is open (usable, and not
    // taken out by its quota); the first ones are compared by rules instead, from the
    // same `open`.
    for u in structure
        .uplinks
        .iter()
        .skip(STICKY_COMPARED)
        .filter(|u| u.open)
    {
        elements.insert(ElemKey::Mark(u.fwmark), Arc::from(keep_chain(&u.name)));
    }
    // One allocation per uplink, shared by all its clients' elements.
    let homes: BTreeMap<&str, Arc<str>> = config
        .uplinks
        .iter()
        .map(|u| (u.name.as_str(), Arc::from(home_chain(&u.name))))
        .collect();
    let client_key = |ip: IpAddr| match ip {
        IpAddr::V4(a) => ElemKey::V4(a),
        IpAddr::V6(a) => ElemKey::V6(a),
    };
    // Only the client mode of the default policy reads the client sets.
    let changed = match touched {
        Touched::All => {
            // Collected, not inserted one by one: the map is built from the sorted list
            // in one pass (at 100k addresses, random inserts took most of a whole plan).
            let mut clients: BTreeMap<ElemKey, Arc<str>> = model
                .addresses()
                .filter(|_| client_mode)
                .filter_map(|(ip, home)| Some((client_key(ip), homes.get(home)?.clone())))
                .collect();
            clients.extend(std::mem::take(&mut elements));
            elements = clients;
            None
        }
        Touched::Some(ips) => Some(
            ips.iter()
                .map(|ip| {
                    let target = model
                        .client_by_addr(ip)
                        .filter(|_| client_mode)
                        .and_then(|c| homes.get(c.home.as_str()))
                        .cloned();
                    (client_key(*ip), target)
                })
                .collect(),
        ),
    };
    for (ip, o) in &model.overrides {
        let Some(i) = model.uplinks.iter().position(|u| u.name == o.uplink) else {
            continue;
        };
        // A pin to an uplink that can carry traffic takes effect now, even while that
        // uplink waits out its failback delay; a pin to a dead or drained one follows its
        // home chain over the survivors.
        let target = if model.pin_direct(i) {
            Arc::from(up_chain(&o.uplink))
        } else {
            homes[o.uplink.as_str()].clone()
        };
        let key = match ip {
            IpAddr::V4(a) => ElemKey::Pin4(*a),
            IpAddr::V6(a) => ElemKey::Pin6(*a),
        };
        elements.insert(key, target);
    }

    let mut rules = BTreeSet::new();
    let mut routes = BTreeSet::new();
    for family in [Family::V4, Family::V6] {
        rules.insert(RuleSpec {
            family,
            priority: dp.rule_priority,
            action: RuleAction::MainSpecific,
        });
    }
    for (i, (u, m)) in config.uplinks.iter().zip(&model.uplinks).enumerate() {
        let fw = RuleAction::FwMark {
            mark: dp.fwmark(u.mark),
            mask: dp.fwmark_mask,
            table: u.table,
        };
        rules.insert(RuleSpec {
            family: Family::V4,
            priority: dp.rule_priority + 1,
            action: fw,
        });
        if u.ipv6 {
            rules.insert(RuleSpec {
                family: Family::V6,
                priority: dp.rule_priority + 1,
                action: fw,
            });
        }
        for addr in &m.addrs {
            let family = if addr.is_ipv4() {
                Family::V4
            } else {
                Family::V6
            };
            rules.insert(RuleSpec {
                family,
                priority: dp.rule_priority + 2,
                action: RuleAction::FromAddr {
                    addr: *addr,
                    table: u.table,
                },
            });
        }
        // A socket bound to the uplink's device: its table, before any mark is looked at.
        if let Some(ifname) = IfName::new(&u.interface) {
            for family in [Family::V4, Family::V6] {
                if family == Family::V4 || u.ipv6 {
                    rules.insert(RuleSpec {
                        family,
                        priority: dp.rule_priority + 2,
                        action: RuleAction::Oif {
                            ifname,
                            table: u.table,
                        },
                    });
                }
            }
        }
        // The kernel refuses routes through a missing or admin-down device; they are added
        // when the link event arrives.
        let Some(oif) = m.link.ifindex.filter(|_| m.link.admin_up) else {
            continue;
        };
        let (hop4, hop6) = model.hops(config, i);
        let families = [(Family::V4, hop4, true), (Family::V6, hop6, u.ipv6)];
        for (family, hop, wanted) in families {
            let gateway = match hop {
                _ if !wanted => continue,
                // `auto` with nothing learned: no route, and the uplink is down (IPv4) or
                // carries no IPv6.
                Hop::Unknown => continue,
                Hop::Device => None,
                Hop::Via(g) => Some(g),
            };
            routes.insert(RouteSpec {
                table: u.table,
                family,
                gateway,
                oif,
            });
        }
    }

    for family in [Family::V4, Family::V6] {
        if let Some(i) = verdict::local_first(config, model, family == Family::V6) {
            rules.insert(RuleSpec {
                family,
                priority: dp.rule_priority + 3,
                action: RuleAction::Local {
                    table: config.uplinks[i].table,
                },
            });
        }
    }

    Desired {
        nft: NftDesired {
            structure,
            elements,
            changed,
            unassigned,
        },
        rules,
        routes,
    }
}

/// The uplink addresses an unbound socket of the gateway does not get from its first route
/// lookup (that is the `[local]` policy's first uplink's, per family); empty without
/// `[local]`. Only usable uplinks': a connected socket keeps the source its first packet
/// got, so after a failover the dead uplink's address is what the moved flows carry (a
/// socket really bound there has no path anyway).
fn local_bound(config: &Config, model: &Model) -> Vec<IpAddr> {
    if config.local == crate::config::LocalPolicy::Main {
        return Vec::new();
    }
    let first = [
        verdict::local_first(config, model, false),
        verdict::local_first(config, model, true),
    ];
    let mut out: Vec<IpAddr> = model
        .uplinks
        .iter()
        .enumerate()
        .filter(|(_, u)| u.usable())
        .flat_map(|(i, u)| {
            u.addrs
                .iter()
                .filter(move |a| first[a.is_ipv6() as usize] != Some(i))
                .copied()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where untracked addresses are hashed: over the survivors; with none, over the tier new
/// clients are placed in (nothing better exists).
pub fn overflow_buckets(config: &Config, model: &Model) -> Vec<String> {
    let mut to = model.survivors(None);
    if to.is_empty() {
        let tier = config.uplinks.iter().map(|u| u.tier).min().unwrap_or(1);
        to = (0..config.uplinks.len())
            .filter(|&i| config.uplinks[i].tier == tier)
            .collect();
    }
    spread(config, &to)
}

/// Hash buckets over the configured uplinks `idx`, by weight.
pub fn spread(config: &Config, idx: &[usize]) -> Vec<String> {
    fallback_buckets(
        idx.iter()
            .map(|&i| (config.uplinks[i].name.as_str(), config.uplinks[i].weight)),
    )
}

/// Expands weights into hash buckets (reduced by their gcd and scaled down to at most
/// `MAX_FALLBACK_BUCKETS`, every uplink keeping at least one).
pub fn fallback_buckets<'a>(weights: impl Iterator<Item = (&'a str, u32)>) -> Vec<String> {
    let weights: Vec<(&str, u32)> = weights.collect();
    let g = weights.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
    let total: u32 = weights.iter().map(|(_, w)| w / g).sum();
    let mut buckets = Vec::new();
    for (name, w) in &weights {
        let mut n = w / g;
        if total > MAX_FALLBACK_BUCKETS {
            n = (n * MAX_FALLBACK_BUCKETS / total).max(1);
        }
        buckets.extend(std::iter::repeat_n(name.to_string(), n as usize));
    }
    buckets
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The bucket nft's `jhash <saddr> mod n seed 0` picks for `ip`: Linux's `jhash()` over the
/// address bytes (network order), scaled into `0..n` as `nft_jhash_eval` does. Used to tell
/// which uplink a hashed (unassigned or failed-over) client is on.
pub fn jhash_bucket(ip: IpAddr, n: usize) -> usize {
    key_bucket(&addr_bytes(ip), n)
}

/// The bucket nft's `jhash <key> mod n seed 0` picks for a key of several fields
/// (`saddr . daddr`): the fields' bytes, one after the other.
pub fn key_bucket(key: &[u8], n: usize) -> usize {
    ((jhash(key, 0) as u64 * n as u64) >> 32) as usize
}

/// An address's bytes in network order, as nft hashes them.
pub fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// Bob Jenkins' lookup3 as Linux's `include/linux/jhash.h` has it (little-endian words).
fn jhash(key: &[u8], initval: u32) -> u32 {
    let mix = |a: &mut u32, b: &mut u32, c: &mut u32| {
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(4);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(6);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(8);
        *b = b.wrapping_add(*a);
        *a = a.wrapping_sub(*c);
        *a ^= c.rotate_left(16);
        *c = c.wrapping_add(*b);
        *b = b.wrapping_sub(*a);
        *b ^= a.rotate_left(19);
        *a = a.wrapping_add(*c);
        *c = c.wrapping_sub(*b);
        *c ^= b.rotate_left(4);
        *b = b.wrapping_add(*a);
    };
    let final_ = |a: &mut u32, b: &mut u32, c: &mut u32| {
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(14));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(11));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(25));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(16));
        *a ^= *c;
        *a = a.wrapping_sub(c.rotate_left(4));
        *b ^= *a;
        *b = b.wrapping_sub(a.rotate_left(14));
        *c ^= *b;
        *c = c.wrapping_sub(b.rotate_left(24));
    };
    let word = |k: &[u8]| u32::from_le_bytes([k[0], k[1], k[2], k[3]]);
    let mut len = key.len();
    let init = 0xdead_beefu32
        .wrapping_add(len as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut k = key;
    while len > 12 {
        a = a.wrapping_add(word(&k[0..]));
        b = b.wrapping_add(word(&k[4..]));
        c = c.wrapping_add(word(&k[8..]));
        mix(&mut a, &mut b, &mut c);
        len -= 12;
        k = &k[12..];
    }
    if len == 0 {
        return c;
    }
    let mut tail = [0u8; 12];
    tail[..len].copy_from_slice(&k[..len]);
    a = a.wrapping_add(word(&tail[0..]));
    b = b.wrapping_add(word(&tail[4..]));
    c = c.wrapping_add(word(&tail[8..]));
    final_(&mut a, &mut b, &mut c);
    c
}

/// How often uplink `i` is probed now: a metered uplink that carries nothing while
/// another uplink is usable every `health.standby_interval`, any other every
/// `health.interval`. With no other uplink usable it is the next candidate, and a standby
/// that was down must be seen back within a normal round.
pub fn probe_interval(config: &Config, model: &Model, i: usize) -> std::time::Duration {
    let others = || (0..model.uplinks.len()).any(|j| j != i && model.uplinks[j].usable());
    if config.uplinks[i].metered && others() && !carries(config, model, i) {
        config.health.standby_interval
    } else {
        config.health.interval
    }
}

/// Whether uplink `i` may carry the LAN's new connections now: its own clients while they
/// are home, the clients of a failed-over or drained uplink that are spread onto it, a
/// pin, or the default policy's or another policy's verdict naming it. A metered uplink
/// that carries nothing is probed every `health.standby_interval`.
pub fn carries(config: &Config, model: &Model, i: usize) -> bool {
    let name = config.uplinks[i].name.as_str();
    let names = |v: &Verdict| match v {
        Verdict::Uplink(u) => u == name,
        Verdict::Spread { buckets, .. } => buckets.iter().any(|b| b == name),
        _ => false,
    };
    let counts = model.counts();
    (0..model.uplinks.len()).any(|j| {
        counts[j] > 0
            && match model.home_target(j) {
                HomeTarget::Direct => j == i,
                HomeTarget::Spread(to) => to.contains(&i),
                HomeTarget::Blocked => false,
            }
    }) || model.overrides.values().any(|o| o.uplink == name)
        || names(&verdict::default_verdict(config, model).0)
        || (0..config.policies.len()).any(|p| names(&verdict::policy_verdict(config, model, p).0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LinkState, Mac};
    use std::path::Path;

    const CFG: &str = r#"
[lan]
interfaces = ["lan0"]
[[uplink]]
name = "a"
interface = "wan0"
gateway = "100.64.0.1"
weight = 2
[[uplink]]
name = "b"
interface = "ppp0"
"#;

    fn setup() -> (Config, Model) {
        let c = Config::parse(Path::new("t"), CFG).unwrap();
        let m = Model::new(&c);
        (c, m)
    }

    #[test]
    fn fallback_follows_weights() {
        assert_eq!(
            fallback_buckets([("a", 2), ("b", 1), ("c", 1)].into_iter()),
            ["a", "a", "b", "c"]
        );
        assert_eq!(
            fallback_buckets([("a", 10), ("b", 5)].into_iter()),
            ["a", "a", "b"]
        );
        let big = fallback_buckets([("a", 1000), ("b", 1)].into_iter());
        assert!(big.len() <= 65 && big.contains(&"b".to_string()));
    }

    #[test]
    fn rules_exist_without_links_routes_only_with_up_links() {
        let (c, mut m) = setup();
        let d = plan(&c, &m);
        // main-specific ×2 families, fwmark v4 ×2, fwmark v6 for the p2p link, and as
        // many `oif` rules (device-bound sockets).
        assert_eq!(d.rules.len(), 8);
        assert!(d.routes.is_empty());
        m.set_link(
            "ppp0",
            LinkState {
                ifindex: Some(7),
                admin_up: true,
                carrier: true,
            },
        );
        m.set_link(
            "wan0",
            LinkState {
                ifindex: Some(3),
                admin_up: false,
                carrier: true,
            },
        );
        let d = plan(&c, &m);
        let routes: Vec<_> = d.routes.iter().copied().collect();
        assert_eq!(
            routes,
            vec![
                RouteSpec {
                    table: 1002,
                    family: Family::V4,
                    gateway: None,
                    oif: 7
                },
                RouteSpec {
                    table: 1002,
                    family: Family::V6,
                    gateway: None,
                    oif: 7
                },
            ]
        );
    }

    #[test]
    fn clients_map_to_home_chains_and_sticky_marks_to_up_chains() {
        let (c, mut m) = setup();
        links_up(&c, &mut m);
        m.neighbour_present(
            "10.0.0.1".parse().unwrap(),
            Mac([2, 0, 0, 0, 0, 1]),
            0,
            None,
        );
        m.neighbour_present(
            "2001:db8::1".parse().unwrap(),
            Mac([2, 0, 0, 0, 0, 1]),
            0,
            None,
        );
        let d = plan(&c, &m);
        assert_eq!(
            &*d.nft.elements[&ElemKey::V4("10.0.0.1".parse().unwrap())],
            "home_a"
        );
        assert_eq!(
            &*d.nft.elements[&ElemKey::V6("2001:db8::1".parse().unwrap())],
            "home_a"
        );
        // Both connections keep their uplink by a comparison, not the map.
        assert!(d.nft.structure.uplinks.iter().all(|u| u.open));
        assert!(!d.nft.elements.keys().any(|k| matches!(k, ElemKey::Mark(_))));
        // The next client goes to b (a has one client at weight 2, b none).
        assert_eq!(d.nft.unassigned, Some(Unassigned::Next("b".into())));
    }

    fn links_up(c: &Config, m: &mut Model) {
        for (i, iface) in ["wan0", "ppp0"].iter().enumerate() {
            m.set_link(
                iface,
                LinkState {
                    ifindex: Some(i as u32 + 2),
                    admin_up: true,
                    carrier: true,
                },
            );
            m.set_addr(iface, format!("100.64.{i}.2").parse().unwrap(), true);
        }
        m.refresh_links(std::time::Instant::now(), &c.health, &c.failover);
    }

    #[test]
    fn a_metered_backup_is_probed_at_the_standby_pace_until_it_carries_clients() {
        let text = CFG.replace(
            "name = \"b\"\ninterface = \"ppp0\"",
            "name = \"b\"\ninterface = \"ppp0\"\ntier = 2\nmetered = true",
        );
        let c = Config::parse(
            Path::new("t"),
            &format!("[health]\nstandby_interval = \"7s\"\n{text}"),
        )
        .unwrap();
        let mut m = Model::new(&c);
        links_up(&c, &mut m);
        m.neighbour_present(
            "10.0.0.1".parse().unwrap(),
            Mac([2, 0, 0, 0, 0, 1]),
            0,
            None,
        );
        assert!(carries(&c, &m, 0));
        assert!(!carries(&c, &m, 1), "tier 2 carries nothing while a is up");
        assert_eq!(probe_interval(&c, &m, 1), std::time::Duration::from_secs(7));
        assert_eq!(probe_interval(&c, &m, 0), c.health.interval, "not metered");
        // a goes down: its client fails over to b, which is probed at the normal pace.
        wan0_loses_carrier(&c, &mut m);
        assert!(carries(&c, &m, 1));
        assert_eq!(probe_interval(&c, &m, 1), c.health.interval);
        // Its own link down too: with nothing else usable it is the next candidate, and is
        // probed at the normal pace to be seen back.
        m.set_link(
            "ppp0",
            LinkState {
                ifindex: Some(3),
                admin_up: true,
                carrier: false,
            },
        );
        m.refresh_links(std::time::Instant::now(), &c.health, &c.failover);
        assert!(!m.uplinks[1].usable());
        assert_eq!(probe_interval(&c, &m, 1), c.health.interval);
        // A pin to b makes it carry too.
        let (c2, mut m2) = (c.clone(), Model::new(&c));
        links_up(&c2, &mut m2);
        m2.overrides.insert(
            "10.0.0.9".parse().unwrap(),
            crate::model::Override {
                uplink: "b".into(),
                until: None,
            },
        );
        assert!(carries(&c2, &m2, 1));
    }

    fn wan0_loses_carrier(c: &Config, m: &mut Model) {
        m.set_link(
            "wan0",
            LinkState {
                ifindex: Some(2),
                admin_up: true,
                carrier: false,
            },
        );
        m.refresh_links(std::time::Instant::now(), &c.health, &c.failover);
    }

    #[test]
    fn failover_rewrites_the_home_chain_and_drops_the_sticky_mark() {
        let (c, mut m) = setup();
        links_up(&c, &mut m);
        let d = plan(&c, &m);
        assert_eq!(d.nft.structure.uplinks[0].home, None);
        assert_eq!(
            d.rules
                .iter()
                .filter(|r| matches!(r.action, RuleAction::FromAddr { .. }))
                .count(),
            2
        );
        wan0_loses_carrier(&c, &mut m);
        let d = plan(&c, &m);
        assert_eq!(d.nft.structure.uplinks[0].home, Some(vec!["b".to_string()]));
        assert_eq!(d.nft.structure.uplinks[1].home, None);
        assert!(
            !d.nft.structure.uplinks[0].open && d.nft.structure.uplinks[1].open,
            "dead uplink's flows are not sticky"
        );
        assert_eq!(d.nft.unassigned, Some(Unassigned::Next("b".into())));
    }

    /// The first `STICKY_COMPARED` uplinks keep their connections by comparisons; the
    /// others' open ones are in the `sticky` map.
    #[test]
    fn uplinks_past_the_compared_ones_keep_their_connections_by_the_map() {
        let mut text = String::from("[lan]\ninterfaces = [\"lan0\"]\n");
        for i in 0..6 {
            text.push_str(&format!(
                "[[uplink]]\nname = \"u{i}\"\ninterface = \"ppp{i}\"\n"
            ));
        }
        let c = Config::parse(Path::new("t"), &text).unwrap();
        let mut m = Model::new(&c);
        for i in [0, 1, 4] {
            m.set_link(
                &format!("ppp{i}"),
                LinkState {
                    ifindex: Some(10 + i as u32),
                    admin_up: true,
                    carrier: true,
                },
            );
            m.set_addr(
                &format!("ppp{i}"),
                format!("100.64.{i}.2").parse().unwrap(),
                true,
            );
        }
        m.refresh_links(std::time::Instant::now(), &c.health, &c.failover);
        let d = plan(&c, &m);
        let open: Vec<bool> = d.nft.structure.uplinks.iter().map(|u| u.open).collect();
        assert_eq!(open, [true, true, false, false, true, false]);
        let marks: Vec<(u32, &str)> = d
            .nft
            .elements
            .iter()
            .filter_map(|(k, v)| match k {
                ElemKey::Mark(m) => Some((*m, &**v)),
                _ => None,
            })
            .collect();
        assert_eq!(marks, [(c.dataplane.fwmark(c.uplinks[4].mark), "keep_u4")]);
    }

    /// An incremental plan applied to what the previous whole plan put in the maps gives
    /// what a whole plan gives now, whatever the LAN did in between: arrivals, departures,
    /// expiries, an address that moves to another host, the cap on addresses.
    #[test]
    fn increments_add_up_to_the_whole_plan() {
        let text = CFG.replacen(
            "interfaces = [\"lan0\"]",
            "interfaces = [\"lan0\"]\nmax_clients = 40\nmax_addresses_per_client = 3",
            1,
        );
        let c = Config::parse(Path::new("t"), &text).unwrap();
        let mut m = Model::new(&c);
        links_up(&c, &mut m);
        let mut kernel = plan(&c, &m).nft.elements;
        m.take_touched();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..2000u64 {
            let ip: IpAddr = match next(2) {
                0 => format!("10.0.0.{}", next(60) + 1).parse().unwrap(),
                _ => format!("2001:db8::{:x}", next(60) + 1).parse().unwrap(),
            };
            let mac = Mac([2, 0, 0, 0, 0, next(50) as u8]);
            match next(4) {
                0 | 1 => {
                    m.neighbour_present(ip, mac, step, None);
                }
                2 => m.neighbour_gone(ip, step),
                _ => {
                    m.expire(step, std::time::Duration::from_millis(5));
                    // Expiry reads its index, not every client: none overdue is left.
                    let mut addrs = m.clients().values().flat_map(|c| c.addresses.values());
                    assert!(addrs.all(|a| a.present || step - a.last_seen < 5));
                }
            }
            let delta = plan_touched(&c, &m, &m.clone().take_touched());
            m.take_touched();
            for (k, want) in delta.nft.changed.expect("incremental") {
                match want {
                    Some(w) => kernel.insert(k, w),
                    None => kernel.remove(&k),
                };
            }
            kernel.retain(|k, _| matches!(k, ElemKey::V4(_) | ElemKey::V6(_)));
            kernel.extend(delta.nft.elements);
            assert_eq!(kernel, plan(&c, &m).nft.elements, "step {step}");
        }
    }

    #[test]
    fn plan_is_deterministic() {
        let (c, m) = setup();
        assert_eq!(plan(&c, &m), plan(&c, &m));
    }
}
