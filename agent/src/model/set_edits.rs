//! The operator's edits of `[[set]]` elements through the API, on top of the configured
//! ones: applied, kept across reloads, and the sets as the plan renders them.

use std::collections::BTreeSet;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::Model;
use super::failover::{EventKind, LogEntry};
use crate::config::{MAX_SET_ELEMENTS, SetConfig};

/// An operator's changes to a `[[set]]` through the API, on top of its configured
/// elements; persisted with the other decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetEdits {
    #[serde(default)]
    pub added: BTreeSet<IpNet>,
    /// Configured elements taken out.
    #[serde(default)]
    pub removed: BTreeSet<IpNet>,
}

fn configured(set: &SetConfig) -> impl Iterator<Item = IpNet> + '_ {
    set.v4
        .iter()
        .map(|n| IpNet::V4(*n))
        .chain(set.v6.iter().map(|n| IpNet::V6(*n)))
}

impl Model {
    /// A set's elements now: configured, plus API additions, minus API removals.
    pub fn set_elements(&self, set: &SetConfig) -> Vec<IpNet> {
        let edits = self.set_edits.get(&set.name);
        let mut all: BTreeSet<IpNet> = configured(set).collect();
        if let Some(e) = edits {
            all.retain(|n| !e.removed.contains(n));
            all.extend(e.added.iter().copied());
        }
        all.into_iter().collect()
    }

    /// `set` with the API's edits applied, as the plan renders it.
    pub fn effective_set(&self, set: &SetConfig) -> SetConfig {
        if !self.set_edits.contains_key(&set.name) {
            return set.clone();
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for n in self.set_elements(set) {
            match n {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        SetConfig {
            name: set.name.clone(),
            v4: Ipv4Net::aggregate(&v4),
            v6: Ipv6Net::aggregate(&v6),
            external: set.external,
        }
    }

    /// Adds and removes elements of a set (operator edits through the API); returns the
    /// event, or why not.
    /// `sets`: every configured set (the plan's copy of the edited ones is rebuilt here, not
    /// at every placement).
    pub fn edit_set(
        &mut self,
        sets: &[SetConfig],
        set: &SetConfig,
        add: &[IpNet],
        del: &[IpNet],
    ) -> Result<LogEntry, String> {
        if set.external {
            return Err(format!(
                "set {} is external: uplinkd never edits its elements (its filler, e.g. dnsmasq --nftset, does)",
                set.name
            ));
        }
        let present: BTreeSet<IpNet> = self.set_elements(set).into_iter().collect();
        if let Some(n) = del.iter().find(|n| !present.contains(n)) {
            return Err(format!("{n} is not an element of set {}", set.name));
        }
        let grows = add.iter().filter(|n| !present.contains(n)).count();
        if present.len() + grows > MAX_SET_ELEMENTS {
            return Err(format!(
                "set {} would have more than {MAX_SET_ELEMENTS} elements",
                set.name
            ));
        }
        let in_config: BTreeSet<IpNet> = configured(set).collect();
        let e = self.set_edits.entry(set.name.clone()).or_default();
        for n in del {
            e.added.remove(n);
            if in_config.contains(n) {
                e.removed.insert(*n);
            }
        }
        for n in add {
            e.removed.remove(n);
            if !in_config.contains(n) {
                e.added.insert(*n);
            }
        }
        if e.added.is_empty() && e.removed.is_empty() {
            self.set_edits.remove(&set.name);
        }
        self.refresh_sets(sets);
        let what: Vec<String> = add
            .iter()
            .map(|n| format!("+{n}"))
            .chain(del.iter().map(|n| format!("-{n}")))
            .collect();
        Ok(LogEntry {
            at: super::now_millis(),
            uplink: String::new(),
            kind: EventKind::Set,
            cause: format!("set {}: {}", set.name, what.join(" ")),
            clients_moved: 0,
        })
    }

    /// Keeps only the edits of sets `sets` still declares as uplinkd's own.
    pub fn keep_set_edits(&mut self, sets: &[SetConfig]) {
        self.set_edits
            .retain(|name, _| sets.iter().any(|s| s.name == *name && !s.external));
        self.refresh_sets(sets);
    }

    /// Rebuilds the sets as the plan renders them (`None` without edits: the config's).
    fn refresh_sets(&mut self, sets: &[SetConfig]) {
        self.edited_sets = (!self.set_edits.is_empty())
            .then(|| std::sync::Arc::new(sets.iter().map(|s| self.effective_set(s)).collect()));
    }

    /// The sets with the API's edits applied, kept since the last edit or reload; `None`
    /// when no set is edited.
    pub fn edited_sets(&self) -> Option<&std::sync::Arc<Vec<SetConfig>>> {
        self.edited_sets.as_ref()
    }
}
