//! The soak: a gateway under steady churn for a long time, watched from outside. Clients
//! come and go through the neighbour table, an uplink fails over and back on a period,
//! Prometheus scrapes every second and watchers stream events, while a UDP flow on the
//! healthy uplink must lose nothing. The agent's RSS, descriptors and tasks are sampled
//! from its own `/metrics` (process collector) and must stay flat.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{DiesWithSpawner, Lab, UdpStream, uplinkctl_in};

#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Size of the pool of LAN clients that come and go.
    pub clients: u32,
    /// Neighbour adds and deletes per second.
    pub churn: u32,
    pub failover_every: Duration,
    pub scrape_every: Duration,
    pub watchers: u32,
    /// Samples before this are left out of the trend (allocator and caches warming up).
    pub warmup: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: f64,
    pub rss_bytes: f64,
    pub fds: f64,
    pub tasks: f64,
    pub clients: f64,
}

#[derive(Debug)]
pub struct SoakReport {
    pub samples: Vec<Sample>,
    pub warmup_secs: f64,
    pub sent: u64,
    pub received: u64,
    pub failovers: u64,
    pub neighbour_events: u64,
    pub scrapes: u64,
    /// Scrapes that failed (timed out on a busy machine).
    pub failed_scrapes: u64,
    /// Lines each watcher received.
    pub watcher_lines: Vec<u64>,
}

impl SoakReport {
    fn trend(&self, f: impl Fn(&Sample) -> f64) -> Trend {
        let pts: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|s| s.at >= self.warmup_secs)
            .map(|s| (s.at, f(s)))
            .collect();
        Trend::fit(&pts)
    }

    pub fn rss(&self) -> Trend {
        self.trend(|s| s.rss_bytes / 1_048_576.0)
    }

    pub fn fds(&self) -> Trend {
        self.trend(|s| s.fds)
    }

    pub fn tasks(&self) -> Trend {
        self.trend(|s| s.tasks)
    }
}

/// A least-squares line through the samples after the warm-up, with their range.
#[derive(Debug, Clone, Copy)]
pub struct Trend {
    /// Per hour.
    pub slope_per_hour: f64,
    pub first: f64,
    pub last: f64,
    pub min: f64,
    pub max: f64,
}

impl Trend {
    fn fit(pts: &[(f64, f64)]) -> Trend {
        let n = pts.len() as f64;
        let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (mx, my) = (sx / n, sy / n);
        let (num, den) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
            (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
        });
        let slope = if den > 0.0 { num / den } else { 0.0 };
        Trend {
            slope_per_hour: slope * 3600.0,
            first: pts.first().map_or(f64::NAN, |p| p.1),
            last: pts.last().map_or(f64::NAN, |p| p.1),
            min: pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min),
            max: pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

fn client_addr(i: u32) -> String {
    format!("2001:db8:1::5:{:x}", i)
}

fn client_mac(i: u32) -> String {
    let b = i.to_be_bytes();
    format!("02:5a:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3])
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Runs the soak; `progress` is called with each sample.
pub fn run(opts: &SoakOptions, mut progress: impl FnMut(&Sample)) -> Result<SoakReport> {
    let mut lab = Lab::build("soak", crate::probed_uplinks(), 1, 0)?;
    let api = lab.api_config()?;
    // Churned clients are released 5 s after they leave; lan.max_clients stays above the
    // pool.
    lab.write_config(
        "10s",
        "5s",
        &format!("[failover]\nfailback_delay = \"0s\"\nmax_flaps = 1000\n{api}"),
    )?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let home = homes
        .values()
        .next()
        .cloned()
        .context("the flow's client has a home")?;
    let victim = if home == "isp1" { "isp2" } else { "isp1" };

    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));

    // Churn: one long-lived `ip -batch` fed the adds and deletes.
    let mut batch = Command::new("ip")
        .args(["-n", &lab.ns("gw"), "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .dies_with_spawner()
        .spawn()?;
    let mut feed = std::io::BufWriter::new(batch.stdin.take().context("piped")?);
    for i in 0..opts.clients {
        writeln!(
            feed,
            "neigh replace {} lladdr {} dev br-lan nud permanent",
            client_addr(i),
            client_mac(i)
        )?;
    }
    feed.flush()?;
    let churn = {
        let (stop, events, opts) = (stop.clone(), events.clone(), opts.clone());
        std::thread::spawn(move || -> Result<()> {
            let tick = Duration::from_millis(100);
            let per_tick = (opts.churn / 10).max(2);
            let mut next = 0u32;
            let mut at = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                // Half deletes, half re-adds of entries deleted a while ago: the pool
                // keeps its size, clients come and go.
                for _ in 0..per_tick / 2 {
                    let gone = next % opts.clients;
                    let back = (next + opts.clients / 2) % opts.clients;
                    writeln!(feed, "neigh del {} dev br-lan", client_addr(gone))?;
                    writeln!(
                        feed,
                        "neigh replace {} lladdr {} dev br-lan nud permanent",
                        client_addr(back),
                        client_mac(back)
                    )?;
                    next = next.wrapping_add(1);
                }
                feed.flush()?;
                events.fetch_add(u64::from(per_tick / 2 * 2), Ordering::Relaxed);
                at += tick;
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
            }
            Ok(())
        })
    };

    // Watchers: `uplinkctl events --follow`, counting the lines each receives.
    let certs = lab.dir.join("certs");
    let mut watchers: Vec<(Child, std::thread::JoinHandle<u64>)> = Vec::new();
    for _ in 0..opts.watchers {
        let mut child = uplinkctl_in(&lab.ns("gw"), &certs, &certs.join("ca.crt"), "view")
            .args(["--gateway", "127.0.0.1:7443", "events", "--follow"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .dies_with_spawner()
            .spawn()?;
        let out = child.stdout.take().context("piped")?;
        let lines = std::thread::spawn(move || {
            BufReader::new(out).lines().map_while(Result::ok).count() as u64
        });
        watchers.push((child, lines));
    }

    let flow = UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let (mut scrapes, mut failed_scrapes, mut failovers) = (0u64, 0u64, 0u64);
    let mut next_scrape = started;
    let mut next_failover = started + opts.failover_every;
    let mut restore_at: Option<Instant> = None;
    while started.elapsed() < opts.duration {
        let now = Instant::now();
        if now >= next_failover {
            lab.carrier(victim, false)?;
            failovers += 1;
            restore_at = Some(now + (opts.failover_every / 2).min(Duration::from_secs(10)));
            next_failover += opts.failover_every;
        }
        if restore_at.is_some_and(|t| now >= t) {
            lab.carrier(victim, true)?;
            restore_at = None;
        }
        if now >= next_scrape {
            next_scrape += opts.scrape_every;
            // The metrics listener runs at a lower priority than the loop: on a machine
            // busy with other work a scrape may time out. Counted, not fatal.
            let Ok(text) = lab.gw(&["curl", "-sf", "-m", "5", "http://127.0.0.1:9477/metrics"])
            else {
                failed_scrapes += 1;
                continue;
            };
            scrapes += 1;
            let s = Sample {
                at: started.elapsed().as_secs_f64(),
                rss_bytes: metric(&text, "process_resident_memory_bytes").unwrap_or(f64::NAN),
                fds: metric(&text, "process_open_fds").unwrap_or(f64::NAN),
                tasks: metric(&text, "uplinkd_tasks").unwrap_or(f64::NAN),
                clients: metric(&text, "uplinkd_clients").unwrap_or(f64::NAN),
            };
            progress(&s);
            samples.push(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if restore_at.is_some() {
        lab.carrier(victim, true)?;
    }
    stop.store(true, Ordering::SeqCst);
    churn
        .join()
        .map_err(|_| anyhow::anyhow!("churn thread panicked"))??;
    let _ = batch.wait();
    let r = flow.finish()?;
    let mut watcher_lines = Vec::new();
    for (mut child, lines) in watchers {
        let alive = matches!(child.try_wait(), Ok(None));
        let _ = child.kill();
        let _ = child.wait();
        let n = lines.join().unwrap_or(0);
        watcher_lines.push(if alive { n } else { 0 });
    }
    anyhow::ensure!(lab.agent_running(), "uplinkd died during the soak");
    Ok(SoakReport {
        samples,
        warmup_secs: opts.warmup.as_secs_f64(),
        sent: r.sent,
        received: r.received,
        failovers,
        neighbour_events: events.load(Ordering::Relaxed),
        scrapes,
        failed_scrapes,
        watcher_lines,
    })
}

/// The report's figures as text, by name.
pub fn describe(r: &SoakReport) -> BTreeMap<&'static str, String> {
    let t = |x: Trend, unit: &str| {
        format!(
            "slope {:+.2} {unit}/h (first {:.1}, last {:.1}, min {:.1}, max {:.1})",
            x.slope_per_hour, x.first, x.last, x.min, x.max
        )
    };
    BTreeMap::from([
        ("rss", t(r.rss(), "MB")),
        ("fds", t(r.fds(), "fds")),
        ("tasks", t(r.tasks(), "tasks")),
        (
            "flow",
            format!("{} of {} datagrams answered", r.received, r.sent),
        ),
        (
            "load",
            format!(
                "{} failovers, {} neighbour events, {} scrapes ({} failed), watchers saw {:?} lines",
                r.failovers, r.neighbour_events, r.scrapes, r.failed_scrapes, r.watcher_lines
            ),
        ),
    ])
}
