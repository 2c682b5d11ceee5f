//! The publishing owner: what the readers beside the loop see. The API reads a snapshot
//! (a pointer copy of the persistent client maps), `/metrics` reads gauges, `/readyz`
//! reads whether the last apply left the kernel as planned; none of them asks the loop.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::watch;

use crate::api::{snapshot::Snapshot, view};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::Model;

pub(super) struct Publisher {
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// A snapshot waits for the decisions it shows to be on disk.
    waiting: bool,
    /// The model changed since the gauges were last published.
    pub gauges_dirty: bool,
    /// The last apply left the kernel as planned; `/readyz` reads it.
    pub in_sync: Arc<AtomicBool>,
    started: Instant,
    metrics: Arc<Metrics>,
}

impl Publisher {
    /// Until the first snapshot the API refuses reads (`starting`): a snapshot of the
    /// restored model would make the start's mutations copy every client once, and the
    /// empty one would show every uplink down and no client.
    pub fn new(config: &Arc<Config>, metrics: Arc<Metrics>, started: Instant) -> Publisher {
        Publisher {
            snapshot: watch::Sender::new(Arc::new(Snapshot {
                config: config.clone(),
                model: Model::new(config),
                generation: 1,
                in_sync: false,
                refused: Arc::new(Vec::new()),
                started,
                starting: true,
            })),
            waiting: false,
            gauges_dirty: true,
            in_sync: Arc::new(AtomicBool::new(false)),
            started,
            metrics,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.subscribe()
    }

    pub fn in_sync(&self) -> bool {
        self.in_sync.load(Ordering::SeqCst)
    }

    /// A snapshot is held back until the decisions it shows are on disk.
    pub fn waiting(&self) -> bool {
        self.waiting
    }

    /// Hands the API a snapshot of the model, or holds it back while the decisions it
    /// shows are not on disk yet (`shown` false); the writer's answer publishes it then.
    pub fn snapshot(
        &mut self,
        config: &Arc<Config>,
        model: &Model,
        generation: u64,
        refused: &Arc<Vec<String>>,
        shown: bool,
    ) {
        self.waiting = !shown;
        if !shown {
            return;
        }
        self.snapshot.send_replace(Arc::new(Snapshot {
            config: config.clone(),
            model: model.clone(),
            generation,
            in_sync: self.in_sync(),
            refused: refused.clone(),
            started: self.started,
            starting: false,
        }));
    }

    /// Publishes the model's gauges (states, client counts) if anything changed since
    /// the last time.
    pub fn gauges(&mut self, config: &Config, model: &Model) {
        if !self.gauges_dirty {
            return;
        }
        self.gauges_dirty = false;
        let carried = view::carried(config, model);
        self.metrics
            .publish(config, model, &carried, self.in_sync());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_waits_for_its_decisions_on_disk() {
        let text = "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\n";
        let config = Arc::new(Config::parse(std::path::Path::new("t"), text).unwrap());
        let mut p = Publisher::new(&config, Metrics::new(), Instant::now());
        let rx = p.subscribe();
        let model = Model::new(&config);
        let refused = Arc::new(Vec::new());
        p.snapshot(&config, &model, 2, &refused, false);
        assert!(p.waiting());
        assert_eq!(rx.borrow().generation, 1, "held back");
        assert!(
            rx.borrow().starting,
            "the placeholder until the first snapshot"
        );
        p.in_sync.store(true, Ordering::SeqCst);
        p.snapshot(&config, &model, 2, &refused, true);
        assert!(!p.waiting());
        assert_eq!(rx.borrow().generation, 2);
        assert!(rx.borrow().in_sync);
        assert!(!rx.borrow().starting);
    }
}
