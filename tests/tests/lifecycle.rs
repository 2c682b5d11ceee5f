//! Assignment, new clients, restarts and idle release, on the real dataplane.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use uplink_tests::{
    LAN_IF, Lab, TcpFlow, UdpStream, UplinkSpec, client_v4, client_v6, two_uplinks,
};

fn three_uplinks() -> Vec<UplinkSpec> {
    vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ]
}

fn counts(assigned: &BTreeMap<IpAddr, String>) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for home in assigned.values() {
        *c.entry(home.clone()).or_default() += 1;
    }
    c
}

/// Test 2: 8 clients over weights 2/1/1 give 4/2/2, in the state file and in the kernel.
#[test]
fn weighted_balance_8_clients() -> anyhow::Result<()> {
    let mut lab = Lab::build("bal", three_uplinks(), 8, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(
        counts(&assigned),
        BTreeMap::from([("isp1".into(), 4), ("isp2".into(), 2), ("lte".into(), 2)])
    );
    let kernel = lab.kernel_map("client4")?;
    for (ip, home) in &assigned {
        assert_eq!(
            kernel.get(ip),
            Some(&format!("home_{home}")),
            "kernel map disagrees for {ip}"
        );
    }
    Ok(())
}

/// Test 3: a client nobody has seen gets its very first datagram answered, with the agent
/// running and, stricter, with the agent dead (no assignment can exist then).
#[test]
fn brand_new_client_first_datagram_is_answered() -> anyhow::Result<()> {
    let mut lab = Lab::build("new", three_uplinks(), 0, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let first = |lab: &Lab, i: u32, v6: bool| -> anyhow::Result<IpAddr> {
        let s = lab.client_socket(i, v6)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.send(b"first")?;
        let mut buf = [0u8; 256];
        let n = uplink_tests::retry_eintr(|| s.recv(&mut buf))
            .map_err(|e| anyhow::anyhow!("client c{i} first datagram unanswered: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..n])
            .split(' ')
            .next()
            .unwrap_or_default()
            .parse()?)
    };
    lab.add_client(1, true)?;
    assert!(
        !lab.kernel_map("client4")?
            .contains_key(&IpAddr::from(client_v4(1)))
    );
    let seen = first(&lab, 1, false)?;
    assert!(
        lab.uplink_of_source(seen).is_some(),
        "answered through an uplink: {seen}"
    );
    first(&lab, 1, true)?;

    lab.stop_agent("KILL")?;
    for i in 2..=4 {
        lab.add_client(i, true)?;
        first(&lab, i, false)?;
        first(&lab, i, true)?;
    }
    Ok(())
}

/// Test 4: SIGKILL and restart keep every assignment, adopt the kernel's table instead of
/// re-creating it, and a continuous UDP flow per client loses nothing.
#[test]
fn restart_keeps_assignments_and_loses_no_packets() -> anyhow::Result<()> {
    let mut lab = Lab::build("rst", three_uplinks(), 6, 3)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let before = lab.greet_clients()?;
    let kernel_before = (lab.kernel_map("client4")?, lab.kernel_map("client6")?);
    let handle_before = table_handle(&lab)?;

    let streams = (1..=6)
        .map(|i| UdpStream::start(&lab, i, false, Duration::from_millis(10)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_agent("KILL")?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent()?;
    std::thread::sleep(Duration::from_millis(1500));
    for (i, s) in streams.into_iter().enumerate() {
        let r = s.finish()?;
        assert!(r.sent > 100, "stream {i} sent only {}", r.sent);
        assert_eq!(
            r.received,
            r.sent,
            "client c{} lost {} of {} datagrams across the restart",
            i + 1,
            r.sent - r.received,
            r.sent
        );
        assert_eq!(r.seen.len(), 1, "one flow, one uplink: {:?}", r.seen);
    }
    lab.wait_for(Duration::from_secs(5), "state saved after restart", || {
        Ok(lab.assignments()? == before)
    })?;
    assert_eq!(
        (lab.kernel_map("client4")?, lab.kernel_map("client6")?),
        kernel_before
    );
    assert_eq!(
        table_handle(&lab)?,
        handle_before,
        "restart re-created the nft table instead of adopting it"
    );
    for (addr, home) in &before {
        let i = (1..=6)
            .find(|i| IpAddr::from(client_v4(*i)) == *addr || IpAddr::from(client_v6(*i)) == *addr)
            .expect("lab client");
        let seen = lab.probe(i, addr.is_ipv6(), 10)?;
        assert_eq!(lab.uplink_of_source(seen).as_ref(), Some(home));
    }
    Ok(())
}

/// Neighbours the kernel held before uplinkd started are clients from its start, with no
/// event and no traffic: the start-up dump reads them, over several datagrams and in both
/// families.
#[test]
fn neighbours_known_before_the_start_are_clients_at_once() -> anyhow::Result<()> {
    let mut lab = Lab::build("dump", two_uplinks(), 0, 0)?;
    lab.write_config("10s", "10m", "")?;
    let (mut batch, mut want) = (String::new(), BTreeSet::new());
    let mut neighbour = |ip: IpAddr, n: u32| {
        batch += &format!(
            "neigh replace {ip} lladdr 02:00:{:02x}:00:{:02x}:{:02x} dev {LAN_IF} nud permanent\n",
            u8::from(ip.is_ipv6()),
            n >> 8,
            n & 0xff
        );
        want.insert(ip);
    };
    for n in 0..200 {
        neighbour(Ipv4Addr::new(198, 19, 0, 40 + n as u8).into(), n);
    }
    for n in 0..1000 {
        neighbour(
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 1, n as u16).into(),
            n,
        );
    }
    let file = lab.dir.join("neighbours.batch");
    std::fs::write(&file, batch)?;
    lab.gw(&["ip", "-batch", file.to_str().expect("utf-8 path")])?;
    lab.start_agent()?;
    lab.wait_for(
        Duration::from_secs(10),
        "1,200 persisted assignments",
        || Ok(lab.assignments()?.len() >= want.len()),
    )?;
    assert_eq!(
        lab.assignments()?.into_keys().collect::<BTreeSet<_>>(),
        want
    );
    let kernel: BTreeSet<IpAddr> = lab
        .kernel_map("client4")?
        .into_keys()
        .chain(lab.kernel_map("client6")?.into_keys())
        .collect();
    assert_eq!(kernel, want);
    Ok(())
}

fn table_handle(lab: &Lab) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&lab.gw(&["nft", "-j", "list", "tables"])?)?;
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["table"]["name"] == "uplinkd")
        .and_then(|o| o["table"]["handle"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("no uplinkd table"))
}

/// Test 8: a client whose neighbour entries disappear is released after the idle timeout,
/// not before; a new client then goes to the least-loaded uplink.
#[test]
fn idle_client_is_released_then_least_loaded_wins() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("idle", uplinks, 4, 0)?;
    lab.write_config("10s", "3s", "")?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let gone: IpAddr = client_v4(1).into();
    let freed = lab.assignments()?[&gone].clone();

    lab.remove_client(1)?;
    // The kernel may already have dropped the entry with the port; otherwise drop it now.
    let _ = lab.gw(&["ip", "neigh", "del", &gone.to_string(), "dev", "br-lan"]);
    assert!(
        !lab.gw(&["ip", "neigh", "show", "dev", "br-lan"])?
            .contains(&format!("{gone} "))
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        lab.kernel_map("client4")?.contains_key(&gone),
        "released before the idle timeout"
    );
    lab.wait_for(
        Duration::from_secs(10),
        "release of the idle client",
        || {
            Ok(!lab.kernel_map("client4")?.contains_key(&gone)
                && !lab.assignments()?.contains_key(&gone))
        },
    )?;

    lab.add_client(5, false)?;
    lab.probe(5, false, 10)?;
    let newcomer: IpAddr = client_v4(5).into();
    lab.wait_for(
        Duration::from_secs(10),
        "assignment of the new client",
        || Ok(lab.assignments()?.contains_key(&newcomer)),
    )?;
    assert_eq!(
        lab.assignments()?[&newcomer],
        freed,
        "the new client goes where the released one was"
    );
    Ok(())
}

/// Sticky connections: a flow keeps the uplink it started on (its conntrack mark) after the
/// client is assigned elsewhere, while new connections follow the assignment.
#[test]
fn connections_stay_on_the_uplink_they_started_on() -> anyhow::Result<()> {
    let uplinks = two_uplinks();
    let mut lab = Lab::build("sticky", uplinks, 6, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    // With the agent down nothing can be assigned: flows start on the fallback hash.
    lab.stop_agent("KILL")?;
    let streams = (1..=6)
        .map(|i| UdpStream::start(&lab, i, false, Duration::from_millis(20)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent()?;
    lab.wait_for(Duration::from_secs(10), "6 assignments", || {
        Ok(lab.assignments()?.len() == 6)
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    let assigned = lab.assignments()?;
    let mut moved = 0;
    for (i, s) in (1..=6).zip(streams) {
        let r = s.finish()?;
        assert_eq!(r.received, r.sent, "client c{i} lost datagrams");
        assert_eq!(
            r.seen.len(),
            1,
            "client c{i}'s flow changed uplink: {:?}",
            r.seen
        );
        let started_on = lab.uplink_of_source(r.seen[0]).expect("lab uplink");
        let home = &assigned[&IpAddr::from(client_v4(i))];
        let fresh = lab
            .uplink_of_source(lab.probe(i, false, 10)?)
            .expect("lab uplink");
        assert_eq!(
            &fresh, home,
            "a new connection of c{i} follows the assignment"
        );
        if &started_on != home {
            moved += 1;
        }
    }
    assert!(
        moved > 0,
        "no client was assigned away from its fallback uplink, so stickiness was not exercised: {assigned:?}"
    );
    Ok(())
}

/// A corrupt state file is kept aside, reported, and the assignments come back from the
/// kernel's maps: nothing is lost and nobody is reshuffled.
#[test]
fn corrupt_state_file_loses_nothing() -> anyhow::Result<()> {
    let mut lab = Lab::build("corrupt", three_uplinks(), 4, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let before = lab.greet_clients()?;
    lab.stop_agent("TERM")?;
    let path = lab.state_dir().join("state.json");
    std::fs::write(
        &path,
        "{\"version\": 1,\n\"clients\": [ {\"mac\": \"not-a-mac\"",
    )?;
    lab.start_agent()?;
    assert!(
        lab.log_tail(50).contains("state file unreadable"),
        "{}",
        lab.log_tail(20)
    );
    let kept: Vec<_> = std::fs::read_dir(lab.state_dir())?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the corrupt file is kept for the operator");
    assert!(std::fs::read_to_string(kept[0].path())?.contains("not-a-mac"));
    lab.wait_for(
        Duration::from_secs(5),
        "assignments adopted from the kernel",
        || Ok(lab.assignments()? == before),
    )?;
    Ok(())
}

/// SIGHUP: a valid new config (an added uplink) applies without disturbing running flows;
/// an invalid one is rejected and the running config stays.
#[test]
fn sighup_reload_adds_an_uplink_and_rejects_a_bad_config() -> anyhow::Result<()> {
    let mut lab = Lab::build("reload", three_uplinks(), 4, 0)?;
    // Start with two of the three uplinks configured.
    let full = {
        lab.write_config("10s", "10m", "")?;
        std::fs::read_to_string(lab.config_path())?
    };
    let two = full[..full
        .find("[[uplink]]\nname = \"lte\"")
        .expect("lte section")]
        .to_string();
    std::fs::write(lab.config_path(), &two)?;
    lab.start_agent()?;
    let before = lab.greet_clients()?;
    let stream = UdpStream::start(&lab, 1, false, Duration::from_millis(10))?;

    std::fs::write(lab.config_path(), &full)?;
    lab.signal_agent("HUP")?;
    lab.wait_for(Duration::from_secs(5), "reload", || {
        Ok(lab.log_tail(20).contains("config reloaded"))
    })?;
    lab.add_client(5, false)?;
    lab.probe(5, false, 10)?;
    let c5: IpAddr = client_v4(5).into();
    lab.wait_for(Duration::from_secs(5), "c5 assigned", || {
        Ok(lab.assignments()?.contains_key(&c5))
    })?;
    let after = lab.assignments()?;
    assert_eq!(
        after[&c5], "lte",
        "the new, empty uplink is the least loaded"
    );
    for (ip, home) in &before {
        assert_eq!(&after[ip], home, "reload reshuffled {ip}");
    }
    assert_eq!(
        lab.uplink_of_source(lab.probe(5, false, 10)?).as_deref(),
        Some("lte"),
        "{}\n{}",
        lab.log_tail(30),
        lab.post_mortem()
    );

    std::fs::write(lab.config_path(), full.replace("weight = 1", "weight = 0"))?;
    lab.signal_agent("HUP")?;
    lab.wait_for(Duration::from_secs(5), "rejection", || {
        Ok(lab.log_tail(20).contains("reload rejected"))
    })?;
    assert!(lab.agent_running());
    assert_eq!(
        lab.uplink_of_source(lab.probe(5, false, 10)?).as_deref(),
        Some("lte"),
        "the running config stays"
    );
    let r = stream.finish()?;
    assert_eq!(
        r.received,
        r.sent,
        "the running flow lost answers across the reload\n{}",
        lab.post_mortem()
    );
    assert!(r.received > 0);
    assert_eq!(r.seen.len(), 1);
    Ok(())
}

/// Bulk arrival: thousands of neighbours at once while the agent runs are all assigned,
/// balanced, and in the kernel, without waiting for a resync.
#[test]
fn bulk_arrival_is_dispatched_from_events() -> anyhow::Result<()> {
    const N: u32 = 5000;
    let uplinks = two_uplinks();
    let mut lab = Lab::build("bulk", uplinks, 0, 0)?;
    lab.write_config("600s", "10m", "")?;
    lab.start_agent()?;
    // Permanent entries: the kernel caps dynamic ones at gc_thresh3 (1024 by default).
    let mut batch = String::new();
    for i in 0..N {
        let ip = std::net::Ipv4Addr::from(0xC612_8000u32 + 1 + i); // 198.18.128.0/17
        batch += &format!(
            "neigh add {ip} lladdr 02:77:00:00:{:02x}:{:02x} dev br-lan nud permanent\n",
            (i >> 8) & 0xff,
            i & 0xff
        );
    }
    let path = lab.dir.join("bulk.batch");
    std::fs::write(&path, batch)?;
    uplink_tests::sh(&["ip", "-n", &lab.ns("gw"), "-batch", path.to_str().unwrap()])?;
    lab.wait_for(
        Duration::from_secs(20),
        "all bulk clients in the kernel map",
        || Ok(lab.kernel_map("client4")?.len() == N as usize),
    )?;
    lab.wait_for(Duration::from_secs(5), "all bulk clients persisted", || {
        Ok(lab.assignments()?.len() == N as usize)
    })?;
    let c = counts(&lab.assignments()?);
    assert_eq!(
        c.values().copied().collect::<Vec<_>>(),
        vec![N as usize / 2, N as usize / 2]
    );
    Ok(())
}

/// A new client's first flow leaves by the uplink it then keeps: 8 clients arriving one
/// after another over weights 2/1/1 end 4/2/2, and none changes public address between
/// its first flow and the flows after its assignment.
#[test]
fn a_new_clients_first_flow_keeps_its_uplink() -> anyhow::Result<()> {
    let mut lab = Lab::build("first", three_uplinks(), 0, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let mut homes = BTreeMap::new();
    for i in 1..=8 {
        lab.add_client(i, false)?;
        let ip = IpAddr::from(client_v4(i));
        let first = lab.probe(i, false, 10)?;
        lab.wait_for(Duration::from_secs(10), &format!("c{i} assigned"), || {
            Ok(lab.assignments()?.contains_key(&ip))
        })?;
        let later = lab.probe(i, false, 10)?;
        assert_eq!(
            later, first,
            "c{i}: first flow left by {first}, the next one by {later}"
        );
        homes.insert(ip, lab.uplink_of_source(later).expect("an uplink"));
    }
    assert_eq!(
        lab.assignments()?,
        homes,
        "the kernel path is the assignment"
    );
    assert_eq!(
        counts(&homes),
        BTreeMap::from([("isp1".into(), 4), ("isp2".into(), 2), ("lte".into(), 2)])
    );
    Ok(())
}

/// A connection keeps the uplink it started on when its client moves: on an uplink whose
/// mark the prerouting chain compares (the first four) and on one it looks up in the
/// `sticky` map (the fifth); the client's new connections take its new uplink.
#[test]
fn connections_keep_their_uplink_whether_compared_or_looked_up() -> anyhow::Result<()> {
    let uplinks = (1..=5)
        .map(|i| UplinkSpec::new(&format!("isp{i}"), 1, false))
        .collect();
    let mut lab = Lab::build("keep5", uplinks, 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let ip = client_v4(1).to_string();
    for (from, to) in [("isp1", "isp5"), ("isp5", "isp1")] {
        let (code, _, err) = lab.ctl("op", &["pin", &ip, from])?;
        assert_eq!(code, 0, "{err}");
        let mut tcp = TcpFlow::connect(&lab, 1)?;
        assert_eq!(lab.uplink_of_source(tcp.exchange()?).as_deref(), Some(from));
        let (code, _, err) = lab.ctl("op", &["pin", &ip, to])?;
        assert_eq!(code, 0, "{err}");
        assert_eq!(lab.via(1)?, to, "the client's new connections");
        let seen = tcp
            .exchange()
            .map_err(|e| e.context(format!("the connection opened on {from}, moved to {to}")))?;
        assert_eq!(
            lab.uplink_of_source(seen).as_deref(),
            Some(from),
            "the connection opened on {from} keeps it"
        );
    }
    Ok(())
}

/// An upgrade from a version that kept clients in the verdict maps `client4`/`client6`
/// (their every element was validated at each commit): with no state file, the agent
/// adopts the assignments those maps hold rather than placing the clients afresh, and
/// replaces the table with per-uplink client sets.
#[test]
fn an_upgrade_adopts_the_client_maps_of_the_previous_version() -> anyhow::Result<()> {
    let mut lab = Lab::build("upgrade", two_uplinks(), 4, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let placed = lab.greet_clients()?;
    assert!(
        counts(&placed).len() == 2,
        "a fresh placement balances: {placed:?}"
    );
    lab.stop_agent("TERM")?;
    std::fs::remove_file(lab.state_dir().join("state.json"))?;
    // The previous version's table, every client on isp2.
    let elems: Vec<String> = (1..=4)
        .map(|i| format!("{} : goto home_isp2", client_v4(i)))
        .collect();
    lab.gw(&["nft", "delete", "table", "inet", "uplinkd"])?;
    lab.gw(&[
        "nft",
        &format!(
            "add table inet uplinkd {{ chain home_isp1 {{ }}; chain home_isp2 {{ }}; map client4 {{ type ipv4_addr : verdict; elements = {{ {} }}; }}; }}",
            elems.join(", ")
        ),
    ])?;
    lab.start_agent()?;
    let on_isp2: BTreeMap<IpAddr, String> = (1..=4)
        .map(|i| (IpAddr::from(client_v4(i)), "isp2".to_string()))
        .collect();
    lab.wait_for(Duration::from_secs(5), "the old maps' assignments", || {
        Ok(lab.assignments()? == on_isp2)
    })?;
    let kernel = lab.kernel_map("client4")?;
    assert_eq!(kernel.len(), 4, "{kernel:?}");
    assert!(kernel.values().all(|h| h == "home_isp2"), "{kernel:?}");
    for i in 1..=4 {
        assert_eq!(
            lab.udp_via(i, uplink_tests::server(false), None, None)?,
            "isp2"
        );
    }
    Ok(())
}
