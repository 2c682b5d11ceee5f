//! What the kernel refuses never cuts the site off: configs the validator accepts apply
//! (nested prefixes, overlapping ports), and a part the kernel refuses anyway is found by
//! checking halves, left out, and named in the log, the events, `uplinkctl status`,
//! `/readyz` and a metric, at start-up and on reload alike.

use std::net::{IpAddr, SocketAddr};

use uplink_tests::{ECHO_PORT, Lab, SERVER4, server};

use uplink_tests::{internet_v4 as v4, two_uplinks as two};

const VIA2: &str = r#"
[[policy]]
name = "via2"
uplinks = ["isp2"]
balance = "failover"
"#;

/// Client 1's home (isp1 of two, the first placement).
fn c1_home(lab: &Lab) -> anyhow::Result<String> {
    let homes = lab.greet_clients()?;
    Ok(homes[&IpAddr::from(uplink_tests::client_v4(1))].clone())
}

/// Nested prefixes and overlapping port ranges in one rule: `check-config` accepted them
/// and the kernel refused the whole table ("conflicting intervals specified"), so no
/// client had a route. Now they are merged and every rule steers.
#[test]
fn nested_prefixes_and_overlapping_ports_in_one_rule_apply() -> anyhow::Result<()> {
    let mut lab = Lab::build("nested", two(), 1, 0)?;
    let rules = format!(
        r#"{VIA2}
[[rule]]
name = "ports"
proto = "udp"
dport = ["9100-9110", 9105, "9108-9120"]
policy = "via2"

[[rule]]
name = "nested"
dst = ["203.0.113.16/28", "203.0.113.20/32", "2001:db8:ffff::/48", "2001:db8:ffff::20"]
policy = "via2"
"#
    );
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{rules}{api}"))?;
    let check = lab.gw(&[
        uplink_tests::uplinkd_bin().to_str().expect("utf-8"),
        "check-config",
        lab.config_path().to_str().expect("utf-8"),
    ])?;
    assert!(check.contains("ok"), "{check}");
    lab.serve_udp(v4(20, ECHO_PORT))?;
    lab.serve_udp(SocketAddr::new(IpAddr::V4(SERVER4), 9105))?;
    lab.start_agent()?;
    assert_eq!(c1_home(&lab)?, "isp1");
    assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(
        lab.udp_via(1, SocketAddr::new(IpAddr::V4(SERVER4), 9105), None, None)?,
        "isp2"
    );
    assert_eq!(
        lab.http_status("http://127.0.0.1:7444/readyz")?,
        "200",
        "nothing refused"
    );
    Ok(())
}

/// An `nft` that refuses any transaction holding rule `bad` (the kernel's refusal of a part
/// the validator cannot foresee): the rest of the table goes in, at start-up and on a
/// reload, and the refusal is named everywhere an operator looks.
#[test]
fn a_part_the_kernel_refuses_is_left_out_and_named() -> anyhow::Result<()> {
    let mut lab = Lab::build("refused", two(), 1, 0)?;
    let nft = lab.dir.join("nft-refusing");
    std::fs::write(
        &nft,
        "#!/bin/bash\n\
         # Transactions from stdin (apply and --check) that hold rule_bad are refused.\n\
         if [ \"${@: -1}\" = - ]; then\n\
           in=$(cat)\n\
           if grep -q rule_bad <<<\"$in\"; then echo 'Error: Could not process rule: Invalid argument (refused by the test)' >&2; exit 1; fi\n\
           exec nft \"$@\" <<<\"$in\"\n\
         fi\n\
         exec nft \"$@\"\n",
    )?;
    uplink_tests::sh(&["chmod", "755", nft.to_str().expect("utf-8")])?;
    let bad = r#"
[[rule]]
name = "bad"
dst = ["203.0.113.20/32"]
policy = "via2"
"#;
    let good = r#"
[[rule]]
name = "good"
dst = ["203.0.113.30/32"]
policy = "via2"
"#;
    let api = lab.api_config()?;
    let extra = format!(
        "[dataplane]\nnft = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:9477\"\n{VIA2}{bad}{good}{api}",
        nft.display()
    );
    lab.write_config("10s", "10m", &extra)?;
    for last in [20, 30] {
        lab.serve_udp(v4(last, ECHO_PORT))?;
    }
    lab.start_agent()?;

    // At start-up, with no earlier table: everything but rule bad.
    assert_eq!(c1_home(&lab)?, "isp1");
    assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(
        lab.udp_via(1, v4(20, ECHO_PORT), None, None)?,
        "isp1",
        "rule bad is left out: its traffic takes the home"
    );
    let named = |lab: &Lab| -> anyhow::Result<()> {
        let ready = lab.gw(&["curl", "-s", "http://127.0.0.1:7444/readyz"])?;
        assert!(
            ready.contains("rule bad: ") && ready.contains("refused by the test"),
            "/readyz: {ready}"
        );
        assert_eq!(lab.http_status("http://127.0.0.1:7444/readyz")?, "503");
        let (code, status, err) = lab.ctl("view", &["status"])?;
        assert_eq!(code, 0, "{err}");
        assert!(
            status.contains("refused by the kernel, left out: rule bad: "),
            "{status}"
        );
        let m = lab.scrape(9477)?;
        assert_eq!(
            m.get("uplinkd_config_refused{part=\"rule bad\"}"),
            Some(&1.0),
            "metric"
        );
        let (_, events, _) = lab.ctl("view", &["events", "-o", "json"])?;
        assert!(
            events.contains("\"refused\"") && events.contains("the kernel refuses rule bad"),
            "{events}"
        );
        Ok(())
    };
    named(&lab)?;

    // Without it: nothing refused any more.
    lab.edit_config(bad, "")?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.http_status("http://127.0.0.1:7444/readyz")?, "200");
    assert!(
        !lab.scrape(9477)?
            .keys()
            .any(|k| k.starts_with("uplinkd_config_refused{")),
        "the metric's series went with the part"
    );

    // A reload that brings it back while the table is in place: the running dataplane
    // takes everything else, and keeps carrying the client.
    lab.edit_config(good, &format!("{bad}{good}"))?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.udp_via(1, server(false), None, None)?, "isp1");
    assert_eq!(lab.udp_via(1, v4(30, ECHO_PORT), None, None)?, "isp2");
    assert_eq!(lab.udp_via(1, v4(20, ECHO_PORT), None, None)?, "isp1");
    named(&lab)
}
