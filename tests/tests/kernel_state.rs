//! Drift repair, ownership, and uplink interfaces that come and go.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use uplink_tests::{Lab, client_v4, two_uplinks};

/// Which client (1 or 2) is on `uplink`.
fn client_on(lab: &Lab, uplink: &str) -> anyhow::Result<u32> {
    let assigned = lab.assignments()?;
    (1..=2)
        .find(|i| assigned.get(&client_v4(*i).into()).map(String::as_str) == Some(uplink))
        .ok_or_else(|| anyhow::anyhow!("no client on {uplink}: {assigned:?}"))
}

/// What the drift test compares across resyncs: nft rules (chain, handle), ip rules,
/// routes, and the number of client elements.
type KernelView = (Vec<(String, u64)>, String, String, usize);

/// Test 5: deleting the table, one rule and one route is each repaired within the resync
/// interval, and traffic flows again.
#[test]
fn drift_is_repaired_within_resync_interval() -> anyhow::Result<()> {
    let mut lab = Lab::build("drift", two_uplinks(), 2, 0)?;
    lab.write_config("2s", "10m", "")?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let c2 = client_on(&lab, "isp2")?;
    // Resyncs of an unchanged kernel change nothing (no churn of rules, routes or
    // elements): after the first one (it drops the stale rules the placements left in
    // `unassigned`, by design), two more happen (the apply count moves), and every nft
    // rule keeps its handle, the ip rules, routes and elements stay as they were.
    let kernel = || -> anyhow::Result<KernelView> {
        let v: serde_json::Value = serde_json::from_str(
            &lab.gw(&["nft", "-j", "-a", "list", "table", "inet", "uplinkd"])?,
        )?;
        let handles = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| {
                Some((
                    i["rule"]["chain"].as_str()?.to_string(),
                    i["rule"]["handle"].as_u64()?,
                ))
            })
            .collect();
        Ok((
            handles,
            lab.gw(&["ip", "rule", "show"])?,
            // uplinkd's routes only: the kernel's own (a LAN port's link-local address
            // after DAD) come and go on their own.
            lab.gw(&["ip", "-4", "route", "show", "table", "all", "proto", "171"])?
                + &lab.gw(&["ip", "-6", "route", "show", "table", "all", "proto", "171"])?,
            lab.kernel_map("client4")?.len(),
        ))
    };
    let applies = || -> anyhow::Result<f64> {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_apply_duration_seconds_count")
            .copied()
            .unwrap_or(0.0))
    };
    let n = applies()?;
    lab.wait_for(Duration::from_secs(10), "a first resync", || {
        Ok(applies()? >= n + 1.0)
    })?;
    let (before, n0) = (kernel()?, applies()?);
    lab.wait_for(Duration::from_secs(10), "two resyncs", || {
        Ok(applies()? >= n0 + 2.0)
    })?;
    assert_eq!(
        kernel()?,
        before,
        "a resync of an unchanged kernel changed something:\n{}",
        lab.log_tail(10)
    );
    let bound = Duration::from_secs(2) + Duration::from_millis(1500);

    let repaired =
        |what: &str, check: &dyn Fn() -> anyhow::Result<bool>| -> anyhow::Result<Duration> {
            let t = Instant::now();
            lab.wait_for(bound, what, check)?;
            Ok(t.elapsed())
        };

    lab.gw(&["nft", "delete", "table", "inet", "uplinkd"])?;
    repaired("nft table re-created with its elements", &|| {
        Ok(lab.kernel_map("client4")?.len() == 2)
    })?;

    lab.gw(&[
        "ip",
        "rule",
        "del",
        "pref",
        "10001",
        "fwmark",
        "0x2000000/0x3f000000",
        "lookup",
        "1002",
    ])?;
    repaired("fwmark rule for isp2", &|| {
        Ok(lab
            .gw(&["ip", "rule", "show"])?
            .contains("fwmark 0x2000000/0x3f000000 lookup 1002"))
    })?;

    lab.gw(&["ip", "route", "del", "default", "table", "1002"])?;
    repaired("default route of table 1002", &|| {
        Ok(lab
            .gw(&["ip", "route", "show", "table", "1002"])?
            .contains("default via 100.64.2.1"))
    })?;

    let seen = lab.probe(c2, false, 10)?;
    assert_eq!(lab.uplink_of_source(seen).as_deref(), Some("isp2"));
    Ok(())
}

/// The foreign state a test plants: an nft table, ip rules (one inside uplinkd's priority
/// band) and routes in other tables.
fn plant_foreign(lab: &Lab) -> anyhow::Result<()> {
    lab.gw(&["nft", "add", "table", "inet", "foreign"])?;
    lab.gw(&[
        "nft",
        "add",
        "chain",
        "inet",
        "foreign",
        "pre",
        "{ type filter hook prerouting priority -300; policy accept; }",
    ])?;
    lab.gw(&[
        "nft",
        "add",
        "set",
        "inet",
        "foreign",
        "s",
        "{ type ipv4_addr; elements = { 192.0.2.1 } }",
    ])?;
    lab.gw(&[
        "nft", "add", "rule", "inet", "foreign", "pre", "ip", "saddr", "@s", "counter",
    ])?;
    lab.gw(&[
        "ip", "rule", "add", "pref", "500", "fwmark", "0x1/0x1", "lookup", "100",
    ])?;
    lab.gw(&[
        "ip",
        "rule",
        "add",
        "pref",
        "10050",
        "from",
        "192.0.2.0/24",
        "lookup",
        "101",
    ])?;
    lab.gw(&[
        "ip",
        "-6",
        "rule",
        "add",
        "pref",
        "10001",
        "from",
        "2001:db8:ff::/48",
        "lookup",
        "101",
    ])?;
    lab.gw(&[
        "ip",
        "route",
        "add",
        "192.0.2.0/24",
        "via",
        "100.64.1.1",
        "table",
        "100",
    ])?;
    lab.gw(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "100.64.2.1",
        "table",
        "101",
    ])?;
    lab.gw(&[
        "ip",
        "-6",
        "route",
        "add",
        "2001:db8:ff::/48",
        "via",
        "2001:db8:100:1::1",
        "table",
        "100",
    ])?;
    lab.gw(&[
        "ip",
        "route",
        "add",
        "192.0.2.128/25",
        "via",
        "100.64.1.1",
        "proto",
        "static",
    ])?;
    Ok(())
}

fn foreign_snapshot(lab: &Lab) -> anyhow::Result<String> {
    let mut s = lab.gw(&["nft", "-j", "list", "table", "inet", "foreign"])?;
    for args in [
        &["ip", "rule", "show"][..],
        &["ip", "-6", "rule", "show"],
        &["ip", "route", "show", "table", "100"],
        &["ip", "route", "show", "table", "101"],
        &["ip", "-6", "route", "show", "table", "100"],
        &["ip", "route", "show", "table", "main"],
        &["ip", "-6", "route", "show", "table", "main"],
    ] {
        let out = lab.gw(args)?;
        // uplinkd's own rules are not part of the foreign state.
        s += &out
            .lines()
            .filter(|l| !l.contains("proto 171"))
            .collect::<Vec<_>>()
            .join("\n");
    }
    Ok(s)
}

/// Test 6: foreign tables, rules and routes are byte-identical after start, reconcile,
/// restart and cleanup; cleanup removes exactly uplinkd's objects.
#[test]
fn foreign_state_survives_everything() -> anyhow::Result<()> {
    let mut lab = Lab::build("own", two_uplinks(), 2, 0)?;
    plant_foreign(&lab)?;
    let before = foreign_snapshot(&lab)?;
    lab.write_config("1s", "10m", "")?;
    lab.start_agent()?;
    lab.probe(1, false, 10)?;
    assert_eq!(foreign_snapshot(&lab)?, before, "after start");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(foreign_snapshot(&lab)?, before, "after resyncs");
    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(foreign_snapshot(&lab)?, before, "after restart");
    lab.stop_agent("TERM")?;
    assert!(
        lab.gw(&["nft", "list", "tables"])?.contains("uplinkd"),
        "SIGTERM leaves the dataplane in place"
    );

    lab.uplinkd_cleanup()?;
    assert_eq!(foreign_snapshot(&lab)?, before, "after cleanup");
    assert!(!lab.gw(&["nft", "list", "tables"])?.contains("uplinkd"));
    assert!(!lab.gw(&["ip", "rule", "show"])?.contains("proto 171"));
    assert!(!lab.gw(&["ip", "-6", "rule", "show"])?.contains("proto 171"));
    for t in ["1001", "1002"] {
        assert_eq!(lab.gw(&["ip", "route", "show", "table", t])?, "");
        assert_eq!(lab.gw(&["ip", "-6", "route", "show", "table", t])?, "");
    }
    // The foreign rule inside uplinkd's priority band was never uplinkd's.
    assert!(
        lab.gw(&["ip", "rule", "show"])?
            .contains("10050:\tfrom 192.0.2.0/24 lookup 101")
    );
    Ok(())
}

/// `uplinkd cleanup` beside a running agent (the package's prerm on a node whose pod runs
/// uplinkd) took no lock and deleted the agent's table: it now refuses, naming the agent's
/// pid, and the agent's clients keep their routes.
#[test]
fn cleanup_refuses_while_an_agent_runs() -> anyhow::Result<()> {
    let mut lab = Lab::build("cleanlock", two_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let pid = lab.agent_pid().expect("running");
    let (code, _, err) = uplink_tests::outcome(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.ns("gw")])
            .arg(uplink_tests::uplinkd_bin())
            .arg("--config")
            .arg(lab.config_path())
            .arg("cleanup"),
    )?;
    assert_ne!(code, 0, "cleanup beside a running agent fails: {err}");
    assert!(
        err.contains(&format!("another uplinkd (pid {pid})")),
        "names the agent: {err}"
    );
    assert!(lab.gw(&["nft", "list", "tables"])?.contains("inet uplinkd"));
    assert!(lab.gw(&["ip", "rule", "show"])?.contains("proto 171"));
    let seen = lab.probe(1, false, 10)?;
    assert!(
        lab.uplink_of_source(seen).is_some(),
        "c1 still routed: {seen}"
    );
    Ok(())
}

fn recreate_wan2(lab: &Lab) -> anyhow::Result<()> {
    let (gw, isp2) = (lab.ns("gw"), lab.ns("isp2"));
    uplink_tests::sh(&[
        "ip", "-n", &isp2, "link", "add", "cpe", "type", "veth", "peer", "name", "wan2", "netns",
        &gw,
    ])?;
    uplink_tests::sh(&[
        "ip",
        "-n",
        &isp2,
        "addr",
        "add",
        "100.64.2.1/24",
        "dev",
        "cpe",
    ])?;
    uplink_tests::sh(&["ip", "-n", &isp2, "link", "set", "cpe", "up"])?;
    lab.gw(&["ip", "addr", "add", "100.64.2.2/24", "dev", "wan2"])?;
    lab.gw(&["ip", "link", "set", "wan2", "up"])?;
    Ok(())
}

/// Test 7: an uplink interface that appears after start becomes usable; deleted and
/// recreated (new ifindex, as on a PPP redial) it gets its routes back.
#[test]
fn uplink_interface_appears_and_is_recreated() -> anyhow::Result<()> {
    let mut lab = Lab::build("ifc", two_uplinks(), 2, 0)?;
    lab.gw(&["ip", "link", "del", "wan2"])?;
    lab.write_config("60s", "10m", "[failover]\nfailback_delay = \"0s\"\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert!(
        assigned.values().all(|u| u == "isp1"),
        "new clients avoid the missing uplink: {assigned:?}"
    );
    assert!(
        !lab.gw(&["ip", "route", "show", "table", "all"])?
            .contains("table 1002"),
        "no route while wan2 is missing"
    );

    // The resync interval is 60 s: only the link event can bring the route in time.
    recreate_wan2(&lab)?;
    lab.wait_for(Duration::from_secs(5), "route via the new wan2", || {
        Ok(lab
            .gw(&["ip", "route", "show", "table", "1002"])?
            .contains("dev wan2"))
    })?;
    // Usable: the next client goes to it (the least loaded) and leaves through it.
    lab.add_client(3, false)?;
    lab.probe(3, false, 10)?;
    let c3: std::net::IpAddr = client_v4(3).into();
    lab.wait_for(Duration::from_secs(5), "c3 assigned", || {
        Ok(lab.assignments()?.contains_key(&c3))
    })?;
    assert_eq!(lab.assignments()?[&c3], "isp2");
    // Replies are counted by the input interface's index: the chain follows the new one.
    let replies = || -> anyhow::Result<u64> {
        let out = lab.gw(&["nft", "list", "counter", "inet", "uplinkd", "reply4.wan2"])?;
        let n = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .ok_or_else(|| anyhow::anyhow!("no packet count in {out}"))?;
        Ok(n.parse()?)
    };
    let before = replies()?;
    let seen = lab.probe(3, false, 10)?;
    assert_eq!(lab.uplink_of_source(seen).as_deref(), Some("isp2"));
    assert!(replies()? > before, "the answer counted as a reply on wan2");

    let old_index = lab.gw(&["cat", "/sys/class/net/wan2/ifindex"])?;
    lab.gw(&["ip", "link", "del", "wan2"])?;
    recreate_wan2(&lab)?;
    assert_ne!(lab.gw(&["cat", "/sys/class/net/wan2/ifindex"])?, old_index);
    lab.wait_for(
        Duration::from_secs(5),
        "route via the recreated wan2",
        || {
            Ok(lab
                .gw(&["ip", "route", "show", "table", "1002"])?
                .contains("dev wan2"))
        },
    )?;
    let before = replies()?;
    let seen = lab.probe(3, false, 10)?;
    assert_eq!(lab.uplink_of_source(seen).as_deref(), Some("isp2"));
    assert!(
        replies()? > before,
        "the answer counted as a reply on the recreated wan2"
    );
    Ok(())
}

/// A LAN bridge whose MAC follows its ports (no address set) is named in a warning at
/// start; the lab's own bridge, which has a fixed MAC, is not. Setting one and reloading
/// quiets it.
#[test]
fn lan_bridge_without_fixed_mac_is_reported() -> anyhow::Result<()> {
    let mut lab = Lab::build("brmac", two_uplinks(), 0, 0)?;
    lab.gw(&["ip", "link", "add", "br-guest", "type", "bridge"])?;
    lab.write_config("10s", "10m", "")?;
    let config = std::fs::read_to_string(lab.config_path())?;
    let two_lans = config.replace(
        "interfaces = [\"br-lan\"]",
        "interfaces = [\"br-lan\", \"br-guest\"]",
    );
    assert_ne!(config, two_lans, "the lab's [lan] line changed");
    std::fs::write(lab.config_path(), two_lans)?;
    lab.start_agent()?;
    let warnings = |lab: &Lab| -> Vec<String> {
        lab.log_tail(1000)
            .lines()
            .filter(|l| l.contains("LAN bridge without a fixed MAC address"))
            .map(str::to_string)
            .collect()
    };
    let first = warnings(&lab);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].contains("br-guest"), "{}", first[0]);
    lab.gw(&[
        "ip",
        "link",
        "set",
        "br-guest",
        "address",
        "02:00:00:00:00:02",
    ])?;
    lab.signal_agent("HUP")?;
    lab.wait_for(Duration::from_secs(5), "reload", || {
        Ok(lab.log_tail(20).contains("config reloaded"))
    })?;
    assert_eq!(
        warnings(&lab).len(),
        1,
        "no new warning once the MAC is fixed"
    );
    Ok(())
}

/// A map element deleted behind the agent's back comes back with the full resync
/// (agent.full_resync_interval); the frequent resync reads only the table's structure, so
/// it costs the same at 100k clients as at 10.
#[test]
fn a_deleted_element_is_repaired_by_the_full_resync() -> anyhow::Result<()> {
    let mut lab = Lab::build("elemdrift", two_uplinks(), 1, 0)?;
    lab.write_config("1s", "10m", "")?;
    let text = std::fs::read_to_string(lab.config_path())?.replace(
        "resync_interval = \"1s\"\n",
        "resync_interval = \"1s\"\nfull_resync_interval = \"3s\"\n",
    );
    std::fs::write(lab.config_path(), text)?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let c1 = client_v4(1);
    let home = lab.kernel_map("client4")?[&c1.into()].clone();
    let set = format!("client4.{}", home.trim_start_matches("home_"));
    lab.gw(&[
        "nft",
        "delete",
        "element",
        "inet",
        "uplinkd",
        &set,
        &format!("{{ {c1} }}"),
    ])?;
    assert!(!lab.kernel_map("client4")?.contains_key(&c1.into()));
    lab.wait_for(Duration::from_secs(8), "the element back", || {
        Ok(lab.kernel_map("client4")?.contains_key(&c1.into()))
    })?;
    Ok(())
}

/// A resync repaired the plan from a fresh dump but not health: a carrier loss whose event
/// the kernel dropped (the agent's socket overran) left the uplink up, its clients on a
/// dead link, until some later event. The agent is stopped, a flood of neighbour events
/// on an unrelated interface fills its socket, isp1's carrier goes, and the agent resumes:
/// the overrun's resync judges isp1 down from the dump.
#[test]
fn health_agrees_with_the_kernel_after_an_overrun() -> anyhow::Result<()> {
    let mut lab = Lab::build("overrun", two_uplinks(), 0, 0)?;
    lab.write_config("10m", "10m", "")?;
    lab.start_agent()?;
    assert_eq!(lab.uplink_up("isp1")?, Some(1.0));
    // No dummy driver on these machines: a veth pair stands in for an unrelated link.
    lab.gw(&[
        "ip", "link", "add", "flood0", "type", "veth", "peer", "name", "flood1",
    ])?;
    lab.gw(&["ip", "link", "set", "flood0", "up"])?;
    lab.gw(&["ip", "link", "set", "flood1", "up"])?;
    lab.signal_agent("STOP")?;
    // 150,000 neighbour events: more than the agent's socket buffer holds (32 MB forced,
    // which the kernel doubles, at about 700 bytes an event).
    let batch = lab.dir.join("flood.batch");
    let mut text = String::new();
    for i in 0..150_000u32 {
        let b = i.to_be_bytes();
        text += &format!(
            "neigh add 100.{}.{}.{} lladdr 02:99:00:{:02x}:{:02x}:{:02x} dev flood0 nud permanent\n",
            80 + b[1],
            b[2],
            b[3],
            b[1],
            b[2],
            b[3]
        );
    }
    std::fs::write(&batch, text)?;
    lab.gw(&["ip", "-batch", batch.to_str().expect("utf-8")])?;
    lab.carrier("isp1", false)?;
    lab.signal_agent("CONT")?;
    lab.wait_for(
        Duration::from_secs(20),
        "isp1 down after the overrun's resync",
        || Ok(lab.uplink_up("isp1")? == Some(0.0)),
    )?;
    Ok(())
}

/// uplinkd reads its table back over netlink (nft fetches every element of a table to
/// list any part of it): that reading equals the one of nft's own listing, element for
/// element (client sets of both families, the sticky map's marks, a pin), rule for rule,
/// and the rule and accounting counters are nft's.
#[test]
fn the_netlink_reading_of_the_table_equals_nfts_listing() -> anyhow::Result<()> {
    use std::path::Path;
    use uplinkd::dataplane::nft::{NftDriver, parse_listing};
    let mut lab = Lab::build("nlread", two_uplinks(), 2, 1)?;
    let rule = format!(
        "\n[[policy]]\nname = \"via1\"\nuplinks = [\"isp1\"]\nbalance = \"failover\"\n\n[[rule]]\nname = \"echo\"\nproto = \"udp\"\ndport = [{}]\npolicy = \"via1\"\n",
        uplink_tests::ECHO_PORT
    );
    lab.write_config("10m", "10m", &rule)?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let to = std::net::SocketAddr::from((uplink_tests::SERVER4, uplink_tests::ECHO_PORT));
    assert!(lab.send_udp(1, to, None, None, 10)?.is_some(), "no echo");
    // A quiet table: the agent stopped (its table stays), nothing crosses the gateway.
    lab.stop_agent("TERM")?;
    // A pin, and a sticky mark (the map holds uplinks past the fourth only), to be read.
    for (map, elem) in [
        ("pin4", "{ 198.51.100.7 : goto home_isp2 }"),
        ("sticky", "{ 0x05000000 : goto keep_isp2 }"),
    ] {
        lab.gw(&["nft", "add", "element", "inet", "uplinkd", map, elem])?;
    }
    let (read, structure, counters, rules) = uplink_tests::in_netns(&lab.ns("gw"), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let d = NftDriver::new(Path::new("nft"), "uplinkd", Duration::from_secs(5));
            (
                d.read().await,
                d.read_structure().await,
                d.counters().await,
                d.rule_counters().await,
            )
        })
    })?;
    let listing = lab.gw(&["nft", "-j", "list", "table", "inet", "uplinkd"])?;
    let want = parse_listing(&listing)?;
    let read = read?.expect("the table exists");
    assert_eq!(read, want, "netlink and nft read the table differently");
    let v6 = read
        .elements
        .keys()
        .any(|k| matches!(k, uplinkd::plan::ElemKey::V6(_)));
    let marks: Vec<_> = read
        .elements
        .iter()
        .filter(|(k, _)| matches!(k, uplinkd::plan::ElemKey::Mark(_)))
        .collect();
    let pin = uplinkd::plan::ElemKey::Pin4("198.51.100.7".parse()?);
    assert!(v6, "{:?}", read.elements);
    assert_eq!(format!("{marks:?}"), r#"[(Mark(83886080), "keep_isp2")]"#);
    assert_eq!(read.elements.get(&pin).map(|t| &**t), Some("home_isp2"));
    let structure = structure?.expect("the table exists");
    assert_eq!(structure.elements.len(), 0);
    assert_eq!(structure.unassigned, read.unassigned);
    // nft's counters, read from the same listing.
    let v: serde_json::Value = serde_json::from_str(
        &lab.gw(&["nft", "-j", "list", "counters", "table", "inet", "uplinkd"])?,
    )?;
    let counters = counters?;
    // Per interface: out; in (all three kinds); reply packets per family.
    type OutInReplies = ((u64, u64), (u64, u64), (u64, u64));
    let mut want: BTreeMap<String, OutInReplies> = BTreeMap::new();
    for c in v["nftables"].as_array().into_iter().flatten() {
        let c = &c["counter"];
        let (Some(name), Some(p), Some(b)) = (
            c["name"].as_str(),
            c["packets"].as_u64(),
            c["bytes"].as_u64(),
        ) else {
            continue;
        };
        let (kind, iface) = name.split_once('.').expect("kind.interface");
        let w = want.entry(iface.to_string()).or_default();
        match kind {
            "tx" => w.0 = (p, b),
            "rx" | "reply4" | "reply6" => {
                w.1.0 += p;
                w.1.1 += b;
                match kind {
                    "reply4" => w.2.0 = p,
                    "reply6" => w.2.1 = p,
                    _ => {}
                }
            }
            other => panic!("unknown counter kind {other} in {name}"),
        }
    }
    assert!(want.len() >= 2, "{v}");
    for (iface, (tx, rx, replies)) in &want {
        let t = counters.get(iface).copied().unwrap_or_default();
        assert_eq!(
            (t.tx, t.rx, t.replies),
            (*tx, *rx, *replies),
            "counters of {iface}"
        );
    }
    assert!(want["wan1"].2.0 > 0, "echo replies counted: {v}");
    assert!(counters["wan1"].tx.0 > 0, "{counters:?}");
    let echo = rules?.get("echo").copied().unwrap_or_default();
    assert!(echo.0 > 0, "the rule's counter moved: {echo:?}");
    assert_eq!(
        echo.0,
        uplink_tests::nft_chain_packets(&lab.ns("gw"), "inet", "uplinkd", "rule_echo")?
    );
    Ok(())
}
