//! The lab: a gateway with three uplinks (weights 2/1/1, the third point-to-point), six
//! clients (three with IPv6), one ISP per uplink and an internet host, with uplinkd running
//! on the gateway and probing every uplink. Prints which uplink each client's traffic left
//! by, as the internet host saw it, and what uplinkd reported, until Ctrl-C; then removes
//! everything it made.
//!
//! A traffic policy steers a VoIP-like flow (c1, UDP to port 10000 every 20 ms) by a rule:
//! policy `voip` prefers isp2 and fails over to isp1 (and avoids an uplink slower than
//! 150 ms). The table shows where that flow leaves now and what `uplinkctl explain` says.
//!
//! isp2 is on DHCP (dnsmasq in the ISP, udhcpc on the gateway, `gateway = "auto"`).
//!
//! Type commands while it runs: `cut UPLINK` (carrier loss), `silent UPLINK` (the ISP drops
//! what it forwards, link up), `restore UPLINK`, `renumber isp2` (the ISP moves to another
//! subnet and gateway; the client renews), `explain SRC DST [--proto P] [--dport N]
//! ...`, `ctl ARGS` (uplinkctl as an operator, e.g. `ctl pin 198.19.0.11 lte`, `ctl drain
//! isp1`, `ctl events`, `ctl policies`), `table`, `quit`. `--demo` runs a carrier cut and a
//! silent failure with their recoveries by itself; `--once` prints one table.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use uplink_tests::dhcp::{ClientKind, RouteTable};
use uplink_tests::{Lab, SERVER4, UplinkSpec, client_v4, client_v6};

const UPLINKS: [&str; 3] = ["isp1", "isp2", "lte"];
/// Where the VoIP-like flow goes: the rule `voip` matches its port.
const VOIP_PORT: u16 = 10000;
const POLICY: &str = r#"
[[policy]]
name = "voip"
uplinks = ["isp2", "isp1"]
balance = "failover"
max_rtt = "150ms"

[[rule]]
name = "voip"
proto = "udp"
dport = ["10000-20000"]
policy = "voip"
"#;

/// isp2's DHCP server (replaced at a renumbering) and the gateway's client.
struct Dhcp {
    server: Mutex<uplink_tests::dhcp::Proc>,
    client: uplink_tests::dhcp::Proc,
    /// The subnet the ISP hands out now: `100.64.<net>.0/24`.
    net: Mutex<u8>,
}

impl Dhcp {
    /// The ISP moves to another subnet (and gateway) and NAKs the old lease at the renew
    /// that the client is told to do; returns the old and the new address.
    fn renumber(&self, lab: &Lab) -> Result<String> {
        let before = lab.wan_addr(2)?;
        let mut net = self.net.lock().expect("lock");
        *net = if *net == 2 { 12 } else { 2 };
        let started = Instant::now();
        *self.server.lock().expect("lock") = lab.dhcp_server(2, *net, "1h", "")?;
        self.client.signal("USR1")?;
        let want = *net;
        lab.wait_for(Duration::from_secs(30), "the new lease", || {
            Ok(lab.wan_addr(2)?.is_some_and(|a| a.octets()[2] == want))
        })?;
        Ok(format!(
            "isp2 renumbered: {} -> {} (gateway {}), leased after {} ms",
            before.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
            lab.wan_addr(2)?.map(|a| a.to_string()).unwrap_or_default(),
            uplink_tests::dhcp::router(want),
            started.elapsed().as_millis()
        ))
    }
}

/// The VoIP-like flow: datagrams sent and answered, and the uplink of the last answer.
#[derive(Default)]
struct Voip {
    sent: u64,
    answered: u64,
    via: String,
}

fn main() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let once = args.iter().any(|a| a == "--once");
    let demo = args.iter().any(|a| a == "--demo");

    let probe = "probes = [\"icmp:203.0.113.10\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false).with(probe),
        UplinkSpec::new("isp2", 1, false).with(probe),
        UplinkSpec::new("lte", 1, true).with(probe),
    ];
    eprintln!("building namespaces...");
    let mut lab = Lab::build("lab", uplinks, 6, 3)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[failover]\nfailback_delay = \"5s\"\n{POLICY}{api}"),
    )?;
    // isp2 is a cable line on DHCP: dnsmasq in the ISP, udhcpc on the gateway (its script
    // puts the default route in table 100, which uplinkd reads and does not own).
    lab.edit_config("gateway = \"100.64.2.1\"", "gateway = \"auto\"")?;
    lab.dhcp_uplink(2)?;
    let dhcp = Dhcp {
        server: Mutex::new(lab.dhcp_server(2, 2, "1h", "")?),
        client: lab.dhcp_client(2, ClientKind::Udhcpc, RouteTable::Table(100))?,
        net: Mutex::new(2),
    };
    eprintln!("isp2: waiting for a DHCP lease (dnsmasq in the ISP, udhcpc on the gateway)...");
    lab.wait_for(Duration::from_secs(30), "a DHCP lease on wan2", || {
        Ok(lab.wan_addr(2)?.is_some())
    })?;
    eprintln!("isp2: leased {}", lab.wan_addr(2)?.expect("leased"));
    lab.serve_udp(SocketAddr::new(IpAddr::V4(SERVER4), VOIP_PORT))?;
    eprintln!(
        "starting uplinkd in {} (config {}, log {})",
        lab.ns("gw"),
        lab.config_path().display(),
        lab.log_path().display()
    );
    lab.start_agent()?;
    eprintln!(
        "namespaces: {}-*   e.g. `ip netns exec {} nft list table inet uplinkd`",
        lab.prefix,
        lab.ns("gw")
    );
    let certs = lab.dir.join("certs");
    eprintln!(
        "uplinkctl (from another shell, as root):\n  export UPLINKCTL_CA={c}/ca.crt UPLINKCTL_CERT={c}/op.crt UPLINKCTL_KEY={c}/op.key\n  ip netns exec {gw} {ctl} --gateway 127.0.0.1:7443 uplinks",
        c = certs.display(),
        gw = lab.ns("gw"),
        ctl = uplink_tests::uplinkctl_bin().display()
    );

    // First contact: the gateway learns each client from its ARP/ND traffic.
    for (&i, &v6) in &lab.clients {
        for is6 in [false, true].into_iter().filter(|&x| v6 || !x) {
            if let Err(e) = lab.probe(i, is6, 10) {
                eprintln!("warning: {e}");
            }
        }
    }
    let voip = start_voip(&lab, stop.clone())?;
    std::thread::sleep(Duration::from_millis(1500));
    print_table(&lab, &voip)?;
    if once {
        return Ok(());
    }
    if demo {
        run_demo(&lab, &voip, &dhcp, &stop)?;
    } else {
        interactive(&lab, &voip, &dhcp, &stop)?;
    }
    eprintln!("tearing down {}-*", lab.prefix);
    Ok(())
}

/// c1 sends a datagram every 20 ms from one socket (one flow, as an RTP stream is).
fn start_voip(lab: &Lab, stop: Arc<AtomicBool>) -> Result<Arc<Mutex<Voip>>> {
    let sock = uplink_tests::in_netns(&lab.ns("c1"), || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(SocketAddr::new(IpAddr::V4(SERVER4), VOIP_PORT))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let state = Arc::new(Mutex::new(Voip::default()));
    let (shared, sources, gw) = (state.clone(), lab.uplinks.clone(), lab.ns("gw"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut last: (Option<IpAddr>, String) = (None, String::new());
        while !stop.load(Ordering::SeqCst) {
            let next = Instant::now() + Duration::from_millis(20);
            let _ = sock.send(b"rtp");
            shared.lock().expect("lock").sent += 1;
            if let Ok(n) = uplink_tests::retry_eintr(|| sock.recv(&mut buf)) {
                let seen = String::from_utf8_lossy(&buf[..n]);
                let ip: Option<IpAddr> = seen.split(' ').next().and_then(|s| s.parse().ok());
                if ip != last.0 {
                    let via = ip
                        .and_then(|ip| uplink_tests::uplink_by_address(&gw, &sources, ip))
                        .unwrap_or_else(|| "?".into());
                    last = (ip, via);
                }
                let via = last.1.clone();
                let mut v = shared.lock().expect("lock");
                v.answered += 1;
                v.via = via;
            }
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    Ok(state)
}

fn interactive(lab: &Lab, voip: &Mutex<Voip>, dhcp: &Dhcp, stop: &AtomicBool) -> Result<()> {
    eprintln!(
        "commands: cut UPLINK | silent UPLINK | restore UPLINK | renumber isp2 | explain SRC DST [--proto P] [--dport N] | ctl ARGS | table | quit   (uplinks: {})",
        UPLINKS.join(", ")
    );
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut next_table = Instant::now() + Duration::from_secs(5);
    while !stop.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let words: Vec<&str> = line.split_whitespace().collect();
                match words.as_slice() {
                    ["quit" | "exit"] => break,
                    ["explain", args @ ..] => {
                        let mut a = vec!["explain"];
                        a.extend_from_slice(args);
                        a.extend(["--iif", "br-lan", "-o", "wide"]);
                        let (_, out, err) = lab.ctl("view", &a)?;
                        print!("{out}");
                        eprint!("{err}");
                        continue;
                    }
                    ["ctl", args @ ..] => {
                        let (code, out, err) = lab.ctl("op", args)?;
                        print!("{out}");
                        eprint!("{err}");
                        if code != 0 {
                            eprintln!("(uplinkctl exit code {code})");
                        }
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    ["table"] | [] => {}
                    ["renumber", "isp2"] => {
                        println!("\n>>> renumber isp2");
                        match dhcp.renumber(lab) {
                            Ok(what) => println!("{what}"),
                            Err(e) => eprintln!("renumbering failed: {e}"),
                        }
                        // The uplink passes its probes on the new address first.
                        std::thread::sleep(Duration::from_millis(1500));
                    }
                    [cmd @ ("cut" | "silent" | "restore"), uplink] if UPLINKS.contains(uplink) => {
                        act(lab, cmd, uplink)?;
                        std::thread::sleep(Duration::from_millis(1500));
                    }
                    _ => {
                        eprintln!(
                            "unknown command {line:?}; commands: cut UPLINK | silent UPLINK | restore UPLINK | renumber isp2 | explain SRC DST ... | ctl ARGS | table | quit (uplinks: {})",
                            UPLINKS.join(", ")
                        );
                        continue;
                    }
                }
                print_table(lab, voip)?;
                next_table = Instant::now() + Duration::from_secs(5);
            }
            Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() >= next_table => {
                print_table(lab, voip)?;
                next_table = Instant::now() + Duration::from_secs(5);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100))
            }
        }
    }
    Ok(())
}

fn act(lab: &Lab, cmd: &str, uplink: &str) -> Result<()> {
    println!("\n>>> {cmd} {uplink}");
    match cmd {
        "cut" => lab.carrier(uplink, false),
        "silent" => lab.upstream_loss(uplink, 100),
        _ => {
            lab.carrier(uplink, true)?;
            lab.upstream_loss(uplink, 0)
        }
    }
}

fn run_demo(lab: &Lab, voip: &Mutex<Voip>, dhcp: &Dhcp, stop: &AtomicBool) -> Result<()> {
    let steps: [(&str, &str, u64); 6] = [
        ("cut", "isp1", 2),
        ("restore", "isp1", 8),
        ("cut", "isp2", 2),
        ("restore", "isp2", 8),
        ("silent", "isp2", 3),
        ("restore", "isp2", 8),
    ];
    for (cmd, uplink, wait) in steps {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        act(lab, cmd, uplink)?;
        std::thread::sleep(Duration::from_secs(wait));
        print_table(lab, voip)?;
    }
    if !stop.load(Ordering::SeqCst) {
        println!("\n>>> renumber isp2");
        println!("{}", dhcp.renumber(lab)?);
        std::thread::sleep(Duration::from_secs(3));
        print_table(lab, voip)?;
    }
    Ok(())
}

fn print_table(lab: &Lab, voip: &Mutex<Voip>) -> Result<()> {
    let assigned = lab.assignments().unwrap_or_default();
    println!(
        "\n{:<8} {:<22} {:<10} {:<22} {:<10}",
        "client", "address", "home", "internet saw", "left via"
    );
    for (&i, &v6) in &lab.clients {
        let mut addrs = vec![(std::net::IpAddr::from(client_v4(i)), false)];
        if v6 {
            addrs.push((client_v6(i).into(), true));
        }
        for (addr, is6) in addrs {
            let home = assigned.get(&addr).cloned().unwrap_or_else(|| "-".into());
            let (seen, via) = match lab.probe(i, is6, 5) {
                Ok(seen) => (
                    seen.to_string(),
                    lab.uplink_of_source(seen).unwrap_or_else(|| "?".into()),
                ),
                Err(_) => ("no answer".into(), "-".into()),
            };
            let flag = if via == home { "" } else { "  <- not home" };
            println!(
                "{:<8} {:<22} {:<10} {:<22} {:<10}{flag}",
                format!("c{i}"),
                addr,
                home,
                seen,
                via
            );
        }
    }
    {
        let v = voip.lock().expect("lock");
        println!(
            "voip flow c1 → {SERVER4}:{VOIP_PORT}/udp (one socket, every 20 ms): leaves via {}, {} of {} answered",
            if v.via.is_empty() { "-" } else { &v.via },
            v.answered,
            v.sent
        );
    }
    let c1 = client_v4(1).to_string();
    let port = VOIP_PORT.to_string();
    let explain = [
        "explain",
        &c1,
        "203.0.113.10",
        "--proto",
        "udp",
        "--dport",
        &port,
        "--iif",
        "br-lan",
    ];
    if let Ok((0, out, _)) = lab.ctl("view", &explain) {
        println!(
            "uplinkctl explain {c1} 203.0.113.10 --proto udp --dport {port}: {}",
            out.trim()
        );
    }
    // What uplinkd said about its uplinks lately.
    let log = lab.log_tail(400);
    let events: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(" -> ")
                || l.contains("failover of")
                || l.contains("failback to")
                || l.contains("ALL UPLINKS")
                || l.contains("policy ")
                || l.contains(" gateway ")
                || l.contains("NATed to it")
        })
        .collect();
    if !events.is_empty() {
        println!("uplinkd events (latest last):");
        for e in &events[events.len().saturating_sub(6)..] {
            let short = e.split("uplinkd::daemon: ").nth(1).unwrap_or(e);
            let short = short.split(" uplink=").next().unwrap_or(short);
            let time = e.split('T').nth(1).and_then(|t| t.get(..12)).unwrap_or("");
            println!("  {time}  {short}");
        }
    }
    Ok(())
}
