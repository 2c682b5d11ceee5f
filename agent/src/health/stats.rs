//! RTT, loss and jitter over a sliding window of probes.

use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Stats {
    window: usize,
    /// Each probe's RTT, `None` when lost; oldest first.
    samples: VecDeque<Option<Duration>>,
}

impl Stats {
    pub fn new(window: usize) -> Stats {
        Stats {
            window: window.max(1),
            samples: VecDeque::new(),
        }
    }

    pub fn push(&mut self, rtt: Option<Duration>) {
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back(rtt);
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// A new window (a reload changed `stats_window`): the newest samples stay.
    pub fn resize(&mut self, window: usize) {
        self.window = window.max(1);
        while self.samples.len() > self.window {
            self.samples.pop_front();
        }
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// Lost probes in the window.
    pub fn lost(&self) -> usize {
        self.samples.iter().filter(|s| s.is_none()).count()
    }

    /// Lost probes over all probes in the window (0 when empty).
    pub fn loss(&self) -> f64 {
        if self.samples.is_empty() {
            return 0.0;
        }
        self.samples.iter().filter(|s| s.is_none()).count() as f64 / self.samples.len() as f64
    }

    pub fn median_rtt(&self) -> Option<Duration> {
        let mut rtts: Vec<Duration> = self.samples.iter().flatten().copied().collect();
        if rtts.is_empty() {
            return None;
        }
        rtts.sort();
        Some(rtts[rtts.len() / 2])
    }

    /// The slowest answer in the window.
    pub fn max_rtt(&self) -> Option<Duration> {
        self.samples.iter().flatten().max().copied()
    }

    /// Mean absolute difference between consecutive answered probes.
    pub fn jitter(&self) -> Option<Duration> {
        let rtts: Vec<Duration> = self.samples.iter().flatten().copied().collect();
        if rtts.len() < 2 {
            return None;
        }
        let total: Duration = rtts.windows(2).map(|w| w[0].abs_diff(w[1])).sum();
        Some(total / (rtts.len() - 1) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_loss_median_jitter() {
        let ms = Duration::from_millis;
        let mut s = Stats::new(4);
        for r in [Some(ms(10)), None, Some(ms(30)), Some(ms(20)), Some(ms(40))] {
            s.push(r);
        }
        // The window holds the last 4: None, 30, 20, 40.
        assert_eq!(s.samples(), 4);
        assert_eq!(s.loss(), 0.25);
        assert_eq!(s.median_rtt(), Some(ms(30)));
        assert_eq!(s.jitter(), Some(ms(15)));
        assert_eq!(s.max_rtt(), Some(ms(40)));
        assert_eq!(Stats::new(4).max_rtt(), None);
    }
}
