//! /metrics tells the truth: scraped in the namespace lab around real traffic and a real
//! failover.

use std::time::Duration;

use uplink_tests::{Lab, UdpStream, UplinkSpec};

/// Sample values by their full series name (`name{labels}`).
#[test]
fn metrics_after_traffic_and_a_failover() -> anyhow::Result<()> {
    let probe = "probes = [\"icmp:203.0.113.10\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false).with(probe),
        UplinkSpec::new("isp2", 1, false).with(probe),
    ];
    let mut lab = Lab::build("metrics", uplinks, 3, 0)?;
    lab.write_config(
        "10s",
        "10m",
        "[metrics]\nlisten = \"127.0.0.1:9477\"\n[failover]\nfailback_delay = \"60s\"\n",
    )?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let on_isp1: Vec<u32> = (1..=3)
        .filter(|i| assigned[&std::net::IpAddr::from(uplink_tests::client_v4(*i))] == "isp1")
        .collect();
    assert_eq!(on_isp1.len(), 2);

    let m = lab.scrape(9477)?;
    assert_eq!(m["uplinkd_uplink_clients{uplink=\"isp1\"}"], 2.0);
    assert_eq!(m["uplinkd_uplink_clients{uplink=\"isp2\"}"], 1.0);
    assert_eq!(m["uplinkd_uplink_weight{uplink=\"isp1\"}"], 2.0);
    assert_eq!(m["uplinkd_uplink_up{uplink=\"isp1\"}"], 1.0);
    assert_eq!(m["uplinkd_clients"], 3.0);
    assert_eq!(m["uplinkd_in_sync"], 1.0);
    assert_eq!(m["uplinkd_build_info{version=\"0.1.0\"}"], 1.0);
    let tx0 = m["uplinkd_uplink_transmit_bytes_total{uplink=\"isp1\"}"];
    let rx0 = m["uplinkd_uplink_receive_bytes_total{uplink=\"isp1\"}"];

    // 100 datagrams through isp1: the byte counters move by at least their size.
    let stream = UdpStream::start(&lab, on_isp1[0], false, Duration::from_millis(5))?;
    std::thread::sleep(Duration::from_millis(600));
    let r = stream.finish()?;
    let m = lab.scrape(9477)?;
    let (tx, rx) = (
        m["uplinkd_uplink_transmit_bytes_total{uplink=\"isp1\"}"] - tx0,
        m["uplinkd_uplink_receive_bytes_total{uplink=\"isp1\"}"] - rx0,
    );
    assert!(
        tx >= (r.sent * 28) as f64 && rx >= (r.received * 28) as f64,
        "tx {tx} rx {rx} for {} datagrams",
        r.sent
    );
    assert!(m["uplinkd_uplink_probe_rtt_seconds_count{uplink=\"isp1\"}"] > 0.0);
    assert!(m["uplinkd_dispatch_latency_seconds_count"] > 0.0);

    lab.carrier("isp1", false)?;
    // The gauges are published after the failover's apply, a moment after its log line
    // (the counters move at the log line): wait on a gauge.
    lab.wait_for(Duration::from_secs(5), "failover in the metrics", || {
        Ok(lab.scrape(9477)?.get("uplinkd_uplink_up{uplink=\"isp1\"}") == Some(&0.0))
    })?;
    let m = lab.scrape(9477)?;
    assert_eq!(m["uplinkd_uplink_up{uplink=\"isp1\"}"], 0.0);
    assert_eq!(
        m["uplinkd_uplink_state{state=\"down\",uplink=\"isp1\"}"],
        1.0
    );
    assert_eq!(m["uplinkd_uplink_state{state=\"up\",uplink=\"isp1\"}"], 0.0);
    assert_eq!(m["uplinkd_failovers_total{uplink=\"isp1\"}"], 1.0);
    assert_eq!(m["uplinkd_failovers_total{uplink=\"isp2\"}"], 0.0);
    assert_eq!(m["uplinkd_uplink_flaps_total{uplink=\"isp1\"}"], 1.0);
    assert!(m["uplinkd_apply_duration_seconds_count"] > 0.0);
    assert_eq!(m["uplinkd_apply_errors_total"], 0.0);

    // The exposition passes promtool's lint (Debian package prometheus).
    let text = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes())?;
    let out = promtool.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `[metrics] cert/key`: /metrics over HTTPS only.
#[test]
fn metrics_over_tls() -> anyhow::Result<()> {
    let mut lab = Lab::build("mtls", vec![UplinkSpec::new("isp1", 1, false)], 0, 0)?;
    let _ = lab.api_config()?; // makes the CA and a certificate for 127.0.0.1
    let certs = lab.dir.join("certs");
    let d = certs.display();
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:9477\"\ncert = \"{d}/gw.crt\"\nkey = \"{d}/gw.key\"\n"
        ),
    )?;
    lab.start_agent()?;
    let body = lab.gw(&[
        "curl",
        "-sf",
        "--cacert",
        &format!("{d}/ca.crt"),
        "https://127.0.0.1:9477/metrics",
    ])?;
    assert!(body.contains("uplinkd_build_info"), "{body}");
    assert!(
        lab.gw(&["curl", "-sf", "http://127.0.0.1:9477/metrics"])
            .is_err(),
        "plain HTTP must not be served"
    );
    Ok(())
}
