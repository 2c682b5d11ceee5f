//! Traffic policies in the model: which of a policy's uplinks it may use now (health,
//! drains, failback, SLA), and each policy's SLA verdict per uplink, with hysteresis.
//! (The operator's set edits are in `set_edits`.)

use std::time::Duration;

use super::Model;
use super::failover::{EventKind, LogEntry};
use crate::config::{Mode, PolicyConfig, Sla};

/// A broken SLA holds until every figure is back under this share of its threshold, so a
/// value hovering at the threshold does not flap.
const RECOVER_RTT: f64 = 0.8;
const RECOVER_LOSS: f64 = 0.5;
/// Probes in the window before an SLA is judged: one lost probe of three is not a trend.
const MIN_SAMPLES: usize = 5;

/// One policy's SLA verdict on one uplink.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SlaState {
    /// Why the uplink breaks the SLA (e.g. "rtt 210ms > max_rtt 150ms"); `None`: it
    /// meets it (or has no probes to judge it by).
    pub broken: Option<String>,
}

/// What a policy uses now, and why the others are not used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// Uplinks (config indices) the policy spreads over now, in the policy's list order.
    pub using: Vec<usize>,
    /// The candidates not used, each with the reason.
    pub skipped: Vec<(usize, String)>,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Candidates that meet the SLA.
    Met,
    /// None meets the SLA: the best usable one carries it anyway (never a blackhole).
    BestEffort,
    /// No candidate can carry traffic: `when_none` decides.
    None,
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Model {
    /// Carries SLA verdicts over a reload, by policy and uplink name, so that a reload
    /// neither forgets that a policy avoids an uplink nor logs it again.
    pub fn keep_sla(
        &mut self,
        old: &Model,
        old_policies: &[PolicyConfig],
        policies: &[PolicyConfig],
    ) {
        self.sla = policies
            .iter()
            .map(|p| {
                let before = old_policies.iter().position(|o| o.name == p.name);
                self.uplinks
                    .iter()
                    .map(|u| {
                        before
                            .and_then(|o| {
                                let i = old.uplinks.iter().position(|x| x.name == u.name)?;
                                old.sla.get(o)?.get(i).cloned()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
    }

    /// Re-judges every policy's SLA on every uplink from the probe statistics; returns an
    /// event for each change.
    pub fn evaluate_sla(&mut self, policies: &[PolicyConfig]) -> Vec<LogEntry> {
        self.sla.resize_with(policies.len(), Vec::new);
        let mut log = Vec::new();
        let mut broke = Vec::new();
        for (p, policy) in policies.iter().enumerate() {
            self.sla[p].resize_with(self.uplinks.len(), SlaState::default);
            if !policy.sla.is_set() {
                continue;
            }
            for &u in &policy.uplinks {
                let was = self.sla[p][u].broken.is_some();
                let now = judge(&policy.sla, &self.uplinks[u].health.stats, was);
                if now.is_some() == was {
                    // Keep the first reason until the verdict changes.
                    continue;
                }
                let cause = match &now {
                    Some(why) => format!(
                        "policy {} avoids {}: {why}",
                        policy.name, self.uplinks[u].name
                    ),
                    None => format!(
                        "policy {} uses {} again: back within its SLA",
                        policy.name, self.uplinks[u].name
                    ),
                };
                log.push(LogEntry {
                    at: super::now_millis(),
                    uplink: self.uplinks[u].name.clone(),
                    kind: EventKind::Sla {
                        policy: policy.name.clone(),
                        met: now.is_none(),
                    },
                    cause,
                    clients_moved: 0,
                });
                if now.is_some() {
                    broke.push((p, u));
                }
                self.sla[p][u].broken = now;
            }
        }
        // Judged once every verdict is in: one that still carries the policy (the least
        // bad when none meets it) keeps its flows.
        for (p, u) in broke {
            if !self.policy_uses(&policies[p], p, u) {
                self.sla_flushes.push((p, u));
            }
        }
        log
    }

    /// Whether policy `p` sends new connections to uplink `u` now.
    fn policy_uses(&self, policy: &PolicyConfig, p: usize, u: usize) -> bool {
        let failover = policy.mode == Mode::Failover;
        let c = self.choose(&policy.uplinks, Some(p), !failover);
        // Nowhere else to go: its flows stay.
        c.using.is_empty()
            || if failover {
                c.using.first() == Some(&u)
            } else {
                c.using.contains(&u)
            }
    }

    /// The (policy, uplink) pairs whose flows are to be deleted now.
    pub fn take_sla_flushes(&mut self) -> Vec<(usize, usize)> {
        std::mem::take(&mut self.sla_flushes)
    }

    /// Whether policy `p` (by index) holds its SLA on uplink `u`.
    pub fn sla_met(&self, p: usize, u: usize) -> bool {
        self.sla
            .get(p)
            .and_then(|s| s.get(u))
            .is_none_or(|s| s.broken.is_none())
    }

    /// The uplinks a policy uses now. `sla` is the policy's index when its SLA applies.
    /// Weighted modes (`tiered`) keep to the lowest tier among what is left; failover mode
    /// takes the list order as it is.
    pub fn choose(&self, members: &[usize], sla: Option<usize>, tiered: bool) -> Choice {
        let mut skipped = Vec::new();
        let mut ready = Vec::new();
        let mut waiting = Vec::new();
        let mut standby = Vec::new();
        for &i in members {
            let u = &self.uplinks[i];
            if !u.usable() {
                skipped.push((i, format!("{} is {}", u.name, u.state())));
            } else if u.drained {
                skipped.push((i, format!("{} is drained", u.name)));
            } else if u.quota_stopped() {
                skipped.push((i, format!("{} is over its quota (stopped)", u.name)));
            } else if u.over_quota.is_some() {
                standby.push(i);
            } else if !u.serving {
                waiting.push(i);
            } else {
                ready.push(i);
            }
        }
        // An uplink back from a failure waits out the failback delay like everyone's
        // homes do, unless nothing else can carry the traffic.
        if ready.is_empty() {
            ready = std::mem::take(&mut waiting);
        }
        for &i in &waiting {
            skipped.push((
                i,
                format!("{} is back, failback pending", self.uplinks[i].name),
            ));
        }
        // Over its quota in standby: only while nothing else can carry the traffic.
        if ready.is_empty() {
            ready = std::mem::take(&mut standby);
        }
        for &i in &standby {
            skipped.push((
                i,
                format!("{} is over its quota (standby)", self.uplinks[i].name),
            ));
        }
        if ready.is_empty() {
            return Choice {
                using: Vec::new(),
                skipped: sorted(skipped, members),
                outcome: Outcome::None,
            };
        }
        let mut outcome = Outcome::Met;
        if let Some(p) = sla {
            let (met, broken): (Vec<usize>, Vec<usize>) =
                ready.iter().partition(|&&i| self.sla_met(p, i));
            if met.is_empty() {
                // The least bad one: least loss, then lowest RTT.
                let best = *ready
                    .iter()
                    .min_by_key(|&&i| {
                        let s = &self.uplinks[i].health.stats;
                        (
                            (s.loss() * 1e6) as u64,
                            s.median_rtt().unwrap_or(Duration::MAX),
                        )
                    })
                    .expect("ready is not empty");
                for &i in ready.iter().filter(|&&i| i != best) {
                    skipped.push((i, self.sla_reason(p, i)));
                }
                ready = vec![best];
                outcome = Outcome::BestEffort;
            } else {
                for &i in &broken {
                    skipped.push((i, self.sla_reason(p, i)));
                }
                ready = met;
            }
        }
        if tiered {
            let tier = ready.iter().map(|&i| self.uplinks[i].tier).min();
            ready.retain(|&i| {
                let keep = Some(self.uplinks[i].tier) == tier;
                if !keep {
                    skipped.push((
                        i,
                        format!(
                            "{} is tier {}, used only when tier {} is gone",
                            self.uplinks[i].name,
                            self.uplinks[i].tier,
                            tier.unwrap_or_default()
                        ),
                    ));
                }
                keep
            });
        }
        Choice {
            using: ready,
            skipped: sorted(skipped, members),
            outcome,
        }
    }

    fn sla_reason(&self, p: usize, i: usize) -> String {
        let why = self
            .sla
            .get(p)
            .and_then(|s| s.get(i))
            .and_then(|s| s.broken.clone())
            .unwrap_or_default();
        format!("{} skipped: {why}", self.uplinks[i].name)
    }
}

/// Skip reasons in the policy's list order.
fn sorted(mut skipped: Vec<(usize, String)>, members: &[usize]) -> Vec<(usize, String)> {
    skipped.sort_by_key(|(i, _)| members.iter().position(|m| m == i));
    skipped
}

/// The SLA verdict from probe statistics: `Some(reason)` when broken. `was_broken` selects
/// the stricter recovery thresholds.
pub fn judge(sla: &Sla, stats: &crate::health::stats::Stats, was_broken: bool) -> Option<String> {
    if stats.samples() < MIN_SAMPLES.min(stats.window()) {
        // Not enough evidence either way: keep the verdict.
        return was_broken.then(|| "not enough probes yet".to_string());
    }
    let scale = |limit: f64, share: f64| if was_broken { limit * share } else { limit };
    let mut why = String::new();
    let mut add = |s: String| {
        if !why.is_empty() {
            why.push_str(", ");
        }
        why.push_str(&s);
    };
    // A loss ratio needs more samples than an RTT (one lost probe of five is 20 %), and one
    // lost probe is never a trend.
    let loss_samples = (stats.window() / 2).max(MIN_SAMPLES).min(stats.window());
    if let Some(max) = sla.max_loss
        && stats.samples() >= loss_samples
        && stats.lost() >= 2
    {
        let loss = stats.loss();
        if loss > scale(max, RECOVER_LOSS) {
            add(format!(
                "loss {:.1}% > max_loss {:.1}%",
                loss * 100.0,
                max * 100.0
            ));
        }
    }
    if let Some(max) = sla.max_rtt {
        match stats.median_rtt() {
            Some(rtt) if rtt.as_secs_f64() > scale(max.as_secs_f64(), RECOVER_RTT) => {
                add(format!("rtt {} > max_rtt {}", ms(rtt), ms(max)))
            }
            None => add("no probe answered".into()),
            _ => {}
        }
    }
    if let Some(max) = sla.max_jitter {
        match stats.jitter() {
            Some(j) if j.as_secs_f64() > scale(max.as_secs_f64(), RECOVER_RTT) => {
                add(format!("jitter {} > max_jitter {}", ms(j), ms(max)))
            }
            // Enough probes sent and fewer than two answered: nothing meets a jitter SLA.
            None => add("fewer than two probes answered".into()),
            _ => {}
        }
    }
    if why.is_empty() {
        None
    } else if was_broken {
        Some(format!("still {why}"))
    } else {
        Some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::stats::Stats;

    fn stats(rtts: &[Option<u64>]) -> Stats {
        let mut s = Stats::new(10);
        for r in rtts {
            s.push(r.map(Duration::from_millis));
        }
        s
    }

    #[test]
    fn sla_breaks_above_and_recovers_below_the_margin() {
        let sla = Sla {
            max_rtt: Some(Duration::from_millis(150)),
            max_loss: None,
            max_jitter: None,
        };
        let slow = stats(&[Some(210); 6]);
        assert_eq!(
            judge(&sla, &slow, false).as_deref(),
            Some("rtt 210ms > max_rtt 150ms")
        );
        // 130 ms is under the threshold but above 80 % of it: a broken SLA stays broken.
        let near = stats(&[Some(130); 6]);
        assert!(judge(&sla, &near, false).is_none());
        assert!(judge(&sla, &near, true).is_some());
        assert!(judge(&sla, &stats(&[Some(100); 6]), true).is_none());
        // Too few probes: no verdict change.
        assert!(judge(&sla, &stats(&[Some(500); 2]), false).is_none());
    }

    #[test]
    fn jitter_needs_two_answers_and_one_loss_is_no_trend() {
        let jitter = Sla {
            max_rtt: None,
            max_loss: None,
            max_jitter: Some(Duration::from_millis(30)),
        };
        let one = stats(&[None, None, None, None, Some(10), None]);
        assert_eq!(
            judge(&jitter, &one, false).as_deref(),
            Some("fewer than two probes answered")
        );
        let loss = Sla {
            max_rtt: None,
            max_loss: Some(0.02),
            max_jitter: None,
        };
        // One lost probe of five (20 %) is no verdict, nor is one in a full window.
        let early = stats(&[Some(10), None, Some(10), Some(10), Some(10)]);
        assert!(judge(&loss, &early, false).is_none());
        let mut full = Stats::new(50);
        for i in 0..50 {
            full.push((i != 7).then_some(Duration::from_millis(10)));
        }
        assert!(judge(&loss, &full, false).is_none());
        full.push(None);
        assert!(judge(&loss, &full, false).unwrap().starts_with("loss 4.0%"));
    }

    #[test]
    fn loss_threshold() {
        let sla = Sla {
            max_rtt: None,
            max_loss: Some(0.2),
            max_jitter: None,
        };
        let lossy = stats(&[Some(10), None, None, Some(10), None, Some(10)]);
        assert!(
            judge(&sla, &lossy, false)
                .unwrap()
                .starts_with("loss 50.0%")
        );
    }

    /// Uplinks a and b, both up and probed, and a failover policy `voip` with `sla`.
    fn two_uplinks_and_voip(sla: &str) -> (crate::config::Config, Model, std::time::Instant) {
        let text = format!(
            "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\nprobes = [\"icmp:192.0.2.1\"]\n[[uplink]]\nname = \"b\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\nprobes = [\"icmp:192.0.2.1\"]\n[[policy]]\nname = \"voip\"\nbalance = \"failover\"\n{sla}\n"
        );
        let c = crate::config::Config::parse(std::path::Path::new("t"), &text).unwrap();
        let mut m = Model::new(&c);
        for (n, iface) in ["wan0", "wan1"].iter().enumerate() {
            m.set_link(
                iface,
                super::super::LinkState {
                    ifindex: Some(n as u32 + 2),
                    admin_up: true,
                    carrier: true,
                },
            );
            m.set_addr(iface, format!("100.64.{n}.2").parse().unwrap(), true);
        }
        let now = std::time::Instant::now();
        m.refresh_links(now, &c.health, &c.failover);
        (c, m, now)
    }

    #[test]
    fn a_policy_that_leaves_an_uplink_for_its_sla_deletes_its_flows_there() {
        let (c, mut m, _) = two_uplinks_and_voip("max_rtt = \"100ms\"");
        let rtt = |m: &mut Model, u: usize, ms: u64| {
            for _ in 0..6 {
                m.uplinks[u]
                    .health
                    .stats
                    .push(Some(Duration::from_millis(ms)));
            }
        };
        rtt(&mut m, 0, 200);
        rtt(&mut m, 1, 10);
        assert_eq!(m.evaluate_sla(&c.policies).len(), 1);
        assert_eq!(m.take_sla_flushes(), vec![(0, 0)], "voip leaves a for b");
        assert!(m.take_sla_flushes().is_empty());
        // b breaks too: nothing meets the SLA, and the least bad one (a, 200 ms against
        // 300) carries the policy. Its flows there stay; b's go.
        rtt(&mut m, 1, 300);
        m.evaluate_sla(&c.policies);
        assert_eq!(m.take_sla_flushes(), vec![(0, 1)]);
    }

    #[test]
    fn a_policy_with_max_loss_leaves_an_uplink_whose_traffic_went_unanswered() {
        let (c, mut m, now) = two_uplinks_and_voip("max_loss = 0.1");
        assert!(m.policy_uses(&c.policies[0], 0, 0), "voip starts on a");
        // The LAN's traffic through a went unanswered and the burst failed: one round,
        // far too few samples for a loss figure, yet the policy leaves a at once.
        let burst = crate::health::Round {
            rtts: vec![None],
            quorum: 1,
            forwarding: false,
            burst: true,
            why: Vec::new(),
            targets: Default::default(),
        };
        m.on_round(0, &burst, now, &c.health, &c.failover);
        m.evaluate_sla(&c.policies);
        assert!(!m.policy_uses(&c.policies[0], 0, 0));
        assert!(m.policy_uses(&c.policies[0], 0, 1), "voip moved to b");
    }

    #[test]
    fn a_reload_keeps_sla_verdicts_by_name() {
        let cfg = |policies: &str| {
            crate::config::Config::parse(
                std::path::Path::new("t"),
                &format!(
                    "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\nprobes = [\"icmp:192.0.2.1\"]\n[[uplink]]\nname = \"b\"\ninterface = \"wan1\"\nprobes = [\"icmp:192.0.2.1\"]\n{policies}"
                ),
            )
            .unwrap()
        };
        let p = |n: &str| format!("[[policy]]\nname = \"{n}\"\nmax_rtt = \"100ms\"\n");
        let old_cfg = cfg(&format!("{}{}", p("voip"), p("video")));
        let mut old = Model::new(&old_cfg);
        old.sla = vec![
            vec![
                SlaState::default(),
                SlaState {
                    broken: Some("rtt".into()),
                },
            ],
            vec![SlaState::default(); 2],
        ];
        // The policies swap places and one is new: verdicts follow the names.
        let new_cfg = cfg(&format!("{}{}{}", p("video"), p("voip"), p("new")));
        let mut m = Model::new(&new_cfg);
        m.keep_sla(&old, &old_cfg.policies, &new_cfg.policies);
        assert!(m.sla_met(0, 1), "video met");
        assert!(!m.sla_met(1, 1), "voip still avoids b");
        assert!(m.sla_met(2, 1), "a new policy starts met");
    }
}
