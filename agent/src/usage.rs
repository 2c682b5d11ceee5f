//! Bytes each uplink carried, in total and in its billing period (`quota_period`,
//! `quota_reset`), whose bounds are midnights in the gateway's local time zone, so a day
//! that a DST change shortens or lengthens is a period of 23 or 25 hours. Readings of the
//! dataplane's per-interface counters are turned into these figures here; the owner that
//! reads and persists them is `daemon::usage`. Each uplink's quota level (under, at 80 %,
//! used up) is judged here too; what a used-up quota does is the model's
//! (`Model::quota`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::config::{QuotaAction, QuotaPeriod};
use crate::dataplane::nft::ClientBytes;

/// The period holding `now`: its first and its last-plus-one second.
pub fn bounds(period: QuotaPeriod, now: Timestamp, tz: &TimeZone) -> (Timestamp, Timestamp) {
    let today = now.to_zoned(tz.clone()).date();
    let (start, next) = match period {
        QuotaPeriod::Day => (today, add(today, 1.day())),
        QuotaPeriod::Week { starts } => {
            let back = (today.weekday().to_monday_one_offset() - starts as i8).rem_euclid(7);
            let start = add(today, (-(back as i64)).days());
            (start, add(start, 7.days()))
        }
        QuotaPeriod::Month { starts } => {
            let this = Date::new(today.year(), today.month(), starts as i8).unwrap_or(today);
            let start = if today.day() >= starts as i8 {
                this
            } else {
                add(this, (-1).month())
            };
            (start, add(start, 1.month()))
        }
    };
    (midnight(start, tz), midnight(next, tz))
}

fn add(d: Date, span: jiff::Span) -> Date {
    // Only out of range near the year 9999.
    d.checked_add(span).unwrap_or(d)
}

/// The first instant of `d` in `tz` (a midnight that a DST change skips starts the day at
/// the first instant after the gap).
fn midnight(d: Date, tz: &TimeZone) -> Timestamp {
    d.to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(Timestamp::UNIX_EPOCH)
}

/// One uplink's bytes: in the period that starts at `period_start` (Unix seconds), and
/// since uplinkd first counted it; and its quota.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkUsage {
    pub period_start: i64,
    pub rx: u64,
    pub tx: u64,
    pub total_rx: u64,
    pub total_tx: u64,
    /// The cap in force: the operator's (`quota_set`), else the config's `quota`.
    #[serde(default)]
    pub quota: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_set: Option<QuotaSet>,
    /// The level last reported, so that a restart repeats no event.
    #[serde(default)]
    pub level: QuotaLevel,
}

/// A cap an operator set (`uplinkctl quota set`): it holds, restarts included, until a
/// reload changes the config's `quota` of that uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub bytes: u64,
    /// The config's quota when it was set.
    pub over: Option<u64>,
}

impl UplinkUsage {
    /// Bytes in and out in the period.
    pub fn used(&self) -> u64 {
        self.rx.saturating_add(self.tx)
    }

    /// Bytes left in the period; `None` without a quota.
    pub fn remaining(&self) -> Option<u64> {
        self.quota.map(|q| q.saturating_sub(self.used()))
    }
}

/// How much of its quota an uplink used in the period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaLevel {
    /// Below 80 %, or no quota.
    #[default]
    Under,
    /// 80 % or more.
    Warning,
    /// All of it.
    Exhausted,
}

impl QuotaLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaLevel::Under => "under",
            QuotaLevel::Warning => "warning",
            QuotaLevel::Exhausted => "exhausted",
        }
    }

    /// The action in force at this level: its `quota_action` once used up (the model's
    /// `set_over_quota` takes `alert` as no hold).
    pub fn hold(self, action: QuotaAction) -> Option<QuotaAction> {
        (self == QuotaLevel::Exhausted).then_some(action)
    }

    pub fn of(used: u64, quota: Option<u64>) -> QuotaLevel {
        let Some(q) = quota else {
            return QuotaLevel::Under;
        };
        if used >= q {
            QuotaLevel::Exhausted
        } else if used as u128 * 5 >= q as u128 * 4 {
            QuotaLevel::Warning
        } else {
            QuotaLevel::Under
        }
    }
}

/// An uplink's quota level changed: what the loop turns into an event and a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaChange {
    pub uplink: String,
    pub from: QuotaLevel,
    pub to: QuotaLevel,
    pub used: u64,
    pub quota: Option<u64>,
    /// What moved it when it was not traffic: "a new period", "an operator's reset", ….
    pub why: Option<String>,
}

/// Every uplink's usage, and the counter readings it was counted up to: persisted, so
/// that after a restart what the counters moved meanwhile (the table stays) is counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub uplinks: BTreeMap<String, UplinkUsage>,
    /// Per interface: the bytes in and out its counters read last.
    pub counters: BTreeMap<String, (u64, u64)>,
}

/// What the ledger needs to know of an uplink.
pub struct Metered<'a> {
    pub name: &'a str,
    pub interface: &'a str,
    pub period: QuotaPeriod,
    /// The config's `quota`.
    pub quota: Option<u64>,
}

impl Ledger {
    /// Counts a reading of the per-interface counters (bytes in, bytes out) at `now`:
    /// what each moved since the last reading goes to the uplinks on that interface, in
    /// the period holding `now` (a new period starts from zero). A counter below its last
    /// reading restarted (the table was replaced, the host rebooted): counted from zero.
    /// Returns the uplinks whose period rolled over.
    pub fn record(
        &mut self,
        uplinks: &[Metered],
        reading: &BTreeMap<String, (u64, u64)>,
        now: Timestamp,
        tz: &TimeZone,
    ) -> Vec<String> {
        let mut moved: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (iface, &(rx, tx)) in reading {
            let (last_rx, last_tx) = self
                .counters
                .insert(iface.clone(), (rx, tx))
                .unwrap_or((rx, tx));
            let delta = crate::dataplane::nft::moved;
            moved.insert(iface.as_str(), (delta(rx, last_rx), delta(tx, last_tx)));
        }
        let mut rolled = Vec::new();
        for u in uplinks {
            let start = bounds(u.period, now, tz).0.as_second();
            let usage = self.uplinks.entry(u.name.to_string()).or_default();
            if usage.period_start != start {
                if usage.period_start != 0 {
                    rolled.push(u.name.to_string());
                }
                usage.period_start = start;
                usage.rx = 0;
                usage.tx = 0;
            }
            let (rx, tx) = moved.get(u.interface).copied().unwrap_or_default();
            usage.rx = usage.rx.saturating_add(rx);
            usage.tx = usage.tx.saturating_add(tx);
            usage.total_rx = usage.total_rx.saturating_add(rx);
            usage.total_tx = usage.total_tx.saturating_add(tx);
        }
        rolled
    }

    /// Takes the config's quotas: an operator's cap set over a quota the config no longer
    /// has is dropped (returned by name; the config changed it).
    pub fn configure(&mut self, uplinks: &[Metered]) -> Vec<String> {
        let mut dropped = Vec::new();
        for u in uplinks {
            let usage = self.uplinks.entry(u.name.to_string()).or_default();
            if usage.quota_set.is_some_and(|s| s.over != u.quota) {
                usage.quota_set = None;
                dropped.push(u.name.to_string());
            }
            usage.quota = usage.quota_set.map(|s| s.bytes).or(u.quota);
        }
        dropped
    }

    /// An operator's cap for the uplink, over the config's `quota`.
    pub fn set_quota(&mut self, u: &Metered, bytes: u64) {
        let usage = self.uplinks.entry(u.name.to_string()).or_default();
        usage.quota_set = Some(QuotaSet {
            bytes,
            over: u.quota,
        });
        usage.quota = Some(bytes);
    }

    /// An operator's reset: the period's count starts again from zero (the totals stay).
    pub fn reset(&mut self, name: &str) {
        let usage = self.uplinks.entry(name.to_string()).or_default();
        usage.rx = 0;
        usage.tx = 0;
    }

    /// The uplinks whose quota level moved since the last call; `why` names what moved
    /// it when it was not traffic.
    pub fn levels(&mut self, uplinks: &[Metered], why: Option<&str>) -> Vec<QuotaChange> {
        let mut changes = Vec::new();
        for u in uplinks {
            let usage = self.uplinks.entry(u.name.to_string()).or_default();
            let to = QuotaLevel::of(usage.used(), usage.quota);
            // A jump past 80 % in one count still warns first: alerting keys on it.
            let steps = match (usage.level, to) {
                (QuotaLevel::Under, QuotaLevel::Exhausted) => {
                    vec![
                        (QuotaLevel::Under, QuotaLevel::Warning),
                        (QuotaLevel::Warning, to),
                    ]
                }
                (from, to) if from != to => vec![(from, to)],
                _ => Vec::new(),
            };
            for (from, to) in steps {
                changes.push(QuotaChange {
                    uplink: u.name.to_string(),
                    from,
                    to,
                    used: usage.used(),
                    quota: usage.quota,
                    why: why.map(str::to_string),
                });
            }
            usage.level = to;
        }
        changes
    }

    /// Each uplink's level as last judged.
    pub fn level(&self, name: &str) -> QuotaLevel {
        self.uplinks.get(name).map(|u| u.level).unwrap_or_default()
    }
}

/// Each client address's bytes per uplink, counted from readings of the usage sets
/// (`lan.client_usage`) since uplinkd started, and what each moved lately (`top`). In
/// memory only: a restart counts from its first reading.
#[derive(Debug, Clone, Default)]
pub struct ClientLedger {
    /// (address, interface index, outbound) → the element's counter at the last reading.
    last: HashMap<(IpAddr, u32, bool), u64>,
    /// Whether a reading was taken: elements seen at the first are a baseline, later new
    /// ones count from zero.
    started: bool,
    /// Address → uplink → (bytes in, bytes out).
    pub totals: HashMap<IpAddr, BTreeMap<String, (u64, u64)>>,
    /// The readings' deltas, oldest first: when, and (address, uplink) → bytes.
    recent: VecDeque<(Instant, Moved)>,
}

/// One reading's bytes per (address, uplink).
type Moved = HashMap<(IpAddr, String), u64>;

/// How far back `top` looks.
pub const TOP_WINDOW: Duration = Duration::from_secs(60);

/// A client address's bytes through one uplink over `TOP_WINDOW`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Talker {
    pub addr: IpAddr,
    pub uplink: String,
    pub bytes: u64,
}

impl ClientLedger {
    /// Counts a reading; `uplink_of` names the uplink on an interface index (`None`: not
    /// an uplink's, not counted). An element whose counter went down was recreated (it
    /// expired while idle): counted from zero.
    pub fn record(
        &mut self,
        reading: &[ClientBytes],
        uplink_of: impl Fn(u32) -> Option<String>,
        now: Instant,
    ) {
        let mut last = HashMap::with_capacity(reading.len());
        let mut moved = Moved::new();
        let mut names: HashMap<u32, Option<String>> = HashMap::new();
        for e in reading {
            let key = (e.addr, e.ifindex, e.outbound);
            last.insert(key, e.bytes);
            let delta = match self.last.get(&key) {
                Some(&before) => crate::dataplane::nft::moved(e.bytes, before),
                None if self.started => e.bytes,
                None => 0,
            };
            let name = names
                .entry(e.ifindex)
                .or_insert_with(|| uplink_of(e.ifindex));
            let Some(uplink) = name.as_ref() else {
                continue;
            };
            if delta == 0 {
                continue;
            }
            let t = self
                .totals
                .entry(e.addr)
                .or_default()
                .entry(uplink.clone())
                .or_default();
            if e.outbound {
                t.1 = t.1.saturating_add(delta);
            } else {
                t.0 = t.0.saturating_add(delta);
            }
            *moved.entry((e.addr, uplink.clone())).or_default() += delta;
        }
        self.last = last;
        self.started = true;
        self.recent.push_back((now, moved));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > TOP_WINDOW)
        {
            self.recent.pop_front();
        }
    }

    /// The `n` addresses that moved the most bytes through an uplink (`uplink`, or any)
    /// over `TOP_WINDOW`, most first.
    pub fn top(&self, uplink: Option<&str>, n: usize) -> Vec<Talker> {
        let mut sum: HashMap<(IpAddr, &str), u64> = HashMap::new();
        for (_, moved) in &self.recent {
            for ((addr, u), bytes) in moved {
                if uplink.is_none_or(|want| want == u) {
                    *sum.entry((*addr, u.as_str())).or_default() += bytes;
                }
            }
        }
        let mut out: Vec<Talker> = sum
            .into_iter()
            .map(|((addr, uplink), bytes)| Talker {
                addr,
                uplink: uplink.to_string(),
                bytes,
            })
            .collect();
        out.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.addr.cmp(&b.addr)));
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str, tz: &TimeZone) -> Timestamp {
        s.parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned(tz.clone())
            .unwrap()
            .timestamp()
    }

    fn local(t: Timestamp, tz: &TimeZone) -> String {
        t.to_zoned(tz.clone()).datetime().to_string()
    }

    #[test]
    fn periods_start_at_local_midnights_across_dst() {
        let tz = TimeZone::get("Europe/Berlin").unwrap();
        // The day DST starts (2027-03-28) has 23 hours.
        let (s, e) = bounds(QuotaPeriod::Day, at("2027-03-28T12:00", &tz), &tz);
        assert_eq!(local(s, &tz), "2027-03-28T00:00:00");
        assert_eq!(local(e, &tz), "2027-03-29T00:00:00");
        assert_eq!(e.as_second() - s.as_second(), 23 * 3600);
        // A month from the 15th: before the 15th it is last month's.
        let m = QuotaPeriod::Month { starts: 15 };
        let (s, e) = bounds(m, at("2027-03-10T08:00", &tz), &tz);
        assert_eq!(
            (local(s, &tz), local(e, &tz)),
            ("2027-02-15T00:00:00".into(), "2027-03-15T00:00:00".into())
        );
        let (s, _) = bounds(m, at("2027-03-15T00:00", &tz), &tz);
        assert_eq!(local(s, &tz), "2027-03-15T00:00:00");
        // From the 1st, across the new year.
        let (s, e) = bounds(
            QuotaPeriod::Month { starts: 1 },
            at("2027-12-31T23:59", &tz),
            &tz,
        );
        assert_eq!(
            (local(s, &tz), local(e, &tz)),
            ("2027-12-01T00:00:00".into(), "2028-01-01T00:00:00".into())
        );
        // A week from Monday (2027-03-24 is a Wednesday), and one from Sunday.
        let (s, e) = bounds(
            QuotaPeriod::Week { starts: 1 },
            at("2027-03-24T10:00", &tz),
            &tz,
        );
        assert_eq!(
            (local(s, &tz), local(e, &tz)),
            ("2027-03-22T00:00:00".into(), "2027-03-29T00:00:00".into())
        );
        assert_eq!(
            e.as_second() - s.as_second(),
            7 * 86400 - 3600,
            "the week DST starts in"
        );
        let (s, _) = bounds(
            QuotaPeriod::Week { starts: 7 },
            at("2027-03-24T10:00", &tz),
            &tz,
        );
        assert_eq!(local(s, &tz), "2027-03-21T00:00:00");
        let (s, _) = bounds(
            QuotaPeriod::Week { starts: 3 },
            at("2027-03-24T00:00", &tz),
            &tz,
        );
        assert_eq!(local(s, &tz), "2027-03-24T00:00:00", "its own first day");
    }

    #[test]
    fn readings_count_deltas_restarts_and_roll_over() {
        let tz = TimeZone::UTC;
        let uplinks = [Metered {
            name: "lte",
            interface: "wwan0",
            period: QuotaPeriod::Day,
            quota: None,
        }];
        let reading = |rx: u64, tx: u64| BTreeMap::from([("wwan0".to_string(), (rx, tx))]);
        let mut l = Ledger::default();
        // The first reading is the baseline.
        l.record(
            &uplinks,
            &reading(1000, 500),
            at("2027-01-01T10:00", &tz),
            &tz,
        );
        assert_eq!(l.uplinks["lte"].used(), 0);
        l.record(
            &uplinks,
            &reading(1600, 900),
            at("2027-01-01T11:00", &tz),
            &tz,
        );
        assert_eq!((l.uplinks["lte"].rx, l.uplinks["lte"].tx), (600, 400));
        // The counters restarted (table replaced): from zero.
        l.record(&uplinks, &reading(100, 0), at("2027-01-01T12:00", &tz), &tz);
        assert_eq!(l.uplinks["lte"].used(), 1100);
        // Past midnight: a new period, the totals go on.
        let rolled = l.record(
            &uplinks,
            &reading(150, 10),
            at("2027-01-02T00:00:01", &tz),
            &tz,
        );
        assert_eq!(rolled, ["lte"]);
        let u = &l.uplinks["lte"];
        assert_eq!((u.rx, u.tx, u.total_rx, u.total_tx), (50, 10, 750, 410));
    }

    #[test]
    fn quota_levels_move_at_80_and_100_percent_and_back() {
        let tz = TimeZone::UTC;
        let mut uplinks = [Metered {
            name: "lte",
            interface: "wwan0",
            period: QuotaPeriod::Day,
            quota: Some(1000),
        }];
        let reading = |rx: u64| BTreeMap::from([("wwan0".to_string(), (rx, 0))]);
        let mut l = Ledger::default();
        assert!(l.configure(&uplinks).is_empty());
        let t = at("2027-01-01T10:00", &tz);
        l.record(&uplinks, &reading(0), t, &tz);
        l.record(&uplinks, &reading(799), t, &tz);
        assert!(l.levels(&uplinks, None).is_empty(), "79.9 % is under");
        l.record(&uplinks, &reading(800), t, &tz);
        let c = l.levels(&uplinks, None);
        assert_eq!(
            (c[0].from, c[0].to),
            (QuotaLevel::Under, QuotaLevel::Warning)
        );
        assert!(l.levels(&uplinks, None).is_empty(), "reported once");
        l.record(&uplinks, &reading(1200), t, &tz);
        let c = l.levels(&uplinks, None);
        assert_eq!((c[0].to, c[0].used), (QuotaLevel::Exhausted, 1200));
        assert_eq!(c.len(), 1);
        assert_eq!(l.uplinks["lte"].remaining(), Some(0));
        // An operator's cap above the use: within it again.
        l.set_quota(&uplinks[0], 2000);
        let c = l.levels(&uplinks, Some("quota set"));
        assert_eq!(c[0].to, QuotaLevel::Under);
        assert_eq!(c[0].why.as_deref(), Some("quota set"));
        // It holds across a configure with the same config quota …
        assert!(l.configure(&uplinks).is_empty());
        assert_eq!(l.uplinks["lte"].quota, Some(2000));
        // … and goes once the config's quota changes.
        uplinks[0].quota = Some(1100);
        assert_eq!(l.configure(&uplinks), ["lte"]);
        assert_eq!(l.levels(&uplinks, None)[1].to, QuotaLevel::Exhausted);
        // A reset, then the next period: from zero.
        l.reset("lte");
        assert_eq!(l.levels(&uplinks, None)[0].to, QuotaLevel::Under);
        l.record(&uplinks, &reading(2300), t, &tz);
        let c = l.levels(&uplinks, None);
        let steps: Vec<_> = c.iter().map(|c| (c.from, c.to)).collect();
        assert_eq!(
            steps,
            [
                (QuotaLevel::Under, QuotaLevel::Warning),
                (QuotaLevel::Warning, QuotaLevel::Exhausted)
            ],
            "a jump past 80 % warns first"
        );
        l.record(&uplinks, &reading(2300), at("2027-01-02T00:00", &tz), &tz);
        assert_eq!(l.levels(&uplinks, None)[0].to, QuotaLevel::Under);
        // A level survives a save and load.
        let text = serde_json::to_string(&l).unwrap();
        let back: Ledger = serde_json::from_str(&text).unwrap();
        assert_eq!(back, l);
    }

    #[test]
    fn client_readings_count_new_elements_from_zero_and_sum_the_last_minute() {
        let a: IpAddr = "198.19.0.11".parse().unwrap();
        let b: IpAddr = "198.19.0.12".parse().unwrap();
        let e = |addr, ifindex, outbound, bytes| ClientBytes {
            addr,
            ifindex,
            outbound,
            bytes,
        };
        let uplink_of = |i: u32| match i {
            2 => Some("isp1".to_string()),
            3 => Some("isp2".to_string()),
            _ => None,
        };
        let t0 = Instant::now();
        let mut l = ClientLedger::default();
        // The first reading is a baseline.
        l.record(&[e(a, 2, true, 5000)], uplink_of, t0);
        assert!(l.totals.is_empty());
        // a moves 1000 out and 3000 in; b appears (all of it counts); a LAN interface
        // (index 1) is not an uplink.
        l.record(
            &[
                e(a, 2, true, 6000),
                e(a, 2, false, 3000),
                e(b, 3, true, 700),
                e(b, 1, false, 99),
            ],
            uplink_of,
            t0 + Duration::from_secs(5),
        );
        assert_eq!(l.totals[&a]["isp1"], (3000, 1000));
        assert_eq!(l.totals[&b]["isp2"], (0, 700));
        assert!(!l.totals[&b].contains_key("lan0"));
        let top = l.top(None, 10);
        assert_eq!((top[0].addr, top[0].bytes), (a, 4000));
        assert_eq!((top[1].addr, top[1].uplink.as_str()), (b, "isp2"));
        assert_eq!(l.top(Some("isp2"), 10).len(), 1);
        assert_eq!(l.top(None, 1).len(), 1);
        // a's out element expired and came back smaller: from zero.
        l.record(
            &[e(a, 2, true, 200), e(a, 2, false, 3000)],
            uplink_of,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(l.totals[&a]["isp1"], (3000, 1200));
        // A minute later the old deltas are out of the window; the totals stay.
        l.record(&[], uplink_of, t0 + Duration::from_secs(71));
        assert!(l.top(None, 10).is_empty());
        assert_eq!(l.totals[&a]["isp1"], (3000, 1200));
    }
}
