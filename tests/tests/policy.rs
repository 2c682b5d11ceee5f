//! Traffic policy on the real dataplane: rules by every match kind, the balancing modes,
//! failover mode and `when_none`, `main`, reloads, SLA steering and `explain`, each proven
//! by the source address the internet host sees.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use uplink_tests::{
    ECHO_PORT, Lab, SERVER4, TCP_ECHO_PORT, TcpFlow, UdpStream, UplinkSpec, client_v4, server,
};

use uplink_tests::{internet_v4 as v4, two_uplinks as two};

/// Packets counted in `[[rule]]` `name`'s own chain.
fn rule_packets(lab: &Lab, name: &str) -> anyhow::Result<u64> {
    uplink_tests::nft_chain_packets(&lab.ns("gw"), "inet", "uplinkd", &format!("rule_{name}"))
}

/// Rule, client, destination, source port, DSCP.
type Case = (&'static str, u32, SocketAddr, Option<u16>, Option<u8>);

const POLICIES: &str = r#"
[[set]]
name = "saas"
elements = ["203.0.113.30", "2001:db8:ffff::30"]

[[policy]]
name = "via1"
uplinks = ["isp1"]
balance = "failover"

[[policy]]
name = "via2"
uplinks = ["isp2"]
balance = "failover"
"#;

/// Every match kind steers c1 (homed on isp1) to isp2 only for the traffic it matches;
/// `main` leaves traffic to the main table's default route; rule counters move.
#[test]
fn rules_steer_by_every_match_kind() -> anyhow::Result<()> {
    let mut lab = Lab::build("rules", two(), 3, 1)?;
    let c3 = client_v4(3);
    let rules = format!(
        r#"{POLICIES}
[[rule]]
name = "dst-cidr"
dst = ["203.0.113.20/32"]
policy = "via2"

[[rule]]
name = "dst-set"
dst = ["@saas"]
policy = "via2"

[[rule]]
name = "tcp"
proto = "tcp"
dport = [{TCP_ECHO_PORT}]
policy = "via2"

[[rule]]
name = "dport-range"
proto = "udp"
dport = ["9100-9110"]
policy = "via2"

[[rule]]
name = "sport"
sport = [40000]
policy = "via2"

[[rule]]
name = "voice"
dscp = ["ef"]
policy = "via2"

[[rule]]
name = "src"
src = ["{c3}/32"]
policy = "via2"

[[rule]]
name = "vpn"
dst = ["203.0.113.40/32"]
policy = "main"
"#
    );
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{rules}{api}"))?;
    for a in [v4(20, ECHO_PORT), v4(30, ECHO_PORT), v4(40, ECHO_PORT)] {
        lab.serve_udp(a)?;
    }
    lab.serve_udp(SocketAddr::new("2001:db8:ffff::30".parse()?, ECHO_PORT))?;
    lab.serve_udp(SocketAddr::new(IpAddr::V4(SERVER4), 9105))?;
    // The site's main table has a default route (via isp2): what `main` traffic takes.
    lab.gw(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "100.64.2.1",
        "dev",
        "wan2",
    ])?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    assert_eq!(homes[&IpAddr::from(client_v4(1))], "isp1");
    assert_eq!(homes[&IpAddr::from(c3)], "isp1");

    // Unmatched traffic follows the home.
    assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
    assert_eq!(lab.udp_via(1, server(true), None, None)?, "isp1");
    let cases: Vec<Case> = vec![
        ("dst-cidr", 1, v4(20, ECHO_PORT), None, None),
        ("dst-set", 1, v4(30, ECHO_PORT), None, None),
        (
            "dst-set",
            1,
            SocketAddr::new("2001:db8:ffff::30".parse()?, ECHO_PORT),
            None,
            None,
        ),
        (
            "dport-range",
            1,
            SocketAddr::new(IpAddr::V4(SERVER4), 9105),
            None,
            None,
        ),
        ("sport", 1, server(false), Some(40000), None),
        ("voice", 1, server(false), None, Some(46)),
        ("voice", 1, server(true), None, Some(46)),
        ("src", 3, server(false), None, None),
    ];
    for (rule, client, to, sport, dscp) in cases {
        let before = rule_packets(&lab, rule)?;
        assert_eq!(
            lab.udp_via(client, to, sport, dscp)?,
            "isp2",
            "rule {rule}: c{client} → {to}"
        );
        assert!(
            rule_packets(&lab, rule)? > before,
            "rule {rule}'s counter moved"
        );
    }
    // A DSCP other than the rule's: the home.
    assert_eq!(lab.udp_via(1, server(false), None, Some(10))?, "isp1");
    let mut tcp = TcpFlow::connect(&lab, 1)?;
    let seen = tcp.exchange()?;
    assert_eq!(
        lab.uplink_of_source(seen).as_deref(),
        Some("isp2"),
        "rule tcp"
    );

    // `main`: unmarked, so the main table's default route (isp2) carries it.
    let before = rule_packets(&lab, "vpn")?;
    assert_eq!(lab.udp_via(1, v4(40, ECHO_PORT), None, None)?, "isp2");
    assert!(rule_packets(&lab, "vpn")? > before);
    let marks = lab.gw(&["conntrack", "-L", "-d", "203.0.113.40"])?;
    assert!(
        marks.contains("mark=0 "),
        "main traffic carries no uplink mark: {marks}"
    );
    Ok(())
}

/// connection mode: 90 TCP connections from one client over weights 2/1 land about
/// 60/30, and a long connection keeps its uplink while the others come and go.
#[test]
fn connection_mode_spreads_one_clients_connections_by_weight() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
    ];
    let mut lab = Lab::build("conn", uplinks, 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[dispatch]\nbalance = \"connection\"\n{api}"),
    )?;
    lab.start_agent()?;
    let mut long = TcpFlow::connect(&lab, 1)?;
    let long_via = long.exchange()?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..90 {
        let mut c = TcpFlow::connect(&lab, 1)?;
        let seen = c.exchange()?;
        *counts
            .entry(lab.uplink_of_source(seen).expect("an uplink"))
            .or_default() += 1;
        assert_eq!(c.exchange()?, seen, "a connection keeps its uplink");
    }
    // Binomial(90, 2/3): 60 ± 4.5; 45..=75 fails about once in a thousand runs.
    let isp1 = counts.get("isp1").copied().unwrap_or(0);
    assert!(
        (45..=75).contains(&isp1),
        "isp1 got {isp1} of 90: {counts:?}"
    );
    assert_eq!(long.exchange()?, long_via, "the long connection stayed");
    // The client's view and the metrics say it uses both uplinks.
    let (_, out, _) = lab.ctl("view", &["clients", "-o", "json"])?;
    let c: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        (c[0]["current_uplink"].as_str(), c[0]["reason"].as_str()),
        (Some("isp1,isp2"), Some("policy")),
        "{out}"
    );
    let metrics = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
    for u in ["isp1", "isp2"] {
        assert!(
            metrics.contains(&format!("uplinkd_uplink_clients{{uplink=\"{u}\"}} 1")),
            "{metrics}"
        );
    }
    // explain names the draw, not one uplink: both, by weight.
    let (_, out, _) = lab.ctl(
        "view",
        &[
            "explain",
            &client_v4(1).to_string(),
            "203.0.113.10",
            "--proto",
            "tcp",
            "-o",
            "json",
        ],
    )?;
    let e: serde_json::Value = serde_json::from_str(&out)?;
    let summary = e["summary"].as_str().unwrap_or_default();
    assert!(
        e["uplink"] == "" && summary.contains("isp1 2/3") && summary.contains("isp2 1/3"),
        "{out}"
    );
    Ok(())
}

/// destination mode: a server always gets the same uplink (also from new flows), 20
/// servers spread over both, and `explain` names the uplink each one takes.
#[test]
fn destination_mode_is_sticky_per_server() -> anyhow::Result<()> {
    let mut lab = Lab::build("dest", two(), 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[dispatch]\nbalance = \"destination\"\n{api}"),
    )?;
    let servers: Vec<SocketAddr> = (100..120).map(|i| v4(i, ECHO_PORT)).collect();
    for s in &servers {
        lab.serve_udp(*s)?;
    }
    lab.start_agent()?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let src = client_v4(1).to_string();
    for s in &servers {
        let first = lab.udp_via(1, *s, None, None)?;
        for _ in 0..2 {
            assert_eq!(lab.udp_via(1, *s, None, None)?, first, "{s} is sticky");
        }
        let (code, out, err) = lab.ctl(
            "view",
            &[
                "explain",
                &src,
                &s.ip().to_string(),
                "--proto",
                "udp",
                "--dport",
                "9000",
                "-o",
                "json",
            ],
        )?;
        assert_eq!(code, 0, "{err}");
        let e: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(e["uplink"], first.as_str(), "explain agrees for {s}: {out}");
        *counts.entry(first).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "20 servers use both uplinks: {counts:?}");
    Ok(())
}

/// failover mode takes the first usable uplink in list order, moves on a carrier cut and
/// comes back; `when_none = "drop"` drops (its counter moves) and "default" falls back.
#[test]
fn failover_mode_and_when_none() -> anyhow::Result<()> {
    let mut lab = Lab::build("fomode", two(), 1, 0)?;
    let api = lab.api_config()?;
    let cfg = r#"[failover]
failback_delay = "1s"

[[policy]]
name = "voip"
uplinks = ["isp2", "isp1"]
balance = "failover"

[[policy]]
name = "only2"
uplinks = ["isp2"]
balance = "failover"
when_none = "drop"

[[policy]]
name = "prefer2"
uplinks = ["isp2"]
balance = "failover"

[[rule]]
name = "voip"
dst = ["203.0.113.50/32"]
policy = "voip"

[[rule]]
name = "strict"
dst = ["203.0.113.51/32"]
policy = "only2"

[[rule]]
name = "loose"
dst = ["203.0.113.52/32"]
policy = "prefer2"
"#;
    lab.write_config("10s", "10m", &format!("{cfg}{api}"))?;
    for i in 50..=52 {
        lab.serve_udp(v4(i, ECHO_PORT))?;
    }
    lab.start_agent()?;
    lab.greet_clients()?;
    for i in 50..=52 {
        assert_eq!(lab.udp_via(1, v4(i, ECHO_PORT), None, None)?, "isp2");
    }
    let voice = UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    lab.carrier("isp2", false)?;
    lab.wait_for(Duration::from_secs(5), "voip on isp1", || {
        Ok(lab
            .send_udp(1, v4(50, ECHO_PORT), None, None, 1)?
            .is_some_and(|s| lab.uplink_of_source(s).as_deref() == Some("isp1")))
    })?;
    let (_, out, _) = lab.ctl(
        "view",
        &[
            "explain",
            &client_v4(1).to_string(),
            "203.0.113.50",
            "-o",
            "json",
        ],
    )?;
    let e: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(e["uplink"], "isp1", "{out}");
    assert!(
        e["summary"]
            .as_str()
            .unwrap_or_default()
            .contains("isp2 is down"),
        "{out}"
    );
    // The default policy's own flow (homed on isp1) lost nothing meanwhile.
    let r = voice.finish()?;
    assert_eq!(r.received, r.sent, "{r:?}");
    assert_eq!(
        lab.udp_via(1, v4(52, ECHO_PORT), None, None)?,
        "isp1",
        "when_none = default"
    );
    let drops = |lab: &Lab| {
        uplink_tests::nft_chain_packets(&lab.ns("gw"), "inet", "uplinkd", "policy_only2")
    };
    let before = drops(&lab)?;
    assert_eq!(
        lab.send_udp(1, v4(51, ECHO_PORT), None, None, 2)?,
        None,
        "dropped"
    );
    assert!(drops(&lab)? > before, "by the policy's drop");
    lab.carrier("isp2", true)?;
    lab.wait_for(Duration::from_secs(10), "voip back on isp2", || {
        Ok(lab
            .send_udp(1, v4(50, ECHO_PORT), None, None, 1)?
            .is_some_and(|s| lab.uplink_of_source(s).as_deref() == Some("isp2")))
    })?;
    assert_eq!(lab.udp_via(1, v4(51, ECHO_PORT), None, None)?, "isp2");
    Ok(())
}

/// A reload that adds, removes and reorders rules: a running flow loses nothing and
/// keeps its uplink; new flows follow the new rules (an `iif` rule among them).
#[test]
fn reload_changes_rules_without_loss() -> anyhow::Result<()> {
    let mut lab = Lab::build("rreload", two(), 1, 0)?;
    let first = format!(
        r#"{POLICIES}
[[rule]]
name = "a"
dst = ["203.0.113.20/32"]
policy = "via2"

[[policy]]
name = "gone"
uplinks = ["isp2"]

[[rule]]
name = "a2"
dst = ["203.0.113.21/32"]
policy = "gone"
"#
    );
    lab.write_config("10s", "10m", &first)?;
    lab.serve_udp(v4(20, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
    let flow = UdpStream::start(&lab, 1, false, Duration::from_millis(10))?;
    let second = format!(
        r#"{POLICIES}
[[rule]]
name = "lan"
iif = ["br-lan"]
proto = "udp"
policy = "via2"

[[rule]]
name = "b"
dst = ["203.0.113.20/32"]
policy = "via1"
"#
    );
    lab.write_config("10s", "10m", &second)?;
    lab.signal_agent("HUP")?;
    lab.wait_for(Duration::from_secs(5), "new flows on isp2", || {
        Ok(lab
            .send_udp(1, server(false), None, None, 1)?
            .is_some_and(|s| lab.uplink_of_source(s).as_deref() == Some("isp2")))
    })?;
    // `lan` comes first now: it wins over `b` for UDP.
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp2");
    // The reload's apply went through at the first attempt (removing a rule that sat in
    // a verdict map once failed with EBUSY and only a retry fixed it).
    let metrics = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
    assert!(
        metrics.lines().any(|l| l == "uplinkd_apply_errors_total 0"),
        "{}",
        lab.log_tail(20)
    );
    let r = flow.finish()?;
    assert_eq!(r.received, r.sent, "the running flow lost nothing: {r:?}");
    assert_eq!(
        r.seen
            .iter()
            .filter_map(|s| lab.uplink_of_source(*s))
            .collect::<Vec<_>>(),
        ["isp1"],
        "and kept its uplink"
    );
    Ok(())
}

/// A pin moves all of the client's traffic, rules included.
#[test]
fn a_pin_wins_over_rules() -> anyhow::Result<()> {
    let mut lab = Lab::build("pinrule", two(), 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "{POLICIES}\n[[rule]]\nname = \"a\"\ndst = [\"203.0.113.20/32\"]\npolicy = \"via2\"\n{api}"
        ),
    )?;
    lab.serve_udp(v4(20, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp2");
    let (code, _, err) = lab.ctl("op", &["pin", &client_v4(1).to_string(), "isp1"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp1");
    let (_, out, _) = lab.ctl(
        "view",
        &[
            "explain",
            &client_v4(1).to_string(),
            "203.0.113.20",
            "-o",
            "json",
        ],
    )?;
    let e: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(e["uplink"], "isp1", "{out}");
    assert_eq!(e["policy"], "pin", "{out}");
    Ok(())
}

/// One UDP socket of a client: one conntrack entry for as long as it talks, as a call's
/// media stream is. `ask` returns the address the internet host saw for one datagram.
struct Call {
    sock: std::net::UdpSocket,
    seq: u64,
}

impl Call {
    fn open(lab: &Lab, client: u32, to: SocketAddr) -> anyhow::Result<Call> {
        let sock = uplink_tests::in_netns(&lab.ns(&format!("c{client}")), || {
            std::net::UdpSocket::bind("0.0.0.0:0")
        })??;
        sock.connect(to)?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(Call { sock, seq: 0 })
    }

    /// The answer to this datagram (late answers to earlier ones are skipped), or `None`.
    fn ask(&mut self) -> anyhow::Result<Option<IpAddr>> {
        self.seq += 1;
        let tag = format!("call {}", self.seq);
        self.sock.send(tag.as_bytes())?;
        let mut buf = [0u8; 2048];
        while let Ok(n) = self.sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.ends_with(&tag) {
                return Ok(text.split(' ').next().and_then(|a| a.parse().ok()));
            }
        }
        Ok(None)
    }
}

/// SLA steering with real added latency (a bulk download through a tbf-limited ISP link
/// queues the probes): the policy with max_rtt leaves isp1, and its call in progress (one
/// socket, one conntrack entry) moves with it; the default policy keeps using isp1. Once
/// the queue drains the policy uses isp1 again for new flows, and the call stays where it
/// is (a return is not worth a second change of address).
#[test]
fn sla_steering_moves_a_policy_off_a_slow_uplink_and_back() -> anyhow::Result<()> {
    let mut lab = Lab::build("sla", uplink_tests::probed_uplinks(), 1, 0)?;
    let api = lab.api_config()?;
    let cfg = format!(
        r#"[health]
stats_window = 10

[[policy]]
name = "voip"
uplinks = ["isp1", "isp2"]
balance = "failover"
max_rtt = "100ms"

[[rule]]
name = "voip"
dst = ["203.0.113.50/32"]
policy = "voip"

[metrics]
listen = "127.0.0.1:9477"
{api}"#
    );
    lab.write_config("10s", "10m", &cfg)?;
    lab.serve_udp(v4(50, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let voip = v4(50, ECHO_PORT);
    let via = |a: Option<IpAddr>| a.and_then(|s| lab.uplink_of_source(s));
    let mut call = Call::open(&lab, 1, voip)?;
    assert_eq!(
        via(call.ask()?).as_deref(),
        Some("isp1"),
        "the call starts on isp1"
    );
    lab.shape("isp1", "2mbit")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let conn = uplink_tests::in_netns(&lab.ns("c1"), || {
        std::net::TcpStream::connect((SERVER4, uplink_tests::BULK_PORT))
    })??;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut conn = conn;
        let mut buf = [0u8; 65536];
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if matches!(conn.read(&mut buf), Ok(0)) {
                break;
            }
        }
    });
    let result = (|| -> anyhow::Result<()> {
        // The queue a bulk download builds is a sawtooth (a TCP timeout drains it), so the
        // verdict may come and go: the view, the metric and the call are taken as
        // evidence together, in one observation, not one after the other.
        lab.wait_for(
            Duration::from_secs(20),
            "voip and its call moved to isp2",
            || {
                let (_, out, _) = lab.ctl("view", &["policies", "-o", "json"])?;
                let p: serde_json::Value = serde_json::from_str(&out)?;
                let voip_p = p
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["name"] == "voip"))
                    .cloned()
                    .unwrap_or_default();
                let avoided = voip_p["using"] == serde_json::json!(["isp2"])
                    && voip_p["skipped"][0]
                        .as_str()
                        .unwrap_or_default()
                        .contains("max_rtt 100ms");
                let metrics = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
                let gauge =
                    metrics.contains("uplinkd_policy_sla_met{policy=\"voip\",uplink=\"isp1\"} 0");
                Ok(avoided && gauge && via(call.ask()?).as_deref() == Some("isp2"))
            },
        )?;
        // Only this policy avoids isp1: the default one still places flows there.
        assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = reader.join();
    result?;
    lab.wait_for(Duration::from_secs(20), "voip back on isp1", || {
        Ok(lab
            .send_udp(1, voip, None, None, 3)?
            .is_some_and(|s| lab.uplink_of_source(s).as_deref() == Some("isp1")))
    })?;
    assert_eq!(
        via(call.ask()?).as_deref(),
        Some("isp2"),
        "the call stays on isp2"
    );
    let (_, out, _) = lab.ctl("view", &["events", "-o", "json"])?;
    let events: serde_json::Value = serde_json::from_str(&out)?;
    let sla: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "sla")
        .map(|e| e["cause"].as_str().unwrap_or_default())
        .collect();
    assert!(
        sla.len() >= 2
            && sla[0].contains("avoids isp1")
            && sla.last().unwrap().contains("uses isp1 again"),
        "{sla:?}"
    );
    Ok(())
}

/// A domain rule with a real dnsmasq as the gateway's resolver: `--nftset` fills the
/// external set uplinkd created, and the client's next connection to the address it
/// resolved follows the rule; a reload that rewrites the rules keeps the set's elements.
#[test]
fn dnsmasq_nftset_fills_an_external_set() -> anyhow::Result<()> {
    let mut lab = Lab::build("nftset", two(), 1, 0)?;
    let api = lab.api_config()?;
    let cfg = |extra: &str| {
        format!(
            r#"{POLICIES}
[[set]]
name = "cdn"
external = true

[[rule]]
name = "cdn"
dst = ["@cdn"]
policy = "via2"
{extra}{api}"#
        )
    };
    lab.write_config("10s", "10m", &cfg(""))?;
    lab.serve_udp(v4(60, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(
        lab.udp_via(1, v4(60, ECHO_PORT), None, None)?,
        "isp1",
        "set empty"
    );
    // The "upstream" resolver, and the LAN's resolver that fills the set from its answers.
    let gw = lab.ns("gw");
    let _upstream = lab.resolver(
        &gw,
        &[
            "--listen-address=127.0.0.1",
            "--port=5353",
            "--address=/cdn.example/203.0.113.60",
        ],
    )?;
    let _resolver = lab.resolver(
        &gw,
        &[
            "--listen-address=198.19.0.1",
            "--port=53",
            "--server=127.0.0.1#5353",
            "--nftset=/cdn.example/4#inet#uplinkd#cdn_v4,6#inet#uplinkd#cdn_v6",
        ],
    )?;
    let dns: SocketAddr = "198.19.0.1:53".parse()?;
    let mut got = None;
    lab.wait_for(Duration::from_secs(5), "dnsmasq answers", || {
        got = lab.resolve(1, dns, "cdn.example").ok();
        Ok(got.is_some())
    })?;
    assert_eq!(got, Some(Ipv4Addr::new(203, 0, 113, 60)));
    let set = lab.gw(&["nft", "list", "set", "inet", "uplinkd", "cdn_v4"])?;
    assert!(set.contains("203.0.113.60"), "{set}");
    assert_eq!(
        lab.udp_via(1, v4(60, ECHO_PORT), None, None)?,
        "isp2",
        "follows the rule"
    );
    let (_, out, _) = lab.ctl(
        "view",
        &[
            "explain",
            &client_v4(1).to_string(),
            "203.0.113.60",
            "-o",
            "json",
        ],
    )?;
    let e: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        (e["rule"].as_str(), e["uplink"].as_str()),
        (Some("cdn"), Some("isp2")),
        "{out}"
    );
    // A reload that rewrites the rules chain leaves the external set's elements alone.
    lab.write_config(
        "10s",
        "10m",
        &cfg("\n[[rule]]\nname = \"other\"\ndst = [\"203.0.113.61/32\"]\npolicy = \"via1\"\n"),
    )?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    let (_, rules, _) = lab.ctl("view", &["rules"])?;
    assert!(rules.contains("other"), "{rules}");
    let set = lab.gw(&["nft", "list", "set", "inet", "uplinkd", "cdn_v4"])?;
    assert!(set.contains("203.0.113.60"), "{set}");
    assert_eq!(lab.udp_via(1, v4(60, ECHO_PORT), None, None)?, "isp2");
    // So does a whole-table replace (here forced by an element uplinkd did not write).
    lab.gw(&[
        "nft",
        "add element inet uplinkd sticky { 0x7f000000 : accept }",
    ])?;
    let mark = lab.log_len();
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        lab.log_since(mark).contains("replaced_table=true"),
        "{}",
        lab.log_since(mark)
    );
    let set = lab.gw(&["nft", "list", "set", "inet", "uplinkd", "cdn_v4"])?;
    assert!(set.contains("203.0.113.60"), "{set}");
    assert_eq!(lab.udp_via(1, v4(60, ECHO_PORT), None, None)?, "isp2");
    Ok(())
}

/// `uplinkctl set add|del` changes a set's elements in the kernel at once, survives a
/// restart, and refuses an external set.
#[test]
fn set_elements_change_through_the_api_and_persist() -> anyhow::Result<()> {
    let mut lab = Lab::build("setapi", two(), 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "{POLICIES}\n[[set]]\nname = \"dyn\"\nexternal = true\n\n[[rule]]\nname = \"saas\"\ndst = [\"@saas\"]\npolicy = \"via2\"\n{api}"
        ),
    )?;
    for i in [30, 70] {
        lab.serve_udp(v4(i, ECHO_PORT))?;
    }
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(lab.udp_via(1, v4(70, ECHO_PORT), None, None)?, "isp1");
    let (code, out, err) = lab.ctl("op", &["set", "add", "saas", "203.0.113.70"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("203.0.113.70/32"), "{out}");
    let (code, _, err) = lab.ctl("op", &["set", "del", "saas", "203.0.113.30"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.udp_via(1, v4(70, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp1");
    let (code, _, err) = lab.ctl("op", &["set", "add", "dyn", "203.0.113.71"])?;
    assert_ne!(code, 0);
    assert!(err.contains("external"), "{err}");
    let (code, _, err) = lab.ctl("view", &["set", "add", "saas", "203.0.113.72"])?;
    assert_ne!(code, 0);
    assert!(err.contains("operator"), "{err}");
    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    let (_, out, _) = lab.ctl("view", &["sets", "-o", "json"])?;
    let sets: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(
        sets[0]["elements"],
        serde_json::json!(["203.0.113.70/32", "2001:db8:ffff::30/128"]),
        "{out}"
    );
    assert_eq!(lab.udp_via(1, v4(70, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp1");
    Ok(())
}

/// Per-policy failover on a silent failure (probes stop coming back, the link stays up):
/// the policy's flows move to its next uplink, their old conntrack entries go (the same
/// socket is answered through isp1), another uplink's flow loses nothing; and back.
#[test]
fn a_policy_fails_over_and_back_on_a_silent_failure() -> anyhow::Result<()> {
    let mut lab = Lab::build("polsilent", uplink_tests::probed_uplinks(), 1, 0)?;
    let cfg = r#"[failover]
failback_delay = "1s"

[[policy]]
name = "voip"
uplinks = ["isp2", "isp1"]
balance = "failover"

[[rule]]
name = "voip"
dst = ["203.0.113.50/32"]
policy = "voip"
"#;
    lab.write_config("10s", "10m", cfg)?;
    lab.serve_udp(v4(50, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let voip = v4(50, ECHO_PORT);
    // One socket: one flow, first through isp2.
    let sock = uplink_tests::in_netns(&lab.ns("c1"), || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    sock.connect(voip)?;
    sock.set_read_timeout(Some(Duration::from_millis(300)))?;
    let via = |sock: &std::net::UdpSocket| -> Option<String> {
        let mut buf = [0u8; 512];
        sock.send(b"rtp").ok()?;
        let n = uplink_tests::retry_eintr(|| sock.recv(&mut buf)).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        lab.uplink_of_source(text.split(' ').next()?.parse().ok()?)
    };
    assert_eq!(via(&sock).as_deref(), Some("isp2"));
    let other = UdpStream::start(&lab, 1, false, Duration::from_millis(10))?;
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(Duration::from_secs(10), "the voip flow on isp1", || {
        Ok(via(&sock).as_deref() == Some("isp1"))
    })?;
    let r = other.finish()?;
    assert_eq!(r.received, r.sent, "isp1's flow lost nothing: {r:?}");
    lab.upstream_loss("isp2", 0)?;
    lab.wait_for(
        Duration::from_secs(15),
        "new voip flows back on isp2",
        || {
            Ok(lab
                .send_udp(1, voip, None, None, 1)?
                .is_some_and(|s| lab.uplink_of_source(s).as_deref() == Some("isp2")))
        },
    )?;
    Ok(())
}

/// A `[[set]]` that a reload turns from listed elements into `external = true` kept its
/// listed elements in the kernel for ever (the set was not recreated), so traffic to them
/// still matched. The set is created anew, empty for its filler.
#[test]
fn a_set_turned_external_by_reload_drops_its_listed_elements() -> anyhow::Result<()> {
    let mut lab = Lab::build("setext", two(), 1, 0)?;
    let listed = "elements = [\"203.0.113.30\"]";
    let rules = format!(
        "{POLICIES}\n[[set]]\nname = \"moved\"\n{listed}\n\n[[rule]]\nname = \"moved\"\ndst = [\"@moved\"]\npolicy = \"via2\"\n"
    );
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{rules}{api}"))?;
    lab.serve_udp(v4(30, ECHO_PORT))?;
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp2");
    lab.edit_config(listed, "external = true")?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    let set = lab.gw(&["nft", "-j", "list", "set", "inet", "uplinkd", "moved_v4"])?;
    assert!(!set.contains("203.0.113.30"), "{set}");
    assert_eq!(
        lab.udp_via(1, v4(30, ECHO_PORT), None, None)?,
        "isp1",
        "no longer matched"
    );
    Ok(())
}

/// A set listed with IPv4 elements only compiled its rules for IPv4: an IPv6 element added
/// through the API (`uplinkctl set add`) was accepted and matched nothing. Rules using a
/// set now match both families.
#[test]
fn an_api_added_element_of_the_other_family_matches() -> anyhow::Result<()> {
    let mut lab = Lab::build("setfam", two(), 1, 1)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "{POLICIES}\n[[rule]]\nname = \"saas\"\ndst = [\"@saas\"]\npolicy = \"via2\"\n{api}"
        )
        .replace(
            "\"203.0.113.30\", \"2001:db8:ffff::30\"",
            "\"203.0.113.30\"",
        ),
    )?;
    let v6 = SocketAddr::new("2001:db8:ffff::31".parse()?, ECHO_PORT);
    lab.serve_udp(v6)?;
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(
        lab.udp_via(1, v6, None, None)?,
        "isp1",
        "not in the set yet"
    );
    let (code, _, err) = lab.ctl("op", &["set", "add", "saas", "2001:db8:ffff::31"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        lab.udp_via(1, v6, None, None)?,
        "isp2",
        "the rule matches it now"
    );
    Ok(())
}

/// Flows of a `policy = "main"` rule were classified on every packet (nothing marked
/// them): a reload that removed the rule sent the running flow out of the client's home
/// uplink with its old NAT source, and the ISP dropped it. Established connections are no
/// longer classified: the flow stays on main, new ones take the home.
#[test]
fn a_running_main_flow_survives_the_removal_of_its_rule() -> anyhow::Result<()> {
    let mut lab = Lab::build("mainflow", two(), 1, 0)?;
    let rule = "\n[[rule]]\nname = \"vpn\"\ndst = [\"203.0.113.40/32\"]\npolicy = \"main\"\n";
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{rule}{api}"))?;
    lab.serve_udp(v4(40, ECHO_PORT))?;
    // main's default route: isp2; the client's home is isp1.
    lab.gw(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "100.64.2.1",
        "dev",
        "wan2",
    ])?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let flow = uplink_tests::in_netns(&lab.ns("c1"), || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.connect(v4(40, ECHO_PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok::<_, std::io::Error>(s)
    })??;
    let seen = |s: &std::net::UdpSocket| -> anyhow::Result<Option<String>> {
        Ok(uplink_tests::echo_source(s, 5)?.and_then(|a| lab.uplink_of_source(a)))
    };
    assert_eq!(seen(&flow)?.as_deref(), Some("isp2"), "main's route");
    lab.edit_config(rule, "")?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        seen(&flow)?.as_deref(),
        Some("isp2"),
        "the running flow stays where it started"
    );
    assert_eq!(
        lab.udp_via(1, v4(40, ECHO_PORT), None, None)?,
        "isp1",
        "a new flow takes the home"
    );
    Ok(())
}
