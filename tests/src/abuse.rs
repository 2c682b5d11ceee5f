//! The abuse benchmark: dispatch latency and the carrier-cut traffic gap, measured on a
//! gateway with 50k clients, first idle, then while it is abused through its API and its
//! listeners: a viewer opening 2,000 WatchEvents streams (re-trying the refused ones every
//! second), another listing every client in a loop, 2,000 idle connections to each of the
//! metrics and API ports, and 300 scrapes a second.

use std::io::Write;
use std::net::{IpAddr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{DiesWithSpawner, Lab, UplinkSpec};

fn client_addr(prefix: u16, i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, prefix, (i >> 16) as u16, i as u16)
}

fn client_mac(prefix: u8, i: u32) -> String {
    let b = i.to_be_bytes();
    format!(
        "02:{prefix:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[0], b[1], b[2], b[3]
    )
}

/// Adds `n` LAN clients at once (neighbour entries, one MAC each).
pub fn add_clients(lab: &Lab, prefix: u16, n: u32) -> Result<()> {
    let mut batch = Command::new("ip")
        .args(["-n", &lab.ns("gw"), "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut w = std::io::BufWriter::new(batch.stdin.take().context("piped")?);
        for i in 0..n {
            writeln!(
                w,
                "neigh replace {} lladdr {} dev br-lan nud permanent",
                client_addr(prefix, i),
                client_mac(prefix as u8, i)
            )?;
        }
    }
    if !batch.wait()?.success() {
        bail!("ip -batch failed");
    }
    Ok(())
}

/// Reads `nft monitor elements` lines from `rx` until every address in `sent` was seen
/// committed to `map` (each is removed as it is seen), or `timeout` passes; returns the
/// latencies from the times in `sent`, in milliseconds.
pub fn commit_latencies(
    rx: &std::sync::mpsc::Receiver<(Instant, String)>,
    map: &str,
    sent: &mut std::collections::HashMap<IpAddr, Instant>,
    timeout: Duration,
) -> Vec<f64> {
    let mut lat = Vec::new();
    let deadline = Instant::now() + timeout;
    while !sent.is_empty() && Instant::now() < deadline {
        let Ok((t, line)) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        if !line.contains(map) {
            continue;
        }
        // "add element inet uplinkd client4 { a : goto home_x, b : goto home_y }"
        let body = line.split('{').nth(1).unwrap_or_default();
        for part in body.split(',') {
            if let Some(ip) = part
                .split_whitespace()
                .next()
                .and_then(|s| s.parse::<IpAddr>().ok())
                && let Some(t0) = sent.remove(&ip)
            {
                lat.push(t.duration_since(t0).as_secs_f64() * 1000.0);
            }
        }
    }
    lat
}

/// Neighbour added → its client6 element committed (as `nft monitor` sees it), for `n`
/// new clients one every `every`; milliseconds, sorted.
pub fn dispatch_latency(lab: &Lab, prefix: u16, n: u32, every: Duration) -> Result<Vec<f64>> {
    use std::io::BufRead;
    let mut monitor = Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "nft", "monitor", "elements"])
        .stdout(Stdio::piped())
        .dies_with_spawner()
        .spawn()?;
    let out = monitor.stdout.take().context("piped")?;
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut batch = Command::new("ip")
        .args(["-n", &lab.ns("gw"), "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    let mut stdin = batch.stdin.take().context("piped")?;
    let mut sent = std::collections::HashMap::new();
    for i in 0..n {
        let ip = client_addr(prefix, i);
        sent.insert(IpAddr::V6(ip), Instant::now());
        writeln!(
            stdin,
            "neigh replace {ip} lladdr {} dev br-lan nud permanent",
            client_mac(prefix as u8, i)
        )?;
        stdin.flush()?;
        std::thread::sleep(every);
    }
    drop(stdin);
    batch.wait()?;
    let mut lat = commit_latencies(&rx, "client6", &mut sent, Duration::from_secs(10));
    let _ = monitor.kill();
    let _ = monitor.wait();
    if !sent.is_empty() {
        bail!("{} of {n} elements never committed", sent.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    Ok(lat)
}

/// How an uplink fails for a gap measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Carrier loss (the ISP side of the link goes down).
    Carrier,
    /// The ISP drops everything it forwards while the link stays up.
    Silent,
}

/// The longest gap without an answer on client 1's UDP flow (one datagram every 5 ms)
/// across a carrier cut of its uplink, in milliseconds; the carrier is restored after.
pub fn carrier_gap(lab: &Lab, uplink: &str, other: &str) -> Result<f64> {
    failure_gap(lab, uplink, other, Failure::Carrier)
}

/// The longest gap without an answer on client 1's UDP flow (one datagram every 5 ms)
/// across `failure` of `uplink`, until its answers come back through `other`, in
/// milliseconds. The uplink is repaired after.
pub fn failure_gap(lab: &Lab, uplink: &str, other: &str, failure: Failure) -> Result<f64> {
    let sock = lab.client_socket(1, false)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let recv = sock.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let receiver = std::thread::spawn(move || {
        let (mut times, mut seen) = (Vec::new(), Vec::<IpAddr>::new());
        let mut buf = [0u8; 512];
        while !flag.load(Ordering::SeqCst) {
            if let Ok(n) = recv.recv(&mut buf) {
                times.push(Instant::now());
                if let Some(ip) = String::from_utf8_lossy(&buf[..n])
                    .split(' ')
                    .next()
                    .and_then(|s| s.parse().ok())
                    && !seen.contains(&ip)
                {
                    seen.push(ip);
                }
            }
        }
        (times, seen)
    });
    let flag = stop.clone();
    let sender = std::thread::spawn(move || {
        let mut n = 0u64;
        while !flag.load(Ordering::SeqCst) {
            let _ = sock.send(format!("gap {n}").as_bytes());
            n += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let cut = Instant::now();
    let wait = match failure {
        Failure::Carrier => {
            lab.carrier(uplink, false)?;
            700
        }
        Failure::Silent => {
            lab.upstream_loss(uplink, 100)?;
            2500
        }
    };
    std::thread::sleep(Duration::from_millis(wait));
    stop.store(true, Ordering::SeqCst);
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let (times, seen) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    match failure {
        Failure::Carrier => lab.carrier(uplink, true)?,
        Failure::Silent => lab.upstream_loss(uplink, 0)?,
    }
    let moved = seen
        .iter()
        .any(|ip| lab.uplink_of_source(*ip).as_deref() == Some(other));
    if !moved || !times.iter().any(|t| *t > cut) {
        bail!("traffic did not resume through {other} (seen {seen:?})");
    }
    Ok(times
        .windows(2)
        .filter(|w| w[1] > cut)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1000.0)
        .fold(0.0, f64::max))
}

/// What the abusers did, for the report.
#[derive(Debug, Default)]
pub struct AbuseCounts {
    pub watch_refused: AtomicU64,
    pub watch_open: AtomicU64,
    pub full_listings: AtomicU64,
    pub scrapes: AtomicU64,
    pub scrapes_refused: AtomicU64,
    pub idle_connections: AtomicU64,
}

/// Starts the abusers in the gateway's namespace; they run until `stop` is set.
pub fn start_abuse(
    lab: &Lab,
    stop: Arc<AtomicBool>,
    counts: Arc<AbuseCounts>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let ns = lab.ns("gw");
    let certs = lab.dir.join("certs");
    Ok(std::thread::spawn(move || -> Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{ns}"))?;
        use std::os::fd::AsFd;
        // This thread, and the current-thread runtime on it, live in the gateway.
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(abuse(certs, stop, counts))
    }))
}

async fn channel(certs: &std::path::Path) -> Result<tonic::transport::Channel> {
    let tls = crate::client_tls(certs, "view", "127.0.0.1")?;
    tonic::transport::Endpoint::from_static("https://127.0.0.1:7443")
        .tls_config(tls)?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to the API: {e:?}"))
}

async fn abuse(
    certs: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    counts: Arc<AbuseCounts>,
) -> Result<()> {
    use uplink_api::v1::agent_client::AgentClient;
    use uplink_api::v1::{ListClientsRequest, WatchEventsRequest};
    let mut tasks = tokio::task::JoinSet::new();
    // 2,000 idle connections to each port from another address (127.0.0.2), held until
    // the end.
    for port in [9477u16, 7443] {
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.spawn(async move {
            let mut idle = Vec::new();
            for _ in 0..2000 {
                let Ok(s) = tokio::net::TcpSocket::new_v4() else {
                    continue;
                };
                if s.bind(([127, 0, 0, 2], 0).into()).is_err() {
                    continue;
                }
                if let Ok(s) = s.connect(([127, 0, 0, 1], port).into()).await {
                    idle.push(s);
                    counts.idle_connections.fetch_add(1, Ordering::Relaxed);
                }
            }
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    // One viewer: 2,000 WatchEvents streams over 20 connections; refused ones retry each
    // second.
    for _ in 0..20 {
        let ch = channel(&certs).await?;
        for _ in 0..100 {
            let (ch, stop, counts) = (ch.clone(), stop.clone(), counts.clone());
            tasks.spawn(async move {
                let mut client = AgentClient::new(ch);
                while !stop.load(Ordering::Relaxed) {
                    match client.watch_events(WatchEventsRequest {}).await {
                        Ok(r) => {
                            counts.watch_open.fetch_add(1, Ordering::Relaxed);
                            let mut s = r.into_inner();
                            while !stop.load(Ordering::Relaxed) {
                                match tokio::time::timeout(Duration::from_millis(500), s.message())
                                    .await
                                {
                                    Ok(Ok(Some(_))) | Err(_) => {}
                                    Ok(_) => break,
                                }
                            }
                        }
                        Err(_) => {
                            counts.watch_refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            });
        }
    }
    // Another viewer lists every client, page after page, in a loop.
    {
        let (ch, stop, counts) = (channel(&certs).await?, stop.clone(), counts.clone());
        tasks.spawn(async move {
            let mut client = AgentClient::new(ch);
            while !stop.load(Ordering::Relaxed) {
                let mut token = String::new();
                loop {
                    let Ok(r) = client
                        .list_clients(ListClientsRequest {
                            uplink: String::new(),
                            page_size: 10_000,
                            page_token: token.clone(),
                        })
                        .await
                    else {
                        break;
                    };
                    token = r.into_inner().next_page_token;
                    if token.is_empty() {
                        counts.full_listings.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        });
    }
    // 300 scrapes a second.
    {
        let (stop, counts) = (stop.clone(), counts.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(3333));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let counts = counts.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", 9477)).await
                    else {
                        counts.scrapes_refused.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
                    let mut body = Vec::new();
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body))
                        .await;
                    if body.starts_with(b"HTTP/1.0 200") || body.starts_with(b"HTTP/1.1 200") {
                        counts.scrapes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        counts.scrapes_refused.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
    }
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tasks.abort_all();
    Ok(())
}

/// A gateway for the abuse benchmark: two uplinks, one flow client, `clients` more LAN
/// clients, the API and metrics on.
pub fn abuse_lab(clients: u32) -> Result<Lab> {
    let mut lab = Lab::build(
        "abuse",
        vec![
            UplinkSpec::new("isp1", 1, false),
            UplinkSpec::new("isp2", 1, false),
        ],
        1,
        0,
    )?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[failover]\nfailback_delay = \"0s\"\nmax_flaps = 1000\n{api}"),
    )?;
    lab.start_agent()?;
    lab.greet_clients()?;
    add_clients(&lab, 0x7, clients)?;
    lab.wait_for(Duration::from_secs(60), "every client assigned", || {
        let out = lab.gw(&["curl", "-sf", "http://127.0.0.1:9477/metrics"])?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("uplinkd_clients "))
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|n| n >= f64::from(clients)))
    })?;
    Ok(lab)
}
