//! Bytes each uplink carried, in total and in its billing period (`quota_period`,
//! `quota_reset`), whose bounds are midnights in the gateway's local time zone, so a day
//! that a DST change shortens or lengthens is a period of 23 or 25 hours. Readings of the
//! dataplane's per-interface counters are turned into these figures here; the owner that
//! reads and persists them is `daemon::usage`.

use std::collections::BTreeMap;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use serde::{Deserialize, Serialize};

use crate::config::QuotaPeriod;

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
/// since uplinkd first counted it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkUsage {
    pub period_start: i64,
    pub rx: u64,
    pub tx: u64,
    pub total_rx: u64,
    pub total_tx: u64,
}

impl UplinkUsage {
    /// Bytes in and out in the period.
    pub fn used(&self) -> u64 {
        self.rx.saturating_add(self.tx)
    }
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
}
