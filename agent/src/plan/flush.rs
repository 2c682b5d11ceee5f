//! The conntrack deletions due once a plan is in the kernel: whose flows, by which mark.

use crate::config::{Config, FailbackFlows};
use crate::model::Model;

/// Conntrack entries to delete once a plan is in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flush {
    pub of: FlushOf,
    /// Entries whose mark has `mark` in the `mask` bits.
    pub mark: u32,
    pub mask: u32,
}

/// Whose flows a flush deletes (config indices at the time the job was planned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushOf {
    /// A dead uplink's.
    Uplink(usize),
    /// A policy's, on an uplink it left for its SLA.
    Policy { policy: usize, uplink: usize },
    /// Those a failover of this uplink placed elsewhere, now that it is back.
    Failback(usize),
    /// Those on an uplink that went over its quota (standby, stop).
    Quota(usize),
}

/// The deletions due with the plan being made now, taken from the model (each is due
/// once; a failed one is handed back to it):
/// - a dead uplink's flows, once its clients have somewhere else to be;
/// - an uplink's that went over its quota;
/// - on failback, the flows the failover placed elsewhere: all of them with
///   `failback_flows = "move"`, else those on metered uplinks;
/// - a policy's flows on an uplink that broke its SLA.
pub fn take_flushes(config: &Config, model: &mut Model) -> Vec<Flush> {
    let dp = &config.dataplane;
    let by_uplink = |of: fn(usize) -> FlushOf, i: usize| Flush {
        of: of(i),
        mark: dp.fwmark(config.uplinks[i].mark),
        mask: dp.fwmark_mask,
    };
    let mut flushes: Vec<Flush> = model
        .take_flushes()
        .into_iter()
        .map(|i| by_uplink(FlushOf::Uplink, i))
        .collect();
    flushes.extend(
        model
            .take_quota_flushes()
            .into_iter()
            .map(|i| by_uplink(FlushOf::Quota, i)),
    );
    for i in model.take_failbacks() {
        let Some(away) = dp.away_ctmark(config.uplinks[i].mark) else {
            continue;
        };
        let of = FlushOf::Failback(i);
        if config.failover.failback_flows == FailbackFlows::Move {
            flushes.push(Flush {
                of,
                mark: away,
                mask: dp.policy_mark_mask,
            });
        } else {
            // Off the metered uplinks only.
            for m in config.uplinks.iter().filter(|m| m.metered) {
                flushes.push(Flush {
                    of,
                    mark: away | dp.fwmark(m.mark),
                    mask: dp.policy_mark_mask | dp.fwmark_mask,
                });
            }
        }
    }
    for (p, i) in model.take_sla_flushes() {
        if let Some(id) = dp.policy_ctmark(p) {
            flushes.push(Flush {
                of: FlushOf::Policy {
                    policy: p,
                    uplink: i,
                },
                mark: dp.fwmark(config.uplinks[i].mark) | id,
                mask: dp.fwmark_mask | dp.policy_mark_mask,
            });
        }
    }
    flushes
}
