//! Clients' traffic leaves through the uplink uplinkd assigned, as the internet host sees it.

use uplink_tests::{Lab, UplinkSpec, client_v4, client_v6};

fn three_uplinks() -> Vec<UplinkSpec> {
    vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ]
}

/// Test 1: IPv4 and IPv6, including the point-to-point uplink.
#[test]
fn each_client_leaves_via_its_assigned_uplink() -> anyhow::Result<()> {
    let mut lab = Lab::build("disp", three_uplinks(), 6, 6)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let assigned = lab.greet_clients()?;
    let mut used = std::collections::BTreeSet::new();
    for i in 1..=6 {
        for v6 in [false, true] {
            let addr = if v6 {
                client_v6(i).into()
            } else {
                client_v4(i).into()
            };
            let home = &assigned[&addr];
            // A fresh socket is a new connection: it follows the assignment.
            let seen = lab.probe(i, v6, 10)?;
            assert_eq!(
                lab.uplink_of_source(seen).as_ref(),
                Some(home),
                "client c{i} {addr} assigned {home} but the internet saw {seen}"
            );
            used.insert(home.clone());
        }
    }
    assert_eq!(
        used.len(),
        3,
        "6 clients over weights 2/1/1 use every uplink, the p2p one included: {assigned:?}"
    );
    Ok(())
}
