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

/// `nft -j list counters table` output → traffic per uplink interface.
pub(super) fn parse_counters(json: &str) -> Result<BTreeMap<String, Traffic>, DataplaneError> {
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
