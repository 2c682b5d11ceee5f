//! Prometheus metrics (text format 0.0.4), prefix `uplinkd_`, base units. No per-client
//! labels: per-client figures belong to the API. The agent loop publishes the model's
//! gauges when the model changes (at most a second late); a scrape reads the nft traffic
//! counters itself and never waits on the loop.

use crate::model::nexthop::Hop;
use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::config::{Config, MetricsConfig};
use crate::dataplane::nft::{Counters, Traffic};
use crate::health::UplinkState;
use crate::model::Model;
use crate::model::failover::FailbackPending;

const STATES: [&str; 5] = ["up", "down", "degraded", "draining", "held"];

/// The configured rule names and each one's last nft reading (packets, bytes).
type RuleReadings = (Vec<String>, HashMap<String, (u64, u64)>);

/// Every series the agent exports, in one registry, grouped by the owner that writes
/// them: each owner is handed its group (the series are shared handles) and nothing else.
pub struct Metrics {
    pub registry: Registry,
    /// The model's gauges, published by the loop's publisher.
    pub model: ModelGauges,
    /// Health transitions and probing, written by the loop's health handling and the
    /// supervisor.
    pub health: HealthMetrics,
    /// Applies and flow deletions, written when the executor answers.
    pub apply: ApplyMetrics,
    /// Forwarded traffic and rule counters, read from nft by each scrape.
    pub traffic: TrafficMetrics,
    /// The API's requests and the listeners' refusals.
    pub serving: ServingMetrics,
    /// Bytes per uplink, persisted (the usage owner).
    pub usage: UsageMetrics,
    /// Neighbours discovery did not track (a LAN limit).
    pub lan_refused: IntCounterVec,
    /// Failed state-file writes (persistence).
    pub save_errors: IntCounterVec,
    tasks: IntGauge,
    _build_info: Gauge,
}

/// Registers series in one registry, under the agent's prefix.
struct Reg<'a>(&'a Registry);

impl Reg<'_> {
    fn add<T: prometheus::core::Collector + Clone + 'static>(&self, c: T) -> T {
        self.0
            .register(Box::new(c.clone()))
            .expect("metric names are unique");
        c
    }
    fn gauges(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn float_gauges(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("valid metric"))
    }
    fn counters(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
    }
    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("valid metric"))
    }
    /// Buckets in milliseconds, exported in seconds.
    fn histogram(&self, name: &str, help: &str, ms: &[f64]) -> Histogram {
        self.add(
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(seconds(ms)))
                .expect("valid metric"),
        )
    }
    fn histograms(&self, name: &str, help: &str, ms: &[f64], labels: &[&str]) -> HistogramVec {
        self.add(
            HistogramVec::new(HistogramOpts::new(name, help).buckets(seconds(ms)), labels)
                .expect("valid metric"),
        )
    }
}

fn seconds(ms: &[f64]) -> Vec<f64> {
    ms.iter().map(|x| x / 1000.0).collect()
}

/// The model's gauges: per uplink and LAN-wide.
pub struct ModelGauges {
    uplink_up: IntGaugeVec,
    probe_interval: GaugeVec,
    uplink_state: IntGaugeVec,
    uplink_clients: IntGaugeVec,
    uplink_clients_homed: IntGaugeVec,
    uplink_serving: IntGaugeVec,
    uplink_failback_in: GaugeVec,
    uplink_weight: IntGaugeVec,
    uplink_gateway_known: IntGaugeVec,
    clients: IntGauge,
    routed_clients: IntGauge,
    overrides: IntGauge,
    in_sync: IntGauge,
    moved_on_arrival: IntCounter,
    policy_sla_met: IntGaugeVec,
}

impl ModelGauges {
    fn new(r: &Reg) -> ModelGauges {
        ModelGauges {
            uplink_up: r.gauges(
                "uplink_up",
                "1 when the uplink may carry traffic (up or degraded), else 0",
                &["uplink"],
            ),
            probe_interval: r.float_gauges(
                "uplink_probe_interval_seconds",
                "Seconds between the uplink's probe rounds now: health.standby_interval while a metered uplink carries nothing, else health.interval; only uplinks with probes",
                &["uplink"],
            ),
            uplink_state: r.gauges(
                "uplink_state",
                "The uplink's state, one-hot over up/down/degraded/draining/held",
                &["uplink", "state"],
            ),
            uplink_clients: r.gauges(
                "uplink_clients",
                "Clients whose new connections use the uplink now (failovers, drains and pins applied)",
                &["uplink"],
            ),
            uplink_clients_homed: r.gauges(
                "uplink_clients_homed",
                "Clients homed on the uplink (where they return after a failover)",
                &["uplink"],
            ),
            uplink_serving: r.gauges(
                "uplink_serving",
                "1 while the uplink carries its own clients; 0 while they are failed over or drained elsewhere",
                &["uplink"],
            ),
            uplink_failback_in: r.float_gauges(
                "uplink_failback_in_seconds",
                "Seconds until the automatic failback of a usable uplink whose clients are still elsewhere; 0 when none is pending",
                &["uplink"],
            ),
            uplink_weight: r.gauges("uplink_weight", "Configured weight", &["uplink"]),
            uplink_gateway_known: r.gauges(
                "uplink_gateway_known",
                "1 while the uplink has a next hop for the family (configured, or learned for gateway = \"auto\"), else 0",
                &["uplink", "family"],
            ),
            clients: r.gauge("clients", "Clients known to the agent"),
            routed_clients: r.gauge(
                "routed_clients",
                "Clients that are hosts behind a router on the LAN (counted in clients too)",
            ),
            overrides: r.gauge("overrides", "Operator pins in force"),
            in_sync: r.gauge(
                "in_sync",
                "1 when the last apply left the kernel as planned",
            ),
            moved_on_arrival: r.counter(
                "clients_moved_on_arrival_total",
                "New clients placed on another uplink than the one their first packets took (they arrived together; their later flows leave with another address)",
            ),
            policy_sla_met: r.gauges(
                "policy_sla_met",
                "1 while the uplink meets the policy's SLA (max_rtt, max_loss, max_jitter), 0 while the policy avoids it; only policies with an SLA",
                &["policy", "uplink"],
            ),
        }
    }

    fn forget(&self, name: &str) {
        for v in [
            &self.uplink_up,
            &self.uplink_clients,
            &self.uplink_clients_homed,
            &self.uplink_serving,
            &self.uplink_weight,
        ] {
            let _ = v.remove_label_values(&[name]);
        }
        for s in STATES {
            let _ = self.uplink_state.remove_label_values(&[name, s]);
        }
        for family in ["ipv4", "ipv6"] {
            let _ = self
                .uplink_gateway_known
                .remove_label_values(&[name, family]);
        }
        let _ = self.uplink_failback_in.remove_label_values(&[name]);
        let _ = self.probe_interval.remove_label_values(&[name]);
    }
}

/// Health: transitions, and what the probes and passive evidence saw.
#[derive(Clone)]
pub struct HealthMetrics {
    pub probe_rtt: HistogramVec,
    pub probe_bytes: IntCounterVec,
    probe_loss: GaugeVec,
    pub failovers: IntCounterVec,
    pub failbacks: IntCounterVec,
    pub flaps: IntCounterVec,
    pub lost_while_forwarding: IntCounterVec,
    pub bursts: IntCounterVec,
    pub sla_changes: IntCounterVec,
}

impl HealthMetrics {
    fn new(r: &Reg) -> HealthMetrics {
        HealthMetrics {
            probe_rtt: r.histograms(
                "uplink_probe_rtt_seconds",
                "Probe round-trip time",
                &[1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
                &["uplink"],
            ),
            probe_bytes: r.counters(
                "probe_bytes_total",
                "IP bytes the uplink's probes sent and got back, estimated per probe (an echo request and its reply; a TCP handshake and close)",
                &["uplink"],
            ),
            probe_loss: r.float_gauges(
                "uplink_probe_loss_ratio",
                "Lost probes over the window (0-1)",
                &["uplink"],
            ),
            failovers: r.counters(
                "failovers_total",
                "Failovers of the uplink's clients to other uplinks",
                &["uplink"],
            ),
            failbacks: r.counters(
                "failbacks_total",
                "Failbacks of the uplink's clients to it",
                &["uplink"],
            ),
            flaps: r.counters(
                "uplink_flaps_total",
                "Changes between usable and unusable",
                &["uplink"],
            ),
            lost_while_forwarding: r.counters(
                "uplink_probe_rounds_lost_while_forwarding_total",
                "Failed probe rounds not counted toward down_after because the uplink forwarded traffic from the internet (passive health)",
                &["uplink"],
            ),
            bursts: r.counters(
                "uplink_probe_bursts_total",
                "Probe bursts sent because the LAN's packets out of the uplink went unanswered for health.passive_window, by result (answered, failed: the uplink went down)",
                &["uplink", "result"],
            ),
            sla_changes: r.counters(
                "policy_sla_changes_total",
                "Changes of a policy's SLA verdict on an uplink (each is also a `sla` event)",
                &["policy", "uplink"],
            ),
        }
    }

    /// One uplink's probe loss over its window, after each round (the other gauges follow
    /// model changes; this one moves with every round).
    pub fn set_probe_loss(&self, uplink: &str, loss: f64) {
        self.probe_loss.with_label_values(&[uplink]).set(loss);
    }

    fn counters(&self) -> [&IntCounterVec; 4] {
        [
            &self.failovers,
            &self.failbacks,
            &self.flaps,
            &self.lost_while_forwarding,
        ]
    }

    fn forget(&self, name: &str) {
        let _ = self.probe_bytes.remove_label_values(&[name]);
        let _ = self.probe_loss.remove_label_values(&[name]);
        let _ = self.probe_rtt.remove_label_values(&[name]);
        for c in self.counters() {
            let _ = c.remove_label_values(&[name]);
        }
        for result in ["answered", "failed"] {
            let _ = self.bursts.remove_label_values(&[name, result]);
        }
    }
}

/// Applies: how long they take, how events wait for them, what failed.
#[derive(Clone)]
pub struct ApplyMetrics {
    pub dispatch_latency: Histogram,
    pub apply_duration: Histogram,
    pub apply_errors: IntCounter,
    pub flush_errors: IntCounterVec,
    config_refused: IntGaugeVec,
}

impl ApplyMetrics {
    fn new(r: &Reg) -> ApplyMetrics {
        ApplyMetrics {
            dispatch_latency: r.histogram(
                "dispatch_latency_seconds",
                "Neighbour event to the change in the kernel",
                &[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0],
            ),
            apply_duration: r.histogram(
                "apply_duration_seconds",
                "Plan and apply, including read-back on resync",
                &[
                    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 2500.0,
                ],
            ),
            apply_errors: r.counter("apply_errors_total", "Applies that left an error"),
            flush_errors: r.counters(
                "conntrack_flush_errors_total",
                "Failed deletions of a dead uplink's conntrack entries; retried with backoff",
                &["uplink"],
            ),
            config_refused: r.gauges(
                "config_refused",
                "1 for each part of the config (a rule, a set's elements) the kernel refused: it is left out of the dataplane until it changes",
                &["part"],
            ),
        }
    }

    /// The parts of the config the kernel refuses now, as `rule NAME` / `set NAME`.
    pub fn set_refused(&self, parts: &[String]) {
        self.config_refused.reset();
        for p in parts {
            self.config_refused.with_label_values(&[p.as_str()]).set(1);
        }
    }
}

/// Traffic per uplink and per rule, from nft's counters at each scrape, as monotonic
/// counters across table replacements (which reset nft's).
pub struct TrafficMetrics {
    tx_bytes: IntCounterVec,
    rx_bytes: IntCounterVec,
    tx_packets: IntCounterVec,
    rx_packets: IntCounterVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    /// Last nft counter readings per interface.
    last: std::sync::Mutex<HashMap<String, Traffic>>,
    /// The uplinks last published, as (name, interface): a scrape maps counters to names
    /// with it, and series of uplinks that left the config are removed.
    uplinks: std::sync::Mutex<Vec<(String, String)>>,
    /// The rules last published and their last nft readings (packets, bytes).
    rules: std::sync::Mutex<RuleReadings>,
}

impl TrafficMetrics {
    fn new(r: &Reg) -> TrafficMetrics {
        TrafficMetrics {
            tx_bytes: r.counters(
                "uplink_transmit_bytes_total",
                "Bytes forwarded out through the uplink",
                &["uplink"],
            ),
            rx_bytes: r.counters(
                "uplink_receive_bytes_total",
                "Bytes forwarded in from the uplink",
                &["uplink"],
            ),
            tx_packets: r.counters(
                "uplink_transmit_packets_total",
                "Packets forwarded out through the uplink",
                &["uplink"],
            ),
            rx_packets: r.counters(
                "uplink_receive_packets_total",
                "Packets forwarded in from the uplink",
                &["uplink"],
            ),
            rule_packets: r.counters(
                "rule_packets_total",
                "Packets a [[rule]] decided: each connection's first packet (later ones follow the connection's mark), every packet of a `main` rule",
                &["rule"],
            ),
            rule_bytes: r.counters(
                "rule_bytes_total",
                "Bytes of the packets counted by uplinkd_rule_packets_total",
                &["rule"],
            ),
            last: std::sync::Mutex::new(HashMap::new()),
            uplinks: std::sync::Mutex::new(Vec::new()),
            rules: std::sync::Mutex::new((Vec::new(), HashMap::new())),
        }
    }

    fn counters(&self) -> [&IntCounterVec; 4] {
        [
            &self.tx_packets,
            &self.tx_bytes,
            &self.rx_packets,
            &self.rx_bytes,
        ]
    }

    /// The configured uplinks and rules; returns the uplinks that left the config.
    fn configure(&self, config: &Config) -> Vec<String> {
        let mut known = self.uplinks.lock().expect("lock");
        let current: Vec<(String, String)> = config
            .uplinks
            .iter()
            .map(|u| (u.name.clone(), u.interface.clone()))
            .collect();
        let gone: Vec<String> = known
            .iter()
            .filter(|(n, _)| !current.iter().any(|(c, _)| c == n))
            .map(|(n, _)| n.clone())
            .collect();
        for name in &gone {
            for c in self.counters() {
                let _ = c.remove_label_values(&[name]);
            }
        }
        *known = current;
        drop(known);
        let mut rules = self.rules.lock().expect("lock");
        let names: Vec<String> = config.rules.iter().map(|r| r.name.clone()).collect();
        for gone in rules.0.iter().filter(|n| !names.contains(n)) {
            let _ = self.rule_packets.remove_label_values(&[gone]);
            let _ = self.rule_bytes.remove_label_values(&[gone]);
        }
        for n in &names {
            self.rule_packets.with_label_values(&[n]);
            self.rule_bytes.with_label_values(&[n]);
        }
        rules.0 = names;
        gone
    }

    /// Adds what each rule decided since the last reading to its counters.
    pub fn count_rules(&self, counters: &std::collections::BTreeMap<String, (u64, u64)>) {
        let mut rules = self.rules.lock().expect("lock");
        let (names, last) = &mut *rules;
        for name in names.iter() {
            let now = counters.get(name).copied().unwrap_or_default();
            let before = last.insert(name.clone(), now).unwrap_or_default();
            // A rewritten rules chain starts its counters at 0: `moved` counts from there.
            let delta = crate::dataplane::nft::moved;
            self.rule_packets
                .with_label_values(&[name])
                .inc_by(delta(now.0, before.0));
            self.rule_bytes
                .with_label_values(&[name])
                .inc_by(delta(now.1, before.1));
        }
    }

    /// Whether any rule is configured (a scrape then reads the rule counters).
    pub fn has_rules(&self) -> bool {
        !self.rules.lock().expect("lock").0.is_empty()
    }

    /// Adds the traffic since the last reading to the per-uplink counters.
    pub fn count_traffic(&self, traffic: &std::collections::BTreeMap<String, Traffic>) {
        let uplinks = self.uplinks.lock().expect("lock").clone();
        let mut last = self.last.lock().expect("lock");
        for (name, interface) in &uplinks {
            let name = name.as_str();
            let now = traffic.get(interface).copied().unwrap_or_default();
            let before = last.insert(interface.clone(), now).unwrap_or_default();
            // nft counters restart at 0 when the table is replaced: `moved` counts from
            // there.
            let delta = crate::dataplane::nft::moved;
            self.tx_packets
                .with_label_values(&[name])
                .inc_by(delta(now.tx.0, before.tx.0));
            self.tx_bytes
                .with_label_values(&[name])
                .inc_by(delta(now.tx.1, before.tx.1));
            self.rx_packets
                .with_label_values(&[name])
                .inc_by(delta(now.rx.0, before.rx.0));
            self.rx_bytes
                .with_label_values(&[name])
                .inc_by(delta(now.rx.1, before.rx.1));
        }
    }
}

/// Bytes per uplink and direction as the usage ledger counts them: persisted, so they go
/// on across restarts (`usage.json`).
#[derive(Clone)]
pub struct UsageMetrics {
    bytes: IntCounterVec,
    remaining: IntGaugeVec,
    /// The configured uplinks, and what each series was last brought to: one lock, so a
    /// count that began before a reload cannot bring back a removed uplink's series.
    state: Arc<std::sync::Mutex<UsageSeries>>,
}

#[derive(Default)]
struct UsageSeries {
    uplinks: Vec<String>,
    published: HashMap<(String, &'static str), u64>,
}

impl UsageMetrics {
    fn new(r: &Reg) -> UsageMetrics {
        UsageMetrics {
            bytes: r.counters(
                "uplink_bytes_total",
                "Bytes forwarded through the uplink (direction in: from the ISP, out: to it), counted from the dataplane's counters and kept across restarts",
                &["uplink", "direction"],
            ),
            remaining: r.gauges(
                "uplink_quota_remaining_bytes",
                "Bytes left of the uplink's quota in the current period (0 once used up); only uplinks with a quota",
                &["uplink"],
            ),
            state: Arc::default(),
        }
    }

    /// The uplinks configured now (at start and at each reload, from the loop): the
    /// series of uplinks no longer configured go at once.
    pub fn configure(&self, config: &Config) {
        let mut st = self.state.lock().expect("lock");
        st.uplinks = config.uplinks.iter().map(|u| u.name.clone()).collect();
        let UsageSeries { uplinks, published } = &mut *st;
        published.retain(|(name, dir), _| {
            let keep = uplinks.contains(name);
            if !keep {
                let _ = self.bytes.remove_label_values(&[name.as_str(), *dir]);
                let _ = self.remaining.remove_label_values(&[name.as_str()]);
            }
            keep
        });
    }

    /// Brings the configured uplinks' series to the ledger's totals.
    pub fn publish(&self, ledger: &crate::usage::Ledger) {
        let mut st = self.state.lock().expect("lock");
        let UsageSeries { uplinks, published } = &mut *st;
        for name in uplinks.iter() {
            let usage = ledger.uplinks.get(name).cloned().unwrap_or_default();
            for (dir, total) in [("in", usage.total_rx), ("out", usage.total_tx)] {
                let last = published.entry((name.clone(), dir)).or_insert(0);
                let series = self.bytes.with_label_values(&[name.as_str(), dir]);
                if total > *last {
                    series.inc_by(total - *last);
                    *last = total;
                }
            }
            match usage.remaining() {
                Some(left) => self
                    .remaining
                    .with_label_values(&[name.as_str()])
                    .set(i64::try_from(left).unwrap_or(i64::MAX)),
                None => {
                    let _ = self.remaining.remove_label_values(&[name.as_str()]);
                }
            }
        }
    }
}

/// The API's requests, and connections the listeners closed at once.
#[derive(Clone)]
pub struct ServingMetrics {
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    refused: IntCounterVec,
}

impl ServingMetrics {
    fn new(r: &Reg) -> ServingMetrics {
        ServingMetrics {
            grpc_requests: r.counters(
                "grpc_requests_total",
                "gRPC requests by method and status code",
                &["method", "code"],
            ),
            grpc_duration: r.histograms(
                "grpc_request_duration_seconds",
                "gRPC request latency",
                &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 500.0, 2500.0],
                &["method"],
            ),
            refused: r.counters(
                "listener_connections_refused_total",
                "Connections closed at once because the listener had its maximum open",
                &["listener"],
            ),
        }
    }

    /// A listener closed a connection because it had its maximum open.
    pub fn refused(&self, listener: &str) {
        self.refused.with_label_values(&[listener]).inc();
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new_custom(Some("uplinkd".into()), None).expect("valid prefix");
        let r = Reg(&registry);
        let build_info = r.add(
            Gauge::with_opts(
                Opts::new("build_info", "uplinkd build; always 1")
                    .const_label("version", env!("CARGO_PKG_VERSION")),
            )
            .expect("valid metric"),
        );
        build_info.set(1.0);
        // process_open_fds, process_resident_memory_bytes, process_threads, ...: the
        // standard names, unprefixed.
        prometheus::default_registry()
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .ok();
        Arc::new(Metrics {
            model: ModelGauges::new(&r),
            health: HealthMetrics::new(&r),
            apply: ApplyMetrics::new(&r),
            traffic: TrafficMetrics::new(&r),
            serving: ServingMetrics::new(&r),
            usage: UsageMetrics::new(&r),
            lan_refused: r.counters(
                "lan_neighbours_refused_total",
                "Neighbour events not tracked because a LAN limit was reached (their traffic is hashed over the surviving uplinks)",
                &["limit"],
            ),
            save_errors: r.counters(
                "state_save_errors_total",
                "Failed writes of a state file (full or read-only state_dir); retried every second",
                &["file"],
            ),
            tasks: r.gauge(
                "tasks",
                "Tasks alive in the agent's runtime (leaks show here)",
            ),
            _build_info: build_info,
            registry,
        })
    }

    /// Publishes the model's gauges; `carried` is clients per uplink by current use.
    pub fn publish(&self, config: &Config, model: &Model, carried: &[usize], in_sync: bool) {
        let now = std::time::Instant::now();
        // Series of uplinks removed or renamed by a reload go, so alerts see the truth.
        for gone in self.traffic.configure(config) {
            self.model.forget(&gone);
            self.health.forget(&gone);
        }
        let g = &self.model;
        for (i, (c, m)) in config.uplinks.iter().zip(&model.uplinks).enumerate() {
            let name = c.name.as_str();
            g.uplink_up
                .with_label_values(&[name])
                .set(m.usable() as i64);
            let state = match m.state() {
                UplinkState::Held => "held",
                UplinkState::Down => "down",
                _ if m.drained => "draining",
                UplinkState::Degraded => "degraded",
                UplinkState::Up => "up",
            };
            for s in STATES {
                g.uplink_state
                    .with_label_values(&[name, s])
                    .set((s == state) as i64);
            }
            g.uplink_clients
                .with_label_values(&[name])
                .set(carried.get(i).copied().unwrap_or(0) as i64);
            g.uplink_clients_homed
                .with_label_values(&[name])
                .set(model.counts()[i] as i64);
            g.uplink_serving
                .with_label_values(&[name])
                .set(model.home_target(i).is_direct() as i64);
            let failback = match model.failback_pending(i, now, &config.failover) {
                FailbackPending::In(d) => d.as_secs_f64(),
                _ => 0.0,
            };
            g.uplink_failback_in
                .with_label_values(&[name])
                .set(failback);
            g.uplink_weight
                .with_label_values(&[name])
                .set(c.weight as i64);
            let (hop4, hop6) = model.hops(config, i);
            for (family, hop, carried) in [("ipv4", hop4, true), ("ipv6", hop6, c.ipv6)] {
                if carried {
                    g.uplink_gateway_known
                        .with_label_values(&[name, family])
                        .set((hop != Hop::Unknown) as i64);
                }
            }
            if !c.probes.is_empty() {
                self.health.set_probe_loss(name, m.health.stats.loss());
                self.health.probe_bytes.with_label_values(&[name]);
                g.probe_interval
                    .with_label_values(&[name])
                    .set(crate::plan::probe_interval(config, model, i).as_secs_f64());
            }
            // Every counter shows from the start, at 0.
            for counter in self
                .health
                .counters()
                .into_iter()
                .chain(self.traffic.counters())
            {
                counter.with_label_values(&[name]);
            }
        }
        g.clients.set(model.clients().len() as i64);
        g.routed_clients.set(model.routed_clients() as i64);
        g.overrides.set(model.overrides.len() as i64);
        g.in_sync.set(in_sync as i64);
        g.moved_on_arrival.inc_by(
            model
                .moved_on_arrival
                .saturating_sub(g.moved_on_arrival.get()),
        );
        // Bounded by the config: rebuilt whole, so a reload's removed policies go.
        g.policy_sla_met.reset();
        for (p, pc) in config
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.sla.is_set())
        {
            for &u in &pc.uplinks {
                g.policy_sla_met
                    .with_label_values(&[pc.name.as_str(), config.uplinks[u].name.as_str()])
                    .set(model.sla_met(p, u) as i64);
            }
        }
    }

    pub fn encode(&self) -> String {
        self.tasks.set(
            tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_alive_tasks() as i64)
                .unwrap_or(0),
        );
        let mut families = self.registry.gather();
        families.extend(prometheus::default_registry().gather());
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}

/// A warning logged at most once per `RATE_LIMIT`, with the count of what it stood for.
#[derive(Default)]
pub struct RateLimitedWarning {
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

const RATE_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

impl RateLimitedWarning {
    /// Counts one occurrence; calls `log` with the count since the last log when due.
    pub fn warn(&self, log: impl FnOnce(u64)) {
        let mut s = self.state.lock().expect("lock");
        s.1 += 1;
        let now = std::time::Instant::now();
        if s.0.is_none_or(|t| now.duration_since(t) >= RATE_LIMIT) {
            log(s.1);
            *s = (Some(now), 0);
        }
    }
}

/// How long a metrics connection may take to send its request headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long one metrics connection may stay open, keep-alive included.
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(300);

/// Serves `/metrics` (HTTPS when a certificate is configured). A scrape reads the traffic
/// counters itself and encodes what the loop last published. At most
/// `metrics.max_connections` are open at once; more are closed at once and counted.
pub async fn serve(
    cfg: MetricsConfig,
    metrics: Arc<Metrics>,
    counters: Counters,
) -> Result<(), String> {
    let listen = cfg.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (metrics.listen): {e}"))?;
    let scrape = metrics.clone();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, counters) = (scrape.clone(), counters.clone());
            async move {
                match counters.read(std::time::Duration::from_secs(1)).await {
                    Ok(traffic) => metrics.traffic.count_traffic(&traffic),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the traffic counters for /metrics")
                    }
                }
                if metrics.traffic.has_rules() {
                    match counters.rules(std::time::Duration::from_secs(1)).await {
                        Ok(r) => metrics.traffic.count_rules(&r),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the rule counters for /metrics")
                        }
                    }
                }
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    let tls = match &cfg.tls {
        None => None,
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
            crate::listen::tls::plain_server_config(cert, key)
                .map_err(|e| format!("metrics TLS: {e}"))?,
        )),
    };
    // A quarter of the slots per address: a scraper that leaks connections cannot lock
    // the others out.
    let slots =
        crate::listen::limit::Slots::new(cfg.max_connections, (cfg.max_connections / 4).max(1));
    tokio::spawn(async move {
        let refusals = RateLimitedWarning::default();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, typically: wait instead of spinning.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match slots.take(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    metrics.serving.refused("metrics");
                    refusals.warn(|n| tracing::warn!(%peer, refused = n, "metrics connection refused: {why} (metrics.max_connections)"));
                    continue;
                }
            };
            let (tls, app) = (tls.clone(), app.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper_util::service::TowerToHyperService::new(app);
                let mut builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                builder
                    .http1()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let served = async {
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                .await;
                        }
                        Some(acceptor) => {
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await
                            else {
                                return;
                            };
                            let _ = builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                };
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, served).await;
            });
        }
    });
    tracing::info!(%listen, tls = cfg.tls.is_some(), "metrics serving");
    Ok(())
}
