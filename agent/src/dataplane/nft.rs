//! The nft driver: renders the desired table as nft JSON (through the `nftables` crate's
//! schema), reads the kernel's copy back, and applies the difference in one `nft -j -f -`
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
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

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
    SpreadKey, Unassigned, Verdict, client_set, home_chain, keep_chain, policy_chain, up_chain,
};

use super::DataplaneError;

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
    maps: BTreeSet<(String, String, String)>,
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

#[derive(Clone)]
pub struct Counters {
    driver: NftDriver,
    last: Arc<tokio::sync::Mutex<Option<(std::time::Instant, TrafficByInterface)>>>,
    rules: Arc<tokio::sync::Mutex<Option<(std::time::Instant, RuleCounters)>>>,
    /// External sets' elements by set name, reused for a second as the counters are: a
    /// viewer calling `explain` in a loop costs at most two `nft` runs a second per set.
    external: Arc<tokio::sync::Mutex<ExternalSets>>,
}

type ExternalSets = BTreeMap<String, (std::time::Instant, Arc<Vec<IpNet>>)>;

/// How long an external set's reading is reused.
const EXTERNAL_SET_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

impl Counters {
    pub fn new(driver: NftDriver) -> Counters {
        Counters {
            driver,
            last: Arc::new(tokio::sync::Mutex::new(None)),
            rules: Arc::new(tokio::sync::Mutex::new(None)),
            external: Arc::new(tokio::sync::Mutex::new(BTreeMap::new())),
        }
    }

    /// The rules' counters, shared and reused like the traffic counters.
    pub async fn rules(
        &self,
        max_age: std::time::Duration,
    ) -> Result<RuleCounters, DataplaneError> {
        let mut last = self.rules.lock().await;
        if let Some((at, r)) = &*last
            && at.elapsed() <= max_age
        {
            return Ok(r.clone());
        }
        let r = Arc::new(self.driver.rule_counters().await?);
        *last = Some((std::time::Instant::now(), r.clone()));
        Ok(r)
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

    pub async fn read(
        &self,
        max_age: std::time::Duration,
    ) -> Result<TrafficByInterface, DataplaneError> {
        // Held across the read: who comes meanwhile gets this reading.
        let mut last = self.last.lock().await;
        if let Some((at, t)) = &*last
            && at.elapsed() <= max_age
        {
            return Ok(t.clone());
        }
        let t = Arc::new(self.driver.counters().await?);
        *last = Some((std::time::Instant::now(), t.clone()));
        Ok(t)
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
        self.list(&["-j", "list", "table", "inet", &self.table])
            .await
    }

    /// Reads the table's structure only (chains, maps, rules; `nft -t` leaves the map
    /// elements out): the cheap drift check, whatever the number of clients.
    pub async fn read_structure(&self) -> Result<Option<KernelNft>, DataplaneError> {
        self.list(&["-t", "-j", "list", "table", "inet", &self.table])
            .await
    }

    async fn list(&self, args: &[&str]) -> Result<Option<KernelNft>, DataplaneError> {
        match self.run(args, None).await {
            Ok(out) => parse_listing(&out).map(Some),
            Err(DataplaneError::Nft { stderr, .. })
                if stderr.contains("No such file or directory") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
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

    /// Packets and bytes each `[[rule]]` decided, by rule name.
    pub async fn rule_counters(&self) -> Result<BTreeMap<String, (u64, u64)>, DataplaneError> {
        // Terse: the client maps' elements are left out, whatever their number.
        let out = self
            .run(&["-t", "-j", "list", "table", "inet", &self.table], None)
            .await?;
        let v: Value =
            serde_json::from_str(&out).map_err(|e| DataplaneError::NftOutput(e.to_string()))?;
        let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(name) = item["rule"]["comment"]
                .as_str()
                .and_then(|c| c.split_once(RULE_TAG))
                .map(|(_, n)| n)
            else {
                continue;
            };
            let c = m.entry(name.to_string()).or_default();
            for e in item["rule"]["expr"].as_array().into_iter().flatten() {
                if let (Some(p), Some(b)) = (
                    e["counter"]["packets"].as_u64(),
                    e["counter"]["bytes"].as_u64(),
                ) {
                    c.0 += p;
                    c.1 += b;
                }
            }
        }
        Ok(m)
    }

    /// Forwarded traffic per interface from the accounting chain: (tx, rx) as
    /// (packets, bytes).
    pub async fn counters(&self) -> Result<BTreeMap<String, Traffic>, DataplaneError> {
        let out = self
            .run(
                &["-j", "list", "counters", "table", "inet", &self.table],
                None,
            )
            .await?;
        parse_counters(&out)
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
                // A removed uplink's client sets go whole, their elements with them.
                let in_kept_sets: ElemChanges = dels
                    .iter()
                    .filter(|(key, target)| !old_sets.contains(key.container(target).as_ref()))
                    .cloned()
                    .collect();
                // Deletes first: a changed value is a delete and an add of the same key.
                push_elements(&mut elems, table, &in_kept_sets, false);
                push_elements(&mut elems, table, &adds, true);
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
                let all: Vec<(ElemKey, Arc<str>)> =
                    whole.iter().map(|(k, v)| (*k, v.clone())).collect();
                push_elements(&mut batch, table, &all, true);
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
    let mut objs = structure.iter();
    batch.extend(objs.next().map(add));
    // Maps right after the table: the rules and elements that follow use them.
    batch.extend(verdict_maps(table).iter().map(add));
    batch.extend(objs.map(add));
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

/// Map elements with the chain they jump to.
pub type ElemChanges = Vec<(ElemKey, Arc<str>)>;

/// Adds and deletes that turn `have` into `want`, in key order.
pub fn diff_elements(
    want: &BTreeMap<ElemKey, Arc<str>>,
    have: &BTreeMap<ElemKey, Arc<str>>,
) -> (ElemChanges, ElemChanges) {
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for (k, v) in want {
        match have.get(k) {
            Some(h) if h == v => {}
            Some(h) => {
                dels.push((*k, h.clone()));
                adds.push((*k, v.clone()));
            }
            None => adds.push((*k, v.clone())),
        }
    }
    for (k, h) in have {
        if !want.contains_key(k) {
            dels.push((*k, h.clone()));
        }
    }
    (adds, dels)
}

/// The first key that is not a client address: sticky marks and pins sort after them.
const FIRST_OTHER: ElemKey = ElemKey::Mark(0);

/// Adds and deletes that bring `have` to `desired`: a whole plan is diffed whole; an
/// incremental one looks only at the client addresses it names (and at the few other
/// elements), so its cost does not grow with the LAN.
pub fn diff_desired(
    desired: &NftDesired,
    have: &BTreeMap<ElemKey, Arc<str>>,
) -> (ElemChanges, ElemChanges) {
    let Some(changed) = &desired.changed else {
        return diff_elements(&desired.elements, have);
    };
    let others: BTreeMap<ElemKey, Arc<str>> = have
        .range(FIRST_OTHER..)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let (mut adds, mut dels) = diff_elements(&desired.elements, &others);
    for (k, want) in changed {
        match (have.get(k), want) {
            (Some(h), Some(w)) if h == w => {}
            (h, w) => {
                dels.extend(h.map(|h| (*k, h.clone())));
                adds.extend(w.as_ref().map(|w| (*k, w.clone())));
            }
        }
    }
    (adds, dels)
}

/// Every element an incremental plan wants, from the kernel's copy `k` (its client
/// addresses, changed as `changed` says) and the plan's other elements.
fn whole_elements(
    desired: &NftDesired,
    changed: &[(ElemKey, Option<Arc<str>>)],
    k: &KernelNft,
) -> BTreeMap<ElemKey, Arc<str>> {
    let mut whole: BTreeMap<ElemKey, Arc<str>> = k
        .elements
        .range(..FIRST_OTHER)
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    for (key, want) in changed {
        match want {
            Some(w) => whole.insert(*key, w.clone()),
            None => whole.remove(key),
        };
    }
    whole.extend(desired.elements.iter().map(|(k, v)| (*k, v.clone())));
    whole
}

/// Element commands are written straight to JSON: at 100k clients the crate's expression
/// tree would cost tens of megabytes for what is a flat list. Keys are addresses and
/// numbers, chain names are validated `[A-Za-z0-9_-]`, so nothing needs escaping.
fn push_elements(batch: &mut Vec<String>, table: &str, elems: &[(ElemKey, Arc<str>)], add: bool) {
    use std::fmt::Write;
    // One command per map or set, in a fixed order.
    let mut by_container: BTreeMap<Cow<'static, str>, String> = BTreeMap::new();
    for (k, target) in elems {
        let items = by_container.entry(k.container(target)).or_default();
        if !items.is_empty() {
            items.push(',');
        }
        let _ = match k {
            ElemKey::V4(a) => write!(items, "\"{a}\""),
            ElemKey::V6(a) => write!(items, "\"{a}\""),
            ElemKey::Pin4(a) => write!(items, "[\"{a}\","),
            ElemKey::Pin6(a) => write!(items, "[\"{a}\","),
            ElemKey::Mark(m) => write!(items, "[{m},"),
        };
        if !k.is_client() {
            let _ = write!(items, "{{\"goto\":{{\"target\":\"{target}\"}}}}]");
        }
    }
    let verb = if add { "add" } else { "delete" };
    for (name, items) in by_container {
        batch.push(format!(
            "{{\"{verb}\":{{\"element\":{{\"family\":\"inet\",\"table\":{},\"name\":{},\"elem\":[{items}]}}}}}}",
            serde_json::Value::from(table),
            serde_json::Value::from(name.as_ref())
        ));
    }
}

/// The table, its sets, chains and rules, in creation order, as nft JSON objects
/// (`{"table": …}`, `{"set": …}`, …). Rules carry their hash comment. The verdict maps
/// follow the table in a full replace (`verdict_maps`).
fn render_structure(s: &NftStructure) -> Vec<Value> {
    let t = || Cow::Owned(s.table.clone());
    let mut objs = Vec::new();
    let table = serde_json::to_value(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: t(),
        handle: None,
    }))
    .expect("table serializes");
    let chain = |name: &str| Chain {
        family: NfFamily::INet,
        table: t(),
        name: Cow::Owned(name.to_string()),
        ..Chain::default()
    };
    // Regular chains first: base chains and maps refer to them.
    for u in &s.uplinks {
        objs.push(NfListObject::Chain(chain(&up_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&keep_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&home_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&inbound_chain(&u.name))));
    }
    objs.push(NfListObject::Chain(chain(UNASSIGNED)));
    objs.push(NfListObject::Chain(chain(OVERFLOW)));
    objs.push(NfListObject::Chain(chain(&policy_chain(DEFAULT_POLICY))));
    for p in &s.policies {
        objs.push(NfListObject::Chain(chain(&policy_chain(&p.name))));
    }
    objs.push(NfListObject::Chain(chain(RULES)));
    for r in s.rules.iter() {
        objs.push(NfListObject::Chain(chain(&rule_chain(&r.name))));
    }
    objs.push(NfListObject::Chain(chain(LAN)));
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(-150),
        policy: Some(NfChainPolicy::Accept),
        ..chain(PREROUTING)
    }));
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..chain(ACCOUNTING)
    }));
    if let Some(local) = &s.local {
        if matches!(local, crate::plan::LocalVerdict::Spread(_)) {
            objs.push(NfListObject::Chain(chain(LOCAL)));
        }
        // A route chain: a changed mark makes the kernel look the route up again.
        objs.push(NfListObject::Chain(Chain {
            _type: Some(NfChainType::Route),
            hook: Some(NfHook::Output),
            prio: Some(-150),
            policy: Some(NfChainPolicy::Accept),
            ..chain(OUTPUT)
        }));
    }
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        policy: Some(NfChainPolicy::Accept),
        ..chain(POSTROUTING)
    }));

    let rule = |chain: &str, expr: Vec<Statement<'static>>| {
        let comment = format!(
            "{COMMENT_PREFIX}{:016x}",
            fnv1a(
                serde_json::to_string(&expr)
                    .expect("rule serializes")
                    .as_bytes()
            )
        );
        NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: t(),
            chain: Cow::Owned(chain.to_string()),
            expr: Cow::Owned(expr),
            comment: Some(Cow::Owned(comment)),
            ..Rule::default()
        })
    };
    let meta = |key| Expression::Named(NamedExpression::Meta(Meta { key }));
    let ct_mark = || {
        Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("mark"),
            ..CT::default()
        }))
    };
    let payload = |protocol: &'static str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: Cow::Borrowed(protocol),
                field: Cow::Borrowed("saddr"),
            },
        )))
    };
    let set_bits = |current: Expression<'static>, value: u32| {
        Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                current,
                Expression::Number(!s.mask),
            ))),
            Expression::Number(value),
        ])))
    };

    for u in &s.uplinks {
        if let Some(to) = &u.v6_detour {
            objs.push(rule(
                &up_chain(&u.name),
                vec![
                    Statement::Match(Match {
                        left: meta(MetaKey::Nfproto),
                        right: Expression::String(Cow::Borrowed("ipv6")),
                        op: Operator::EQ,
                    }),
                    Statement::Goto(JumpTarget {
                        target: Cow::Owned(up_chain(to)),
                    }),
                ],
            ));
        }
        // Only the owned mark bits change; foreign bits pass through.
        objs.push(rule(
            &up_chain(&u.name),
            vec![
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: set_bits(meta(MetaKey::Mark), u.fwmark),
                }),
                Statement::Mangle(Mangle {
                    key: ct_mark(),
                    value: set_bits(ct_mark(), u.fwmark),
                }),
            ],
        ));
        // An established connection's later packets: one mark write, not two. While the
        // uplink has no IPv6 next hop its IPv6 flows take the detour, as new ones do.
        if let Some(to) = &u.v6_detour {
            objs.push(rule(
                &keep_chain(&u.name),
                vec![
                    Statement::Match(Match {
                        left: meta(MetaKey::Nfproto),
                        right: Expression::String(Cow::Borrowed("ipv6")),
                        op: Operator::EQ,
                    }),
                    Statement::Goto(JumpTarget {
                        target: Cow::Owned(up_chain(to)),
                    }),
                ],
            ));
        }
        objs.push(rule(
            &keep_chain(&u.name),
            vec![Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: set_bits(meta(MetaKey::Mark), u.fwmark),
            })],
        ));
        // The indirection failover rewrites: one rule, whatever the number of clients.
        // Failed over, it holds the spread, rendered with the policies'
        // (`render_policies`).
        if u.home.is_none() {
            objs.push(rule(
                &home_chain(&u.name),
                vec![Statement::Goto(JumpTarget {
                    target: Cow::Owned(up_chain(&u.name)),
                })],
            ));
        }
    }

    // A connection that arrives on an uplink (a port forward) is answered through it: its
    // conntrack entry gets the uplink's mark, which the sticky map restores on replies.
    for u in &s.uplinks {
        objs.push(rule(
            &inbound_chain(&u.name),
            vec![
                Statement::Match(Match {
                    left: Expression::Named(NamedExpression::CT(CT {
                        key: Cow::Borrowed("state"),
                        ..CT::default()
                    })),
                    right: Expression::String(Cow::Borrowed("new")),
                    op: Operator::IN,
                }),
                Statement::Mangle(Mangle {
                    key: ct_mark(),
                    value: set_bits(ct_mark(), u.fwmark),
                }),
            ],
        ));
    }

    // A connection keeps the uplink it started on while that uplink is in the map.
    objs.push(rule(
        LAN,
        vec![Statement::VerdictMap(VerdictMap {
            key: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                ct_mark(),
                Expression::Number(s.mask),
            ))),
            data: Expression::String(Cow::Owned(format!("@{MAP_STICKY}"))),
        })],
    ));
    // Only new connections are classified: one past the sticky lookup without an uplink
    // mark went by the main table (a `main` rule, or open before uplinkd) and stays
    // there; re-marking it mid-flow would send it out of another uplink with its old NAT
    // source when a rule or a set changes.
    objs.push(rule(
        LAN,
        vec![
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::CT(CT {
                    key: Cow::Borrowed("state"),
                    ..CT::default()
                })),
                right: Expression::List(vec![
                    Expression::String(Cow::Borrowed("established")),
                    Expression::String(Cow::Borrowed("related")),
                ]),
                op: Operator::IN,
            }),
            Statement::Accept(None),
        ],
    ));
    for (proto, map) in [("ip", MAP_PIN4), ("ip6", MAP_PIN6)] {
        objs.push(rule(
            LAN,
            vec![Statement::VerdictMap(VerdictMap {
                key: payload(proto),
                data: Expression::String(Cow::Owned(format!("@{map}"))),
            })],
        ));
    }
    // Pins win over rules (the operator's word about one client); then the rules, which
    // end in the default policy.
    objs.push(rule(
        LAN,
        vec![Statement::Goto(JumpTarget {
            target: Cow::Borrowed(RULES),
        })],
    ));
    // One lookup for every masquerading interface (each listed once).
    let mut masquerading: Vec<SetItem> = Vec::new();
    for u in s.uplinks.iter().filter(|u| u.masquerade) {
        let item = SetItem::Element(Expression::String(Cow::Owned(u.interface.clone())));
        if !masquerading.contains(&item) {
            masquerading.push(item);
        }
    }
    if !masquerading.is_empty() {
        objs.push(rule(
            POSTROUTING,
            vec![
                Statement::Match(Match {
                    left: meta(MetaKey::Oifname),
                    right: Expression::Named(NamedExpression::Set(masquerading)),
                    op: Operator::EQ,
                }),
                Statement::Masquerade(None),
            ],
        ));
    }
    let mut out = vec![table];
    out.extend(accounting_counters(s));
    out.extend(client_sets(&s.table, &s.uplinks));
    out.extend(render_sets(&s.table, &s.sets));
    out.extend(routed_sets(&s.table));
    let (chains, mut rules): (Vec<_>, Vec<_>) = objs
        .iter()
        .map(|o| serde_json::to_value(o).expect("object serializes"))
        .partition(|v| v.get("rule").is_none());
    // A new connection of a placed host behind a LAN router marks it active: right after
    // the sticky lookup and the guard that established connections stop at.
    let guard = rules
        .iter()
        .position(|r| r["rule"]["chain"] == LAN && r.to_string().contains("established"))
        .expect("the established-connection guard is rendered");
    for (i, r) in routed_rules(s, RoutedStep::Seen).into_iter().enumerate() {
        rules.insert(guard + 1 + i, r);
    }
    // One lookup of the input interface sorts every packet: the LAN's to be classified,
    // an uplink's to have its new connections marked (answered through it), the rest
    // untouched.
    let by_iface: Vec<Value> = s
        .lan_interfaces
        .iter()
        .map(|i| json!([i, goto(LAN)]))
        .chain(
            s.uplinks
                .iter()
                .enumerate()
                // Uplinks that share an interface: the first one's mark (a key is listed
                // once).
                .filter(|(i, u)| {
                    !s.lan_interfaces.contains(&u.interface)
                        && !s.uplinks[..*i].iter().any(|o| o.interface == u.interface)
                })
                .map(|(_, u)| json!([u.interface, goto(&inbound_chain(&u.name))])),
        )
        .collect();
    rules.push(raw_rule(
        &s.table,
        PREROUTING,
        vec![json!({"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": by_iface}}})],
        None,
    ));
    out.extend(chains);
    out.extend(rules);
    out.extend(accounting_rules(s));
    out.extend(render_policies(s));
    out
}

/// The uplinks' interfaces, each once (uplinks may share one), in config order.
fn uplink_interfaces(s: &NftStructure) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for u in &s.uplinks {
        if !out.contains(&u.interface.as_str()) {
            out.push(&u.interface);
        }
    }
    out
}

/// Per uplink interface: bytes out (`tx.`) and in (`rx.`), and packets in reply to flows
/// the LAN opened, per family (`reply4.`, `reply6.`): passive health's evidence.
const COUNTER_KINDS: [&str; 4] = ["tx", "rx", "reply4", "reply6"];

fn accounting_counters(s: &NftStructure) -> Vec<Value> {
    uplink_interfaces(s)
        .into_iter()
        .flat_map(|i| COUNTER_KINDS.map(|k| format!("{k}.{i}")))
        .map(|name| json!({"counter": {"family": "inet", "table": s.table, "name": name}}))
        .collect()
}

/// The accounting chain: three lookups per forwarded packet, whatever the number of
/// uplinks (each names the counter of the packet's interface). Neither unsolicited
/// packets nor port-forwarded connections count as replies, and one family's traffic
/// says nothing about the other's path.
fn accounting_rules(s: &NftStructure) -> Vec<Value> {
    let ifaces = uplink_interfaces(s);
    let by = |kind: &str| json!({"set": ifaces.iter().map(|i| json!([i, format!("{kind}.{i}")])).collect::<Vec<_>>()});
    let meta = |key: &str| json!({"meta": {"key": key}});
    let replies: Vec<Value> = ifaces
        .iter()
        .flat_map(|i| {
            [("ipv4", "reply4"), ("ipv6", "reply6")]
                .map(|(f, k)| json!([{"concat": [i, f]}, format!("{k}.{i}")]))
        })
        .collect();
    let count = |key: Value, data: Value| json!({"counter": {"map": {"key": key, "data": data}}});
    [
        vec![count(meta("oifname"), by("tx"))],
        vec![count(meta("iifname"), by("rx"))],
        vec![
            matches(json!({"ct": {"key": "direction"}}), json!("reply")),
            count(
                json!({"concat": [meta("iifname"), meta("nfproto")]}),
                json!({"set": replies}),
            ),
        ],
    ]
    .into_iter()
    .map(|expr| raw_rule(&s.table, ACCOUNTING, expr, None))
    .collect()
}

/// A rule object with its hash comment, followed by `tag` (a `[[rule]]`'s name, for its
/// counters).
fn raw_rule(table: &str, chain: &str, expr: Vec<Value>, tag: Option<&str>) -> Value {
    let body = Value::Array(expr);
    let mut comment = format!(
        "{COMMENT_PREFIX}{:016x}",
        fnv1a(body.to_string().as_bytes())
    );
    if let Some(t) = tag {
        comment.push_str(t);
    }
    json!({"rule": {"family": "inet", "table": table, "chain": chain, "expr": body, "comment": comment}})
}

/// Hosts behind LAN routers logged lately (no second log before this passes) and placed
/// ones active lately, per family. No `[[set]]` renders to these names (theirs end in
/// `_v4`/`_v6`).
const ROUTED_NEW: [&str; 2] = ["routed_new4", "routed_new6"];
const ROUTED_SEEN: [&str; 2] = ["routed_seen4", "routed_seen6"];
/// How long a logged, still unplaced host waits before its next packet is logged again.
const ROUTED_RELOG_SECS: u64 = 2;
/// Hosts each dynamic set holds at most (the kernel refuses more; they are logged again).
const ROUTED_SET_SIZE: u32 = 65_536;

/// The dynamic sets of hosts behind LAN routers (fixed, whatever the prefixes).
fn routed_sets(table: &str) -> Vec<Value> {
    [ROUTED_NEW, ROUTED_SEEN]
        .into_iter()
        .flat_map(|names| {
            names
                .into_iter()
                .zip(["ipv4_addr", "ipv6_addr"])
                .map(|(name, t)| {
                    json!({"set": {"family": "inet", "table": table, "name": name, "type": t,
                    "flags": ["timeout"], "size": ROUTED_SET_SIZE}})
                })
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RoutedStep {
    /// Log an unplaced host (once per `ROUTED_RELOG_SECS`).
    New,
    /// Mark a host's new connection (its activity, for idle expiry).
    Seen,
}

/// One rule per family with routed prefixes; none without.
fn routed_rules(s: &NftStructure, step: RoutedStep) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, (ip, v6)) in [("ip", false), ("ip6", true)].into_iter().enumerate() {
        let nets: Vec<Value> = s
            .routed
            .iter()
            .filter(|n| n.addr().is_ipv6() == v6)
            .map(|n| prefix(*n))
            .collect();
        if nets.is_empty() {
            continue;
        }
        let src = payload(ip, "saddr");
        let mut expr = vec![matches(src.clone(), json!({"set": nets}))];
        let elem = |set: &str, op: &str, timeout: u64| json!({"set": {"op": op, "elem": {"elem": {"val": src.clone(), "timeout": timeout}}, "set": format!("@{set}")}});
        match step {
            RoutedStep::New => {
                expr.push(json!({"match": {"op": "!=", "left": src.clone(), "right": format!("@{}", ROUTED_NEW[i])}}));
                expr.push(elem(ROUTED_NEW[i], "add", ROUTED_RELOG_SECS));
                expr.push(json!({"log": {"group": s.nflog_group, "snaplen": 40}}));
            }
            RoutedStep::Seen => {
                expr.push(elem(
                    ROUTED_SEEN[i],
                    "update",
                    s.routed_idle.as_secs().max(1),
                ));
            }
        }
        let chain = match step {
            RoutedStep::New => policy_chain(DEFAULT_POLICY),
            RoutedStep::Seen => LAN.to_string(),
        };
        out.push(raw_rule(&s.table, &chain, expr, None));
    }
    out
}

/// Where a packet that arrived on the uplink goes: its new connection is marked.
fn inbound_chain(uplink: &str) -> String {
    format!("in_{uplink}")
}

fn set_name(set: &str, v6: bool) -> String {
    format!("{set}_{}", if v6 { "v6" } else { "v4" })
}

/// Per uplink and family, the plain set of the client addresses homed on it.
fn client_sets(table: &str, uplinks: &[crate::plan::NftUplink]) -> Vec<Value> {
    uplinks
        .iter()
        .flat_map(|u| [false, true].map(|v6| (u, v6)))
        .map(|(u, v6)| {
            json!({"set": {
                "family": "inet",
                "table": table,
                "name": client_set(&u.name, v6),
                "type": if v6 { "ipv6_addr" } else { "ipv4_addr" },
            }})
        })
        .collect()
}

/// Two nft sets per `[[set]]`, one per family.
fn render_sets(table: &str, sets: &[SetConfig]) -> Vec<Value> {
    let mut out = Vec::new();
    for set in sets {
        for v6 in [false, true] {
            let elems: Vec<Value> = if v6 {
                set.v6.iter().map(|n| prefix(IpNet::V6(*n))).collect()
            } else {
                set.v4.iter().map(|n| prefix(IpNet::V4(*n))).collect()
            };
            let mut obj = json!({
                "family": "inet",
                "table": table,
                "name": set_name(&set.name, v6),
                "type": if v6 { "ipv6_addr" } else { "ipv4_addr" },
            });
            // An external set is plain (no interval flag): what dnsmasq's --nftset adds,
            // address by address.
            if !set.external {
                obj["flags"] = json!(["interval"]);
                if !elems.is_empty() {
                    obj["elem"] = Value::Array(elems);
                }
            }
            out.push(json!({ "set": obj }));
        }
    }
    out
}

fn prefix(n: IpNet) -> Value {
    if n.prefix_len() == n.max_prefix_len() {
        json!(n.addr().to_string())
    } else {
        json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}})
    }
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn goto(chain: &str) -> Value {
    json!({"goto": {"target": chain}})
}

/// What a `[[rule]]` matches on, when it is one kind of literal: consecutive rules of one
/// shape become one verdict-map lookup instead of one nft rule each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Linear,
    Dst,
    Src,
    Ports { sport: bool },
    Dscp,
    Iif,
}

fn shape(r: &crate::config::RuleConfig) -> Shape {
    use crate::config::Proto;
    let literal = |l: &[AddrMatch]| l.iter().all(|a| matches!(a, AddrMatch::Net(_)));
    let plain = r.proto == Proto::Any && r.sport.is_empty() && r.dport.is_empty();
    let rest_empty = r.dscp.is_empty() && r.iif.is_empty();
    match (r.src.is_empty(), r.dst.is_empty(), plain, rest_empty) {
        (true, false, true, true) if literal(&r.dst) => Shape::Dst,
        (false, true, true, true) if literal(&r.src) => Shape::Src,
        (true, true, false, true)
            if matches!(r.proto, Proto::Any | Proto::Tcp | Proto::Udp)
                && (r.sport.is_empty() != r.dport.is_empty()) =>
        {
            Shape::Ports {
                sport: !r.sport.is_empty(),
            }
        }
        (true, true, true, false) if r.iif.is_empty() => Shape::Dscp,
        (true, true, true, false) if r.dscp.is_empty() => Shape::Iif,
        _ => Shape::Linear,
    }
}

/// One map key of a shaped rule.
#[derive(Debug, Clone, PartialEq)]
enum Key {
    Net(IpNet),
    Port {
        proto: &'static str,
        lo: u16,
        hi: u16,
    },
    Dscp(u8),
    Iif(String),
}

impl Key {
    /// Whether one packet could match both (nft refuses overlapping map keys, and the
    /// first rule must win).
    fn overlaps(&self, o: &Key) -> bool {
        match (self, o) {
            (Key::Net(a), Key::Net(b)) => a.contains(&b.network()) || b.contains(&a.network()),
            (
                Key::Port { proto, lo, hi },
                Key::Port {
                    proto: p2,
                    lo: l2,
                    hi: h2,
                },
            ) => proto == p2 && lo <= h2 && l2 <= hi,
            (a, b) => a == b,
        }
    }

    fn value(&self) -> Value {
        match self {
            Key::Net(n) => prefix(*n),
            Key::Port { proto, lo, hi } if lo == hi => json!({"concat": [proto, lo]}),
            Key::Port { proto, lo, hi } => json!({"concat": [proto, {"range": [lo, hi]}]}),
            Key::Dscp(d) => json!(d),
            Key::Iif(i) => json!(i),
        }
    }
}

fn keys(r: &crate::config::RuleConfig, shape: Shape) -> Vec<Key> {
    use crate::config::Proto;
    let nets = |l: &[AddrMatch]| {
        l.iter()
            .filter_map(|a| match a {
                AddrMatch::Net(n) => Some(Key::Net(*n)),
                AddrMatch::Set(_) => None,
            })
            .collect()
    };
    match shape {
        Shape::Dst => nets(&r.dst),
        Shape::Src => nets(&r.src),
        Shape::Ports { sport } => {
            let protos: &[&'static str] = match r.proto {
                Proto::Tcp => &["tcp"],
                Proto::Udp => &["udp"],
                _ => &["tcp", "udp"],
            };
            let ports = if sport { &r.sport } else { &r.dport };
            protos
                .iter()
                .flat_map(|p| ports.iter().map(|&(lo, hi)| Key::Port { proto: p, lo, hi }))
                .collect()
        }
        Shape::Dscp => r.dscp.iter().map(|d| Key::Dscp(*d)).collect(),
        Shape::Iif => r.iif.iter().map(|i| Key::Iif(i.clone())).collect(),
        Shape::Linear => Vec::new(),
    }
}

pub fn rule_chain(rule: &str) -> String {
    format!("rule_{rule}")
}

/// The rules chain, each `[[rule]]`'s own chain (its counter and verdict), the policy
/// chains and the default policy's chain. Consecutive rules of one shape (destination
/// CIDRs only, source CIDRs only, ports only, DSCP only, LAN interfaces only) become one
/// verdict-map lookup, as long as no packet could match two of them; any other rule is
/// one nft rule per family it can match (and per combination of address alternatives).
fn render_policies(s: &NftStructure) -> Vec<Value> {
    let table = s.table.as_str();
    let mut out = Vec::new();
    let target = |t: Target| match t {
        Target::Main => json!({"accept": null}),
        Target::Default => goto(&policy_chain(DEFAULT_POLICY)),
        Target::Policy(p) => goto(&policy_chain(&s.policies[p].name)),
    };
    let mut i = 0;
    let rules = &s.rules;
    while i < rules.len() {
        let sh = shape(&rules[i]);
        if sh == Shape::Linear {
            out.extend(linear_rule(s, &rules[i]));
            i += 1;
            continue;
        }
        // The run of rules of this shape whose keys no earlier one in the run overlaps.
        let mut group: Vec<(Key, &str)> = Vec::new();
        while i < rules.len() && shape(&rules[i]) == sh {
            let k = keys(&rules[i], sh);
            if k.iter().any(|k| group.iter().any(|(g, _)| g.overlaps(k))) {
                break;
            }
            group.extend(k.into_iter().map(|k| (k, rules[i].name.as_str())));
            i += 1;
        }
        let vmap = |key: Value, elems: Vec<&(Key, &str)>| {
            let items: Vec<Value> = elems
                .iter()
                .map(|(k, name)| json!([k.value(), goto(&rule_chain(name))]))
                .collect();
            vec![json!({"vmap": {"key": key, "data": {"set": items}}})]
        };
        let by_family = |v6: bool| {
            group
                .iter()
                .filter(|(k, _)| matches!(k, Key::Net(n) if n.addr().is_ipv6() == v6))
                .collect::<Vec<_>>()
        };
        let mut lookups: Vec<Vec<Value>> = Vec::new();
        match sh {
            Shape::Dst | Shape::Src => {
                let field = if sh == Shape::Dst { "daddr" } else { "saddr" };
                for (v6, ip) in [(false, "ip"), (true, "ip6")] {
                    let elems = by_family(v6);
                    if !elems.is_empty() {
                        lookups.push(vmap(payload(ip, field), elems));
                    }
                }
            }
            Shape::Ports { sport } => {
                let field = if sport { "sport" } else { "dport" };
                lookups.push(vmap(
                    json!({"concat": [{"meta": {"key": "l4proto"}}, payload("th", field)]}),
                    group.iter().collect(),
                ));
            }
            Shape::Dscp => {
                for ip in ["ip", "ip6"] {
                    lookups.push(vmap(payload(ip, "dscp"), group.iter().collect()));
                }
            }
            Shape::Iif => {
                lookups.push(vmap(
                    json!({"meta": {"key": "iifname"}}),
                    group.iter().collect(),
                ));
            }
            Shape::Linear => unreachable!("handled above"),
        }
        for l in lookups {
            out.push(raw_rule(table, RULES, l, None));
        }
    }
    for r in rules.iter() {
        out.push(raw_rule(
            table,
            &rule_chain(&r.name),
            vec![json!({"counter": null}), target(r.target)],
            Some(&format!("{RULE_TAG}{}", r.name)),
        ));
    }
    // The last rule's signature also covers the elements of uplinkd's own sets: a change
    // of elements rewrites the rules chain, and with it those sets.
    let own: Vec<&SetConfig> = s.sets.iter().filter(|x| !x.external).collect();
    let digest = format!(" sets:{:016x}", fnv1a(format!("{own:?}").as_bytes()));
    out.push(raw_rule(
        table,
        RULES,
        vec![goto(&policy_chain(DEFAULT_POLICY))],
        (!own.is_empty()).then_some(digest.as_str()),
    ));
    for p in &s.policies {
        for e in verdict_rules(&p.verdict, &s.uplinks) {
            out.push(raw_rule(table, &policy_chain(&p.name), e, None));
        }
    }
    let mut default = verdict_rules(&s.default, &s.uplinks);
    if s.default == Verdict::Clients {
        // Before the unassigned verdict: an untracked address of a client at its address
        // cap is hashed over the survivors; an unplaced host behind a LAN router says so.
        let at = default.len() - 1;
        if !s.capped.is_empty() {
            let macs: Vec<Value> = s.capped.iter().map(|m| json!(m.to_string())).collect();
            default.insert(
                at,
                vec![
                    matches(payload("ether", "saddr"), json!({"set": macs})),
                    json!({"counter": null}),
                    goto(OVERFLOW),
                ],
            );
        }
        let at = default.len() - 1;
        for (i, r) in routed_rules(s, RoutedStep::New).into_iter().enumerate() {
            default.insert(
                at + i,
                r["rule"]["expr"].as_array().cloned().unwrap_or_default(),
            );
        }
    }
    for e in default {
        out.push(raw_rule(table, &policy_chain(DEFAULT_POLICY), e, None));
    }
    if let Some(local) = &s.local {
        out.extend(render_local(s, local));
    }
    // A failed-over uplink's clients, and addresses uplinkd does not track, are hashed
    // by source address, as a client-mode policy is.
    let homes = s
        .uplinks
        .iter()
        .filter_map(|u| Some((home_chain(&u.name), u.home.clone()?)));
    for (chain, buckets) in homes.chain([(OVERFLOW.to_string(), s.overflow.clone())]) {
        let spread = Verdict::Spread {
            key: SpreadKey::Source,
            buckets,
        };
        for e in verdict_rules(&spread, &[]) {
            out.push(raw_rule(table, &chain, e, None));
        }
    }
    out
}

/// The output chain: the gateway's own new connections that the first route lookup sent
/// to an uplink get the `[local]` policy's mark, and keep it as the LAN's do. Marked
/// packets (the agent's probes, bound to their uplink with SO_MARK, and anything an
/// operator marked) and traffic to the LAN or loopback are left alone.
fn render_local(s: &NftStructure, local: &crate::plan::LocalVerdict) -> Vec<Value> {
    let table = s.table.as_str();
    let ct = |key: &str| json!({"ct": {"key": key}});
    let masked = |left: Value| json!({"&": [left, s.mask]});
    let uplinks: Vec<Value> = s.uplinks.iter().map(|u| json!(u.interface)).collect();
    // A socket bound to an uplink's address (a VPN endpoint, a SIP trunk, `curl
    // --interface ADDR`) was routed by its `from` rule: it keeps that uplink.
    let bound = [("ip", false), ("ip6", true)].map(|(ip, v6)| {
        let addrs: Vec<Value> = s
            .local_bound
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| json!(a.to_string()))
            .collect();
        (!addrs.is_empty()).then(|| {
            raw_rule(
                table,
                OUTPUT,
                vec![
                    matches(payload(ip, "saddr"), json!({"set": addrs})),
                    json!({"return": null}),
                ],
                None,
            )
        })
    });
    let mut out = vec![
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "!=", "left": masked(json!({"meta": {"key": "mark"}})), "right": 0}}),
                json!({"return": null}),
            ],
            None,
        ),
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": {"set": uplinks}}}),
                json!({"return": null}),
            ],
            None,
        ),
        raw_rule(
            table,
            OUTPUT,
            vec![json!({"vmap": {"key": masked(ct("mark")), "data": format!("@{MAP_STICKY}")}})],
            None,
        ),
    ];
    out.extend(bound.into_iter().flatten());
    out.extend([
        // A connection that was open before (no mark) keeps its route: re-marking it
        // mid-flow would change its source address.
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "in", "left": ct("state"), "right": "new"}}),
                goto(&match local {
                    crate::plan::LocalVerdict::Policy(p) => policy_chain(p),
                    crate::plan::LocalVerdict::Spread(_) => LOCAL.to_string(),
                }),
            ],
            None,
        ),
    ]);
    if let crate::plan::LocalVerdict::Spread(v) = local {
        for e in verdict_rules(v, &s.uplinks) {
            out.push(raw_rule(table, LOCAL, e, None));
        }
    }
    out
}

fn unassigned_rule(table: &str, target: &str) -> Value {
    raw_rule(
        table,
        UNASSIGNED,
        vec![goto(target)],
        Some(&format!("{TARGET_TAG}{target}")),
    )
}

/// A rule nft cannot look up in a map: one nft rule per family it can match (and per
/// combination of address alternatives), each `goto rule_<name>`.
fn linear_rule(s: &NftStructure, r: &crate::config::RuleConfig) -> Vec<Value> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if !(if v6 { r.v6 } else { r.v4 }) {
            continue;
        }
        let ip = if v6 { "ip6" } else { "ip" };
        // One alternative per address list: the literal prefixes as one anonymous set,
        // and each named set on its own (nft cannot OR a set reference with literals).
        let alternatives = |list: &[AddrMatch]| -> Vec<Option<Value>> {
            if list.is_empty() {
                return vec![None];
            }
            let nets: Vec<Value> = list
                .iter()
                .filter_map(|a| match a {
                    AddrMatch::Net(n) if n.addr().is_ipv6() == v6 => Some(prefix(*n)),
                    _ => None,
                })
                .collect();
            let mut alts = Vec::new();
            if !nets.is_empty() {
                alts.push(Some(json!({"set": nets})));
            }
            for a in list {
                if let AddrMatch::Set(i) = a {
                    alts.push(Some(json!(format!("@{}", set_name(&s.sets[*i].name, v6)))));
                }
            }
            alts
        };
        for src in alternatives(&r.src) {
            for dst in alternatives(&r.dst) {
                let mut expr = vec![matches(
                    json!({"meta": {"key": "nfproto"}}),
                    json!(if v6 { "ipv6" } else { "ipv4" }),
                )];
                if !r.iif.is_empty() {
                    expr.push(matches(
                        json!({"meta": {"key": "iifname"}}),
                        json!({"set": r.iif}),
                    ));
                }
                if let Some(src) = &src {
                    expr.push(matches(payload(ip, "saddr"), src.clone()));
                }
                if let Some(dst) = &dst {
                    expr.push(matches(payload(ip, "daddr"), dst.clone()));
                }
                match r.proto.number() {
                    Some(n) => expr.push(matches(json!({"meta": {"key": "l4proto"}}), json!(n))),
                    None if !r.sport.is_empty() || !r.dport.is_empty() => expr.push(matches(
                        json!({"meta": {"key": "l4proto"}}),
                        json!({"set": [6, 17]}),
                    )),
                    None => {}
                }
                for (field, ports) in [("sport", &r.sport), ("dport", &r.dport)] {
                    if ports.is_empty() {
                        continue;
                    }
                    let items: Vec<Value> = ports
                        .iter()
                        .map(|&(a, b)| {
                            if a == b {
                                json!(a)
                            } else {
                                json!({"range": [a, b]})
                            }
                        })
                        .collect();
                    expr.push(matches(payload("th", field), json!({"set": items})));
                }
                if !r.dscp.is_empty() {
                    expr.push(matches(payload(ip, "dscp"), json!({"set": r.dscp})));
                }
                expr.push(goto(&rule_chain(&r.name)));
                out.push(raw_rule(&s.table, RULES, expr, None));
            }
        }
    }
    out
}

/// A policy chain's rules; `uplinks` names the client sets a client-mode verdict looks
/// in (a client is in one of them).
fn verdict_rules(v: &Verdict, uplinks: &[crate::plan::NftUplink]) -> Vec<Vec<Value>> {
    match v {
        Verdict::Uplink(u) => vec![vec![goto(&up_chain(u))]],
        Verdict::Default => vec![vec![goto(&policy_chain(DEFAULT_POLICY))]],
        Verdict::Drop => vec![vec![json!({"counter": null}), json!({"drop": null})]],
        Verdict::Clients => [("ip", false), ("ip6", true)]
            .into_iter()
            .flat_map(|(ip, v6)| {
                uplinks.iter().map(move |u| {
                    vec![
                        matches(
                            payload(ip, "saddr"),
                            json!(format!("@{}", client_set(&u.name, v6))),
                        ),
                        goto(&home_chain(&u.name)),
                    ]
                })
            })
            .chain([vec![goto(UNASSIGNED)]])
            .collect(),
        Verdict::Spread { key, buckets } => {
            let map = json!({"set": buckets
                .iter()
                .enumerate()
                .map(|(i, b)| json!([i, goto(&up_chain(b))]))
                .collect::<Vec<_>>()});
            let n = buckets.len();
            match key {
                SpreadKey::Random => vec![vec![json!({"vmap": {
                    "key": {"numgen": {"mode": "random", "mod": n, "offset": 0}},
                    "data": map,
                }})]],
                SpreadKey::Source | SpreadKey::Destination => [("ip", "ipv4"), ("ip6", "ipv6")]
                    .into_iter()
                    .map(|(ip, nfproto)| {
                        let expr = if *key == SpreadKey::Source {
                            payload(ip, "saddr")
                        } else {
                            json!({"concat": [payload(ip, "saddr"), payload(ip, "daddr")]})
                        };
                        vec![
                            matches(json!({"meta": {"key": "nfproto"}}), json!(nfproto)),
                            json!({"vmap": {
                                "key": {"jhash": {"mod": n, "seed": FALLBACK_SEED, "offset": 0, "expr": expr}},
                                "data": map.clone(),
                            }}),
                        ]
                    })
                    .collect(),
            }
        }
    }
}

/// Verdict maps, which the `nftables` crate's schema cannot express (its set types have no
/// `verdict`), are written as raw JSON and spliced into the batch after the table.
fn verdict_maps(table: &str) -> Vec<serde_json::Value> {
    [(MAP_STICKY, "mark"), (MAP_PIN4, "ipv4_addr"), (MAP_PIN6, "ipv6_addr")]
        .into_iter()
        .map(|(name, key)| serde_json::json!({"map": {"family": "inet", "table": table, "name": name, "type": key, "map": "verdict"}}))
        .collect()
}

/// The signature of uplinkd's own objects, read through the same parser as the kernel's
/// listing so that both sides are compared alike.
fn signature_of(objs: &[Value]) -> Signature {
    let json: Vec<String> = objs
        .iter()
        .map(|o| o.to_string())
        .chain(verdict_maps("").into_iter().map(|m| m.to_string()))
        .collect();
    let items: Vec<ListItem> = json
        .iter()
        .map(|j| serde_json::from_str(j).expect("own objects parse back"))
        .collect();
    signature_of_items(items.iter())
}

fn signature_of_items<'a, 'b: 'a>(items: impl Iterator<Item = &'a ListItem<'b>>) -> Signature {
    let mut sig = Signature::default();
    for it in items {
        if let Some(c) = &it.chain {
            sig.chains.insert(c.clone());
        }
        if let Some(m) = &it.map {
            sig.maps
                .insert((m.name.clone(), m.key_type.to_string(), m.map.to_string()));
        }
        if let Some(r) = &it.rule
            && r.chain != UNASSIGNED
        {
            sig.rules.push((r.chain.clone(), r.comment.clone()));
        }
        if let Some(c) = &it.counter {
            sig.counters.insert(c.name.clone());
        }
        if let Some(s) = &it.set {
            // The flags too: a `[[set]]` turned external (plain, filled by someone else)
            // is a new set, not the old one with uplinkd's stale elements left in it.
            let mut flags: Vec<&str> = s.flags.iter().map(String::as_str).collect();
            flags.sort_unstable();
            sig.sets.insert((
                s.name.clone(),
                format!("{} {}", s.key_type, flags.join(",")),
            ));
        }
    }
    sig
}

// The parts of `nft -j list table` that uplinkd reads. Unknown fields are ignored.

#[derive(Deserialize)]
struct Listing<'a> {
    #[serde(borrow)]
    nftables: Vec<ListItem<'a>>,
}

#[derive(Deserialize)]
struct ListItem<'a> {
    chain: Option<ListChain>,
    rule: Option<ListRule>,
    #[serde(borrow)]
    set: Option<ListSet<'a>>,
    counter: Option<ListCounter>,
    #[serde(borrow)]
    map: Option<ListMap<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
struct ListChain {
    name: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    hook: Option<String>,
    prio: Option<i64>,
    policy: Option<String>,
}

#[derive(Deserialize)]
struct ListSet<'a> {
    name: String,
    #[serde(rename = "type")]
    key_type: Value,
    /// nft lists only some flags (`interval`, `timeout`; not `dynamic`), alike for ours.
    #[serde(default)]
    flags: Vec<String>,
    /// Read for the client sets only (others' elements are not compared one by one).
    #[serde(default, borrow)]
    elem: Vec<ListKey<'a>>,
}

#[derive(Deserialize)]
struct ListCounter {
    name: String,
}

#[derive(Deserialize)]
struct ListRule {
    chain: String,
    comment: Option<String>,
}

// Element keys and targets borrow from nft's output: 100k elements, no allocation each.
#[derive(Deserialize)]
struct ListMap<'a> {
    name: String,
    #[serde(rename = "type")]
    key_type: serde_json::Value,
    map: serde_json::Value,
    #[serde(default, borrow)]
    elem: Vec<(ListKey<'a>, ListVerdict<'a>)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ListKey<'a> {
    Number(u32),
    Text(&'a str),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
struct ListVerdict<'a> {
    #[serde(alias = "jump", borrow)]
    goto: Option<ListTarget<'a>>,
}

#[derive(Deserialize)]
struct ListTarget<'a> {
    target: &'a str,
}

/// `nft -j list counters table` output → traffic per uplink interface.
fn parse_counters(json: &str) -> Result<BTreeMap<String, Traffic>, DataplaneError> {
    let v: Value =
        serde_json::from_str(json).map_err(|e| DataplaneError::NftOutput(e.to_string()))?;
    let mut m: BTreeMap<String, Traffic> = BTreeMap::new();
    for c in v["nftables"].as_array().into_iter().flatten() {
        let c = &c["counter"];
        let (Some(name), Some(p), Some(b)) = (
            c["name"].as_str(),
            c["packets"].as_u64(),
            c["bytes"].as_u64(),
        ) else {
            continue;
        };
        let Some((kind, iface)) = name.split_once('.') else {
            continue;
        };
        let t = m.entry(iface.to_string()).or_default();
        match kind {
            "tx" => t.tx = (p, b),
            "rx" => t.rx = (p, b),
            "reply4" => t.replies.0 = p,
            "reply6" => t.replies.1 = p,
            _ => {}
        }
    }
    Ok(m)
}

/// `nft -j list table` output → what uplinkd owns in it.
pub fn parse_listing(json: &str) -> Result<KernelNft, DataplaneError> {
    let listing: Listing =
        serde_json::from_str(json).map_err(|e| DataplaneError::NftOutput(e.to_string()))?;
    let mut signature = signature_of_items(listing.nftables.iter());
    let mut unassigned = UnassignedChain::default();
    for r in listing
        .nftables
        .iter()
        .filter_map(|i| i.rule.as_ref())
        .filter(|r| r.chain == UNASSIGNED)
    {
        if unassigned.rules == 0 {
            unassigned.target = r
                .comment
                .as_deref()
                .and_then(|c| c.split_once(TARGET_TAG))
                .map(|(_, t)| t.to_string());
        }
        unassigned.rules += 1;
    }
    let mut elements = BTreeMap::new();
    // Chain names repeat across elements: share one allocation per target.
    let mut targets: BTreeMap<String, Arc<str>> = BTreeMap::new();
    let mut unknown = 0usize;
    for item in listing.nftables {
        if let Some(set) = item.set
            && let Some((family, uplink)) = set.name.split_once('.')
            && let Some(v6) = match family {
                "client4" => Some(false),
                "client6" => Some(true),
                _ => None,
            }
        {
            let target = targets
                .entry(home_chain(uplink))
                .or_insert_with_key(|t| Arc::from(t.as_str()))
                .clone();
            for key in set.elem {
                let key = match key {
                    ListKey::Text(t) => t.parse::<IpAddr>().ok(),
                    _ => None,
                };
                match key {
                    Some(IpAddr::V4(a)) if !v6 => {
                        elements.insert(ElemKey::V4(a), target.clone());
                    }
                    Some(IpAddr::V6(a)) if v6 => {
                        elements.insert(ElemKey::V6(a), target.clone());
                    }
                    _ => unknown += 1,
                }
            }
            continue;
        }
        let Some(map) = item.map else { continue };
        for (key, verdict) in map.elem {
            let key = match (map.name.as_str(), key) {
                // An earlier version's client maps: adopted at start, then replaced.
                (MAP_CLIENT4 | MAP_CLIENT6, ListKey::Text(t)) => {
                    t.parse::<IpAddr>().ok().map(|ip| match ip {
                        IpAddr::V4(a) => ElemKey::V4(a),
                        IpAddr::V6(a) => ElemKey::V6(a),
                    })
                }
                (MAP_STICKY, ListKey::Number(n)) => Some(ElemKey::Mark(n)),
                (MAP_PIN4 | MAP_PIN6, ListKey::Text(t)) => {
                    t.parse::<IpAddr>().ok().map(|ip| match ip {
                        IpAddr::V4(a) => ElemKey::Pin4(a),
                        IpAddr::V6(a) => ElemKey::Pin6(a),
                    })
                }
                _ => None,
            };
            let (Some(key), Some(target)) = (key, verdict.goto) else {
                // Not something uplinkd writes: the structure check replaces the table.
                unknown += 1;
                continue;
            };
            let target = targets
                .entry(target.target.to_string())
                .or_insert_with(|| Arc::from(target.target))
                .clone();
            elements.insert(key, target);
        }
    }
    if unknown > 0 {
        signature
            .rules
            .push(("<foreign elements>".into(), Some(unknown.to_string())));
    }
    Ok(KernelNft {
        signature,
        elements,
        unassigned,
    })
}

/// Adopted assignments: client address → uplink name, from the kernel's client maps, for
/// the addresses `wanted` accepts.
pub fn adopted_homes(k: &KernelNft, wanted: impl Fn(&IpAddr) -> bool) -> BTreeMap<IpAddr, String> {
    k.elements
        .iter()
        .filter_map(|(key, target)| {
            let ip = match key {
                ElemKey::V4(a) => IpAddr::V4(*a),
                ElemKey::V6(a) => IpAddr::V6(*a),
                ElemKey::Mark(_) | ElemKey::Pin4(_) | ElemKey::Pin6(_) => return None,
            };
            if !wanted(&ip) {
                return None;
            }
            Some((ip, target.strip_prefix("home_")?.to_string()))
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::NftUplink;

    fn structure() -> NftStructure {
        NftStructure {
            table: "uplinkd".into(),
            mask: 0x3f00_0000,
            lan_interfaces: vec!["lan0".into()],
            uplinks: vec![NftUplink {
                name: "a".into(),
                interface: "wan0".into(),
                fwmark: 0x0100_0000,
                masquerade: true,
                home: None,
                v6_detour: None,
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
        }
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
            v6_detour: None,
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
    fn listing_round_trip_matches_signature() {
        // The shape `nft -j list table` prints for uplinkd's own objects.
        let objs = render_structure(&structure());
        let mut items: Vec<serde_json::Value> = objs.to_vec();
        let client4 = items
            .iter_mut()
            .find(|o| o["set"]["name"] == "client4.a")
            .expect("the client set of uplink a");
        client4["set"]["elem"] = serde_json::json!(["10.0.0.1"]);
        let mut maps = verdict_maps("uplinkd");
        maps[0]["map"]["elem"] = serde_json::json!([[16777216, {"goto": {"target": "up_a"}}]]);
        items.extend(maps);
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
