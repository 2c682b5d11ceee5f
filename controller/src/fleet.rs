//! Targets (one gateway or an inventory), credentials, and the concurrent fan-out: every
//! gateway under its own deadline, so one slow or dead gateway delays nobody else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use uplink_api::v1::{self, agent_client::AgentClient};

use crate::answer::Answer;

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub address: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Inventory {
    #[serde(default)]
    gateway: Vec<InventoryGateway>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryGateway {
    name: String,
    address: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

pub fn targets(
    gateway: Option<&str>,
    inventory: Option<&Path>,
    selector: Option<&str>,
) -> Result<Vec<Target>> {
    if let Some(g) = gateway {
        check_address(g)?;
        return Ok(vec![Target {
            name: g.to_string(),
            address: g.to_string(),
        }]);
    }
    let Some(path) = inventory else {
        bail!("no target: give --gateway HOST:PORT or --inventory FILE (or UPLINKCTL_INVENTORY)")
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read inventory {}", path.display()))?;
    let inv: Inventory = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    let wanted: Vec<(String, String)> = match selector {
        None => Vec::new(),
        Some(s) => s
            .split(',')
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or_else(|| anyhow::anyhow!("selector {kv:?} is not key=value"))
            })
            .collect::<Result<_>>()?,
    };
    let mut out = Vec::new();
    for g in inv.gateway {
        check_address(&g.address)
            .with_context(|| format!("{}: gateway {}", path.display(), g.name))?;
        if wanted.iter().all(|(k, v)| g.labels.get(k) == Some(v)) {
            out.push(Target {
                name: g.name,
                address: g.address,
            });
        }
    }
    if out.is_empty() {
        bail!(
            "no gateway in {} matches {}",
            path.display(),
            selector.unwrap_or("(no selector)")
        );
    }
    Ok(out)
}

fn check_address(a: &str) -> Result<()> {
    let (host, port) = a
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("{a:?} is not HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        bail!("{a:?} is not HOST:PORT");
    }
    Ok(())
}

#[derive(Clone)]
pub struct Credentials {
    tls: ClientTlsConfig,
}

impl Credentials {
    pub fn load(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Credentials> {
        let read = |flag: &str, env: &str, p: Option<&Path>| -> Result<(PathBuf, Vec<u8>)> {
            let p = p.ok_or_else(|| {
                anyhow::anyhow!("missing credential: give {flag} FILE or set {env}")
            })?;
            let data =
                std::fs::read(p).with_context(|| format!("cannot read {flag} {}", p.display()))?;
            Ok((p.to_owned(), data))
        };
        let (_, ca) = read("--ca", "UPLINKCTL_CA", ca)?;
        let (_, cert) = read("--cert", "UPLINKCTL_CERT", cert)?;
        let (_, key) = read("--key", "UPLINKCTL_KEY", key)?;
        Ok(Credentials {
            tls: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key)),
        })
    }

    async fn connect(
        &self,
        t: &Target,
        timeout: Duration,
    ) -> Result<AgentClient<Channel>, Failure> {
        let host = t
            .address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']'))
            .unwrap_or(&t.address);
        let endpoint = Endpoint::from_shared(format!("https://{}", t.address))
            .map_err(|e| Failure::Unreachable(e.to_string()))?
            .tls_config(self.tls.clone().domain_name(host))
            .map_err(|e| Failure::Unreachable(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Failure::Unreachable(chain(&e)))?;
        Ok(AgentClient::new(channel))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s += &format!(": {c}");
        cur = c.source();
    }
    s
}

#[derive(Debug, Clone)]
pub enum Request {
    Status,
    Uplinks,
    Clients(String),
    Top(v1::ListTopTalkersRequest),
    Pin(v1::SetOverrideRequest),
    Unpin(String),
    Drain(String),
    Undrain(String),
    Failback(String),
    QuotaReset(String),
    QuotaSet(v1::SetQuotaRequest),
    Reload,
    Events,
    Policies,
    Rules,
    Explain(v1::ExplainRequest),
    Sets,
    UpdateSet(v1::UpdateSetRequest),
}

#[derive(Debug, Clone)]
pub enum Failure {
    /// The gateway answered with an error.
    Error(String),
    /// No answer: connection refused, TLS refused, or the deadline passed.
    Unreachable(String),
    /// The gateway answered that it cannot serve yet (UNAVAILABLE: uplinkd is starting).
    /// Counted with the unreachable ones (exit code 4, `unreachable` in JSON): try again.
    NotReady(String),
}

impl Failure {
    /// One line for an operator.
    pub fn text(&self) -> String {
        match self {
            Failure::Error(e) => e.clone(),
            Failure::Unreachable(e) => format!("unreachable: {e}"),
            Failure::NotReady(e) => format!("not ready: {e}"),
        }
    }
}

pub struct GatewayResult {
    pub target: Target,
    pub result: Result<Answer, Failure>,
}

fn status_failure(s: tonic::Status) -> Failure {
    use std::error::Error;
    // Transport failures carry their cause as the status' source.
    let detail = match s.source() {
        Some(src) => format!("{}: {}", s.message(), chain(src)),
        None => s.message().to_string(),
    };
    match s.code() {
        // Said by the server itself: no transport error under it.
        tonic::Code::Unavailable if s.source().is_none() && s.message() != "transport error" => {
            Failure::NotReady(detail)
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Failure::Unreachable(detail),
        // A refused TLS client certificate surfaces on the first request (TLS 1.3 checks it
        // after the client's side of the handshake is done): like Ansible, a refused login
        // is "unreachable", not an error from the gateway.
        _ if s.source().is_some() || s.message() == "transport error" => Failure::Unreachable(
            format!("{detail} (connection lost or our certificate was rejected)"),
        ),
        code => Failure::Error(format!("{code:?}: {detail}")),
    }
}

async fn call(client: &mut AgentClient<Channel>, req: &Request) -> Result<Answer, tonic::Status> {
    Ok(match req {
        Request::Status => Answer::Status(
            client
                .get_status(v1::GetStatusRequest {})
                .await?
                .into_inner(),
        ),
        Request::Uplinks => Answer::Uplinks(
            client
                .list_uplinks(v1::ListUplinksRequest {})
                .await?
                .into_inner()
                .uplinks,
        ),
        Request::Clients(uplink) => {
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let r = client
                    .list_clients(v1::ListClientsRequest {
                        uplink: uplink.clone(),
                        page_size: 1000,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(r.clients);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            Answer::Clients(all)
        }
        Request::Pin(r) => Answer::Pinned(client.set_override(r.clone()).await?.into_inner()),
        Request::Unpin(ip) => {
            client
                .clear_override(v1::ClearOverrideRequest { client: ip.clone() })
                .await?;
            Answer::Unpinned {
                unpinned: ip.clone(),
            }
        }
        Request::Drain(u) => Answer::uplink(
            client
                .drain_uplink(v1::UplinkRequest { uplink: u.clone() })
                .await?
                .into_inner(),
        ),
        Request::Undrain(u) => Answer::uplink(
            client
                .undrain_uplink(v1::UplinkRequest { uplink: u.clone() })
                .await?
                .into_inner(),
        ),
        Request::Failback(u) => Answer::uplink(
            client
                .failback(v1::UplinkRequest { uplink: u.clone() })
                .await?
                .into_inner(),
        ),
        Request::QuotaReset(u) => Answer::uplink(
            client
                .reset_quota(v1::UplinkRequest { uplink: u.clone() })
                .await?
                .into_inner(),
        ),
        Request::QuotaSet(r) => Answer::uplink(client.set_quota(r.clone()).await?.into_inner()),
        Request::Policies => Answer::Policies(
            client
                .list_policies(v1::ListPoliciesRequest {})
                .await?
                .into_inner()
                .policies,
        ),
        Request::Rules => Answer::Rules(
            client
                .list_rules(v1::ListRulesRequest {})
                .await?
                .into_inner()
                .rules,
        ),
        Request::Explain(r) => Answer::Explanation(client.explain(r.clone()).await?.into_inner()),
        Request::Sets => Answer::Sets(
            client
                .list_sets(v1::ListSetsRequest {})
                .await?
                .into_inner()
                .sets,
        ),
        Request::UpdateSet(r) => Answer::Set(client.update_set(r.clone()).await?.into_inner()),
        Request::Top(r) => Answer::Top(client.list_top_talkers(r.clone()).await?.into_inner()),
        Request::Reload => Answer::Reloaded(
            client
                .reload_config(v1::ReloadConfigRequest {})
                .await?
                .into_inner(),
        ),
        Request::Events => {
            // History only: the stream's first part, until it goes quiet.
            let mut stream = client
                .watch_events(v1::WatchEventsRequest {})
                .await?
                .into_inner();
            let mut events = Vec::new();
            // Quiet for 300 ms, the end of the stream, or an error: the history is read.
            while let Ok(Ok(Some(e))) =
                tokio::time::timeout(Duration::from_millis(300), stream.message()).await
            {
                events.push(e);
            }
            Answer::Events(events)
        }
    })
}

pub async fn fan_out(
    targets: &[Target],
    creds: &Credentials,
    req: &Request,
    parallel: usize,
    timeout: Duration,
) -> Vec<GatewayResult> {
    let mut results: Vec<GatewayResult> = futures::stream::iter(targets.iter().cloned())
        .map(|t| {
            let (creds, req) = (creds.clone(), req.clone());
            // A task per gateway, so that the TLS handshakes run on every core rather than
            // all inside this one future (a fleet of 1,000 is mostly handshakes).
            tokio::spawn(async move {
                let work = async {
                    let mut client = creds.connect(&t, timeout).await?;
                    call(&mut client, &req).await.map_err(status_failure)
                };
                let result = match tokio::time::timeout(timeout, work).await {
                    Ok(r) => r,
                    Err(_) => Err(Failure::Unreachable(format!(
                        "no answer within {}",
                        humantime::format_duration(timeout)
                    ))),
                };
                GatewayResult { target: t, result }
            })
        })
        .buffer_unordered(parallel.max(1))
        .map(|joined| joined.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
        .collect()
        .await;
    results.sort_by(|a, b| a.target.name.cmp(&b.target.name));
    results
}

/// How a write rolls over a fleet: `batch` gateways at a time, `pause` between batches,
/// stopping at the first failure when `stop_on_error`.
pub struct Rolling {
    pub batch: usize,
    pub pause: Duration,
    pub stop_on_error: bool,
}

impl Request {
    /// Writes change a gateway; only they roll.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::Pin(_)
                | Request::Unpin(_)
                | Request::Drain(_)
                | Request::Undrain(_)
                | Request::Failback(_)
                | Request::QuotaReset(_)
                | Request::QuotaSet(_)
                | Request::Reload
                | Request::UpdateSet(_)
        )
    }
}

/// A gateway is healthy after its step when it answers and its dataplane is in sync (the
/// step's change is in the kernel); it has `timeout` to get there.
async fn healthy(t: &Target, creds: &Credentials, timeout: Duration) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut client = creds.connect(t, timeout).await?;
        let status = client
            .get_status(v1::GetStatusRequest {})
            .await
            .map_err(status_failure)?
            .into_inner();
        if !status.refused.is_empty() {
            return Err(Failure::Error(format!(
                "after the step the kernel refuses part of its config: {}",
                status.refused.join("; ")
            )));
        }
        if status.in_sync {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Error(format!(
                "after the step its dataplane is not in sync with its config (for {}); see its log",
                humantime::format_duration(timeout)
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Applies `req` batch by batch (in inventory order), checking each gateway's health after
/// its step; `on_batch` sees each batch's results as they come. Returns every result (a
/// failed health check is that gateway's failure) and the gateways never reached.
pub async fn roll(
    targets: &[Target],
    creds: &Credentials,
    req: &Request,
    rolling: &Rolling,
    timeout: Duration,
    mut on_batch: impl FnMut(usize, &[GatewayResult]),
) -> (Vec<GatewayResult>, Vec<Target>) {
    let mut done = Vec::new();
    let batches: Vec<&[Target]> = targets.chunks(rolling.batch.max(1)).collect();
    for (n, batch) in batches.iter().enumerate() {
        if n > 0 && !rolling.pause.is_zero() {
            tokio::time::sleep(rolling.pause).await;
        }
        let mut results = fan_out(batch, creds, req, batch.len(), timeout).await;
        for r in &mut results {
            if r.result.is_ok()
                && let Err(f) = healthy(&r.target, creds, timeout).await
            {
                r.result = Err(f);
            }
        }
        on_batch(n, &results);
        let failed = results.iter().any(|r| r.result.is_err());
        done.extend(results);
        if failed && rolling.stop_on_error {
            let rest = batches[n + 1..]
                .iter()
                .flat_map(|b| b.iter().cloned())
                .collect();
            return (done, rest);
        }
    }
    (done, Vec::new())
}

pub fn exit_code(results: &[GatewayResult]) -> u8 {
    let mut code = 0;
    for r in results {
        match &r.result {
            Ok(_) => {}
            Err(Failure::Error(_)) => code |= 2,
            Err(Failure::Unreachable(_) | Failure::NotReady(_)) => code |= 4,
        }
    }
    code
}

/// `events --follow`: every gateway's stream, merged, each line tagged with its gateway
/// when there are several. A gateway that goes away (a restart) is reconnected, and both
/// are said on stderr; the history it sends again is not printed twice. One `--gateway`
/// that cannot be reached at first is an error (exit code 4), as for any command.
/// Each event goes to `show` with its gateway's name when there are several.
pub async fn follow_events(
    targets: &[Target],
    creds: &Credentials,
    timeout: Duration,
    mut show: impl FnMut(&v1::Event, Option<&str>),
) -> Result<u8> {
    // A first request, not just a connection: TLS 1.3 refuses a client certificate only
    // after the client's side of the handshake, so a rejected certificate shows here (and
    // would otherwise be retried for ever).
    if let [t] = targets {
        let first = match creds.connect(t, timeout).await {
            Ok(mut c) => c
                .get_status(v1::GetStatusRequest {})
                .await
                .map(|_| ())
                .map_err(status_failure),
            Err(f) => Err(f),
        };
        match first {
            Ok(()) => {}
            Err(f @ (Failure::Unreachable(_) | Failure::NotReady(_))) => {
                eprintln!("{}: {}", t.name, f.text());
                return Ok(4);
            }
            Err(Failure::Error(e)) => {
                eprintln!("{}: {e}", t.name);
                return Ok(2);
            }
        }
    }
    let tagged = targets.len() > 1;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for t in targets {
        tokio::spawn(watch(t.clone(), creds.clone(), timeout, tx.clone()));
    }
    drop(tx);
    while let Some((gateway, e)) = rx.recv().await {
        show(&e, tagged.then_some(gateway.as_str()));
    }
    Ok(0)
}

/// One gateway's events, forever: connect, stream, and on any end reconnect with backoff
/// (1 s doubling to 10 s).
async fn watch(
    t: Target,
    creds: Credentials,
    timeout: Duration,
    tx: tokio::sync::mpsc::UnboundedSender<(String, v1::Event)>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut connected_before = false;
    let mut announced_down = false;
    // Already printed: the newest time, and the events at that very millisecond.
    let mut last_at = 0u64;
    let mut at_last: Vec<v1::Event> = Vec::new();
    loop {
        let stream = match creds.connect(&t, timeout).await {
            Ok(mut c) => c
                .watch_events(v1::WatchEventsRequest {})
                .await
                .map(|s| s.into_inner())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Err(Failure::Unreachable(e) | Failure::NotReady(e) | Failure::Error(e)) => Err(e),
        };
        match stream {
            Ok(mut stream) => {
                if connected_before {
                    eprintln!("{}: reconnected", t.name);
                }
                connected_before = true;
                announced_down = false;
                backoff = Duration::from_secs(1);
                let ended = loop {
                    match stream.message().await {
                        Ok(Some(e)) => {
                            if e.at_ms < last_at || (e.at_ms == last_at && at_last.contains(&e)) {
                                continue;
                            }
                            if e.at_ms > last_at {
                                last_at = e.at_ms;
                                at_last.clear();
                            }
                            at_last.push(e.clone());
                            if tx.send((t.name.clone(), e)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "the stream ended".to_string(),
                        Err(s) => break s.message().to_string(),
                    }
                };
                eprintln!("{}: disconnected ({ended}); reconnecting", t.name);
            }
            Err(e) if !announced_down => {
                eprintln!("{}: unreachable ({e}); retrying", t.name);
                announced_down = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
