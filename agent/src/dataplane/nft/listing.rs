//! Reading the kernel's copy: the parts of `nft -j list` output uplinkd compares (the
//! signature of its objects, the client and map elements, the counters), and the
//! assignments a start adopts.

use super::*;

pub(super) fn signature_of_items<'a, 'b: 'a>(
    items: impl Iterator<Item = &'a ListItem<'b>>,
) -> Signature {
    let mut sig = Signature::default();
    for it in items {
        if let Some(c) = &it.chain {
            sig.chains.insert(c.clone());
        }
        if let Some(m) = &it.map {
            sig.maps.insert((
                m.name.clone(),
                m.key_type.to_string(),
                m.map.to_string(),
                m.size,
            ));
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
pub(super) struct Listing<'a> {
    #[serde(borrow)]
    pub(super) nftables: Vec<ListItem<'a>>,
}

#[derive(Deserialize)]
pub(super) struct ListItem<'a> {
    pub(super) chain: Option<ListChain>,
    pub(super) rule: Option<ListRule>,
    #[serde(borrow)]
    pub(super) set: Option<ListSet<'a>>,
    pub(super) counter: Option<ListCounter>,
    #[serde(borrow)]
    pub(super) map: Option<ListMap<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub(super) struct ListChain {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) kind: Option<String>,
    pub(super) hook: Option<String>,
    pub(super) prio: Option<i64>,
    pub(super) policy: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct ListSet<'a> {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) key_type: Value,
    /// nft lists only some flags (`interval`, `timeout`; not `dynamic`), alike for ours.
    #[serde(default)]
    pub(super) flags: Vec<String>,
    /// Read for the client sets only (others' elements are not compared one by one).
    #[serde(default, borrow)]
    pub(super) elem: Vec<ListKey<'a>>,
}

#[derive(Deserialize)]
pub(super) struct ListCounter {
    pub(super) name: String,
}

#[derive(Deserialize)]
pub(super) struct ListRule {
    pub(super) chain: String,
    pub(super) comment: Option<String>,
}

// Element keys and targets borrow from nft's output: 100k elements, no allocation each.
#[derive(Deserialize)]
pub(super) struct ListMap<'a> {
    pub(super) name: String,
    #[serde(rename = "type")]
    pub(super) key_type: serde_json::Value,
    pub(super) map: serde_json::Value,
    /// Declared size: a map that had none (an earlier version's `sticky`) is replaced.
    #[serde(default)]
    pub(super) size: Option<u64>,
    #[serde(default, borrow)]
    pub(super) elem: Vec<(ListKey<'a>, ListVerdict<'a>)>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum ListKey<'a> {
    Number(u32),
    Text(&'a str),
    Other(serde::de::IgnoredAny),
}

#[derive(Deserialize)]
pub(super) struct ListVerdict<'a> {
    #[serde(alias = "jump", borrow)]
    pub(super) goto: Option<ListTarget<'a>>,
}

#[derive(Deserialize)]
pub(super) struct ListTarget<'a> {
    pub(super) target: &'a str,
}

/// The named counters, name → (packets, bytes) → traffic per uplink interface.
pub(super) fn traffic_of(counters: Vec<(String, (u64, u64))>) -> BTreeMap<String, Traffic> {
    let add = |to: &mut (u64, u64), p: u64, b: u64| {
        to.0 += p;
        to.1 += b;
    };
    let mut m: BTreeMap<String, Traffic> = BTreeMap::new();
    for (name, (p, b)) in counters {
        let Some((kind, iface)) = name.split_once('.') else {
            continue;
        };
        let t = m.entry(iface.to_string()).or_default();
        match kind {
            "tx" => t.tx = (p, b),
            "rx" => add(&mut t.rx, p, b),
            "reply4" => {
                t.replies.0 = p;
                add(&mut t.rx, p, b);
            }
            "reply6" => {
                t.replies.1 = p;
                add(&mut t.rx, p, b);
            }
            _ => {}
        }
    }
    m
}

/// `nft -j list table` output → what uplinkd owns in it: the reference reading, which the
/// netlink reading (`assemble`) must equal (the namespace tests compare both).
pub fn parse_listing(json: &str) -> Result<KernelNft, DataplaneError> {
    let listing: Listing =
        serde_json::from_str(json).map_err(|e| DataplaneError::NftOutput(e.to_string()))?;
    let signature = signature_of_items(listing.nftables.iter());
    // signature_of_items took the rules; the unassigned chain's are read here.
    let mut unassigned = UnassignedChain::default();
    for r in listing.nftables.iter().filter_map(|i| i.rule.as_ref()) {
        note_unassigned(&mut unassigned, &r.chain, r.comment.as_deref());
    }
    let mut elements = Elements::default();
    for item in listing.nftables {
        if let Some(set) = item.set
            && let Some((v6, uplink)) = client_set_of(&set.name)
        {
            for key in set.elem {
                let ip = match key {
                    ListKey::Text(t) => t.parse::<IpAddr>().ok(),
                    _ => None,
                };
                elements.client(v6, uplink, ip);
            }
            continue;
        }
        let Some(map) = item.map else { continue };
        for (key, verdict) in map.elem {
            let key = match key {
                ListKey::Text(t) => t.parse::<IpAddr>().ok().map(RawKey::Addr),
                ListKey::Number(n) => Some(RawKey::Number(n)),
                ListKey::Other(_) => None,
            };
            elements.mapped(&map.name, key, verdict.goto.map(|g| g.target));
        }
    }
    Ok(elements.finish(signature, unassigned))
}

/// The structure listing, `nft -t -j list chains inet ; list sets table inet T ; list
/// maps inet` (one JSON document per command, elements left out) → the signature of
/// `table`'s chains, sets and maps, and the names of the sets and maps whose elements
/// uplinkd reads.
pub fn parse_structure(out: &str, table: &str) -> Result<Structure, DataplaneError> {
    let bad = |e: serde_json::Error| DataplaneError::NftOutput(e.to_string());
    let docs: Vec<Value> = serde_json::Deserializer::from_str(out)
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(bad)?;
    let mut items = Vec::new();
    for item in docs
        .iter()
        .flat_map(|d| d["nftables"].as_array().into_iter().flatten())
    {
        let ours = ["chain", "set", "map"]
            .iter()
            .any(|k| item[k]["table"].as_str() == Some(table));
        if ours {
            items.push(ListItem::deserialize(item).map_err(bad)?);
        }
    }
    let mut read = Vec::new();
    for it in &items {
        if let Some(s) = &it.set
            && client_set_of(&s.name).is_some()
        {
            read.push(s.name.clone());
        }
        if let Some(m) = &it.map {
            read.push(m.name.clone());
        }
    }
    Ok(Structure {
        signature: signature_of_items(items.iter()),
        read,
    })
}

/// A table's structure as nft lists it, before the netlink reading completes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    signature: Signature,
    /// The client sets and the maps, whose elements are read.
    pub read: Vec<String>,
}

/// The structure completed with what netlink read: the rules in order, the named
/// counters, and the elements of the sets and maps of `Structure::read`.
pub(super) fn assemble(
    structure: Structure,
    rules: &[nfnl::KernelRule],
    counters: impl Iterator<Item = String>,
    elements: Elements,
) -> KernelNft {
    let mut signature = structure.signature;
    let mut unassigned = UnassignedChain::default();
    for r in rules {
        note_unassigned(&mut unassigned, &r.chain, r.comment.as_deref());
        if r.chain != UNASSIGNED {
            signature.rules.push((r.chain.clone(), r.comment.clone()));
        }
    }
    signature.counters.extend(counters);
    elements.finish(signature, unassigned)
}

fn addr_of(key: &[u8]) -> Option<IpAddr> {
    match key.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(key).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(key).ok()?)),
        _ => None,
    }
}

/// `client4.<uplink>` → (IPv6?, uplink).
fn client_set_of(name: &str) -> Option<(bool, &str)> {
    let (family, uplink) = name.split_once('.')?;
    match family {
        "client4" => Some((false, uplink)),
        "client6" => Some((true, uplink)),
        _ => None,
    }
}

/// The `unassigned` chain's rule count and, from its first rule, its target.
fn note_unassigned(u: &mut UnassignedChain, chain: &str, comment: Option<&str>) {
    if chain != UNASSIGNED {
        return;
    }
    if u.rules == 0 {
        u.target = comment
            .and_then(|c| c.split_once(TARGET_TAG))
            .map(|(_, t)| t.to_string());
    }
    u.rules += 1;
}

/// A map element's key, as either reading gives it.
enum RawKey {
    Addr(IpAddr),
    Number(u32),
}

/// The elements read so far, with one allocation per target chain (100k elements share
/// a handful), and a count of those uplinkd does not write.
#[derive(Default)]
pub(super) struct Elements {
    map: BTreeMap<ElemKey, Arc<str>>,
    targets: BTreeMap<String, Arc<str>>,
    unknown: usize,
    /// Elements read twice from the same set or map.
    repeated: usize,
}

impl Elements {
    /// Whether the reading was of one state. A set holds an element once, so one read
    /// twice means the dump was not: the kernel resumes a dump by skipping as many
    /// elements as it sent, and a hash set resized in between (as one is for about a
    /// second after a commit of many elements) shifts what that skips, repeating some
    /// elements and missing others.
    pub(super) fn consistent(&self) -> bool {
        self.repeated == 0
    }

    fn insert(&mut self, key: ElemKey, target: Arc<str>) {
        // The same key with the same target: the same set (a client set's elements all
        // lead to its uplink's home chain). In two sets it is the kernel's state.
        if let Some(old) = self.map.insert(key, target.clone())
            && Arc::ptr_eq(&old, &target)
        {
            self.repeated += 1;
        }
    }

    fn target(&mut self, t: &str) -> Arc<str> {
        if let Some(a) = self.targets.get(t) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(t);
        self.targets.insert(t.to_string(), a.clone());
        a
    }

    /// An element of set or map `name` as netlink gives it.
    pub(super) fn add_netlink(&mut self, name: &str, key: &[u8], goto: Option<&str>) {
        if let Some((v6, uplink)) = client_set_of(name) {
            self.client(v6, uplink, addr_of(key));
            return;
        }
        let key = match key.len() {
            // A mark is in host order, an address in network order.
            4 if name == MAP_STICKY => Some(RawKey::Number(u32::from_ne_bytes(
                key.try_into().expect("4 bytes"),
            ))),
            _ => addr_of(key).map(RawKey::Addr),
        };
        self.mapped(name, key, goto);
    }

    /// An element of the client set of `uplink`.
    fn client(&mut self, v6: bool, uplink: &str, ip: Option<IpAddr>) {
        let key = match ip {
            Some(IpAddr::V4(a)) if !v6 => ElemKey::V4(a),
            Some(IpAddr::V6(a)) if v6 => ElemKey::V6(a),
            _ => {
                self.unknown += 1;
                return;
            }
        };
        let target = self.target(&home_chain(uplink));
        self.insert(key, target);
    }

    /// An element of the map `name` with the chain of its `goto`.
    fn mapped(&mut self, name: &str, key: Option<RawKey>, goto: Option<&str>) {
        let key = match (name, key) {
            // An earlier version's client maps: adopted at start, then replaced.
            (MAP_CLIENT4 | MAP_CLIENT6, Some(RawKey::Addr(ip))) => Some(match ip {
                IpAddr::V4(a) => ElemKey::V4(a),
                IpAddr::V6(a) => ElemKey::V6(a),
            }),
            (MAP_STICKY, Some(RawKey::Number(n))) => Some(ElemKey::Mark(n)),
            (MAP_PIN4, Some(RawKey::Addr(IpAddr::V4(a)))) => Some(ElemKey::Pin4(a)),
            (MAP_PIN6, Some(RawKey::Addr(IpAddr::V6(a)))) => Some(ElemKey::Pin6(a)),
            _ => None,
        };
        match (key, goto) {
            (Some(key), Some(goto)) => {
                let target = self.target(goto);
                self.insert(key, target);
            }
            // Not something uplinkd writes: the structure check replaces the table.
            _ => self.unknown += 1,
        }
    }

    fn finish(self, mut signature: Signature, unassigned: UnassignedChain) -> KernelNft {
        if self.unknown > 0 {
            signature
                .rules
                .push(("<foreign elements>".into(), Some(self.unknown.to_string())));
        }
        KernelNft {
            signature,
            elements: self.map,
            unassigned,
        }
    }
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
