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

pub struct Metrics {
    pub registry: Registry,
    uplink_up: IntGaugeVec,
    uplink_state: IntGaugeVec,
    uplink_clients: IntGaugeVec,
    uplink_clients_homed: IntGaugeVec,
    uplink_serving: IntGaugeVec,
    uplink_failback_in: GaugeVec,
    uplink_weight: IntGaugeVec,
    uplink_gateway_known: IntGaugeVec,
    pub probe_rtt: HistogramVec,
    probe_loss: GaugeVec,
    tx_bytes: IntCounterVec,
    rx_bytes: IntCounterVec,
    tx_packets: IntCounterVec,
    rx_packets: IntCounterVec,
    pub failovers: IntCounterVec,
    pub failbacks: IntCounterVec,
    pub flaps: IntCounterVec,
    pub lost_while_forwarding: IntCounterVec,
    clients: IntGauge,
    routed_clients: IntGauge,
    overrides: IntGauge,
    pub dispatch_latency: Histogram,
    pub apply_duration: Histogram,
    pub apply_errors: IntCounter,
    in_sync: IntGauge,
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    refused: IntCounterVec,
    pub lan_refused: IntCounterVec,
    tasks: IntGauge,
    pub save_errors: IntCounterVec,
    pub flush_errors: IntCounterVec,
    /// Last nft counter readings per interface, to turn them into monotonic counters
    /// across table replacements (which reset nft counters).
    last: std::sync::Mutex<HashMap<String, Traffic>>,
    /// The uplinks last published, as (name, interface): a scrape maps counters to names
    /// with it, and series of uplinks that left the config are removed.
    uplinks: std::sync::Mutex<Vec<(String, String)>>,
    policy_sla_met: IntGaugeVec,
    config_refused: IntGaugeVec,
    pub sla_changes: IntCounterVec,
    rule_packets: IntCounterVec,
    rule_bytes: IntCounterVec,
    /// The rules last published and their last nft readings (packets, bytes).
    rules: std::sync::Mutex<RuleReadings>,
    moved_on_arrival: IntCounter,
    _build_info: Gauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new_custom(Some("uplinkd".into()), None).expect("valid prefix");
        let ivec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let cvec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let ms = |v: &[f64]| v.iter().map(|x| x / 1000.0).collect::<Vec<_>>();
        let build_info = reg(
            &r,
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
            uplink_up: ivec(
                "uplink_up",
                "1 when the uplink may carry traffic (up or degraded), else 0",
                &["uplink"],
            ),
            uplink_state: ivec(
                "uplink_state",
                "The uplink's state, one-hot over up/down/degraded/draining/held",
                &["uplink", "state"],
            ),
            uplink_clients: ivec(
                "uplink_clients",
                "Clients whose new connections use the uplink now (failovers, drains and pins applied)",
                &["uplink"],
            ),
            uplink_clients_homed: ivec(
                "uplink_clients_homed",
                "Clients homed on the uplink (where they return after a failover)",
                &["uplink"],
            ),
            uplink_serving: ivec(
                "uplink_serving",
                "1 while the uplink carries its own clients; 0 while they are failed over or drained elsewhere",
                &["uplink"],
            ),
            uplink_failback_in: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "uplink_failback_in_seconds",
                        "Seconds until the automatic failback of a usable uplink whose clients are still elsewhere; 0 when none is pending",
                    ),
                    &["uplink"],
                )
                .expect("valid metric"),
            ),
            uplink_weight: ivec("uplink_weight", "Configured weight", &["uplink"]),
            uplink_gateway_known: ivec(
                "uplink_gateway_known",
                "1 while the uplink has a next hop for the family (configured, or learned for gateway = \"auto\"), else 0",
                &["uplink", "family"],
            ),
            probe_rtt: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("uplink_probe_rtt_seconds", "Probe round-trip time")
                        .buckets(ms(&[
                            1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0,
                        ])),
                    &["uplink"],
                )
                .expect("valid metric"),
            ),
            probe_loss: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "uplink_probe_loss_ratio",
                        "Lost probes over the window (0-1)",
                    ),
                    &["uplink"],
                )
                .expect("valid metric"),
            ),
            tx_bytes: cvec(
                "uplink_transmit_bytes_total",
                "Bytes forwarded out through the uplink",
                &["uplink"],
            ),
            rx_bytes: cvec(
                "uplink_receive_bytes_total",
                "Bytes forwarded in from the uplink",
                &["uplink"],
            ),
            tx_packets: cvec(
                "uplink_transmit_packets_total",
                "Packets forwarded out through the uplink",
                &["uplink"],
            ),
            rx_packets: cvec(
                "uplink_receive_packets_total",
                "Packets forwarded in from the uplink",
                &["uplink"],
            ),
            failovers: cvec(
                "failovers_total",
                "Failovers of the uplink's clients to other uplinks",
                &["uplink"],
            ),
            failbacks: cvec(
                "failbacks_total",
                "Failbacks of the uplink's clients to it",
                &["uplink"],
            ),
            flaps: cvec(
                "uplink_flaps_total",
                "Changes between usable and unusable",
                &["uplink"],
            ),
            lost_while_forwarding: cvec(
                "uplink_probe_rounds_lost_while_forwarding_total",
                "Failed probe rounds not counted toward down_after because the uplink forwarded traffic from the internet (passive health)",
                &["uplink"],
            ),
            clients: reg(
                &r,
                IntGauge::new("clients", "Clients known to the agent").expect("valid metric"),
            ),
            routed_clients: reg(
                &r,
                IntGauge::new(
                    "routed_clients",
                    "Clients that are hosts behind a router on the LAN (counted in clients too)",
                )
                .expect("valid metric"),
            ),
            overrides: reg(
                &r,
                IntGauge::new("overrides", "Operator pins in force").expect("valid metric"),
            ),
            dispatch_latency: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "dispatch_latency_seconds",
                        "Neighbour event to the change in the kernel",
                    )
                    .buckets(ms(&[0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0])),
                )
                .expect("valid metric"),
            ),
            apply_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "apply_duration_seconds",
                        "Plan and apply, including read-back on resync",
                    )
                    .buckets(ms(&[
                        1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 2500.0,
                    ])),
                )
                .expect("valid metric"),
            ),
            apply_errors: reg(
                &r,
                IntCounter::new("apply_errors_total", "Applies that left an error")
                    .expect("valid metric"),
            ),
            in_sync: reg(
                &r,
                IntGauge::new(
                    "in_sync",
                    "1 when the last apply left the kernel as planned",
                )
                .expect("valid metric"),
            ),
            grpc_requests: cvec(
                "grpc_requests_total",
                "gRPC requests by method and status code",
                &["method", "code"],
            ),
            grpc_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("grpc_request_duration_seconds", "gRPC request latency")
                        .buckets(ms(&[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 500.0, 2500.0])),
                    &["method"],
                )
                .expect("valid metric"),
            ),
            refused: cvec(
                "listener_connections_refused_total",
                "Connections closed at once because the listener had its maximum open",
                &["listener"],
            ),
            tasks: reg(
                &r,
                IntGauge::new("tasks", "Tasks alive in the agent's runtime (leaks show here)")
                    .expect("valid metric"),
            ),
            lan_refused: cvec(
                "lan_neighbours_refused_total",
                "Neighbour events not tracked because a LAN limit was reached (their traffic is hashed over the surviving uplinks)",
                &["limit"],
            ),
            save_errors: cvec(
                "state_save_errors_total",
                "Failed writes of a state file (full or read-only state_dir); retried every second",
                &["file"],
            ),
            flush_errors: cvec(
                "conntrack_flush_errors_total",
                "Failed deletions of a dead uplink's conntrack entries; retried with backoff",
                &["uplink"],
            ),
            last: std::sync::Mutex::new(HashMap::new()),
            uplinks: std::sync::Mutex::new(Vec::new()),
            policy_sla_met: ivec(
                "policy_sla_met",
                "1 while the uplink meets the policy's SLA (max_rtt, max_loss, max_jitter), 0 while the policy avoids it; only policies with an SLA",
                &["policy", "uplink"],
            ),
            config_refused: ivec(
                "config_refused",
                "1 for each part of the config (a rule, a set's elements) the kernel refused: it is left out of the dataplane until it changes",
                &["part"],
            ),
            sla_changes: cvec(
                "policy_sla_changes_total",
                "Changes of a policy's SLA verdict on an uplink (each is also a `sla` event)",
                &["policy", "uplink"],
            ),
            rule_packets: cvec(
                "rule_packets_total",
                "Packets a [[rule]] decided: each connection's first packet (later ones follow the connection's mark), every packet of a `main` rule",
                &["rule"],
            ),
            rule_bytes: cvec(
                "rule_bytes_total",
                "Bytes of the packets counted by uplinkd_rule_packets_total",
                &["rule"],
            ),
            rules: std::sync::Mutex::new((Vec::new(), HashMap::new())),
            moved_on_arrival: reg(
                &r,
                IntCounter::new(
                    "clients_moved_on_arrival_total",
                    "New clients placed on another uplink than the one their first packets took (they arrived together; their later flows leave with another address)",
                )
                .expect("valid metric"),
            ),
            _build_info: build_info,
            registry: r,
        })
    }

    /// Publishes the model's gauges; `carried` is clients per uplink by current use.
    /// One uplink's probe loss over its window, after each round (the other gauges follow
    /// model changes; this one moves with every round).
    pub fn set_probe_loss(&self, uplink: &str, loss: f64) {
        self.probe_loss.with_label_values(&[uplink]).set(loss);
    }

    /// The parts of the config the kernel refuses now, as `rule NAME` / `set NAME`.
    pub fn set_refused(&self, parts: &[String]) {
        self.config_refused.reset();
        for p in parts {
            self.config_refused.with_label_values(&[p.as_str()]).set(1);
        }
    }

    pub fn publish(&self, config: &Config, model: &Model, carried: &[usize], in_sync: bool) {
        let now = std::time::Instant::now();
        let mut known = self.uplinks.lock().expect("lock");
        let current: Vec<(String, String)> = config
            .uplinks
            .iter()
            .map(|u| (u.name.clone(), u.interface.clone()))
            .collect();
        // Series of uplinks removed or renamed by a reload go, so alerts see the truth.
        for (gone, _) in known
            .iter()
            .filter(|(n, _)| !current.iter().any(|(c, _)| c == n))
        {
            self.forget(gone);
        }
        *known = current;
        drop(known);
        for (i, (c, m)) in config.uplinks.iter().zip(&model.uplinks).enumerate() {
            let name = c.name.as_str();
            self.uplink_up
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
                self.uplink_state
                    .with_label_values(&[name, s])
                    .set((s == state) as i64);
            }
            self.uplink_clients
                .with_label_values(&[name])
                .set(carried.get(i).copied().unwrap_or(0) as i64);
            self.uplink_clients_homed
                .with_label_values(&[name])
                .set(model.counts()[i] as i64);
            self.uplink_serving
                .with_label_values(&[name])
                .set(model.home_target(i).is_direct() as i64);
            let failback = match model.failback_pending(i, now, &config.failover) {
                FailbackPending::In(d) => d.as_secs_f64(),
                _ => 0.0,
            };
            self.uplink_failback_in
                .with_label_values(&[name])
                .set(failback);
            self.uplink_weight
                .with_label_values(&[name])
                .set(c.weight as i64);
            let (hop4, hop6) = model.hops(config, i);
            for (family, hop, carried) in [("ipv4", hop4, true), ("ipv6", hop6, c.ipv6)] {
                if carried {
                    self.uplink_gateway_known
                        .with_label_values(&[name, family])
                        .set((hop != Hop::Unknown) as i64);
                }
            }
            if !c.probes.is_empty() {
                self.probe_loss
                    .with_label_values(&[name])
                    .set(m.health.stats.loss());
            }
            // Every counter shows from the start, at 0.
            for counter in self.uplink_counters() {
                counter.with_label_values(&[name]);
            }
        }
        self.clients.set(model.clients().len() as i64);
        self.routed_clients.set(model.routed_clients() as i64);
        self.overrides.set(model.overrides.len() as i64);
        self.in_sync.set(in_sync as i64);
        self.moved_on_arrival.inc_by(
            model
                .moved_on_arrival
                .saturating_sub(self.moved_on_arrival.get()),
        );
        // Bounded by the config: rebuilt whole, so a reload's removed policies go.
        self.policy_sla_met.reset();
        for (p, pc) in config
            .policies
            .iter()
            .enumerate()
            .filter(|(_, p)| p.sla.is_set())
        {
            for &u in &pc.uplinks {
                self.policy_sla_met
                    .with_label_values(&[pc.name.as_str(), config.uplinks[u].name.as_str()])
                    .set(model.sla_met(p, u) as i64);
            }
        }
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
    }

    /// Adds what each rule decided since the last reading to its counters.
    pub fn count_rules(&self, counters: &std::collections::BTreeMap<String, (u64, u64)>) {
        let mut rules = self.rules.lock().expect("lock");
        let (names, last) = &mut *rules;
        for name in names.iter() {
            let now = counters.get(name).copied().unwrap_or_default();
            let before = last.insert(name.clone(), now).unwrap_or_default();
            // A rewritten rules chain starts its counters at 0: count from there.
            let delta = |n: u64, b: u64| if n >= b { n - b } else { n };
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

    /// The counters labelled by uplink only.
    fn uplink_counters(&self) -> [&IntCounterVec; 8] {
        [
            &self.failovers,
            &self.failbacks,
            &self.flaps,
            &self.lost_while_forwarding,
            &self.tx_packets,
            &self.tx_bytes,
            &self.rx_packets,
            &self.rx_bytes,
        ]
    }

    /// Removes every series of an uplink that is no longer configured.
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
        for v in [&self.probe_loss, &self.uplink_failback_in] {
            let _ = v.remove_label_values(&[name]);
        }
        let _ = self.probe_rtt.remove_label_values(&[name]);
        for c in self.uplink_counters() {
            let _ = c.remove_label_values(&[name]);
        }
    }

    /// Adds the traffic since the last reading to the per-uplink counters.
    pub fn count_traffic(&self, traffic: &std::collections::BTreeMap<String, Traffic>) {
        let uplinks = self.uplinks.lock().expect("lock").clone();
        let mut last = self.last.lock().expect("lock");
        for (name, interface) in &uplinks {
            let name = name.as_str();
            let now = traffic.get(interface).copied().unwrap_or_default();
            let before = last.insert(interface.clone(), now).unwrap_or_default();
            // nft counters restart at 0 when the table is replaced: count from there.
            let delta = |n: u64, b: u64| if n >= b { n - b } else { n };
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

    /// A listener closed a connection because it had its maximum open.
    pub fn refused(&self, listener: &str) {
        self.refused.with_label_values(&[listener]).inc();
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
                    Ok(traffic) => metrics.count_traffic(&traffic),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the traffic counters for /metrics")
                    }
                }
                if metrics.has_rules() {
                    match counters.rules(std::time::Duration::from_secs(1)).await {
                        Ok(r) => metrics.count_rules(&r),
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
                    metrics.refused("metrics");
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
