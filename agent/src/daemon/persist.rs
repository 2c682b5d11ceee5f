//! The persistence owner: what uplinkd decided, on disk, written beside the loop.
//!
//! - The decisions writer: pins, drains, failovers waiting for their failback and set
//!   edits are written (temp file, fsync, rename) by a task of their own, so that a slow
//!   disk never holds a decision back. The loop hands it the latest decisions; a write
//!   that is still running when newer ones come is followed by one write of the newest.
//!   The API is shown a decision only once it is on disk (`Persistence::decisions_shown`),
//!   so what it has shown survives a crash.
//! - The client assignments: the state file and its journal, diffed, serialized and
//!   written by a blocking task at most every `state_save_interval`.

use std::time::{Duration, Instant};

use futures::FutureExt;
use prometheus::IntCounterVec;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::error;

use crate::metrics::RateLimitedWarning;
use crate::model::state_file::{Decisions, StateError, StateFile};
use crate::model::{Client, Mac};

type Clients = imbl::OrdMap<Mac, Client>;

/// What the state file and its journal hold.
struct Persisted {
    clients: Clients,
    /// The file's hash, which the journal names as the file it follows.
    base: String,
    journal_lines: usize,
}

/// Journal lines past which the state file is written whole again: a quarter of the
/// clients (at least 4,096), so a load replays little and a save stays small.
fn journal_limit(clients: usize) -> usize {
    (clients / 4).max(4096)
}

pub(super) struct Persistence {
    state: StateFile,
    /// The assignments changed since they were last handed to the writer.
    pub dirty: bool,
    /// When the client assignments were last handed to the writer.
    saved_at: Option<Instant>,
    /// The client assignments being written beside the loop.
    saving: Option<JoinHandle<Result<Persisted, StateError>>>,
    /// What the state file and its journal hold (`None`: unknown, the next write is
    /// whole).
    saved_clients: Option<Persisted>,
    /// The decisions writer's input: the latest decisions, numbered.
    decisions_tx: watch::Sender<(u64, Decisions)>,
    /// The decisions as last handed to the writer, and their number.
    sent_decisions: Decisions,
    decisions_sent: u64,
    /// The number of the decisions last on disk.
    decisions_saved: u64,
    /// The last write failed: the API is not held back for a disk that refuses, and the
    /// write is retried every second.
    pub decisions_failing: bool,
    /// A state directory that is full or read-only is reported at a bounded rate.
    errors: RateLimitedWarning,
    /// `uplinkd_state_save_errors_total`, by file.
    save_errors: IntCounterVec,
}

impl Persistence {
    pub fn new(
        state: StateFile,
        decisions_tx: watch::Sender<(u64, Decisions)>,
        save_errors: IntCounterVec,
    ) -> Persistence {
        Persistence {
            state,
            dirty: true,
            saved_at: None,
            saving: None,
            saved_clients: None,
            decisions_tx,
            sent_decisions: Decisions::default(),
            decisions_sent: 0,
            decisions_saved: 0,
            decisions_failing: false,
            errors: RateLimitedWarning::default(),
            save_errors,
        }
    }

    /// Collects the last write of the assignments if it finished, then hands the
    /// assignments to a new one when they changed and `interval` has passed. A snapshot
    /// of the map (a pointer copy): diffing, serializing and writing all run beside the
    /// loop. What changed since the last save goes to the journal; the file is written
    /// whole when there is none yet or the journal has grown long.
    pub fn save_clients(&mut self, clients: &Clients, interval: Duration) {
        if let Some(h) = &self.saving {
            if !h.is_finished() {
                return;
            }
            let result = self.saving.take().and_then(|h| h.now_or_never());
            match result {
                Some(Ok(Ok(saved))) => self.saved_clients = Some(saved),
                Some(Ok(Err(e))) => {
                    self.saved_clients = None;
                    self.dirty = true;
                    self.save_errors.with_label_values(&["state.json"]).inc();
                    self.errors.warn(|n| error!(error = %e, failures = n, "cannot save assignments; routing goes on, retrying"));
                }
                Some(Err(e)) => {
                    self.saved_clients = None;
                    self.dirty = true;
                    error!(error = %e, "the state writer failed; retrying");
                }
                None => {}
            }
        }
        let due = self.saved_at.is_none_or(|t| t.elapsed() >= interval);
        if !self.dirty || !due {
            return;
        }
        self.dirty = false;
        self.saved_at = Some(Instant::now());
        let clients = clients.clone();
        let state = self.state.clone();
        let saved = self.saved_clients.take();
        self.saving = Some(tokio::task::spawn_blocking(move || match saved {
            Some(s) if s.journal_lines <= journal_limit(clients.len()) => {
                let added = state.append_changes(&s.base, &s.clients, &clients)?;
                Ok(Persisted {
                    clients,
                    base: s.base,
                    journal_lines: s.journal_lines + added,
                })
            }
            _ => Ok(Persisted {
                base: state.write_clients(&clients)?,
                clients,
                journal_lines: 0,
            }),
        }));
    }

    /// Hands changed decisions to the writer; `again` sends them even unchanged (the
    /// retry after a failed write, every second).
    pub fn save_decisions(&mut self, decisions: Decisions, again: bool) {
        if decisions == self.sent_decisions && !again {
            return;
        }
        self.decisions_sent += 1;
        self.sent_decisions = decisions.clone();
        self.decisions_tx
            .send_replace((self.decisions_sent, decisions));
    }

    /// The writer's answer.
    pub fn on_decisions_saved(&mut self, saved: Saved) {
        match saved.result {
            Ok(()) => {
                self.decisions_saved = self.decisions_saved.max(saved.version);
                self.decisions_failing = false;
            }
            Err(e) => {
                self.decisions_failing = true;
                self.save_errors
                    .with_label_values(&["decisions.json"])
                    .inc();
                self.errors.warn(|n| error!(error = %e, failures = n, "cannot save pins, drains and uplink states; routing goes on, retrying every second"));
            }
        }
    }

    /// Whether the API may show the decisions last handed over: they are on disk, or the
    /// disk refuses them (the API is not held back for it).
    pub fn decisions_shown(&self) -> bool {
        self.decisions_saved >= self.decisions_sent || self.decisions_failing
    }

    /// At exit: the last decisions and assignments, written here after the write in
    /// flight, so that nothing is left to the writers.
    pub async fn save_at_exit(&mut self, decisions: &Decisions, clients: &Clients) {
        if let Err(e) = self.state.save_decisions(decisions) {
            error!(error = %e, "cannot save pins, drains and uplink states at exit");
        }
        if let Some(h) = self.saving.take() {
            let _ = h.await;
        }
        if let Err(e) = self.state.write_clients(clients) {
            error!(error = %e, "cannot save assignments at exit");
        }
    }
}

/// A write's outcome, for the decisions the loop numbered `version`.
pub(super) struct Saved {
    pub version: u64,
    pub result: Result<(), StateError>,
}

pub(super) fn spawn(state: StateFile) -> (watch::Sender<(u64, Decisions)>, mpsc::Receiver<Saved>) {
    let (tx, mut rx) = watch::channel((0u64, Decisions::default()));
    let (done_tx, done_rx) = mpsc::channel(4);
    tokio::spawn(async move {
        // Latest wins: what changed while a write ran is written once, after it.
        while rx.changed().await.is_ok() {
            let (version, decisions) = rx.borrow_and_update().clone();
            let state = state.clone();
            let result = tokio::task::spawn_blocking(move || state.save_decisions(&decisions))
                .await
                .unwrap_or_else(|e| {
                    Err(StateError::Io {
                        path: std::path::PathBuf::from("decisions.json"),
                        source: std::io::Error::other(e),
                    })
                });
            if done_tx.send(Saved { version, result }).await.is_err() {
                break;
            }
        }
    });
    (tx, done_rx)
}
