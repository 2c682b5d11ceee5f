//! Health and failover in the model: link facts and probe rounds become uplink states,
//! state changes become failovers and failbacks, and every one of them is logged.

use std::collections::VecDeque;
use std::fmt;
use std::net::IpAddr;
use std::time::Instant;

use super::{Model, Uplink, now_millis};
use crate::config::{Failback, FailoverConfig, HealthConfig, QuotaAction};
use crate::health::{Health, LinkProblem, Round, Transition, UplinkState};
use crate::usage::{QuotaChange, QuotaLevel};

/// Entries kept in memory; the API streams them.
pub const EVENT_LOG_CAPACITY: usize = 1000;

#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    State {
        from: UplinkState,
        to: UplinkState,
    },
    /// The uplink's clients moved to the surviving uplinks.
    Failover,
    /// The uplink's clients came back to it.
    Failback,
    AllDown,
    Recovered,
    /// Operator actions through the API.
    Override,
    Drain,
    Undrain,
    Reload,
    /// An operator changed a set's elements through the API.
    Set,
    /// A policy's SLA verdict on the uplink changed (`met`: it uses the uplink again).
    Sla {
        policy: String,
        met: bool,
    },
    /// A learned next hop (`gateway = "auto"`) appeared, changed or went away.
    Gateway,
    /// The kernel refused a part of the config (a rule, a set's elements): it is left out.
    Refused,
    /// The uplink's usage crossed 80 % or 100 % of its quota, or fell back under.
    Quota,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    /// Unix milliseconds.
    pub at: u64,
    pub uplink: String,
    pub kind: EventKind,
    pub cause: String,
    pub clients_moved: usize,
}

impl fmt::Display for LogEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            EventKind::State { from, to } => {
                write!(f, "uplink {} {from} -> {to}: {}", self.uplink, self.cause)
            }
            EventKind::Failover => write!(
                f,
                "failover of {}: {} clients moved ({})",
                self.uplink, self.clients_moved, self.cause
            ),
            EventKind::Failback => write!(
                f,
                "failback to {}: {} clients returned ({})",
                self.uplink, self.clients_moved, self.cause
            ),
            EventKind::AllDown => write!(
                f,
                "ALL UPLINKS DOWN: assignments and dataplane kept; waiting for the first to recover"
            ),
            EventKind::Recovered => write!(
                f,
                "uplink {} is the first back after all were down",
                self.uplink
            ),
            EventKind::Override
            | EventKind::Drain
            | EventKind::Undrain
            | EventKind::Reload
            | EventKind::Set
            | EventKind::Sla { .. }
            | EventKind::Gateway
            | EventKind::Refused => write!(f, "{}", self.cause),
            EventKind::Quota => write!(f, "quota of {}: {}", self.uplink, self.cause),
        }
    }
}

/// A bounded in-memory log of state changes, failovers and failbacks.
#[derive(Debug, Clone, Default)]
pub struct EventLog {
    entries: VecDeque<LogEntry>,
}

impl EventLog {
    pub fn push(&mut self, e: LogEntry) {
        if self.entries.len() == EVENT_LOG_CAPACITY {
            self.entries.pop_front();
        }
        self.entries.push_back(e);
    }

    pub fn recent(&self) -> impl Iterator<Item = &LogEntry> {
        self.entries.iter()
    }
}

/// Why a pin was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinRefused {
    UnknownUplink,
    UnknownClient,
}

/// Whether an usable uplink still waits to take its clients back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailbackPending {
    No,
    /// Automatic failback after this long.
    In(std::time::Duration),
    /// `failback = "manual"`: waits for `uplinkctl failback`.
    Manual,
}

impl fmt::Display for FailbackPending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailbackPending::No => Ok(()),
            FailbackPending::In(d) => write!(f, "failback in {}s", d.as_secs_f64().ceil() as u64),
            FailbackPending::Manual => f.write_str("failback waits for the operator"),
        }
    }
}

/// Where the clients homed on an uplink go now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeTarget {
    /// To the uplink itself.
    Direct,
    /// Spread over other uplinks (indices), by weight.
    Spread(Vec<usize>),
    /// Nowhere: the uplink is over its quota with `quota_action = "stop"` and no other can
    /// carry its clients. Their new connections are dropped.
    Blocked,
}

impl HomeTarget {
    pub fn is_direct(&self) -> bool {
        *self == HomeTarget::Direct
    }
}

impl Uplink {
    /// What the link layer says.
    pub fn link_problem(&self) -> Result<(), LinkProblem> {
        if self.link.ifindex.is_none() {
            Err(LinkProblem::Missing)
        } else if !self.link.admin_up {
            Err(LinkProblem::AdminDown)
        } else if !self.link.carrier {
            Err(LinkProblem::NoCarrier)
        } else if self.auto_gateway && self.learned(false).is_none() {
            // Before NoAddress: a DHCP uplink has neither until its lease, and what it
            // waits for is the lease.
            Err(LinkProblem::NoGateway)
        } else if self.addrs.is_empty() {
            Err(LinkProblem::NoAddress)
        } else {
            Ok(())
        }
    }
}

impl Model {
    /// An address appeared on or left an interface; returns whether an uplink changed.
    pub fn set_addr(&mut self, interface: &str, addr: IpAddr, present: bool) -> bool {
        let mut changed = false;
        for u in self.uplinks.iter_mut().filter(|u| u.interface == interface) {
            let has = u.addrs.contains(&addr);
            if present && !has {
                u.addrs.push(addr);
                u.addrs.sort();
                // Back before its flows were deleted (a script that flushes and re-adds
                // the same lease): they are alive.
                u.gone_addrs.retain(|a| *a != addr);
                changed = true;
            } else if !present && has {
                u.addrs.retain(|a| *a != addr);
                u.gone_addrs.push(addr);
                changed = true;
            }
        }
        changed
    }

    /// Carries link facts and health of uplinks (by name) over from a previous model.
    /// The state changes the new health settings cause are settled by the next
    /// `refresh_links`, once the reload has read the links (new uplinks included).
    pub fn keep_runtime(
        &mut self,
        old: &Model,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) {
        for (i, u) in self.uplinks.iter_mut().enumerate() {
            if let Some(o) = old
                .uplinks
                .iter()
                .find(|o| o.name == u.name && o.interface == u.interface)
            {
                u.link = o.link;
                u.addrs = o.addrs.clone();
                u.learned = o.learned.clone();
                // The new config's probe settings over the old verdict and samples.
                let fresh = std::mem::replace(&mut u.health, o.health.clone());
                if let Some(t) =
                    u.health
                        .reconfigure(fresh.probing(), fresh.stats.window(), now, h, f)
                {
                    self.reconfigured.push((i, t));
                }
                u.serving = o.serving;
                u.usable_since = o.usable_since;
                u.needs_flush = o.needs_flush;
                u.away = o.away;
                u.drained = o.drained;
                u.over_quota = o.over_quota;
                u.quota_flush = o.quota_flush;
                u.held_until = o.held_until;
            }
        }
        self.all_down = old.all_down;
        self.set_edits = old.set_edits.clone();
        self.overrides = old
            .overrides
            .iter()
            .filter(|(_, o)| self.uplinks.iter().any(|u| u.name == o.uplink))
            .map(|(ip, o)| (*ip, o.clone()))
            .collect();
    }

    pub fn clear_addrs(&mut self, interface: &str) {
        for u in self.uplinks.iter_mut().filter(|u| u.interface == interface) {
            u.addrs.clear();
        }
    }

    /// Feeds the link layer's facts to every uplink's health; returns what happened.
    pub fn refresh_links(
        &mut self,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Vec<LogEntry> {
        let mut transitions = std::mem::take(&mut self.reconfigured);
        for (i, u) in self.uplinks.iter_mut().enumerate() {
            let link = u.link_problem();
            if let Some(t) = u.health.on_link(link, now, h, f) {
                transitions.push((i, t));
            }
        }
        self.settle(transitions, now, f)
    }

    pub fn on_round(
        &mut self,
        uplink: usize,
        round: &Round,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Vec<LogEntry> {
        self.judge(uplink, now, f, |health| health.on_round(round, now, h, f))
    }

    /// Hands `uplink`'s health a verdict to take, and settles its transition.
    fn judge(
        &mut self,
        uplink: usize,
        now: Instant,
        f: &FailoverConfig,
        verdict: impl FnOnce(&mut Health) -> Option<Transition>,
    ) -> Vec<LogEntry> {
        let Some(u) = self.uplinks.get_mut(uplink) else {
            return Vec::new();
        };
        let transitions = verdict(&mut u.health)
            .map(|t| (uplink, t))
            .into_iter()
            .collect();
        self.settle(transitions, now, f)
    }

    /// LAN traffic through `uplink` to `destinations` destinations went unanswered (its
    /// health judges whether that is enough without probes).
    pub fn on_silence(
        &mut self,
        uplink: usize,
        destinations: usize,
        now: Instant,
        h: &HealthConfig,
        f: &FailoverConfig,
    ) -> Vec<LogEntry> {
        self.judge(uplink, now, f, |health| {
            health.on_silence(destinations, now, h, f)
        })
    }

    /// Time passed: holds expire, automatic failbacks come due.
    pub fn tick(&mut self, now: Instant, h: &HealthConfig, f: &FailoverConfig) -> Vec<LogEntry> {
        let mut transitions = Vec::new();
        for (i, u) in self.uplinks.iter_mut().enumerate() {
            if let Some(t) = u.health.on_tick(now, h, f) {
                transitions.push((i, t));
            }
        }
        self.settle(transitions, now, f)
    }

    /// A start with no dataplane of ours in the kernel (a reboot, or after `cleanup`): no
    /// backup carries anyone's flows, so an automatic failback pending from the last run
    /// holds nothing in place. Uplinks usable now serve their clients at once instead of
    /// after another `failback_delay` (an uplink whose lease came back while uplinkd was
    /// stopped). An operator's manual failback stays pending. Returns the uplinks that now
    /// serve.
    pub fn serve_usable_at_fresh_start(&mut self, f: &FailoverConfig) -> Vec<String> {
        if f.failback != Failback::Auto {
            return Vec::new();
        }
        self.uplinks
            .iter_mut()
            .filter(|u| u.usable() && !u.serving)
            .map(|u| {
                u.serving = true;
                u.name.clone()
            })
            .collect()
    }

    /// Manual failback: the uplink's clients return now, if it is usable.
    pub fn failback(&mut self, uplink: usize, now: Instant) -> Option<LogEntry> {
        let count = self.counts[uplink];
        let u = self.uplinks.get_mut(uplink)?;
        if u.serving || !u.usable() {
            return None;
        }
        u.serving = true;
        let _ = now;
        Some(LogEntry {
            at: now_millis(),
            uplink: u.name.clone(),
            kind: EventKind::Failback,
            cause: "operator".into(),
            clients_moved: count,
        })
    }

    /// An operator pins client address `ip` to `uplink` until `now + ttl` (or until
    /// cleared). Refused for an unknown uplink or an address no client has.
    pub fn pin(
        &mut self,
        ip: IpAddr,
        uplink: &str,
        ttl: Option<std::time::Duration>,
        now: super::Millis,
    ) -> Result<(super::Override, LogEntry), PinRefused> {
        if self.uplink(uplink).is_none() {
            return Err(PinRefused::UnknownUplink);
        }
        if self.client_by_addr(&ip).is_none() {
            return Err(PinRefused::UnknownClient);
        }
        let o = super::Override {
            uplink: uplink.to_string(),
            until: ttl.map(|t| now.saturating_add(t.as_millis() as u64)),
        };
        self.overrides.insert(ip, o.clone());
        let cause = match ttl {
            Some(t) => format!(
                "{ip} pinned to {uplink} for {}",
                humantime::format_duration(t)
            ),
            None => format!("{ip} pinned to {uplink}"),
        };
        let entry = LogEntry {
            at: now,
            uplink: uplink.to_string(),
            kind: EventKind::Override,
            cause,
            clients_moved: 1,
        };
        Ok((o, entry))
    }

    /// An operator clears the pin of `ip`; `None` when there was none.
    pub fn unpin(&mut self, ip: IpAddr, now: super::Millis) -> Option<LogEntry> {
        self.overrides.remove(&ip)?;
        Some(LogEntry {
            at: now,
            uplink: String::new(),
            kind: EventKind::Override,
            cause: format!("override of {ip} cleared"),
            clients_moved: 1,
        })
    }

    /// An operator drains or undrains uplink `i`. Refused when draining it would leave its
    /// clients nowhere to go; `Ok(None)` when it already was in that state.
    pub fn set_drained(&mut self, i: usize, drain: bool) -> Result<Option<LogEntry>, String> {
        let Some(u) = self.uplinks.get(i) else {
            return Err(format!("no uplink with index {i}"));
        };
        if u.drained == drain {
            return Ok(None);
        }
        if drain && self.survivors(Some(i)).is_empty() {
            return Err(format!(
                "{} is the last healthy uplink; draining it would leave its clients nowhere to go",
                u.name
            ));
        }
        let moved = self.counts[i];
        let u = &mut self.uplinks[i];
        u.drained = drain;
        let (kind, cause) = if drain {
            (
                EventKind::Drain,
                format!(
                    "{} drained: its clients move, established flows finish on it",
                    u.name
                ),
            )
        } else {
            (EventKind::Undrain, format!("{} undrained", u.name))
        };
        Ok(Some(LogEntry {
            at: now_millis(),
            uplink: u.name.clone(),
            kind,
            cause,
            clients_moved: moved,
        }))
    }

    /// Turns state transitions into failovers and failbacks.
    fn settle(
        &mut self,
        transitions: Vec<(usize, Transition)>,
        now: Instant,
        f: &FailoverConfig,
    ) -> Vec<LogEntry> {
        let at = now_millis();
        let mut log = Vec::new();
        for (i, t) in transitions {
            let u = &mut self.uplinks[i];
            if t.from.usable() && !t.to.usable() {
                // Whatever it carried (its own clients or others' by failover) must move.
                u.needs_flush = true;
            }
            u.held_until =
                (t.to == UplinkState::Held).then(|| at.saturating_add(f.hold.as_millis() as u64));
            if t.to.usable() {
                u.needs_flush = false;
            }
            log.push(LogEntry {
                at,
                uplink: u.name.clone(),
                kind: EventKind::State {
                    from: t.from,
                    to: t.to,
                },
                cause: t.cause,
                clients_moved: 0,
            });
        }
        for i in 0..self.uplinks.len() {
            let count = self.counts[i];
            let u = &mut self.uplinks[i];
            if u.usable() {
                u.usable_since.get_or_insert(now);
            } else {
                u.usable_since = None;
            }
            if !u.usable() && u.serving {
                u.serving = false;
                log.push(LogEntry {
                    at,
                    uplink: u.name.clone(),
                    kind: EventKind::Failover,
                    cause: format!("uplink {}", u.state()),
                    clients_moved: count,
                });
            }
            let due = u
                .usable_since
                .is_some_and(|t| now.duration_since(t) >= f.failback_delay);
            if u.usable() && !u.serving && f.failback == Failback::Auto && due {
                u.serving = true;
                log.push(LogEntry {
                    at,
                    uplink: u.name.clone(),
                    kind: EventKind::Failback,
                    cause: format!(
                        "healthy for {}",
                        humantime::format_duration(f.failback_delay)
                    ),
                    clients_moved: count,
                });
            }
        }
        let any = self.uplinks.iter().any(Uplink::usable);
        if !any && !self.all_down {
            self.all_down = true;
            log.push(LogEntry {
                at,
                uplink: String::new(),
                kind: EventKind::AllDown,
                cause: String::new(),
                clients_moved: 0,
            });
        } else if any && self.all_down {
            self.all_down = false;
            let first = self
                .uplinks
                .iter()
                .find(|u| u.usable())
                .map(|u| u.name.clone())
                .unwrap_or_default();
            log.push(LogEntry {
                at,
                uplink: first,
                kind: EventKind::Recovered,
                cause: String::new(),
                clients_moved: 0,
            });
        }
        log
    }

    /// Whether uplink `i` may carry traffic now: usable, and not taken out by its quota
    /// (one in standby carries traffic only while no other uplink can).
    pub fn open(&self, i: usize) -> bool {
        let u = &self.uplinks[i];
        u.usable()
            && match u.over_quota {
                None | Some(QuotaAction::Alert) => true,
                Some(QuotaAction::Stop) => false,
                Some(QuotaAction::Standby) => !self
                    .uplinks
                    .iter()
                    .enumerate()
                    .any(|(j, o)| j != i && o.usable() && !o.drained && o.over_quota.is_none()),
            }
    }

    /// A change of uplink `i`'s quota level, as the usage owner counted it, under its
    /// `quota_action`: a used-up quota holds the uplink in standby or stops it (`alert`
    /// holds nothing). Returns the event.
    pub fn quota(&mut self, i: usize, c: &QuotaChange, action: QuotaAction) -> LogEntry {
        let held = self.set_over_quota(i, c.to.hold(action));
        let size = uplink_api::size::format;
        let of = match c.quota {
            Some(q) => format!("{} of {}", size(c.used), size(q)),
            None => format!("{} used, no quota", size(c.used)),
        };
        let mut cause = match c.to {
            QuotaLevel::Warning => format!("80 % used ({of})"),
            QuotaLevel::Exhausted => format!(
                "used up ({of}); {}",
                match action {
                    QuotaAction::Standby =>
                        "standby: its clients and their flows move to the other uplinks while any is usable",
                    QuotaAction::Stop => "stopped: no new flows, its flows are deleted",
                    QuotaAction::Alert => "alert only: it carries traffic as before",
                }
            ),
            QuotaLevel::Under => format!("within it again ({of})"),
        };
        if let Some(why) = &c.why {
            cause.push_str(&format!(" after {why}"));
        }
        LogEntry {
            at: now_millis(),
            uplink: self.uplinks[i].name.clone(),
            kind: EventKind::Quota,
            cause,
            clients_moved: if held { self.counts[i] } else { 0 },
        }
    }

    /// Uplink `i` went over its quota, or back within it (`None`; `alert` holds nothing),
    /// as the usage owner counts it. Returns whether that changed anything; a hold that starts marks
    /// its flows for deletion.
    pub fn set_over_quota(&mut self, i: usize, hold: Option<QuotaAction>) -> bool {
        let hold = hold.filter(|a| *a != QuotaAction::Alert);
        let Some(u) = self.uplinks.get_mut(i) else {
            return false;
        };
        if u.over_quota == hold {
            return false;
        }
        u.quota_flush = hold.is_some();
        u.over_quota = hold;
        true
    }

    /// Open, undrained uplinks other than `except`, in the lowest tier that has any.
    pub fn survivors(&self, except: Option<usize>) -> Vec<usize> {
        let usable = |i: &usize| Some(*i) != except && self.open(*i) && !self.uplinks[*i].drained;
        let Some(tier) = (0..self.uplinks.len())
            .filter(usable)
            .map(|i| self.uplinks[i].tier)
            .min()
        else {
            return Vec::new();
        };
        (0..self.uplinks.len())
            .filter(usable)
            .filter(|&i| self.uplinks[i].tier == tier)
            .collect()
    }

    /// Where uplink `i`'s clients go: home while it serves them, otherwise spread over the
    /// survivors; with no survivor, home (nothing better exists), unless its quota
    /// stopped it.
    pub fn home_target(&self, i: usize) -> HomeTarget {
        let u = &self.uplinks[i];
        if u.serving && self.open(i) && !u.drained {
            return HomeTarget::Direct;
        }
        let s = self.survivors(Some(i));
        if !s.is_empty() {
            HomeTarget::Spread(s)
        } else if u.quota_stopped() {
            HomeTarget::Blocked
        } else {
            HomeTarget::Direct
        }
    }

    /// Whether a pin to uplink `i` sends the client straight to it: it can carry traffic
    /// and is not drained, whether or not it has taken its own clients back yet.
    pub fn pin_direct(&self, i: usize) -> bool {
        self.uplinks
            .get(i)
            .is_some_and(|u| !u.drained && self.open(i))
    }

    /// Uplink `i` is usable but its clients are still elsewhere: when they come back.
    pub fn failback_pending(&self, i: usize, now: Instant, f: &FailoverConfig) -> FailbackPending {
        let u = &self.uplinks[i];
        if u.serving || !u.usable() {
            return FailbackPending::No;
        }
        match (f.failback, u.usable_since) {
            (Failback::Manual, _) => FailbackPending::Manual,
            (Failback::Auto, Some(t)) => {
                FailbackPending::In(f.failback_delay.saturating_sub(now.duration_since(t)))
            }
            // Not yet settled: the delay has not started.
            (Failback::Auto, None) => FailbackPending::In(f.failback_delay),
        }
    }

    /// Uplinks whose conntrack entries must be deleted now: dead, and their traffic has
    /// somewhere else to go. Clears the mark.
    /// Addresses that left their uplink and did not come back, by uplink: their NATed
    /// flows are deleted now (the kernel's masquerade does it for plain addresses, but not
    /// for a point-to-point one, whose peer it compares instead).
    pub fn take_gone_addrs(&mut self) -> Vec<(usize, IpAddr)> {
        let mut out = Vec::new();
        for (i, u) in self.uplinks.iter_mut().enumerate() {
            out.extend(u.gone_addrs.drain(..).map(|a| (i, a)));
        }
        out
    }

    /// Called as each plan is made: uplinks whose clients that plan sends home again after
    /// an earlier plan had sent them elsewhere; the connections placed meanwhile may have
    /// to be deleted once this plan is in the kernel (`failback_flows`, metered uplinks).
    /// A failover and failback between two plans placed none, and is not reported.
    pub fn take_failbacks(&mut self) -> Vec<usize> {
        let mut due = Vec::new();
        for i in 0..self.uplinks.len() {
            let elsewhere = matches!(self.home_target(i), HomeTarget::Spread(_));
            let open = self.open(i);
            let u = &mut self.uplinks[i];
            if elsewhere {
                u.away = true;
            } else if u.away && open && u.serving && !u.drained {
                u.away = false;
                due.push(i);
            }
        }
        due
    }

    /// Uplinks that went over their quota: the flows they carry are deleted now that
    /// their clients have somewhere else to be (a stopped one's in any case). Clears the
    /// mark.
    pub fn take_quota_flushes(&mut self) -> Vec<usize> {
        let due: Vec<usize> = (0..self.uplinks.len())
            .filter(|&i| self.uplinks[i].quota_flush && !self.open(i))
            .collect();
        for &i in &due {
            self.uplinks[i].quota_flush = false;
        }
        due
    }

    pub fn take_flushes(&mut self) -> Vec<usize> {
        let due: Vec<usize> = (0..self.uplinks.len())
            .filter(|&i| {
                self.uplinks[i].needs_flush
                    && !self.uplinks[i].usable()
                    && !self.survivors(Some(i)).is_empty()
            })
            .collect();
        for &i in &due {
            self.uplinks[i].needs_flush = false;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::model::{LinkState, Mac};
    use std::path::Path;
    use std::time::Duration;

    fn setup(extra: &str) -> (Config, Model) {
        let text = format!(
            "[lan]\ninterfaces=[\"lan0\"]\n[failover]\nfailback_delay=\"10s\"\n{extra}\n[[uplink]]\nname=\"a\"\ninterface=\"wa\"\ngateway=\"100.64.0.1\"\n[[uplink]]\nname=\"b\"\ninterface=\"wb\"\ngateway=\"100.64.1.1\"\n[[uplink]]\nname=\"lte\"\ninterface=\"ppp0\"\ntier=2\n"
        );
        let c = Config::parse(Path::new("t"), &text).unwrap();
        let mut m = Model::new(&c);
        for (n, iface) in ["wa", "wb", "ppp0"].iter().enumerate() {
            m.set_link(
                iface,
                LinkState {
                    ifindex: Some(n as u32 + 2),
                    admin_up: true,
                    carrier: true,
                },
            );
            m.set_addr(iface, format!("100.64.{n}.2").parse().unwrap(), true);
        }
        (c, m)
    }

    fn carrier(m: &mut Model, iface: &str, up: bool) {
        let l = m
            .uplinks
            .iter()
            .find(|u| u.interface == iface)
            .unwrap()
            .link;
        m.set_link(iface, LinkState { carrier: up, ..l });
    }

    #[test]
    fn a_used_up_quota_holds_the_uplink_in_standby_or_stops_it() {
        let (c, mut m) = setup("");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        let change = |to| QuotaChange {
            uplink: "a".into(),
            from: QuotaLevel::Under,
            to,
            used: 1_000_000,
            quota: Some(1_000_000),
            why: None,
        };
        // Alert: events only.
        let e = m.quota(0, &change(QuotaLevel::Exhausted), QuotaAction::Alert);
        assert_eq!(e.kind, EventKind::Quota);
        assert!(e.cause.contains("alert only"), "{}", e.cause);
        assert_eq!(m.home_target(0), HomeTarget::Direct);
        assert!(m.take_quota_flushes().is_empty());
        // Standby: its clients and flows go to b; a new client does not land on it.
        let e = m.quota(0, &change(QuotaLevel::Exhausted), QuotaAction::Standby);
        assert!(e.cause.contains("1.0 MB of 1.0 MB"), "{}", e.cause);
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![1]));
        assert_eq!(m.survivors(None), vec![1]);
        assert_eq!(m.next_home(), "b");
        assert!(!m.pin_direct(0));
        assert_eq!(m.take_quota_flushes(), vec![0]);
        assert!(m.take_quota_flushes().is_empty());
        // With b dead, lte (tier 2) comes before a standby …
        carrier(&mut m, "wb", false);
        m.refresh_links(t0, &c.health, &c.failover);
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![2]));
        // … and with lte dead too, the standby carries its own again.
        carrier(&mut m, "ppp0", false);
        m.refresh_links(t0, &c.health, &c.failover);
        assert!(m.open(0));
        assert_eq!(m.home_target(0), HomeTarget::Direct);
        assert_eq!(m.home_target(1), HomeTarget::Spread(vec![0]));
        // Stop: nowhere, rather than over the cap; its flows go even so.
        m.quota(0, &change(QuotaLevel::Exhausted), QuotaAction::Stop);
        assert_eq!(m.home_target(0), HomeTarget::Blocked);
        assert_eq!(
            m.home_target(1),
            HomeTarget::Direct,
            "dead b: nothing better"
        );
        assert_eq!(m.take_quota_flushes(), vec![0]);
        // The next period restores it.
        let e = m.quota(0, &change(QuotaLevel::Under), QuotaAction::Stop);
        assert!(e.cause.contains("within it again"), "{}", e.cause);
        assert_eq!(m.home_target(0), HomeTarget::Direct);
        assert!(m.take_quota_flushes().is_empty());
    }

    #[test]
    fn failover_spreads_over_the_same_tier_then_fails_back_after_delay() {
        let (c, mut m) = setup("");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        for n in 1..=4 {
            m.neighbour_present(
                format!("10.0.0.{n}").parse().unwrap(),
                Mac([2, 0, 0, 0, 0, n]),
                0,
                None,
            );
        }
        assert_eq!(m.counts(), [2, 2, 0], "tier 2 gets no home clients");
        carrier(&mut m, "wa", false);
        let log = m.refresh_links(t0, &c.health, &c.failover);
        assert!(
            log.iter()
                .any(|e| e.kind == EventKind::Failover && e.clients_moved == 2),
            "{log:?}"
        );
        assert_eq!(
            m.home_target(0),
            HomeTarget::Spread(vec![1]),
            "tier 1 survivor only"
        );
        assert_eq!(m.take_flushes(), vec![0]);
        assert!(m.take_flushes().is_empty());

        carrier(&mut m, "wa", true);
        m.refresh_links(t0 + Duration::from_secs(1), &c.health, &c.failover);
        assert_eq!(
            m.home_target(0),
            HomeTarget::Spread(vec![1]),
            "failback waits for the delay"
        );
        assert!(
            m.tick(t0 + Duration::from_secs(5), &c.health, &c.failover)
                .is_empty()
        );
        let log = m.tick(t0 + Duration::from_secs(11), &c.health, &c.failover);
        assert!(
            log.iter()
                .any(|e| e.kind == EventKind::Failback && e.clients_moved == 2),
            "{log:?}"
        );
        assert_eq!(m.home_target(0), HomeTarget::Direct);
    }

    #[test]
    fn tier_two_carries_only_when_tier_one_is_gone() {
        let (c, mut m) = setup("");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        carrier(&mut m, "wa", false);
        carrier(&mut m, "wb", false);
        m.refresh_links(t0, &c.health, &c.failover);
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![2]));
        assert_eq!(m.home_target(1), HomeTarget::Spread(vec![2]));
        assert_eq!(m.survivors(None), vec![2]);
        carrier(&mut m, "wb", true);
        m.refresh_links(t0, &c.health, &c.failover);
        assert_eq!(
            m.home_target(0),
            HomeTarget::Spread(vec![1]),
            "tier 2 hands back"
        );
    }

    #[test]
    fn manual_failback_waits_for_the_operator() {
        let (c, mut m) = setup("failback=\"manual\"");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        carrier(&mut m, "wa", false);
        m.refresh_links(t0, &c.health, &c.failover);
        carrier(&mut m, "wa", true);
        m.refresh_links(t0, &c.health, &c.failover);
        assert!(
            m.tick(t0 + Duration::from_secs(3600), &c.health, &c.failover)
                .is_empty()
        );
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![1]));
        assert!(m.failback(0, t0).is_some());
        assert_eq!(m.home_target(0), HomeTarget::Direct);
    }

    #[test]
    fn new_client_lands_when_every_first_tier_uplink_is_drained() {
        let (c, mut m) = setup("");
        m.refresh_links(Instant::now(), &c.health, &c.failover);
        assert!(m.set_drained(0, true).unwrap().is_some());
        assert!(m.set_drained(1, true).unwrap().is_some(), "lte survives");
        assert!(m.set_drained(1, true).unwrap().is_none(), "already drained");
        m.neighbour_present(
            "10.0.0.9".parse().unwrap(),
            Mac([2, 0, 0, 0, 0, 9]),
            0,
            None,
        );
        let home = &m.clients()[&Mac([2, 0, 0, 0, 0, 9])].home;
        assert_eq!(
            home, "a",
            "homed in tier 1 even though all of it is drained"
        );
        assert_eq!(
            m.home_target(0),
            HomeTarget::Spread(vec![2]),
            "carried by lte"
        );
        assert!(
            m.set_drained(2, true).is_err(),
            "the last survivor is refused"
        );
    }

    #[test]
    fn a_pin_to_an_uplink_waiting_for_failback_goes_straight_to_it() {
        let (c, mut m) = setup("");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        m.neighbour_present(ip, Mac([2, 0, 0, 0, 0, 1]), 0, None);
        assert_eq!(
            m.pin(ip, "nope", None, 0).err(),
            Some(PinRefused::UnknownUplink)
        );
        assert_eq!(
            m.pin("10.9.9.9".parse().unwrap(), "a", None, 0).err(),
            Some(PinRefused::UnknownClient)
        );
        carrier(&mut m, "wa", false);
        m.refresh_links(t0, &c.health, &c.failover);
        carrier(&mut m, "wa", true);
        m.refresh_links(t0 + Duration::from_secs(1), &c.health, &c.failover);
        assert!(matches!(
            m.failback_pending(0, t0 + Duration::from_secs(2), &c.failover),
            FailbackPending::In(d) if d == Duration::from_secs(9)
        ));
        // A huge TTL saturates instead of overflowing.
        let (o, _) = m.pin(ip, "a", Some(Duration::MAX), u64::MAX - 5).unwrap();
        assert_eq!(o.until, Some(u64::MAX));
        let plan = crate::plan::plan(&c, &m);
        let pinned = plan.nft.elements.iter().find_map(|(k, v)| match k {
            crate::plan::ElemKey::Pin4(_) => Some(v.to_string()),
            _ => None,
        });
        assert_eq!(
            pinned.as_deref(),
            Some("up_a"),
            "not via home_a, which still spreads"
        );
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![1]));
        assert!(m.unpin(ip, 0).is_some());
        assert!(m.unpin(ip, 0).is_none());
    }

    #[test]
    fn a_flap_hold_survives_a_restart() {
        let (c, mut m) = setup("max_flaps=1\nhold=\"10m\"");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        for up in [false, true, false] {
            carrier(&mut m, "wa", up);
            m.refresh_links(t0, &c.health, &c.failover);
        }
        assert_eq!(m.uplinks[0].state(), UplinkState::Held);
        let saved = m.decisions();
        let until = saved.uplinks["a"].held_until.expect("saved");
        assert!(until > now_millis() + 500_000, "about 10 minutes out");
        // The restarted agent: a fresh model, the link fine, the hold still on.
        let (c, mut fresh) = setup("max_flaps=1\nhold=\"10m\"");
        fresh.restore_decisions(saved);
        fresh.refresh_links(Instant::now(), &c.health, &c.failover);
        assert_eq!(fresh.uplinks[0].state(), UplinkState::Held);
        assert_eq!(fresh.decisions().uplinks["a"].held_until, Some(until));
    }

    #[test]
    fn a_fresh_start_does_not_keep_a_pending_failback() {
        // The last run stopped while `a` had no carrier; it is back at this start.
        let saved = {
            let (c, mut m) = setup("");
            m.refresh_links(Instant::now(), &c.health, &c.failover);
            carrier(&mut m, "wa", false);
            m.refresh_links(Instant::now(), &c.health, &c.failover);
            m.decisions()
        };
        assert!(!saved.uplinks["a"].serving);
        for (failback, serves) in [("auto", true), ("manual", false)] {
            let (c, mut m) = setup(&format!("failback=\"{failback}\""));
            m.restore_decisions(saved.clone());
            m.refresh_links(Instant::now(), &c.health, &c.failover);
            assert_ne!(
                m.home_target(0),
                HomeTarget::Direct,
                "pending after restore"
            );
            let now_serving = m.serve_usable_at_fresh_start(&c.failover);
            assert_eq!(now_serving == ["a"], serves, "{failback}");
            assert_eq!(m.home_target(0) == HomeTarget::Direct, serves, "{failback}");
        }
    }

    #[test]
    fn all_down_keeps_homes_and_logs_loudly() {
        let (c, mut m) = setup("");
        let t0 = Instant::now();
        m.refresh_links(t0, &c.health, &c.failover);
        for iface in ["wa", "wb", "ppp0"] {
            carrier(&mut m, iface, false);
        }
        let log = m.refresh_links(t0, &c.health, &c.failover);
        assert!(log.iter().any(|e| e.kind == EventKind::AllDown));
        assert_eq!(m.home_target(0), HomeTarget::Direct);
        assert!(m.take_flushes().is_empty(), "nowhere to move flows to");
        carrier(&mut m, "wb", true);
        let log = m.refresh_links(t0, &c.health, &c.failover);
        assert!(
            log.iter()
                .any(|e| e.kind == EventKind::Recovered && e.uplink == "b")
        );
        assert_eq!(m.home_target(0), HomeTarget::Spread(vec![1]));
        assert_eq!(m.take_flushes(), vec![0, 2]);
    }
}
