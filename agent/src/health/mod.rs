//! Health: the per-uplink decision from link events and probe rounds to a state (up,
//! degraded, down, held), with flap dampening. Pure: time comes in as an argument.

pub mod passive;
pub mod probe;
pub mod stats;

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::config::{FailoverConfig, HealthConfig};
use stats::Stats;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UplinkState {
    Up,
    /// Carries its clients, but new clients avoid it (loss or RTT above the limits).
    Degraded,
    Down,
    /// Down because it flapped too often; stays down until the hold expires.
    Held,
}

impl UplinkState {
    /// Whether the uplink may carry traffic.
    pub fn usable(self) -> bool {
        matches!(self, UplinkState::Up | UplinkState::Degraded)
    }
}

impl fmt::Display for UplinkState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UplinkState::Up => "up",
            UplinkState::Degraded => "degraded",
            UplinkState::Down => "down",
            UplinkState::Held => "held",
        })
    }
}

/// Why the link layer says an uplink cannot carry traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkProblem {
    Missing,
    AdminDown,
    NoCarrier,
    NoAddress,
    /// `gateway = "auto"` and no default route on the interface yet.
    NoGateway,
}

impl fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkProblem::Missing => "interface missing",
            LinkProblem::AdminDown => "interface admin down",
            LinkProblem::NoCarrier => "carrier lost",
            LinkProblem::NoAddress => "no address on interface",
            LinkProblem::NoGateway => {
                "no gateway yet (waiting for DHCP, or a default route on the interface)"
            }
        })
    }
}

/// A state change with its cause, for the event log.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: UplinkState,
    pub to: UplinkState,
    pub cause: String,
}

/// Result of one probe round: per target, the RTT or `None` when lost.
#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    pub rtts: Vec<Option<Duration>>,
    pub quorum: usize,
    /// Passive evidence: the uplink forwarded traffic from the internet to clients during
    /// the round. Probers never know it; the agent fills it in for failed rounds.
    pub forwarding: bool,
    /// A burst sent because LAN traffic went unanswered (passive evidence of failure):
    /// failed, it takes the uplink down at once; answered, it is a good round.
    pub burst: bool,
    /// Per target, why it failed when its answer said so ("captive portal: HTTP 302 to
    /// …", "DNS SERVFAIL"); `None` for an answer or a plain loss. Empty: none said.
    pub why: Vec<Option<String>>,
    /// The targets, as configured (`icmp:…`, `http://…`), in the same order.
    pub targets: std::sync::Arc<Vec<String>>,
}

impl Round {
    pub fn ok(&self) -> bool {
        self.rtts.iter().filter(|r| r.is_some()).count() >= self.quorum
    }

    /// The first reason a target's answer gave for failing.
    pub fn reason(&self) -> Option<&str> {
        self.why.iter().flatten().next().map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Health {
    state: UplinkState,
    link: Result<(), LinkProblem>,
    probing: bool,
    /// The probes' verdict: false after `down_after` failed rounds, true again after
    /// `up_after` good ones.
    probes_ok: bool,
    fails: u32,
    goods: u32,
    pub stats: Stats,
    flaps: VecDeque<Instant>,
    held_until: Option<Instant>,
    pub since: Instant,
    /// The first evaluation sets the state without a transition: a start is not a flap.
    settled: bool,
    /// Failed rounds in a row that passive evidence excused; capped by
    /// `health.passive_max_rounds` so that evidence cannot keep a dead path up forever.
    excused: u32,
    /// What the last failed round's answers said was wrong (a portal, a DNS error).
    failure: Option<String>,
    /// The last failed round was a burst (passive evidence of failure, confirmed).
    burst_failed: bool,
    /// Down on passive evidence alone (no probes) until then, and why.
    silenced: Option<(Instant, String)>,
    /// `down_after` rounds failed without saying why: a burst is to confirm the loss
    /// before the uplink goes down (random loss rarely takes a whole burst too).
    confirming: bool,
    /// Per target, the last round's outcome: its RTT, or why it failed (`None`: lost).
    pub last: Vec<(String, Result<Duration, Option<String>>)>,
}

/// How long an uplink without probes stays down on passive evidence before its clients
/// try it again (a path that is still dead takes it down again; repeated downs hold it,
/// `failover.max_flaps`).
pub const SILENCED_FOR: Duration = Duration::from_secs(30);

/// Why a failed burst took an uplink down: it confirmed `rounds` failed probe rounds, or
/// (none) LAN traffic that went unanswered.
fn burst_failure(reason: Option<&str>, rounds: Option<u32>, h: &HealthConfig) -> String {
    let why = match rounds {
        Some(n) => format!("{n} failed probe rounds, and a probe burst failed too"),
        None => format!(
            "LAN traffic unanswered for {} and a probe burst failed",
            humantime::format_duration(h.passive_window)
        ),
    };
    match reason {
        Some(r) => format!("{why}: {r}"),
        None => why,
    }
}

impl Health {
    /// Starts optimistic: an uplink whose link is fine is up until probes say otherwise,
    /// so a restart does not move anyone.
    pub fn new(probing: bool, stats_window: usize, now: Instant) -> Health {
        Health {
            state: UplinkState::Down,
            link: Err(LinkProblem::Missing),
            probing,
            probes_ok: true,
            fails: 0,
            goods: 0,
            stats: Stats::new(stats_window),
            flaps: VecDeque::new(),
            held_until: None,
            since: now,
            settled: false,
            excused: 0,
            failure: None,
            burst_failed: false,
            confirming: false,
            silenced: None,
            last: Vec::new(),
        }
    }

    /// The uplink was down when the agent last saved its state: after a restart it stays
    /// down until `up_after` good probe rounds bring it back, instead of starting
    /// optimistic and pulling its clients back onto a path that was dead. Without probes
    /// the link layer is the only judge, so nothing changes.
    pub fn start_down(&mut self) {
        if self.probing {
            self.probes_ok = false;
            self.goods = 0;
        }
    }

    pub fn state(&self) -> UplinkState {
        self.state
    }

    /// A reload changed the uplink's probe settings: probes added or removed, the stats
    /// window, the thresholds in `h`. The verdict is taken again under the new settings;
    /// without probes, only the link judges (a probe verdict of the old config would hold
    /// the uplink down with nothing left to lift it).
    pub fn reconfigure(
        &mut self,
        probing: bool,
        stats_window: usize,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        let was = self.probing;
        self.probing = probing;
        self.stats.resize(stats_window);
        if was && !probing {
            self.probes_ok = true;
            self.fails = 0;
            self.goods = 0;
            self.excused = 0;
            self.confirming = false;
        }
        if probing {
            self.silenced = None;
        }
        let cause = match (was, probing) {
            (true, false) => "probes removed by a reload; the link alone judges it",
            (false, true) => "probes added by a reload",
            _ => "health settings changed by a reload",
        };
        self.evaluate(now, cause.to_string(), h, f)
    }

    pub fn probing(&self) -> bool {
        self.probing
    }

    /// Failed rounds would take the uplink down: a burst is to confirm them.
    pub fn confirming(&self) -> bool {
        self.confirming && self.probes_ok
    }

    /// The probes answer now: the latest round was good. While rounds fail, the window's
    /// RTT and jitter describe a path that no longer answers.
    pub fn answering(&self) -> bool {
        self.probing && self.fails == 0
    }

    /// A flap hold saved before a restart goes on for `left`.
    pub fn hold_for(&mut self, left: std::time::Duration, now: Instant) {
        self.held_until = Some(now + left);
    }

    /// Why the uplink carries no traffic, in words; `None` while it may.
    pub fn down_reason(&self) -> Option<String> {
        if self.state.usable() {
            None
        } else if self.held_until.is_some() {
            Some("held down: it changed state too often (failover.max_flaps)".to_string())
        } else if let Err(p) = self.link {
            Some(p.to_string())
        } else if let Some((_, why)) = &self.silenced {
            Some(why.clone())
        } else if self.goods > 0 {
            Some(format!(
                "{} good probe rounds; waiting for health.up_after",
                self.goods
            ))
        } else {
            match &self.failure {
                Some(why) if self.burst_failed => Some(why.clone()),
                Some(why) => Some(format!("{why} ({} failed probe rounds)", self.fails)),
                None => Some(format!("{} failed probe rounds", self.fails)),
            }
        }
    }

    /// The link layer changed (exists, admin up, carrier, address).
    pub fn on_link(
        &mut self,
        link: Result<(), LinkProblem>,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        if link == self.link && self.settled {
            return None;
        }
        let was_ok = self.link.is_ok();
        self.link = link;
        // No prober runs while an `auto` gateway is unknown: the probes must confirm the
        // path once one is learned, also when the agent started without one.
        let unprobed = link == Err(LinkProblem::NoGateway);
        if (was_ok || unprobed) && link.is_err() && self.probing {
            // After the link returns, probes must confirm it before it carries traffic:
            // a link that is up is not yet a path that works.
            self.probes_ok = false;
            self.goods = 0;
            self.confirming = false;
        }
        let cause = match link {
            Err(p) => p.to_string(),
            Ok(()) if self.probing && !self.probes_ok => {
                "link back; waiting for probes".to_string()
            }
            Ok(()) => "link up".to_string(),
        };
        self.evaluate(now, cause, h, f)
    }

    /// A probe round finished.
    pub fn on_round(
        &mut self,
        round: &Round,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        for rtt in &round.rtts {
            self.stats.push(*rtt);
        }
        self.last = round
            .rtts
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let name = round.targets.get(i).cloned().unwrap_or_default();
                (name, r.ok_or_else(|| round.why.get(i).cloned().flatten()))
            })
            .collect();
        // An answer that says the path is wrong (a portal's redirect) is not a reply lost
        // on a busy link: traffic that flows excuses only the latter.
        let excuse = round.forwarding
            && !round.burst
            && self.excused < h.passive_max_rounds
            && round.reason().is_none();
        let cause = if round.ok() {
            self.failure = None;
            self.burst_failed = false;
            self.confirming = false;
            self.goods += 1;
            self.fails = 0;
            self.excused = 0;
            if !self.probes_ok && self.goods >= h.up_after {
                self.probes_ok = true;
            }
            format!("{} good probe rounds", self.goods)
        } else if excuse {
            // The answers were lost while the uplink visibly carries replies to its own
            // flows: a saturated link dropping probe replies, not a dead one. The loss
            // still counts for `max_loss`; the round does not count toward `down_after`.
            self.goods = 0;
            self.excused += 1;
            format!(
                "probe round lost while traffic flows ({} failed)",
                self.fails
            )
        } else {
            // A failed burst confirms what the traffic (or the failed rounds) showed: it
            // counts as all of `down_after` at once.
            let confirmed_rounds = self.confirming.then_some(self.fails);
            self.fails = if round.burst {
                self.fails.max(h.down_after)
            } else {
                self.fails + 1
            };
            self.goods = 0;
            self.failure = if round.burst {
                Some(burst_failure(round.reason(), confirmed_rounds, h))
            } else {
                round.reason().map(str::to_string)
            };
            self.burst_failed = round.burst;
            // Plain losses wait for a burst to confirm them, unless no burst comes back
            // within as many rounds again (a prober restarted meanwhile).
            let confirmed = round.burst
                || self.failure.is_some()
                || self.fails >= h.down_after.saturating_mul(2);
            if self.probes_ok && self.fails >= h.down_after {
                if confirmed {
                    self.probes_ok = false;
                    self.confirming = false;
                } else {
                    self.confirming = true;
                }
            }
            if let Some(why) = self.failure.as_ref().filter(|_| round.burst) {
                why.clone()
            } else if let Some(why) = &self.failure {
                format!("{why} ({} failed probe rounds)", self.fails)
            } else if round.forwarding {
                format!(
                    "{} failed probe rounds (traffic still flows, but {} rounds in a row were already excused: health.passive_max_rounds)",
                    self.fails, self.excused
                )
            } else {
                format!("{} failed probe rounds", self.fails)
            }
        };
        self.evaluate(now, cause, h, f)
    }

    /// LAN traffic to `destinations` destinations went unanswered for the passive window.
    /// An uplink without probes (none to send a burst) goes down on that alone when they
    /// are at least `passive_min_destinations` (one dead server is not a dead path), and
    /// is tried again `SILENCED_FOR` later.
    pub fn on_silence(
        &mut self,
        destinations: usize,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        if self.probing
            || !self.state.usable()
            || destinations < h.passive_min_destinations as usize
        {
            return None;
        }
        let why = format!(
            "LAN traffic to {destinations} destinations unanswered for {} (no probes to confirm it); tried again in {}",
            humantime::format_duration(h.passive_window),
            humantime::format_duration(SILENCED_FOR)
        );
        self.silenced = Some((now + SILENCED_FOR, why.clone()));
        self.evaluate(now, why, h, f)
    }

    /// Time passed: a hold, or a passive verdict, may have expired.
    pub fn on_tick(
        &mut self,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        if self
            .silenced
            .as_ref()
            .is_some_and(|(until, _)| now >= *until)
        {
            self.silenced = None;
            return self.evaluate(
                now,
                "tried again after its LAN traffic went unanswered".to_string(),
                h,
                f,
            );
        }
        match self.held_until {
            Some(t) if now >= t => {
                self.held_until = None;
                self.flaps.clear();
                self.evaluate(now, "hold expired".to_string(), h, f)
            }
            _ => None,
        }
    }

    fn evaluate(
        &mut self,
        now: Instant,
        cause: String,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Option<Transition> {
        let mut target = if self.held_until.is_some() {
            UplinkState::Held
        } else if self.link.is_err() || !self.probes_ok || self.silenced.is_some() {
            UplinkState::Down
        } else {
            UplinkState::Up
        };
        let mut cause = cause;
        if target == UplinkState::Up
            && let Some(reason) = self.degraded(h)
        {
            target = UplinkState::Degraded;
            cause = reason;
        }
        if !self.settled {
            self.settled = true;
            self.state = target;
            self.since = now;
            return None;
        }
        if target == self.state {
            return None;
        }
        if self.state.usable() != target.usable() && target != UplinkState::Held {
            while self
                .flaps
                .front()
                .is_some_and(|t| now.duration_since(*t) > f.window)
            {
                self.flaps.pop_front();
            }
            self.flaps.push_back(now);
            if self.flaps.len() > f.max_flaps as usize {
                self.held_until = Some(now + f.hold);
                target = UplinkState::Held;
                cause = format!(
                    "{} state changes within {}; held down for {}",
                    self.flaps.len(),
                    humantime::format_duration(f.window),
                    humantime::format_duration(f.hold)
                );
            }
        }
        let t = Transition {
            from: self.state,
            to: target,
            cause,
        };
        self.state = target;
        self.since = now;
        Some(t)
    }

    fn degraded(&self, h: &HealthConfig) -> Option<String> {
        // A handful of samples is not a measurement, and the first rounds after a start
        // include neighbour discovery on a fresh link.
        if !self.probing || self.stats.samples() < (self.stats.window() / 2).max(10) {
            return None;
        }
        if let Some(max) = h.max_loss
            && self.stats.loss() > max
        {
            return Some(format!(
                "loss {:.0}% above {:.0}%",
                self.stats.loss() * 100.0,
                max * 100.0
            ));
        }
        if let (Some(max), Some(rtt)) = (h.max_rtt, self.stats.median_rtt())
            && rtt > max
        {
            return Some(format!("median RTT {rtt:?} above {max:?}"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Failback;

    fn cfg() -> (HealthConfig, FailoverConfig) {
        (
            HealthConfig {
                interval: Duration::from_millis(200),
                timeout: Duration::from_millis(600),
                down_after: 3,
                up_after: 5,
                max_loss: Some(0.2),
                max_rtt: None,
                stats_window: 50,
                passive: true,
                passive_max_rounds: 50,
                passive_window: Duration::from_millis(150),
                burst_count: 3,
                burst_interval: Duration::from_millis(20),
                passive_min_destinations: 3,
                standby_interval: Duration::from_secs(5),
            },
            FailoverConfig {
                failback_flows: crate::config::FailbackFlows::Keep,
                failback: Failback::Auto,
                failback_delay: Duration::from_secs(30),
                max_flaps: 5,
                window: Duration::from_secs(300),
                hold: Duration::from_secs(300),
            },
        )
    }

    fn round(ok: bool) -> Round {
        Round {
            rtts: vec![ok.then_some(Duration::from_millis(5))],
            quorum: 1,
            forwarding: false,
            burst: false,
            why: Vec::new(),
            targets: Default::default(),
        }
    }

    /// Four good rounds change nothing; the fifth (`up_after`) brings the uplink up.
    fn up_after_good_rounds(x: &mut Health, t0: Instant, h: &HealthConfig, f: &FailoverConfig) {
        for _ in 0..4 {
            assert!(x.on_round(&round(true), t0, h, f).is_none());
        }
        assert_eq!(
            x.on_round(&round(true), t0, h, f).unwrap().to,
            UplinkState::Up
        );
    }

    fn burst(ok: bool) -> Round {
        Round {
            burst: true,
            ..round(ok)
        }
    }

    #[test]
    fn link_events_decide_at_once() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(false, 50, t0);
        assert!(
            x.on_link(Ok(()), t0, &h, &f).is_none(),
            "the first evaluation is no transition"
        );
        assert_eq!(x.state(), UplinkState::Up);
        let t = x.on_link(Err(LinkProblem::NoCarrier), t0, &h, &f).unwrap();
        assert_eq!(
            (t.to, t.cause.as_str()),
            (UplinkState::Down, "carrier lost")
        );
    }

    #[test]
    fn a_gateway_learned_after_start_waits_for_the_probes() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Err(LinkProblem::NoGateway), t0, &h, &f);
        assert_eq!(
            x.down_reason().as_deref(),
            Some("no gateway yet (waiting for DHCP, or a default route on the interface)")
        );
        // The lease: the link is fine, but no prober ran without a route.
        assert!(x.on_link(Ok(()), t0, &h, &f).is_none());
        assert_eq!(x.state(), UplinkState::Down);
        up_after_good_rounds(&mut x, t0, &h, &f);
    }

    #[test]
    fn a_reload_that_removes_the_probes_lifts_their_verdict() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        for _ in 0..3 {
            x.on_round(&round(false), t0, &h, &f);
        }
        x.on_round(&burst(false), t0, &h, &f);
        assert_eq!(x.state(), UplinkState::Down);
        // The same probes: the verdict stands.
        assert!(x.reconfigure(true, 50, t0, &h, &f).is_none());
        assert_eq!(x.state(), UplinkState::Down);
        let t = x.reconfigure(false, 50, t0, &h, &f).expect("a transition");
        assert_eq!(
            (t.to, t.cause.as_str()),
            (
                UplinkState::Up,
                "probes removed by a reload; the link alone judges it"
            )
        );
        // And the link still does.
        assert_eq!(
            x.on_link(Err(LinkProblem::NoCarrier), t0, &h, &f)
                .unwrap()
                .to,
            UplinkState::Down
        );
    }

    #[test]
    fn probes_take_down_after_and_up_after_rounds() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        assert_eq!(x.state(), UplinkState::Up);
        // down_after lost rounds ask for a burst; one answered clears them (random loss).
        for _ in 0..3 {
            assert!(x.on_round(&round(false), t0, &h, &f).is_none());
        }
        assert!(x.confirming());
        assert!(x.on_round(&burst(true), t0, &h, &f).is_none());
        assert!(!x.confirming());
        assert_eq!(x.state(), UplinkState::Up);
        // A failed burst confirms them.
        for _ in 0..3 {
            assert!(x.on_round(&round(false), t0, &h, &f).is_none());
        }
        let t = x.on_round(&burst(false), t0, &h, &f).unwrap();
        assert_eq!(t.to, UplinkState::Down);
        let why = "3 failed probe rounds, and a probe burst failed too";
        assert_eq!(
            (t.cause.as_str(), x.down_reason().as_deref()),
            (why, Some(why))
        );
        up_after_good_rounds(&mut x, t0, &h, &f);
        // No burst comes back (its prober restarted): down after down_after more rounds.
        let t = (0..6).find_map(|_| x.on_round(&round(false), t0, &h, &f));
        assert_eq!(
            t.map(|t| t.cause),
            Some("6 failed probe rounds".to_string())
        );
    }

    #[test]
    fn a_portal_answer_is_not_excused_by_traffic_and_names_the_down_reason() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        let portal = Round {
            rtts: vec![None],
            quorum: 1,
            // A portal answers the clients' traffic too: that must not excuse it.
            forwarding: true,
            burst: false,
            why: vec![Some(
                "captive portal: HTTP 302 to http://portal.example/".into(),
            )],
            targets: std::sync::Arc::new(vec!["http://203.0.113.80/".into()]),
        };
        let mut to = None;
        for _ in 0..3 {
            to = x.on_round(&portal, t0, &h, &f).map(|t| t.to).or(to);
        }
        assert_eq!(to, Some(UplinkState::Down));
        let why = x.down_reason().unwrap();
        assert!(
            why.starts_with("captive portal: HTTP 302 to http://portal.example/"),
            "{why}"
        );
        assert_eq!(
            x.last,
            [(
                "http://203.0.113.80/".to_string(),
                Err(Some(
                    "captive portal: HTTP 302 to http://portal.example/".into()
                ))
            )]
        );
    }

    #[test]
    fn a_failed_burst_takes_the_uplink_down_at_once_and_an_answered_one_changes_nothing() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        let burst = |ok: bool| Round {
            burst: true,
            // Whatever the counters say: the burst answers for traffic that went unanswered.
            forwarding: true,
            ..round(ok)
        };
        // One dead server: the burst is answered, the uplink stays up.
        assert!(x.on_round(&burst(true), t0, &h, &f).is_none());
        assert_eq!(x.state(), UplinkState::Up);
        // One failed round before: the burst still needs no more than itself.
        assert!(x.on_round(&round(false), t0, &h, &f).is_none());
        let t = x.on_round(&burst(false), t0, &h, &f).unwrap();
        assert_eq!(t.to, UplinkState::Down);
        let why = "LAN traffic unanswered for 150ms and a probe burst failed";
        assert_eq!(t.cause, why);
        assert_eq!(x.down_reason().as_deref(), Some(why));
        // Back only after up_after good rounds, as after any down.
        up_after_good_rounds(&mut x, t0, &h, &f);
    }

    #[test]
    fn without_probes_enough_unanswered_destinations_take_the_uplink_down_for_a_while() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(false, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        assert!(
            x.on_silence(2, t0, &h, &f).is_none(),
            "two: a server or two"
        );
        assert_eq!(x.state(), UplinkState::Up);
        let t = x.on_silence(3, t0, &h, &f).unwrap();
        assert_eq!(t.to, UplinkState::Down);
        assert!(
            t.cause
                .starts_with("LAN traffic to 3 destinations unanswered for 150ms")
        );
        assert_eq!(x.down_reason(), Some(t.cause));
        assert!(x.on_tick(t0 + Duration::from_secs(29), &h, &f).is_none());
        let t = x.on_tick(t0 + SILENCED_FOR, &h, &f).unwrap();
        assert_eq!(t.to, UplinkState::Up);
        // With probes, the burst decides instead.
        let mut p = Health::new(true, 50, t0);
        p.on_link(Ok(()), t0, &h, &f);
        assert!(p.on_silence(10, t0, &h, &f).is_none());
    }

    #[test]
    fn returning_link_waits_for_probes() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        x.on_link(Err(LinkProblem::NoCarrier), t0, &h, &f);
        assert!(
            x.on_link(Ok(()), t0, &h, &f).is_none(),
            "still down until probes confirm"
        );
        for _ in 0..5 {
            x.on_round(&round(true), t0, &h, &f);
        }
        assert_eq!(x.state(), UplinkState::Up);
    }

    #[test]
    fn lost_rounds_while_traffic_flows_do_not_take_an_uplink_down() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        for _ in 0..5 {
            x.on_round(&round(true), t0, &h, &f);
        }
        assert_eq!(x.state(), UplinkState::Up);
        let busy = Round {
            forwarding: true,
            burst: false,
            why: Vec::new(),
            targets: Default::default(),
            ..round(false)
        };
        // One lost round before traffic was seen, then many while it flows.
        x.on_round(&round(false), t0, &h, &f);
        // Enough samples for a loss measurement (half the window).
        for _ in 0..20 {
            x.on_round(&busy, t0, &h, &f);
        }
        assert_ne!(x.state(), UplinkState::Down, "a busy uplink stays up");
        // The loss still counts: above max_loss the uplink is degraded, not down.
        assert_eq!(x.state(), UplinkState::Degraded);
        // Silence: the failed rounds add up to down_after, including the one before, and
        // a burst confirms them.
        for _ in 0..2 {
            assert_eq!(x.on_round(&round(false), t0, &h, &f), None);
        }
        assert!(x.confirming());
        let t = x.on_round(&burst(false), t0, &h, &f);
        assert_eq!(t.map(|t| t.to), Some(UplinkState::Down));
    }

    #[test]
    fn passive_evidence_excuses_a_bounded_run_of_rounds() {
        let (mut h, f) = cfg();
        h.passive_max_rounds = 4;
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        let busy = Round {
            forwarding: true,
            burst: false,
            why: Vec::new(),
            targets: Default::default(),
            ..round(false)
        };
        for _ in 0..4 {
            assert_eq!(x.on_round(&busy, t0, &h, &f), None, "excused");
        }
        // Inbound traffic keeps coming, but the path never answers a probe: down after
        // down_after more rounds and a failed burst.
        for _ in 0..3 {
            assert_eq!(x.on_round(&busy, t0, &h, &f), None);
        }
        let t = x.on_round(&burst(false), t0, &h, &f);
        assert_eq!(t.map(|t| t.to), Some(UplinkState::Down));
    }

    #[test]
    fn an_uplink_saved_down_starts_down_until_probes_confirm_it() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.start_down();
        x.on_link(Ok(()), t0, &h, &f);
        assert_eq!(x.state(), UplinkState::Down);
        let t = (0..5).find_map(|_| x.on_round(&round(true), t0, &h, &f));
        assert_eq!(t.map(|t| t.to), Some(UplinkState::Up));
    }

    #[test]
    fn quorum_counts_answers() {
        let r = Round {
            rtts: vec![Some(Duration::from_millis(1)), None, None],
            quorum: 2,
            forwarding: false,
            burst: false,
            why: Vec::new(),
            targets: Default::default(),
        };
        assert!(!r.ok());
        let r = Round {
            rtts: vec![
                Some(Duration::from_millis(1)),
                None,
                Some(Duration::from_millis(1)),
            ],
            quorum: 2,
            forwarding: false,
            burst: false,
            why: Vec::new(),
            targets: Default::default(),
        };
        assert!(r.ok());
    }

    #[test]
    fn loss_degrades() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(true, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        // 2 of 5 lost: 40% > 20%, but never 3 in a row, so not down.
        let mut last = None;
        for i in 0..40 {
            if let Some(t) = x.on_round(&round(i % 5 >= 2), t0, &h, &f) {
                last = Some(t);
            }
        }
        assert_eq!(last.unwrap().to, UplinkState::Degraded);
    }

    #[test]
    fn flapping_is_held_then_released() {
        let (h, f) = cfg();
        let t0 = Instant::now();
        let mut x = Health::new(false, 50, t0);
        x.on_link(Ok(()), t0, &h, &f);
        let mut t = t0;
        let mut held = false;
        for _ in 0..4 {
            t += Duration::from_secs(1);
            held |= x
                .on_link(Err(LinkProblem::NoCarrier), t, &h, &f)
                .is_some_and(|t| t.to == UplinkState::Held);
            held |= x
                .on_link(Ok(()), t, &h, &f)
                .is_some_and(|t| t.to == UplinkState::Held);
        }
        assert!(held, "more than 5 changes in the window hold the uplink");
        assert_eq!(x.state(), UplinkState::Held);
        assert!(x.on_tick(t + Duration::from_secs(290), &h, &f).is_none());
        assert_eq!(
            x.on_tick(t + Duration::from_secs(301), &h, &f).unwrap().to,
            UplinkState::Up
        );
    }
}
