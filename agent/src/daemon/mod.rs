//! The agent loop: discovery events and timers → model → plan → dataplane.

mod commands;
mod discovery;
mod executor;
mod persist;
mod publish;
mod schedule;
mod supervise;
#[cfg(test)]
mod tests;
mod usage;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::broadcast;
use uplink_api::v1;

use crate::api::{self, view};
use crate::config::Config;
use crate::dataplane::{Dataplane, ReadBack, nft};
use crate::discover::{self, Event};
use crate::health::probe;
use crate::metrics::{self, Metrics};
use crate::model::failover::{EventKind, EventLog, LogEntry};
use crate::model::state_file::{Decisions, StateError, StateFile};
use crate::model::{Model, Touched, now_millis};
use crate::plan::FlushOf;
use crate::plan::plan_touched;

/// How often idle clients are released, state is saved and failed applies are retried.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Discover(#[from] discover::DiscoverError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Api(#[from] api::ServeError),
    #[error("metrics: {0}")]
    Metrics(String),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error(transparent)]
    Routed(#[from] discover::routed::RoutedError),
    #[error("cannot start the API runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the dataplane executor stopped (a bug: see the log above)")]
    Executor,
    #[error("cannot start the dataplane executor's thread: {0}")]
    ExecutorStart(std::io::Error),
}

/// Worker threads that serve the API and /metrics. Nice 10: best effort next to the loop.
const SERVING_NICE: libc::c_int = 10;

/// The serving runtime, shut down without waiting when dropped (dropping a runtime from
/// async code would panic; an early error return drops it too).
struct Serving(Option<tokio::runtime::Runtime>);

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Serving {
    fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("running until dropped").spawn(f)
    }
}

fn serving_runtime() -> std::io::Result<Serving> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .thread_name("uplinkd-serve")
        .on_thread_start(|| {
            // On Linux the nice value is per thread: this lowers only this one.
            // SAFETY: plain syscall on the calling thread.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SERVING_NICE) };
        })
        .enable_all()
        .build()
        .map(|rt| Serving(Some(rt)))
}

/// `d` ± 10%, from the clock's low bits (no need for a random source here).
fn jittered(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or_default();
    d.mul_f64(0.9 + f64::from(nanos % 2001) / 10_000.0)
}

pub struct Agent {
    config: Arc<Config>,
    config_path: PathBuf,
    model: Model,
    /// When applies go to the executor, and who waits for them.
    schedule: schedule::Scheduler,
    /// Deletes flows beside the loop (those NATed to an address that left an uplink).
    conntrack: crate::dataplane::conntrack::Conntrack,
    /// Links, addresses, routes, neighbours and routed hosts, into the model.
    discovery: discovery::Discovery,
    /// State changes, failovers and failbacks; the API streams them.
    pub events: EventLog,
    /// The probers and passive evidence.
    health: supervise::Supervisor,
    started: Instant,
    generation: u64,
    event_tx: broadcast::Sender<v1::Event>,
    metrics: Arc<Metrics>,
    /// Reads nft counters beside the loop (routed hosts' activity, the API, metrics).
    counters: nft::Counters,
    /// `/healthz` reads it: the loop beats on every turn.
    heartbeat: Arc<api::Heartbeat>,
    /// What the API, `/metrics` and `/readyz` read.
    publish: publish::Publisher,
    /// The assignments and decisions on disk, written beside the loop.
    persist: persist::Persistence,
    /// The uplinks' usage, counted and written beside the loop.
    usage: usage::Usage,
    /// Each uplink's quota level as the usage owner last reported it.
    quota_levels: BTreeMap<String, crate::usage::QuotaLevel>,
    /// Parts of the config the kernel refuses (`rule NAME: why`), as last reported.
    refused: Arc<Vec<String>>,
    /// Whether the last apply's default policy read the client sets (`None`: none yet).
    client_mode: Option<bool>,
    /// What the resync asked for reads back once its dump is in.
    resync_read: Option<ReadBack>,
}

/// Connects to the kernel, adopts its state, and runs until SIGTERM/SIGINT. The dataplane
/// is left in place on exit so traffic keeps flowing.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), AgentError> {
    // Before anything is read or written: a second instance stops here.
    let _locks = crate::lock::acquire(&config.agent.state_dir, &config.dataplane.nft_table)?;
    let (conn, handle, _) =
        rtnetlink::new_connection_with_strict_check().map_err(discover::DiscoverError::Socket)?;
    tokio::spawn(conn);
    let mut dataplane = Dataplane::new(&config, handle.clone());
    dataplane.check().await?;
    let state = StateFile::new(&config.agent.state_dir);
    let mut model = Model::new(&config);
    match state.load() {
        Ok(Some(restored)) => {
            let n = restored.clients.len();
            let reassigned = model.restore(restored.clients);
            model.overrides = restored
                .overrides
                .into_iter()
                .filter(|(_, o)| model.uplink(&o.uplink).is_some())
                .collect();
            info!(clients = n, reassigned, path = %state.path().display(), "restored assignments");
        }
        Ok(None) => {
            info!(path = %state.path().display(), "no state file; starting from the kernel's maps")
        }
        Err(e @ (StateError::Corrupt { .. } | StateError::Version { .. })) => {
            let aside = state.set_aside(now_millis())?;
            error!(error = %e, kept_as = %aside.display(), "state file unreadable; kept it aside, adopting assignments from the kernel's maps");
        }
        Err(e) => return Err(e.into()),
    }
    match state.load_decisions() {
        Ok(Some(saved)) => {
            model.restore_decisions(saved);
            model.keep_set_edits(&config.sets);
        }
        Ok(None) => {}
        Err(e @ (StateError::Corrupt { .. } | StateError::Version { .. })) => {
            let aside = state.set_aside_decisions(now_millis())?;
            error!(error = %e, kept_as = %aside.display(), "decisions file unreadable; kept it aside, starting with every uplink judged afresh and the pins of the state file");
        }
        Err(e) => return Err(e.into()),
    }
    // Only addresses the state file does not know are adopted from the kernel's maps: with
    // a complete state file there is nothing to keep (100k entries at a warm restart).
    let kernel = dataplane.read_nft().await?;
    // No table of ours: a reboot or a cleanup. No backup carries anyone's flows.
    let fresh_kernel = kernel.is_none();
    let adopt = match kernel {
        Some(k) => nft::adopted_homes(k, |ip| model.client_by_addr(ip).is_none()),
        None => BTreeMap::new(),
    };
    let mut events = discover::subscribe()?;
    // Bound before the first apply renders the rules that log to it.
    let mut routed_rx = discover::routed::listen(config.dataplane.nflog_group)?;
    let (activity_tx, mut activity_rx) = mpsc::channel(4);
    let (probe_tx, mut probe_rx) = mpsc::channel(1024);
    let (passive_tx, mut passive_rx) = mpsc::channel(1024);
    let (suspect_tx, mut suspect_rx) = mpsc::channel(64);
    let (silent_tx, mut silent_rx) = mpsc::channel(64);
    let (quota_tx, mut quota_rx) = mpsc::channel(64);
    let (dump_tx, mut dump_rx) = mpsc::channel(1);
    let counters = dataplane.counter_reader();
    let conntrack = dataplane.conntrack();
    let takes_increment = dataplane.takes_increment(ReadBack::Cache);
    let (jobs, mut applied_rx) = executor::spawn(dataplane).map_err(AgentError::ExecutorStart)?;
    let (decisions_tx, mut saved_rx) = persist::spawn(state.clone());
    let config_arc = Arc::new(config);
    let mut agent = Agent::new(
        config_arc,
        config_path,
        model,
        adopt,
        Wiring {
            jobs,
            takes_increment,
            decisions_tx,
            conntrack,
            counters,
            state,
            handle,
            probe_tx,
            passive_tx,
            suspect_tx,
            silent_tx,
            activity_tx,
            quota_tx,
            dump_tx,
        },
    );
    let (cmd_tx, mut cmd_rx) = mpsc::channel(256);
    // Listeners are bound and TLS is loaded before the first kernel write: a port clash or
    // a bad certificate stops the agent before it has changed anything.
    // They run on a runtime of their own, at a lower CPU priority: however hard clients
    // push the API and the metrics port, the loop and the probes are scheduled first.
    let serving = serving_runtime().map_err(AgentError::Runtime)?;
    if let Some(api) = agent.config.api.clone() {
        let serve = api::serve(
            api,
            cmd_tx,
            agent.publish.in_sync.clone(),
            agent.heartbeat.clone(),
            agent.metrics.serving.clone(),
            api::Reads {
                snapshot: agent.publish.subscribe(),
                counters: agent.counters.clone(),
                usage: agent.usage.snapshot.clone(),
                clients: agent.usage.clients.clone(),
            },
        );
        serving
            .spawn(serve)
            .await
            .map_err(|e| AgentError::Runtime(std::io::Error::other(e)))??;
    }
    if let Some(m) = agent.config.metrics.clone() {
        let serve = metrics::serve(m, agent.metrics.clone(), agent.counters.clone());
        serving
            .spawn(serve)
            .await
            .map_err(|e| AgentError::Runtime(std::io::Error::other(e)))?
            .map_err(AgentError::Metrics)?;
    }
    agent.resync_inputs().await?;
    discovery::warn_floating_bridge_macs(&agent.config);
    agent.discovery.adopt.clear();
    agent.links_changed();
    if fresh_kernel {
        let serving = agent
            .model
            .serve_usable_at_fresh_start(&agent.config.failover);
        if !serving.is_empty() {
            info!(uplinks = ?serving, "no dataplane of ours in the kernel to keep in place: uplinks usable now serve their clients at once (their pending failback is not kept)");
        }
    }
    // read_nft just filled the dataplane's cache: no second read-back of the table.
    // The start waits for its first apply: probes need the uplinks' routes in place.
    agent.request_apply(ReadBack::Cache);
    let first = applied_rx.recv().await.ok_or(AgentError::Executor)?;
    let clean = agent.on_applied(first);
    agent.usage.begin();
    agent.health.probing = true;
    agent.reconcile_probers();
    agent.save_state();
    agent.publish_metrics();
    agent.publish_snapshot();
    if clean {
        crate::notify::ready();
    }
    let mut watchdog = tokio::time::interval(
        crate::notify::watchdog_interval().unwrap_or(Duration::from_secs(3600)),
    );
    let mut notified_ready = clean;
    info!(
        clients = agent.model.clients().len(),
        elapsed_ms = agent.started.elapsed().as_millis() as u64,
        in_sync = clean,
        "initial apply done"
    );

    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    // Jittered, so that a fleet restarted together does not resync in step.
    let resync = tokio::time::sleep(jittered(agent.config.agent.resync_interval));
    let full_resync = tokio::time::sleep(jittered(agent.config.agent.full_resync_interval));
    tokio::pin!(resync, full_resync);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else {
                    // The event socket died: subscribe again and re-dump what was missed.
                    tokio::time::sleep(HOUSEKEEPING).await;
                    match discover::subscribe() {
                        Ok(rx) => events = rx,
                        Err(e) => error!(error = %e, "cannot resubscribe to netlink events; retrying"),
                    }
                    agent.resync(ReadBack::Full);
                    continue;
                };
                let received = Instant::now();
                let mut overrun = ev == Event::Overrun;
                let mut links = matches!(ev, Event::Link { .. } | Event::LinkGone { .. } | Event::Addr { .. } | Event::Route { .. });
                let mut dirty = agent.on_event(ev);
                // Coalesce whatever else is queued into the same apply.
                let mut n = 1usize;
                while let Ok(ev) = events.try_recv() {
                    overrun |= ev == Event::Overrun;
                    links |= matches!(ev, Event::Link { .. } | Event::LinkGone { .. } | Event::Addr { .. } | Event::Route { .. });
                    dirty |= agent.on_event(ev);
                    n += 1;
                }
                if agent.discovery.routes_stale {
                    agent.discovery.ask(discovery::Read::Routes);
                }
                if links {
                    dirty |= agent.links_changed();
                }
                if overrun {
                    warn!("netlink events were dropped by the kernel; re-reading links and neighbours");
                    agent.resync(ReadBack::Full);
                }
                if dirty {
                    agent.schedule.event_at(received);
                    agent.request_apply(ReadBack::Cache);
                    debug!(events = n, "dispatched");
                }
                if links {
                    // After the apply: a prober (re)started for a new address or gateway
                    // finds its route in the kernel from its first round.
                    agent.reconcile_probers_after_apply();
                    // Uplink states may have changed: the gauges follow now, not in a second.
                    agent.publish_metrics();
                }
            }
            applied = applied_rx.recv() => {
                let Some(applied) = applied else {
                    return Err(AgentError::Executor);
                };
                agent.on_applied(applied);
            }
            Some(saved) = saved_rx.recv() => agent.on_decisions_saved(saved),
            Some(dump) = dump_rx.recv() => agent.on_dump(dump),
            () = std::future::ready(()), if agent.discovery.applying() => agent.apply_more_of_dump(),
            Some(report) = probe_rx.recv() => agent.on_probe_report(report).await,
            Some(reading) = passive_rx.recv() => agent.on_passive_reading(reading).await,
            Some(suspect) = suspect_rx.recv() => agent.on_suspect(suspect),
            Some(silent) = silent_rx.recv() => agent.on_silent(silent),
            Some(report) = quota_rx.recv() => agent.on_quota(report),
            Some(s) = routed_rx.recv() => {
                // Coalesce a burst of new hosts into one apply.
                let mut dirty = agent.on_routed(s);
                while let Ok(s) = routed_rx.try_recv() {
                    dirty |= agent.on_routed(s);
                }
                if dirty {
                    agent.request_apply(ReadBack::Cache);
                }
            }
            Some(active) = activity_rx.recv() => {
                agent.model.routed_activity(&active, now_millis());
                agent.persist.dirty = true;
            }
            () = &mut resync => {
                agent.discovery.read_routed_activity(&agent.model);
                agent.resync(ReadBack::Structure);
                resync.as_mut().reset(tokio::time::Instant::now() + jittered(agent.config.agent.resync_interval));
            }
            () = &mut full_resync => {
                agent.resync(ReadBack::Full);
                full_resync.as_mut().reset(tokio::time::Instant::now() + jittered(agent.config.agent.full_resync_interval));
            }
            _ = housekeeping.tick() => {
                // Before this pass's applies: in sync means the start's apply is in.
                if !notified_ready && agent.publish.in_sync() {
                    crate::notify::ready();
                    notified_ready = true;
                }
                agent.housekeeping(Instant::now());
            }
            _ = watchdog.tick() => crate::notify::watchdog(),
            _ = sighup.recv() => {
                let _ = agent.reload().await;
            }
            Some(cmd) = cmd_rx.recv() => agent.handle(cmd).await,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        agent.heartbeat.beat();
    }
    // The apply in flight finishes (its commands are bounded by command_timeout), so that
    // the dataplane left in place is one the model knows; what was still wanted is
    // planned again at the next start.
    if agent.schedule.in_flight() {
        let bound = agent.config.dataplane.command_timeout * 2 + Duration::from_secs(1);
        match tokio::time::timeout(bound, applied_rx.recv()).await {
            Ok(Some(applied)) => {
                agent.schedule.forget_wanted();
                agent.on_applied(applied);
            }
            _ => warn!(
                "the apply in flight did not finish at exit; the next start reads the kernel back"
            ),
        }
    }
    // The last decisions and assignments, written here: nothing is left to the writers.
    agent
        .persist
        .save_at_exit(&agent.model.decisions(), agent.model.clients())
        .await;
    agent.health.stop_all();
    agent.usage.save_now(Duration::from_secs(2)).await;
    drop(serving);
    info!("stopping; dataplane left in place");
    Ok(())
}

/// What the agent is wired to: the executor, the writers, and the tasks beside the loop.
struct Wiring {
    jobs: mpsc::Sender<executor::Job>,
    /// The executor's dataplane holds a copy of the kernel's maps already.
    takes_increment: bool,
    decisions_tx: tokio::sync::watch::Sender<(u64, Decisions)>,
    conntrack: crate::dataplane::conntrack::Conntrack,
    counters: nft::Counters,
    state: StateFile,
    handle: rtnetlink::Handle,
    probe_tx: mpsc::Sender<probe::Report>,
    passive_tx: mpsc::Sender<supervise::PassiveReading>,
    suspect_tx: mpsc::Sender<supervise::Suspect>,
    silent_tx: mpsc::Sender<supervise::Silent>,
    activity_tx: mpsc::Sender<std::collections::HashSet<IpAddr>>,
    quota_tx: mpsc::Sender<usage::QuotaReport>,
    dump_tx: mpsc::Sender<Result<discovery::Dump, crate::discover::DiscoverError>>,
}

impl Agent {
    fn new(
        config: Arc<Config>,
        config_path: PathBuf,
        model: Model,
        adopt: BTreeMap<IpAddr, String>,
        w: Wiring,
    ) -> Agent {
        let started = Instant::now();
        let metrics = Metrics::new();
        let (usage, levels) = usage::spawn(
            config.clone(),
            w.state.clone(),
            w.counters.clone(),
            metrics.usage.clone(),
            w.quota_tx,
        );
        let mut agent = Agent {
            discovery: discovery::Discovery::new(
                w.handle,
                adopt,
                model.all_hops(&config),
                w.counters.clone(),
                w.activity_tx,
                metrics.lan_refused.clone(),
                w.dump_tx,
            ),
            config_path,
            model,
            schedule: schedule::Scheduler::new(w.jobs, w.takes_increment),
            conntrack: w.conntrack,
            usage,
            quota_levels: levels.into_iter().collect(),
            persist: persist::Persistence::new(
                w.state,
                w.decisions_tx,
                metrics.save_errors.clone(),
            ),
            events: EventLog::default(),
            health: supervise::Supervisor::new(
                w.probe_tx,
                w.passive_tx,
                w.suspect_tx,
                w.silent_tx,
                w.counters.clone(),
                metrics.health.clone(),
            ),
            started,
            generation: 1,
            event_tx: broadcast::channel(1024).0,
            publish: publish::Publisher::new(&config, metrics.clone(), started),
            metrics,
            counters: w.counters,
            heartbeat: Arc::new(api::Heartbeat::new()),
            refused: Arc::new(Vec::new()),
            client_mode: None,
            resync_read: None,
            config,
        };
        // Before the first plan: an uplink whose quota the file says is used up stays
        // held.
        agent.hold_quotas();
        agent
    }

    /// Holds each uplink as its quota level and its `quota_action` say (at start and after
    /// a reload, which may change the action).
    fn hold_quotas(&mut self) {
        for (i, u) in self.config.uplinks.iter().enumerate() {
            let level = self.quota_levels.get(&u.name).copied().unwrap_or_default();
            self.model.set_over_quota(i, level.hold(u.quota_action));
        }
    }

    /// The usage owner's report: quota levels that moved, and an operator's quota change
    /// once it is written.
    fn on_quota(&mut self, r: usage::QuotaReport) {
        let mut log = Vec::new();
        let mut changed = false;
        // The operator's change first, then what it did to the level.
        if let Some((req, Ok(did))) = &r.request {
            log.push(LogEntry {
                at: now_millis(),
                uplink: req.uplink.clone(),
                kind: EventKind::Quota,
                cause: did.clone(),
                clients_moved: 0,
            });
        }
        for c in &r.changes {
            self.quota_levels.insert(c.uplink.clone(), c.to);
            let Some(i) = self.config.uplinks.iter().position(|u| u.name == c.uplink) else {
                continue;
            };
            let before = self.model.uplinks[i].over_quota;
            log.push(self.model.quota(i, c, self.config.uplinks[i].quota_action));
            changed |= self.model.uplinks[i].over_quota != before;
        }
        self.record(log);
        match r.request {
            None if changed => self.request_apply(ReadBack::Cache),
            None => {}
            Some((req, Err(e))) => {
                let _ = req.reply.send(Err(crate::api::ApiError::Internal(format!(
                    "cannot write the usage file, nothing changed: {e}"
                ))));
            }
            Some((req, Ok(_))) => {
                let view = self
                    .config
                    .uplinks
                    .iter()
                    .position(|u| u.name == req.uplink)
                    .map(|i| self.uplink_view(i))
                    .ok_or_else(|| self.unknown_uplink(&req.uplink));
                self.answer_when_applied(req.reply, view, changed);
            }
        }
    }

    /// Applies one discovery event to the model; returns whether the plan may change.
    fn on_event(&mut self, ev: Event) -> bool {
        let seen = self.discovery.on_event(ev, &mut self.model, &self.config);
        self.persist.dirty |= seen.clients;
        seen.plan
    }

    /// A host behind a LAN router opened a connection without an assignment; returns
    /// whether the plan changes.
    fn on_routed(&mut self, s: discover::routed::Sighting) -> bool {
        let seen = self.discovery.on_routed(s, &mut self.model);
        self.persist.dirty |= seen.clients;
        seen.plan
    }

    /// Resync: re-read the inputs (beside the loop; the neighbours too when `read` is
    /// `Full`: the full resync, an overrun) and then the kernel (`read` says how much),
    /// repair drift.
    fn resync(&mut self, read: ReadBack) {
        self.resync_read = Some(schedule::read_merge(self.resync_read, read));
        self.discovery.ask(match read {
            ReadBack::Full => discovery::Read::Inputs,
            _ => discovery::Read::Links,
        });
    }

    /// A dump read beside the loop (or its failure): what it repaired (a link, address or
    /// route event lost to an overrun) is judged too, so health agrees with the facts
    /// after every resync, not only the plan; then the apply.
    fn on_dump(&mut self, dump: Result<discovery::Dump, crate::discover::DiscoverError>) {
        match dump {
            Ok(d) => match self.discovery.apply_dump(d, &mut self.model, &self.config) {
                Some((read, seen)) => self.dump_applied(Some(read), seen),
                // Neighbours left for the next turns, or dropped (older than a reload).
                None if self.discovery.applying() => {}
                None => self.discovery.ask_next(),
            },
            Err(e) => {
                warn!(error = %e, "resync dump failed; the next resync reads again");
                let read = self.discovery.dump_failed();
                self.dump_applied(read, discovery::Seen::default());
            }
        }
    }

    /// The next slice of a dump's neighbours.
    fn apply_more_of_dump(&mut self) {
        if let Some((read, seen)) = self.discovery.apply_more(&mut self.model, &self.config) {
            self.dump_applied(Some(read), seen);
        }
    }

    /// A dump is in the model (or could not be read): then the apply.
    fn dump_applied(&mut self, read: Option<discovery::Read>, seen: discovery::Seen) {
        self.persist.dirty |= seen.clients;
        self.links_changed();
        let then = match read {
            Some(discovery::Read::Links | discovery::Read::Inputs) => self.resync_read.take(),
            _ => None,
        };
        self.request_apply(then.unwrap_or(ReadBack::Cache));
        self.reconcile_probers_after_apply();
        self.publish_metrics();
        self.discovery.ask_next();
    }

    /// Re-reads links and neighbours from the kernel, so a lost event is repaired.
    async fn resync_inputs(&mut self) -> Result<(), discover::DiscoverError> {
        let seen = self.discovery.resync(&mut self.model, &self.config).await?;
        self.persist.dirty |= seen.clients;
        Ok(())
    }

    /// The periodic pass: health timers (a failback whose delay has run out), pins that
    /// expired, idle clients released, a failed apply's retry; then the state saved and
    /// what is published refreshed.
    fn housekeeping(&mut self, now: Instant) {
        let mut log = self
            .model
            .tick(now, &self.config.health, &self.config.failover);
        for ip in self.model.expire_overrides(now_millis()) {
            log.push(LogEntry {
                at: now_millis(),
                uplink: String::new(),
                kind: EventKind::Override,
                cause: format!("override of {ip} expired"),
                clients_moved: 1,
            });
        }
        let health_changed = self.record(log);
        let released = self
            .model
            .expire(now_millis(), self.config.lan.client_idle_timeout);
        for c in &released {
            info!(mac = %c.mac, home = %c.home, "client idle; released");
        }
        let retry = self.schedule.retry_due(now);
        if !released.is_empty() || retry || health_changed {
            self.persist.dirty |= !released.is_empty();
            self.request_apply(if retry {
                ReadBack::Full
            } else {
                ReadBack::Cache
            });
        }
        self.save_state();
        if self.persist.decisions_failing {
            self.save_decisions(true);
        }
        self.publish_metrics();
        // Idle releases and expired pins without an apply, last-seen times.
        self.publish_snapshot();
    }

    /// Links or addresses changed: re-evaluate link health and the probers.
    fn links_changed(&mut self) -> bool {
        let mut log = self.discovery.hop_events(&self.model, &self.config);
        log.extend(self.model.refresh_links(
            Instant::now(),
            &self.config.health,
            &self.config.failover,
        ));
        // Routes and rules follow links even without a state change.
        self.record(log);
        true
    }

    /// Logs and records health events; returns whether there were any.
    fn record(&mut self, log: Vec<LogEntry>) -> bool {
        let any = !log.is_empty();
        for e in log {
            match e.kind {
                EventKind::Failover | EventKind::AllDown => {
                    warn!(uplink = %e.uplink, clients_moved = e.clients_moved, "{e}")
                }
                EventKind::State { to, .. } if !to.usable() => warn!(uplink = %e.uplink, "{e}"),
                _ => info!(uplink = %e.uplink, clients_moved = e.clients_moved, "{e}"),
            }
            let _ = self.event_tx.send(view::event(&e));
            match &e.kind {
                EventKind::Failover => {
                    // One span per failover, for tracing backends.
                    tracing::info_span!("failover", uplink = %e.uplink, clients_moved = e.clients_moved, cause = %e.cause).in_scope(|| {});
                    self.metrics
                        .health
                        .failovers
                        .with_label_values(&[e.uplink.as_str()])
                        .inc();
                }
                EventKind::Failback => self
                    .metrics
                    .health
                    .failbacks
                    .with_label_values(&[e.uplink.as_str()])
                    .inc(),
                EventKind::Sla { policy, .. } => self
                    .metrics
                    .health
                    .sla_changes
                    .with_label_values(&[policy.as_str(), e.uplink.as_str()])
                    .inc(),
                EventKind::State { from, to } if from.usable() != to.usable() => self
                    .metrics
                    .health
                    .flaps
                    .with_label_values(&[e.uplink.as_str()])
                    .inc(),
                _ => {}
            }
            self.events.push(e);
        }
        any
    }

    /// One prober per uplink with probes, restarted when its interface or addresses change.
    fn reconcile_probers(&mut self) {
        self.health.reconcile(&self.config, &self.model);
    }

    /// Plan and apply, in an `apply` span.
    /// Asks for the model to be applied. Sent to the executor at once when it is idle;
    /// otherwise planned when the job in flight is answered, merged with everything else
    /// that changed meanwhile.
    fn request_apply(&mut self, read: ReadBack) {
        if self.schedule.want(read) {
            self.send_job();
        }
    }

    /// Reconciles the probers now, or once the pending apply is in the kernel.
    fn reconcile_probers_after_apply(&mut self) {
        if self.schedule.pending() {
            self.schedule.probers_after_apply = true;
        } else {
            self.reconcile_probers();
        }
    }

    /// Plans what is wanted and hands it to the executor.
    fn send_job(&mut self) {
        let Some(read) = self.schedule.take_wanted() else {
            return;
        };
        // Only the addresses that changed since the last apply, while the dataplane's copy
        // of the kernel stands in for the rest (a periodic resync reads back the structure,
        // not the elements: its plan is one of them); a full resync plans whole.
        let touched = match self.model.take_touched() {
            t if read != ReadBack::Full && self.schedule.takes_increment => t,
            _ => Touched::All,
        };
        let mut desired = plan_touched(&self.config, &self.model, &touched);
        // The default policy left or took up client mode: every address's element goes or
        // comes.
        let client_mode = desired.nft.unassigned.is_some();
        if desired.nft.changed.is_some() && self.client_mode != Some(client_mode) {
            desired = plan_touched(&self.config, &self.model, &Touched::All);
        }
        let flushes = crate::plan::take_flushes(&self.config, &mut self.model);
        let flight = schedule::InFlight {
            seq: 0,
            generation: self.generation,
            read,
            client_mode,
            unassigned_to: match &desired.nft.unassigned {
                Some(crate::plan::Unassigned::Next(u)) => Some(u.clone()),
                _ => None,
            },
            since: None,
            gone_addrs: self.model.take_gone_addrs(),
        };
        let job = executor::Job {
            seq: 0,
            desired,
            read,
            flushes,
        };
        self.schedule.send(job, flight);
        // What the uplinks carry may have changed with this plan: a metered one that now
        // carries clients is probed at the normal pace from now on.
        self.health.pace(&self.config, &self.model);
    }

    /// The executor answered: record what the kernel now holds, follow up (flows, retries,
    /// waiting API writes), and send what was asked for meanwhile. Returns whether the
    /// apply was clean.
    fn on_applied(&mut self, a: executor::Applied) -> bool {
        let Some(job) = self.schedule.answered(a.seq) else {
            error!(
                seq = a.seq,
                "an answer from the dataplane executor for no job in flight"
            );
            return false;
        };
        let report = a.report;
        let clean = report.errors.is_empty();
        self.schedule.takes_increment = a.takes_increment;
        // Planned before a reload: what it knew by index is not retried (the reload's own
        // whole apply follows).
        let current = job.generation == self.generation;
        if clean && current {
            self.client_mode = Some(job.client_mode);
            // Where a client without an assignment goes now, to tell whether its placement
            // moves it.
            self.model.unassigned_to = job.unassigned_to;
        } else {
            // What the failed apply was to send is not in the kernel: the next one looks
            // at everything.
            self.model.touch_all();
        }
        self.metrics
            .apply
            .apply_duration
            .observe(a.elapsed.as_secs_f64());
        if let Some(since) = job.since {
            self.metrics
                .apply
                .dispatch_latency
                .observe(since.elapsed().as_secs_f64());
        }
        if !clean {
            self.metrics.apply.apply_errors.inc();
        }
        self.publish.in_sync.store(clean, Ordering::SeqCst);
        let mut flush_failed = false;
        if clean {
            // Beside the loop: the tool runs up to `command_timeout`, and nothing waits for it.
            for (i, addr) in job.gone_addrs {
                // For the log; the address is what selects the flows.
                let uplink = match self.config.uplinks.get(i) {
                    Some(u) if current => u.name.clone(),
                    _ => String::new(),
                };
                let (conntrack, metrics) = (self.conntrack.clone(), self.metrics.clone());
                tokio::spawn(async move {
                    match conntrack.delete_reply_dst(addr).await {
                        Ok(n) => {
                            info!(%uplink, %addr, flows = n, "address left the uplink; deleted the flows NATed to it")
                        }
                        Err(e) => {
                            // Not retried: the entries time out, as without uplinkd.
                            error!(%uplink, %addr, error = %e, "cannot delete the flows NATed to the uplink's old address; they hang until their conntrack timeout");
                            metrics
                                .apply
                                .flush_errors
                                .with_label_values(&[uplink.as_str()])
                                .inc();
                        }
                    }
                });
            }
        } else if current {
            for (i, addr) in job.gone_addrs {
                self.model.uplinks[i].gone_addrs.push(addr);
            }
        }
        if current {
            for (f, outcome) in a.flushed {
                flush_failed |= !self.flushed(f, outcome);
            }
        }
        self.note_refused(&report.refused);
        self.publish.gauges_dirty = true;
        // The snapshot waits for the decisions it shows to be on disk, so a state the API
        // has shown survives a crash right after.
        self.publish_snapshot();
        self.heartbeat.set_stuck(
            report
                .errors
                .iter()
                .find(|e| matches!(e, crate::dataplane::DataplaneError::Timeout { .. }))
                .map(|e| e.to_string()),
        );
        self.schedule
            .applied(clean && !flush_failed, Instant::now());
        for e in &report.errors {
            error!(error = %e, "dataplane apply failed; retrying");
        }
        if report.changed() {
            info!(
                full = job.read == ReadBack::Full,
                replaced_table = report.nft.replaced_table,
                rewritten_chains = report.nft.rewritten_chains,
                elements_added = report.nft.added,
                elements_deleted = report.nft.deleted,
                rules_added = report.rules.added,
                rules_deleted = report.rules.deleted,
                routes_added = report.routes.added,
                routes_deleted = report.routes.deleted,
                elapsed_us = a.elapsed.as_micros() as u64,
                seq = job.seq,
                "applied"
            );
        }
        // API writes carried by this apply (or an earlier one) answer now.
        let outcome = match report.errors.first() {
            None => Ok(()),
            Some(e) => Err(e.to_string()),
        };
        self.schedule.answer_waiters(job.seq, outcome);
        self.publish_metrics();
        // Whatever was asked for meanwhile, planned once from the model as it is now.
        self.send_job();
        if self.schedule.probers_after_apply && !self.schedule.in_flight() {
            self.schedule.probers_after_apply = false;
            self.reconcile_probers();
        }
        clean
    }

    /// Logs a conntrack deletion's outcome; returns false when it is to be retried.
    fn flushed(&mut self, f: crate::plan::Flush, outcome: executor::FlushOutcome) -> bool {
        // Indices from when the job was planned; a reload since then makes them stale.
        let names = match f.of {
            FlushOf::Uplink(i) | FlushOf::Failback(i) | FlushOf::Quota(i) => {
                self.config.uplinks.get(i).map(|u| (None, u))
            }
            FlushOf::Policy { policy, uplink } => self
                .config
                .policies
                .get(policy)
                .zip(self.config.uplinks.get(uplink))
                .map(|(p, u)| (Some(p.name.clone()), u)),
        };
        let Some((policy, u)) = names else {
            return true;
        };
        let uplink = u.name.clone();
        let requeue = |model: &mut Model| match f.of {
            FlushOf::Uplink(i) => model.uplinks[i].needs_flush = true,
            FlushOf::Quota(i) => model.uplinks[i].quota_flush = true,
            // Due again at the next plan while the uplink still carries its clients.
            FlushOf::Failback(i) => model.uplinks[i].away = true,
            FlushOf::Policy { policy, uplink } => model.sla_flushes.push((policy, uplink)),
        };
        let whose = match f.of {
            FlushOf::Uplink(_) => "the dead uplink's conntrack entries",
            FlushOf::Quota(_) => "the flows on the uplink over its quota",
            FlushOf::Policy { .. } => "the policy's flows on the uplink that breaks its SLA",
            FlushOf::Failback(_) => {
                "the flows the failover had placed on other uplinks (all with failback_flows = \"move\", else those on metered ones)"
            }
        };
        match outcome {
            // The plan did not apply: the flush waits for the next one.
            None => {
                requeue(&mut self.model);
                true
            }
            Some(Ok(n)) => {
                let after = match f.of {
                    FlushOf::Uplink(_) | FlushOf::Quota(_) => "",
                    FlushOf::Policy { .. } => "; they continue on the uplinks it uses now",
                    FlushOf::Failback(_) => "; they reopen through it",
                };
                match &policy {
                    Some(p) => info!(policy = %p, %uplink, flows = ?n, "deleted {whose}{after}"),
                    None => info!(%uplink, flows = ?n, "deleted {whose}{after}"),
                }
                true
            }
            Some(Err(e)) => {
                match &policy {
                    Some(p) => {
                        error!(policy = %p, %uplink, error = %e, "cannot delete {whose}; will retry")
                    }
                    None => error!(%uplink, error = %e, "cannot delete {whose}; will retry"),
                }
                self.metrics
                    .apply
                    .flush_errors
                    .with_label_values(&[uplink.as_str()])
                    .inc();
                requeue(&mut self.model);
                false
            }
        }
    }

    /// Reports the parts of the config the kernel refuses when they change: an event for
    /// each new one (the dataplane logged it), the metric, and what the API and `/readyz`
    /// show.
    fn note_refused(&mut self, refused: &[crate::dataplane::nft::Refused]) {
        let now: Vec<String> = refused.iter().map(ToString::to_string).collect();
        if *self.refused == now {
            return;
        }
        let log = now
            .iter()
            .filter(|r| !self.refused.contains(r))
            .map(|r| LogEntry {
                at: now_millis(),
                uplink: String::new(),
                kind: EventKind::Refused,
                cause: format!(
                    "the kernel refuses {r}; left out of the dataplane until it changes"
                ),
                clients_moved: 0,
            })
            .collect();
        self.record(log);
        let parts: Vec<String> = refused.iter().map(|r| r.part.to_string()).collect();
        self.metrics.apply.set_refused(&parts);
        self.refused = Arc::new(now);
    }

    /// Writes the client assignments beside the loop when they changed: at most one write
    /// in flight and one per `agent.state_save_interval` (a churning LAN of 100k clients
    /// must not rewrite megabytes of flash every second). A failed write (full or
    /// read-only state directory) is reported at a bounded rate and retried.
    fn save_state(&mut self) {
        self.persist
            .save_clients(self.model.clients(), self.config.agent.state_save_interval);
    }

    /// A probe round finished: judged now, or once passive evidence has been read.
    async fn on_probe_report(&mut self, report: probe::Report) {
        let usable = self
            .model
            .uplinks
            .get(report.uplink)
            .is_some_and(|m| m.usable());
        if let Some(report) = self
            .health
            .on_report(report, usable, &self.config, self.generation)
        {
            self.on_round(report).await;
        }
    }

    /// Pins, drains, uplink states and failovers: a small file, written at once so that a
    /// crash right after a failover cannot send clients back to the dead uplink.
    /// Hands changed decisions to the writer; `again` sends them even unchanged (the
    /// retry after a failed write, every second).
    fn save_decisions(&mut self, again: bool) {
        self.persist.save_decisions(self.model.decisions(), again);
    }

    fn on_decisions_saved(&mut self, saved: persist::Saved) {
        self.persist.on_decisions_saved(saved);
        if self.publish.waiting() {
            self.publish_snapshot();
        }
    }

    /// LAN traffic through an interface went unanswered: its uplinks burst their probes
    /// (or, without probes, have their unanswered destinations counted).
    fn on_suspect(&mut self, s: supervise::Suspect) {
        for i in self
            .health
            .on_suspect(&s, &self.config, &self.model, self.generation)
        {
            debug!(uplink = %self.config.uplinks[i].name, "LAN traffic unanswered; probe burst");
        }
    }

    /// An uplink without probes went silent: its health judges by the destinations.
    fn on_silent(&mut self, s: supervise::Silent) {
        let Some(s) = self.health.on_silent(s, self.generation) else {
            return;
        };
        let log = self.model.on_silence(
            s.uplink,
            s.destinations,
            Instant::now(),
            &self.config.health,
            &self.config.failover,
        );
        if self.record(log) {
            self.request_apply(ReadBack::Cache);
            self.publish_metrics();
        }
    }

    async fn on_passive_reading(&mut self, r: supervise::PassiveReading) {
        if let Some(report) = self.health.on_reading(r, &self.config, self.generation) {
            self.on_round(report).await;
        }
    }

    async fn on_round(&mut self, report: probe::Report) {
        debug!(uplink = report.uplink, ok = report.round.ok(), rtts = ?report.round.rtts, "probe round");
        if let Some(u) = self.config.uplinks.get(report.uplink) {
            self.health.observe(&report, &u.name);
        }
        let mut log = self.model.on_round(
            report.uplink,
            &report.round,
            Instant::now(),
            &self.config.health,
            &self.config.failover,
        );
        log.extend(self.model.evaluate_sla(&self.config.policies));
        if self
            .model
            .uplinks
            .get(report.uplink)
            .is_some_and(|m| m.health.confirming())
        {
            self.health.burst(report.uplink, &self.config, &self.model);
        }
        if let (Some(u), Some(m)) = (
            self.config.uplinks.get(report.uplink),
            self.model.uplinks.get(report.uplink),
        ) {
            self.metrics
                .health
                .set_probe_loss(&u.name, m.health.stats.loss());
        }
        if self.record(log) {
            self.request_apply(ReadBack::Cache);
            self.publish_metrics();
        }
    }

    /// Hands the API a snapshot of the model (a pointer copy of the client maps), once
    /// the decisions it shows are on disk (or the disk refuses them: then at once).
    fn publish_snapshot(&mut self) {
        self.save_decisions(false);
        let shown = self.persist.decisions_shown();
        self.publish.snapshot(
            &self.config,
            &self.model,
            self.generation,
            &self.refused,
            shown,
        );
    }

    /// Publishes the model's gauges if anything changed since the last time; scrapes
    /// read them without asking the loop.
    fn publish_metrics(&mut self) {
        self.publish.gauges(&self.config, &self.model);
    }

    /// SIGHUP: a valid new config replaces the old one; an invalid one is rejected and the
    /// old one keeps running. Ownership (the dataplane section) cannot change live.
    async fn reload(&mut self) -> Result<u64, String> {
        let new = match Config::load(&self.config_path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "reload rejected; keeping the running config");
                return Err(format!("reload rejected, the running config stays: {e}"));
            }
        };
        if new.dataplane != self.config.dataplane
            || new.agent.state_dir != self.config.agent.state_dir
            || new.api != self.config.api
        {
            let msg = "reload rejected: [dataplane], [api] and agent.state_dir cannot change while running (restart for [api]; `uplinkd cleanup` and a restart for the others)";
            error!("{msg}");
            return Err(msg.into());
        }
        let clients = self.model.clients().values().cloned().collect();
        let old = std::mem::replace(&mut self.model, Model::new(&new));
        // Uplinks that stay keep their health, so a reload does not reset a failover; new
        // probe settings take effect now.
        self.model
            .keep_runtime(&old, Instant::now(), &new.health, &new.failover);
        self.model.keep_set_edits(&new.sets);
        self.model
            .keep_sla(&old, &self.config.policies, &new.policies);
        let reassigned = self.model.restore(clients);
        self.config = Arc::new(new);
        // The new config's quota actions over the levels counted so far.
        self.hold_quotas();
        self.usage.reconfigure(self.config.clone());
        self.discovery.forget_links();
        self.discovery.drop_dump();
        // Indexed by uplink position, which a reload may change.
        self.health.stop_all();
        if let Err(e) = self.resync_inputs().await {
            warn!(error = %e, "dump after reload failed");
        }
        discovery::warn_floating_bridge_macs(&self.config);
        self.links_changed();
        self.persist.dirty = true;
        self.request_apply(ReadBack::Full);
        self.reconcile_probers_after_apply();
        self.save_state();
        self.publish_metrics();
        self.generation += 1;
        self.publish_snapshot();
        // Logged once the new config is in the kernel.
        let generation = self.generation;
        self.schedule.wait(Box::new(move |applied| match applied {
            Ok(()) => info!(reassigned, generation, "config reloaded"),
            Err(e) => {
                warn!(reassigned, generation, error = %e, "config reloaded; its apply failed and is retried")
            }
        }));
        self.record(vec![LogEntry {
            at: now_millis(),
            uplink: String::new(),
            kind: EventKind::Reload,
            cause: format!("config reloaded (generation {})", self.generation),
            clients_moved: reassigned,
        }]);
        Ok(self.generation)
    }
}

/// `uplinkd cleanup`: removes exactly what uplinkd owns. The state file is kept.
pub async fn cleanup(config: &Config) -> Result<Vec<String>, AgentError> {
    // The agent's own locks: a running agent (a DaemonSet pod while the package is
    // removed) keeps its dataplane, and cleanup says which process holds it.
    let _locks = crate::lock::acquire(&config.agent.state_dir, &config.dataplane.nft_table)?;
    let (conn, handle, _) =
        rtnetlink::new_connection_with_strict_check().map_err(discover::DiscoverError::Socket)?;
    tokio::spawn(conn);
    let mut dataplane = Dataplane::new(config, handle);
    dataplane.check().await?;
    let (table, stats, errors) = dataplane.remove_all().await;
    info!(
        nft_table_removed = table,
        rules_and_routes_removed = stats.deleted,
        "cleanup done"
    );
    Ok(errors.into_iter().map(|e| e.to_string()).collect())
}
