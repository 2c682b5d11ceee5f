//! The gRPC API and uplinkctl against real agents over real mTLS.

use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec, client_v4, two_uplinks};

/// Test 2 and the basics: viewers read, operators write, agent certs are no clients.
#[test]
fn roles_decide_who_may_write() -> anyhow::Result<()> {
    let mut lab = Lab::build("roles", two_uplinks(), 2, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let c1 = IpAddr::from(client_v4(1));
    let other = if assigned[&c1] == "isp1" {
        "isp2"
    } else {
        "isp1"
    };

    let (code, out, err) = lab.ctl("view", &["status"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("IN_SYNC") && out.contains("true"), "{out}");
    let (code, _, err) = lab.ctl("view", &["pin", &c1.to_string(), other])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("PermissionDenied") && err.contains("operator role"),
        "{err}"
    );
    let (code, _, err) = lab.ctl("gw", &["status"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("agent certificate cannot act as a client"),
        "{err}"
    );
    let (code, out, err) = lab.ctl("op", &["pin", &c1.to_string(), other])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(other), "{out}");
    assert_eq!(
        lab.via(1)?,
        other,
        "a pinned client's new flows leave by the pinned uplink"
    );
    Ok(())
}

fn api_lab(tag: &str, clients: u32, extra: &str) -> anyhow::Result<Lab> {
    let mut lab = Lab::build(tag, two_uplinks(), clients, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{extra}{api}"))?;
    lab.start_agent()?;
    Ok(lab)
}

/// Test 1: no certificate, a certificate from another CA, and an expired one are refused
/// at the handshake.
#[test]
fn handshakes_without_a_valid_client_certificate_are_refused() -> anyhow::Result<()> {
    let lab = api_lab("hs", 0, "")?;
    let certs = lab.dir.join("certs");
    let d = certs.to_str().unwrap();
    let ctl = uplink_tests::uplinkctl_bin();
    let ctl = ctl.to_str().unwrap();
    // Another CA with its own operator; and an operator whose certificate has expired.
    let other = lab.dir.join("other");
    uplink_tests::sh(&[ctl, "certs", "init", "--dir", other.to_str().unwrap()])?;
    uplink_tests::sh(&[
        ctl,
        "certs",
        "issue",
        "--dir",
        other.to_str().unwrap(),
        "--operator",
        "intruder",
    ])?;
    std::fs::copy(other.join("intruder.crt"), certs.join("intruder.crt"))?;
    std::fs::copy(other.join("intruder.key"), certs.join("intruder.key"))?;
    uplink_tests::issue_expired_operator(&certs, "old")?;
    let (code, _, err) = uplink_tests::outcome(std::process::Command::new(ctl).args([
        "certs", "issue", "--dir", d, "--viewer", "v0", "--days", "0",
    ]))?;
    assert_ne!(code, 0);
    assert!(err.contains("--days 0: must be between 1 and"), "{err}");

    for who in ["intruder", "old"] {
        let (code, _, err) = lab.ctl(who, &["status"])?;
        assert_eq!(code, 4, "{who}: {err}");
        // `events --follow` retried a rejected certificate for ever: it exits as the
        // others do (the outer timeout only bounds the test if it did not).
        let follow = uplink_tests::uplinkctl_in(&lab.ns("gw"), &certs, &certs.join("ca.crt"), who);
        let (code, _, err) = uplink_tests::outcome(
            std::process::Command::new("timeout")
                .arg("30")
                .arg(follow.get_program())
                .args(follow.get_args())
                .args(["--gateway", "127.0.0.1:7443", "events", "--follow"]),
        )?;
        assert_eq!(code, 4, "{who}: events --follow: {err}");
        assert!(err.contains("certificate was rejected"), "{who}: {err}");
    }
    // The server logs a refusal after the client has seen it: wait for both lines.
    // Both CAs are called "uplink CA": the foreign one fails on its signature.
    lab.wait_for(Duration::from_secs(5), "both refusals logged", || {
        let log = lab.log_tail(50);
        Ok(log.contains("TLS handshake refused")
            && (log.contains("UnknownIssuer") || log.contains("BadSignature"))
            && log.contains("certificate expired"))
    })?;
    // No certificate at all (curl offers none).
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.ns("gw"),
            "curl",
            "-s",
            "--http2",
            "--cacert",
            &format!("{d}/ca.crt"),
            "https://127.0.0.1:7443/uplink.v1.Agent/GetStatus",
        ])
        .output()?;
    assert!(
        !out.status.success(),
        "a client without a certificate got through"
    );
    assert!(
        lab.log_tail(5).contains("TLS handshake refused"),
        "{}",
        lab.log_tail(5)
    );
    // The plaintext health listener needs no certificate.
    let health = lab.gw(&["curl", "-s", "http://127.0.0.1:7444/readyz"])?;
    assert_eq!(health.trim(), "ready");
    Ok(())
}

/// Test 3: bad input gets the right status code and a clear message.
#[test]
fn bad_input_gets_clear_errors() -> anyhow::Result<()> {
    let lab = api_lab("badin", 1, "")?;
    lab.greet_clients()?;
    let c1 = client_v4(1).to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["pin", &c1, "nosuch"],
            2,
            "NotFound: unknown uplink \"nosuch\"; this gateway has isp1, isp2",
        ),
        (
            &["pin", "198.19.0.99", "isp1"],
            2,
            "NotFound: no client with address 198.19.0.99",
        ),
        (
            &["pin", "198.19.0.300", "isp1"],
            1,
            "is not an IPv4 or IPv6 address",
        ),
        (&["drain", "nosuch"], 2, "NotFound: unknown uplink"),
        (&["unpin", &c1], 2, "NotFound: no override for"),
        (&["failback", "isp1"], 2, "FailedPrecondition"),
    ];
    for (args, code, msg) in cases {
        let (got, _, err) = lab.ctl("op", args)?;
        assert_eq!(got, *code, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    }
    // A bad duration is refused before any gateway is contacted.
    let (code, _, err) = lab.ctl("op", &["pin", &c1, "isp1", "--for", "banana"])?;
    assert_eq!(code, 2);
    assert!(err.contains("\"banana\" is not a duration"), "{err}");
    // A missing credential file: one line, non-zero.
    let out = std::process::Command::new(uplink_tests::uplinkctl_bin())
        .args([
            "--gateway",
            "127.0.0.1:7443",
            "--ca",
            "/nonexistent/ca.crt",
            "--cert",
            "x",
            "--key",
            "y",
            "status",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("cannot read --ca /nonexistent/ca.crt"),
        "{err}"
    );
    // Draining the last healthy uplink is refused.
    assert_eq!(lab.ctl("op", &["drain", "isp1"])?.0, 0);
    let (code, _, err) = lab.ctl("op", &["drain", "isp2"])?;
    assert_eq!(code, 2);
    assert!(
        err.contains("FailedPrecondition") && err.contains("last healthy uplink"),
        "{err}"
    );
    Ok(())
}

/// Test 4: a pin moves new flows, leaves an established TCP connection alone, survives a
/// restart, and a pin `--for 2s` expires by itself.
#[test]
fn pins_move_new_flows_survive_restart_and_expire() -> anyhow::Result<()> {
    let mut lab = api_lab("pin", 2, "")?;
    let assigned = lab.greet_clients()?;
    let c1 = IpAddr::from(client_v4(1));
    let home = assigned[&c1].clone();
    let other = if home == "isp1" { "isp2" } else { "isp1" };
    let mut tcp = uplink_tests::TcpFlow::connect(&lab, 1)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some(home.as_str())
    );

    let (code, _, err) = lab.ctl("op", &["pin", &c1.to_string(), other])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.via(1)?, other);
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some(home.as_str()),
        "the established connection stays"
    );
    let (_, out, _) = lab.ctl("op", &["clients", "-o", "json"])?;
    let clients: serde_json::Value = serde_json::from_str(&out)?;
    let me = clients
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["addresses"][0] == c1.to_string())
        .expect("c1 listed");
    assert_eq!(
        (
            me["current_uplink"].as_str(),
            me["reason"].as_str(),
            me["home_uplink"].as_str()
        ),
        (Some(other), Some("override"), Some(home.as_str()))
    );

    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    assert_eq!(lab.via(1)?, other, "the pin survives a restart");
    let (_, out, _) = lab.ctl("view", &["clients", "-o", "json"])?;
    assert!(out.contains("\"override\""), "{out}");

    let c2 = IpAddr::from(client_v4(2));
    let home2 = assigned[&c2].clone();
    let other2 = if home2 == "isp1" { "isp2" } else { "isp1" };
    assert_eq!(
        lab.ctl("op", &["pin", &c2.to_string(), other2, "--for", "2s"])?
            .0,
        0
    );
    assert_eq!(lab.via(2)?, other2);
    lab.wait_for(Duration::from_secs(6), "the timed pin to expire", || {
        Ok(lab.via(2)? == home2)
    })?;
    assert!(
        lab.log_tail(30)
            .contains(&format!("override of {c2} expired"))
    );
    Ok(())
}

/// Test 5: drain moves every client's new flows off an uplink while established ones finish
/// on it, new clients avoid it, undrain brings its clients home and lets new ones land.
#[test]
fn drain_and_undrain() -> anyhow::Result<()> {
    let mut lab = api_lab("drain", 2, "")?;
    let homes = lab.greet_clients()?;
    let on_isp1 = (1..=2)
        .find(|&i| homes[&IpAddr::from(client_v4(i))] == "isp1")
        .expect("one client per uplink");
    let mut tcp = uplink_tests::TcpFlow::connect(&lab, on_isp1)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp1")
    );
    assert_eq!(lab.ctl("op", &["drain", "isp1"])?.0, 0);
    for i in 1..=2 {
        assert_eq!(lab.via(i)?, "isp2", "c{i} left the drained uplink");
    }
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp1"),
        "an established connection finishes on the drained uplink"
    );
    let (_, out, _) = lab.ctl("view", &["uplinks"])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("isp1") && l.contains("draining")),
        "{out}"
    );
    lab.add_client(3, false)?;
    lab.probe(3, false, 10)?;
    let c3 = IpAddr::from(client_v4(3));
    lab.wait_for(Duration::from_secs(5), "c3 assigned", || {
        Ok(lab.assignments()?.contains_key(&c3))
    })?;
    assert_eq!(
        lab.assignments()?[&c3],
        "isp2",
        "a new client avoids the drained uplink"
    );
    assert_eq!(lab.ctl("op", &["undrain", "isp1"])?.0, 0);
    for i in 1..=2 {
        let home = &homes[&IpAddr::from(client_v4(i))];
        assert_eq!(&lab.via(i)?, home, "c{i} is back on its home uplink");
    }
    lab.add_client(4, false)?;
    lab.probe(4, false, 10)?;
    let c4 = IpAddr::from(client_v4(4));
    lab.wait_for(Duration::from_secs(5), "c4 assigned", || {
        Ok(lab.assignments()?.contains_key(&c4))
    })?;
    assert_eq!(
        lab.assignments()?[&c4],
        "isp1",
        "undrained: the least-loaded uplink takes the next client"
    );
    Ok(())
}

/// Test 7: WatchEvents (uplinkctl events --follow) delivers a failover after a carrier cut.
#[test]
fn events_stream_a_failover() -> anyhow::Result<()> {
    let lab = api_lab("events", 2, "")?;
    lab.greet_clients()?;
    let certs = lab.dir.join("certs");
    let mut follow =
        uplink_tests::uplinkctl_in(&lab.ns("gw"), &certs, &certs.join("ca.crt"), "view")
            .args([
                "--gateway",
                "127.0.0.1:7443",
                "-o",
                "json",
                "events",
                "--follow",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    lab.carrier("isp1", false)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut got = None;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let e: serde_json::Value = serde_json::from_str(&line)?;
            if e["kind"] == "failover" && e["uplink"] == "isp1" {
                got = Some(e);
                break;
            }
        }
    }
    let _ = follow.kill();
    let e = got.ok_or_else(|| anyhow::anyhow!("no failover event streamed"))?;
    assert_eq!(e["clients_moved"], 1);
    Ok(())
}

/// Test 8: new certificate files are served to new connections without a restart, and a
/// new CA bundle is trusted without one.
#[test]
fn rotated_agent_certificate_is_served_without_restart() -> anyhow::Result<()> {
    let mut lab = api_lab("rot", 0, "")?;
    let certs = lab.dir.join("certs");
    let ctl = uplink_tests::uplinkctl_bin();
    let ctl = ctl.to_str().unwrap();
    // A second CA signs the replacement agent certificate; clients keep theirs.
    let ca2 = lab.dir.join("ca2");
    uplink_tests::sh(&[ctl, "certs", "init", "--dir", ca2.to_str().unwrap()])?;
    uplink_tests::sh(&[
        ctl,
        "certs",
        "issue",
        "--dir",
        ca2.to_str().unwrap(),
        "--agent",
        "gw",
        "--san",
        "127.0.0.1",
    ])?;
    // `uplinkctl status` as client `who` (certificate in `dir`), trusting server CA `ca`.
    let gw = lab.ns("gw");
    let status = |dir: &std::path::Path, who: &str, ca: &std::path::Path| -> anyhow::Result<i32> {
        Ok(
            uplink_tests::outcome(uplink_tests::uplinkctl_in(&gw, dir, ca, who).args([
                "--gateway",
                "127.0.0.1:7443",
                "status",
            ]))?
            .0,
        )
    };
    let (old_ca, new_ca) = (certs.join("ca.crt"), ca2.join("ca.crt"));
    assert_eq!(status(&certs, "view", &old_ca)?, 0);
    assert_eq!(
        status(&certs, "view", &new_ca)?,
        4,
        "before rotation the agent presents the old certificate"
    );
    // Replace key first, then cert, as a rotation does; the agent keeps the old pair until
    // the new one loads.
    std::fs::copy(ca2.join("gw.key"), certs.join("gw.key"))?;
    std::fs::copy(ca2.join("gw.crt"), certs.join("gw.crt"))?;
    lab.wait_for(Duration::from_secs(5), "the new certificate", || {
        Ok(status(&certs, "view", &new_ca)? == 0)
    })?;
    assert!(lab.agent_running());
    assert!(lab.log_tail(20).contains("reloaded the API certificate"));

    // CA rollover: clients of the second CA are refused until the CA file holds both CAs,
    // then both old and new clients are accepted; a CA file that does not load keeps them.
    let d2 = ca2.to_str().unwrap();
    uplink_tests::sh(&[ctl, "certs", "issue", "--dir", d2, "--viewer", "view2"])?;
    assert_ne!(
        status(&ca2, "view2", &new_ca)?,
        0,
        "the second CA is not trusted yet"
    );
    let bundle = std::fs::read_to_string(&old_ca)? + &std::fs::read_to_string(&new_ca)?;
    std::fs::write(&old_ca, bundle)?;
    lab.wait_for(Duration::from_secs(5), "the new CA", || {
        Ok(status(&ca2, "view2", &new_ca)? == 0)
    })?;
    assert_eq!(
        status(&certs, "view", &new_ca)?,
        0,
        "old clients still verify against the old CA in the bundle"
    );
    assert!(lab.log_tail(20).contains("reloaded the API client CA"));
    std::fs::write(&old_ca, "not a certificate\n")?;
    assert_eq!(
        status(&ca2, "view2", &new_ca)?,
        0,
        "a broken CA file keeps the loaded CAs"
    );
    assert!(
        lab.log_tail(20)
            .contains("does not load; keeping the old one")
    );
    assert!(lab.agent_running());
    Ok(())
}

/// Test 10: golden output, table and JSON.
#[test]
fn golden_uplinks_output() -> anyhow::Result<()> {
    let lab = api_lab("golden", 0, "")?;
    let (code, table, err) = lab.ctl("view", &["uplinks"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        table,
        "UPLINK  STATE  TIER  WEIGHT  HOMED  CARRIED  RTT_MS  LOSS  JITTER_MS  USED  QUOTA  GATEWAY\n\
         isp1    up     1     1       0      0        -       -     -          0 B   -      100.64.1.1\n\
         isp2    up     1     1       0      0        -       -     -          0 B   -      100.64.2.1\n"
    );
    let (_, wide, _) = lab.ctl("view", &["uplinks", "-o", "wide"])?;
    assert!(
        wide.lines().nth(1).unwrap().ends_with(
            "wan1       0x1000000  1001   true     2001:db8:100:1::1  100.64.1.2,2001:db8:100:1::2  false    -            -              -"
        ),
        "{wide}"
    );
    let (_, json, _) = lab.ctl("view", &["uplinks", "-o", "json"])?;
    let mut v: serde_json::Value = serde_json::from_str(&json)?;
    // The usage period's start depends on the day (0 before the first count).
    let period = v[0]["period_start_ms"].take();
    assert!(period.as_u64().is_some(), "{period}");
    assert_eq!(
        v[0],
        serde_json::json!({"name": "isp1", "interface": "wan1", "weight": 1, "tier": 1, "state": "up", "balance": "client", "fwmark": 16777216, "table": 1001, "clients": 0, "rtt_ms": null, "loss_ratio": null, "jitter_ms": null, "serving": true, "tx_bytes": 0, "tx_packets": 0, "rx_bytes": 0, "rx_packets": 0, "failback_in_ms": null, "failback_manual": false, "clients_carried": 0, "down_reason": "", "gateway": "100.64.1.1", "gateway6": "2001:db8:100:1::1", "addresses": ["100.64.1.2", "2001:db8:100:1::2"], "probe_interval_ms": null, "probe_bytes_per_day": null, "metered": false, "used_rx_bytes": 0, "used_tx_bytes": 0, "period_start_ms": null, "quota_bytes": null, "quota_set": false, "quota_action": "", "quota_level": "", "probe_results": []})
    );
    Ok(())
}

/// Golden output of the writes: each answers with its read command's view or one line;
/// times read as people read them in tables and stay machine values in JSON.
#[test]
fn golden_write_answers() -> anyhow::Result<()> {
    let lab = api_lab("goldenw", 1, "")?;
    lab.greet_clients()?;
    let c1 = uplink_tests::client_v4(1).to_string();
    // drain answers with the `uplinks` view of that uplink: same columns, hex mark.
    let (code, drained, err) = lab.ctl("op", &["drain", "isp2", "-o", "wide"])?;
    assert_eq!(code, 0, "{err}");
    let (_, listed, _) = lab.ctl("view", &["uplinks", "-o", "wide"])?;
    let header = listed.lines().next().unwrap();
    assert_eq!(drained.lines().next(), Some(header), "{drained}");
    let row = listed.lines().find(|l| l.starts_with("isp2")).unwrap();
    assert_eq!(drained.lines().nth(1), Some(row), "{drained}");
    assert!(
        row.contains("draining") && row.contains("0x2000000"),
        "{row}"
    );
    // pin answers with one line and a deadline people read.
    let (code, pinned, err) = lab.ctl("op", &["pin", &c1, "isp1", "--for", "30s"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        pinned.starts_with(&format!("pinned {c1} to isp1 until 20"))
            && pinned.trim_end().ends_with("(in 30s)"),
        "{pinned}"
    );
    let (_, json, _) = lab.ctl("op", &["pin", &c1, "isp1", "--for", "30s", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    assert!(
        v["expires_at_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 1_700_000_000_000),
        "{v}"
    );
    let (_, unpinned, _) = lab.ctl("op", &["unpin", &c1])?;
    assert_eq!(unpinned, format!("unpinned {c1}\n"));
    let (_, reloaded, _) = lab.ctl("op", &["reload"])?;
    assert!(
        reloaded.starts_with("config reloaded (generation "),
        "{reloaded}"
    );
    // events: "WHEN" is relative ("now", "12s ago"), local RFC 3339 with -o wide.
    let (_, events, _) = lab.ctl("view", &["events"])?;
    assert!(events.starts_with("WHEN  "), "{events}");
    let drain = events.lines().find(|l| l.contains("drain")).unwrap();
    assert!(
        drain.starts_with("now ") || drain.contains(" ago "),
        "{drain}"
    );
    let (_, wide, _) = lab.ctl("view", &["events", "-o", "wide"])?;
    let stamp = wide
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        stamp.starts_with("20") && stamp.contains('T') && stamp.len() == 25,
        "{stamp}"
    );
    Ok(())
}

/// Test 9: a fleet of 5 agents plus one unreachable address: 5 results and 1 error, exit
/// code 4, within the timeout plus a small margin; a selector picks the right subset.
#[test]
fn fleet_status_with_one_unreachable_gateway() -> anyhow::Result<()> {
    let fleet = uplink_tests::Fleet::build("fleet", 5)?;
    fleet.add_unreachable()?;
    let t = std::time::Instant::now();
    let (code, out, err) = fleet.ctl(&["--timeout", "2s", "status", "-o", "json"])?;
    let took = t.elapsed();
    assert_eq!(code, 4, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let items = v.as_array().expect("a list per gateway");
    assert_eq!(items.len(), 6);
    assert_eq!(items.iter().filter(|i| i["ok"] == true).count(), 5);
    let dead = items
        .iter()
        .find(|i| i["ok"] == false)
        .expect("one failure");
    assert_eq!(
        (dead["gateway"].as_str(), dead["unreachable"].as_bool()),
        (Some("gw-dead"), Some(true))
    );
    assert!(err.contains("gw-dead: unreachable"), "{err}");
    assert!(
        took < Duration::from_millis(3500),
        "the dead gateway held the others up: {took:?}"
    );
    assert_eq!(items[0]["result"]["name"], "gw-000");

    let (code, out, _) = fleet.ctl(&["-l", "site=odd", "status", "-o", "json"])?;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["gateway"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["gw-001", "gw-003"]);
    Ok(())
}

/// `uplinkctl set add` across a fleet: every agent has the element in its kernel set and
/// lists it.
#[test]
fn set_elements_change_across_a_fleet() -> anyhow::Result<()> {
    let fleet = uplink_tests::Fleet::build("fleetset", 3)?;
    let (code, out, err) = fleet.ctl(&["set", "add", "saas", "198.51.100.7", "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v.as_array().map(|a| a.len()), Some(3), "{out}");
    for gw in &fleet.gateways {
        let set = gw.exec(&["nft", "list", "set", "inet", "uplinkd", "saas_v4"])?;
        assert!(set.contains("198.51.100.7"), "{}: {set}", gw.0);
    }
    let (code, out, _) = fleet.ctl(&["sets", "-o", "json"])?;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out)?;
    for g in v.as_array().unwrap() {
        assert_eq!(
            g["result"][0]["elements"],
            serde_json::json!(["198.51.100.7/32"]),
            "{out}"
        );
    }
    Ok(())
}

/// Test 6: ReloadConfig adds a third uplink without loss on the other two; a broken
/// config is rejected with its error and the old one stays.
#[test]
fn reload_over_the_api() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ];
    let mut lab = Lab::build("apireload", uplinks, 2, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    let full = std::fs::read_to_string(lab.config_path())?;
    let lte = full
        .find("[[uplink]]\nname = \"lte\"")
        .expect("lte section");
    let api_at = full.find("\n[api]").expect("api section");
    std::fs::write(
        lab.config_path(),
        format!("{}{}", &full[..lte], &full[api_at..]),
    )?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let streams = (1..=2)
        .map(|i| uplink_tests::UdpStream::start(&lab, i, false, Duration::from_millis(10)))
        .collect::<anyhow::Result<Vec<_>>>()?;

    std::fs::write(lab.config_path(), full.replace("weight = 1", "weight = 0"))?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("FailedPrecondition") && err.contains("must be between 1 and 1000"),
        "{err}"
    );
    std::fs::write(lab.config_path(), &full)?;
    let (code, out, err) = lab.ctl("op", &["reload", "-o", "json"])?;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"config_generation\": 2"), "{out}");
    let (_, out, _) = lab.ctl("view", &["uplinks"])?;
    assert!(out.lines().any(|l| l.starts_with("lte")), "{out}");
    std::thread::sleep(Duration::from_millis(300));
    for s in streams {
        let r = s.finish()?;
        assert_eq!(
            r.received, r.sent,
            "a flow on an existing uplink lost datagrams"
        );
    }
    Ok(())
}

/// Standard gRPC tooling works: grpc.health.v1 and server reflection (Python grpcio).
#[test]
fn health_and_reflection_with_standard_tooling() -> anyhow::Result<()> {
    let lab = api_lab("tooling", 0, "")?;
    let certs = lab.dir.join("certs");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc_tooling.py");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw"), "python3"])
        .arg(script)
        .arg("127.0.0.1:7443")
        .arg(certs.join("ca.crt"))
        .arg(certs.join("view.crt"))
        .arg(certs.join("view.key"))
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{stdout}{stderr} (pip install grpcio grpcio-health-checking grpcio-reflection; .ci/install-deps does)"
    );
    assert!(stdout.contains("health SERVING"), "{stdout}");
    assert!(
        stdout.contains("grpc.health.v1.Health") && stdout.contains("uplink.v1.Agent"),
        "{stdout}"
    );
    assert!(
        stdout.contains("SetOverride") && stdout.contains("WatchEvents"),
        "{stdout}"
    );
    Ok(())
}

/// ListClients' current uplink for failed-over clients (hashed over the survivors in nft)
/// matches the uplink the internet host actually sees.
#[test]
fn current_uplink_matches_the_kernels_hash() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ];
    let mut lab = Lab::build("curr", uplinks, 12, 0)?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[failover]\nfailback_delay = \"60s\"\n{api}"),
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    lab.carrier("isp1", false)?;
    // Readiness from the API itself: the log line comes before the snapshot it serves.
    let mut clients = serde_json::Value::Null;
    lab.wait_for(Duration::from_secs(5), "failover in the API", || {
        let (_, out, _) = lab.ctl("view", &["clients", "-o", "json"])?;
        clients = serde_json::from_str(&out)?;
        Ok(clients
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["reason"] == "failover")))
    })?;
    let mut checked = std::collections::BTreeSet::new();
    for i in 1..=12 {
        let ip = IpAddr::from(client_v4(i));
        if assigned[&ip] != "isp1" {
            continue;
        }
        let c = clients
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["addresses"][0] == ip.to_string())
            .expect("listed");
        assert_eq!(c["reason"], "failover");
        let seen = lab.via(i)?;
        assert_eq!(
            c["current_uplink"].as_str(),
            Some(seen.as_str()),
            "c{i}: the API says {} but traffic leaves by {seen}",
            c["current_uplink"]
        );
        checked.insert(seen);
    }
    assert_eq!(
        checked.len(),
        2,
        "both survivors carry some of isp1's clients, so the hash was exercised"
    );
    Ok(())
}

/// `events --follow` across a fleet: one stream per gateway merged, each line tagged with
/// its gateway; a gateway that restarts is reconnected (and uplinkctl says so), and its
/// events after the restart arrive; nothing is printed twice.
#[test]
fn fleet_events_follow_merges_and_reconnects() -> anyhow::Result<()> {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let mut fleet = uplink_tests::Fleet::build("fevents", 3)?;
    let certs = fleet.dir.join("certs");
    let mut follow = uplink_tests::uplinkctl_in(&fleet.mgmt.0, &certs, &certs.join("ca.crt"), "op")
        .arg("--inventory")
        .arg(fleet.dir.join("inventory.toml"))
        .args(["events", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    for pipe in [
        Box::new(follow.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(follow.stderr.take().unwrap()),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    let seen =
        |pred: &dyn Fn(&str) -> bool| lines.lock().unwrap().iter().filter(|l| pred(l)).count();
    let wait = |what: &str, pred: &dyn Fn(&str) -> bool| -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while seen(pred) == 0 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "no {what} in:\n{}",
                lines.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    };
    // A reload on every gateway: each one's event arrives, tagged with its gateway. (The
    // follower may connect after the first reloads; they are in the history it is sent.)
    let (code, _, err) = fleet.ctl(&["reload"])?;
    assert_eq!(code, 0, "{err}");
    for gw in ["gw-000", "gw-001", "gw-002"] {
        wait(&format!("{gw}'s reload"), &|l: &str| {
            l.starts_with(&format!("{gw}  ")) && l.contains("reload")
        })?;
    }
    fleet.restart(1)?;
    wait("the disconnect", &|l: &str| {
        l.starts_with("gw-001: disconnected")
    })?;
    wait("the reconnect", &|l: &str| l == "gw-001: reconnected")?;
    let (code, _, err) = fleet.ctl(&["-l", "site=odd", "reload"])?;
    assert_eq!(code, 0, "{err}");
    let reloads =
        |gw: &str| seen(&|l: &str| l.starts_with(&format!("{gw}  ")) && l.contains("reload"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reloads("gw-001") < 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no reload of gw-001 after its restart:\n{}",
            lines.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each event once: the other streams were not disturbed, and gw-001's new agent has
    // only its new reload to tell.
    assert_eq!((reloads("gw-000"), reloads("gw-002")), (1, 1));
    // A marker: one more reload of gw-001, its new agent's generation 3. One gateway's
    // stream arrives in order, so a history printed twice would be in before it.
    let (code, _, err) = fleet.ctl(&["-l", "site=odd", "reload"])?;
    assert_eq!(code, 0, "{err}");
    wait("the marker reload", &|l: &str| {
        l.starts_with("gw-001  ") && l.contains("(generation 3)")
    })?;
    assert_eq!(reloads("gw-001"), 3, "{}", lines.lock().unwrap().join("\n"));
    let _ = follow.kill();
    let _ = follow.wait();
    Ok(())
}

/// A rolling reload across 4 real agents, one of which has a broken config: batch by
/// batch, stopping at it with a summary; the gateway after it is untouched. Without
/// --stop-on-error the roll goes on past it. Exit codes as for any fleet command.
#[test]
fn rolling_reload_stops_at_the_first_failure() -> anyhow::Result<()> {
    let fleet = uplink_tests::Fleet::build("froll", 4)?;
    std::fs::write(fleet.dir.join("gw2.toml"), "[lan\nbroken")?;
    let generation = |gw: &str| -> anyhow::Result<u64> {
        let (_, out, _) = fleet.ctl(&["-o", "json", "status"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array()
            .and_then(|a| a.iter().find(|g| g["gateway"] == gw))
            .and_then(|g| g["result"]["config_generation"].as_u64())
            .unwrap_or_default())
    };
    let (code, out, err) =
        fleet.ctl(&["reload", "--rolling", "--batch", "1", "--stop-on-error"])?;
    assert_eq!(code, 2, "{out}{err}");
    for want in [
        "rolling: batch 1 of 4: gw-000",
        "rolling: batch 3 of 4: gw-002",
        "gw-002: FailedPrecondition: reload rejected",
        "rolling: done on gw-000, gw-001; failed on gw-002",
        "not done on gw-003",
    ] {
        assert!(err.contains(want), "missing {want:?}:\n{err}");
    }
    assert!(!err.contains("batch 4 of 4"), "{err}");
    assert!(out.contains("config reloaded (generation 2)"), "{out}");
    assert_eq!((generation("gw-001")?, generation("gw-003")?), (2, 1));

    // Without --stop-on-error, two at a time: it goes on past the broken one.
    let (code, _, err) = fleet.ctl(&["reload", "--rolling", "--batch", "2", "--pause", "100ms"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rolling: batch 2 of 2: gw-002, gw-003"),
        "{err}"
    );
    assert!(
        err.contains("rolling: done on gw-000, gw-001, gw-003; failed on gw-002"),
        "{err}"
    );
    assert_eq!(generation("gw-003")?, 2);
    // A read does not roll.
    let (code, _, err) = fleet.ctl(&["uplinks", "--rolling"])?;
    assert_eq!(code, 1);
    assert!(err.contains("--rolling applies to writes"), "{err}");
    Ok(())
}

/// A fleet-wide quota change, rolled one gateway at a time: each answers with the uplink
/// as `uplinks` shows it, and its event log has the operator's change.
#[test]
fn fleet_quota_set_and_reset_roll_over_the_gateways() -> anyhow::Result<()> {
    let fleet = uplink_tests::Fleet::build("fquota", 3)?;
    let (code, out, err) = fleet.ctl(&["quota", "set", "isp1", "20GiB", "--rolling"])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        err.contains("rolling: done on gw-000, gw-001, gw-002; failed on none"),
        "{err}"
    );
    assert_eq!(out.matches("21.5 GB set").count(), 3, "{out}");
    let (code, out, err) = fleet.ctl(&[
        "-o",
        "json",
        "quota",
        "reset",
        "isp1",
        "--rolling",
        "--batch",
        "2",
    ])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("rolling: batch 2 of 2: gw-002"), "{err}");
    // One JSON document per batch.
    let mut used = Vec::new();
    for batch in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        for answer in batch?.as_array().into_iter().flatten() {
            used.push(answer["result"]["used_tx_bytes"].as_u64());
        }
    }
    assert_eq!(used, [Some(0); 3], "{out}");
    let (code, out, err) = fleet.ctl(&["events"])?;
    assert_eq!(code, 0, "{err}");
    for gw in ["gw-000", "gw-001", "gw-002"] {
        let section = out
            .split("== ")
            .find(|s| s.starts_with(gw))
            .unwrap_or_default();
        for want in [
            "quota of isp1: an operator set the quota to 21.5 GB",
            "quota of isp1: an operator reset the period's count",
        ] {
            assert!(section.contains(want), "no {want:?} from {gw}:\n{out}");
        }
    }
    // A gateway without that uplink refuses by name.
    let (code, _, err) = fleet.ctl(&["quota", "reset", "lte"])?;
    assert_ne!(code, 0);
    assert!(err.contains("lte"), "{err}");
    Ok(())
}
