//! The nft driver: renders the desired table as nft JSON (through the `nftables` crate's
//! schema; `render`), reads the kernel's copy back (its chains, sets and maps through
//! `nft`, its rules, counters and elements over netlink: `nfnl`, `listing`), and applies
//! the difference (`diff` for the elements, the structure here) in one `nft -j -f -`
//! transaction.
//!
//! Structure (chains, rules, maps) is compared by signature: every rule carries a comment
//! with a hash of its own expression, so a deleted, added or changed rule shows up. Chains
//! whose rules differ are flushed and refilled in place, with the element changes, in one
//! transaction; only when the maps or hooks themselves differ (the table was deleted or
//! edited by hand) is the whole table replaced, elements included, still in one
//! transaction: packets see the old table or the new one, never a mix. Element changes
//! come from a whole plan diffed against the cache of the kernel's maps, or from an
//! incremental plan that names only the client addresses an event touched.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use nftables::expr::{
    BinaryOperation, CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, SetItem,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{JumpTarget, Mangle, Match, Operator, Statement, VerdictMap};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::config::{AddrMatch, SetConfig, Target};
use crate::plan::{
    ElemKey, MAP_CLIENT4, MAP_CLIENT6, MAP_PIN4, MAP_PIN6, MAP_STICKY, NftDesired, NftStructure,
    STICKY_COMPARED, SpreadKey, Unassigned, Verdict, client_set, home_chain, keep_chain,
    policy_chain, up_chain,
};

use super::{DataplaneError, nfnl};

mod diff;
mod listing;
mod render;

use diff::*;
pub use diff::{ElemChanges, diff_desired, diff_elements};
use listing::*;
pub use listing::{Structure, adopted_homes, parse_listing, parse_structure};
pub use render::rule_chain;
use render::*;

const PREROUTING: &str = "prerouting";
/// Packets from the LAN, after the one interface lookup of `prerouting`.
const LAN: &str = "lan";
const POSTROUTING: &str = "postrouting";
/// Counts forwarded traffic per uplink interface, both directions.
const ACCOUNTING: &str = "accounting";
/// The `[[rule]]`s, in order; ends in the default policy.
const RULES: &str = "rules";
const DEFAULT_POLICY: &str = "default";
/// Where a client without an assignment yet goes: one `goto home_<uplink>`, rewritten as
/// clients are placed. A chain of its own, without set lookups, so that its rewrite stays
/// a small transaction (and `nft monitor` keeps following the maps).
const UNASSIGNED: &str = "unassigned";
/// Addresses uplinkd does not track (`lan.max_clients` reached), hashed over the survivors.
const OVERFLOW: &str = "overflow";
/// The gateway's own outbound traffic (`[local] policy`): a route-type output chain.
const OUTPUT: &str = "output";
/// The default policy's spread for the gateway's own connections.
const LOCAL: &str = "local";
/// In a rule's comment, before the `[[rule]]`'s name (its counters are summed by name).
const RULE_TAG: &str = " rule:";
/// Rule comments start with this, followed by a hash of the rule's expression.
const COMMENT_PREFIX: &str = "uplinkd:";
/// Fixed so that a later API can compute which bucket an unassigned client hashes to.
pub const FALLBACK_SEED: u32 = 0;

/// The kernel's copy of uplinkd's table, as far as uplinkd compares it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KernelNft {
    pub signature: Signature,
    pub elements: BTreeMap<ElemKey, Arc<str>>,
    pub unassigned: UnassignedChain,
}

/// The `unassigned` chain, outside the signature: a placement inserts a new first rule
/// (an add costs the kernel ~4 ms, replacing a rule ~16 ms), and the stale ones behind it
/// are dropped together now and then.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnassignedChain {
    /// The first rule's target (the one packets take).
    pub target: Option<String>,
    pub rules: usize,
}

/// Readings of the table tried before giving up while the ruleset keeps changing, or a
/// set keeps being resized.
const READ_ATTEMPTS: usize = 5;
/// After a reading that saw a set being resized (`Elements::consistent`), the wait before
/// the next: a resize after a commit of 100k elements lasts about a second.
const RESIZE_WAIT: Duration = Duration::from_millis(300);
/// Stale rules the `unassigned` chain may hold before it is rewritten; it is also
/// rewritten on every resync (`tidy`), off the path of a placement.
const MAX_UNASSIGNED_RULES: usize = 256;
/// In the `unassigned` rule's comment, before its target.
const TARGET_TAG: &str = " to:";

/// What identifies the table's structure: chains with their hooks, maps with their
/// types, and each chain's rules in order (by comment).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    chains: BTreeSet<ListChain>,
    /// Name, key type, data type and size.
    maps: BTreeSet<(String, String, String, Option<u64>)>,
    rules: Vec<(String, Option<String>)>,
    /// Name and type.
    sets: BTreeSet<(String, String)>,
    /// Named counters (the accounting chain's).
    counters: BTreeSet<String>,
}

impl Signature {
    /// The kernel's table (`self`) can become `want` without being replaced: same maps,
    /// and every chain both have is defined alike (hooks cannot change in place). Chains
    /// may be added (a new uplink) or removed, and rules rewritten.
    fn compatible(&self, want: &Signature) -> bool {
        self.maps == want.maps
            && self.chains.iter().all(|c| {
                want.chains
                    .iter()
                    .find(|w| w.name == c.name)
                    .is_none_or(|w| w == c)
            })
            && self
                .rules
                .iter()
                .all(|(c, _)| self.chains.iter().any(|x| &x.name == c))
    }

    /// Chains `want` has and `self` lacks, and the other way round.
    fn chain_changes(&self, want: &Signature) -> (Vec<ListChain>, Vec<String>) {
        let have: BTreeSet<&str> = self.chains.iter().map(|c| c.name.as_str()).collect();
        let wanted: BTreeSet<&str> = want.chains.iter().map(|c| c.name.as_str()).collect();
        (
            want.chains
                .iter()
                .filter(|c| !have.contains(c.name.as_str()))
                .cloned()
                .collect(),
            self.chains
                .iter()
                .filter(|c| !wanted.contains(c.name.as_str()))
                .map(|c| c.name.clone())
                .collect(),
        )
    }

    /// Sets to add (new, or of another type: deleted and added again) and sets to delete,
    /// to turn `self` into `want`.
    fn set_changes(&self, want: &Signature) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut add = BTreeSet::new();
        let mut del = BTreeSet::new();
        for w in &want.sets {
            if !self.sets.contains(w) {
                add.insert(w.0.clone());
                if self.sets.iter().any(|h| h.0 == w.0) {
                    del.insert(w.0.clone());
                }
            }
        }
        for h in &self.sets {
            if !want.sets.iter().any(|w| w.0 == h.0) {
                del.insert(h.0.clone());
            }
        }
        (add, del)
    }

    /// Counters to add and to delete, to turn `self` into `want`.
    fn counter_changes(&self, want: &Signature) -> (Vec<String>, Vec<String>) {
        (
            want.counters.difference(&self.counters).cloned().collect(),
            self.counters.difference(&want.counters).cloned().collect(),
        )
    }

    /// Chains of `other` whose rule lists differ from `self`'s.
    fn changed_chains(&self, other: &Signature) -> BTreeSet<String> {
        let by_chain = |s: &Signature| {
            let mut m: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
            for (c, comment) in &s.rules {
                m.entry(c.clone()).or_default().push(comment.clone());
            }
            m
        };
        let (a, b) = (by_chain(self), by_chain(other));
        other
            .chains
            .iter()
            .map(|c| c.name.clone())
            .filter(|n| a.get(n) != b.get(n))
            .collect()
    }
}

/// What an nft counter moved from `last` to `now`. A counter below its last reading
/// started again from zero (its table or chain was replaced, the host rebooted): all of
/// `now` is new.
pub fn moved(now: u64, last: u64) -> u64 {
    if now >= last { now - last } else { now }
}

/// Forwarded packets and bytes through one uplink interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub tx: (u64, u64),
    pub rx: (u64, u64),
    /// Packets received in reply to flows from the LAN: IPv4, IPv6.
    pub replies: (u64, u64),
}

/// Result of one apply, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NftStats {
    pub replaced_table: bool,
    pub rewritten_chains: usize,
    pub added: usize,
    pub deleted: usize,
}

impl NftStats {
    pub fn is_empty(&self) -> bool {
        !self.replaced_table && self.rewritten_chains == 0 && self.added == 0 && self.deleted == 0
    }
}

/// The traffic counters for the tasks beside the loop (scrapes, API reads, passive
/// health): concurrent readers share one `nft` run, and a reading younger than the
/// caller's `max_age` is reused, so a flood of scrapes costs at most one `nft` a second.
/// Traffic per interface, as one reading.
pub type TrafficByInterface = Arc<BTreeMap<String, Traffic>>;

/// Packets and bytes per `[[rule]]`, by name.
pub type RuleCounters = Arc<BTreeMap<String, (u64, u64)>>;

/// One reading shared by concurrent readers and reused while it is young enough.
struct Shared<T>(tokio::sync::Mutex<Option<(std::time::Instant, Arc<T>)>>);

impl<T> Shared<T> {
    fn new() -> Arc<Shared<T>> {
        Arc::new(Shared(tokio::sync::Mutex::new(None)))
    }

    /// The reading if it is at most `max_age` old, else a new one from `read`. The lock is
    /// held across the read: who comes meanwhile gets this reading.
    async fn get(
        &self,
        max_age: Duration,
        read: impl std::future::Future<Output = Result<T, DataplaneError>>,
    ) -> Result<Arc<T>, DataplaneError> {
        let mut last = self.0.lock().await;
        if let Some((at, t)) = &*last
            && at.elapsed() <= max_age
        {
            return Ok(t.clone());
        }
        let t = Arc::new(read.await?);
        *last = Some((std::time::Instant::now(), t.clone()));
        Ok(t)
    }
}

/// One element of a usage set: a client address's bytes through an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientBytes {
    pub addr: IpAddr,
    pub ifindex: u32,
    /// From the client (out by the interface), or to it (in by it).
    pub outbound: bool,
    pub bytes: u64,
}

#[derive(Clone)]
pub struct Counters {
    driver: NftDriver,
    traffic: Arc<Shared<BTreeMap<String, Traffic>>>,
    rules: Arc<Shared<BTreeMap<String, (u64, u64)>>>,
    /// External sets' elements by set name, reused for a second as the counters are: a
    /// viewer calling `explain` in a loop costs at most two `nft` runs a second per set.
    external: Arc<tokio::sync::Mutex<ExternalSets>>,
}

type ExternalSets = BTreeMap<String, (std::time::Instant, Arc<Vec<IpNet>>)>;

/// How long an external set's reading is reused.
const EXTERNAL_SET_MAX_AGE: Duration = Duration::from_secs(1);

impl Counters {
    pub fn new(driver: NftDriver) -> Counters {
        Counters {
            driver,
            traffic: Shared::new(),
            rules: Shared::new(),
            external: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
        }
    }

    /// Each client address's bytes per interface, from the usage sets
    /// (`lan.client_usage`); none while they do not exist.
    pub async fn client_bytes(&self) -> Result<Vec<ClientBytes>, DataplaneError> {
        self.driver.client_bytes().await
    }

    /// The rules' counters, shared and reused like the traffic counters.
    pub async fn rules(&self, max_age: Duration) -> Result<RuleCounters, DataplaneError> {
        self.rules.get(max_age, self.driver.rule_counters()).await
    }

    /// An external `[[set]]`'s elements as the kernel has them (both families), shared
    /// by concurrent readers and reused for `EXTERNAL_SET_MAX_AGE`.
    pub async fn external_set(&self, name: &str) -> Result<Arc<Vec<IpNet>>, DataplaneError> {
        // Held across the read: who comes meanwhile gets this reading.
        let mut cache = self.external.lock().await;
        if let Some((at, v)) = cache.get(name)
            && at.elapsed() <= EXTERNAL_SET_MAX_AGE
        {
            return Ok(v.clone());
        }
        let v = Arc::new(
            self.set_nets(&[set_name(name, false), set_name(name, true)])
                .await?,
        );
        cache.insert(name.to_string(), (std::time::Instant::now(), v.clone()));
        Ok(v)
    }

    /// The hosts behind LAN routers that opened a connection within the idle timeout.
    pub async fn routed_seen(&self) -> Result<std::collections::HashSet<IpAddr>, DataplaneError> {
        let sets = ROUTED_SEEN.map(String::from);
        Ok(self
            .set_nets(&sets)
            .await?
            .iter()
            .map(IpNet::addr)
            .collect())
    }

    /// The elements of these sets of uplinkd's table; a set that does not exist has none.
    async fn set_nets(&self, sets: &[String]) -> Result<Vec<IpNet>, DataplaneError> {
        let mut out = Vec::new();
        for set in sets {
            let Some(elems) = self.driver.set_elements(set).await? else {
                continue;
            };
            for e in elems.as_array().into_iter().flatten() {
                // A plain address, a prefix, or either wrapped with a timeout.
                let e = if e["elem"].is_object() {
                    &e["elem"]["val"]
                } else {
                    e
                };
                let net = match e {
                    Value::String(a) => a.parse::<IpAddr>().ok().map(IpNet::from),
                    v => v["prefix"]["addr"]
                        .as_str()
                        .and_then(|a| a.parse::<IpAddr>().ok())
                        .zip(v["prefix"]["len"].as_u64())
                        .and_then(|(a, l)| IpNet::new(a, l as u8).ok()),
                };
                out.extend(net);
            }
        }
        Ok(out)
    }

    /// A reader of the traffic counters with a netlink socket of its own, kept open: for
    /// a thread that reads them many times a second.
    pub fn traffic_reader(&self) -> TrafficReader {
        TrafficReader {
            socket: None,
            table: self.driver.table.clone(),
            timeout: self.driver.timeout,
        }
    }

    /// How many destinations had a LAN packet through interface `ifindex` within `within`.
    pub async fn destinations(
        &self,
        ifindex: u32,
        within: Duration,
    ) -> Result<usize, DataplaneError> {
        self.driver.destinations(ifindex, within).await
    }

    /// The traffic counters, shared and reused for `max_age`.
    pub async fn read(&self, max_age: Duration) -> Result<TrafficByInterface, DataplaneError> {
        self.traffic.get(max_age, self.driver.counters()).await
    }
}

/// An `addr . iface_index` element's key: the address (of the set's family), then the
/// interface index in host order (a `meta` key).
fn addr_iface_key(key: &[u8], v6: bool) -> Option<(IpAddr, u32)> {
    let len = if v6 { 16 } else { 4 };
    let (a, i) = (key.get(..len)?, key.get(len..len + 4)?);
    let addr = if v6 {
        IpAddr::from(<[u8; 16]>::try_from(a).ok()?)
    } else {
        IpAddr::from(<[u8; 4]>::try_from(a).ok()?)
    };
    Some((addr, u32::from_ne_bytes(i.try_into().ok()?)))
}

/// Reads with `read` until a reading repeats no element, waiting `wait` between readings:
/// a dump of a set being resized repeats some elements and misses others
/// (`Elements::consistent`). `read` gives its result and whether an element came twice.
fn untorn<T>(
    wait: Duration,
    mut read: impl FnMut() -> std::io::Result<(T, bool)>,
) -> std::io::Result<T> {
    for _ in 0..READ_ATTEMPTS {
        let (v, repeated) = read()?;
        if !repeated {
            return Ok(v);
        }
        std::thread::sleep(wait);
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        format!("a set was being resized during each of {READ_ATTEMPTS} readings"),
    ))
}

/// A set that does not exist (its feature is off) has no elements.
fn absent_is_empty(read: std::io::Result<()>) -> std::io::Result<()> {
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Reads the traffic counters over one netlink socket, opened on the first read and
/// again after a failed one. Blocking.
pub struct TrafficReader {
    socket: Option<nfnl::Nfnl>,
    table: String,
    timeout: std::time::Duration,
}

impl TrafficReader {
    pub fn read(&mut self) -> Result<BTreeMap<String, Traffic>, DataplaneError> {
        let socket = match &mut self.socket {
            Some(s) => s,
            none => {
                none.insert(nfnl::Nfnl::open(self.timeout).map_err(DataplaneError::NftNetlink)?)
            }
        };
        match socket.counters(&self.table) {
            Ok(c) => Ok(traffic_of(c)),
            Err(e) => {
                self.socket = None;
                Err(DataplaneError::NftNetlink(e))
            }
        }
    }
}

/// The structure last rendered, its objects and their signature: rendering and signing
/// thousands of rules on every apply would cost milliseconds for nothing.
type Rendered = Arc<(NftStructure, Vec<Value>, Signature)>;

#[derive(Clone)]
pub struct NftDriver {
    nft: PathBuf,
    table: String,
    timeout: std::time::Duration,
    rendered: Arc<std::sync::Mutex<Option<Rendered>>>,
}

impl NftDriver {
    pub fn new(nft: &Path, table: &str, timeout: std::time::Duration) -> NftDriver {
        NftDriver {
            nft: nft.to_owned(),
            table: table.to_owned(),
            timeout,
            rendered: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Fails with a clear error when the `nft` binary is missing or unusable.
    pub async fn check(&self) -> Result<(), DataplaneError> {
        self.run(&["--version"], None).await.map(|_| ())
    }

    /// Reads the table back; `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<KernelNft>, DataplaneError> {
        self.read_table(true).await
    }

    /// Reads the table's structure only (chains, maps, rules), not the elements of its
    /// maps: the cheap drift check, whatever the number of clients.
    pub async fn read_structure(&self) -> Result<Option<KernelNft>, DataplaneError> {
        self.read_table(false).await
    }

    /// The structure through `nft` (chains, sets and maps, which it lists without
    /// fetching any element), the rules, counters and elements over netlink, all between
    /// two equal readings of the ruleset's generation: one state, not a mix.
    async fn read_table(&self, elements: bool) -> Result<Option<KernelNft>, DataplaneError> {
        for _ in 0..READ_ATTEMPTS {
            let before = self.netlink(|n| n.generation()).await?;
            let structure = match self
                .run(
                    &[
                        "-t",
                        "-j",
                        "list",
                        "chains",
                        "inet",
                        ";",
                        "list",
                        "sets",
                        "table",
                        "inet",
                        &self.table,
                        ";",
                        "list",
                        "maps",
                        "inet",
                    ],
                    None,
                )
                .await
            {
                Ok(out) => parse_structure(&out, &self.table)?,
                Err(DataplaneError::Nft { stderr, .. })
                    if stderr.contains("No such file or directory") =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            let table = self.table.clone();
            let sets = if elements {
                structure.read.clone()
            } else {
                Vec::new()
            };
            let read = self
                .netlink(move |n| {
                    let rules = n.rules(&table)?;
                    let counters = n.counters(&table)?;
                    let mut elems = Elements::default();
                    for set in sets {
                        n.elements(&table, &set, |key, goto| elems.add_netlink(&set, key, goto))?;
                    }
                    Ok((rules, counters, elems, n.generation()?))
                })
                .await;
            let (rules, counters, elems, after) = match read {
                // A set listed a moment ago is gone, or the kernel says a dump was cut by
                // a commit: the ruleset changed meanwhile.
                Err(DataplaneError::NftNetlink(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                r => r?,
            };
            if !elems.consistent() {
                tracing::debug!(table = %self.table, "a set was being resized during the reading; reading again");
                tokio::time::sleep(RESIZE_WAIT).await;
                continue;
            }
            if before == after {
                return Ok(Some(assemble(
                    structure,
                    &rules,
                    counters.into_iter().map(|(name, _)| name),
                    elems,
                )));
            }
        }
        Err(DataplaneError::NftNetlink(std::io::Error::other(format!(
            "the ruleset changed, or a set was being resized, during each of {READ_ATTEMPTS} readings of table inet {}",
            self.table
        ))))
    }

    /// Runs blocking netlink reads on a socket of their own, off the async threads.
    async fn netlink<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut nfnl::Nfnl) -> std::io::Result<T> + Send + 'static,
    ) -> Result<T, DataplaneError> {
        let timeout = self.timeout;
        tokio::task::spawn_blocking(move || f(&mut nfnl::Nfnl::open(timeout)?))
            .await
            .map_err(|e| DataplaneError::NftNetlink(std::io::Error::other(e)))?
            .map_err(DataplaneError::NftNetlink)
    }

    fn render(&self, s: &NftStructure) -> Rendered {
        let mut last = self.rendered.lock().expect("lock");
        if let Some(r) = &*last
            && r.0 == *s
        {
            return r.clone();
        }
        let objs = render_structure(s);
        let sig = signature_of(&objs);
        let r = Arc::new((s.clone(), objs, sig));
        *last = Some(r.clone());
        r
    }

    /// An external set's elements as nft lists them; `None` when the set does not exist.
    async fn set_elements(&self, set: &str) -> Result<Option<Value>, DataplaneError> {
        match self
            .run(&["-j", "list", "set", "inet", &self.table, set], None)
            .await
        {
            Ok(out) => {
                let v: Value = serde_json::from_str(&out)
                    .map_err(|e| DataplaneError::NftOutput(e.to_string()))?;
                Ok(v["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|i| i["set"]["elem"].as_array().cloned())
                    .map(Value::Array))
            }
            Err(DataplaneError::Nft { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The usage sets' elements (`lan.client_usage`); none while the sets do not exist.
    pub async fn client_bytes(&self) -> Result<Vec<ClientBytes>, DataplaneError> {
        let table = self.table.clone();
        self.netlink(move |n| {
            untorn(RESIZE_WAIT, || {
                let (mut out, mut seen, mut repeated) = (Vec::new(), HashSet::new(), false);
                for (set, v6, outbound) in render::USAGE_SETS {
                    let read = n.counted_elements(&table, set, |key, bytes| {
                        if let Some((addr, ifindex)) = addr_iface_key(key, v6) {
                            repeated |= !seen.insert((addr, ifindex, outbound));
                            out.push(ClientBytes {
                                addr,
                                ifindex,
                                outbound,
                                bytes,
                            });
                        }
                    });
                    absent_is_empty(read)?;
                }
                Ok((out, repeated))
            })
        })
        .await
    }

    /// How many destinations had a LAN packet through interface `ifindex` within `within`
    /// (the `dests` sets; none while they do not exist).
    pub async fn destinations(
        &self,
        ifindex: u32,
        within: Duration,
    ) -> Result<usize, DataplaneError> {
        let table = self.table.clone();
        let timeout = Duration::from_millis(render::DEST_TIMEOUT_MS);
        self.netlink(move |n| {
            untorn(RESIZE_WAIT, || {
                let (mut count, mut seen, mut repeated) = (0, HashSet::new(), false);
                for (set, v6) in render::DEST_SETS {
                    let read = n.aged_elements(&table, set, |key, expires| {
                        let Some((addr, i)) = addr_iface_key(key, v6) else {
                            return;
                        };
                        repeated |= !seen.insert((addr, i));
                        let recent =
                            expires.is_some_and(|left| timeout.saturating_sub(left) <= within);
                        if i == ifindex && recent {
                            count += 1;
                        }
                    });
                    absent_is_empty(read)?;
                }
                Ok((count, repeated))
            })
        })
        .await
    }

    /// Packets and bytes each `[[rule]]` decided, by rule name.
    pub async fn rule_counters(&self) -> Result<BTreeMap<String, (u64, u64)>, DataplaneError> {
        let table = self.table.clone();
        let rules = self.netlink(move |n| n.rules(&table)).await?;
        let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for r in rules {
            let Some(name) = r
                .comment
                .as_deref()
                .and_then(|c| c.split_once(RULE_TAG))
                .map(|(_, n)| n)
            else {
                continue;
            };
            let c = m.entry(name.to_string()).or_default();
            c.0 += r.counter.0;
            c.1 += r.counter.1;
        }
        Ok(m)
    }

    /// Forwarded traffic per interface from the accounting chain's named counters.
    pub async fn counters(&self) -> Result<BTreeMap<String, Traffic>, DataplaneError> {
        let table = self.table.clone();
        let counters = self.netlink(move |n| n.counters(&table)).await?;
        Ok(traffic_of(counters))
    }

    /// Deletes the table if it exists; nothing else.
    pub async fn delete_table(&self) -> Result<bool, DataplaneError> {
        if self.read().await?.is_none() {
            return Ok(false);
        }
        self.run(&["delete", "table", "inet", &self.table], None)
            .await?;
        Ok(true)
    }

    /// Brings the kernel to `desired` with `structure` (the desired one, less what the
    /// kernel refused), given what the kernel has (`None`: no table), and updates `kernel`
    /// to match. On error `kernel` is cleared, forcing a read-back.
    /// `tidy`: also drop the `unassigned` chain's stale rules.
    pub async fn apply(
        &self,
        desired: &NftDesired,
        structure: &NftStructure,
        kernel: &mut Option<KernelNft>,
        tidy: bool,
    ) -> Result<NftStats, DataplaneError> {
        let rendered = self.render(structure);
        let (_, objs, want_sig) = &*rendered;
        let want_sig = want_sig.clone();
        let mut batch: Vec<String> = Vec::new();
        let want_un = desired.unassigned.as_ref().map(|u| match u {
            Unassigned::Next(uplink) => home_chain(uplink),
            Unassigned::Overflow => OVERFLOW.to_string(),
        });
        let mut new_un = None;
        let mut stats = NftStats::default();
        let table = self.table.as_str();
        let add = |o: &Value| json!({ "add": o }).to_string();
        // Element keys this batch deletes and adds, to update the cache on success.
        let mut changed_keys: Option<(ElemChanges, ElemChanges)> = None;
        // What a replace put in the maps, to become the cache on success.
        let mut whole_set: Option<BTreeMap<ElemKey, Arc<str>>> = None;
        match kernel.as_ref() {
            Some(k) if k.signature.compatible(&want_sig) => {
                // In place, one transaction: new chains, then chains whose rules differ
                // (a failover rewrites a home chain) flushed, changed sets replaced, the
                // flushed chains refilled, element changes, and last the chains and sets
                // no longer wanted, emptied first. The table, its NAT chain and
                // established flows are never touched.
                // New chains as rendered, with their type, hook and priority: a base chain
                // (the output chain `[local]` adds) without its hook would see no packet.
                let (new_chains, old_chains) = k.signature.chain_changes(&want_sig);
                for c in &new_chains {
                    batch.extend(
                        objs.iter()
                            .filter(|o| o["chain"]["name"].as_str() == Some(c.name.as_str()))
                            .map(add),
                    );
                }
                let mut changed = k.signature.changed_chains(&want_sig);
                let (mut new_sets, mut old_sets) = k.signature.set_changes(&want_sig);
                if !new_sets.is_empty() || !old_sets.is_empty() {
                    // Only the rules chain refers to sets: rewritten, it lets go of them.
                    changed.insert(RULES.to_string());
                }
                if changed.contains(RULES) {
                    // The rules chain's signature covers uplinkd's own set elements (nft
                    // 1.0.6 drops a set's comment given in JSON), so its rewrite replaces
                    // those sets; external ones keep what their filler put in them.
                    for set in structure.sets.iter().filter(|x| !x.external) {
                        for v6 in [false, true] {
                            let name = set_name(&set.name, v6);
                            if k.signature.sets.iter().any(|(n, _)| *n == name) {
                                old_sets.insert(name.clone());
                            }
                            new_sets.insert(name);
                        }
                    }
                }
                stats.rewritten_chains = changed.len();
                for name in &changed {
                    batch.push(json!({"flush": {"chain": {"family": "inet", "table": table, "name": name}}}).to_string());
                }
                for name in &old_sets {
                    batch.push(json!({"delete": {"set": {"family": "inet", "table": table, "name": name}}}).to_string());
                }
                // Counters change with the uplinks' interfaces, and so do the accounting
                // rules that name them (flushed above).
                let (new_counters, old_counters) = k.signature.counter_changes(&want_sig);
                for name in &old_counters {
                    batch.push(json!({"delete": {"counter": {"family": "inet", "table": table, "name": name}}}).to_string());
                }
                for o in objs.iter().filter(|o| {
                    o["set"]["name"]
                        .as_str()
                        .is_some_and(|n| new_sets.contains(n))
                        || o["counter"]["name"]
                            .as_str()
                            .is_some_and(|n| new_counters.iter().any(|c| c == n))
                }) {
                    batch.push(add(o));
                }
                for o in objs.iter().filter(|o| {
                    o["rule"]["chain"]
                        .as_str()
                        .is_some_and(|c| changed.contains(c))
                }) {
                    batch.push(add(o));
                }
                let (adds, dels) = diff_desired(desired, &k.elements);
                let mut elems: Vec<String> = Vec::new();
                stats.added = adds.len();
                stats.deleted = dels.len();
                // Deletes first: a changed value is a delete and an add of the same key.
                // A removed uplink's client sets go whole, their elements with them.
                let in_kept_sets = dels
                    .iter()
                    .filter(|(key, target)| !old_sets.contains(key.container(target).as_ref()))
                    .map(|(k, v)| (k, v));
                push_elements(&mut elems, table, in_kept_sets, false);
                push_elements(&mut elems, table, adds.iter().map(|(k, v)| (k, v)), true);
                changed_keys = Some((dels, adds));
                // A placement changes where the next new client goes: a new first rule in
                // the same transaction as the elements (adds only, cheap); the stale rules
                // behind it go in one rewrite every MAX_UNASSIGNED_RULES placements.
                let un = &k.unassigned;
                let chain =
                    || json!({"chain": {"family": "inet", "table": table, "name": UNASSIGNED}});
                let clean = un.rules == want_un.is_some() as usize;
                let current = want_un == un.target && (clean || (want_un.is_some() && !tidy));
                match &want_un {
                    _ if current => {}
                    Some(w) if un.rules < MAX_UNASSIGNED_RULES && !tidy => {
                        let rule = unassigned_rule(table, w);
                        elems.push(json!({ "insert": rule }).to_string());
                        new_un = Some(UnassignedChain {
                            target: Some(w.clone()),
                            rules: un.rules + 1,
                        });
                    }
                    w => {
                        batch.push(json!({ "flush": chain() }).to_string());
                        batch.extend(w.iter().map(|w| add(&unassigned_rule(table, w))));
                        new_un = Some(UnassignedChain {
                            target: w.clone(),
                            rules: w.is_some() as usize,
                        });
                    }
                }
                batch.append(&mut elems);
                // Chains no longer used, last, all emptied before any is deleted: they may
                // refer to each other (a rule's chain to its policy's), and the kernel
                // refuses to delete a chain still referred to (EBUSY).
                let c = |name: &String| json!({"chain": {"family": "inet", "table": table, "name": name}});
                for name in &old_chains {
                    batch.push(json!({ "flush": c(name) }).to_string());
                }
                for name in &old_chains {
                    batch.push(json!({ "delete": c(name) }).to_string());
                }
            }
            _ => {
                // An incremental plan names only what changed: the rest comes from the
                // cache of what the kernel has.
                let whole = match (&desired.changed, kernel.as_ref()) {
                    (None, _) => Cow::Borrowed(&desired.elements),
                    (Some(changed), Some(k)) => Cow::Owned(whole_elements(desired, changed, k)),
                    (Some(_), None) => return Err(DataplaneError::NeedsWholePlan),
                };
                stats.replaced_table = true;
                stats.added = whole.len();
                // What others put in the external sets survives the replace (a set or
                // table not there yet has nothing to keep).
                let mut kept = Vec::new();
                let external = structure.sets.iter().filter(|x| x.external);
                for set in
                    external.flat_map(|x| [set_name(&x.name, false), set_name(&x.name, true)])
                {
                    if let Some(elem) = self.set_elements(&set).await? {
                        kept.push(json!({"add": {"element": {"family": "inet", "table": table, "name": set, "elem": elem}}}).to_string());
                    }
                }
                batch = replace_batch(table, objs, want_un.as_deref());
                batch.extend(kept);
                push_elements(&mut batch, table, whole.iter(), true);
                whole_set = Some(whole.into_owned());
            }
        }
        if batch.is_empty() {
            return Ok(stats);
        }
        let payload = format!("{{\"nftables\":[{}]}}", batch.join(","));
        drop(batch);
        if let Err(e) = self
            .run(&["-j", "-f", "-"], Some(payload.into_bytes()))
            .await
        {
            *kernel = None;
            return Err(e);
        }
        match (kernel, changed_keys) {
            (Some(k), Some((dels, adds))) => {
                k.signature = want_sig;
                if let Some(u) = new_un {
                    k.unassigned = u;
                }
                for (key, _) in dels {
                    k.elements.remove(&key);
                }
                for (key, target) in adds {
                    k.elements.insert(key, target);
                }
            }
            (kernel, _) => {
                *kernel = Some(KernelNft {
                    signature: want_sig,
                    elements: whole_set.unwrap_or_default(),
                    unassigned: UnassignedChain {
                        rules: want_un.is_some() as usize,
                        target: want_un,
                    },
                })
            }
        }
        Ok(stats)
    }

    /// Whether the kernel would take `s` as a new table (`nft --check`: nothing is
    /// committed). Map elements are left out: they are addresses uplinkd made itself.
    pub async fn check_structure(&self, s: &NftStructure) -> Result<(), DataplaneError> {
        self.run(
            &["-c", "-j", "-f", "-"],
            Some(table_payload(s).into_bytes()),
        )
        .await
        .map(|_| ())
    }

    /// The `[[rule]]`s and `[[set]]`s of `s` that the kernel refuses, each with the
    /// kernel's words, found by checking halves (no guessing from the error text): a part
    /// is refused when a table with it alone of all the parts is. Empty when the table
    /// without any part is refused too, or no single part is to blame.
    pub async fn find_refused(&self, s: &NftStructure) -> Result<Vec<Refused>, DataplaneError> {
        let parts = parts_of(s);
        let only = |keep: &[Part]| {
            let drop: Vec<Part> = parts
                .iter()
                .filter(|p| !keep.contains(p))
                .cloned()
                .collect();
            without(s, &drop)
        };
        let refused = |r: Result<(), DataplaneError>| match r {
            Ok(()) => Ok(None),
            Err(DataplaneError::Nft { stderr, .. }) => Ok(Some(stderr)),
            Err(e) => Err(e),
        };
        if parts.is_empty() || refused(self.check_structure(&only(&[])).await)?.is_some() {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        let mut todo = vec![parts.clone()];
        while let Some(group) = todo.pop() {
            let Some(error) = refused(self.check_structure(&only(&group)).await)? else {
                continue;
            };
            if let [part] = group.as_slice() {
                found.push(Refused {
                    part: part.clone(),
                    error,
                });
            } else {
                let (a, b) = group.split_at(group.len() / 2);
                todo.push(b.to_vec());
                todo.push(a.to_vec());
            }
        }
        Ok(found)
    }

    async fn run(&self, args: &[&str], stdin: Option<Vec<u8>>) -> Result<String, DataplaneError> {
        let command = || format!("{} {}", self.nft.display(), args.join(" "));
        match tokio::time::timeout(self.timeout, self.run_untimed(args, stdin)).await {
            Ok(r) => r.map_err(|e| match e {
                Err(stderr) => DataplaneError::Nft {
                    command: command(),
                    stderr,
                },
                Ok(e) => e,
            }),
            // The child is killed when its future is dropped (kill_on_drop).
            Err(_) => Err(DataplaneError::Timeout {
                command: command(),
                after: self.timeout,
            }),
        }
    }

    /// Runs nft; `Err(Err(stderr))` when it ran and failed.
    async fn run_untimed(
        &self,
        args: &[&str],
        stdin: Option<Vec<u8>>,
    ) -> Result<String, Result<DataplaneError, String>> {
        let missing = |source| {
            Ok(DataplaneError::NftMissing {
                path: self.nft.clone(),
                source,
            })
        };
        let mut cmd = tokio::process::Command::new(&self.nft);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(missing)?;
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin is piped");
            pipe.write_all(&input).await.map_err(missing)?;
            drop(pipe);
        }
        let out = child.wait_with_output().await.map_err(missing)?;
        if !out.status.success() {
            return Err(Err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The transaction that creates `s` as a new table, map elements left out: what
/// `check_structure` hands `nft --check`, and what the differential test checks.
pub fn table_payload(s: &NftStructure) -> String {
    let batch = replace_batch(&s.table, &render_structure(s), None);
    format!("{{\"nftables\":[{}]}}", batch.join(","))
}

/// A table replaced in one transaction: created if missing and deleted (so that the
/// delete is valid either way), then the structure in creation order.
fn replace_batch(table: &str, structure: &[Value], unassigned: Option<&str>) -> Vec<String> {
    let add = |o: &Value| json!({ "add": o }).to_string();
    let t = json!({"table": {"family": "inet", "name": table}});
    let mut batch = vec![add(&t), json!({ "delete": t }).to_string()];
    batch.extend(structure.iter().map(add));
    batch.extend(unassigned.map(|w| add(&unassigned_rule(table, w))));
    batch
}

/// A piece of the operator's config the kernel may refuse on its own.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Rule(String),
    /// A `[[set]]`'s elements (the set stays, empty).
    Set(String),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Rule(n) => write!(f, "rule {n}"),
            Part::Set(n) => write!(f, "set {n}"),
        }
    }
}

/// A part the kernel refused, with its words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub part: Part,
    pub error: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.part, self.error)
    }
}

/// The parts of `s` that can be left out one by one: every rule, and the sets that carry
/// elements of uplinkd's (an external set's are its filler's).
pub fn parts_of(s: &NftStructure) -> Vec<Part> {
    let rules = s.rules.iter().map(|r| Part::Rule(r.name.clone()));
    let sets = s
        .sets
        .iter()
        .filter(|x| !x.external && (!x.v4.is_empty() || !x.v6.is_empty()))
        .map(|x| Part::Set(x.name.clone()));
    rules.chain(sets).collect()
}

/// `s` without the rules named in `drop`, and with the sets named there empty.
pub fn without(s: &NftStructure, drop: &[Part]) -> NftStructure {
    let mut out = s.clone();
    out.rules = Arc::new(
        s.rules
            .iter()
            .filter(|r| !drop.contains(&Part::Rule(r.name.clone())))
            .cloned()
            .collect(),
    );
    out.sets = Arc::new(
        s.sets
            .iter()
            .map(|x| {
                let mut x = x.clone();
                if drop.contains(&Part::Set(x.name.clone())) {
                    x.v4.clear();
                    x.v6.clear();
                }
                x
            })
            .collect(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NftUplink;

    #[test]
    fn a_reading_that_repeats_an_element_is_read_again() {
        let mut calls = 0;
        let v = untorn(Duration::ZERO, || {
            calls += 1;
            Ok((calls, calls < 3))
        });
        assert_eq!(v.expect("third reading"), 3);
        let e = untorn(Duration::ZERO, || Ok(((), true))).expect_err("always torn");
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted);
    }

    #[test]
    fn an_element_read_twice_from_one_set_makes_the_reading_inconsistent() {
        let mut e = Elements::default();
        let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
        e.add_netlink("client4.isp1", &a, None);
        e.add_netlink("client4.isp2", &b, None);
        e.add_netlink(MAP_STICKY, &7u32.to_ne_bytes(), Some("keep_isp1"));
        // One address in two uplinks' sets is the kernel's state, not a torn dump.
        e.add_netlink("client4.isp2", &a, None);
        assert!(e.consistent());
        e.add_netlink("client4.isp2", &b, None);
        assert!(!e.consistent(), "b twice in client4.isp2");
        let mut e = Elements::default();
        e.add_netlink(MAP_STICKY, &7u32.to_ne_bytes(), Some("keep_isp1"));
        e.add_netlink(MAP_STICKY, &7u32.to_ne_bytes(), Some("keep_isp1"));
        assert!(!e.consistent(), "a mark twice in the sticky map");
    }

    fn structure() -> NftStructure {
        NftStructure {
            table: "uplinkd".into(),
            mask: 0x3f00_0000,
            policy_mask: 0x00ff_0000,
            lan_interfaces: vec!["lan0".into()],
            uplinks: vec![NftUplink {
                name: "a".into(),
                interface: "wan0".into(),
                fwmark: 0x0100_0000,
                masquerade: true,
                home: None,
                away_mark: None,
                v6_detour: None,
                ifindex: Some(3),
                open: true,
            }],
            sets: Arc::new(Vec::new()),
            rules: Arc::new(Vec::new()),
            policies: Vec::new(),
            default: Verdict::Clients,
            overflow: vec!["a".into()],
            local: None,
            local_bound: Vec::new(),
            capped: Vec::new(),
            routed: Vec::new(),
            routed_idle: std::time::Duration::from_secs(600),
            nflog_group: 4623,
            client_usage: false,
            silent_dests: Vec::new(),
        }
    }

    #[test]
    fn bytes_in_are_replies_and_the_rest() {
        let t = listing::traffic_of(vec![
            ("tx.wan0".into(), (5, 500)),
            ("rx.wan0".into(), (1, 100)),
            ("reply4.wan0".into(), (2, 200)),
            ("reply6.wan0".into(), (3, 300)),
        ]);
        let t = &t["wan0"];
        assert_eq!(t.tx, (5, 500));
        assert_eq!(t.rx, (6, 600));
        assert_eq!(t.replies, (2, 3));
    }

    #[test]
    fn element_diff_turns_value_change_into_delete_and_add() {
        let a: Arc<str> = Arc::from("home_a");
        let b: Arc<str> = Arc::from("home_b");
        let k1 = ElemKey::V4("10.0.0.1".parse().unwrap());
        let k2 = ElemKey::V4("10.0.0.2".parse().unwrap());
        let k3 = ElemKey::V4("10.0.0.3".parse().unwrap());
        let want = BTreeMap::from([(k1, a.clone()), (k2, b.clone())]);
        let have = BTreeMap::from([(k1, b.clone()), (k3, a.clone())]);
        let (adds, dels) = diff_elements(&want, &have);
        assert_eq!(adds, vec![(k1, a.clone()), (k2, b.clone())]);
        assert_eq!(dels, vec![(k1, b), (k3, a)]);
        assert_eq!(diff_elements(&want, &want), (vec![], vec![]));
    }

    #[test]
    fn signature_sees_rule_changes() {
        let s = structure();
        let base = signature_of(&render_structure(&s));
        let mut s2 = s.clone();
        s2.uplinks[0].masquerade = false;
        assert_ne!(base, signature_of(&render_structure(&s2)));
        // A failover changes only the home chain: no table replace needed.
        let mut s3 = s.clone();
        s3.uplinks[0].home = Some(vec!["a".into()]);
        let sig3 = signature_of(&render_structure(&s3));
        assert!(base.compatible(&sig3));
        assert_eq!(
            base.changed_chains(&sig3),
            BTreeSet::from(["home_a".to_string()])
        );
        // A new uplink adds chains in place too.
        let mut s4 = s.clone();
        s4.uplinks.push(NftUplink {
            name: "b".into(),
            interface: "wan1".into(),
            fwmark: 0x0200_0000,
            masquerade: true,
            home: None,
            away_mark: None,
            v6_detour: None,
            ifindex: None,
            open: true,
        });
        let sig4 = signature_of(&render_structure(&s4));
        assert!(base.compatible(&sig4));
        let (new, old) = base.chain_changes(&sig4);
        assert_eq!(
            new.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["home_b", "in_b", "keep_b", "up_b"]
        );
        assert!(old.is_empty());
        assert!(sig4.compatible(&base), "and removes them in place");
        assert_eq!(base, signature_of(&render_structure(&s)));
    }

    #[test]
    fn the_structure_listing_keeps_this_tables_objects_and_names_what_to_read() {
        let objs = render_structure(&structure());
        let mut items: Vec<serde_json::Value> = objs
            .iter()
            .filter(|o| o.get("rule").is_none() && o.get("counter").is_none())
            .cloned()
            .collect();
        // Another inet table's chain and map: listed by `list chains inet`, not ours.
        items.push(json!({"chain": {"family": "inet", "table": "fw", "name": "input"}}));
        items.push(json!({"map": {"family": "inet", "table": "fw", "name": "m", "type": "mark", "map": "verdict"}}));
        let docs = items
            .iter()
            .map(|i| json!({"nftables": [i]}).to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let s = parse_structure(&docs, "uplinkd").unwrap();
        assert!(s.read.contains(&"client4.a".to_string()));
        assert!(s.read.contains(&MAP_STICKY.to_string()));
        assert!(!s.read.contains(&"m".to_string()));
        // Completed with the rules and counters, it is the rendered table's signature.
        let rules: Vec<nfnl::KernelRule> = objs
            .iter()
            .filter_map(|o| {
                Some(nfnl::KernelRule {
                    chain: o["rule"]["chain"].as_str()?.to_string(),
                    comment: o["rule"]["comment"].as_str().map(String::from),
                    counter: (0, 0),
                })
            })
            .collect();
        let counters = objs
            .iter()
            .filter_map(|o| Some(o["counter"]["name"].as_str()?.to_string()));
        let k = assemble(s, &rules, counters, Default::default());
        assert_eq!(k.signature, signature_of(&objs));
        assert!(parse_structure("{\"nftables\": [", "uplinkd").is_err());
    }

    #[test]
    fn a_sticky_map_without_its_size_is_replaced() {
        // An earlier version declared `sticky` without a size: the kernel gave it the
        // resizable hash, which every established packet pays for. Its table is replaced.
        let objs = render_structure(&structure());
        let sticky = objs
            .iter()
            .find(|o| o["map"]["name"] == MAP_STICKY)
            .expect("the sticky map");
        assert_eq!(
            sticky["map"]["size"], 63,
            "one element per id of mask 0x3f000000"
        );
        let mut items: Vec<serde_json::Value> = objs.to_vec();
        let k = parse_listing(&serde_json::json!({"nftables": items.clone()}).to_string()).unwrap();
        assert!(k.signature.compatible(&signature_of(&objs)));
        for o in items.iter_mut().filter(|o| o["map"]["name"] == MAP_STICKY) {
            o["map"].as_object_mut().unwrap().remove("size");
        }
        let k = parse_listing(&serde_json::json!({"nftables": items}).to_string()).unwrap();
        assert!(!k.signature.compatible(&signature_of(&objs)));
    }

    #[test]
    fn input_interfaces_are_looked_up_by_index_each_listed_once() {
        let mut s = structure();
        let mut b = s.uplinks[0].clone();
        (b.name, b.interface, b.fwmark, b.ifindex) = ("b".into(), "wan1".into(), 0x0200_0000, None);
        s.uplinks.push(b);
        let keys = |s: &NftStructure| -> Vec<String> {
            accounting_rules(s)
                .iter()
                .filter_map(|r| {
                    let expr = r["rule"]["expr"].as_array()?;
                    expr.iter()
                        .find_map(|e| e["counter"]["map"]["data"]["set"].as_array())
                        .map(|set| {
                            set.iter()
                                .map(|el| format!("{}:{}", el[0], el[1]))
                                .collect::<Vec<_>>()
                                .join(" ")
                        })
                })
                .collect()
        };
        let counted_out = |s: &NftStructure| -> Vec<String> {
            accounting_rules(s)
                .iter()
                .filter_map(|r| {
                    let expr = r["rule"]["expr"].as_array()?;
                    (expr[0]["match"]["left"]["meta"]["key"] == "oif")
                        .then(|| format!("{} {}", expr[0]["match"]["right"], expr[1]["counter"]))
                })
                .collect()
        };
        // wan1 does not exist: no element or rule of its own (it has no packets).
        assert_eq!(
            keys(&s),
            [r#"3:"reply4.wan0""#, r#"3:"reply6.wan0""#, r#"3:"rx.wan0""#]
        );
        assert_eq!(counted_out(&s), [r#"3 "tx.wan0""#]);
        s.uplinks[1].ifindex = Some(4);
        assert_eq!(counted_out(&s), [r#"3 "tx.wan0""#, r#"4 "tx.wan1""#]);
        // A model behind the kernel (two interfaces with one index): listed once, which
        // the kernel takes.
        s.uplinks[1].ifindex = Some(3);
        assert_eq!(
            keys(&s),
            [r#"3:"reply4.wan0""#, r#"3:"reply6.wan0""#, r#"3:"rx.wan0""#]
        );
        assert_eq!(counted_out(&s), [r#"3 "tx.wan0""#]);
        // No uplink interface exists: no rule with nothing to find.
        s.uplinks.iter_mut().for_each(|u| u.ifindex = None);
        assert!(accounting_rules(&s).is_empty());
    }

    /// An established connection's mark is compared with the first uplinks' (the open
    /// ones), then looked up in the map for the rest; in prerouting and in the gateway's
    /// own output chain alike.
    #[test]
    fn sticky_marks_are_compared_for_the_first_uplinks_then_looked_up() {
        let mut s = structure();
        let first = s.uplinks[0].clone();
        for i in 1..6u32 {
            let mut u = first.clone();
            u.name = format!("u{i}");
            u.interface = format!("wan{i}");
            u.fwmark = (i + 1) << 24;
            u.open = i != 2;
            s.uplinks.push(u);
        }
        let shown = |s: &NftStructure| -> Vec<String> {
            sticky_rules(s, PREROUTING)
                .iter()
                .map(|r| {
                    let expr = &r["rule"]["expr"];
                    match expr[0].get("vmap") {
                        Some(v) => format!("vmap {}", v["data"]),
                        None => format!(
                            "{} {}",
                            expr[0]["match"]["right"], expr[1]["goto"]["target"]
                        ),
                    }
                })
                .collect()
        };
        assert_eq!(
            shown(&s),
            [
                r#"16777216 "keep_a""#,
                r#"33554432 "keep_u1""#,
                r#"67108864 "keep_u3""#,
                r#"vmap "@sticky""#
            ]
        );
        assert!(
            sticky_rules(&s, OUTPUT)
                .iter()
                .all(|r| r["rule"]["chain"] == OUTPUT)
        );
        // No uplink past the compared ones: no lookup.
        s.uplinks.truncate(STICKY_COMPARED);
        assert_eq!(shown(&s).len(), 3);
        assert!(!shown(&s).iter().any(|r| r.starts_with("vmap")));
    }

    #[test]
    fn listing_round_trip_matches_signature() {
        // The shape `nft -j list table` prints for uplinkd's own objects.
        let objs = render_structure(&structure());
        let mut items: Vec<serde_json::Value> = objs.to_vec();
        let client4 = items
            .iter_mut()
            .find(|o| o["set"]["name"] == "client4.a")
            .expect("the client set of uplink a");
        client4["set"]["elem"] = serde_json::json!(["10.0.0.1"]);
        let sticky = items
            .iter_mut()
            .find(|o| o["map"]["name"] == MAP_STICKY)
            .expect("the sticky map");
        sticky["map"]["elem"] = serde_json::json!([[16777216, {"goto": {"target": "up_a"}}]]);
        let listing = serde_json::json!({"nftables": items.clone()}).to_string();
        let k = parse_listing(&listing).unwrap();
        assert_eq!(k.signature, signature_of(&objs));
        assert_eq!(
            &*k.elements[&ElemKey::V4("10.0.0.1".parse().unwrap())],
            "home_a"
        );
        assert_eq!(&*k.elements[&ElemKey::Mark(0x0100_0000)], "up_a");
        assert_eq!(
            adopted_homes(&k, |_| true)[&"10.0.0.1".parse::<IpAddr>().unwrap()],
            "a"
        );
        // An earlier version's client verdict map: its assignments are adopted, and the
        // table, no longer alike, is replaced.
        items.push(
            serde_json::json!({"map": {"name": MAP_CLIENT4, "type": "ipv4_addr", "map": "verdict",
            "elem": [["10.0.0.2", {"goto": {"target": "home_a"}}]]}}),
        );
        let k = parse_listing(&serde_json::json!({"nftables": items}).to_string()).unwrap();
        assert!(!k.signature.compatible(&signature_of(&objs)));
        assert_eq!(adopted_homes(&k, |_| true).len(), 2);
    }

    #[test]
    fn a_change_of_set_elements_rewrites_the_rules_chain() {
        let mut s = structure();
        Arc::make_mut(&mut s.sets).push(SetConfig {
            name: "saas".into(),
            v4: vec!["203.0.113.30/32".parse().unwrap()],
            v6: vec![],
            external: false,
        });
        let a = signature_of(&render_structure(&s));
        Arc::make_mut(&mut s.sets)[0]
            .v4
            .push("203.0.113.70/32".parse().unwrap());
        let b = signature_of(&render_structure(&s));
        assert!(a.compatible(&b));
        assert_eq!(a.changed_chains(&b), BTreeSet::from([RULES.to_string()]));
    }

    fn rule(name: &str, text: &str) -> crate::config::RuleConfig {
        let cfg = format!(
            "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\n[[policy]]\nname = \"p\"\n[[rule]]\nname = \"{name}\"\n{text}\npolicy = \"p\"\n"
        );
        let c = crate::config::Config::parse(Path::new("t"), &cfg).unwrap();
        c.rules[0].clone()
    }

    /// Lookups in the rules chain: vmaps and linear rules, in order.
    fn lookups(rules: Vec<crate::config::RuleConfig>) -> Vec<String> {
        let mut s = structure();
        s.policies = vec![crate::plan::NftPolicy {
            name: "p".into(),
            verdict: Verdict::Uplink("a".into()),
            ct_mark: None,
        }];
        s.rules = Arc::new(rules);
        render_policies(&s)
            .iter()
            .filter(|o| o["rule"]["chain"] == RULES)
            .map(|o| {
                let e = &o["rule"]["expr"][0];
                match e["vmap"]["data"]["set"].as_array() {
                    Some(items) => format!("vmap{}", items.len()),
                    None if e["goto"].is_object() => "default".into(),
                    None => "linear".into(),
                }
            })
            .collect()
    }

    #[test]
    fn rules_of_one_shape_share_a_map_unless_they_overlap() {
        let dst = |n: &str, net: &str| rule(n, &format!("dst = [\"{net}\"]"));
        // Three destination rules, one map; a ports rule, a map of its own.
        assert_eq!(
            lookups(vec![
                dst("a", "198.51.100.1"),
                dst("b", "198.51.100.2"),
                dst("c", "198.51.100.0/30"),
                rule("d", "proto = \"udp\"\ndport = [5060, \"10000-20000\"]"),
            ]),
            ["vmap2", "vmap1", "vmap2", "default"],
            "c overlaps a and b: it starts a new map so that they still win"
        );
        // Several fields: one nft rule per family it can match.
        assert_eq!(
            lookups(vec![rule("e", "dst = [\"198.51.100.9\"]\nproto = \"tcp\"")]),
            ["linear", "default"]
        );
    }
}
