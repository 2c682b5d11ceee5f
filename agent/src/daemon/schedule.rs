//! The apply scheduling owner: one job in the executor's hands at a time; what is asked
//! for meanwhile is merged and planned once, when the executor answers; API writes wait
//! for the apply that carries them; a failed apply is retried with a doubling backoff.
//! It decides when, never what: the agent plans the job from the model.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::error;

use super::executor;
use crate::dataplane::ReadBack;

/// First wait before an apply that failed is retried; it doubles up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The job in the executor's hands, and what the loop planned with it.
pub(super) struct InFlight {
    pub seq: u64,
    /// The config generation it was planned under: a reload since then makes its uplink
    /// and policy indices stale.
    pub generation: u64,
    pub read: ReadBack,
    /// The plan's default policy reads the client sets.
    pub client_mode: bool,
    /// Where the plan sends a client without an assignment.
    pub unassigned_to: Option<String>,
    /// When the oldest event this job carries arrived.
    pub since: Option<Instant>,
    /// Flows NATed to these addresses go once the plan is in.
    pub gone_addrs: Vec<(usize, IpAddr)>,
}

/// What an API write is told once the apply that carries it is answered.
pub(super) type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// An API write waiting for the apply that carries it (`seq`) to be answered.
struct Waiter {
    seq: u64,
    done: Done,
}

pub(super) struct Scheduler {
    /// Jobs for the executor, which owns the dataplane.
    jobs: mpsc::Sender<executor::Job>,
    /// The job the executor is working on.
    inflight: Option<InFlight>,
    /// An apply asked for since the job in flight was planned: how much to read back.
    wanted: Option<ReadBack>,
    /// When the oldest event waiting for `wanted` arrived (dispatch latency).
    wanted_since: Option<Instant>,
    next_seq: u64,
    /// The executor's dataplane holds its copy of the kernel's maps: a plan may be
    /// incremental.
    pub takes_increment: bool,
    /// API writes that answer once their change is in the kernel.
    waiters: Vec<Waiter>,
    /// Probers are reconciled once the pending apply is in the kernel (a new route first).
    pub probers_after_apply: bool,
    /// The last apply failed (or its flows could not be deleted): retried at `retry_at`.
    needs_retry: bool,
    retry_at: Option<Instant>,
    /// The wait after the next failure.
    retry_backoff: Duration,
}

impl Scheduler {
    pub fn new(jobs: mpsc::Sender<executor::Job>, takes_increment: bool) -> Scheduler {
        Scheduler {
            jobs,
            inflight: None,
            wanted: None,
            wanted_since: None,
            next_seq: 1,
            takes_increment,
            waiters: Vec::new(),
            probers_after_apply: false,
            needs_retry: false,
            retry_at: None,
            retry_backoff: RETRY_MIN,
        }
    }

    /// Records that an apply reading back `read` is wanted (merged with what already is);
    /// returns whether a job can be sent now.
    pub fn want(&mut self, read: ReadBack) -> bool {
        self.wanted = Some(read_merge(self.wanted, read));
        self.inflight.is_none()
    }

    /// An event that will need an apply arrived at `at` (for the dispatch latency).
    pub fn event_at(&mut self, at: Instant) {
        self.wanted_since.get_or_insert(at);
    }

    /// The apply sequence number that will carry a change made now.
    pub fn seq_of_next_change(&self) -> u64 {
        match &self.inflight {
            Some(f) if self.wanted.is_none() => f.seq,
            _ => self.next_seq,
        }
    }

    /// An apply is in flight or wanted.
    pub fn pending(&self) -> bool {
        self.inflight.is_some() || self.wanted.is_some()
    }

    pub fn in_flight(&self) -> bool {
        self.inflight.is_some()
    }

    /// What the next job reads back, when one is wanted and the executor is free.
    pub fn take_wanted(&mut self) -> Option<ReadBack> {
        if self.inflight.is_some() {
            return None;
        }
        self.wanted.take()
    }

    /// Forgets what is wanted (at exit: the next start plans again).
    pub fn forget_wanted(&mut self) {
        self.wanted = None;
    }

    /// Numbers the job, hands it to the executor and keeps what it was planned with.
    pub fn send(&mut self, mut job: executor::Job, mut flight: InFlight) {
        let seq = self.next_seq;
        self.next_seq += 1;
        (job.seq, flight.seq) = (seq, seq);
        flight.since = self.wanted_since.take();
        self.inflight = Some(flight);
        // One job at a time (`inflight`), so the executor's slot is free.
        if let Err(e) = self.jobs.try_send(job) {
            error!(error = %e, "cannot hand the plan to the dataplane executor");
        }
    }

    /// The executor answered job `seq`: the job in flight, unless the answer is for no
    /// job of ours.
    pub fn answered(&mut self, seq: u64) -> Option<InFlight> {
        self.inflight.take_if(|f| f.seq == seq)
    }

    /// An API write answers once the apply that carries it is answered.
    pub fn wait(&mut self, done: Done) {
        let seq = self.seq_of_next_change();
        self.waiters.push(Waiter { seq, done });
    }

    /// Answers the API writes carried by apply `seq` or an earlier one.
    pub fn answer_waiters(&mut self, seq: u64, outcome: Result<(), String>) {
        let (done, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.seq <= seq);
        self.waiters = waiting;
        for w in done {
            (w.done)(outcome.clone());
        }
    }

    /// Records an apply's outcome: a failure is retried after a wait that doubles with
    /// each failure in a row, up to a minute; a success resets it.
    pub fn applied(&mut self, ok: bool, now: Instant) {
        self.needs_retry = !ok;
        if ok {
            self.retry_at = None;
            self.retry_backoff = RETRY_MIN;
        } else {
            self.retry_at = Some(now + self.retry_backoff);
            self.retry_backoff = (self.retry_backoff * 2).min(RETRY_MAX);
        }
    }

    /// A failed apply is due for its retry.
    pub fn retry_due(&self, now: Instant) -> bool {
        self.needs_retry && self.retry_at.is_none_or(|t| now >= t)
    }
}

/// How much an apply reads back: the most any request asked for.
pub(super) fn read_merge(a: Option<ReadBack>, b: ReadBack) -> ReadBack {
    let rank = |r: ReadBack| match r {
        ReadBack::Cache => 0,
        ReadBack::Structure => 1,
        ReadBack::Full => 2,
    };
    match a {
        Some(a) if rank(a) >= rank(b) => a,
        _ => b,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::Config;
    use crate::model::Model;

    fn job() -> executor::Job {
        let text = "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\n";
        let config = Config::parse(std::path::Path::new("t"), text).unwrap();
        executor::Job {
            seq: 0,
            desired: crate::plan::plan(&config, &Model::new(&config)),
            read: ReadBack::Cache,
            flushes: Vec::new(),
        }
    }

    fn flight() -> InFlight {
        InFlight {
            seq: 0,
            generation: 1,
            read: ReadBack::Cache,
            client_mode: true,
            unassigned_to: None,
            since: None,
            gone_addrs: Vec::new(),
        }
    }

    #[test]
    fn one_job_at_a_time_and_what_comes_meanwhile_is_merged_into_the_next() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut s = Scheduler::new(tx, true);
        assert!(s.want(ReadBack::Cache));
        let read = s.take_wanted().unwrap();
        s.send(job(), InFlight { read, ..flight() });
        assert_eq!(rx.try_recv().unwrap().seq, 1);
        // A change made now rides on job 1 until more is wanted; then on job 2.
        assert_eq!(s.seq_of_next_change(), 1);
        assert!(!s.want(ReadBack::Full), "the executor is busy");
        assert!(!s.want(ReadBack::Cache));
        assert_eq!(s.seq_of_next_change(), 2);
        assert_eq!(s.take_wanted(), None, "nothing is sent while job 1 runs");
        assert!(s.answered(7).is_none(), "an answer for no job of ours");
        assert_eq!(s.answered(1).unwrap().seq, 1);
        assert_eq!(
            s.take_wanted(),
            Some(ReadBack::Full),
            "the most any asked for"
        );
        assert!(!s.pending());
    }

    #[test]
    fn api_writes_answer_with_the_apply_that_carries_them() {
        let (tx, _rx) = mpsc::channel(4);
        let mut s = Scheduler::new(tx, true);
        let told = Arc::new(Mutex::new(Vec::new()));
        let note = |name: &'static str| -> Done {
            let told = told.clone();
            Box::new(move |r| told.lock().unwrap().push((name, r)))
        };
        s.want(ReadBack::Cache);
        s.wait(note("pin"));
        let read = s.take_wanted().unwrap();
        s.send(job(), InFlight { read, ..flight() });
        s.want(ReadBack::Cache);
        s.wait(note("drain"));
        s.answer_waiters(1, Ok(()));
        assert_eq!(*told.lock().unwrap(), [("pin", Ok(()))]);
        s.answer_waiters(2, Err("nft failed".into()));
        assert_eq!(told.lock().unwrap()[1], ("drain", Err("nft failed".into())));
    }

    #[test]
    fn a_failed_apply_is_retried_after_a_doubling_wait_that_success_resets() {
        let (tx, _rx) = mpsc::channel(1);
        let mut s = Scheduler::new(tx, true);
        let t0 = Instant::now();
        assert!(!s.retry_due(t0));
        s.applied(false, t0);
        assert!(!s.retry_due(t0));
        assert!(s.retry_due(t0 + RETRY_MIN));
        s.applied(false, t0);
        assert!(!s.retry_due(t0 + RETRY_MIN));
        assert!(s.retry_due(t0 + RETRY_MIN * 2));
        for _ in 0..10 {
            s.applied(false, t0);
        }
        assert!(
            s.retry_due(t0 + RETRY_MAX),
            "the wait stops growing at a minute"
        );
        s.applied(true, t0);
        assert!(!s.retry_due(t0 + RETRY_MAX));
        s.applied(false, t0);
        assert!(s.retry_due(t0 + RETRY_MIN), "success reset the wait");
    }
}
