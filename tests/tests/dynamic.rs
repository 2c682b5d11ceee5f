//! Dynamic uplinks with real DHCP software: dnsmasq as the ISP's server, udhcpc and
//! dhclient as the gateway's clients (with the test's own scripts). `gateway = "auto"`
//! learns the next hop from the default route the client installs.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use uplink_tests::dhcp::{ClientKind, RouteTable, router};
use uplink_tests::{Lab, UplinkSpec, client_v4};

fn uplinks() -> Vec<UplinkSpec> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("isp2", 1, false).with(probe),
    ]
}

/// The lab's config with the API, failback at once, and isp2's `key` learned (`"auto"`).
fn write_config(lab: &Lab, key: &str) -> anyhow::Result<()> {
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[failover]\nfailback_delay = \"0s\"\n{api}"),
    )?;
    let value = if key == "gateway" {
        "100.64.2.1"
    } else {
        "2001:db8:100:2::1"
    };
    lab.edit_config(
        &format!("{key} = \"{value}\""),
        &format!("{key} = \"auto\""),
    )
}

/// A flow on isp1 that ran through a change of another uplink: every datagram answered,
/// all from isp1's address.
fn isp1_flow_untouched(flow: uplink_tests::UdpStream) -> anyhow::Result<()> {
    let r = flow.finish()?;
    assert_eq!(r.seen, vec![uplink_tests::uplink_source(1, false)]);
    assert!(
        r.sent > 0 && r.received == r.sent,
        "isp1's flow lost {} of {}",
        r.sent - r.received,
        r.sent
    );
    Ok(())
}

/// The `uplinks` table row of `name`.
fn uplink_row(lab: &Lab, name: &str) -> anyhow::Result<String> {
    let (code, out, err) = lab.ctl("view", &["uplinks"])?;
    anyhow::ensure!(code == 0, "uplinkctl uplinks: {err}");
    Ok(out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_default()
        .to_string())
}

fn seen(lab: &Lab, client: u32) -> anyhow::Result<Ipv4Addr> {
    match lab.probe(client, false, 20)? {
        IpAddr::V4(a) => Ok(a),
        other => anyhow::bail!("unexpected source {other}"),
    }
}

/// Scenarios 2 and 3: the lease arrives after uplinkd starts (until then the uplink is
/// down, and says why), then the ISP renumbers (new subnet, new gateway) and a forced
/// renew moves the traffic to the new address with no restart. The client (udhcpc) puts
/// its default route in the main table, as DHCP clients do by default: LAN traffic still
/// follows uplinkd's rules.
#[test]
fn lease_after_start_and_renumbering_with_udhcpc() -> anyhow::Result<()> {
    let mut lab = Lab::build("dhcpren", uplinks(), 1, 0)?;
    lab.dhcp_uplink(2)?;
    write_config(&lab, "gateway")?;
    lab.start_agent()?;
    // No lease yet: down, with the reason in the CLI and the metric.
    lab.wait_for(Duration::from_secs(10), "isp2 waiting for DHCP", || {
        Ok(uplink_row(&lab, "isp2")?.contains("no gateway yet"))
    })?;
    let m = lab.scrape(9477)?;
    assert_eq!(
        m.get("uplinkd_uplink_gateway_known{family=\"ipv4\",uplink=\"isp2\"}"),
        Some(&0.0),
        "{m:?}"
    );
    lab.greet_clients()?;
    assert_eq!(
        lab.uplink_of_source(lab.probe(1, false, 10)?).as_deref(),
        Some("isp1")
    );

    let _server = lab.dhcp_server(2, 2, "2m", "")?;
    let client = lab.dhcp_client(2, ClientKind::Udhcpc, RouteTable::Main)?;
    lab.wait_for(
        Duration::from_secs(20),
        "isp2 up with its learned gateway",
        || {
            let row = uplink_row(&lab, "isp2")?;
            Ok(row.contains(" up ") && row.contains("100.64.2.1"))
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}\n--- udhcpc ---\n{}", lab.dhcp_log(2)))?;
    let lease = lab.wan_addr(2)?.expect("a lease");
    // The main table has a default route now (udhcpc's script put it there); a new client
    // is still placed by uplinkd and leaves by its uplink.
    assert!(
        lab.gw(&["ip", "route", "show", "default"])?
            .contains("wan2")
    );
    lab.add_client(2, false)?;
    let homes = lab.greet_clients()?;
    assert_eq!(
        homes.get(&IpAddr::from(client_v4(2))).map(String::as_str),
        Some("isp2")
    );
    assert_eq!(seen(&lab, 2)?, lease);
    assert_eq!(
        lab.uplink_of_source(lab.probe(1, false, 10)?).as_deref(),
        Some("isp1")
    );

    // Renumbering: the ISP moves to 100.64.12.0/24 behind 100.64.12.1, and NAKs the old
    // address at the renew that udhcpc is told to do.
    let flow = lab.client_socket(2, false)?;
    // c1's flow on isp1 runs through it all.
    let other = uplink_tests::UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    let echo = |s: &std::net::UdpSocket| -> anyhow::Result<Option<String>> {
        Ok(uplink_tests::echo_source(s, 1)?.map(|a| a.to_string()))
    };
    assert_eq!(echo(&flow)?, Some(lease.to_string()));
    drop(_server);
    let _server = lab.dhcp_server(2, 12, "2m", "")?;
    client.signal("USR1")?;
    lab.wait_for(Duration::from_secs(20), "a lease in 100.64.12.0/24", || {
        Ok(lab.wan_addr(2)?.is_some_and(|a| a.octets()[2] == 12))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n--- udhcpc ---\n{}", lab.dhcp_log(2)))?;
    let renumbered = lab.wan_addr(2)?.expect("renumbered");
    uplink_tests::sh(&[
        "ip",
        "-n",
        &lab.ns("isp2"),
        "addr",
        "del",
        "100.64.2.1/24",
        "dev",
        "cpe",
    ])?;
    // udhcpc drops the NAKed address before it asks again, so isp2 was down in between
    // and the running flow went to isp1 (failovers never break a flow); it is answered,
    // and never again from the old address.
    let now = echo(&flow)?;
    assert!(now.is_some() && now != Some(lease.to_string()), "{now:?}");
    lab.wait_for(
        Duration::from_secs(10),
        "new flows on the new address",
        || Ok(seen(&lab, 2)? == renumbered),
    )?;
    assert_eq!(
        lab.uplink_of_source(lab.probe(1, false, 10)?).as_deref(),
        Some("isp1")
    );
    let row = uplink_row(&lab, "isp2")?;
    assert!(row.contains(&router(12).to_string()), "{row}");
    // The `from` rule followed the address.
    let rules = lab.gw(&["ip", "rule", "show"])?;
    assert!(
        rules.contains(&format!("from {renumbered} lookup")),
        "{rules}"
    );
    assert!(!rules.contains(&format!("from {lease} lookup")), "{rules}");
    isp1_flow_untouched(other)?;
    // No restart happened, and no apply failed.
    let m = lab.scrape(9477)?;
    assert_eq!(m.get("uplinkd_apply_errors_total"), Some(&0.0));
    Ok(())
}

/// Scenarios 1 and 4 with dhclient, its route in a table of the operator's (100) that
/// uplinkd reads but does not own, so the main table stays without a default route: the
/// lease is there before uplinkd starts; then the server goes away until the lease
/// expires (dnsmasq's shortest lease is 2 minutes) and the uplink goes down with its
/// clients moved; the server returns and the uplink comes back with them.
#[test]
fn lease_at_start_lost_at_expiry_and_back_with_dhclient() -> anyhow::Result<()> {
    let mut lab = Lab::build("dhcplost", uplinks(), 2, 0)?;
    lab.dhcp_uplink(2)?;
    write_config(&lab, "gateway")?;
    let server = lab.dhcp_server(2, 2, "2m", "")?;
    let _client = lab.dhcp_client(2, ClientKind::Dhclient, RouteTable::Table(100))?;
    lab.wait_for(Duration::from_secs(20), "a lease on wan2", || {
        Ok(lab.wan_addr(2)?.is_some())
    })
    .map_err(|e| anyhow::anyhow!("{e}\n--- dhclient ---\n{}", lab.dhcp_log(2)))?;
    let lease = lab.wan_addr(2)?.expect("a lease");
    assert!(
        !lab.gw(&["ip", "route", "show", "table", "main"])?
            .contains("default")
    );
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let on2 = (1..=2)
        .find(|&i| homes.get(&IpAddr::from(client_v4(i))).map(String::as_str) == Some("isp2"))
        .expect("a client on isp2 (the lease was there at start)");
    assert_eq!(seen(&lab, on2)?, lease);
    assert!(uplink_row(&lab, "isp2")?.contains("100.64.2.1"));

    drop(server);
    lab.wait_for(
        Duration::from_secs(150),
        "isp2 down at the lease's expiry",
        || Ok(uplink_row(&lab, "isp2")?.contains("no gateway yet")),
    )
    .map_err(|e| anyhow::anyhow!("{e}\n--- dhclient ---\n{}", lab.dhcp_log(2)))?;
    assert_eq!(
        lab.uplink_of_source(lab.probe(on2, false, 20)?).as_deref(),
        Some("isp1")
    );

    let _server = lab.dhcp_server(2, 2, "2m", "")?;
    lab.wait_for(Duration::from_secs(30), "isp2 back", || {
        Ok(uplink_row(&lab, "isp2")?.contains(" up "))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n--- dhclient ---\n{}", lab.dhcp_log(2)))?;
    let lease = lab.wan_addr(2)?.expect("a lease again");
    lab.wait_for(Duration::from_secs(10), "the client back on isp2", || {
        Ok(seen(&lab, on2)? == lease)
    })?;
    Ok(())
}

/// Scenario 6: `gateway6 = "auto"` follows the router adverts of a real dnsmasq
/// (`enable-ra`). Without a router, the uplink's IPv6 connections leave by another uplink
/// (its IPv4 stays); a router appears and IPv6 uses it; the router changes (the first one
/// withdraws with lifetime 0, another appears); the last one withdraws and IPv6 moves
/// away again. uplinkd warns while the kernel would ignore the adverts (accept_ra).
#[test]
fn router_adverts_appear_change_and_withdraw() -> anyhow::Result<()> {
    let mut lab = Lab::build("ra", uplinks(), 2, 2)?;
    write_config(&lab, "gateway6")?;
    let isp2 = lab.ns("isp2");
    let link_local = |addr: &str| -> anyhow::Result<()> {
        uplink_tests::sh(&[
            "ip", "-n", &isp2, "-6", "addr", "flush", "dev", "cpe", "scope", "link",
        ])?;
        uplink_tests::sh(&[
            "ip",
            "-n",
            &isp2,
            "addr",
            "add",
            &format!("{addr}/64"),
            "dev",
            "cpe",
            "nodad",
        ])?;
        Ok(())
    };
    lab.start_agent()?;
    assert!(
        lab.log_tail(50).contains("net.ipv6.conf.wan2.accept_ra=2"),
        "{}",
        lab.log_tail(20)
    );
    let gw = lab.ns("gw");
    lab.sysctl(
        &gw,
        &[
            "net.ipv6.conf.wan2.accept_ra=2",
            "net.ipv6.conf.wan2.autoconf=0",
        ],
    )?;
    let homes = lab.greet_clients()?;
    let on2 = (1..=2)
        .find(|&i| homes.get(&IpAddr::from(client_v4(i))).map(String::as_str) == Some("isp2"))
        .expect("a client on isp2");
    let v6_via = |lab: &Lab| -> anyhow::Result<Option<String>> {
        Ok(lab.uplink_of_source(lab.probe(on2, true, 10)?))
    };
    let gateway6 = |lab: &Lab| -> anyhow::Result<String> {
        let (_, out, _) = lab.ctl("view", &["-o", "json", "uplinks"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == "isp2"))
            .and_then(|u| u["gateway6"].as_str())
            .unwrap_or_default()
            .to_string())
    };
    // No router yet: IPv6 by isp1, IPv4 by isp2.
    assert_eq!(gateway6(&lab)?, "");
    assert_eq!(v6_via(&lab)?.as_deref(), Some("isp1"));
    assert_eq!(
        lab.uplink_of_source(lab.probe(on2, false, 10)?).as_deref(),
        Some("isp2")
    );
    let ra = |lifetime: u32| {
        lab.dhcp_server(
            2,
            2,
            "2m",
            &format!(
                "enable-ra\ndhcp-range=::,constructor:cpe,ra-only,64\nra-param=cpe,4,{lifetime}\n"
            ),
        )
    };
    // A router (the ISP side's link-local address) advertises: learned, IPv6 by isp2.
    let appears = |router: &str| -> anyhow::Result<uplink_tests::dhcp::Proc> {
        link_local(router)?;
        let adverts = ra(600)?;
        lab.wait_for(Duration::from_secs(20), "the router learned", || {
            Ok(gateway6(&lab)? == router)
        })?;
        lab.wait_for(Duration::from_secs(10), "IPv6 by isp2", || {
            Ok(v6_via(&lab)?.as_deref() == Some("isp2"))
        })?;
        Ok(adverts)
    };
    // It withdraws (router lifetime 0): forgotten, IPv6 by isp1.
    let withdraws = |adverts: uplink_tests::dhcp::Proc| -> anyhow::Result<()> {
        drop(adverts);
        let _withdraw = ra(0)?;
        lab.wait_for(Duration::from_secs(20), "the router withdrawn", || {
            Ok(gateway6(&lab)?.is_empty())
        })?;
        assert_eq!(v6_via(&lab)?.as_deref(), Some("isp1"));
        Ok(())
    };
    // A router appears, withdraws and another takes over, which withdraws too.
    withdraws(appears("fe80::a")?)?;
    withdraws(appears("fe80::b")?)?;
    // IPv4 stayed on isp2 all along.
    assert_eq!(
        lab.uplink_of_source(lab.probe(on2, false, 10)?).as_deref(),
        Some("isp2")
    );
    // Each change was an event.
    let (_, events, _) = lab.ctl("view", &["events"])?;
    for what in [
        "isp2 learned its IPv6 gateway fe80::a",
        "isp2 lost its IPv6 gateway fe80::a",
        "isp2 learned its IPv6 gateway fe80::b",
        "isp2 lost its IPv6 gateway fe80::b",
    ] {
        assert!(events.contains(what), "{what}:\n{events}");
    }
    Ok(())
}

/// Scenario 8: a redial-like address change on a point-to-point uplink (as PPP or an LTE
/// modem gives): the established flow that was NATed to the old address is deleted and
/// re-establishes at once from the new one (the seed's `ip_dynaddr`), the `from` rule and
/// the probes follow, and a flow on the other uplink is untouched.
#[test]
fn a_redial_moves_the_flow_to_the_new_address_and_leaves_the_other_uplink_alone()
-> anyhow::Result<()> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    let ups = vec![
        UplinkSpec::new("isp1", 1, false).with(probe),
        UplinkSpec::new("lte", 1, true).with(probe),
    ];
    let mut lab = Lab::build("redial", ups, 2, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let on = |u: &str| {
        (1..=2)
            .find(|&i| homes.get(&IpAddr::from(client_v4(i))).map(String::as_str) == Some(u))
            .expect("a client on each uplink")
    };
    let (c1, c2) = (on("isp1"), on("lte"));
    let other = uplink_tests::UdpStream::start(&lab, c1, false, Duration::from_millis(20))?;
    let flow = lab.client_socket(c2, false)?;
    let echo = |s: &std::net::UdpSocket| uplink_tests::echo_source(s, 1);
    let old: IpAddr = "100.64.2.2".parse()?;
    let new: IpAddr = "100.64.2.7".parse()?;
    assert_eq!(echo(&flow)?, Some(old));
    // The redial: the old address goes, a new one comes on the same link.
    uplink_tests::sh(&[
        "ip",
        "-n",
        &lab.ns("isp2"),
        "route",
        "add",
        "100.64.2.7/32",
        "dev",
        "cpe",
    ])?;
    lab.gw(&[
        "ip",
        "addr",
        "del",
        "100.64.2.2/32",
        "peer",
        "100.64.2.1",
        "dev",
        "wan2",
    ])?;
    lab.gw(&[
        "ip",
        "addr",
        "add",
        "100.64.2.7/32",
        "peer",
        "100.64.2.1",
        "dev",
        "wan2",
    ])?;
    lab.wait_for(
        Duration::from_secs(10),
        "the flow from the new address",
        || Ok(echo(&flow)? == Some(new)),
    )?;
    let rules = lab.gw(&["ip", "rule", "show"])?;
    assert!(rules.contains("from 100.64.2.7 lookup"), "{rules}");
    assert!(!rules.contains("from 100.64.2.2 lookup"), "{rules}");
    // The probes rebound to the new source: lte is up, and the conntrack table has lte's
    // echo requests from the new address only.
    let ct = lab.gw(&["conntrack", "-L", "-p", "icmp"])?;
    assert!(!ct.contains("src=100.64.2.2 "), "{ct}");
    isp1_flow_untouched(other)?;
    let m = lab.scrape(9477)?;
    assert_eq!(
        (
            m.get("uplinkd_uplink_flaps_total{uplink=\"lte\"}"),
            m.get("uplinkd_uplink_up{uplink=\"lte\"}")
        ),
        (Some(&0.0), Some(&1.0)),
        "lte never went down across the redial"
    );
    Ok(())
}

/// A DHCP uplink whose lease and default route are in place before uplinkd starts must not
/// be judged down at start ("no gateway yet" before the routes were read): with the
/// default failback_delay its clients would sit on the tier-2 backup for 30 s after
/// every restart. A restart moves no traffic.
#[test]
fn a_lease_in_place_at_start_moves_no_traffic() -> anyhow::Result<()> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("lte", 1, false)
            .with(probe)
            .with("tier = 2"),
    ];
    let mut lab = Lab::build("dhcpstart", uplinks, 1, 0)?;
    lab.dhcp_uplink(1)?;
    let api = lab.api_config()?;
    // Failback after the default 30 s: a start that judged isp1 down would show.
    lab.write_config("10s", "10m", &api)?;
    lab.edit_config("gateway = \"100.64.1.1\"", "gateway = \"auto\"")?;
    let _server = lab.dhcp_server(1, 1, "2m", "")?;
    let _client = lab.dhcp_client(1, ClientKind::Udhcpc, RouteTable::Main)?;
    lab.wait_for(Duration::from_secs(20), "a lease on wan1", || {
        Ok(lab.wan_addr(1)?.is_some()
            && lab
                .gw(&["ip", "route", "show", "default"])?
                .contains("wan1"))
    })
    .map_err(|e| anyhow::anyhow!("{e}\n--- udhcpc ---\n{}", lab.dhcp_log(1)))?;
    let lease = lab.wan_addr(1)?.expect("a lease");
    for restart in 0..2 {
        lab.start_agent()?;
        if restart == 0 {
            lab.greet_clients()?;
        }
        assert_eq!(seen(&lab, 1)?, lease, "c1 leaves by isp1 (start {restart})");
        let (_, events, _) = lab.ctl("view", &["events"])?;
        assert!(
            !events.contains("failover of isp1") && !events.contains("isp1 up -> down"),
            "start {restart}: {events}"
        );
        lab.stop_agent("TERM")?;
    }
    Ok(())
}

/// Defect 5's reboot: the last run stopped while isp1 had lost its lease (at shutdown the
/// DHCP client often goes first), so its decisions say "failed over, failback pending".
/// After the reboot the lease is back before uplinkd starts, and no table of ours is left
/// to keep in place: isp1 serves its clients from the first apply, not after another
/// `failback_delay` (30 s) on the backup.
#[test]
fn a_lease_back_after_a_reboot_serves_at_once() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("lte", 1, false).with("tier = 2"),
    ];
    let mut lab = Lab::build("dhcpboot", uplinks, 1, 0)?;
    lab.dhcp_uplink(1)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.edit_config("gateway = \"100.64.1.1\"", "gateway = \"auto\"")?;
    let _server = lab.dhcp_server(1, 1, "2m", "")?;
    let client = lab.dhcp_client(1, ClientKind::Udhcpc, RouteTable::Main)?;
    let has_route = |lab: &Lab| -> anyhow::Result<bool> {
        Ok(lab
            .gw(&["ip", "route", "show", "default"])?
            .contains("wan1"))
    };
    lab.wait_for(Duration::from_secs(20), "a lease on wan1", || {
        Ok(lab.wan_addr(1)?.is_some() && has_route(&lab)?)
    })
    .map_err(|e| anyhow::anyhow!("{e}\n--- udhcpc ---\n{}", lab.dhcp_log(1)))?;
    let lease = lab.wan_addr(1)?.expect("a lease");
    let router = lab.gw(&["ip", "-4", "route", "show", "default", "dev", "wan1"])?;
    let router = router
        .split_whitespace()
        .skip_while(|w| *w != "via")
        .nth(1)
        .expect("a router")
        .to_string();
    lab.start_agent()?;
    lab.greet_clients()?;
    assert_eq!(seen(&lab, 1)?, lease, "c1 leaves by isp1's lease");
    // The lease is lost (the client's deconfig, by hand: udhcpc stays quiet for 2 min).
    lab.gw(&["ip", "-4", "route", "del", "default", "dev", "wan1"])?;
    lab.wait_for(Duration::from_secs(10), "isp1 down", || {
        let row = uplink_row(&lab, "isp1")?;
        Ok(row
            .split_whitespace()
            .nth(1)
            .is_some_and(|s| s.starts_with("down")))
    })?;
    assert_eq!(
        IpAddr::V4(seen(&lab, 1)?),
        uplink_tests::uplink_source(2, false),
        "c1 on lte"
    );
    lab.stop_agent("TERM")?;
    // The reboot: nothing of uplinkd's survives in the kernel, and the lease is back
    // before uplinkd starts.
    lab.uplinkd_cleanup()?;
    lab.gw(&[
        "ip", "route", "replace", "default", "via", &router, "dev", "wan1",
    ])?;
    lab.start_agent()?;
    assert_eq!(seen(&lab, 1)?, lease, "c1 leaves by isp1 from the start");
    let row = uplink_row(&lab, "isp1")?;
    assert_eq!(row.split_whitespace().nth(1), Some("up"), "{row}");
    drop(client);
    Ok(())
}

/// `gateway6 = "auto"` without a router yet: the uplink's IPv6 probes can only fail, and
/// they counted against its IPv4 health: with a quorum of all its probes the whole uplink
/// went down though its IPv4 works. Its IPv4 is judged by the IPv4 probes alone meanwhile.
#[test]
fn no_ipv6_router_yet_leaves_ipv4_health_to_the_ipv4_probes() -> anyhow::Result<()> {
    let both = "probes = [\"icmp:203.0.113.10\", \"icmp:2001:db8:ffff::10\"]\nprobe_quorum = 2";
    let ups = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false).with(both),
    ];
    let mut lab = Lab::build("ra6probe", ups, 2, 0)?;
    write_config(&lab, "gateway6")?;
    lab.start_agent()?;
    // Long enough for down_after (3 rounds of 200 ms) many times over: still up, carrying.
    let homes = lab.greet_clients()?;
    let on2 = (1..=2)
        .find(|&i| homes.get(&IpAddr::from(client_v4(i))).map(String::as_str) == Some("isp2"))
        .expect("a client on isp2");
    for _ in 0..10 {
        let row = uplink_row(&lab, "isp2")?;
        assert!(
            row.contains(" up "),
            "isp2 stays up on its IPv4 probe: {row}"
        );
        assert_eq!(seen(&lab, on2)?, Ipv4Addr::new(100, 64, 2, 2));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    Ok(())
}
