//! Passive evidence of life: a failed probe round is excused while the uplink keeps
//! carrying replies to LAN flows (the probe targets may be what failed, not the path).
//! The decision is a pure function of the reply counters and their readings.

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

#[cfg(test)]
mod tests {
    use super::*;

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
