//! Usage per uplink on the real dataplane: a known transfer counted within 2 %, kept across
//! SIGKILL and restart together with what crossed while the agent was down, and a new
//! usage period at the boundary of a clock the test moves.

use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, client_v4, two_uplinks};

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
