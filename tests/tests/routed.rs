//! Hosts behind a router on the LAN (an L3 switch, a second router) are clients of their
//! own: they are never the gateway's neighbours, so the dataplane logs the first packet of
//! an unplaced one (NFLOG) and uplinkd places it by weight, as a neighbour. Proven by the
//! source address the internet host sees for 40 hosts behind one router.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec};

fn three() -> Vec<UplinkSpec> {
    vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, false),
    ]
}

/// Each host's uplink as the internet host sees it, from a new flow each.
fn uplinks_of(
    lab: &Lab,
    router: u32,
    hosts: &[IpAddr],
) -> anyhow::Result<BTreeMap<IpAddr, String>> {
    let mut out = BTreeMap::new();
    for &h in hosts {
        let seen = lab
            .echo_from(router, h, 10)?
            .ok_or_else(|| anyhow::anyhow!("{h}: no answer\n{}", lab.log_tail(30)))?;
        let uplink = lab
            .uplink_of_source(seen)
            .ok_or_else(|| anyhow::anyhow!("{h}: {seen} is no uplink's address"))?;
        out.insert(h, uplink);
    }
    Ok(out)
}

fn tally(m: &BTreeMap<IpAddr, String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for u in m.values() {
        *t.entry(u.clone()).or_default() += 1;
    }
    t
}

/// 40 hosts behind a LAN router used to leave 39 by one uplink (all took the unassigned
/// verdict of a placement that never came): now they are placed 20/10/10 by weight 2/1/1,
/// keep their uplinks across new flows and a restart, are listed with their router, and a
/// dead uplink's share alone moves.
#[test]
fn hosts_behind_a_lan_router_are_placed_by_weight_and_stick() -> anyhow::Result<()> {
    let mut lab = Lab::build("routed", three(), 0, 0)?;
    let hosts = lab.add_lan_router(1, 40)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[metrics]\nlisten = \"127.0.0.1:9477\"\n{api}"),
    )?;
    lab.start_agent()?;
    // The router itself is a neighbour: placed first, as any client.
    lab.greet_clients()?;
    for &h in &hosts {
        lab.echo_from(1, h, 10)?;
    }
    lab.wait_for(Duration::from_secs(10), "41 assignments", || {
        Ok(lab.assignments()?.len() == 41)
    })?;
    let first = uplinks_of(&lab, 1, &hosts)?;
    let mut counts = tally(&first);
    // With the router (a neighbour, on isp1): 21/10/10 over weights 2/1/1.
    *counts.entry("isp1".into()).or_default() += 1;
    assert_eq!(
        counts,
        BTreeMap::from([("isp1".into(), 21), ("isp2".into(), 10), ("lte".into(), 10)]),
        "placed by weight"
    );
    // The persisted homes are what the traffic shows.
    let homes = lab.assignments()?;
    for (h, u) in &first {
        assert_eq!(homes.get(h), Some(u), "{h}");
    }
    assert_eq!(
        uplinks_of(&lab, 1, &hosts)?,
        first,
        "sticky across new flows"
    );

    let (code, clients, err) = lab.ctl("view", &["clients", "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        clients.contains("10.20.0.7") && clients.contains("\"via\""),
        "listed with their router: {clients}"
    );
    let m = lab.scrape(9477)?;
    assert_eq!(m.get("uplinkd_clients"), Some(&41.0));
    assert_eq!(m.get("uplinkd_routed_clients"), Some(&40.0));

    lab.stop_agent("TERM")?;
    lab.start_agent()?;
    assert_eq!(
        uplinks_of(&lab, 1, &hosts)?,
        first,
        "sticky across a restart"
    );

    // isp2 dies: its ten move, the others stay.
    lab.carrier("isp2", false)?;
    lab.wait_for(Duration::from_secs(10), "isp2's hosts moved", || {
        let h = *first
            .iter()
            .find(|(_, u)| *u == "isp2")
            .expect("a host on isp2")
            .0;
        Ok(lab
            .echo_from(1, h, 3)?
            .and_then(|s| lab.uplink_of_source(s))
            .is_some_and(|u| u != "isp2"))
    })?;
    let after = uplinks_of(&lab, 1, &hosts)?;
    for (h, u) in &first {
        if u != "isp2" {
            assert_eq!(&after[h], u, "{h} was not on the dead uplink");
        } else {
            assert_ne!(after[h], "isp2", "{h}");
        }
    }
    Ok(())
}

/// `lan.routed` restricts what the routes say (here to 10.20.0.16/28), `explain` names the
/// router, and beyond `lan.max_clients` the hosts really are hashed by weight over the
/// uplinks (the log said so while all of them took one uplink).
#[test]
fn routed_prefixes_from_config_and_the_client_cap() -> anyhow::Result<()> {
    let mut lab = Lab::build("routedcap", three(), 0, 0)?;
    let hosts = lab.add_lan_router(1, 40)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[metrics]\nlisten = \"127.0.0.1:9477\"\n{api}"),
    )?;
    lab.edit_config(
        "[lan]\n",
        "[lan]\nrouted = [\"10.20.0.16/28\"]\nmax_clients = 9\n",
    )?;
    lab.start_agent()?;
    lab.greet_clients()?;
    for &h in &hosts {
        lab.echo_from(1, h, 10)?;
    }
    // The router and 8 of the 16 hosts inside 10.20.0.16/28: the cap.
    lab.wait_for(Duration::from_secs(10), "9 assignments", || {
        Ok(lab.assignments()?.len() == 9)
    })?;
    let tracked = lab.assignments()?;
    let inside = |h: &IpAddr| matches!(h, IpAddr::V4(a) if (16..32).contains(&a.octets()[3]));
    assert!(
        tracked
            .keys()
            .filter(|h| h.to_string().starts_with("10.20."))
            .all(inside),
        "only hosts of lan.routed are clients: {tracked:?}"
    );
    let m = lab.scrape(9477)?;
    assert_eq!(m.get("uplinkd_routed_clients"), Some(&8.0));
    assert!(
        m.get("uplinkd_lan_neighbours_refused_total{limit=\"lan.max_clients\"}")
            .is_some_and(|n| *n >= 1.0),
        "refusals counted: {:?}",
        m.get("uplinkd_lan_neighbours_refused_total{limit=\"lan.max_clients\"}")
    );
    // The LAN is full: the untracked hosts are hashed over all three uplinks by weight.
    let untracked: Vec<IpAddr> = hosts
        .iter()
        .filter(|h| !tracked.contains_key(h))
        .copied()
        .collect();
    let spread = tally(&uplinks_of(&lab, 1, &untracked)?);
    assert_eq!(spread.len(), 3, "hashed over every uplink: {spread:?}");
    assert!(
        spread["isp1"] > spread["isp2"] && spread["isp1"] > spread["lte"],
        "by weight 2/1/1: {spread:?}"
    );

    let placed = tracked
        .keys()
        .find(|h| h.to_string().starts_with("10.20."))
        .expect("a routed client");
    let (code, out, err) = lab.ctl(
        "view",
        &["explain", &placed.to_string(), "203.0.113.10", "-o", "json"],
    )?;
    assert_eq!(code, 0, "{err}");
    let e: serde_json::Value = serde_json::from_str(&out)?;
    assert!(
        e["steps"][0]
            .as_str()
            .is_some_and(|s| s.starts_with(&format!(
                "{placed} is a host behind the LAN router 198.19.0.11 ("
            ))),
        "{out}"
    );
    Ok(())
}

/// An address beyond `lan.max_addresses_per_client` took the next placement's uplink
/// (all of one host's extra addresses on one uplink) while the log said "hashed over the
/// surviving uplinks". It is hashed now, by the client's MAC (one element, whatever the
/// number of addresses): its packets pass the `overflow` rule's counter, and are answered.
#[test]
fn an_address_beyond_a_clients_limit_is_hashed() -> anyhow::Result<()> {
    let mut lab = Lab::build("addrcap", three(), 1, 1)?;
    lab.write_config("10s", "10m", "")?;
    lab.edit_config("[lan]\n", "[lan]\nmax_addresses_per_client = 1\n")?;
    lab.start_agent()?;
    // Its IPv4 address first: the client's one tracked address.
    let v4 = lab.probe(1, false, 10)?;
    lab.wait_for(Duration::from_secs(10), "c1 assigned", || {
        Ok(lab.assignments()?.len() == 1)
    })?;
    assert!(lab.uplink_of_source(v4).is_some());
    let capped = |lab: &Lab| -> anyhow::Result<Option<u64>> {
        let chain = lab.gw(&["nft", "list", "chain", "inet", "uplinkd", "policy_default"])?;
        Ok(chain
            .lines()
            .find(|l| l.contains("ether saddr 02:00:00:00:01:01") && l.contains("goto overflow"))
            .and_then(|l| {
                l.split("packets ")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            }))
    };
    // The IPv6 address: refused as the client's second, hashed by its MAC.
    lab.probe(1, true, 10)?;
    lab.wait_for(Duration::from_secs(10), "c1 capped", || {
        Ok(capped(&lab)?.is_some())
    })?;
    let before = capped(&lab)?.unwrap_or_default();
    let seen = lab.probe(1, true, 10)?;
    assert!(lab.uplink_of_source(seen).is_some(), "answered via {seen}");
    assert!(capped(&lab)? > Some(before), "the new flow was hashed");
    assert!(
        !lab.kernel_map("client6")?
            .contains_key(&IpAddr::from(uplink_tests::client_v6(1))),
        "no element of its own"
    );
    Ok(())
}
