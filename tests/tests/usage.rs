//! Usage per uplink on the real dataplane: a known transfer counted within 2 %, kept across
//! SIGKILL and restart together with what crossed while the agent was down, and a new
//! usage period at the boundary of a clock the test moves.

use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, TcpFlow, UdpStream, UplinkSpec, client_v4, two_uplinks};

/// Sends `n` datagrams of `size` bytes from client `i` to the internet host's echo and
/// reads the echoes; returns the IP bytes (IPv4 and UDP headers included) that went out
/// and came back.
fn transfer(lab: &Lab, i: u32, n: usize, size: usize) -> anyhow::Result<(f64, f64)> {
    let s = lab.client_socket(i, false)?;
    let payload = vec![b'u'; size];
    let mut buf = [0u8; 4096];
    let (mut out, mut back) = (0usize, 0usize);
    for _ in 0..n {
        s.send(&payload)?;
        out += size + 28;
        // The echo is "<source seen> " and the payload.
        if let Ok(len) = uplink_tests::retry_eintr(|| s.recv(&mut buf)) {
            back += len + 28;
        }
    }
    Ok((out as f64, back as f64))
}

fn counted(lab: &Lab, uplink: &str) -> anyhow::Result<(f64, f64)> {
    let m = lab.scrape(9477)?;
    let get = |dir: &str| {
        m.get(&format!(
            "uplinkd_uplink_bytes_total{{direction=\"{dir}\",uplink=\"{uplink}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    Ok((get("out"), get("in")))
}

fn usage_file(lab: &Lab, uplink: &str) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(lab.state_dir().join("usage.json"))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["uplinks"][uplink].clone())
}

fn within(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= want * 0.02,
        "{what}: counted {got} bytes, {want} crossed"
    );
}

const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:9477\"\n";

#[test]
fn a_known_transfer_is_counted_and_kept_across_sigkill_and_restart() -> anyhow::Result<()> {
    let mut lab = Lab::build("usage", two_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", METRICS)?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let u = assigned[&IpAddr::from(client_v4(1))].clone();
    let (out0, in0) = counted(&lab, &u)?;
    let (out, back) = transfer(&lab, 1, 1000, 1000)?;
    lab.wait_for(Duration::from_secs(10), "the transfer counted", || {
        let (o, i) = counted(&lab, &u)?;
        Ok(o - out0 >= out * 0.98 && i - in0 >= back * 0.98)
    })?;
    let (o1, i1) = counted(&lab, &u)?;
    within("out", o1 - out0, out);
    within("in", i1 - in0, back);
    // On disk (written every state_save_interval), then killed.
    lab.wait_for(Duration::from_secs(5), "the usage saved", || {
        Ok(usage_file(&lab, &u)?["total_tx"].as_f64().unwrap_or(0.0) >= o1)
    })?;
    lab.stop_agent("KILL")?;
    // The dataplane forwards while the agent is down; its counters keep what crosses.
    let (out2, back2) = transfer(&lab, 1, 500, 1000)?;
    lab.start_agent()?;
    lab.wait_for(
        Duration::from_secs(10),
        "the downtime's transfer counted",
        || {
            let (o, i) = counted(&lab, &u)?;
            Ok(o - out0 >= (out + out2) * 0.98 && i - in0 >= (back + back2) * 0.98)
        },
    )?;
    let (o2, i2) = counted(&lab, &u)?;
    within("out, across the restart", o2 - out0, out + out2);
    within("in, across the restart", i2 - in0, back + back2);
    Ok(())
}

/// 2027-01-31T23:59:50Z, 2027-02-01T00:00:00Z and five seconds later.
const BEFORE: i64 = 1_801_439_990;
const FEBRUARY: i64 = 1_801_440_000;
const AFTER: i64 = 1_801_440_005;
const JANUARY: i64 = 1_798_761_600;

#[test]
fn a_new_period_starts_at_its_local_midnight_on_a_moved_clock() -> anyhow::Result<()> {
    let mut lab = Lab::build("period", two_uplinks(), 1, 0)?;
    let clock = lab.dir.join("clock");
    std::fs::write(&clock, BEFORE.to_string())?;
    lab.agent_env
        .push(("UPLINKD_USAGE_CLOCK".into(), clock.display().to_string()));
    lab.agent_env.push(("TZ".into(), "UTC".into()));
    lab.write_config("10s", "10m", METRICS)?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let u = assigned[&IpAddr::from(client_v4(1))].clone();
    transfer(&lab, 1, 100, 1000)?;
    lab.wait_for(Duration::from_secs(10), "January's usage", || {
        let f = usage_file(&lab, &u)?;
        Ok(f["period_start"].as_i64() == Some(JANUARY)
            && f["tx"].as_f64().unwrap_or(0.0) >= 100_000.0)
    })?;
    let total = usage_file(&lab, &u)?["total_tx"].as_f64().unwrap_or(0.0);
    std::fs::write(&clock, AFTER.to_string())?;
    lab.wait_for(Duration::from_secs(10), "February's period", || {
        Ok(usage_file(&lab, &u)?["period_start"].as_i64() == Some(FEBRUARY))
    })?;
    let f = usage_file(&lab, &u)?;
    assert!(
        f["tx"].as_f64().unwrap_or(f64::MAX) < 100_000.0,
        "the new period starts from zero: {f}"
    );
    assert!(
        f["total_tx"].as_f64().unwrap_or(0.0) >= total,
        "the total goes on: {f}"
    );
    assert!(
        lab.log_tail(50).contains("a new usage period started"),
        "{}",
        lab.log_tail(20)
    );
    Ok(())
}

/// The packets the drop rule of `chain` counted.
fn dropped(lab: &Lab, chain: &str) -> anyhow::Result<u64> {
    let text = lab.gw(&["nft", "list", "chain", "inet", "uplinkd", chain])?;
    Ok(text
        .lines()
        .filter(|l| l.contains("drop"))
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "packets")?;
            w.get(i + 1)?.parse::<u64>().ok()
        })
        .sum())
}

/// A 1 MB quota used up by a transfer: the 80 % and 100 % events, the uplink in standby
/// (new connections and the established UDP flow leave it, a TCP connection through it
/// ends), and back as the last resort when the other uplink dies. Reloaded with
/// `quota_action = "stop"`, it carries nothing even then; an operator's larger quota brings
/// it back, a reload that changes the config's quota drops the operator's, and a reset
/// starts the count from zero.
#[test]
fn a_used_up_quota_moves_new_and_established_flows_and_comes_back() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with("quota = \"1MB\"\n"),
        UplinkSpec::new("isp2", 1, false).with("tier = 2\n"),
    ];
    let mut lab = Lab::build("quota", uplinks, 1, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{METRICS}{api}"))?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    assert_eq!(assigned[&IpAddr::from(client_v4(1))], "isp1");
    let remaining = || -> anyhow::Result<Option<f64>> {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_uplink_quota_remaining_bytes{uplink=\"isp1\"}")
            .copied())
    };
    assert!(
        remaining()?.is_some_and(|r| r > 900_000.0),
        "{:?}",
        remaining()?
    );
    let ctl = |lab: &Lab, args: &[&str]| -> anyhow::Result<String> {
        let (code, out, err) = lab.ctl("op", args)?;
        anyhow::ensure!(code == 0, "uplinkctl {args:?}: {err}");
        Ok(out)
    };
    let stream = UdpStream::start(&lab, 1, false, Duration::from_millis(20))?;
    let mut tcp = TcpFlow::connect(&lab, 1)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp1")
    );
    let mine = |k: usize| lab.ct_count(k, 1);
    // About 1.2 MB in and out.
    transfer(&lab, 1, 600, 1000)?;
    lab.wait_for(Duration::from_secs(10), "the quota used up", || {
        Ok(remaining()? == Some(0.0))
    })?;
    lab.wait_via(1, "isp2", Duration::from_secs(5))?;
    lab.wait_for(Duration::from_secs(10), "the UDP flow off isp1", || {
        Ok(mine(1)? == 0 && mine(2)? > 0)
    })?;
    assert!(
        tcp.exchange().is_err(),
        "the TCP connection through isp1 was deleted"
    );
    let events = ctl(&lab, &["events"])?;
    for want in [
        "quota of isp1: 80 % used",
        "quota of isp1: used up",
        "standby",
    ] {
        assert!(events.contains(want), "no {want:?} in:\n{events}");
    }
    let uplinks = ctl(&lab, &["uplinks"])?;
    assert!(uplinks.contains("quota used up (standby)"), "{uplinks}");
    assert!(uplinks.contains("1.0 MB"), "{uplinks}");

    // The level is kept across a crash: the restarted agent holds the uplink from its
    // first plan, and says nothing new about it.
    lab.wait_for(Duration::from_secs(5), "the level saved", || {
        Ok(usage_file(&lab, "isp1")?["level"] == "exhausted")
    })?;
    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    assert_eq!(lab.via(1)?, "isp2");
    let events = ctl(&lab, &["events"])?;
    assert!(!events.contains("used up"), "{events}");

    // The other uplink dies: the standby is the last resort.
    lab.carrier("isp2", false)?;
    lab.wait_via(1, "isp1", Duration::from_secs(10))?;

    // Stopped, it carries nothing even so: the client's new connections are dropped.
    lab.edit_config(
        "quota = \"1MB\"\n",
        "quota = \"1MB\"\nquota_action = \"stop\"\n",
    )?;
    ctl(&lab, &["reload"])?;
    let before = dropped(&lab, "home_isp1")?;
    lab.wait_for(
        Duration::from_secs(10),
        "the client's packets dropped",
        || {
            let _ = lab.probe(1, false, 1);
            Ok(dropped(&lab, "home_isp1")? > before)
        },
    )?;

    // An operator's larger quota brings it back; it shows as set.
    let out = ctl(&lab, &["quota", "set", "isp1", "1GB"])?;
    assert!(out.contains("1.0 GB set"), "{out}");
    lab.wait_via(1, "isp1", Duration::from_secs(10))?;
    // A reload that changes the config's quota drops the operator's.
    lab.edit_config("quota = \"1MB\"\n", "quota = \"3MB\"\n")?;
    ctl(&lab, &["reload"])?;
    let uplinks = ctl(&lab, &["uplinks"])?;
    assert!(
        uplinks.contains("3.0 MB") && !uplinks.contains(" set"),
        "{uplinks}"
    );
    // A reset: the period's count starts from zero.
    let out = ctl(&lab, &["-o", "json", "quota", "reset", "isp1"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["used_tx_bytes"].as_u64(), Some(0), "{out}");
    assert!(ctl(&lab, &["events"])?.contains("an operator reset the period's count"));
    let udp = stream.finish()?;
    assert!(udp.received > 0, "{udp:?}");
    Ok(())
}

/// Per-client usage (`lan.client_usage`): a known transfer from one client is counted on
/// its uplink within 2 % both ways, and `top` ranks it above a client that sent less.
#[test]
fn usage_per_client_counts_a_known_transfer_and_ranks_the_top_talkers() -> anyhow::Result<()> {
    let mut lab = Lab::build("perclient", two_uplinks(), 2, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{METRICS}{api}"))?;
    lab.edit_config("[lan]\n", "[lan]\nclient_usage = true\n")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let (c1, c2) = (client_v4(1).to_string(), client_v4(2).to_string());
    let u1 = assigned[&IpAddr::from(client_v4(1))].clone();
    let ctl = |args: &[&str]| -> anyhow::Result<serde_json::Value> {
        let (code, out, err) = lab.ctl("view", args)?;
        anyhow::ensure!(code == 0, "uplinkctl {args:?}: {err}");
        Ok(serde_json::from_str(&out)?)
    };
    let usage = |ip: &str| -> anyhow::Result<(f64, f64)> {
        let c = ctl(&["-o", "json", "clients"])?;
        let mine = c
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| {
                c["addresses"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == ip))
            })
            .cloned()
            .unwrap_or_default();
        let on = mine["usage"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|u| u["uplink"] == u1.as_str())
            .cloned()
            .unwrap_or_default();
        Ok((
            on["rx_bytes"].as_f64().unwrap_or(0.0),
            on["tx_bytes"].as_f64().unwrap_or(0.0),
        ))
    };
    let (rx0, tx0) = usage(&c1)?;
    let (out, back) = transfer(&lab, 1, 1000, 1000)?;
    transfer(&lab, 2, 100, 1000)?;
    lab.wait_for(Duration::from_secs(20), "the transfer counted", || {
        let (rx, tx) = usage(&c1)?;
        Ok(tx - tx0 >= out * 0.98 && rx - rx0 >= back * 0.98)
    })?;
    let (rx, tx) = usage(&c1)?;
    within("client out", tx - tx0, out);
    within("client in", rx - rx0, back);
    let top = ctl(&["-o", "json", "top"])?;
    let talkers = top["talkers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        talkers.first().map(|t| t["address"].clone()),
        Some(c1.clone().into()),
        "{top}"
    );
    assert!(talkers.iter().any(|t| t["address"] == c2.as_str()), "{top}");
    assert_eq!(top["window_seconds"], 60);
    let (code, wide, err) = lab.ctl("view", &["clients", "-o", "wide"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        wide.contains("USAGE") && wide.contains(&format!("{u1}:")),
        "{wide}"
    );
    Ok(())
}
