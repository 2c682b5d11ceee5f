//! Prometheus metrics (text format 0.0.4), prefix `uplinkd_`, base units. No per-client
//! labels: per-client figures belong to the API. Gauges are refreshed from the model and
//! the nft counters at scrape time, by the agent loop, so every value shown is current.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::config::{Config, MetricsConfig};
use crate::dataplane::nft::Traffic;
use crate::health::UplinkState;
use crate::model::Model;

pub struct Metrics {
    pub registry: Registry,
    uplink_up: IntGaugeVec,
    uplink_state: IntGaugeVec,
    uplink_clients: IntGaugeVec,
    uplink_weight: IntGaugeVec,
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
    overrides: IntGauge,
    pub dispatch_latency: Histogram,
    pub apply_duration: Histogram,
    pub apply_errors: IntCounter,
    in_sync: IntGauge,
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    /// Last nft counter readings per interface, to turn them into monotonic counters
    /// across table replacements (which reset nft counters).
    last: std::sync::Mutex<HashMap<String, Traffic>>,
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
            uplink_clients: ivec("uplink_clients", "Clients homed on the uplink", &["uplink"]),
            uplink_weight: ivec("uplink_weight", "Configured weight", &["uplink"]),
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
            last: std::sync::Mutex::new(HashMap::new()),
            _build_info: build_info,
            registry: r,
        })
    }

    /// Brings the gauges and traffic counters up to date.
    pub fn refresh(
        &self,
        config: &Config,
        model: &Model,
        in_sync: bool,
        traffic: &std::collections::BTreeMap<String, Traffic>,
    ) {
        let mut last = self.last.lock().expect("lock");
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
            for s in ["up", "down", "degraded", "draining", "held"] {
                self.uplink_state
                    .with_label_values(&[name, s])
                    .set((s == state) as i64);
            }
            self.uplink_clients
                .with_label_values(&[name])
                .set(model.counts()[i] as i64);
            self.uplink_weight
                .with_label_values(&[name])
                .set(c.weight as i64);
            if !c.probes.is_empty() {
                self.probe_loss
                    .with_label_values(&[name])
                    .set(m.health.stats.loss());
            }
            let now = traffic.get(&c.interface).copied().unwrap_or_default();
            let before = last.insert(c.interface.clone(), now).unwrap_or_default();
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
            for counter in [
                &self.failovers,
                &self.failbacks,
                &self.flaps,
                &self.lost_while_forwarding,
            ] {
                counter.with_label_values(&[name]);
            }
        }
        self.clients.set(model.clients().len() as i64);
        self.overrides.set(model.overrides.len() as i64);
        self.in_sync.set(in_sync as i64);
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}

/// Serves `/metrics` (HTTPS when a certificate is configured): each scrape asks the agent
/// loop to refresh, then encodes.
pub async fn serve(
    cfg: &MetricsConfig,
    metrics: Arc<Metrics>,
    refresh: mpsc::Sender<oneshot::Sender<()>>,
) -> Result<(), String> {
    let listen = cfg.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} (metrics.listen): {e}"))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, refresh) = (metrics.clone(), refresh.clone());
            async move {
                let (tx, rx) = oneshot::channel();
                if refresh.send(tx).await.is_ok() {
                    let _ = rx.await;
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
    match &cfg.tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "metrics listener stopped");
                }
            });
        }
        Some((cert, key)) => {
            let tls = crate::api::tls::plain_server_config(cert, key)
                .map_err(|e| format!("metrics TLS: {e}"))?;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    tokio::spawn(async move {
                        let Ok(Ok(tls)) = tokio::time::timeout(
                            std::time::Duration::from_secs(10),
                            acceptor.accept(tcp),
                        )
                        .await
                        else {
                            return;
                        };
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                    });
                }
            });
        }
    }
    tracing::info!(%listen, tls = cfg.tls.is_some(), "metrics serving");
    Ok(())
}
