//! Health and failover on the real dataplane: carrier cuts, silent upstream failures,
//! conntrack, failback, tiers, dampening, all-down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use uplink_tests::{Lab, TcpFlow, UdpStream, UplinkSpec, client_v4, two_uplinks};

fn clients_on(assigned: &BTreeMap<IpAddr, String>, uplink: &str) -> Vec<u32> {
    (1..=64)
        .filter(|i| {
            assigned
                .get(&IpAddr::from(client_v4(*i)))
                .map(String::as_str)
                == Some(uplink)
        })
        .collect()
}

/// Tests 1 and 5: a carrier cut moves the dead uplink's clients over the survivors by
/// weight, deletes exactly the dead uplink's conntrack entries, and leaves healthy clients,
/// their flows and an established TCP connection alone.
#[test]
fn carrier_cut_moves_only_the_dead_uplinks_clients() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("isp3", 1, false),
    ];
    let mut lab = Lab::build("cut", uplinks, 12, 0)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"60s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let (dead, healthy): (Vec<u32>, Vec<u32>) =
        (1..=12).partition(|i| assigned[&IpAddr::from(client_v4(*i))] == "isp1");
    assert_eq!(dead.len(), 6);

    let mut tcp = TcpFlow::connect(&lab, healthy[0])?;
    let tcp_uplink = lab.uplink_of_source(tcp.exchange()?).expect("lab uplink");
    let streams: Vec<(u32, UdpStream)> = healthy
        .iter()
        .map(|&i| {
            Ok((
                i,
                UdpStream::start(&lab, i, false, Duration::from_millis(20))?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    std::thread::sleep(Duration::from_millis(300));
    let before = [lab.ct_entries(1)?, lab.ct_entries(2)?, lab.ct_entries(3)?];
    assert!(
        !before[0].is_empty(),
        "the dead uplink's clients have flows"
    );

    lab.carrier("isp1", false)?;
    lab.wait_for(
        Duration::from_secs(5),
        "isp1's conntrack entries gone",
        || Ok(lab.ct_entries(1)?.is_empty()),
    )?;
    assert_eq!(
        lab.ct_entries(2)?,
        before[1],
        "flows on a healthy uplink untouched"
    );
    assert_eq!(
        lab.ct_entries(3)?,
        before[2],
        "flows on a healthy uplink untouched"
    );

    let mut used = BTreeSet::new();
    for &i in &dead {
        let u = lab.via(i)?;
        assert_ne!(u, "isp1", "c{i} still leaves by the dead uplink");
        used.insert(u);
    }
    assert_eq!(
        used.len(),
        2,
        "isp1's clients are spread over both survivors"
    );
    for &i in &healthy {
        assert_eq!(
            lab.via(i)?,
            assigned[&IpAddr::from(client_v4(i))],
            "c{i} on a healthy uplink kept it"
        );
    }
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).expect("lab uplink"),
        tcp_uplink,
        "the established TCP connection survives"
    );
    for (i, s) in streams {
        let r = s.finish()?;
        assert_eq!(
            r.received, r.sent,
            "c{i}'s flow on a healthy uplink lost datagrams"
        );
        assert_eq!(r.seen.len(), 1);
    }
    assert!(
        lab.log_tail(100)
            .contains("failover of isp1: 6 clients moved"),
        "{}",
        lab.log_tail(30)
    );
    Ok(())
}

/// Two uplinks probed by ICMP to the internet host, two clients greeted, immediate
/// failback; returns the lab and a client on isp1.
fn probed_lab(tag: &str) -> anyhow::Result<(Lab, u32)> {
    let mut lab = Lab::build(tag, uplink_tests::probed_uplinks(), 2, 0)?;
    lab.write_api_config("")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];
    // Let the first probe rounds settle.
    std::thread::sleep(Duration::from_millis(500));
    Ok((lab, c))
}

/// Test 2: a silent upstream failure (the ISP drops forwarded packets, carrier up) is
/// found by the probes and the clients move; when the ISP recovers they come back. No LAN
/// traffic crosses isp1 during the cut (the wait reads the API), so the probes, not the
/// traffic's evidence, are what judge it.
#[test]
fn silent_upstream_failure_is_detected_by_probes() -> anyhow::Result<()> {
    let (lab, c) = probed_lab("silent")?;
    assert_eq!(lab.via(c)?, "isp1");

    lab.upstream_loss("isp1", 100)?;
    lab.wait_for(Duration::from_secs(5), "isp1 down", || {
        Ok(lab.down_reason("isp1")?.is_some())
    })?;
    assert_eq!(
        lab.down_reason("isp1")?.as_deref(),
        Some("3 failed probe rounds, and a probe burst failed too")
    );
    assert_eq!(lab.via(c)?, "isp2");
    lab.upstream_loss("isp1", 0)?;
    lab.wait_via(c, "isp1", Duration::from_secs(5))?;
    Ok(())
}

/// Test 4: automatic failback waits for the delay; a TCP connection opened on the backup
/// keeps working on the backup after the failback.
#[test]
fn auto_failback_after_delay_keeps_backup_flows() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("fb", uplinks, 2, 2)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"3s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];

    lab.carrier("isp1", false)?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;
    assert_eq!(
        lab.uplink_of_source(lab.probe(c, true, 10)?).as_deref(),
        Some("isp2"),
        "IPv6 fails over too"
    );
    let mut tcp = TcpFlow::connect(&lab, c)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp2")
    );

    lab.carrier("isp1", true)?;
    let restored = Instant::now();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(lab.via(c)?, "isp2", "no failback before the delay");
    lab.wait_via(c, "isp1", Duration::from_secs(8))?;
    assert!(
        restored.elapsed() >= Duration::from_millis(2500),
        "failback came after {:?}, before the 3 s delay",
        restored.elapsed()
    );
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp2"),
        "the flow opened on the backup stays there"
    );
    assert!(
        lab.log_tail(50)
            .contains("failback to isp1: 1 clients returned"),
        "{}",
        lab.log_tail(20)
    );
    Ok(())
}

/// `failback_flows = "move"`: once the home uplink is back, the failback deletes the
/// connections its failover placed on the backup, so that a long-running UDP flow and a
/// TCP connection leave the backup and continue (or, for TCP, are reset) through the home;
/// the backup's own client's flow is not touched.
#[test]
fn failback_with_move_brings_the_flows_home() -> anyhow::Result<()> {
    let mut lab = Lab::build("fbmove", two_uplinks(), 2, 0)?;
    lab.write_config(
        "10s",
        "10m",
        "[failover]\nfailback_delay = \"1s\"\nfailback_flows = \"move\"\n",
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];
    let d = clients_on(&assigned, "isp2")[0];
    let (c_src, d_src) = (
        format!("src={} ", client_v4(c)),
        format!("src={} ", client_v4(d)),
    );
    let of = |entries: &BTreeSet<String>, src: &str| -> BTreeSet<String> {
        entries
            .iter()
            .filter(|e| e.starts_with(src))
            .cloned()
            .collect()
    };

    lab.carrier("isp1", false)?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;
    let moved = UdpStream::start(&lab, c, false, Duration::from_millis(20))?;
    let own = UdpStream::start(&lab, d, false, Duration::from_millis(20))?;
    let mut tcp = TcpFlow::connect(&lab, c)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp2")
    );
    lab.wait_for(Duration::from_secs(5), "both streams on isp2", || {
        let on2 = lab.ct_entries(2)?;
        Ok(of(&on2, &c_src).len() >= 2 && !of(&on2, &d_src).is_empty())
    })?;
    let own_before = of(&lab.ct_entries(2)?, &d_src);

    lab.carrier("isp1", true)?;
    // c's flows leave isp2 and its UDP flow continues through isp1.
    lab.wait_for(Duration::from_secs(10), "c's flows moved home", || {
        Ok(of(&lab.ct_entries(2)?, &c_src).is_empty()
            && !of(&lab.ct_entries(1)?, &c_src).is_empty())
    })?;
    assert!(
        lab.log_tail(80)
            .contains("deleted the flows the failover had placed on other uplinks"),
        "{}",
        lab.log_tail(30)
    );
    // The TCP connection's next segment leaves by isp1 with isp1's address, which the
    // server never saw: it resets the connection. A new one goes home.
    assert!(
        tcp.exchange().is_err(),
        "the connection was moved off the backup"
    );
    let mut again = TcpFlow::connect(&lab, c)?;
    assert_eq!(
        lab.uplink_of_source(again.exchange()?).as_deref(),
        Some("isp1")
    );
    let moved = moved.finish()?;
    let own = own.finish()?;
    let via = |seen: &[IpAddr]| -> Vec<String> {
        seen.iter()
            .map(|a| lab.uplink_of_source(*a).unwrap_or_else(|| a.to_string()))
            .collect()
    };
    assert_eq!(
        via(&moved.seen),
        ["isp2", "isp1"],
        "the UDP flow went from the backup to the home"
    );
    assert_eq!(via(&own.seen), ["isp2"], "the backup's own client stayed");
    assert!(
        own_before.is_subset(&of(&lab.ct_entries(2)?, &d_src)),
        "the backup's own client's flow was not deleted"
    );
    Ok(())
}

/// A metered tier-2 backup: probed every `standby_interval` while it carries nothing, at
/// the normal interval from the moment a failover puts clients on it, and, with the
/// default `failback_flows = "keep"`, the flows placed on it leave it on failback.
#[test]
fn a_metered_backup_is_probed_lightly_and_its_flows_leave_on_failback() -> anyhow::Result<()> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("isp2", 1, false)
            .with(probe)
            .with("tier = 2\nmetered = true"),
    ];
    let mut lab = Lab::build("metered", uplinks, 1, 0)?;
    lab.write_config(
        "10s",
        "10m",
        "[metrics]\nlisten = \"127.0.0.1:9477\"\n[health]\nstandby_interval = \"1h\"\n[failover]\nfailback_delay = \"1s\"\n",
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(assigned[&IpAddr::from(client_v4(1))], "isp1");
    let key = |what: &str, u: &str| format!("uplinkd_uplink_{what}{{uplink=\"{u}\"}}");
    let rounds = |u: &str| -> anyhow::Result<f64> {
        Ok(lab
            .scrape(9477)?
            .get(&key("probe_rtt_seconds_count", u))
            .copied()
            .unwrap_or(0.0))
    };
    let pace = |u: &str| -> anyhow::Result<Option<f64>> {
        Ok(lab
            .scrape(9477)?
            .get(&key("probe_interval_seconds", u))
            .copied())
    };
    assert_eq!(pace("isp2")?, Some(3600.0), "the idle backup is on standby");
    assert_eq!(pace("isp1")?, Some(0.2));
    // While isp1 answers ten more rounds, the backup answers at most the one in flight.
    let (a0, b0) = (rounds("isp1")?, rounds("isp2")?);
    lab.wait_for(Duration::from_secs(10), "ten rounds of isp1", || {
        Ok(rounds("isp1")? >= a0 + 10.0)
    })?;
    assert!(
        rounds("isp2")? <= b0 + 1.0,
        "the standby was probed {} times meanwhile",
        rounds("isp2")? - b0
    );
    // Each answered ICMP probe costs an echo request and its reply: 2 × 41 IP bytes.
    let m = lab.scrape(9477)?;
    let bytes = m["uplinkd_probe_bytes_total{uplink=\"isp1\"}"];
    assert!(
        bytes >= 82.0 * (a0 + 10.0),
        "{bytes} probe bytes after {} answered probes",
        a0 + 10.0
    );

    lab.carrier("isp1", false)?;
    lab.wait_via(1, "isp2", Duration::from_secs(5))?;
    assert_eq!(
        pace("isp2")?,
        Some(0.2),
        "carrying clients, at the normal pace"
    );
    let b1 = rounds("isp2")?;
    lab.wait_for(Duration::from_secs(10), "ten rounds of the backup", || {
        Ok(rounds("isp2")? >= b1 + 10.0)
    })?;
    let stream = UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    let mine = |k: usize| lab.ct_count(k, 1);
    lab.wait_for(Duration::from_secs(5), "the flow on the backup", || {
        Ok(mine(2)? > 0)
    })?;

    lab.carrier("isp1", true)?;
    lab.wait_for(
        Duration::from_secs(10),
        "the flow left the metered backup",
        || Ok(mine(2)? == 0 && mine(1)? > 0),
    )?;
    let r = stream.finish()?;
    let via: Vec<Option<String>> = r.seen.iter().map(|a| lab.uplink_of_source(*a)).collect();
    assert_eq!(via, [Some("isp2".into()), Some("isp1".into())]);
    lab.wait_for(Duration::from_secs(5), "the backup back on standby", || {
        Ok(pace("isp2")? == Some(3600.0))
    })?;
    Ok(())
}

/// Test 4: with manual failback the clients stay on the backup after recovery.
#[test]
fn manual_failback_keeps_clients_on_the_backup() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("mfb", uplinks, 2, 0)?;
    lab.write_config(
        "10s",
        "10m",
        "[failover]\nfailback = \"manual\"\nfailback_delay = \"0s\"\n",
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];
    lab.carrier("isp1", false)?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;
    lab.carrier("isp1", true)?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lab.via(c)?, "isp2");
    assert_eq!(
        lab.assignments()?[&IpAddr::from(client_v4(c))],
        "isp1",
        "the home uplink is kept"
    );
    Ok(())
}

/// Test 6: the tier-2 uplink carries nothing while a tier-1 uplink is up, everyone when
/// both are down, and hands back when one returns.
#[test]
fn tier_two_carries_only_when_tier_one_is_down() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true).with("tier = 2"),
    ];
    let mut lab = Lab::build("tier", uplinks, 4, 0)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"0s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert!(
        assigned.values().all(|u| u != "lte"),
        "no home on tier 2: {assigned:?}"
    );

    lab.carrier("isp1", false)?;
    for i in clients_on(&assigned, "isp1") {
        lab.wait_via(i, "isp2", Duration::from_secs(5))?;
    }
    lab.carrier("isp2", false)?;
    for i in 1..=4 {
        lab.wait_via(i, "lte", Duration::from_secs(5))?;
    }
    lab.carrier("isp1", true)?;
    for i in 1..=4 {
        lab.wait_via(i, "isp1", Duration::from_secs(5))?;
    }
    Ok(())
}

/// Test 7: an uplink that flaps more than `max_flaps` times in the window is held down for
/// `hold`, then comes back.
#[test]
fn flapping_uplink_is_held_down() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("flap", uplinks, 2, 0)?;
    lab.write_config(
        "10s",
        "10m",
        "[failover]\nfailback_delay = \"0s\"\nmax_flaps = 5\nwindow = \"1m\"\nhold = \"4s\"\n",
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];
    for _ in 0..3 {
        lab.carrier("isp1", false)?;
        std::thread::sleep(Duration::from_millis(150));
        lab.carrier("isp1", true)?;
        std::thread::sleep(Duration::from_millis(150));
    }
    let held = Instant::now();
    lab.wait_for(Duration::from_secs(3), "hold", || {
        Ok(lab.log_tail(50).contains("held down for 4s"))
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(lab.via(c)?, "isp2", "held down although the link is up");
    lab.wait_via(c, "isp1", Duration::from_secs(8))?;
    assert!(
        held.elapsed() >= Duration::from_secs(3),
        "the hold ended after {:?}",
        held.elapsed()
    );
    Ok(())
}

/// Test 8: all uplinks down, then one back: no crash, assignments kept, traffic resumes
/// through the first healthy uplink.
#[test]
fn all_down_then_one_back() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("alldown", uplinks, 4, 0)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"60s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    lab.carrier("isp1", false)?;
    lab.carrier("isp2", false)?;
    lab.wait_for(Duration::from_secs(5), "all-down alarm", || {
        Ok(lab.log_tail(50).contains("ALL UPLINKS DOWN"))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    assert!(lab.agent_running());
    assert_eq!(lab.assignments()?, assigned, "assignments kept");
    lab.carrier("isp2", true)?;
    for i in 1..=4 {
        lab.wait_via(i, "isp2", Duration::from_secs(5))?;
    }
    assert_eq!(lab.assignments()?, assigned);
    Ok(())
}

/// Test 9: probes leave through their own uplink, even when another uplink is the main
/// table's default route.
#[test]
fn probes_leave_through_their_own_uplink() -> anyhow::Result<()> {
    let probe = "probes = [\"icmp:203.0.113.10\", \"tcp:203.0.113.10:9001\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("isp2", 1, false).with(probe),
    ];
    let mut lab = Lab::build("own", uplinks, 0, 0)?;
    lab.gw(&["ip", "route", "add", "default", "via", "100.64.2.1"])?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    std::thread::sleep(Duration::from_millis(600));
    // isp2 (the main default) goes silent: only isp2 may go down.
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(Duration::from_secs(5), "isp2 down", || {
        Ok(lab.log_tail(50).contains("uplink isp2 up -> down"))
    })?;
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !lab.log_tail(100).contains("uplink isp1 up -> down"),
        "isp1's probes went out through isp2:\n{}",
        lab.log_tail(20)
    );
    // And the other way round: isp1 silent while the main default works.
    lab.upstream_loss("isp2", 0)?;
    lab.upstream_loss("isp1", 100)?;
    lab.wait_for(Duration::from_secs(5), "isp1 down", || {
        Ok(lab.log_tail(50).contains("uplink isp1 up -> down"))
    })?;
    Ok(())
}

/// Test 10: a connection from the internet to a port forwarded through uplink 2 is
/// answered through uplink 2, although the LAN host's own uplink is uplink 1. The ISPs
/// drop foreign source addresses, so a reply out of the wrong uplink would never arrive.
#[test]
fn inbound_connections_are_answered_through_their_uplink() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("inbound", uplinks, 1, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(assigned[&IpAddr::from(client_v4(1))], "isp1");
    // A port forward on the gateway (the operator's own table) and a server on c1.
    lab.gw(&["nft", "add table ip portfwd { chain pre { type nat hook prerouting priority dstnat; iifname \"wan2\" tcp dport 8080 dnat to 198.19.0.11:9090; }; }"])?;
    let server = uplink_tests::in_netns(&lab.ns("c1"), || {
        std::net::TcpListener::bind("198.19.0.11:9090")
    })??;
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        if let Ok((conn, _)) = server.accept() {
            let mut w = conn.try_clone().expect("clone");
            for line in std::io::BufReader::new(conn).lines().map_while(Result::ok) {
                let _ = writeln!(w, "lan {line}");
            }
        }
    });
    let conn = uplink_tests::in_netns(&lab.ns("inet"), || {
        std::net::TcpStream::connect_timeout(
            &"100.64.2.2:8080".parse().unwrap(),
            Duration::from_secs(3),
        )
    })?;
    let conn = conn
        .map_err(|e| anyhow::anyhow!("connection through the port forward on isp2 failed: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    use std::io::{BufRead, Write};
    let mut w = conn.try_clone()?;
    writeln!(w, "hello")?;
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line)?;
    assert_eq!(line.trim(), "lan hello");

    // A service on the gateway itself, reached on uplink 2's address while the main table's
    // default points at uplink 1: the answer follows the address it was sent to.
    lab.gw(&["ip", "route", "add", "default", "via", "100.64.1.1"])?;
    let local = uplink_tests::in_netns(&lab.ns("gw"), || {
        std::net::TcpListener::bind("100.64.2.2:7070")
    })??;
    std::thread::spawn(move || {
        use std::io::Write;
        if let Ok((mut conn, _)) = local.accept() {
            let _ = writeln!(conn, "gateway");
        }
    });
    let conn = uplink_tests::in_netns(&lab.ns("inet"), || {
        std::net::TcpStream::connect_timeout(
            &"100.64.2.2:7070".parse().unwrap(),
            Duration::from_secs(3),
        )
    })?;
    let conn =
        conn.map_err(|e| anyhow::anyhow!("connection to the gateway's isp2 address failed: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut line = String::new();
    std::io::BufReader::new(conn).read_line(&mut line)?;
    assert_eq!(line.trim(), "gateway");
    Ok(())
}

/// Test 3: 10% random loss keeps the uplink up; 60% makes it degraded.
#[test]
fn partial_loss_up_then_degraded() -> anyhow::Result<()> {
    let probe =
        "probes = [\"icmp:203.0.113.10\", \"tcp:203.0.113.10:9001\", \"icmp:2001:db8:ffff::10\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("isp2", 1, false),
    ];
    let mut lab = Lab::build("loss", uplinks, 0, 0)?;
    // down_after 10: a round fails only when all three probes are lost (0.4³ at 40 %
    // loss), ten in a row practically never, so the verdict here is the loss ratio's.
    lab.write_config(
        "10s",
        "10m",
        "[health]\nmax_loss = 0.3\nstats_window = 60\ndown_after = 10\n\n[metrics]\nlisten = \"127.0.0.1:9477\"\n",
    )?;
    lab.start_agent()?;
    let gauge = |name: &str| -> anyhow::Result<f64> {
        Ok(lab.scrape(9477)?.get(name).copied().unwrap_or(f64::NAN))
    };
    let state = |s: &str| format!("uplinkd_uplink_state{{state=\"{s}\",uplink=\"isp1\"}}");
    let loss = "uplinkd_uplink_probe_loss_ratio{uplink=\"isp1\"}";
    lab.upstream_loss("isp1", 10)?;
    // The loss is measured (the window holds lost probes) and the uplink stays up: 10 %
    // is under max_loss.
    lab.wait_for(Duration::from_secs(15), "10% loss measured", || {
        Ok(gauge(loss)? >= 0.05)
    })?;
    assert_eq!(gauge(&state("up"))?, 1.0, "10% loss keeps isp1 up");
    lab.upstream_loss("isp1", 40)?;
    lab.wait_for(Duration::from_secs(20), "isp1 degraded", || {
        Ok(gauge(&state("degraded"))? == 1.0)
    })?;
    assert!(gauge(loss)? > 0.3, "degraded by its loss ratio");
    Ok(())
}

/// Test 11: a saturated uplink (a bulk download through a tbf-limited ISP link, probes
/// queued behind it) is not declared down.
#[test]
fn saturated_uplink_is_not_declared_down() -> anyhow::Result<()> {
    let mut lab = Lab::build("sat", uplink_tests::probed_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(assigned[&IpAddr::from(client_v4(1))], "isp1");
    lab.shape("isp1", "2mbit")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let conn = uplink_tests::in_netns(&lab.ns("c1"), || {
        std::net::TcpStream::connect((uplink_tests::SERVER4, uplink_tests::BULK_PORT))
    })??;
    // A stalled transfer (the uplink declared down, its flow deleted) must end the reader,
    // not hang the test.
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    let reader = std::thread::spawn(move || -> u64 {
        use std::io::{ErrorKind, Read};
        let mut conn = conn;
        let mut buf = [0u8; 65536];
        let mut total = 0u64;
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            match conn.read(&mut buf) {
                Ok(n) if n > 0 => total += n as u64,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                _ => break,
            }
        }
        total
    });
    std::thread::sleep(Duration::from_secs(6));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let bytes = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    let log = lab.log_tail(200);
    assert!(
        !log.contains("uplink isp1 up -> down"),
        "a saturated uplink was declared down:\n{log}"
    );
    // 2 Mbit/s for 6 s is about 1.5 MB: the link really was full.
    assert!(
        bytes > 1_000_000,
        "only {bytes} bytes: the uplink was not saturated"
    );
    Ok(())
}

/// Test 1, the other link events: admin down on the gateway's side and the uplink's
/// address going away each fail the uplink over at once; restoring brings it back.
#[test]
fn admin_down_and_address_loss_fail_over() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("linkev", uplinks, 2, 0)?;
    lab.write_config("60s", "10m", "[failover]\nfailback_delay = \"0s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c = clients_on(&assigned, "isp1")[0];

    lab.gw(&["ip", "link", "set", "wan1", "down"])?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;
    assert!(
        lab.log_tail(50).contains("interface admin down"),
        "{}",
        lab.log_tail(20)
    );
    lab.gw(&["ip", "link", "set", "wan1", "up"])?;
    lab.wait_via(c, "isp1", Duration::from_secs(5))?;

    lab.gw(&["ip", "addr", "del", "100.64.1.2/24", "dev", "wan1"])?;
    lab.gw(&[
        "ip", "-6", "addr", "flush", "dev", "wan1", "scope", "global",
    ])?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;
    assert!(
        lab.log_tail(50).contains("no address on interface"),
        "{}",
        lab.log_tail(20)
    );
    lab.gw(&["ip", "addr", "add", "100.64.1.2/24", "dev", "wan1"])?;
    lab.wait_via(c, "isp1", Duration::from_secs(5))?;
    Ok(())
}

/// Passive health: probe replies lost while the uplink visibly forwards traffic from the
/// internet (a saturated link dropping them) do not take it down; once that traffic stops,
/// the same probe loss does. A silent failure with traffic still flowing out is caught.
#[test]
fn lost_probes_do_not_take_down_an_uplink_that_carries_traffic() -> anyhow::Result<()> {
    let (lab, c) = probed_lab("passive")?;
    let isp1 = lab.ns("isp1");
    let nft = |cmd: &str| uplink_tests::sh(&["ip", "netns", "exec", &isp1, "nft", cmd]);
    // The ISP drops the probes' echo replies, and only those.
    nft(
        "add table inet probe_loss { chain f { type filter hook forward priority 0; oifname \"cpe\" icmp type echo-reply counter drop; }; }",
    )?;
    let mark = lab.log_len();
    let stream = UdpStream::start(&lab, c, false, Duration::from_millis(10))?;
    std::thread::sleep(Duration::from_secs(3));
    let log = lab.log_since(mark);
    assert!(
        !log.contains("uplink isp1 up -> down"),
        "an uplink carrying traffic was declared down:\n{log}"
    );
    let dropped = nft("list table inet probe_loss")?;
    assert!(
        !dropped.contains("counter packets 0 "),
        "the probe replies were not dropped:\n{dropped}"
    );
    let r = stream.finish()?;
    assert_eq!(r.received, r.sent, "the flow kept going");
    assert_eq!(r.seen.len(), 1);
    let metrics = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
    let excused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "uplinkd_uplink_probe_rounds_lost_while_forwarding_total{uplink=\"isp1\"} ",
            )
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(excused >= 1.0, "the excused rounds are counted: {excused}");
    // No traffic now: the same loss is a dead uplink.
    lab.wait_for(Duration::from_secs(5), "isp1 down once idle", || {
        Ok(lab.log_since(mark).contains("uplink isp1 up -> down"))
    })?;
    lab.wait_via(c, "isp2", Duration::from_secs(5))?;

    // Back up, then a silent failure (the ISP drops everything it forwards) while the
    // client keeps sending: nothing comes back, so the client's own traffic is the
    // evidence, and a burst confirms it.
    nft("delete table inet probe_loss")?;
    lab.wait_via(c, "isp1", Duration::from_secs(10))?;
    let mark = lab.log_len();
    let stream = UdpStream::start(&lab, c, false, Duration::from_millis(10))?;
    lab.upstream_loss("isp1", 100)?;
    lab.wait_for(
        Duration::from_secs(5),
        "isp1 down while the client sends",
        || {
            Ok(lab.log_since(mark).contains(
                "uplink isp1 up -> down: LAN traffic unanswered for 150ms and a probe burst failed",
            ))
        },
    )?;
    // Time for the flow to re-establish on isp2.
    std::thread::sleep(Duration::from_secs(1));
    let r = stream.finish()?;
    assert_eq!(r.seen.len(), 2, "the flow moved to isp2: {r:?}");
    Ok(())
}
