//! The gRPC API and uplinkctl against real agents over real mTLS.

use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec, client_v4};

fn two_uplinks() -> Vec<UplinkSpec> {
    vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
    ]
}

fn via(lab: &Lab, i: u32) -> anyhow::Result<String> {
    let seen = lab.probe(i, false, 10)?;
    lab.uplink_of_source(seen)
        .ok_or_else(|| anyhow::anyhow!("unknown source {seen}"))
}

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
        via(&lab, 1)?,
        other,
        "a pinned client's new flows leave by the pinned uplink"
    );
    Ok(())
}
