//! Dataplane: reads back what uplinkd owns in the kernel, diffs it against the plan and
//! applies the difference (one nft transaction; rules and routes over netlink).

pub mod conntrack;
pub mod netlink;
mod nfnl;
pub mod nft;

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::config::Config;
use crate::plan::{Desired, RouteSpec, RuleSpec};
use netlink::{NetlinkDriver, NetlinkStats};
use nft::{KernelNft, NftDriver, NftStats, Part, Refused};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "cannot run {path:?} (dataplane.nft): {source}; install the nftables package or set dataplane.nft to the nft binary"
    )]
    NftMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Nft { command: String, stderr: String },
    #[error("unexpected `nft -j` output: {0}")]
    NftOutput(String),
    #[error(
        "cannot run {path:?} (dataplane.conntrack): {source}; install the conntrack package or set dataplane.conntrack"
    )]
    ConntrackMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Conntrack { command: String, stderr: String },
    #[error(
        "ctnetlink flush by mark: {0} (dataplane.conntrack_flush = \"tool\" uses the conntrack tool instead)"
    )]
    ConntrackNetlink(std::io::Error),
    #[error("reading uplinkd's nft table over netlink: {0}")]
    NftNetlink(std::io::Error),
    #[error(
        "`{command}` did not finish within {after:?} (dataplane.command_timeout); killed it, will retry"
    )]
    Timeout {
        command: String,
        after: std::time::Duration,
    },
    #[error(
        "an incremental plan reached the dataplane without its copy of the kernel's maps; planning whole"
    )]
    NeedsWholePlan,
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        source: rtnetlink::Error,
    },
}

impl DataplaneError {
    pub fn netlink(context: &str, source: rtnetlink::Error) -> DataplaneError {
        DataplaneError::Netlink {
            context: context.to_string(),
            source,
        }
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub nft: NftStats,
    pub rules: NetlinkStats,
    pub routes: NetlinkStats,
    pub errors: Vec<DataplaneError>,
    /// Parts of the config the kernel refuses, left out of the table (all of them, not
    /// only the ones this apply found).
    pub refused: Vec<Refused>,
}

impl ApplyReport {
    pub fn changed(&self) -> bool {
        !self.nft.is_empty()
            || self.rules != NetlinkStats::default()
            || self.routes != NetlinkStats::default()
    }
}

pub struct Dataplane {
    nft: NftDriver,
    conntrack: conntrack::Conntrack,
    netlink: NetlinkDriver,
    /// The kernel's nft state as last read or written; `None` forces a read-back.
    nft_cache: Option<KernelNft>,
    /// Rules and routes last applied without error; a change or a resync re-reads them.
    applied: Option<(BTreeSet<RuleSpec>, BTreeSet<RouteSpec>)>,
    table_known_absent: bool,
    /// Parts the kernel refused, with a fingerprint of what each was then: a part is
    /// tried again once the operator changes it (or it goes).
    refused: Vec<(Refused, u64)>,
}

/// What `apply` reads back from the kernel before it diffs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadBack {
    /// Nothing: the cache of what was last applied stands in for the kernel.
    Cache,
    /// The nft table's structure, rules and routes (a cheap resync at any size).
    Structure,
    /// Everything, map elements included.
    Full,
}

impl Dataplane {
    pub fn new(config: &Config, handle: rtnetlink::Handle) -> Dataplane {
        let dp = &config.dataplane;
        Dataplane {
            nft: NftDriver::new(&dp.nft, &dp.nft_table, dp.command_timeout),
            conntrack: conntrack::Conntrack::new(
                &dp.conntrack,
                dp.command_timeout,
                dp.conntrack_flush,
            ),
            netlink: NetlinkDriver::new(
                handle,
                dp.route_protocol,
                dp.owned_priorities(),
                dp.owned_tables(),
            ),
            nft_cache: None,
            applied: None,
            table_known_absent: false,
            refused: Vec::new(),
        }
    }

    /// Fails with a clear error when `nft` or `conntrack` cannot be run.
    pub async fn check(&self) -> Result<(), DataplaneError> {
        self.nft.check().await?;
        self.conntrack.check().await
    }

    /// A reader of the nft counters for tasks beside the loop (scrapes, API reads,
    /// passive health), so that a slow `nft` never holds the loop.
    pub fn counter_reader(&self) -> nft::Counters {
        nft::Counters::new(self.nft.clone())
    }

    /// Deletes the conntrack entries whose mark has `mark` in the `mask` bits (an uplink's
    /// and a policy's, for an SLA break).
    pub async fn flush_conntrack_masked(
        &self,
        mark: u32,
        mask: u32,
    ) -> Result<Option<usize>, DataplaneError> {
        self.conntrack.delete_mark(mark, mask).await
    }

    /// The conntrack deleter, for work that runs beside the loop.
    pub fn conntrack(&self) -> conntrack::Conntrack {
        self.conntrack.clone()
    }

    /// Reads the kernel's nft state (for adoption at start) and keeps it as the cache.
    pub async fn read_nft(&mut self) -> Result<Option<&KernelNft>, DataplaneError> {
        self.nft_cache = self.nft.read().await?;
        self.table_known_absent = self.nft_cache.is_none();
        Ok(self.nft_cache.as_ref())
    }

    /// Whether an incremental plan can be applied with `read`: the cache of the kernel's
    /// maps stands in for the client addresses it does not name.
    pub fn takes_increment(&self, read: ReadBack) -> bool {
        read == ReadBack::Cache && self.nft_cache.is_some()
    }

    /// Applies `desired` after reading back what `read` says; map elements come from the
    /// cache unless they are read.
    pub async fn apply(&mut self, desired: &Desired, read: ReadBack) -> ApplyReport {
        let mut report = ApplyReport::default();
        let full = read != ReadBack::Cache;
        let unknown = self.nft_cache.is_none() && !self.table_known_absent;
        if read == ReadBack::Full || unknown {
            match self.nft.read().await {
                Ok(k) => self.nft_cache = k,
                Err(e) => report.errors.push(e),
            }
        } else if read == ReadBack::Structure {
            match self.nft.read_structure().await {
                Ok(Some(k)) => match &mut self.nft_cache {
                    Some(cache) => {
                        cache.signature = k.signature;
                        cache.unassigned = k.unassigned;
                    }
                    // The table appeared behind our back: read it all.
                    None => match self.nft.read().await {
                        Ok(k) => self.nft_cache = k,
                        Err(e) => report.errors.push(e),
                    },
                },
                // The table went behind our back: what was last applied is what is
                // wanted back, so its elements stay, and the apply replaces the table
                // (whole, from them and what changed since) as for any foreign structure.
                Ok(None) => {
                    if let Some(cache) = &mut self.nft_cache {
                        cache.signature = nft::Signature::default();
                    }
                }
                Err(e) => report.errors.push(e),
            }
        }
        if report.errors.is_empty() {
            let wanted = &desired.nft.structure;
            self.refused
                .retain(|(r, print)| fingerprint(wanted, &r.part) == Some(*print));
            let mut structure = self.leaving_out_refused(wanted);
            let mut result = self
                .nft
                .apply(&desired.nft, &structure, &mut self.nft_cache, full)
                .await;
            // The kernel refused the transaction (and kept the table it had): whatever
            // parts of the config it refuses are left out, so the rest (every client's
            // route) still goes in, at start-up too.
            if let Err(DataplaneError::Nft { .. }) = &result {
                match self.nft.find_refused(&structure).await {
                    Ok(found) if !found.is_empty() => {
                        for r in found {
                            let print = fingerprint(wanted, &r.part).unwrap_or_default();
                            tracing::error!(part = %r.part, error = %r.error, "the kernel refuses this part of the config; it is left out of the dataplane until it changes");
                            self.refused.push((r, print));
                        }
                        structure = self.leaving_out_refused(wanted);
                        self.nft_cache = None;
                        result = match self.nft.read().await {
                            Ok(k) => {
                                self.nft_cache = k;
                                self.nft
                                    .apply(&desired.nft, &structure, &mut self.nft_cache, full)
                                    .await
                            }
                            Err(e) => Err(e),
                        };
                    }
                    Ok(_) => {}
                    Err(e) => report.errors.push(e),
                }
            }
            match result {
                Ok(s) => {
                    report.nft = s;
                    self.table_known_absent = false;
                }
                Err(e) => report.errors.push(e),
            }
        }
        report.refused = self.refused.iter().map(|(r, _)| r.clone()).collect();
        let same = self
            .applied
            .as_ref()
            .is_some_and(|(r, t)| *r == desired.rules && *t == desired.routes);
        if full || !same {
            let (rules, mut errors) = self.netlink.apply_rules(&desired.rules).await;
            let (routes, e2) = self.netlink.apply_routes(&desired.routes).await;
            errors.extend(e2);
            self.applied = errors
                .is_empty()
                .then(|| (desired.rules.clone(), desired.routes.clone()));
            report.rules = rules;
            report.routes = routes;
            report.errors.extend(errors);
        }
        report
    }

    /// The structure to render: `wanted` less the refused parts (itself when none).
    fn leaving_out_refused<'a>(
        &self,
        wanted: &'a crate::plan::NftStructure,
    ) -> std::borrow::Cow<'a, crate::plan::NftStructure> {
        if self.refused.is_empty() {
            return std::borrow::Cow::Borrowed(wanted);
        }
        let parts: Vec<Part> = self.refused.iter().map(|(r, _)| r.part.clone()).collect();
        std::borrow::Cow::Owned(nft::without(wanted, &parts))
    }

    /// Removes the nft table, rules and routes uplinkd owns, and nothing else.
    pub async fn remove_all(&mut self) -> (bool, NetlinkStats, Vec<DataplaneError>) {
        let mut errors = Vec::new();
        let table = match self.nft.delete_table().await {
            Ok(t) => t,
            Err(e) => {
                errors.push(e);
                false
            }
        };
        let (stats, e2) = self.netlink.remove_all().await;
        errors.extend(e2);
        self.nft_cache = None;
        self.applied = None;
        (table, stats, errors)
    }
}

/// What a part of `s` is now, as a number that changes when the part does; `None` when
/// `s` has no such part any more.
fn fingerprint(s: &crate::plan::NftStructure, part: &Part) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let text = match part {
        Part::Rule(n) => format!("{:?}", s.rules.iter().find(|r| &r.name == n)?),
        Part::Set(n) => format!("{:?}", s.sets.iter().find(|x| &x.name == n)?),
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    Some(h.finish())
}
