//! The element side of a transaction: which map and set elements to add and delete to
//! bring the kernel's copy to a plan, whole or incremental, and their batch commands.

use super::*;

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
pub(super) const FIRST_OTHER: ElemKey = ElemKey::Mark(0);

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
pub(super) fn whole_elements(
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
pub(super) fn push_elements<'a>(
    batch: &mut Vec<String>,
    table: &str,
    elems: impl IntoIterator<Item = (&'a ElemKey, &'a Arc<str>)>,
    add: bool,
) {
    use std::fmt::Write;
    // One command per map or set: grouped by the key's kind and, for a client address,
    // its target (which names its set), without a name built per element. The first key
    // of a group names its container.
    let kind = |k: &ElemKey| match k {
        ElemKey::V4(_) => 0u8,
        ElemKey::V6(_) => 1,
        ElemKey::Mark(_) => 2,
        ElemKey::Pin4(_) => 3,
        ElemKey::Pin6(_) => 4,
    };
    // (kind, a client address's target) → the group's first key and its items.
    type Group<'t> = (u8, Option<&'t Arc<str>>);
    let mut groups: BTreeMap<Group, (ElemKey, String)> = BTreeMap::new();
    for (k, target) in elems {
        let (_, items) = groups
            .entry((kind(k), k.is_client().then_some(target)))
            .or_insert_with(|| (*k, String::new()));
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
    for ((_, target), (first, items)) in groups {
        let name = first.container(target.map_or("", |t| t));
        batch.push(format!(
            "{{\"{verb}\":{{\"element\":{{\"family\":\"inet\",\"table\":{},\"name\":{},\"elem\":[{items}]}}}}}}",
            serde_json::Value::from(table),
            serde_json::Value::from(name.as_ref())
        ));
    }
}
