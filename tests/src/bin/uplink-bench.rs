//! Benchmarks for uplinkd on the real kernel dataplane, in a namespace of their own.
//!
//!   uplink-bench dispatch [--clients 1000] [--interval-ms 5] [--runs 3]
//!     Neighbour entry added → client map element committed in the kernel, per client, as
//!     seen by `nft monitor` (external to the agent). Reports p50/p90/p99/max per run.
//!     `--rules N` (dispatch, failover): with a policy and N rules in the config.
//!   uplink-bench startup [--clients 10000] [--runs 3]
//!     Agent start with N clients already in the neighbour table: cold (empty kernel) and
//!     warm restart (adopting the table and state file). Wall time from spawn to the first
//!     apply, and the agent's peak RSS.
//!   uplink-bench ctflush [--flows 2000] [--runs 3]
//!     Deleting one uplink's conntrack entries (N of them, N more with another mark that
//!     must stay): the `conntrack` tool against one ctnetlink flush-by-mark message.
//!   uplink-bench abuse [--clients 50000] [--dispatch 300] [--trials 10]
//!     Dispatch latency and the carrier-cut gap at 50k clients, idle and then while the API
//!     and the listeners are abused (2,000 watchers, a full listing in a loop, 2,000 idle
//!     connections per port, 300 scrapes/s); reports both and their ratio.
//!   uplink-bench rules [--clients 100000] [--seconds 3] [--runs 3]
//!     Forwarding rate of packets that go the whole way through the classification, with
//!     0, 10, 100 and 1,000 rules, next to the seed's one mark rule per client; and the
//!     time to apply 1,000 rules.
//!   uplink-bench lease [--trials 20]
//!     A DHCP uplink (dnsmasq in the ISP, udhcpc on the gateway, `gateway = "auto"`): time
//!     from the default route the client installs to a client's new flow answered through
//!     the uplink, for a new lease (after the lease was lost) and for a renumbering (new
//!     subnet and gateway, forced renew).
//!   uplink-bench idle [--seconds 60]
//!     One idle agent (the lab: 3 uplinks, 6 clients, no traffic): its CPU (share of one
//!     core, from /proc/PID/stat) and RSS over the window, with the default probes on the 3
//!     uplinks and without probes.
//!   uplink-bench soak [--seconds 3600] [--clients 10000] [--churn 1000] [--failover-every 60]
//!     A gateway under churn, periodic failovers, a scrape a second and event watchers;
//!     reports the slope of RSS, descriptors and tasks and the loss on a healthy uplink.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use uplink_tests::{Netns, sh, uplinkd_bin};

fn arg(args: &[String], name: &str, default: u64) -> Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} must be a number")),
        None => Ok(default),
    }
}

const USAGE: &str = "usage: uplink-bench BENCHMARK [OPTIONS]   (as root: benchmarks build namespaces)

  dispatch [--clients N] [--interval-ms M] [--runs R] [--rules N] [--held N] [--resync-s 10] [--full-resync-s 300]
  startup  [--clients N] [--runs R]
  failover [--clients N] [--trials T] [--rules N]
  gap carrier|silent|silent-idle [--trials T]
  loss     [--percent 5] [--minutes 10]
  lease    [--trials T]
  idle     [--seconds S]
  fleet    [--max 1000] [--runs R] [--idle-seconds 30]
  pin      [--pins N]
  ctflush  [--flows 2000] [--runs 3]
  abuse    [--clients 50000] [--dispatch 300] [--trials 10]
  rules    [--clients 100000] [--seconds 3] [--runs 3]
  forward  [--clients 100000] [--seconds 3] [--runs 5] [--client-usage] [--passive-dests] [--replies]
  soak     [--seconds 3600] [--clients 10000] [--churn 1000] [--failover-every 60] [--watchers 20] [--warmup 60]

docs/benchmarks.md has the figures and the commands that measured them.";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None => {
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return std::process::ExitCode::SUCCESS;
        }
        Some(_) => {}
    }
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes; no backtrace for what is a bad argument or a
            // failed run.
            eprintln!("uplink-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let args = args.to_vec();
    let machine = machine();
    match args.first().map(String::as_str) {
        Some("dispatch") => dispatch(
            arg(&args, "--clients", 1000)? as u32,
            arg(&args, "--interval-ms", 5)?,
            arg(&args, "--runs", 3)?,
            arg(&args, "--rules", 0)? as u32,
            arg(&args, "--held", 0)? as u32,
            (
                arg(&args, "--resync-s", 10)?,
                arg(&args, "--full-resync-s", 300)?,
            ),
            &machine,
        ),
        Some("startup") => startup(
            arg(&args, "--clients", 10_000)? as u32,
            arg(&args, "--runs", 3)?,
            &machine,
        ),
        Some("failover") => failover(
            arg(&args, "--clients", 100_000)? as u32,
            arg(&args, "--trials", 5)?,
            arg(&args, "--rules", 0)? as u32,
            &machine,
        ),
        Some("fleet") => fleet_status(
            arg(&args, "--max", 1000)? as usize,
            arg(&args, "--runs", 3)?,
            arg(&args, "--idle-seconds", 30)?,
            &machine,
        ),
        Some("pin") => pin_rtt(arg(&args, "--pins", 200)? as u32, &machine),
        Some("ctflush") => ctflush(
            arg(&args, "--flows", 2000)? as u32,
            arg(&args, "--runs", 3)?,
            &machine,
        ),
        Some("abuse") => abuse(
            arg(&args, "--clients", 50_000)? as u32,
            arg(&args, "--dispatch", 300)? as u32,
            arg(&args, "--trials", 10)?,
            &machine,
        ),
        Some("soak") => soak(
            &uplink_tests::soak::SoakOptions {
                duration: Duration::from_secs(arg(&args, "--seconds", 3600)?),
                clients: arg(&args, "--clients", 10_000)? as u32,
                churn: arg(&args, "--churn", 1000)? as u32,
                failover_every: Duration::from_secs(arg(&args, "--failover-every", 60)?),
                scrape_every: Duration::from_secs(1),
                watchers: arg(&args, "--watchers", 20)? as u32,
                warmup: Duration::from_secs(arg(&args, "--warmup", 60)?),
            },
            &machine,
        ),
        Some("rules") => rules_bench(
            arg(&args, "--clients", 100_000)? as u32,
            arg(&args, "--seconds", 3)?,
            arg(&args, "--runs", 3)?,
            &machine,
        ),
        Some("forward") => forward_bench(
            arg(&args, "--clients", 100_000)? as u32,
            arg(&args, "--seconds", 3)?,
            arg(&args, "--runs", 5)?,
            args.iter().any(|a| a == "--client-usage"),
            args.iter().any(|a| a == "--passive-dests"),
            args.iter().any(|a| a == "--replies"),
            &machine,
        ),
        Some("lease") => lease(arg(&args, "--trials", 20)?, &machine),
        Some("idle") => idle(arg(&args, "--seconds", 60)?, &machine),
        Some("loss") => loss(
            arg(&args, "--percent", 5)? as u32,
            arg(&args, "--minutes", 10)?,
            &machine,
        ),
        Some("gap") => gap(
            args.get(1).map(String::as_str).unwrap_or("carrier"),
            arg(&args, "--trials", 20)?,
            &machine,
        ),
        Some(other) => bail!("unknown benchmark {other:?}\n{USAGE}"),
        None => unreachable!("main handles a missing benchmark"),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = sh(&["uname", "-r"]).unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

fn client_ip(i: u32) -> Ipv4Addr {
    // 198.18.0.0/15 holds 131070 hosts; skip .0 of the first /24.
    let n = 0xC612_0000u32 + 2 + i;
    Ipv4Addr::from(n)
}

fn client_mac(i: u32) -> String {
    let b = (i + 1).to_be_bytes();
    format!("02:42:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

/// Output lines of a child process, each with the time it was read.
type Lines = mpsc::Receiver<(Instant, String)>;

/// A gateway namespace with a LAN bridge and one uplink to a peer namespace.
struct Gw {
    ns: Netns,
    peer: Netns,
    dir: std::path::PathBuf,
}

impl Gw {
    fn new(tag: &str) -> Result<Gw> {
        let ns = Netns::new(tag)?;
        let peer = Netns::new(&format!("{tag}p"))?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&["ip", "link", "add", "br-lan", "type", "bridge"])?;
        ns.exec(&["ip", "link", "set", "br-lan", "up"])?;
        ns.exec(&["ip", "addr", "add", "198.18.0.1/15", "dev", "br-lan"])?;
        ns.exec(&[
            "ip", "link", "add", "wan1", "type", "veth", "peer", "name", "cpe", "netns", &peer.0,
        ])?;
        ns.exec(&["ip", "addr", "add", "100.64.1.2/24", "dev", "wan1"])?;
        ns.exec(&["ip", "link", "set", "wan1", "up"])?;
        ns.exec(&[
            "ip", "link", "add", "wan2", "type", "veth", "peer", "name", "cpe2", "netns", &peer.0,
        ])?;
        ns.exec(&["ip", "addr", "add", "100.64.2.2/24", "dev", "wan2"])?;
        ns.exec(&["ip", "link", "set", "wan2", "up"])?;
        peer.exec(&["ip", "link", "set", "cpe", "up"])?;
        peer.exec(&["ip", "link", "set", "cpe2", "up"])?;
        let dir = std::env::temp_dir().join(&ns.0);
        std::fs::create_dir_all(&dir)?;
        // The uplinks have no probes (the ISP namespaces answer nothing): passive health
        // is off so that the ruleset is a probed site's, without the per-destination sets
        // that passive health adds for uplinks without probes (`forward --passive-dests`
        // measures those).
        std::fs::write(
            dir.join("uplinkd.toml"),
            format!(
                "[agent]\nstate_dir = \"{}\"\nresync_interval = \"60s\"\n[health]\npassive = false\n[failover]\nfailback_delay = \"0s\"\nmax_flaps = 1000\n[lan]\ninterfaces = [\"br-lan\"]\n[[uplink]]\nname = \"isp1\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n[[uplink]]\nname = \"isp2\"\ninterface = \"wan2\"\ngateway = \"100.64.2.1\"\n",
                dir.join("state").display()
            ),
        )?;
        Ok(Gw { ns, peer, dir })
    }

    /// Sets the agent's `resync_interval` (the other benchmarks keep 60 s: a resync of
    /// what they hold would add its own work to what they measure).
    fn set_resync(&self, seconds: u64, full_seconds: u64) -> Result<()> {
        let path = self.dir.join("uplinkd.toml");
        let text = std::fs::read_to_string(&path)?;
        std::fs::write(
            &path,
            text.replace(
                "resync_interval = \"60s\"",
                &format!(
                    "resync_interval = \"{seconds}s\"\nfull_resync_interval = \"{full_seconds}s\""
                ),
            ),
        )?;
        Ok(())
    }

    /// Appends a policy and `n` rules to the agent's config (`--rules N`).
    fn add_rules(&self, n: u32) -> Result<()> {
        if n > 0 {
            let path = self.dir.join("uplinkd.toml");
            let base = std::fs::read_to_string(&path)?;
            std::fs::write(&path, format!("{base}{}", policy_config(n)))?;
            println!("with a policy and {n} rules");
        }
        Ok(())
    }

    fn add_neighbours(&self, range: std::ops::Range<u32>) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["-n", &self.ns.0, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        {
            let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("piped"));
            for i in range {
                writeln!(
                    stdin,
                    "neigh replace {} lladdr {} dev br-lan nud permanent",
                    client_ip(i),
                    client_mac(i)
                )?;
            }
        }
        if !child.wait()?.success() {
            bail!("ip -batch neigh failed");
        }
        Ok(())
    }

    fn start_agent(&self) -> Result<(Child, Instant, Lines)> {
        let t = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.0])
            .arg(uplinkd_bin())
            .arg("--config")
            .arg(self.dir.join("uplinkd.toml"))
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok((child, t, rx))
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_line(
    rx: &mpsc::Receiver<(Instant, String)>,
    needle: &str,
    timeout: Duration,
) -> Result<(Instant, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (t, line) = rx
            .recv_timeout(left)
            .with_context(|| format!("no {needle:?} from uplinkd within {timeout:?}"))?;
        if std::env::var_os("UPLINK_BENCH_VERBOSE").is_some() {
            eprintln!("uplinkd: {line}");
        }
        if line.contains(needle) {
            return Ok((t, line));
        }
    }
}

fn stop(mut child: Child) -> Result<()> {
    uplink_tests::signal_child(&child, "TERM")?;
    child.wait()?;
    Ok(())
}

/// A memory figure of /proc/PID/status in MB: "VmRSS" (now) or "VmHWM" (peak).
fn status_mb(pid: u32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .context(field.to_string())?
        .parse()?;
    Ok(kb / 1024.0)
}

fn peak_rss_mb(pid: u32) -> Result<f64> {
    status_mb(pid, "VmHWM")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(v, 50.0)
}

fn dispatch(
    clients: u32,
    interval_ms: u64,
    runs: u64,
    rules: u32,
    held: u32,
    (resync_s, full_resync_s): (u64, u64),
    machine: &str,
) -> Result<()> {
    println!(
        "dispatch latency: neighbour added -> client4 element committed (nft monitor), {clients} clients, one every {interval_ms} ms, {held} clients held before, a resync every {resync_s} s, a full one every {full_resync_s} s"
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut cpus = Vec::new();
    for run in 1..=runs {
        let gw = Gw::new("bd")?;
        // The agent's default: the events that arrive during a resync must not wait for
        // it.
        gw.set_resync(resync_s, full_resync_s)?;
        gw.add_rules(rules)?;
        gw.add_neighbours(0..held)?;
        let (child, _, rx) = gw.start_agent()?;
        wait_line(&rx, "initial apply done", Duration::from_secs(120))?;
        // The agent's own CPU and its finished `nft` children's, from the first measured
        // event to the last commit: the cost of the events, whatever the number of
        // clients already held.
        let mut monitor = Command::new("ip")
            .args(["netns", "exec", &gw.ns.0, "nft", "monitor", "elements"])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = monitor.stdout.take().expect("piped");
        let (tx, mrx) = mpsc::channel::<(Instant, String)>();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let mut batch = Command::new("ip")
            .args(["-n", &gw.ns.0, "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()?;
        let mut stdin = batch.stdin.take().expect("piped");
        // The monitor is ready once it reports a placement (with a large map, nft reads it
        // whole before it follows): clients beyond the measured ones, one every 2 s, until
        // one shows.
        let mut ready = false;
        for extra in 0..30 {
            let i = held + clients + extra;
            writeln!(
                stdin,
                "neigh add {} lladdr {} dev br-lan nud reachable",
                client_ip(i),
                client_mac(i)
            )?;
            stdin.flush()?;
            let mut first = HashMap::from([(client_ip(i).into(), Instant::now())]);
            let seen = uplink_tests::abuse::commit_latencies(
                &mrx,
                "client4",
                &mut first,
                Duration::from_secs(2),
            );
            if !seen.is_empty() {
                ready = true;
                break;
            }
        }
        if !ready {
            bail!("run {run}: the monitor showed no placement within 60 s");
        }
        let cpu0 = cpu_ticks_with_children(child.id())?;
        let mut sent: HashMap<std::net::IpAddr, Instant> = HashMap::new();
        for i in held..held + clients {
            let ip = client_ip(i);
            sent.insert(ip.into(), Instant::now());
            writeln!(
                stdin,
                "neigh add {ip} lladdr {} dev br-lan nud reachable",
                client_mac(i)
            )?;
            stdin.flush()?;
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
        drop(stdin);
        batch.wait()?;
        let mut lat = uplink_tests::abuse::commit_latencies(
            &mrx,
            "client4",
            &mut sent,
            Duration::from_secs(10),
        );
        let cpu_ms = (cpu_ticks_with_children(child.id())? - cpu0) as f64 * 1000.0
            / CLOCK_TICKS
            / f64::from(clients);
        cpus.push(cpu_ms);
        let _ = monitor.kill();
        let _ = monitor.wait();
        stop(child)?;
        if lat.len() < clients as usize {
            bail!("run {run}: only {} of {clients} elements seen", lat.len());
        }
        lat.sort_by(|a, b| a.total_cmp(b));
        let (p50, p90, p99, max) = (
            percentile(&lat, 50.0),
            percentile(&lat, 90.0),
            percentile(&lat, 99.0),
            lat[lat.len() - 1],
        );
        println!(
            "run {run}: p50 {p50:.2} ms  p90 {p90:.2} ms  p99 {p99:.2} ms  max {max:.2} ms  CPU per event {cpu_ms:.2} ms"
        );
        p50s.push(p50);
        p99s.push(p99);
    }
    let (lo50, hi50) = (
        p50s.iter().cloned().fold(f64::MAX, f64::min),
        p50s.iter().cloned().fold(0.0, f64::max),
    );
    let (lo99, hi99) = (
        p99s.iter().cloned().fold(f64::MAX, f64::min),
        p99s.iter().cloned().fold(0.0, f64::max),
    );
    println!(
        "median over {runs} runs: p50 {:.2} ms (range {lo50:.2}-{hi50:.2}), p99 {:.2} ms (range {lo99:.2}-{hi99:.2}), CPU per event {:.2} ms {cpus:.2?}",
        median(&mut p50s),
        median(&mut p99s),
        median(&mut cpus)
    );
    Ok(())
}

fn startup(clients: u32, runs: u64, machine: &str) -> Result<()> {
    println!("start-up apply: {clients} clients already in the neighbour table");
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let mut results: HashMap<&str, (Vec<f64>, Vec<f64>)> = HashMap::new();
    for run in 1..=runs {
        let gw = Gw::new("bs")?;
        gw.add_neighbours(0..clients)?;
        for phase in ["cold", "warm"] {
            let (child, t0, rx) = gw.start_agent()?;
            let (t, line) = wait_line(&rx, "initial apply done", Duration::from_secs(120))?;
            let wall = t.duration_since(t0).as_secs_f64();
            let rss = peak_rss_mb(child.id())?;
            if !line.contains(&format!("clients={clients}")) {
                bail!("unexpected client count: {line}");
            }
            // Read with no repeated element (`kernel_clients`): the short counts seen now
            // and then before were listings torn by the set's resize after the commit.
            let count = uplink_tests::kernel_clients(&gw.ns.0, "client4")?.len();
            if count != clients as usize {
                bail!("{count} elements in the kernel right after \"{line}\", expected {clients}");
            }
            println!("run {run} {phase}: {wall:.3} s to first apply, peak RSS {rss:.1} MB");
            let e = results.entry(phase).or_default();
            e.0.push(wall);
            e.1.push(rss);
            stop(child)?;
        }
        if !Path::new(&gw.dir.join("state/state.json")).exists() {
            bail!("no state file written");
        }
    }
    for phase in ["cold", "warm"] {
        let (w, r) = results.get_mut(phase).expect("ran");
        let (wlo, whi) = (
            w.iter().cloned().fold(f64::MAX, f64::min),
            w.iter().cloned().fold(0.0, f64::max),
        );
        let (rlo, rhi) = (
            r.iter().cloned().fold(f64::MAX, f64::min),
            r.iter().cloned().fold(0.0, f64::max),
        );
        println!(
            "{phase}: median {:.3} s (range {wlo:.3}-{whi:.3}), peak RSS median {:.1} MB (range {rlo:.1}-{rhi:.1})",
            median(w),
            median(r)
        );
    }
    Ok(())
}

/// Seconds since midnight from a log line's RFC 3339 timestamp ("...T01:08:37.032188Z").
fn log_time(line: &str) -> Option<f64> {
    let t = line
        .split_whitespace()
        .next()?
        .split('T')
        .nth(1)?
        .trim_end_matches('Z');
    let mut parts = t.split(':');
    let (h, m, s): (f64, f64, f64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    Some(h * 3600.0 + m * 60.0 + s)
}

fn summary(name: &str, v: &mut [f64]) {
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: median {:.1} ms, p95 {:.1} ms, min {:.1} ms, max {:.1} ms over {} trials",
        percentile(v, 50.0),
        percentile(v, 95.0),
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

/// Time from detection (the agent logs the state change) to the failover in the kernel
/// (the apply that rewrote the home chain) and to the dead uplink's flows deleted, with
/// `clients` neighbours of which half are on the uplink that dies.
fn failover(clients: u32, trials: u64, rules: u32, machine: &str) -> Result<()> {
    println!(
        "failover of {} clients off one uplink (carrier cut), {trials} trials",
        clients / 2
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let gw = Gw::new("bf")?;
    gw.add_rules(rules)?;
    gw.add_neighbours(0..clients)?;
    let (child, _, rx) = gw.start_agent()?;
    wait_line(&rx, "initial apply done", Duration::from_secs(120))?;
    let (mut program, mut flush, mut apply_self) = (Vec::new(), Vec::new(), Vec::new());
    for trial in 1..=trials {
        gw.peer.exec(&["ip", "link", "set", "cpe", "down"])?;
        let (_, down) = wait_line(&rx, "uplink isp1 up -> down", Duration::from_secs(10))?;
        // The flows are deleted inside the apply, so its line may come first.
        let (mut applied, mut flushed) = (None, None);
        while applied.is_none() || flushed.is_none() {
            let (_, line) = wait_line(&rx, "", Duration::from_secs(10))?;
            if line.contains("rewritten_chains=") && !line.contains("rewritten_chains=0") {
                applied = Some(line);
            } else if line.contains("deleted the dead uplink's conntrack entries") {
                flushed = Some(line);
            }
        }
        let (applied, flushed) = (applied.expect("seen"), flushed.expect("seen"));
        if !down.contains("carrier lost") {
            bail!("unexpected cause: {down}");
        }
        let t0 = log_time(&down).context("timestamp")?;
        let p = (log_time(&applied).context("timestamp")? - t0) * 1000.0;
        let f = (log_time(&flushed).context("timestamp")? - t0) * 1000.0;
        let own: f64 = applied
            .split("elapsed_us=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN)
            / 1000.0;
        println!(
            "trial {trial}: {p:.1} ms from detection to the new paths in the kernel (plan + apply {own:.1} ms, conntrack deletion included: done at {f:.1} ms)"
        );
        program.push(p);
        flush.push(f);
        apply_self.push(own);
        gw.peer.exec(&["ip", "link", "set", "cpe", "up"])?;
        wait_line(&rx, "failback to isp1", Duration::from_secs(10))?;
        std::thread::sleep(Duration::from_millis(500));
    }
    stop(child)?;
    summary(
        "detection -> failover in the kernel (home chain rewritten, dead uplink's flows deleted)",
        &mut program,
    );
    summary("plan + apply inside the agent", &mut apply_self);
    let _ = flush;
    Ok(())
}

/// The lab of two probed uplinks and one client, with `extra` in the agent's config,
/// running, the client placed on isp1.
fn probed_lab_on_isp1(tag: &str, extra: &str) -> Result<uplink_tests::Lab> {
    let mut lab = uplink_tests::Lab::build(tag, uplink_tests::probed_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", extra)?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    if assigned.values().next().map(String::as_str) != Some("isp1") {
        bail!("the client is not on isp1: {assigned:?}");
    }
    Ok(lab)
}

/// The traffic gap a client sees when its uplink fails: it sends a UDP datagram every
/// 5 ms on one flow; the gap is the longest time without an answer around the failure.
fn gap(kind: &str, trials: u64, machine: &str) -> Result<()> {
    if !["carrier", "silent", "silent-idle"].contains(&kind) {
        bail!("gap: kind must be carrier, silent or silent-idle");
    }
    println!(
        "traffic gap on a {kind} failure, default health settings, UDP every 5 ms, {trials} trials"
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    // Repeated cuts are flaps: raise the limit so that no trial is held down.
    let lab = probed_lab_on_isp1(
        "gap",
        "[failover]\nfailback_delay = \"0s\"\nmax_flaps = 1000\n",
    )?;
    let failure = if kind == "carrier" {
        uplink_tests::abuse::Failure::Carrier
    } else {
        uplink_tests::abuse::Failure::Silent
    };
    let mut gaps = Vec::new();
    for trial in 1..=trials {
        std::thread::sleep(Duration::from_millis(1500));
        let mark = lab.log_len();
        let gap = if kind == "silent-idle" {
            silent_detection(&lab, mark)
        } else {
            uplink_tests::abuse::failure_gap(&lab, "isp1", "isp2", failure)
        }
        .with_context(|| format!("trial {trial}"))?;
        println!("trial {trial}: gap {gap:.1} ms");
        gaps.push(gap);
        lab.wait_for(Duration::from_secs(10), "failback", || {
            Ok(lab.log_since(mark).contains("failback to isp1"))
        })?;
    }
    summary(&format!("{kind} gap"), &mut gaps);
    Ok(())
}

/// Without LAN traffic (the probes alone): from the moment ISP 1 starts dropping
/// everything to the agent's log line that takes isp1 down, in milliseconds.
fn silent_detection(lab: &uplink_tests::Lab, mark: usize) -> Result<f64> {
    let since_midnight = |t: std::time::SystemTime| -> Result<f64> {
        Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64() % 86_400.0)
    };
    let cut = since_midnight(std::time::SystemTime::now())?;
    lab.upstream_loss("isp1", 100)?;
    let line = "uplink isp1 up -> down";
    lab.wait_for(Duration::from_secs(10), "isp1 down", || {
        Ok(lab.log_since(mark).contains(line))
    })?;
    lab.upstream_loss("isp1", 0)?;
    let log = lab.log_since(mark);
    let at = log
        .lines()
        .find(|l| l.contains(line))
        .and_then(log_time)
        .context("no time on the down line")?;
    Ok((at - cut) * 1000.0)
}

/// Random loss on both ISPs (nft `numgen random` in their namespaces) for `minutes`,
/// client 1 sending a datagram every 20 ms through isp1 while isp2 carries nothing: how
/// often each uplink went down (false downs: both paths work).
fn loss(percent: u32, minutes: u64, machine: &str) -> Result<()> {
    if minutes == 0 || percent == 0 || percent >= 100 {
        bail!("loss: --minutes must be at least 1 and --percent between 1 and 99");
    }
    use uplink_tests::Lab;
    println!(
        "false downs under {percent} % random loss on both uplinks, default health settings, {minutes} min; isp1 carries a UDP flow (one datagram every 20 ms), isp2 only its probes"
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let lab = probed_lab_on_isp1("loss", "[failover]\nmax_flaps = 1000\n")?;
    let stream = uplink_tests::UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    let flaps = |lab: &Lab, u: &str| -> Result<f64> {
        Ok(lab
            .scrape(9477)?
            .get(&format!("uplinkd_uplink_flaps_total{{uplink=\"{u}\"}}"))
            .copied()
            .unwrap_or(0.0))
    };
    let before = (flaps(&lab, "isp1")?, flaps(&lab, "isp2")?);
    let mark = lab.log_len();
    lab.upstream_loss("isp1", percent)?;
    lab.upstream_loss("isp2", percent)?;
    std::thread::sleep(Duration::from_secs(minutes * 60));
    lab.upstream_loss("isp1", 0)?;
    lab.upstream_loss("isp2", 0)?;
    let sent = stream.finish()?;
    let log = lab.log_since(mark);
    let hours = minutes as f64 / 60.0;
    for (u, was) in [("isp1", before.0), ("isp2", before.1)] {
        let downs = log
            .lines()
            .filter(|l| {
                l.contains(&format!("uplink {u} up -> down"))
                    || l.contains(&format!("uplink {u} degraded -> down"))
            })
            .count();
        let changes = flaps(&lab, u)? - was;
        println!(
            "{u}: {downs} down transitions ({:.2} per hour; {changes} usable/unusable changes)",
            downs as f64 / hours
        );
    }
    println!(
        "client flow: {} sent, {} answered ({:.1} % lost)",
        sent.sent,
        sent.received,
        100.0 * (1.0 - sent.received as f64 / sent.sent.max(1) as f64)
    );
    let bursts: f64 = lab
        .scrape(9477)?
        .iter()
        .filter(|(k, _)| k.starts_with("uplinkd_uplink_probe_bursts_total"))
        .map(|(k, v)| {
            println!("{k} {v}");
            *v
        })
        .fold(0.0, |a, b| a + b);
    println!("bursts: {bursts}");
    Ok(())
}

/// CPU ticks (user + system) of a process so far.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// CPU ticks of a process and of its children it has waited for (its `nft` runs).
fn cpu_ticks_with_children(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut total = 0;
    for i in 11..=14 {
        total += f.get(i).context("cpu times")?.parse::<u64>()?;
    }
    Ok(total)
}

/// Clock ticks per second in /proc (USER_HZ: 100 on Linux, whatever the kernel's HZ).
const CLOCK_TICKS: f64 = 100.0;

fn rss_mb(pid: u32) -> Result<f64> {
    status_mb(pid, "VmRSS")
}

/// An idle agent's cost: CPU share of one core and RSS, with and without probes.
fn idle(seconds: u64, machine: &str) -> Result<()> {
    use uplink_tests::{Lab, UplinkSpec};
    println!("idle agent (3 uplinks, 6 clients, no traffic), {seconds} s per case");
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    // /proc counts in USER_HZ, 100 on every Linux ABI.
    for probes in [true, false] {
        let probe = if probes {
            "probes = [\"icmp:203.0.113.10\"]"
        } else {
            ""
        };
        let ups = vec![
            UplinkSpec::new("isp1", 2, false).with(probe),
            UplinkSpec::new("isp2", 1, false).with(probe),
            UplinkSpec::new("lte", 1, true).with(probe),
        ];
        let mut lab = Lab::build("idle", ups, 6, 3)?;
        lab.write_config("10s", "10m", "")?;
        lab.start_agent()?;
        lab.greet_clients()?;
        // Let the start's work settle before measuring.
        std::thread::sleep(Duration::from_secs(5));
        let pid = lab.agent_pid().context("agent pid")?;
        let (t0, c0) = (Instant::now(), cpu_ticks(pid)?);
        std::thread::sleep(Duration::from_secs(seconds));
        let cpu = (cpu_ticks(pid)? - c0) as f64 / CLOCK_TICKS / t0.elapsed().as_secs_f64() * 100.0;
        println!(
            "{}: CPU {cpu:.3} % of one core, RSS {:.1} MB",
            if probes {
                "default probes (1 target per uplink, every 200 ms) on 3 uplinks"
            } else {
                "no probes"
            },
            rss_mb(pid)?
        );
    }
    Ok(())
}

/// New lease and renumbering on a DHCP uplink: from the route the client's script installs
/// (its own timestamp) to the first answer, from the new address, to a new flow of a client
/// homed on that uplink (a datagram every 5 ms).
fn lease(trials: u64, machine: &str) -> Result<()> {
    use uplink_tests::Lab;
    use uplink_tests::dhcp::{ClientKind, RouteTable};
    println!(
        "DHCP uplink: route installed -> traffic on the new address, default health settings (interval 200 ms, up_after 5), {trials} trials each"
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let mut lab = Lab::build("lease", uplink_tests::probed_uplinks(), 2, 0)?;
    lab.dhcp_uplink(2)?;
    lab.write_config(
        "10s",
        "10m",
        "[failover]\nfailback_delay = \"0s\"\nmax_flaps = 1000\n",
    )?;
    lab.edit_config("gateway = \"100.64.2.1\"", "gateway = \"auto\"")?;
    let mut net = 2u8;
    let mut server = lab.dhcp_server(2, net, "1h", "")?;
    let mut client = lab.dhcp_client(2, ClientKind::Udhcpc, RouteTable::Table(100))?;
    lab.wait_for(Duration::from_secs(30), "a lease", || {
        Ok(lab.wan_addr(2)?.is_some())
    })?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let on2 = (1..=2)
        .find(|&i| {
            homes
                .get(&uplink_tests::client_v4(i).into())
                .map(String::as_str)
                == Some("isp2")
        })
        .context("a client on isp2")?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default()
    };
    // New flows every 10 ms until one is answered from `want`; when it was. Each is a new
    // conntrack entry that stays (sticky to the uplink it took) for 30 to 120 s: the ones
    // made while the uplink was still down go before the next measurement, or a reused
    // source port would follow its old entry to the other uplink.
    let on2_addr = uplink_tests::client_v4(on2).to_string();
    let forget_flows = || lab.gw(&["conntrack", "-D", "-p", "udp", "-s", &on2_addr]);
    let answered_from = |want: Ipv4Addr| -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let s = lab.client_socket(on2, false)?;
            s.set_read_timeout(Some(Duration::from_millis(10)))?;
            let _ = s.send(b"lease");
            let mut buf = [0u8; 256];
            if let Ok(n) = s.recv(&mut buf) {
                let seen = String::from_utf8_lossy(&buf[..n]);
                if seen.split(' ').next() == Some(want.to_string().as_str()) {
                    return Ok(now());
                }
            }
        }
        bail!(
            "no answer from {want} within 30 s\n{}\n{}\n--- udhcpc ---\n{}",
            lab.log_tail(20),
            lab.post_mortem(),
            lab.dhcp_log(2)
        )
    };
    let (mut fresh, mut renumber) = (Vec::new(), Vec::new());
    for trial in 1..=trials {
        // The lease is lost: the client goes, its address and route with it.
        drop(client);
        lab.gw(&["ip", "-4", "addr", "flush", "dev", "wan2"])?;
        let _ = lab.gw(&["ip", "route", "del", "default", "table", "100"]);
        lab.wait_for(Duration::from_secs(10), "isp2 down", || {
            Ok(lab.scrape(9477)?.get("uplinkd_uplink_up{uplink=\"isp2\"}") == Some(&0.0))
        })?;
        let _ = forget_flows();
        let routes = lab.route_times(2).len();
        client = lab.dhcp_client(2, ClientKind::Udhcpc, RouteTable::Table(100))?;
        lab.wait_for(Duration::from_secs(30), "a new lease", || {
            Ok(lab.route_times(2).len() > routes)
        })?;
        let addr = lab.wan_addr(2)?.context("leased")?;
        let t1 = answered_from(addr)?;
        let t0 = lab.route_times(2)[routes];
        let a = (t1 - t0) * 1000.0;
        // Renumbering: the ISP moves to the other subnet; the client renews at once.
        net = if net == 2 { 12 } else { 2 };
        let _ = forget_flows();
        let routes = lab.route_times(2).len();
        drop(server);
        server = lab.dhcp_server(2, net, "1h", "")?;
        client.signal("USR1")?;
        lab.wait_for(Duration::from_secs(30), "the renumbered lease", || {
            Ok(lab.wan_addr(2)?.is_some_and(|a| a.octets()[2] == net)
                && lab.route_times(2).len() > routes)
        })?;
        let addr = lab.wan_addr(2)?.context("renumbered")?;
        let t1 = answered_from(addr)?;
        let t0 = *lab.route_times(2).last().context("route time")?;
        let b = (t1 - t0) * 1000.0;
        println!("trial {trial}: new lease {a:.0} ms, renumbering {b:.0} ms");
        fresh.push(a);
        renumber.push(b);
    }
    drop(client);
    drop(server);
    summary("new lease (route installed) -> traffic", &mut fresh);
    summary(
        "renumbering (new route installed) -> traffic on the new address",
        &mut renumber,
    );
    Ok(())
}

/// `uplinkctl --inventory … status` across fleets of 10 … `max` real agents, each in its
/// own gateway namespace: wall time of the whole command (process start, one mTLS
/// connection and one RPC per gateway, output).
///
/// With every agent of the fleet running (idle: no uplink has a link, so nothing probes),
/// first their own cost over `idle_seconds`: CPU per agent and RSS.
fn fleet_status(max: usize, runs: u64, idle_seconds: u64, machine: &str) -> Result<()> {
    println!("fleet status over real agents (uplinkctl --parallel 32), {runs} runs per size");
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let t = Instant::now();
    let fleet = uplink_tests::Fleet::build("bfl", max)?;
    println!("{max} agents started in {:.0} s", t.elapsed().as_secs_f64());
    if idle_seconds > 0 {
        // Past the start-up's own work.
        std::thread::sleep(Duration::from_secs(5));
        let pids: Vec<u32> = fleet.agents.iter().map(|c| c.id()).collect();
        let before = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let t = Instant::now();
        std::thread::sleep(Duration::from_secs(idle_seconds));
        let after = pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<Result<Vec<_>>>()?;
        let secs = t.elapsed().as_secs_f64();
        // /proc counts in USER_HZ, 100 on every Linux ABI.
        let mut cpu: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) as f64 / 100.0 / secs * 100.0)
            .collect();
        cpu.sort_by(|a, b| a.total_cmp(b));
        let mut rss = pids
            .iter()
            .map(|&p| rss_mb(p))
            .collect::<Result<Vec<_>>>()?;
        rss.sort_by(|a, b| a.total_cmp(b));
        println!(
            "idle, {max} agents over {idle_seconds} s: CPU all agents {:.1} % of a core, per agent mean {:.3} % (max {:.3} %); RSS per agent median {:.1} MB (max {:.1} MB), total {:.0} MB",
            cpu.iter().sum::<f64>(),
            cpu.iter().sum::<f64>() / cpu.len() as f64,
            cpu[cpu.len() - 1],
            percentile(&rss, 50.0),
            rss[rss.len() - 1],
            rss.iter().sum::<f64>()
        );
    }
    let inventory = std::fs::read_to_string(fleet.dir.join("inventory.toml"))?;
    let entries: Vec<&str> = inventory
        .split("[[gateway]]")
        .filter(|e| !e.trim().is_empty())
        .collect();
    for n in [10, 50, 100, 200, 500, 1000]
        .into_iter()
        .filter(|n| *n <= max)
    {
        let sub: String = entries[..n]
            .iter()
            .map(|e| format!("[[gateway]]{e}"))
            .collect();
        std::fs::write(fleet.dir.join("inventory.toml"), sub)?;
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            let (code, out, err) = fleet.ctl(&["status", "-o", "json"])?;
            let took = t.elapsed().as_secs_f64() * 1000.0;
            if code != 0 {
                bail!("status over {n} agents failed: {err}");
            }
            let v: serde_json::Value = serde_json::from_str(&out)?;
            if v.as_array().map(|a| a.len()) != Some(n) {
                bail!("expected {n} results");
            }
            times.push(took);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{n:>4} agents: median {:.0} ms (min {:.0}, max {:.0})",
            percentile(&times, 50.0),
            times[0],
            times[times.len() - 1]
        );
    }
    Ok(())
}

/// SetOverride round trips over one mTLS connection, each returning once the element is
/// in the kernel: p50 and p99.
fn pin_rtt(pins: u32, machine: &str) -> Result<()> {
    use uplink_api::v1::{SetOverrideRequest, agent_client::AgentClient};
    println!("pin (SetOverride) round trip until the change is in the kernel, {pins} pins");
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fleet = uplink_tests::Fleet::build("bpin", 1)?;
    let gw = &fleet.gateways[0];
    // 100 clients on the gateway's LAN so pins have something to move.
    let mut batch = Command::new("ip")
        .args(["-n", &gw.0, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = batch.stdin.take().expect("piped");
        writeln!(stdin, "link set br-lan up")?;
        for i in 0..100u32 {
            writeln!(
                stdin,
                "neigh add {} lladdr {} dev br-lan nud permanent",
                client_ip(i),
                client_mac(i)
            )?;
        }
    }
    batch.wait()?;
    std::thread::sleep(Duration::from_millis(500));
    let certs = fleet.dir.join("certs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rtts = rt.block_on(async {
        let tls = uplink_tests::client_tls(&certs, "op", "198.18.248.10")?;
        // The management namespace holds the route to the agent: connect from a thread in it.
        let mgmt = fleet.mgmt.0.clone();
        let std_stream =
            uplink_tests::in_netns(&mgmt, || std::net::TcpStream::connect("198.18.248.10:7443"))??;
        drop(std_stream);
        let channel = {
            let file = std::fs::File::open(format!("/run/netns/{mgmt}"))?;
            // Enter the namespace on this (current-thread runtime) thread for the connect.
            use std::os::fd::AsFd;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
            tonic::transport::Endpoint::from_static("https://198.18.248.10:7443")
                .tls_config(tls)?
                .connect()
                .await?
        };
        let mut client = AgentClient::new(channel);
        let mut rtts = Vec::new();
        for n in 0..pins {
            let ip = client_ip(n % 100).to_string();
            let uplink = if n % 2 == 0 { "isp1" } else { "isp2" }.to_string();
            let t = Instant::now();
            client
                .set_override(SetOverrideRequest {
                    client: ip.clone(),
                    uplink,
                    duration: String::new(),
                })
                .await?;
            rtts.push(t.elapsed().as_secs_f64() * 1000.0);
            // Unpinned again for the next round (not measured).
            client
                .clear_override(uplink_api::v1::ClearOverrideRequest { client: ip })
                .await?;
        }
        anyhow::Ok(rtts)
    })?;
    rtts.sort_by(|a, b| a.total_cmp(b));
    println!(
        "pin round trip: p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} pins",
        percentile(&rtts, 50.0),
        percentile(&rtts, 95.0),
        percentile(&rtts, 99.0),
        rtts[rtts.len() - 1],
        rtts.len()
    );
    Ok(())
}

fn soak(opts: &uplink_tests::soak::SoakOptions, machine: &str) -> Result<()> {
    println!("soak on {machine}: {opts:?}");
    let mut last = Instant::now();
    let report = uplink_tests::soak::run(opts, |s| {
        if last.elapsed() >= Duration::from_secs(60) {
            last = Instant::now();
            println!(
                "  t={:>5.0}s rss {:.1} MB fds {} tasks {} clients {}",
                s.at,
                s.rss_bytes / 1_048_576.0,
                s.fds,
                s.tasks,
                s.clients
            );
        }
    })?;
    for (k, v) in uplink_tests::soak::describe(&report) {
        println!("{k:>6}: {v}");
    }
    Ok(())
}

fn abuse(clients: u32, n: u32, trials: u64, machine: &str) -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use uplink_tests::abuse::{AbuseCounts, abuse_lab, carrier_gap, dispatch_latency, start_abuse};
    println!(
        "abuse: {clients} clients; dispatch of {n} new clients (one every 5 ms) and {trials} carrier cuts, idle then abused"
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let lab = abuse_lab(clients)?;
    let home = lab
        .assignments()?
        .get(&std::net::IpAddr::from(uplink_tests::client_v4(1)))
        .cloned()
        .context("client 1 has a home")?;
    let other = if home == "isp1" { "isp2" } else { "isp1" };
    let measure = |prefix: u16| -> Result<(Vec<f64>, Vec<f64>)> {
        let lat = dispatch_latency(&lab, prefix, n, Duration::from_millis(5))?;
        let mut gaps = Vec::new();
        for _ in 0..trials {
            std::thread::sleep(Duration::from_millis(1500));
            gaps.push(carrier_gap(&lab, &home, other)?);
        }
        gaps.sort_by(|a, b| a.total_cmp(b));
        Ok((lat, gaps))
    };
    let (lat_idle, gap_idle) = measure(0x8)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(AbuseCounts::default());
    let abusers = start_abuse(&lab, stop.clone(), counts.clone())?;
    // The abuse is in full swing before anything is measured.
    let ready = Instant::now();
    while !(counts.idle_connections.load(Ordering::Relaxed) >= 4000
        && counts.watch_open.load(Ordering::Relaxed) >= 64
        && counts.full_listings.load(Ordering::Relaxed) >= 1
        && counts.scrapes.load(Ordering::Relaxed) >= 100)
    {
        if ready.elapsed() > Duration::from_secs(120) {
            stop.store(true, Ordering::SeqCst);
            bail!("the abusers did not get going: {counts:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "abusers ready after {:.1} s: {counts:?}",
        ready.elapsed().as_secs_f64()
    );
    let abused = measure(0x9);
    stop.store(true, Ordering::SeqCst);
    abusers
        .join()
        .map_err(|_| anyhow::anyhow!("abuse thread panicked"))?
        .map_err(|e| anyhow::anyhow!("{e}\n--- uplinkd log ---\n{}", lab.log_tail(20)))?;
    let (lat_abuse, gap_abuse) = abused?;
    let row = |what: &str, idle: &[f64], abused: &[f64], p: f64| {
        let (a, b) = (percentile(idle, p), percentile(abused, p));
        println!(
            "{what:<28} idle {a:>7.2} ms   abused {b:>7.2} ms   ratio {:.2}",
            b / a
        );
    };
    row("dispatch p50", &lat_idle, &lat_abuse, 50.0);
    row("dispatch p99", &lat_idle, &lat_abuse, 99.0);
    row("carrier-cut gap median", &gap_idle, &gap_abuse, 50.0);
    row("carrier-cut gap p95", &gap_idle, &gap_abuse, 95.0);
    println!("abusers: {counts:?}");
    Ok(())
}

fn ctflush(flows: u32, runs: u64, machine: &str) -> Result<()> {
    use uplinkd::dataplane::conntrack::{Conntrack, ConntrackFlush};
    println!(
        "conntrack deletion by mark: {flows} entries to delete, {flows} to keep, {runs} runs per method"
    );
    println!("machine: {machine}");
    let ns = Netns::new("bct")?;
    let fill = |mark: u32, base: u32| -> Result<()> {
        for i in 0..flows {
            let n = base + i;
            ns.exec(&[
                "conntrack",
                "-I",
                "-p",
                "udp",
                "-s",
                &format!("198.18.{}.{}", n / 250, n % 250 + 1),
                "-d",
                "198.19.255.1",
                "--sport",
                "1000",
                "--dport",
                "53",
                "--timeout",
                "600",
                "-m",
                &format!("{mark:#x}"),
            ])?;
        }
        Ok(())
    };
    let count = |mark: u32| -> Result<usize> {
        Ok(ns
            .exec(&["conntrack", "-L", "-m", &format!("{mark:#x}/0x3f000000")])?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    };
    for (name, via) in [
        ("conntrack tool", ConntrackFlush::Tool),
        ("ctnetlink", ConntrackFlush::Netlink),
    ] {
        let mut took = Vec::new();
        for _ in 0..runs {
            fill(0x0100_0000, 0)?;
            fill(0x0200_0000, 20_000)?;
            let bin = std::path::PathBuf::from("/usr/sbin/conntrack");
            let ct = Conntrack::new(&bin, Duration::from_secs(30), via);
            let t = uplink_tests::in_netns(&ns.0, move || -> Result<f64> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let t = Instant::now();
                rt.block_on(ct.delete_mark(0x0100_0000, 0x3f00_0000))?;
                Ok(t.elapsed().as_secs_f64() * 1000.0)
            })??;
            let (gone, kept) = (count(0x0100_0000)?, count(0x0200_0000)?);
            if gone != 0 || kept != flows as usize {
                bail!("{name}: {gone} marked entries left, {kept} of {flows} others kept");
            }
            ns.exec(&["conntrack", "-D", "-m", "0x2000000/0x3f000000"])?;
            took.push(t);
        }
        summary(&format!("{name}: delete {flows} entries"), &mut took);
    }
    Ok(())
}

/// `[[policy]]` and `n` rules none of the benchmark's packets match, so every packet is
/// checked against all of them. The mix of a site's rules, in blocks as an operator
/// writes them: 40 % destination CIDRs, 30 % ports, 20 % source CIDRs, 10 % with several
/// fields (destination, protocol and port: a rule nft cannot merge into a map).
fn policy_config(n: u32) -> String {
    let mut c = String::from(
        "\n[[policy]]\nname = \"p\"\nuplinks = [\"isp2\", \"isp1\"]\nbalance = \"failover\"\n",
    );
    let (dst, ports, src) = (n * 4 / 10, n * 3 / 10, n * 2 / 10);
    for i in 0..n {
        let m = if i < dst {
            format!("dst = [\"100.65.{}.{}/32\"]", i / 256, i % 256)
        } else if i < dst + ports {
            format!("proto = \"udp\"\ndport = [{}]", 20000 + i)
        } else if i < dst + ports + src {
            format!("src = [\"100.66.{}.{}/32\"]", i / 256, i % 256)
        } else {
            format!(
                "dst = [\"100.67.{}.{}/32\"]\nproto = \"tcp\"\ndport = [443]",
                i / 256,
                i % 256
            )
        };
        c += &format!("\n[[rule]]\nname = \"r{i}\"\n{m}\npolicy = \"p\"\n");
    }
    c
}

/// SIGHUP, then the agent's lines up to "config reloaded" (after any left unread).
fn reload(child: &Child, rx: &Lines) -> Result<Vec<(Instant, String)>> {
    // What came before the signal is kept only to explain a failure.
    let mut before: Vec<(Instant, String)> = Vec::new();
    while let Ok(l) = rx.try_recv() {
        before.push(l);
    }
    uplink_tests::signal_child(child, "HUP")?;
    let mut lines: Vec<(Instant, String)> = Vec::new();
    loop {
        let (t, line) = rx
            .recv_timeout(Duration::from_secs(120))
            .with_context(|| {
                let tail: Vec<&str> = before
                    .iter()
                    .chain(&lines)
                    .rev()
                    .take(10)
                    .map(|(_, l)| l.as_str())
                    .collect();
                let state = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
                    .ok()
                    .and_then(|s| s.lines().find(|l| l.starts_with("State:")).map(str::to_string))
                    .unwrap_or_else(|| "gone".into());
                format!("no \"config reloaded\" from uplinkd within 120 s (process {}: {state}); its last lines:\n{}", child.id(), tail.join("\n"))
            })?;
        let done = line.contains("config reloaded reassigned");
        lines.push((t, line));
        if done {
            return Ok(lines);
        }
    }
}

/// Forwarded packets per second from one LAN sender, counted where the ISP drops them.
fn forwarding_rate(gw: &Gw, snd: &Netns, seconds: u64) -> Result<f64> {
    let count = || uplink_tests::nft_chain_packets(&gw.peer.0, "inet", "sink", "c");
    let sock = uplink_tests::in_netns(&snd.0, || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect("203.0.113.10:9999")?;
    send_rate(&sock, seconds, count)
}

/// Sends from `sock` for `seconds` as fast as it goes; the rate is what `count` (a drop
/// counter at the receiving end) saw arrive meanwhile.
fn send_rate(
    sock: &std::net::UdpSocket,
    seconds: u64,
    count: impl Fn() -> Result<u64>,
) -> Result<f64> {
    let until = Instant::now() + Duration::from_secs(seconds);
    let before = count()?;
    let t0 = Instant::now();
    while Instant::now() < until {
        for _ in 0..1000 {
            // A full queue drops: the rate counted at the receiver is what got through.
            let _ = sock.send(b"uplink-bench rules");
        }
    }
    let t = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    Ok((count()? - before) as f64 / t)
}

/// The rate of one established flow's replies (internet → LAN: what a download is): the
/// LAN sender opens a flow to 203.0.113.10:9999, the internet side sends to the address and
/// port it was masqueraded to, and the sender's namespace counts what arrives.
fn reply_rate(gw: &Gw, snd: &Netns, seconds: u64) -> Result<f64> {
    let count = || uplink_tests::nft_chain_packets(&snd.0, "inet", "rsink", "c");
    let lan = uplink_tests::in_netns(&snd.0, || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    let port = lan.local_addr()?.port();
    lan.send_to(b"uplink-bench replies", "203.0.113.10:9999")?;
    // Where the replies go: the reply tuple of the flow's conntrack entry.
    let sport = port.to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let to = loop {
        let out = gw
            .ns
            .exec(&["conntrack", "-L", "-p", "udp", "--sport", &sport])?;
        let field = |key: &str| {
            out.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .nth(1)
        };
        if let (Some(addr), Some(port)) = (field("dst="), field("dport=")) {
            break format!("{addr}:{port}");
        }
        if Instant::now() > deadline {
            bail!("no conntrack entry for the flow from port {sport}: {out}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let sock = uplink_tests::in_netns(&gw.peer.0, || {
        std::net::UdpSocket::bind("203.0.113.10:9999")
    })??;
    sock.connect(&to)?;
    send_rate(&sock, seconds, count)
}

/// A gateway with `clients` neighbours on its LAN and a sender namespace with the
/// address of the middle one, whose UDP to 203.0.113.10:9999 the ISP side counts.
fn sender_lab(tag: &str, clients: u32) -> Result<(Gw, Netns)> {
    let gw = Gw::new(tag)?;
    gw.ns.exec(&[
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ])?;
    gw.peer
        .exec(&["ip", "addr", "add", "100.64.1.1/24", "dev", "cpe"])?;
    gw.peer
        .exec(&["ip", "addr", "add", "100.64.2.1/24", "dev", "cpe2"])?;
    gw.peer.exec(&["nft", "add table inet sink { chain c { type filter hook prerouting priority -300; udp dport 9999 counter drop; }; }"])?;
    // The sender: a real host on the LAN with the address of the middle client.
    let snd = Netns::new("brs")?;
    gw.ns.exec(&[
        "ip", "link", "add", "lansnd", "type", "veth", "peer", "name", "eth0", "netns", &snd.0,
    ])?;
    gw.ns
        .exec(&["ip", "link", "set", "lansnd", "master", "br-lan", "up"])?;
    // After the port: a bridge without a fixed MAC takes its new port's, and a changed
    // address flushes the neighbour table, permanent entries included (the clients were
    // gone before the agent started, and the map it was measured with was empty).
    gw.add_neighbours(0..clients)?;
    let me = client_ip(clients / 2);
    snd.exec(&["ip", "link", "set", "lo", "up"])?;
    snd.exec(&["ip", "link", "set", "eth0", "up"])?;
    snd.exec(&["ip", "addr", "add", &format!("{me}/15"), "dev", "eth0"])?;
    snd.exec(&["ip", "route", "add", "default", "via", "198.18.0.1"])?;
    // For `forward --replies`: the sender's own MAC for its address (the neighbours added
    // above are fake), the internet host's address, and what reaches the sender.
    let mac = snd.exec(&["cat", "/sys/class/net/eth0/address"])?;
    gw.ns.exec(&[
        "ip",
        "neigh",
        "replace",
        &me.to_string(),
        "lladdr",
        mac.trim(),
        "dev",
        "br-lan",
        "nud",
        "permanent",
    ])?;
    gw.peer.exec(&["ip", "link", "set", "lo", "up"])?;
    gw.peer
        .exec(&["ip", "addr", "add", "203.0.113.10/32", "dev", "lo"])?;
    snd.exec(&["nft", "add table inet rsink { chain c { type filter hook prerouting priority -300; udp sport 9999 counter drop; }; }"])?;
    Ok((gw, snd))
}

/// Per-packet cost of an established flow (what nearly every packet is): the forwarding
/// rate of one tracked, masqueraded UDP flow through uplinkd with `clients` clients, next
/// to bare forwarding on the same path (the same routing and masquerade, one mark rule,
/// no classification).
fn forward_bench(
    clients: u32,
    seconds: u64,
    runs: u64,
    client_usage: bool,
    passive_dests: bool,
    replies: bool,
    machine: &str,
) -> Result<()> {
    println!(
        "per-packet cost of an established flow: {clients} clients, one sender (client #{}), one tracked UDP flow per run, masqueraded{}{}{}",
        clients / 2,
        if replies {
            ", its replies (internet → LAN) measured"
        } else {
            ""
        },
        if client_usage {
            ", usage per client on"
        } else {
            ""
        },
        if passive_dests {
            ", passive health on uplinks without probes (per-destination sets)"
        } else {
            ""
        }
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let (gw, snd) = sender_lab("bfw", clients)?;
    let path = gw.dir.join("uplinkd.toml");
    let mut text = std::fs::read_to_string(&path)?;
    if client_usage {
        text = text.replace("[lan]\n", "[lan]\nclient_usage = true\n");
    }
    if passive_dests {
        text = text.replace("passive = false\n", "");
    }
    std::fs::write(&path, text)?;
    let (child, _, rx) = gw.start_agent()?;
    let (_, started) = wait_line(&rx, "initial apply done", Duration::from_secs(120))?;
    if !started.contains(&format!("clients={clients}")) {
        bail!("the agent does not hold the {clients} clients: {started}");
    }
    // Interleaved, so that the machine's drift hits both alike.
    let (mut agent, mut bare) = (Vec::new(), Vec::new());
    let bare_table = "add table ip bare { chain pre { type filter hook prerouting priority -150; meta mark set 0x01000000; }; chain post { type nat hook postrouting priority 100; oifname \"wan1\" masquerade; }; }";
    let uplinkd = gw.ns.exec(&["nft", "list", "table", "inet", "uplinkd"])?;
    stop(child)?;
    // uplinkd leaves its table in place when it stops (a restart adopts it): loaded on top
    // of it, the listing would add every rule a second time.
    gw.ns.exec(&["nft", "delete", "table", "inet", "uplinkd"])?;
    let rate = || match replies {
        true => reply_rate(&gw, &snd, seconds),
        false => forwarding_rate(&gw, &snd, seconds),
    };
    for _ in 0..runs {
        // uplinkd's table back as it left it (its routing rules and tables stay).
        load_nft(&gw, &uplinkd)?;
        agent.push(rate()?);
        gw.ns.exec(&["nft", "delete", "table", "inet", "uplinkd"])?;
        gw.ns.exec(&["nft", bare_table])?;
        bare.push(rate()?);
        gw.ns.exec(&["nft", "delete", "table", "ip", "bare"])?;
    }
    // Each run's ratio to the bare run right after it: the machine's drift between runs
    // cancels out of a pair.
    let mut ratios: Vec<f64> = agent.iter().zip(&bare).map(|(a, b)| a / b).collect();
    let (a, b) = (median(&mut agent), median(&mut bare));
    println!("uplinkd: median {a:.0} packets/s {agent:.0?}");
    println!("bare: median {b:.0} packets/s {bare:.0?}");
    println!("uplinkd: {:.2}× bare (ratio of the medians)", a / b);
    let r = median(&mut ratios);
    println!(
        "uplinkd: {r:.3}× bare (median of the {} paired runs' ratios) {ratios:.3?}",
        ratios.len()
    );
    Ok(())
}

fn load_nft(gw: &Gw, ruleset: &str) -> Result<()> {
    let path = gw.dir.join("table.nft");
    std::fs::write(&path, ruleset)?;
    gw.ns.exec(&["nft", "-f", path.to_str().expect("utf-8")])?;
    Ok(())
}

/// Per-packet cost of the classification: the forwarding rate of packets that each go the
/// whole way through it (untracked, so no connection mark short-cuts it), with `clients`
/// clients and 0..1000 rules, next to the seed's one mark rule per client.
fn rules_bench(clients: u32, seconds: u64, runs: u64, machine: &str) -> Result<()> {
    println!(
        "per-packet classification: {clients} clients, one sender (client #{}), untracked UDP",
        clients / 2
    );
    println!("machine: {machine}; agent {}", uplinkd_bin().display());
    let (gw, snd) = sender_lab("brl", clients)?;
    gw.ns.exec(&["nft", "add table inet bench_raw { chain c { type filter hook prerouting priority -300; udp dport 9999 notrack; }; }"])?;
    let base = std::fs::read_to_string(gw.dir.join("uplinkd.toml"))?;
    let mut rows: Vec<(String, f64, Vec<f64>)> = Vec::new();
    let (child, _, rx) = gw.start_agent()?;
    let (_, started) = wait_line(&rx, "initial apply done", Duration::from_secs(120))?;
    if !started.contains(&format!("clients={clients}")) {
        bail!("the agent does not hold the {clients} clients: {started}");
    }
    for n in [0u32, 10, 100, 1000] {
        std::fs::write(
            gw.dir.join("uplinkd.toml"),
            format!("{base}{}", policy_config(n)),
        )?;
        reload(&child, &rx)?;
        let mut rates = Vec::new();
        for _ in 0..runs {
            rates.push(forwarding_rate(&gw, &snd, seconds)?);
        }
        let m = median(&mut rates);
        println!("uplinkd, {n} rules: median {m:.0} packets/s {rates:.0?}");
        rows.push((format!("uplinkd, {n} rules"), m, rates));
    }
    // Rule application: the reload from 0 to 1,000 rules, as one transaction.
    std::fs::write(gw.dir.join("uplinkd.toml"), &base)?;
    reload(&child, &rx)?;
    std::fs::write(
        gw.dir.join("uplinkd.toml"),
        format!("{base}{}", policy_config(1000)),
    )?;
    let t = Instant::now();
    let mut lines = reload(&child, &rx)?.into_iter();
    // The reload is logged once decided; its apply is answered by the executor after.
    let (at, applied) = match lines.find(|(_, l)| l.contains("applied full=true")) {
        Some(found) => found,
        None => loop {
            let (at, l) = rx
                .recv_timeout(Duration::from_secs(120))
                .with_context(|| "the reload applied nothing within 120 s".to_string())?;
            if l.contains("applied full=true") {
                break (at, l);
            }
        },
    };
    let us: f64 = applied
        .split("elapsed_us=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    println!(
        "applying 1,000 rules (reload, one nft transaction): {:.1} ms in the agent's apply, {:.1} ms from SIGHUP",
        us / 1000.0,
        at.duration_since(t).as_secs_f64() * 1000.0
    );
    stop(child)?;
    gw.ns.exec(&["nft", "delete", "table", "inet", "uplinkd"])?;
    // Bare: the same routing with one mark rule for every packet, no classification at
    // all: the floor the rows above are held against.
    gw.ns.exec(&[
        "nft",
        "add table ip bare { chain pre { type filter hook prerouting priority -150; meta mark set 0x01000000; }; }",
    ])?;
    let mut bare = Vec::new();
    for _ in 0..runs {
        bare.push(forwarding_rate(&gw, &snd, seconds)?);
    }
    let bare_m = median(&mut bare);
    println!("bare (one mark rule, no classification): median {bare_m:.0} packets/s {bare:.0?}");
    gw.ns.exec(&["nft", "delete", "table", "ip", "bare"])?;
    // The seed: uplinkd's routing stays, its table goes; one mark rule per client.
    let script = gw.dir.join("seed.nft");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&script)?);
        writeln!(f, "add table ip seed")?;
        writeln!(
            f,
            "add chain ip seed pre {{ type filter hook prerouting priority -150; }}"
        )?;
        for i in 0..clients {
            let mark = if i % 2 == 0 { 0x0100_0000 } else { 0x0200_0000 };
            writeln!(
                f,
                "add rule ip seed pre ip saddr {} meta mark set {mark:#x}",
                client_ip(i)
            )?;
        }
    }
    let t = Instant::now();
    gw.ns
        .exec(&["nft", "-f", script.to_str().expect("utf-8")])?;
    println!(
        "seed chain of {clients} rules loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut rates = Vec::new();
    for _ in 0..runs {
        rates.push(forwarding_rate(&gw, &snd, seconds)?);
    }
    let m = median(&mut rates);
    println!("seed, one rule per client: median {m:.0} packets/s {rates:.0?}");
    let zero = rows[0].1;
    for (what, m, _) in &rows {
        println!(
            "{what}: {:.2}× the 0-rule rate, {:.2}× bare",
            m / zero,
            m / bare_m
        );
    }
    println!("seed: {:.4}× the 0-rule rate", m / zero);
    Ok(())
}
