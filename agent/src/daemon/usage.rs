//! The usage owner: beside the loop, it reads the dataplane's per-interface byte counters
//! every second, counts what they moved into each uplink's ledger (`usage::Ledger`: the
//! billing period and the total), and writes the ledger to `usage.json` every
//! `agent.state_save_interval` and at exit. A crash or a reboot loses at most one
//! interval; a restart loses nothing the kernel's counters kept meanwhile, since the
//! ledger holds the readings it counted up to.
//!
//! It also judges each uplink's quota level after every count and reports the changes to
//! the loop (`QuotaReport`), which holds the uplink as its `quota_action` says. An
//! operator's `quota set` and `quota reset` come here through the loop: written to the
//! file before the loop applies them, so that what the API answered survives a crash.

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
use crate::usage::{ClientLedger, Ledger, Metered, QuotaChange, QuotaLevel};

/// A test's clock: a file holding the Unix time (seconds) the usage periods are judged
/// at, read at every count. Unset: the system clock.
pub const CLOCK_ENV: &str = "UPLINKD_USAGE_CLOCK";

/// How often the counters are read.
const EVERY: Duration = Duration::from_secs(1);
/// How often the per-client sets are read (`lan.client_usage`): each reading walks every
/// element.
const CLIENTS_EVERY: Duration = Duration::from_secs(5);

pub(super) struct Usage {
    pub snapshot: watch::Receiver<Arc<Ledger>>,
    /// Per client (`lan.client_usage`), as last counted.
    pub clients: watch::Receiver<Arc<ClientLedger>>,
    metrics: UsageMetrics,
    config: watch::Sender<Arc<Config>>,
    save: mpsc::Sender<oneshot::Sender<()>>,
    begin: Option<oneshot::Sender<()>>,
    requests: mpsc::Sender<QuotaRequest>,
}

/// An operator's change to an uplink's quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaOp {
    /// The period's count starts again from zero.
    Reset,
    /// A cap over the config's, until a reload changes the config's.
    Set(u64),
}

pub(super) struct QuotaRequest {
    pub uplink: String,
    pub op: QuotaOp,
    pub reply: crate::api::Reply<uplink_api::v1::Uplink>,
}

/// What the owner tells the loop: quota levels that moved, and an operator's request once
/// it is counted and written (`Err`: the file could not be written, nothing changed),
/// with what it did for the event log.
pub(super) struct QuotaReport {
    pub changes: Vec<QuotaChange>,
    pub request: Option<(QuotaRequest, Result<String, String>)>,
}

/// Room for operators' requests waiting for the owner: beyond it, they are refused.
const REQUESTS: usize = 16;

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

    /// Hands an operator's request to the owner; refused (answered at once) while too many
    /// wait.
    pub fn request(&self, r: QuotaRequest) {
        if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) =
            self.requests.try_send(r)
        {
            let _ = r.reply.send(Err(crate::api::ApiError::Unavailable(
                "the usage counter is busy with other quota changes; try again".into(),
            )));
        }
    }

    /// Writes the ledger now (at exit), waiting at most `bound`.
    pub async fn save_now(&self, bound: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.save.send(tx).await.is_ok() && tokio::time::timeout(bound, rx).await.is_err() {
            warn!(after = ?bound, "the usage file was not written at exit in time");
        }
    }
}

/// Starts the owner. Returns it and each uplink's quota level now, for the model's first
/// plan.
pub(super) fn spawn(
    config: Arc<Config>,
    state: StateFile,
    counters: nft::Counters,
    metrics: UsageMetrics,
    reports: mpsc::Sender<QuotaReport>,
) -> (Usage, Vec<(String, QuotaLevel)>) {
    let mut ledger = match state.load_usage() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => {
            // Kept aside, never deleted: the operator can read what it held.
            let aside = state.set_aside_usage(crate::model::now_millis());
            error!(error = %e, aside = ?aside.as_ref().ok(), "cannot read the usage file; counting from zero (the old file is kept aside)");
            Ledger::default()
        }
    };
    let uplinks = metered(&config);
    for name in ledger.configure(&uplinks) {
        info!(uplink = %name, "the operator's quota is dropped: the config's quota changed since it was set");
    }
    // The levels as the quotas in force say, for the first plan; a change from what the
    // file left (the config's quota changed meanwhile) is reported as an event once the
    // loop runs.
    let first = ledger.levels(&uplinks, Some("the config's quota"));
    let levels: Vec<(String, QuotaLevel)> = config
        .uplinks
        .iter()
        .map(|u| (u.name.clone(), ledger.level(&u.name)))
        .collect();
    metrics.configure(&config);
    metrics.publish(&ledger);
    let handle = metrics.clone();
    let (snapshot_tx, snapshot) = watch::channel(Arc::new(ledger.clone()));
    let (clients_tx, clients) = watch::channel(Arc::new(ClientLedger::default()));
    let (config_tx, mut config_rx) = watch::channel(config);
    let (save, mut save_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let (begin, begun) = oneshot::channel();
    let (requests, mut requests_rx) = mpsc::channel::<QuotaRequest>(REQUESTS);
    tokio::spawn(async move {
        if !first.is_empty() {
            let _ = reports
                .send(QuotaReport {
                    changes: first,
                    request: None,
                })
                .await;
        }
        // A dropped sender (the agent stops before its first apply) begins too.
        let _ = begun.await;
        let tz = TimeZone::system();
        let mut tick = tokio::time::interval(EVERY);
        let mut clients_tick = tokio::time::interval(CLIENTS_EVERY);
        clients_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut per_client = ClientLedger::default();
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
                    let uplinks = metered(&config);
                    let rolled = ledger.record(&uplinks, &reading, now(), &tz);
                    for name in &rolled {
                        info!(uplink = %name, "a new usage period started");
                    }
                    let mut changes = ledger.levels(&uplinks, None);
                    for c in changes.iter_mut().filter(|c| rolled.contains(&c.uplink)) {
                        c.why = Some("a new period".into());
                    }
                    metrics.publish(&ledger);
                    let _ = snapshot_tx.send(Arc::new(ledger.clone()));
                    if !changes.is_empty() {
                        let _ = reports.send(QuotaReport { changes, request: None }).await;
                    }
                }
                _ = clients_tick.tick() => {
                    let config = config_rx.borrow().clone();
                    if !config.lan.client_usage {
                        continue;
                    }
                    match counters.client_bytes().await {
                        Ok(reading) => {
                            let uplink_of = |ifindex: u32| {
                                let name = interface_name(ifindex)?;
                                config.uplinks.iter().find(|u| u.interface == name).map(|u| u.name.clone())
                            };
                            per_client.record(&reading, uplink_of, std::time::Instant::now());
                            let _ = clients_tx.send(Arc::new(per_client.clone()));
                        }
                        Err(e) => unreadable.warn(|n| warn!(error = %e, times = n, "cannot read the per-client usage sets")),
                    }
                }
                Some(r) = requests_rx.recv() => {
                    let config = config_rx.borrow().clone();
                    let uplinks = metered(&config);
                    let before = ledger.clone();
                    let size = uplink_api::size::format;
                    let was = before.uplinks.get(&r.uplink).cloned().unwrap_or_default();
                    let (why, did) = match r.op {
                        QuotaOp::Reset => {
                            ledger.reset(&r.uplink);
                            ("an operator's reset", format!("an operator reset the period's count ({} used before)", size(was.used())))
                        }
                        QuotaOp::Set(bytes) => {
                            let config = uplinks.iter().find(|u| u.name == r.uplink);
                            if let Some(u) = config {
                                ledger.set_quota(u, bytes);
                            }
                            let theirs = config.and_then(|u| u.quota).map_or("none".into(), size);
                            ("an operator's quota", format!("an operator set the quota to {} (the config's: {theirs}; it holds until a reload changes that)", size(bytes)))
                        }
                    };
                    let changes = ledger.levels(&uplinks, Some(why));
                    // Written before the answer: what the API shows survives a crash.
                    let written = write(&state, &ledger).await.map(|()| did);
                    let changes = match written {
                        Ok(_) => {
                            saved = ledger.clone();
                            metrics.publish(&ledger);
                            let _ = snapshot_tx.send(Arc::new(ledger.clone()));
                            changes
                        }
                        Err(_) => {
                            ledger = before;
                            Vec::new()
                        }
                    };
                    let _ = reports.send(QuotaReport { changes, request: Some((r, written)) }).await;
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
                    let config = config_rx.borrow_and_update().clone();
                    if config.agent.state_save_interval != every_save.period() {
                        every_save = tokio::time::interval(config.agent.state_save_interval);
                    }
                    let uplinks = metered(&config);
                    for name in ledger.configure(&uplinks) {
                        info!(uplink = %name, "the operator's quota is dropped: the reload changed the config's quota");
                    }
                    let changes = ledger.levels(&uplinks, Some("the config's quota"));
                    metrics.publish(&ledger);
                    let _ = snapshot_tx.send(Arc::new(ledger.clone()));
                    if !changes.is_empty() {
                        let _ = reports.send(QuotaReport { changes, request: None }).await;
                    }
                }
            }
        }
    });
    (
        Usage {
            snapshot,
            clients,
            metrics: handle,
            config: config_tx,
            save,
            begin: Some(begin),
            requests,
        },
        levels,
    )
}

/// The name of the interface with index `i`, if one has it now.
fn interface_name(i: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(i, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the kernel wrote a NUL-terminated name into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

fn metered(config: &Config) -> Vec<Metered<'_>> {
    config
        .uplinks
        .iter()
        .map(|u| Metered {
            name: &u.name,
            interface: &u.interface,
            period: u.quota_period,
            quota: u.quota,
        })
        .collect()
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
