//! The gRPC API (mTLS only) and the plaintext health listener. Handlers validate input
//! into domain values at the edge, hand them to the agent loop as commands (the loop owns
//! the model and the dataplane, so a write returns once the change is in the kernel), and
//! map errors to gRPC status codes in one place.

pub mod auth;
pub mod snapshot;
pub mod validate;
pub mod view;

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use uplink_api::v1::{self, agent_server};

use crate::config::ApiConfig;
use crate::listen::{limit, tls};
use auth::Role;

/// Why a command was refused; mapped to a gRPC code in one place (`to_status`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    /// Busy: the caller may try again.
    #[error("{0}")]
    Unavailable(String),
}

fn to_status(e: ApiError) -> Status {
    match e {
        ApiError::InvalidArgument(m) => Status::invalid_argument(m),
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::Internal(m) => Status::internal(m),
        ApiError::Unavailable(m) => Status::unavailable(m),
    }
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

/// What the API asks of the agent loop.
pub enum Command {
    SetOverride {
        ip: IpAddr,
        uplink: String,
        ttl: Option<Duration>,
        reply: Reply<v1::Override>,
    },
    ClearOverride {
        ip: IpAddr,
        reply: Reply<()>,
    },
    Drain {
        uplink: String,
        drain: bool,
        reply: Reply<v1::Uplink>,
    },
    Failback {
        uplink: String,
        reply: Reply<v1::Uplink>,
    },
    Reload(Reply<u64>),
    UpdateSet {
        set: String,
        add: Vec<ipnet::IpNet>,
        del: Vec<ipnet::IpNet>,
        reply: Reply<v1::Set>,
    },
    Watch(Reply<(Vec<v1::Event>, broadcast::Receiver<v1::Event>)>),
    /// `uplinkctl quota reset` (`bytes`: `None`) or `quota set`.
    Quota {
        uplink: String,
        bytes: Option<u64>,
        reply: Reply<v1::Uplink>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr} ({key}): {source}")]
    Listen {
        addr: std::net::SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
}

/// Binds both listeners (so a bad address fails the start) and serves in the background.
/// The agent loop's pulse: `/healthz` fails when the loop has not turned for
/// `LIVENESS`, e.g. while it is stuck behind a hung `nft`.
pub struct Heartbeat {
    started: std::time::Instant,
    /// Milliseconds since `started` of the last beat.
    last: std::sync::atomic::AtomicU64,
    /// Set while the dataplane's tools time out: the loop turns, but cannot act.
    stuck: std::sync::Mutex<Option<String>>,
}

/// The loop turns at least once a second (housekeeping); this much silence means stuck.
pub const LIVENESS: Duration = Duration::from_secs(5);

impl Heartbeat {
    pub fn new() -> Heartbeat {
        Heartbeat {
            started: std::time::Instant::now(),
            last: 0.into(),
            stuck: std::sync::Mutex::new(None),
        }
    }

    pub fn beat(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Records why the dataplane cannot act (`None`: it can again).
    pub fn set_stuck(&self, why: Option<String>) {
        *self.stuck.lock().expect("lock") = why;
    }

    /// Why the agent is not alive, if it is not.
    pub fn problem(&self) -> Option<String> {
        let silence = self.silence();
        if silence >= LIVENESS {
            return Some(format!(
                "the agent loop has not turned for {:.1}s",
                silence.as_secs_f64()
            ));
        }
        self.stuck.lock().expect("lock").clone()
    }

    /// How long since the loop last turned.
    pub fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

impl Default for Heartbeat {
    fn default() -> Heartbeat {
        Heartbeat::new()
    }
}

/// At most this many WatchEvents streams at once; each holds a copy of the history.
pub const MAX_WATCHERS: usize = 64;
/// What reads answer, and `/readyz` says, until the loop publishes its first model.
const STARTING: &str = "uplinkd is starting: its state is restored and applied to the kernel before it is shown; try again in a moment";
/// At most this many API connections (TLS handshakes included) at once, and from one
/// address.
pub const MAX_API_CONNECTIONS: usize = 256;
pub const MAX_API_CONNECTIONS_PER_PEER: usize = 32;

/// What the API reads beside the agent loop: the loop's snapshot, the dataplane's traffic
/// counters and the usage owner's ledgers (per uplink, per client).
pub struct Reads {
    pub snapshot: tokio::sync::watch::Receiver<Arc<snapshot::Snapshot>>,
    pub counters: crate::dataplane::nft::Counters,
    pub usage: tokio::sync::watch::Receiver<Arc<crate::usage::Ledger>>,
    pub clients: tokio::sync::watch::Receiver<Arc<crate::usage::ClientLedger>>,
}

pub async fn serve(
    api: ApiConfig,
    tx: mpsc::Sender<Command>,
    ready: Arc<AtomicBool>,
    heartbeat: Arc<Heartbeat>,
    metrics: crate::metrics::ServingMetrics,
    reads: Reads,
) -> Result<(), ServeError> {
    let Reads {
        snapshot,
        counters,
        usage,
        clients,
    } = reads;
    let tls = tls::server_config(&api)?;
    let grpc = TcpListener::bind(api.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: api.listen,
            key: "api.listen",
            source,
        })?;
    let health = TcpListener::bind(api.health_listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: api.health_listen,
            key: "api.health_listen",
            source,
        })?;
    tokio::spawn(serve_health(health, ready, heartbeat, snapshot.clone()));

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let incoming = async_stream_of_tls(grpc, acceptor, metrics.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<agent_server::AgentServer<AgentService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor set is valid");
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("descriptor set is valid");
    let service = AgentService {
        tx,
        metrics,
        counters,
        watchers: Arc::new(tokio::sync::Semaphore::new(MAX_WATCHERS)),
        snapshot,
        usage,
        clients,
    };
    tokio::spawn(async move {
        let r = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(agent_server::AgentServer::new(service))
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server stopped");
        }
    });
    tracing::info!(listen = %api.listen, health = %api.health_listen, "API serving (mTLS)");
    Ok(())
}

/// Accepted TCP connections after a successful TLS handshake; failed handshakes (no
/// certificate, wrong CA, expired) are logged and dropped without stalling the others.
fn async_stream_of_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    metrics: crate::metrics::ServingMetrics,
) -> impl Stream<
    Item = Result<Limited<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>, std::io::Error>,
> {
    let (tx, rx) = mpsc::channel(64);
    let slots = limit::Slots::new(MAX_API_CONNECTIONS, MAX_API_CONNECTIONS_PER_PEER);
    let refusals = crate::metrics::RateLimitedWarning::default();
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Over the cap the connection is closed at once: the agent's descriptors stay
            // bounded whatever a peer opens.
            let permit = match slots.take(peer.ip()) {
                Ok(p) => p,
                Err(why) => {
                    metrics.refused("api");
                    refusals.warn(
                        |n| tracing::warn!(%peer, refused = n, "API connection refused: {why}"),
                    );
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx
                            .send(Ok(Limited {
                                inner: tls,
                                _slot: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A connection that holds one of the listener's slots until it closes.
pub struct Limited<T> {
    inner: T,
    _slot: limit::Slot,
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Limited<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn serve_health(
    listener: TcpListener,
    ready: Arc<AtomicBool>,
    heartbeat: Arc<Heartbeat>,
    snapshot: tokio::sync::watch::Receiver<Arc<snapshot::Snapshot>>,
) {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(move || {
                let heartbeat = heartbeat.clone();
                async move {
                    match heartbeat.problem() {
                        None => (StatusCode::OK, "ok\n".to_string()),
                        Some(p) => (StatusCode::SERVICE_UNAVAILABLE, format!("{p}\n")),
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                let (refused, starting) = {
                    let s = snapshot.borrow();
                    (s.refused.clone(), s.starting)
                };
                async move {
                    // A config the kernel partly refuses runs without that part: not what
                    // the operator asked for, so a rollout must not go on as if it were.
                    if !refused.is_empty() {
                        let mut text = "the kernel refuses part of the config:\n".to_string();
                        for r in refused.iter() {
                            text += &format!("  {r}\n");
                        }
                        (StatusCode::SERVICE_UNAVAILABLE, text)
                    } else if starting {
                        (StatusCode::SERVICE_UNAVAILABLE, format!("{STARTING}\n"))
                    } else if ready.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready\n".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not in sync yet\n".to_string(),
                        )
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "health listener stopped");
    }
}

pub struct AgentService {
    tx: mpsc::Sender<Command>,
    metrics: crate::metrics::ServingMetrics,
    /// Traffic counters are read here, beside the agent loop.
    counters: crate::dataplane::nft::Counters,
    watchers: Arc<tokio::sync::Semaphore>,
    snapshot: tokio::sync::watch::Receiver<Arc<snapshot::Snapshot>>,
    /// The uplinks' usage as its owner last counted it.
    usage: tokio::sync::watch::Receiver<Arc<crate::usage::Ledger>>,
    /// Each client's bytes per uplink, as the usage owner last counted them.
    clients: tokio::sync::watch::Receiver<Arc<crate::usage::ClientLedger>>,
}

/// The caller's role, from its verified client certificate.
fn caller<T>(req: &Request<T>) -> Result<(Role, String), Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let (role, name) = auth::role_of(leaf).map_err(Status::permission_denied)?;
    tracing::Span::current().record("caller", name.as_str());
    if role == Role::Agent {
        return Err(Status::permission_denied(format!(
            "{name}: an agent certificate cannot act as a client"
        )));
    }
    Ok((role, name))
}

fn read<T>(req: &Request<T>) -> Result<(), Status> {
    caller(req).map(|_| ())
}

fn write<T>(req: &Request<T>, what: &str) -> Result<String, Status> {
    let (role, name) = caller(req)?;
    if role != Role::Operator {
        return Err(Status::permission_denied(format!(
            "{name} is a viewer; {what} needs the operator role"
        )));
    }
    Ok(name)
}

impl AgentService {
    /// Counts and times one call by method and resulting code.
    async fn timed<T>(
        &self,
        method: &str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        use tracing::Instrument;
        let t = std::time::Instant::now();
        // caller is recorded by the role check inside the call.
        let span = tracing::info_span!(
            "grpc",
            method,
            caller = tracing::field::Empty,
            code = tracing::field::Empty
        );
        let r = call.instrument(span.clone()).await;
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        span.record("code", format!("{code:?}"));
        self.metrics
            .grpc_requests
            .with_label_values(&[method, &format!("{code:?}")])
            .inc();
        self.metrics
            .grpc_duration
            .with_label_values(&[method])
            .observe(t.elapsed().as_secs_f64());
        r
    }

    /// The model as the loop last published it; refused until the loop has published
    /// its first.
    fn snapshot(&self) -> Result<Arc<snapshot::Snapshot>, Status> {
        let s = self.snapshot.borrow().clone();
        if s.starting {
            return Err(Status::unavailable(STARTING));
        }
        Ok(s)
    }

    /// Fills in the traffic counters of uplink views.
    async fn with_traffic(&self, mut uplinks: Vec<v1::Uplink>) -> Result<Vec<v1::Uplink>, Status> {
        let traffic = self
            .counters
            .read(Duration::from_secs(1))
            .await
            .map_err(|e| Status::internal(format!("cannot read the traffic counters: {e}")))?;
        let usage = self.usage.borrow().clone();
        for u in &mut uplinks {
            if let Some(t) = traffic.get(&u.interface) {
                (u.tx_packets, u.tx_bytes) = t.tx;
                (u.rx_packets, u.rx_bytes) = t.rx;
            }
            if let Some(used) = usage.uplinks.get(&u.name) {
                u.used_rx_bytes = used.rx;
                u.used_tx_bytes = used.tx;
                u.period_start_ms = u64::try_from(used.period_start)
                    .unwrap_or(0)
                    .saturating_mul(1000);
                u.quota_bytes = used.quota;
                u.quota_set = used.quota_set.is_some();
                if used.quota.is_some() {
                    u.quota_level = used.level.as_str().into();
                } else {
                    u.quota_action.clear();
                }
            }
        }
        Ok(uplinks)
    }

    /// Every set's elements as the dataplane has them, in config order: an external
    /// set's are read from the kernel, where its filler put them.
    async fn sets(&self, s: &snapshot::Snapshot) -> Result<Vec<Vec<ipnet::IpNet>>, Status> {
        let mut sets = Vec::new();
        for set in s.config.sets.iter() {
            if set.external {
                sets.push(
                    self.counters
                        .external_set(&set.name)
                        .await
                        .map_err(|e| {
                            Status::internal(format!("cannot read set {}: {e}", set.name))
                        })?
                        .to_vec(),
                );
            } else {
                sets.push(s.model.set_elements(set));
            }
        }
        Ok(sets)
    }

    async fn one_with_traffic(&self, u: v1::Uplink) -> Result<Response<v1::Uplink>, Status> {
        let mut v = self
            .with_traffic(vec![u])
            .await
            .map_err(|s| Status::internal(format!("the change is applied, but {}", s.message())))?;
        Ok(Response::new(v.remove(0)))
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, Status> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| Status::unavailable("agent is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("agent is shutting down"))?
            .map_err(to_status)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;

#[tonic::async_trait]
impl agent_server::Agent for AgentService {
    async fn get_status(
        &self,
        req: Request<v1::GetStatusRequest>,
    ) -> Result<Response<v1::AgentStatus>, Status> {
        self.timed("GetStatus", async move {
            read(&req)?;
            Ok(Response::new(self.snapshot()?.status()))
        })
        .await
    }

    async fn list_uplinks(
        &self,
        req: Request<v1::ListUplinksRequest>,
    ) -> Result<Response<v1::ListUplinksResponse>, Status> {
        self.timed("ListUplinks", async move {
            read(&req)?;
            let uplinks = self.with_traffic(self.snapshot()?.uplinks()).await?;
            Ok(Response::new(v1::ListUplinksResponse { uplinks }))
        })
        .await
    }

    async fn list_clients(
        &self,
        req: Request<v1::ListClientsRequest>,
    ) -> Result<Response<v1::ListClientsResponse>, Status> {
        self.timed("ListClients", async move {
            read(&req)?;
            let r = req.into_inner();
            let uplink = (!r.uplink.trim().is_empty()).then(|| r.uplink.trim().to_string());
            let (limit, after) = validate::page(r.page_size, &r.page_token)?;
            // A page of 10k clients takes milliseconds: off the runtime's workers.
            let snapshot = self.snapshot()?;
            let usage = self.clients.borrow().clone();
            let (clients, next) = tokio::task::spawn_blocking(move || {
                snapshot
                    .clients(uplink.as_deref(), after, limit)
                    .map(|(mut c, next)| {
                        with_usage(&mut c, &usage);
                        (c, next)
                    })
            })
            .await
            .map_err(|e| Status::internal(format!("ListClients failed: {e}")))?
            .map_err(to_status)?;
            Ok(Response::new(v1::ListClientsResponse {
                clients,
                next_page_token: next.unwrap_or_default(),
            }))
        })
        .await
    }

    async fn get_client(
        &self,
        req: Request<v1::GetClientRequest>,
    ) -> Result<Response<v1::Client>, Status> {
        self.timed("GetClient", async move {
            read(&req)?;
            let key = validate::non_empty("client", &req.get_ref().client)?;
            let mut c = self.snapshot()?.client(&key).map_err(to_status)?;
            with_usage(std::slice::from_mut(&mut c), &self.clients.borrow());
            Ok(Response::new(c))
        })
        .await
    }

    async fn list_overrides(
        &self,
        req: Request<v1::ListOverridesRequest>,
    ) -> Result<Response<v1::ListOverridesResponse>, Status> {
        self.timed("ListOverrides", async move {
            read(&req)?;
            let overrides = self.snapshot()?.overrides();
            Ok(Response::new(v1::ListOverridesResponse { overrides }))
        })
        .await
    }

    async fn list_policies(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.timed("ListPolicies", async move {
            read(&req)?;
            let s = self.snapshot()?;
            Ok(Response::new(v1::ListPoliciesResponse {
                policies: view::policies(&s.config, &s.model),
            }))
        })
        .await
    }

    async fn list_rules(
        &self,
        req: Request<v1::ListRulesRequest>,
    ) -> Result<Response<v1::ListRulesResponse>, Status> {
        self.timed("ListRules", async move {
            read(&req)?;
            let s = self.snapshot()?;
            let counters = if s.config.rules.is_empty() {
                Default::default()
            } else {
                self.counters
                    .rules(Duration::from_secs(1))
                    .await
                    .map_err(|e| Status::internal(format!("cannot read the rule counters: {e}")))?
            };
            Ok(Response::new(v1::ListRulesResponse {
                rules: view::rules(&s.config, &counters),
            }))
        })
        .await
    }

    async fn explain(
        &self,
        req: Request<v1::ExplainRequest>,
    ) -> Result<Response<v1::Explanation>, Status> {
        self.timed("Explain", async move {
            read(&req)?;
            let flow = validate::flow(req.get_ref())?;
            let s = self.snapshot()?;
            let sets = self.sets(&s).await?;
            let e = crate::plan::verdict::explain(&s.config, &s.model, &sets, &flow);
            Ok(Response::new(view::explanation(e)))
        })
        .await
    }

    async fn list_top_talkers(
        &self,
        req: Request<v1::ListTopTalkersRequest>,
    ) -> Result<Response<v1::ListTopTalkersResponse>, Status> {
        self.timed("ListTopTalkers", async move {
            read(&req)?;
            let r = req.into_inner();
            let snapshot = self.snapshot()?;
            if !snapshot.config.lan.client_usage {
                return Err(Status::failed_precondition(
                    "usage per client is off on this gateway: set lan.client_usage = true (it costs a set update per forwarded packet; docs/metered.md)",
                ));
            }
            let uplink = r.uplink.trim();
            if !uplink.is_empty() && !snapshot.config.uplinks.iter().any(|u| u.name == uplink) {
                return Err(to_status(snapshot::unknown_uplink(&snapshot.config, uplink)));
            }
            let limit = match r.limit {
                0 => 20,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(Status::invalid_argument(format!(
                        "limit: {n} is more than 1000"
                    )));
                }
            };
            let top = self
                .clients
                .borrow()
                .top((!uplink.is_empty()).then_some(uplink), limit);
            let talkers = top
                .into_iter()
                .map(|t| v1::Talker {
                    address: t.addr.to_string(),
                    mac: snapshot
                        .model
                        .client_by_addr(&t.addr)
                        .map(|c| c.mac.to_string())
                        .unwrap_or_default(),
                    uplink: t.uplink,
                    bytes: t.bytes,
                })
                .collect();
            Ok(Response::new(v1::ListTopTalkersResponse {
                talkers,
                window_seconds: crate::usage::TOP_WINDOW.as_secs() as u32,
            }))
        })
        .await
    }

    async fn list_sets(
        &self,
        req: Request<v1::ListSetsRequest>,
    ) -> Result<Response<v1::ListSetsResponse>, Status> {
        self.timed("ListSets", async move {
            read(&req)?;
            let s = self.snapshot()?;
            let elements = self.sets(&s).await?;
            Ok(Response::new(v1::ListSetsResponse {
                sets: s
                    .config
                    .sets
                    .iter()
                    .zip(elements)
                    .map(|(c, e)| view::set(c, &e))
                    .collect(),
            }))
        })
        .await
    }

    async fn update_set(
        &self,
        req: Request<v1::UpdateSetRequest>,
    ) -> Result<Response<v1::Set>, Status> {
        self.timed("UpdateSet", async move {
            let who = write(&req, "UpdateSet")?;
            let r = req.into_inner();
            let set = validate::non_empty("set", &r.set)?;
            let add = validate::cidrs("add", &r.add)?;
            let del = validate::cidrs("del", &r.del)?;
            if add.is_empty() && del.is_empty() {
                return Err(Status::invalid_argument(
                    "nothing to change: give elements to add or del",
                ));
            }
            tracing::info!(caller = %who, %set, ?add, ?del, "UpdateSet");
            let v = self
                .ask(|reply| Command::UpdateSet {
                    set,
                    add,
                    del,
                    reply,
                })
                .await?;
            Ok(Response::new(v))
        })
        .await
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.timed("WatchEvents", async move {
            read(&req)?;
            let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
                Status::resource_exhausted(format!(
                    "{MAX_WATCHERS} event streams are open on this agent already; close one and retry"
                ))
            })?;
            let (history, rx) = self.ask(Command::Watch).await?;
            // A watcher too slow for the event rate is told what it lost, and the stream
            // ends, rather than skipping events silently. The stream holds its slot.
            let live = tokio_stream::wrappers::BroadcastStream::new(rx).map(move |e| {
                let _slot = &permit;
                e.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)| {
                    Status::data_loss(format!(
                        "this watcher fell behind and missed {n} events; reconnect to get the history again"
                    ))
                })
            });
            let stream: EventStream =
                Box::pin(tokio_stream::iter(history.into_iter().map(Ok)).chain(live));
            Ok(Response::new(stream))
        })
        .await
    }

    async fn set_override(
        &self,
        req: Request<v1::SetOverrideRequest>,
    ) -> Result<Response<v1::Override>, Status> {
        self.timed("SetOverride", async move {
            let who = write(&req, "SetOverride")?;
            let r = req.into_inner();
            let ip = validate::ip("client", &r.client)?;
            let uplink = validate::non_empty("uplink", &r.uplink)?;
            let ttl = validate::pin_duration(&r.duration)?;
            tracing::info!(caller = %who, %ip, %uplink, "SetOverride");
            self.ask(|reply| Command::SetOverride {
                ip,
                uplink,
                ttl,
                reply,
            })
            .await
            .map(Response::new)
        })
        .await
    }

    async fn clear_override(
        &self,
        req: Request<v1::ClearOverrideRequest>,
    ) -> Result<Response<v1::ClearOverrideResponse>, Status> {
        self.timed("ClearOverride", async move {
            let who = write(&req, "ClearOverride")?;
            let ip = validate::ip("client", &req.get_ref().client)?;
            tracing::info!(caller = %who, %ip, "ClearOverride");
            self.ask(|reply| Command::ClearOverride { ip, reply })
                .await?;
            Ok(Response::new(v1::ClearOverrideResponse {}))
        })
        .await
    }

    async fn drain_uplink(
        &self,
        req: Request<v1::UplinkRequest>,
    ) -> Result<Response<v1::Uplink>, Status> {
        self.timed("DrainUplink", async move {
            let who = write(&req, "DrainUplink")?;
            let uplink = validate::non_empty("uplink", &req.get_ref().uplink)?;
            tracing::info!(caller = %who, %uplink, "DrainUplink");
            let u = self
                .ask(|reply| Command::Drain {
                    uplink,
                    drain: true,
                    reply,
                })
                .await?;
            self.one_with_traffic(u).await
        })
        .await
    }

    async fn undrain_uplink(
        &self,
        req: Request<v1::UplinkRequest>,
    ) -> Result<Response<v1::Uplink>, Status> {
        self.timed("UndrainUplink", async move {
            let who = write(&req, "UndrainUplink")?;
            let uplink = validate::non_empty("uplink", &req.get_ref().uplink)?;
            tracing::info!(caller = %who, %uplink, "UndrainUplink");
            let u = self
                .ask(|reply| Command::Drain {
                    uplink,
                    drain: false,
                    reply,
                })
                .await?;
            self.one_with_traffic(u).await
        })
        .await
    }

    async fn failback(
        &self,
        req: Request<v1::UplinkRequest>,
    ) -> Result<Response<v1::Uplink>, Status> {
        self.timed("Failback", async move {
            let who = write(&req, "Failback")?;
            let uplink = validate::non_empty("uplink", &req.get_ref().uplink)?;
            tracing::info!(caller = %who, %uplink, "Failback");
            let u = self
                .ask(|reply| Command::Failback { uplink, reply })
                .await?;
            self.one_with_traffic(u).await
        })
        .await
    }

    async fn reset_quota(
        &self,
        req: Request<v1::UplinkRequest>,
    ) -> Result<Response<v1::Uplink>, Status> {
        self.timed("ResetQuota", async move {
            let who = write(&req, "ResetQuota")?;
            let uplink = validate::non_empty("uplink", &req.get_ref().uplink)?;
            tracing::info!(caller = %who, %uplink, "ResetQuota");
            let u = self
                .ask(|reply| Command::Quota {
                    uplink,
                    bytes: None,
                    reply,
                })
                .await?;
            self.one_with_traffic(u).await
        })
        .await
    }

    async fn set_quota(
        &self,
        req: Request<v1::SetQuotaRequest>,
    ) -> Result<Response<v1::Uplink>, Status> {
        self.timed("SetQuota", async move {
            let who = write(&req, "SetQuota")?;
            let uplink = validate::non_empty("uplink", &req.get_ref().uplink)?;
            let bytes = req.get_ref().bytes;
            if bytes == 0 {
                return Err(Status::invalid_argument(
                    "bytes: a quota of 0 allows nothing; give at least 1 (uplinkctl takes sizes such as 30GB or 20GiB)",
                ));
            }
            tracing::info!(caller = %who, %uplink, bytes, "SetQuota");
            let u = self
                .ask(|reply| Command::Quota {
                    uplink,
                    bytes: Some(bytes),
                    reply,
                })
                .await?;
            self.one_with_traffic(u).await
        })
        .await
    }

    async fn reload_config(
        &self,
        req: Request<v1::ReloadConfigRequest>,
    ) -> Result<Response<v1::ReloadConfigResponse>, Status> {
        self.timed("ReloadConfig", async move {
            let who = write(&req, "ReloadConfig")?;
            tracing::info!(caller = %who, "ReloadConfig");
            let config_generation = self.ask(Command::Reload).await?;
            Ok(Response::new(v1::ReloadConfigResponse {
                config_generation,
            }))
        })
        .await
    }
}

/// Fills in each client's bytes per uplink, its addresses together.
fn with_usage(clients: &mut [v1::Client], ledger: &crate::usage::ClientLedger) {
    if ledger.totals.is_empty() {
        return;
    }
    for c in clients {
        let mut per: std::collections::BTreeMap<&str, (u64, u64)> = Default::default();
        for a in &c.addresses {
            let Some(t) = a
                .parse::<IpAddr>()
                .ok()
                .and_then(|ip| ledger.totals.get(&ip))
            else {
                continue;
            };
            for (uplink, (rx, tx)) in t {
                let sum = per.entry(uplink.as_str()).or_default();
                sum.0 += rx;
                sum.1 += tx;
            }
        }
        c.usage = per
            .into_iter()
            .map(|(uplink, (rx_bytes, tx_bytes))| v1::UplinkBytes {
                uplink: uplink.to_string(),
                rx_bytes,
                tx_bytes,
            })
            .collect();
    }
}
