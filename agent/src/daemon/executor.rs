//! The executor owns the dataplane (nft, rtnetlink, conntrack) and does its I/O beside the
//! loop, so that an `nft` that hangs, or a kernel slow to answer, never holds back a
//! decision. The loop sends one job at a time: a plan, and the conntrack deletions due
//! once that plan is in the kernel. The executor commits the plan, deletes the flows, and
//! answers `Applied`. While a job runs the loop keeps deciding. What changes meanwhile is
//! planned once, when the answer arrives, from the model as it is then (the model's journal
//! of touched addresses holds it): one merged apply, however many events came in between.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::Instrument;

use crate::dataplane::{ApplyReport, Dataplane, DataplaneError, ReadBack};
use crate::plan::{Desired, Flush};

/// A flush's outcome: how many entries went, when the tool says; `None`: not run, the
/// plan did not apply cleanly.
pub(super) type FlushOutcome = Option<Result<Option<usize>, DataplaneError>>;

pub(super) struct Job {
    pub seq: u64,
    pub desired: Desired,
    pub read: ReadBack,
    pub flushes: Vec<Flush>,
}

pub(super) struct Applied {
    pub seq: u64,
    pub report: ApplyReport,
    /// The next plan may be incremental: the dataplane holds its copy of the kernel's maps.
    pub takes_increment: bool,
    pub flushed: Vec<(Flush, FlushOutcome)>,
    pub elapsed: Duration,
}

/// Starts the executor, on a thread and runtime of its own, with the dataplane it owns
/// from now on (the apply's futures borrow the plan across awaits, so they stay on one
/// thread).
pub(super) fn spawn(
    mut dataplane: Dataplane,
) -> std::io::Result<(mpsc::Sender<Job>, mpsc::Receiver<Applied>)> {
    // One job in flight, one answer waiting: the loop never sends a second job before the
    // first one's answer.
    let (job_tx, mut job_rx) = mpsc::channel::<Job>(1);
    let (done_tx, done_rx) = mpsc::channel(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("uplinkd-apply".into())
        .spawn(move || {
            runtime.block_on(async move {
                while let Some(job) = job_rx.recv().await {
                    let started = Instant::now();
                    let span = tracing::info_span!(
                        "apply",
                        seq = job.seq,
                        full = job.read == ReadBack::Full,
                        errors = tracing::field::Empty
                    );
                    let applied = run(&mut dataplane, job, started)
                        .instrument(span.clone())
                        .await;
                    span.record("errors", applied.report.errors.len());
                    if done_tx.send(applied).await.is_err() {
                        break;
                    }
                }
            })
        })?;
    Ok((job_tx, done_rx))
}

async fn run(dataplane: &mut Dataplane, job: Job, started: Instant) -> Applied {
    let report = dataplane.apply(&job.desired, job.read).await;
    let mut flushed = Vec::with_capacity(job.flushes.len());
    for f in job.flushes {
        // Only once the new paths are in the kernel: the flows re-establish on them.
        let outcome = if report.errors.is_empty() {
            Some(dataplane.flush_conntrack_masked(f.mark, f.mask).await)
        } else {
            None
        };
        flushed.push((f, outcome));
    }
    Applied {
        seq: job.seq,
        takes_increment: dataplane.takes_increment(ReadBack::Cache),
        report,
        flushed,
        elapsed: started.elapsed(),
    }
}
