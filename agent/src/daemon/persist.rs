//! The decisions writer: pins, drains, failovers waiting for their failback and set edits
//! are written (temp file, fsync, rename) beside the loop, so that a slow disk never holds
//! a decision back. The loop hands it the latest decisions; a write that is still running
//! when newer ones come is followed by one write of the newest. The API is shown a
//! decision only once it is on disk (`Agent::publish_snapshot`), so what it has shown
//! survives a crash.

use tokio::sync::{mpsc, watch};

use crate::model::state_file::{Decisions, StateError, StateFile};

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
