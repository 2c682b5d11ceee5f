//! Two uplinks whose modems have the same address (192.168.1.1 each) and whose gateway
//! interfaces sit in the same subnet: the seed's failure case. Dispatch, probes, failover
//! and failback all work by device.

use std::net::IpAddr;
use std::time::Duration;

use uplink_tests::{Lab, client_v4};

/// Renumbers the lab's ISPs as two identical modems: each ISP's side is 192.168.1.1/24 and
/// NATs what it forwards to the uplink's usual public address (so the internet host still
/// tells the uplinks apart); the gateway's sides are 192.168.1.2 and .3 in one subnet.
fn identical_modems(lab: &Lab) -> anyhow::Result<()> {
    for k in 1..=2 {
        let isp = lab.ns(&format!("isp{k}"));
        let nft = |script: &str| uplink_tests::sh(&["ip", "netns", "exec", &isp, "nft", script]);
        uplink_tests::sh(&["ip", "-n", &isp, "-4", "addr", "flush", "dev", "cpe"])?;
        uplink_tests::sh(&[
            "ip",
            "-n",
            &isp,
            "addr",
            "add",
            "192.168.1.1/24",
            "dev",
            "cpe",
        ])?;
        nft("delete table inet isp_guard")?;
        // Outbound: the modem's NAT. Inbound: its "exposed host" forward to the gateway.
        nft(&format!(
            "add table ip modem {{ chain post {{ type nat hook postrouting priority 100; oifname \"net\" ip saddr 192.168.1.0/24 snat to 100.64.{k}.2; }}; chain pre {{ type nat hook prerouting priority -100; iifname \"net\" ip daddr 100.64.{k}.2 dnat to 192.168.1.{}; }}; }}",
            k + 1
        ))?;
        lab.gw(&["ip", "-4", "addr", "flush", "dev", &format!("wan{k}")])?;
        lab.gw(&[
            "ip",
            "addr",
            "add",
            &format!("192.168.1.{}/24", k + 1),
            "dev",
            &format!("wan{k}"),
        ])?;
    }
    Ok(())
}

#[test]
fn two_modems_with_one_address_dispatch_fail_over_and_back() -> anyhow::Result<()> {
    let mut lab = Lab::build("samegw", uplink_tests::probed_uplinks(), 2, 0)?;
    identical_modems(&lab)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"0s\"\n")?;
    let cfg = std::fs::read_to_string(lab.config_path())?
        .replace("gateway = \"100.64.1.1\"", "gateway = \"192.168.1.1\"")
        .replace("gateway = \"100.64.2.1\"", "gateway = \"192.168.1.1\"");
    std::fs::write(lab.config_path(), cfg)?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let on = |u: &str| {
        (1..=2)
            .find(|&i| homes.get(&IpAddr::from(client_v4(i))).map(String::as_str) == Some(u))
            .expect("one client on each uplink")
    };
    let (c1, c2) = (on("isp1"), on("isp2"));
    assert_eq!(lab.via(c1)?, "isp1");
    assert_eq!(lab.via(c2)?, "isp2");
    // isp2's modem stops forwarding: only isp2 goes down (its probes leave by its device),
    // and its client moves to isp1, whose modem has the very same address.
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(Duration::from_secs(10), "c2 via isp1", || {
        Ok(lab.via(c2)? == "isp1")
    })?;
    assert_eq!(lab.via(c1)?, "isp1", "isp1 kept its client");
    assert_eq!(
        lab.uplink_up("isp2")?,
        Some(0.0),
        "isp2 is down, on its own probes"
    );
    lab.upstream_loss("isp2", 0)?;
    lab.wait_for(Duration::from_secs(15), "c2 back on isp2", || {
        Ok(lab.via(c2)? == "isp2")
    })?;

    // Inbound symmetry by device: a port forward on the gateway (the operator's own nft
    // table) to a LAN host, reached through each modem. Each answer must leave by the
    // modem its request came in by: through the other one it would come back from the
    // other public address, and the internet host's connected socket would not take it.
    lab.gw(&[
        "nft",
        &format!(
            "add table ip portfwd {{ chain pre {{ type nat hook prerouting priority -100; iifname {{ \"wan1\", \"wan2\" }} udp dport 7000 dnat to {}:7000; }}; }}",
            client_v4(c1)
        ),
    ])?;
    let echo = uplink_tests::in_netns(&lab.ns(&format!("c{c1}")), || {
        std::net::UdpSocket::bind("0.0.0.0:7000")
    })??;
    uplink_tests::udp_echo(echo);
    for k in [1u8, 2, 1, 2] {
        let to = std::net::SocketAddr::from(([100, 64, k, 2], 7000));
        let s = uplink_tests::in_netns(&lab.ns("inet"), move || -> std::io::Result<_> {
            let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok(s)
        })??;
        let mut buf = [0u8; 256];
        let answered = (0..5).any(|_| {
            s.send(b"inbound").is_ok() && uplink_tests::retry_eintr(|| s.recv(&mut buf)).is_ok()
        });
        assert!(
            answered,
            "no answer through modem {k}\n{}",
            lab.post_mortem()
        );
    }
    Ok(())
}
