//! Passive evidence of failure on the real dataplane: LAN packets that leave by an uplink
//! and get no reply make it suspect; a probe burst then decides. A silent upstream takes
//! the uplink down by the burst; a client talking to one dead server, or a blackout
//! shorter than the burst, does not.

use std::time::Duration;

use uplink_tests::{Lab, UdpStream, probed_uplinks, sh};

/// The bursts of `uplink` with this result so far (`answered`, `failed`).
fn bursts(lab: &Lab, uplink: &str, result: &str) -> anyhow::Result<f64> {
    Ok(lab
        .scrape(9477)?
        .iter()
        .filter(|(k, _)| {
            k.starts_with("uplinkd_uplink_probe_bursts_total{")
                && k.contains(&format!("uplink=\"{uplink}\""))
                && k.contains(&format!("result=\"{result}\""))
        })
        .map(|(_, v)| *v)
        .sum())
}

/// A lab whose probes alone would take many seconds to judge an uplink down
/// (`down_after`): what takes it down sooner is the traffic's evidence and its burst.
fn lab(tag: &str, health: &str) -> anyhow::Result<Lab> {
    let mut lab = Lab::build(tag, probed_uplinks(), 1, 0)?;
    lab.write_api_config(&format!("[health]\ndown_after = 25\n{health}\n"))?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    anyhow::ensure!(
        assigned.values().all(|u| u == "isp1"),
        "the client starts on isp1: {assigned:?}"
    );
    Ok(lab)
}

/// ISP 1 drops everything it forwards while the link stays up. The client's flow goes
/// unanswered, the burst fails, and isp1 goes down with that reason long before 25 failed
/// probe rounds could say so; the flow continues through isp2.
#[test]
fn unanswered_lan_traffic_takes_a_silent_uplink_down_by_a_failed_burst() -> anyhow::Result<()> {
    let lab = lab("silent", "")?;
    let stream = UdpStream::start(&lab, 1, false, Duration::from_millis(5))?;
    lab.upstream_loss("isp1", 100)?;
    lab.wait_for(Duration::from_secs(10), "isp1 down", || {
        Ok(lab.down_reason("isp1")?.is_some())
    })?;
    let why = lab.down_reason("isp1")?.unwrap_or_default();
    assert_eq!(
        why, "LAN traffic unanswered for 150ms and a probe burst failed",
        "taken down by the burst, not by 25 failed rounds"
    );
    assert!(bursts(&lab, "isp1", "failed")? >= 1.0);
    lab.wait_via(1, "isp2", Duration::from_secs(10))?;
    let seen = stream.finish()?.seen;
    assert!(
        seen.iter()
            .any(|ip| lab.uplink_of_source(*ip).as_deref() == Some("isp2")),
        "the flow continued through isp2: {seen:?}"
    );
    lab.upstream_loss("isp1", 0)?;
    Ok(())
}

/// The client's only traffic goes to a server that stopped answering (the internet host
/// drops it): isp1 is suspect, its burst is answered, and it stays up, suspicion after
/// suspicion.
#[test]
fn a_client_whose_one_server_is_dead_does_not_take_the_uplink_down() -> anyhow::Result<()> {
    let lab = lab("deadsrv", "")?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.ns("inet"),
        "nft",
        "add table inet dead { chain input { type filter hook input priority -10; ip daddr 203.0.113.99 counter drop; }; }",
    ])?;
    let sock = lab.client_socket(1, false)?;
    let dead: std::net::SocketAddr = "203.0.113.99:4000".parse()?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sender = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = sock.send_to(b"anyone?", dead);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let answered = lab.wait_for(Duration::from_secs(15), "two answered bursts", || {
        Ok(bursts(&lab, "isp1", "answered")? >= 2.0)
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sender.join();
    answered?;
    assert_eq!(bursts(&lab, "isp1", "failed")?, 0.0);
    assert_eq!(lab.down_reason("isp1")?, None);
    let (_, events, _) = lab.ctl("view", &["events"])?;
    assert!(!events.contains("uplink isp1 up -> down"), "{events}");
    assert_eq!(lab.via(1)?, "isp1");
    Ok(())
}

/// ISP 1 drops everything for a quarter of a second while the client's flow runs. The
/// silence makes isp1 suspect; the burst (here 20 probes, 50 ms apart) outlasts the
/// blackout, is answered, and isp1 never goes down.
#[test]
fn a_blackout_shorter_than_the_burst_does_not_flap_the_uplink() -> anyhow::Result<()> {
    let lab = lab("blackout", "burst_count = 20\nburst_interval = \"50ms\"")?;
    let stream = UdpStream::start(&lab, 1, false, Duration::from_millis(5))?;
    std::thread::sleep(Duration::from_millis(300));
    lab.upstream_loss("isp1", 100)?;
    std::thread::sleep(Duration::from_millis(250));
    lab.upstream_loss("isp1", 0)?;
    let answered = lab.wait_for(Duration::from_secs(10), "an answered burst", || {
        Ok(bursts(&lab, "isp1", "answered")? >= 1.0)
    });
    let result = stream.finish()?;
    answered?;
    assert_eq!(bursts(&lab, "isp1", "failed")?, 0.0);
    let (_, events, _) = lab.ctl("view", &["events"])?;
    assert!(!events.contains("uplink isp1 up -> down"), "{events}");
    assert!(
        result
            .seen
            .iter()
            .all(|ip| lab.uplink_of_source(*ip).as_deref() == Some("isp1")),
        "the flow stayed on isp1: {result:?}"
    );
    Ok(())
}

/// Two uplinks without probes. ISP 1 goes silent while the client talks to three servers:
/// with nothing to send a burst, isp1 goes down on its traffic alone (three unanswered
/// destinations, `health.passive_min_destinations`), the client's traffic moves to isp2,
/// and isp1 is tried again 30 s later.
#[test]
fn an_uplink_without_probes_goes_down_when_three_destinations_go_unanswered() -> anyhow::Result<()>
{
    let mut lab = Lab::build("nodests", uplink_tests::two_uplinks(), 1, 0)?;
    lab.write_api_config("")?;
    lab.start_agent()?;
    let servers: Vec<std::net::SocketAddr> = (21..24)
        .map(|last| uplink_tests::internet_v4(last, 7000))
        .collect();
    for s in &servers {
        lab.serve_udp(*s)?;
    }
    let home = lab.udp_via(1, servers[0], None, None)?;
    let other = if home == "isp1" { "isp2" } else { "isp1" };
    let sock = lab.client_socket(1, false)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let targets = servers.clone();
    let sender = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            for t in &targets {
                let _ = sock.send_to(b"hello", t);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    lab.upstream_loss(&home, 100)?;
    let down = lab.wait_for(Duration::from_secs(10), "the home down", || {
        Ok(lab.down_reason(&home)?.is_some())
    });
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = sender.join();
    down?;
    let why = lab.down_reason(&home)?.unwrap_or_default();
    assert!(
        why.starts_with("LAN traffic to 3 destinations unanswered for 150ms (no probes"),
        "{why}"
    );
    assert_eq!(lab.udp_via(1, servers[1], None, None)?, other);
    lab.upstream_loss(&home, 0)?;
    lab.wait_for(Duration::from_secs(45), "the home tried again", || {
        Ok(lab.down_reason(&home)?.is_none())
    })?;
    let (_, events, _) = lab.ctl("view", &["events"])?;
    assert!(
        events.contains("tried again after its LAN traffic went unanswered"),
        "{events}"
    );
    Ok(())
}
