//! The usage owner: beside the loop, it reads the dataplane's per-interface byte counters
//! every second, counts what they moved into each uplink's ledger (`usage::Ledger`: the
//! billing period and the total), and writes the ledger to `usage.json` every
//! `agent.state_save_interval` and at exit. A crash or a reboot loses at most one
//! interval; a restart loses nothing the kernel's counters kept meanwhile, since the
//! ledger holds the readings it counted up to.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dataplane::nft;
use crate::metrics::{RateLimitedWarning, UsageMetrics};
use crate::model::state_file::StateFile;
use crate::usage::{Ledger, Metered};

/// A test's clock: a file holding the Unix time (seconds) the usage periods are judged
/// at, read at every count. Unset: the system clock.
pub const CLOCK_ENV: &str = "UPLINKD_USAGE_CLOCK";

/// How often the counters are read.
const EVERY: Duration = Duration::from_secs(1);

pub(super) struct Usage {
    pub snapshot: watch::Receiver<Arc<Ledger>>,
    metrics: UsageMetrics,
    config: watch::Sender<Arc<Config>>,
    save: mpsc::Sender<oneshot::Sender<()>>,
    begin: Option<oneshot::Sender<()>>,
}

impl Usage {
    /// Starts counting: the table and its counters are in the kernel now.
    pub fn begin(&mut self) {
        if let Some(b) = self.begin.take() {
            let _ = b.send(());
        }
    }

    /// A reload: the uplinks and their periods from now on. The series of uplinks it
    /// removed go before the reload answers.
    pub fn reconfigure(&self, config: Arc<Config>) {
        self.metrics.configure(&config);
        let _ = self.config.send(config);
    }

    /// Writes the ledger now (at exit), waiting at most `bound`.
    pub async fn save_now(&self, bound: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.save.send(tx).await.is_ok() && tokio::time::timeout(bound, rx).await.is_err() {
            warn!(after = ?bound, "the usage file was not written at exit in time");
        }
    }
}

pub(super) fn spawn(
    config: Arc<Config>,
    state: StateFile,
    counters: nft::Counters,
    metrics: UsageMetrics,
) -> Usage {
    let ledger = match state.load_usage() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            // Kept aside, never deleted: the operator can read what it held.
            let aside = state.set_aside_usage(crate::model::now_millis());
            error!(error = %e, aside = ?aside.as_ref().ok(), "cannot read the usage file; counting from zero (the old file is kept aside)");
            Ledger::default()
        }
    };
    metrics.configure(&config);
    metrics.publish(&ledger);
    let handle = metrics.clone();
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(ledger.clone()));
    let (config_tx, mut config_rx) = watch::channel(config);
    let (save, mut save_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let (begin, begun) = oneshot::channel();
    tokio::spawn(async move {
        // A dropped sender (the agent stops before its first apply) begins too.
        let _ = begun.await;
        let mut ledger = ledger;
        let tz = TimeZone::system();
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut every_save = tokio::time::interval(config_rx.borrow().agent.state_save_interval);
        let (mut saved, failing) = (ledger.clone(), RateLimitedWarning::default());
        let unreadable = RateLimitedWarning::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let traffic = match counters.read(EVERY).await {
                        Ok(t) => t,
                        Err(e) => {
                            unreadable.warn(|n| warn!(error = %e, times = n, "cannot read the traffic counters for the usage"));
                            continue;
                        }
                    };
                    let reading = traffic
                        .iter()
                        .map(|(iface, t)| (iface.clone(), (t.rx.1, t.tx.1)))
                        .collect();
                    let config = config_rx.borrow().clone();
                    let uplinks: Vec<Metered> = config
                        .uplinks
                        .iter()
                        .map(|u| Metered { name: &u.name, interface: &u.interface, period: u.quota_period })
                        .collect();
                    for name in ledger.record(&uplinks, &reading, now(), &tz) {
                        info!(uplink = %name, "a new usage period started");
                    }
                    metrics.publish(&ledger);
                    let _ = snapshot_tx.send(Arc::new(ledger.clone()));
                }
                _ = every_save.tick() => {
                    if ledger != saved {
                        match write(&state, &ledger).await {
                            Ok(()) => saved = ledger.clone(),
                            Err(e) => failing.warn(|n| error!(error = %e, times = n, "cannot write the usage file; retried at the next save")),
                        }
                    }
                }
                Some(reply) = save_rx.recv() => {
                    if let Err(e) = write(&state, &ledger).await {
                        error!(error = %e, "cannot write the usage file at exit");
                    }
                    let _ = reply.send(());
                }
                changed = config_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Usage {
        snapshot,
        metrics: handle,
        config: config_tx,
        save,
        begin: Some(begin),
    }
}

async fn write(state: &StateFile, ledger: &Ledger) -> Result<(), String> {
    let (state, ledger) = (state.clone(), ledger.clone());
    tokio::task::spawn_blocking(move || state.save_usage(&ledger))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The time usage periods are judged at: the system clock, or a test's (`CLOCK_ENV`).
fn now() -> Timestamp {
    std::env::var_os(CLOCK_ENV)
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|s| s.trim().parse::<i64>().ok())
        .and_then(|secs| Timestamp::from_second(secs).ok())
        .unwrap_or_else(Timestamp::now)
}
