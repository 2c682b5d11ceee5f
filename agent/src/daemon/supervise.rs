//! The health supervision owner: one prober per uplink, started, restarted and stopped
//! as the uplinks' addresses and next hops change; a failed round of a usable uplink
//! first has the uplink's reply counters read beside the loop (passive evidence of life,
//! judged by `health::passive`). A watcher beside the loop reads the same counters
//! several times per `health.passive_window` and reports interfaces whose LAN traffic
//! goes unanswered (passive evidence of failure); their uplinks' probers send a burst. The
//! verdict on each round is the model's.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::config::Config;
use crate::dataplane::nft;
use crate::health::passive::{Forwarded, Silence};
use crate::health::probe::{self, ProbeSpec};
use crate::metrics::HealthMetrics;
use crate::model::Model;
use crate::model::nexthop::Hop;

/// A failed probe round with the uplink's reply counters (IPv4, IPv6) read beside the
/// loop.
pub(super) struct PassiveReading {
    generation: u64,
    report: probe::Report,
    replies: Option<(u64, u64)>,
}

/// A running prober: what it probes, its task, its pace, and where to ask for a burst.
struct Prober {
    spec: ProbeSpec,
    task: JoinHandle<()>,
    pace: watch::Sender<Duration>,
    burst: mpsc::Sender<Duration>,
    /// A burst was asked for and its round has not come back.
    bursting: bool,
}

/// An interface whose LAN traffic went unanswered for `health.passive_window`, and for
/// how long it has been.
pub(super) struct Suspect {
    pub interface: String,
    pub silent_for: Duration,
}

/// An uplink without probes whose interface went silent: how many destinations its LAN
/// traffic went to meanwhile, unanswered.
pub(super) struct Silent {
    generation: u64,
    pub uplink: usize,
    pub destinations: usize,
}

/// After a suspicion, the same silence is suspected again this much later at the
/// earliest (a client sending to one dead server keeps its interface unanswered).
const SUSPECT_AGAIN: Duration = Duration::from_secs(1);

/// Watches the uplink interfaces' counters while `window` holds a passive window (none:
/// passive health is off), and sends each suspicion. A thread of its own with a netlink
/// socket kept open; it reads five times a window while LAN packets leave, once a window
/// while none do. It ends when `window` or `tx` is dropped.
fn watch_silence(
    mut reader: nft::TrafficReader,
    mut window: watch::Receiver<Option<Duration>>,
    tx: mpsc::Sender<Suspect>,
) {
    let runtime = tokio::runtime::Handle::current();
    let run = move || {
        let mut judged: Option<(Duration, Silence)> = None;
        let mut failing = false;
        loop {
            let Some(w) = *window.borrow_and_update() else {
                judged = None;
                // Off until the supervisor sets a window; gone with the supervisor.
                if runtime.block_on(window.changed()).is_err() {
                    return;
                }
                continue;
            };
            if window.has_changed().is_err() {
                return;
            }
            // A new window starts a new judgement.
            if judged.as_ref().is_none_or(|(was, _)| *was != w) {
                judged = Some((w, Silence::new(w, SUSPECT_AGAIN)));
            }
            let silence = &mut judged.as_mut().expect("set above").1;
            std::thread::sleep(silence.next_reading());
            let traffic = match reader.read() {
                Ok(t) => t,
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        warn!(error = %e, "cannot read the traffic counters for passive health; probes alone judge the uplinks until they can be read");
                    }
                    continue;
                }
            };
            failing = false;
            let now = Instant::now();
            for (interface, t) in &traffic {
                if let Some(silent_for) =
                    silence.reading(interface, t.tx.0, t.replies.0 + t.replies.1, now)
                    && tx
                        .blocking_send(Suspect {
                            interface: interface.clone(),
                            silent_for,
                        })
                        .is_err()
                {
                    return;
                }
            }
            let names: Vec<&str> = traffic.keys().map(String::as_str).collect();
            silence.retain(&names);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("silence".into())
        .spawn(run)
    {
        warn!(error = %e, "cannot start the passive-health watcher; probes alone judge the uplinks");
    }
}

pub(super) struct Supervisor {
    probers: HashMap<usize, Prober>,
    probe_tx: mpsc::Sender<probe::Report>,
    /// Probes start once the first apply has put the uplinks' rules and routes in place;
    /// before that they would fail and take healthy uplinks down.
    pub probing: bool,
    /// The reply counters at each uplink's last failed probe round.
    forwarded: Forwarded,
    /// Reads nft counters beside the loop.
    counters: nft::Counters,
    passive_tx: mpsc::Sender<PassiveReading>,
    /// The silence watcher's passive window; `None` stops it.
    silence: watch::Sender<Option<Duration>>,
    silent_tx: mpsc::Sender<Silent>,
    metrics: HealthMetrics,
}

impl Supervisor {
    pub fn new(
        probe_tx: mpsc::Sender<probe::Report>,
        passive_tx: mpsc::Sender<PassiveReading>,
        suspect_tx: mpsc::Sender<Suspect>,
        silent_tx: mpsc::Sender<Silent>,
        counters: nft::Counters,
        metrics: HealthMetrics,
    ) -> Supervisor {
        let (silence, window) = watch::channel(None);
        watch_silence(counters.traffic_reader(), window, suspect_tx);
        Supervisor {
            probers: HashMap::new(),
            probe_tx,
            probing: false,
            forwarded: Forwarded::default(),
            counters,
            passive_tx,
            silence,
            silent_tx,
            metrics,
        }
    }

    /// Starts, restarts or stops each uplink's prober to match what it should probe now.
    pub fn reconcile(&mut self, config: &Config, model: &Model) {
        if !self.probing {
            return;
        }
        for i in 0..config.uplinks.len().min(model.uplinks.len()) {
            let want = wanted_spec(config, model, i);
            if self.probers.get(&i).map(|p| &p.spec) == want.as_ref() {
                continue;
            }
            if let Some(p) = self.probers.remove(&i) {
                p.task.abort();
            }
            if let Some(spec) = want {
                let (pace, paced) = watch::channel(crate::plan::probe_interval(config, model, i));
                let (burst, bursts) = mpsc::channel(1);
                let task = probe::spawn(spec.clone(), paced, bursts, self.probe_tx.clone());
                self.probers.insert(
                    i,
                    Prober {
                        spec,
                        task,
                        pace,
                        burst,
                        bursting: false,
                    },
                );
            }
        }
        // Suspicion leads to a burst, or to counting the destinations of an uplink
        // without probes: with neither there is nothing to watch for.
        let watched = !self.probers.is_empty() || !crate::plan::silent_dests(config).is_empty();
        let window = (config.health.passive && watched).then_some(config.health.passive_window);
        self.silence
            .send_if_modified(|now| std::mem::replace(now, window) != window);
        self.pace(config, model);
    }

    /// Sets each prober's pace from what its uplink carries now; a metered uplink that
    /// starts to carry clients (its own, or a failed uplink's) is probed at the normal
    /// interval from its next round, which starts at once.
    pub fn pace(&self, config: &Config, model: &Model) {
        for (&i, p) in &self.probers {
            if i < config.uplinks.len().min(model.uplinks.len()) {
                let want = crate::plan::probe_interval(config, model, i);
                p.pace
                    .send_if_modified(|now| std::mem::replace(now, want) != want);
            }
        }
    }

    /// Stops every prober and forgets the readings: uplink indices are about to change
    /// (a reload), or the agent stops.
    pub fn stop_all(&mut self) {
        self.forwarded = Forwarded::default();
        self.silence.send_replace(None);
        for (_, p) in self.probers.drain() {
            p.task.abort();
        }
    }

    /// LAN traffic through an interface went unanswered: each usable uplink on it with
    /// probes sends a burst, unless one is on its way; each one without probes has its
    /// unanswered destinations counted beside the loop (they come back as `Silent`).
    /// Returns the uplinks that burst.
    pub fn on_suspect(
        &mut self,
        suspect: &Suspect,
        config: &Config,
        model: &Model,
        generation: u64,
    ) -> Vec<usize> {
        let interface = suspect.interface.as_str();
        for (i, u) in config.uplinks.iter().enumerate() {
            let Some(m) = model.uplinks.get(i) else {
                continue;
            };
            let Some(ifindex) = m.link.ifindex else {
                continue;
            };
            if u.interface != interface || !u.probes.is_empty() || !m.usable() {
                continue;
            }
            let (reader, tx) = (self.counters.clone(), self.silent_tx.clone());
            let within = suspect.silent_for;
            tokio::spawn(async move {
                match reader.destinations(ifindex, within).await {
                    Ok(destinations) => {
                        let _ = tx
                            .send(Silent {
                                generation,
                                uplink: i,
                                destinations,
                            })
                            .await;
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot read the destinations for passive health")
                    }
                }
            });
        }
        let on: Vec<usize> = self
            .probers
            .keys()
            .copied()
            .filter(|&i| {
                config
                    .uplinks
                    .get(i)
                    .is_some_and(|u| u.interface == interface)
            })
            .collect();
        on.into_iter()
            .filter(|&i| self.burst(i, config, model))
            .collect()
    }

    /// The count of an uplink's unanswered destinations, unless it was started under
    /// another config generation (uplink indices may have changed with a reload).
    pub fn on_silent(&self, s: Silent, generation: u64) -> Option<Silent> {
        (s.generation == generation).then_some(s)
    }

    /// Asks uplink `i`'s prober for a burst, unless one is on its way or the uplink
    /// carries nothing. The last probe of a burst waits for its answer three times the
    /// uplink's median RTT or twice the slowest answer in its window, whichever is longer
    /// (at least 30 ms, at most `health.timeout`): a link whose queue is filling answers
    /// late, not never.
    pub fn burst(&mut self, i: usize, config: &Config, model: &Model) -> bool {
        let (Some(p), Some(m)) = (self.probers.get_mut(&i), model.uplinks.get(i)) else {
            return false;
        };
        if !m.usable() || p.bursting {
            return false;
        }
        let stats = &m.health.stats;
        let wait = (stats.median_rtt().unwrap_or_default() * 3)
            .max(stats.max_rtt().unwrap_or_default() * 2)
            .max(Duration::from_millis(30))
            .min(config.health.timeout);
        p.bursting = p.burst.try_send(wait).is_ok();
        p.bursting
    }

    /// A probe round finished. Returns it when it is to be judged now; a failed round of
    /// a usable uplink (`usable`) with passive health on first has the uplink's reply
    /// counters read beside the loop, and comes back as a `PassiveReading`. A burst's
    /// round is judged at once: the traffic it answers for went unanswered.
    pub fn on_report(
        &mut self,
        report: probe::Report,
        usable: bool,
        config: &Config,
        generation: u64,
    ) -> Option<probe::Report> {
        if report.round.burst
            && let Some(p) = self.probers.get_mut(&report.uplink)
        {
            p.bursting = false;
        }
        if report.round.ok() || report.round.burst || !config.health.passive || !usable {
            return Some(report);
        }
        let (reader, tx) = (self.counters.clone(), self.passive_tx.clone());
        let interface = config.uplinks[report.uplink].interface.clone();
        tokio::spawn(async move {
            let replies = match reader.read(Duration::from_millis(50)).await {
                Ok(t) => Some(t.get(&interface).map_or((0, 0), |t| t.replies)),
                Err(e) => {
                    warn!(error = %e, "cannot read the traffic counters for passive health");
                    None
                }
            };
            let _ = tx
                .send(PassiveReading {
                    generation,
                    report,
                    replies,
                })
                .await;
        });
        None
    }

    /// Passive health for a failed probe round: whether, in every family whose probes
    /// failed, the uplink carried replies to LAN flows since the previous failed round (if
    /// that was recent). Returns the round to judge; `None` for a reading planned under
    /// another config generation (uplink indices may have changed with a reload).
    pub fn on_reading(
        &mut self,
        r: PassiveReading,
        config: &Config,
        generation: u64,
    ) -> Option<probe::Report> {
        if r.generation != generation {
            return None;
        }
        let mut report = r.report;
        if let Some(replies) = r.replies {
            let recent = config.health.timeout.max(2 * config.health.interval);
            // The targets the round probed (IPv6 ones are left out while there is no IPv6
            // router), in the round's order.
            let spec = &self.probers.get(&report.uplink)?.spec;
            let failed: BTreeSet<bool> = spec
                .targets
                .iter()
                .zip(&report.round.rtts)
                .filter(|(_, rtt)| rtt.is_none())
                .map(|(p, _)| p.addr().is_ipv6())
                .collect();
            report.round.forwarding =
                self.forwarded
                    .excuses(report.uplink, &failed, replies, Instant::now(), recent);
        }
        Some(report)
    }

    /// Counts a round in the supervisor's metrics: its RTTs, its traffic, and whether
    /// passive evidence excused it.
    pub fn observe(&self, report: &probe::Report, uplink: &str) {
        if report.round.forwarding {
            self.metrics
                .lost_while_forwarding
                .with_label_values(&[uplink])
                .inc();
        }
        for rtt in report.round.rtts.iter().flatten() {
            self.metrics
                .probe_rtt
                .with_label_values(&[uplink])
                .observe(rtt.as_secs_f64());
        }
        if let Some(p) = self.probers.get(&report.uplink) {
            // A burst sends at most `burst_count` probes per target.
            let sent = if report.round.burst {
                u64::from(p.spec.burst_count)
            } else {
                1
            };
            self.metrics
                .probe_bytes
                .with_label_values(&[uplink])
                .inc_by(sent * probe::round_bytes(&p.spec.targets, &report.round.rtts));
        }
        if report.round.burst {
            let result = if report.round.ok() {
                "answered"
            } else {
                "failed"
            };
            self.metrics
                .bursts
                .with_label_values(&[uplink, result])
                .inc();
        }
    }
}

/// What uplink `i` should be probed with now, if anything.
fn wanted_spec(config: &Config, model: &Model, i: usize) -> Option<ProbeSpec> {
    let (u, m) = (&config.uplinks[i], &model.uplinks[i]);
    // Without an IPv4 next hop (`auto`, nothing learned yet) there is no route to probe
    // through: a socket bound to the device would ARP for the target itself.
    let hops = model.hops(config, i);
    let routed = hops.0 != Hop::Unknown;
    // While the uplink has no IPv6 router (`gateway6 = "auto"` before an advert), its
    // IPv6 probes would only fail: the uplink's IPv4 is judged by its IPv4 probes alone
    // (its IPv6 connections detour meanwhile).
    let mut targets = u.probes.clone();
    if hops.1 == Hop::Unknown && targets.iter().any(|p| p.addr().is_ipv4()) {
        targets.retain(|p| p.addr().is_ipv4());
    }
    let quorum = (u.probe_quorum as usize).min(targets.len());
    (!targets.is_empty() && m.link.ifindex.is_some() && routed).then(|| ProbeSpec {
        uplink: i,
        interface: u.interface.clone(),
        fwmark: config.dataplane.fwmark(u.mark),
        src4: m.addrs.iter().find_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            _ => None,
        }),
        src6: m.addrs.iter().find_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            _ => None,
        }),
        targets,
        expect: u.probe_expect.clone(),
        quorum,
        interval: config.health.interval,
        timeout: config.health.timeout,
        burst_count: config.health.burst_count,
        burst_interval: config.health.burst_interval,
        hops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uplink_is_probed_only_through_a_route_and_only_in_families_it_routes() {
        let text = "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\ngateway6 = \"auto\"\nprobes = [\"icmp:203.0.113.10\", \"icmp:2001:db8::10\"]\n[[uplink]]\nname = \"b\"\ninterface = \"wan1\"\ngateway = \"auto\"\nprobes = [\"icmp:203.0.113.10\"]\n";
        let config = Config::parse(std::path::Path::new("t"), text).unwrap();
        let mut model = Model::new(&config);
        assert_eq!(wanted_spec(&config, &model, 0), None, "no interface yet");
        for m in &mut model.uplinks {
            m.link.ifindex = Some(7);
        }
        let a = wanted_spec(&config, &model, 0).unwrap();
        // No IPv6 router advertised yet: the IPv6 target would only fail.
        assert_eq!(a.targets.len(), 1);
        assert!(a.targets[0].addr().is_ipv4());
        assert_eq!(a.quorum, 1);
        assert_eq!(a.fwmark, config.dataplane.fwmark(config.uplinks[0].mark));
        assert_eq!(
            wanted_spec(&config, &model, 1),
            None,
            "a learned gateway that is not learned yet leaves nothing to probe through"
        );
    }
}
