//! Passive evidence. Of life: a failed probe round is excused while the uplink keeps
//! carrying replies to LAN flows (the probe targets may be what failed, not the path).
//! Of failure: LAN packets that leave by an uplink and get no reply at all for
//! `health.passive_window` make it suspect (`Silence`). The decisions are pure functions
//! of the counters and the times they were read.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// The replies to LAN flows each uplink (index) carried, per family (IPv6?), as last read,
/// and when.
#[derive(Debug, Default)]
pub struct Forwarded(HashMap<(usize, bool), (u64, Instant)>);

impl Forwarded {
    /// Records this reading of `uplink`'s reply counters (IPv4, IPv6) and says whether it
    /// excuses a failed round: in every family whose probes failed (`failed`: IPv6?), the
    /// counter grew since the previous reading, and that reading is at most `recent` old.
    /// A round with no failed family is not excused (there is nothing to excuse), and a
    /// counter that went backwards (the table was replaced) proves nothing. IPv6 traffic
    /// says nothing about a dead IPv4 path, nor the reverse.
    pub fn excuses(
        &mut self,
        uplink: usize,
        failed: &BTreeSet<bool>,
        replies: (u64, u64),
        now: Instant,
        recent: Duration,
    ) -> bool {
        let mut excused = !failed.is_empty();
        for (v6, packets) in [(false, replies.0), (true, replies.1)] {
            let grew = self
                .0
                .insert((uplink, v6), (packets, now))
                .is_some_and(|(before, at)| packets > before && now.duration_since(at) <= recent);
            if failed.contains(&v6) && !grew {
                excused = false;
            }
        }
        excused
    }
}

/// Per uplink interface, whether LAN packets that left by it are going unanswered.
#[derive(Debug)]
pub struct Silence {
    window: Duration,
    /// After a suspicion, the next one of the same silence comes this much later at the
    /// earliest: a client sending to one dead server keeps the interface unanswered, and
    /// each suspicion costs a probe burst.
    again: Duration,
    seen: HashMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    tx: u64,
    replies: u64,
    at: Instant,
    /// When the packets that went unanswered since the last reply left, at the earliest:
    /// after the reading before the one that saw them, and at most a fifth of the window
    /// before that one.
    unanswered: Option<Instant>,
    suspected: Option<Instant>,
    /// Packets left between the last two readings.
    moved: bool,
}

impl Silence {
    pub fn new(window: Duration, again: Duration) -> Silence {
        Silence {
            window,
            again,
            seen: HashMap::new(),
        }
    }

    /// How long to wait for the next reading: a fifth of the window while packets leave
    /// by some interface, the whole window while none does (an idle gateway reads its
    /// counters seldom; traffic that starts is seen within a window).
    pub fn next_reading(&self) -> Duration {
        if self.seen.values().any(|s| s.moved) {
            (self.window / 5).max(Duration::from_millis(5))
        } else {
            self.window
        }
    }

    /// Records a reading of `interface`'s counters: LAN packets out (`tx`), and replies in
    /// (both families). When the interface turns suspect now, how long it has been silent:
    /// packets left at least `window` ago and not one reply came since. A reply ends the
    /// silence; counters that went backwards (the table was replaced) start it afresh.
    pub fn reading(
        &mut self,
        interface: &str,
        tx: u64,
        replies: u64,
        now: Instant,
    ) -> Option<Duration> {
        let Some(s) = self.seen.get_mut(interface) else {
            self.seen.insert(
                interface.to_string(),
                Seen {
                    tx,
                    replies,
                    at: now,
                    unanswered: None,
                    suspected: None,
                    moved: false,
                },
            );
            return None;
        };
        s.moved = tx > s.tx;
        if replies != s.replies || tx < s.tx {
            s.unanswered = None;
            s.suspected = None;
        } else if s.moved && s.unanswered.is_none() {
            let earliest = now.checked_sub(self.window / 5).unwrap_or(now);
            s.unanswered = Some(s.at.max(earliest));
        }
        (s.tx, s.replies, s.at) = (tx, replies, now);
        let silent = s
            .unanswered
            .map(|t| now.duration_since(t))
            .filter(|d| *d >= self.window)?;
        let due = s
            .suspected
            .is_none_or(|t| now.duration_since(t) >= self.again);
        if due {
            s.suspected = Some(now);
        }
        due.then_some(silent)
    }

    /// Forgets interfaces no uplink uses any more.
    pub fn retain(&mut self, interfaces: &[&str]) {
        self.seen.retain(|i, _| interfaces.contains(&i.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_left_unanswered_for_the_window_make_the_interface_suspect_once_a_while() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut s = Silence::new(ms(150), ms(1000));
        let mut at = |tx, replies, t| s.reading("wan0", tx, replies, t0 + ms(t));
        assert_eq!(at(100, 90, 0), None, "a first reading proves nothing");
        // Traffic both ways: nothing to suspect, however long.
        assert_eq!(at(110, 99, 30), None);
        assert_eq!(at(120, 108, 300), None);
        assert_eq!(s.next_reading(), ms(30), "packets leave: read often");
        let mut at = |tx, replies, t| s.reading("wan0", tx, replies, t0 + ms(t));
        // Idle for a long time, then one packet leaves: it left at most 30 ms (a fifth of
        // the window) before it was seen, and its reply gets the rest of the window.
        assert_eq!(at(120, 108, 4900), None);
        assert_eq!(s.next_reading(), ms(150), "idle: read once a window");
        let mut at = |tx, replies, t| s.reading("wan0", tx, replies, t0 + ms(t));
        assert_eq!(at(121, 108, 5000), None);
        assert_eq!(at(121, 108, 5100), None);
        assert_eq!(at(122, 108, 5120), Some(ms(150)), "150 ms unanswered");
        assert_eq!(at(125, 108, 5180), None, "said once");
        assert_eq!(
            at(130, 108, 6150),
            Some(ms(1180)),
            "still unanswered a second later (one dead server): again"
        );
        // A reply ends it; the window starts after the last reading that saw one.
        assert_eq!(at(131, 109, 6200), None);
        assert_eq!(at(132, 109, 6230), None);
        assert_eq!(at(133, 109, 6340), None);
        assert_eq!(at(134, 109, 6350), Some(ms(150)));
        // Counters that went backwards start afresh; another interface is its own.
        assert_eq!(at(5, 0, 7000), None);
        assert_eq!(s.reading("wan1", 5, 0, t0 + ms(7000)), None);
        s.retain(&["wan1"]);
        assert_eq!(
            s.reading("wan0", 10, 0, t0 + ms(9000)),
            None,
            "forgotten: a first reading"
        );
    }

    #[test]
    fn replies_excuse_only_the_families_they_cross_and_only_lately() {
        let (t0, recent) = (Instant::now(), Duration::from_secs(1));
        let v4: BTreeSet<bool> = [false].into();
        let mut f = Forwarded::default();
        assert!(
            !f.excuses(0, &v4, (10, 0), t0, recent),
            "a first reading proves nothing"
        );
        let t1 = t0 + Duration::from_millis(400);
        assert!(f.excuses(0, &v4, (15, 0), t1, recent), "IPv4 replies grew");
        // IPv6 replies say nothing about a dead IPv4 path.
        let t2 = t1 + Duration::from_millis(400);
        assert!(!f.excuses(0, &v4, (15, 9), t2, recent));
        // Both families failed: both must have grown.
        let both: BTreeSet<bool> = [false, true].into();
        let t3 = t2 + Duration::from_millis(400);
        assert!(!f.excuses(0, &both, (20, 9), t3, recent));
        let t4 = t3 + Duration::from_millis(400);
        assert!(f.excuses(0, &both, (21, 10), t4, recent));
        // Too old a previous reading, a counter that went backwards, another uplink's.
        assert!(!f.excuses(0, &v4, (30, 10), t4 + Duration::from_secs(2), recent));
        let t5 = t4 + Duration::from_secs(2) + Duration::from_millis(100);
        assert!(!f.excuses(0, &v4, (3, 10), t5, recent));
        assert!(!f.excuses(1, &v4, (99, 0), t5, recent));
        // Nothing failed: nothing to excuse.
        assert!(!f.excuses(0, &BTreeSet::new(), (50, 10), t5, recent));
    }
}
