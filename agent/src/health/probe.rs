//! Active probes, sent out through one specific uplink whatever the main table says: every
//! socket is bound to the uplink's device and source address and carries its fwmark (so
//! uplinkd's rule sends it to the uplink's table).
//!
//! A round sends every target at once and counts as good when `quorum` answer. A probe is
//! lost after `timeout`, or after one `interval` when nothing at all has come back through
//! the uplink since the round began: a silent uplink is declared so quickly, while a slow
//! (saturated) one, whose older answers are still arriving, gets the full timeout.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::Round;
use crate::config::Probe;

/// Where an uplink's default route points: what the plan routes by and what a probe
/// needs to leave through the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Through this gateway.
    Via(IpAddr),
    /// By device only.
    Device,
    /// `auto` and nothing learned yet: no route.
    Unknown,
}

/// What a prober needs to know about its uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub uplink: usize,
    pub interface: String,
    pub fwmark: u32,
    pub src4: Option<Ipv4Addr>,
    pub src6: Option<Ipv6Addr>,
    pub targets: Vec<Probe>,
    /// Text an HTTP probe's 2xx answer must contain (`probe_expect`).
    pub expect: Option<String>,
    pub quorum: usize,
    pub interval: Duration,
    pub timeout: Duration,
    /// Probes per target in a burst, and their spacing (`health.burst_*`).
    pub burst_count: u32,
    pub burst_interval: Duration,
    /// The uplink's next hops (IPv4, IPv6). Not used by the probes, which leave by the
    /// uplink's mark and table; a change restarts them, so a round starts the moment a
    /// learned gateway appears instead of finishing one that had no route.
    pub hops: (Hop, Hop),
}

#[derive(Debug)]
pub struct Report {
    pub uplink: usize,
    pub round: Round,
}

/// Replies waiting to be matched: ICMP sequence → who waits for it.
type Pending = Arc<Mutex<HashMap<u16, oneshot::Sender<Instant>>>>;

/// Shared by a prober's rounds: when the last answer of any kind came back.
#[derive(Clone)]
struct LastReply(Arc<Mutex<Option<Instant>>>);

impl LastReply {
    fn mark(&self, t: Instant) {
        *self.0.lock().expect("lock") = Some(t);
    }

    fn since(&self, t: Instant) -> bool {
        self.0.lock().expect("lock").is_some_and(|r| r >= t)
    }
}

struct IcmpSocket {
    fd: AsyncFd<Socket>,
    v6: bool,
    pending: Pending,
}

/// Starts probing, one round every `pace` (the interval, or a metered uplink's standby
/// interval; a shorter one takes effect at once), and a burst whenever `bursts` asks for
/// one (with how long the last probe of the burst may wait for its answer); the task
/// runs until aborted.
pub fn spawn(
    spec: ProbeSpec,
    pace: watch::Receiver<Duration>,
    bursts: mpsc::Receiver<Duration>,
    tx: mpsc::Sender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = run(spec.clone(), pace, bursts, tx).await {
            tracing::error!(interface = %spec.interface, error = %e, "prober stopped");
        }
    })
}

type Attempt = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// What a prober's probes share: its uplink, its ICMP sockets, and when the last answer
/// of any kind came back.
#[derive(Clone)]
struct ProbeSender {
    spec: ProbeSpec,
    icmp4: Option<Arc<IcmpSocket>>,
    icmp6: Option<Arc<IcmpSocket>>,
    ident: u16,
    last: LastReply,
}

impl ProbeSender {
    /// One probe of target `t`, unbounded in time (the caller bounds it).
    fn attempt(&self, t: &Probe, seq: u16) -> Attempt {
        match t {
            Probe::Icmp(a) => {
                let sock = if a.is_ipv4() {
                    &self.icmp4
                } else {
                    &self.icmp6
                }
                .clone()
                .expect("a socket per family probed");
                let (a, ident) = (*a, self.ident);
                Box::pin(async move { icmp_probe(sock, a, ident, seq).await.ok_or(None) })
            }
            Probe::Tcp(addr) => Box::pin(tcp_probe(self.spec.clone(), *addr, self.last.clone())),
            Probe::Http { addr, path } => Box::pin(http_probe(
                self.spec.clone(),
                *addr,
                path.clone(),
                self.last.clone(),
            )),
            Probe::Dns { server, name } => Box::pin(dns_probe(
                self.spec.clone(),
                *server,
                name.clone(),
                seq,
                self.last.clone(),
            )),
        }
    }
}

async fn run(
    spec: ProbeSpec,
    mut pace: watch::Receiver<Duration>,
    mut bursts: mpsc::Receiver<Duration>,
    tx: mpsc::Sender<Report>,
) -> std::io::Result<()> {
    let last = LastReply(Arc::new(Mutex::new(None)));
    // Every task this prober starts (ICMP receivers, rounds in flight) lives in this set,
    // so aborting the prober (reload, redial, address change) aborts them and closes their
    // sockets instead of leaving them behind.
    let mut tasks = tokio::task::JoinSet::new();
    let ident = (std::process::id() as u16) ^ ((spec.uplink as u16) << 8);
    let mut icmp4 = None;
    let mut icmp6 = None;
    for t in &spec.targets {
        if let Probe::Icmp(a) = t {
            let slot = if a.is_ipv4() { &mut icmp4 } else { &mut icmp6 };
            if slot.is_none() {
                let sock = Arc::new(icmp_socket(&spec, a.is_ipv6())?);
                tasks.spawn(receive(sock.clone(), ident, last.clone()));
                *slot = Some(sock);
            }
        }
    }
    let sender = ProbeSender {
        spec: spec.clone(),
        icmp4,
        icmp6,
        ident,
        last: last.clone(),
    };
    let mut seq: u16 = 0;
    let names = Arc::new(
        spec.targets
            .iter()
            .map(Probe::to_string)
            .collect::<Vec<_>>(),
    );
    let mut every = *pace.borrow_and_update();
    let mut next = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next.into()) => {}
            changed = pace.changed() => {
                if changed.is_err() {
                    // The supervisor dropped this prober's pace: it is being replaced.
                    std::future::pending::<()>().await;
                }
                // A shorter pace starts its round now rather than after the long wait.
                let previous = next.checked_sub(every);
                every = *pace.borrow_and_update();
                next = previous.map_or(next, |p| (p + every).min(next));
                continue;
            }
            Some(wait) = bursts.recv() => {
                let (sender, tx, names) = (sender.clone(), tx.clone(), names.clone());
                let first = seq;
                // Each target's probes of the burst take sequence numbers of their own.
                seq = seq.wrapping_add((spec.targets.len() * spec.burst_count as usize) as u16);
                tasks.spawn(async move {
                    let round = burst(&sender, first, wait, names).await;
                    let _ = tx.send(Report { uplink: sender.spec.uplink, round }).await;
                });
                continue;
            }
        }
        while tasks.try_join_next().is_some() {}
        let started = Instant::now();
        // A late round (a busy runtime) does not make the next ones come faster.
        next = started + every;
        let mut probes = Vec::new();
        for t in &spec.targets {
            seq = seq.wrapping_add(1);
            let fut = sender.attempt(t, seq);
            let timeout = spec.timeout;
            probes.push(async move {
                tokio::time::timeout(timeout, fut)
                    .await
                    .unwrap_or(Err(None))
            });
        }
        // The silence that fails a round is one pace: at the standby pace no earlier
        // round's answer is in flight to say the path is alive.
        let (quorum, interval, uplink, n) = (spec.quorum, every, spec.uplink, spec.targets.len());
        let (last, tx, names) = (last.clone(), tx.clone(), names.clone());
        // Rounds overlap when the timeout is longer than the interval.
        tasks.spawn(async move {
            let outcomes = tokio::select! {
                r = futures::future::join_all(probes) => r,
                () = silent(last, started, interval) => vec![Err(None); n],
            };
            let _ = tx
                .send(Report {
                    uplink,
                    round: round_of(outcomes, quorum, false, names),
                })
                .await;
        });
    }
}

/// A burst: every target probed `burst_count` times, `burst_interval` apart; a target
/// answers with its first answer, and fails when none came `wait` after its last probe
/// left. Sequence numbers from `first + 1` on.
async fn burst(sender: &ProbeSender, first: u16, wait: Duration, names: Arc<Vec<String>>) -> Round {
    let spec = &sender.spec;
    let start = Instant::now();
    let count = spec.burst_count.max(1);
    let deadline = start + spec.burst_interval * (count - 1) + wait;
    let mut seq = first;
    let mut per_target = Vec::new();
    for t in &spec.targets {
        let mut attempts = Vec::new();
        for k in 0..count {
            seq = seq.wrapping_add(1);
            let fut = sender.attempt(t, seq);
            let at = start + spec.burst_interval * k;
            attempts.push(Box::pin(async move {
                tokio::time::sleep_until(at.into()).await;
                tokio::time::timeout_at(deadline.into(), fut)
                    .await
                    .unwrap_or(Err(None))
            }));
        }
        // The first answer ends the target's burst: its later probes are not sent.
        per_target.push(async move {
            futures::future::select_ok(attempts)
                .await
                .map(|(rtt, _)| rtt)
        });
    }
    let outcomes = futures::future::join_all(per_target).await;
    round_of(outcomes, spec.quorum, true, names)
}

/// The round that these outcomes (one per target, in order) make.
fn round_of(
    outcomes: Vec<Outcome>,
    quorum: usize,
    burst: bool,
    targets: Arc<Vec<String>>,
) -> Round {
    Round {
        rtts: outcomes.iter().map(|o| o.as_ref().ok().copied()).collect(),
        quorum,
        forwarding: false,
        burst,
        why: outcomes.into_iter().map(|o| o.err().flatten()).collect(),
        targets,
    }
}

/// Resolves one interval after `started` if nothing at all has come back through the
/// uplink since then; otherwise never (the probes' own timeouts decide).
async fn silent(last: LastReply, started: Instant, interval: Duration) {
    tokio::time::sleep_until((started + interval).into()).await;
    if last.since(started) {
        std::future::pending::<()>().await;
    }
}

fn base_socket(
    spec: &ProbeSpec,
    domain: Domain,
    ty: Type,
    proto: Protocol,
    v6: bool,
) -> std::io::Result<Socket> {
    let s = Socket::new(domain, ty, Some(proto))?;
    s.set_nonblocking(true)?;
    s.bind_device(Some(spec.interface.as_bytes()))?;
    s.set_mark(spec.fwmark)?;
    let src: Option<IpAddr> = if v6 {
        spec.src6.map(IpAddr::V6)
    } else {
        spec.src4.map(IpAddr::V4)
    };
    if let Some(src) = src {
        s.bind(&SocketAddr::new(src, 0).into())?;
    }
    Ok(s)
}

fn icmp_socket(spec: &ProbeSpec, v6: bool) -> std::io::Result<IcmpSocket> {
    let (domain, proto) = if v6 {
        (Domain::IPV6, Protocol::ICMPV6)
    } else {
        (Domain::IPV4, Protocol::ICMPV4)
    };
    let s = base_socket(spec, domain, Type::RAW, proto, v6)?;
    // SAFETY: the AsyncFd owns the socket, so its fd stays open and the same for its life.
    let fd = unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)?;
    Ok(IcmpSocket {
        fd,
        v6,
        pending: Arc::new(Mutex::new(HashMap::new())),
    })
}

async fn receive(sock: Arc<IcmpSocket>, ident: u16, last: LastReply) {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let Ok(mut guard) = sock.fd.readable().await else {
            return;
        };
        let n = match guard.try_io(|s| s.get_ref().recv(&mut buf)) {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => continue,
            Err(_would_block) => continue,
        };
        let now = Instant::now();
        // SAFETY: recv initialised the first n bytes.
        let data: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), n) };
        // IPv4 raw sockets deliver the IP header; IPv6 ones do not.
        let icmp = if sock.v6 {
            data
        } else {
            data.get(((data.first().copied().unwrap_or(0x45) & 0x0f) as usize) * 4..)
                .unwrap_or(&[])
        };
        let echo_reply = if sock.v6 { 129 } else { 0 };
        if icmp.len() < 8
            || icmp[0] != echo_reply
            || u16::from_be_bytes([icmp[4], icmp[5]]) != ident
        {
            continue;
        }
        last.mark(now);
        let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        if let Some(waiter) = sock.pending.lock().expect("lock").remove(&seq) {
            let _ = waiter.send(now);
        }
    }
}

async fn icmp_probe(sock: Arc<IcmpSocket>, dst: IpAddr, ident: u16, seq: u16) -> Option<Duration> {
    let (tx, rx) = oneshot::channel();
    sock.pending.lock().expect("lock").insert(seq, tx);
    let mut pkt = vec![if sock.v6 { 128 } else { 8 }, 0, 0, 0];
    pkt.extend_from_slice(&ident.to_be_bytes());
    pkt.extend_from_slice(&seq.to_be_bytes());
    pkt.extend_from_slice(ICMP_PAYLOAD);
    if !sock.v6 {
        // The kernel fills in the ICMPv6 checksum itself, not the ICMPv4 one.
        let sum = checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let sent = Instant::now();
    let dest: SocketAddr = SocketAddr::new(dst, 0);
    if sock.fd.get_ref().send_to(&pkt, &dest.into()).is_err() {
        sock.pending.lock().expect("lock").remove(&seq);
        return None;
    }
    // The caller's timeout bounds this wait; a late reply finds no waiter.
    let _cleanup = RemoveOnDrop(&sock.pending, seq);
    rx.await.ok().map(|t| t.duration_since(sent))
}

struct RemoveOnDrop<'a>(&'a Pending, u16);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        self.0.lock().expect("lock").remove(&self.1);
    }
}

/// A probe's outcome: the RTT, or a failure with what its answer said was wrong (`None`:
/// no answer).
type Outcome = Result<Duration, Option<String>>;

async fn tcp_probe(spec: ProbeSpec, dst: SocketAddr, last: LastReply) -> Outcome {
    tcp_connect(&spec, dst, &last)
        .await
        .map(|(_, rtt)| rtt)
        .ok_or(None)
}

/// A TCP connection to `dst` through the uplink, and the time its handshake took; a
/// refusal counts (it came back through the uplink) but gives no stream.
async fn tcp_connect(
    spec: &ProbeSpec,
    dst: SocketAddr,
    last: &LastReply,
) -> Option<(Option<tokio::net::TcpStream>, Duration)> {
    let sock = base_socket(
        spec,
        if dst.is_ipv4() {
            Domain::IPV4
        } else {
            Domain::IPV6
        },
        Type::STREAM,
        Protocol::TCP,
        dst.is_ipv6(),
    )
    .ok()?;
    let socket = tokio::net::TcpSocket::from_std_stream(sock.into());
    let sent = Instant::now();
    let stream = match socket.connect(dst).await {
        Ok(s) => Some(s),
        // A refusal came back through the uplink: the path works.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
        Err(_) => return None,
    };
    let now = Instant::now();
    last.mark(now);
    Some((stream, now.duration_since(sent)))
}

/// Most of an HTTP answer a probe reads: the status line, the headers and the start of
/// the body, where a portal's page differs from the expected one.
const HTTP_READ: usize = 16 * 1024;

/// `GET PATH` through the uplink; healthy on a 2xx answer that contains `spec.expect`
/// (when set). A 3xx is a captive portal (or a broken path) and says where it leads.
async fn http_probe(spec: ProbeSpec, dst: SocketAddr, path: String, last: LastReply) -> Outcome {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sent = Instant::now();
    let (stream, _) = tcp_connect(&spec, dst, &last).await.ok_or(None)?;
    let mut stream = stream.ok_or_else(|| Some(format!("HTTP: {dst} refused the connection")))?;
    let host = crate::config::show_host(&dst, 80);
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: uplinkd-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|_| None)?;
    let mut buf = Vec::with_capacity(4096);
    let mut rtt = None;
    loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|_| None)?;
        if n == 0 {
            break;
        }
        rtt.get_or_insert_with(|| sent.elapsed());
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() >= HTTP_READ {
            break;
        }
    }
    last.mark(Instant::now());
    let rtt =
        rtt.ok_or_else(|| Some("HTTP: the connection closed without an answer".to_string()))?;
    http_verdict(
        &buf,
        spec.expect.as_deref(),
        &format!("http://{host}{path}"),
    )
    .map(|()| rtt)
}

/// An HTTP answer judged: `Ok` for a 2xx (with `expect` in its body, when set); otherwise
/// why not.
pub fn http_verdict(answer: &[u8], expect: Option<&str>, url: &str) -> Result<(), Option<String>> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Some(format!("HTTP: not an HTTP answer from {url}")))?;
    match status {
        200..=299 => match expect {
            Some(e) if !body.contains(e) => Err(Some(format!(
                "captive portal or broken path: HTTP {status} from {url} without the expected text {e:?}"
            ))),
            _ => Ok(()),
        },
        300..=399 => {
            let location = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("location"))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_else(|| "nowhere (no Location)".into());
            Err(Some(format!("captive portal: HTTP {status} to {location}")))
        }
        _ => Err(Some(format!("HTTP {status} from {url}"))),
    }
}

/// A query for `name` (type A) to `server` through the uplink; healthy on an answer with
/// NOERROR.
async fn dns_probe(
    spec: ProbeSpec,
    server: SocketAddr,
    name: String,
    id: u16,
    last: LastReply,
) -> Outcome {
    let domain = if server.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = base_socket(&spec, domain, Type::DGRAM, Protocol::UDP, server.is_ipv6())
        .map_err(|_| None)?;
    let sock = tokio::net::UdpSocket::from_std(sock.into()).map_err(|_| None)?;
    sock.connect(server).await.map_err(|_| None)?;
    let query = dns_query(id, &name);
    let sent = Instant::now();
    sock.send(&query).await.map_err(|_| None)?;
    let mut buf = [0u8; 1500];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|_| None)?;
        let answer = &buf[..n];
        // Someone else's answer (a late one of an earlier round): keep waiting.
        if n < 12 || u16::from_be_bytes([answer[0], answer[1]]) != id || answer[2] & 0x80 == 0 {
            continue;
        }
        last.mark(Instant::now());
        return match answer[3] & 0x0f {
            0 => Ok(sent.elapsed()),
            rcode => Err(Some(format!(
                "DNS {} from {server} for {name}",
                rcode_name(rcode)
            ))),
        };
    }
}

/// A DNS query with recursion desired: the header, then `name` type A class IN.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn rcode_name(rcode: u8) -> String {
    match rcode {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

/// What an echo request carries after its 8-byte ICMP header.
const ICMP_PAYLOAD: &[u8] = b"uplinkd-probe";

/// IP bytes one probe costs on the uplink, both ways, as estimated from the packets it
/// sends and gets back (link framing not included): an echo request and, when answered,
/// its reply; a TCP handshake (SYN with Linux's 20 bytes of options) and, when answered,
/// the SYN-ACK and the close that follows (four more segments with timestamps).
pub fn probe_bytes(p: &Probe, answered: bool) -> u64 {
    let ip = if p.addr().is_ipv4() { 20 } else { 40 };
    match p {
        Probe::Icmp(_) => {
            let one = ip + 8 + ICMP_PAYLOAD.len() as u64;
            if answered { 2 * one } else { one }
        }
        Probe::Tcp(_) => {
            let syn = ip + 40;
            if answered {
                2 * syn + 4 * (ip + 32)
            } else {
                syn
            }
        }
        // A handshake and close as for TCP, the request, and an answer of about a
        // packet (a portal's page or a 204; larger bodies cost more).
        Probe::Http { path, .. } => {
            let syn = ip + 40;
            if answered {
                2 * syn + 4 * (ip + 32) + (ip + 32 + 80 + path.len() as u64) + (ip + 32 + 200)
            } else {
                syn
            }
        }
        // The query and an answer of about twice its size.
        Probe::Dns { name, .. } => {
            let one = ip + 8 + 12 + name.len() as u64 + 6;
            if answered { one + (one + 16) } else { one }
        }
    }
}

/// A round's probe traffic: every target's request, and the answers that came back.
pub fn round_bytes(targets: &[Probe], rtts: &[Option<Duration>]) -> u64 {
    targets
        .iter()
        .zip(rtts)
        .map(|(p, r)| probe_bytes(p, r.is_some()))
        .sum()
}

/// The probe traffic of a day at one round every `every`, every probe answered.
pub fn bytes_per_day(targets: &[Probe], every: Duration) -> u64 {
    let round: u64 = targets.iter().map(|p| probe_bytes(p, true)).sum();
    let rounds = 86_400.0 / every.as_secs_f64().max(0.001);
    (round as f64 * rounds).round() as u64
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_traffic_is_estimated_per_packet_and_per_day() {
        let icmp4 = Probe::Icmp("203.0.113.10".parse().unwrap());
        let icmp6 = Probe::Icmp("2001:db8::10".parse().unwrap());
        let tcp4 = Probe::Tcp("203.0.113.10:443".parse().unwrap());
        assert_eq!(probe_bytes(&icmp4, true), 2 * (20 + 8 + 13));
        assert_eq!(probe_bytes(&icmp4, false), 20 + 8 + 13);
        assert_eq!(probe_bytes(&icmp6, true), 2 * (40 + 8 + 13));
        assert_eq!(probe_bytes(&tcp4, false), 60);
        assert_eq!(probe_bytes(&tcp4, true), 2 * 60 + 4 * 52);
        let both = [icmp4.clone(), tcp4];
        assert_eq!(
            round_bytes(&both, &[Some(Duration::from_millis(5)), None]),
            82 + 60
        );
        // One ICMP target every 200 ms: 432,000 rounds of 82 bytes, 35.4 MB a day (about
        // 1 GB a month); at the 5 s standby pace, 1.4 MB.
        assert_eq!(
            bytes_per_day(std::slice::from_ref(&icmp4), Duration::from_millis(200)),
            35_424_000
        );
        assert_eq!(bytes_per_day(&[icmp4], Duration::from_secs(5)), 1_416_960);
    }

    #[test]
    fn http_answers_are_judged_by_status_location_and_expected_text() {
        let url = "http://203.0.113.80/generate_204";
        assert_eq!(
            http_verdict(b"HTTP/1.1 204 No Content\r\n\r\n", None, url),
            Ok(())
        );
        let portal = b"HTTP/1.1 302 Found\r\nlocation: http://portal.example/login\r\n\r\n";
        assert_eq!(
            http_verdict(portal, None, url),
            Err(Some(
                "captive portal: HTTP 302 to http://portal.example/login".into()
            ))
        );
        let page = b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<h1>Hotel WiFi</h1>";
        assert_eq!(http_verdict(page, Some("Hotel"), url), Ok(()));
        let e = http_verdict(page, Some("uplink-ok"), url)
            .unwrap_err()
            .unwrap();
        assert!(e.contains("without the expected text \"uplink-ok\""), "{e}");
        assert_eq!(
            http_verdict(b"HTTP/1.1 503 Busy\r\n\r\n", None, url),
            Err(Some(format!("HTTP 503 from {url}")))
        );
        assert!(http_verdict(b"SSH-2.0-OpenSSH\r\n", None, url).is_err());
    }

    #[test]
    fn a_dns_query_asks_for_the_a_record_with_recursion() {
        let q = dns_query(0x1234, "uplink.test");
        assert_eq!(&q[..4], &[0x12, 0x34, 0x01, 0x00]);
        assert_eq!(&q[12..], b"\x06uplink\x04test\x00\x00\x01\x00\x01");
    }

    #[test]
    fn icmp_checksum_matches_rfc1071_example() {
        // Header of an echo request with a zero checksum field; summing a packet that
        // carries its own checksum gives zero.
        let mut pkt = vec![8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01, b'a', b'b', b'c'];
        let s = checksum(&pkt);
        pkt[2..4].copy_from_slice(&s.to_be_bytes());
        assert_eq!(checksum(&pkt), 0);
    }
}
