//! `[local] policy`: the gateway's own outbound traffic (a DNS forwarder, NTP, updates)
//! in the seed's design, where the main table has no default route. Its connections get a
//! route and the policy's uplink, and fail over and back like the LAN's, while uplinkd's
//! own probes stay on their uplink.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use uplink_tests::{Lab, SERVER4, TCP_ECHO_PORT, in_netns, probed_uplinks, server};

/// A UDP socket of the gateway itself, aimed at the internet host.
fn gateway_socket(lab: &Lab) -> anyhow::Result<std::io::Result<UdpSocket>> {
    in_netns(&lab.ns("gw"), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(server(false))?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(s)
    })
}

/// A TCP connection of the gateway itself to the echo server: the source it saw.
fn tcp_source(lab: &Lab) -> anyhow::Result<IpAddr> {
    let conn = in_netns(&lab.ns("gw"), || {
        TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::V4(SERVER4), TCP_ECHO_PORT),
            Duration::from_secs(2),
        )
    })??;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    (&conn).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    Ok(line.split(' ').next().unwrap_or_default().parse()?)
}

#[test]
fn the_gateways_own_traffic_follows_its_policy_and_fails_over() -> anyhow::Result<()> {
    let mut lab = Lab::build("local", probed_uplinks(), 0, 0)?;
    // Without uplinkd the gateway cannot reach the internet: no default route in main.
    assert!(
        gateway_socket(&lab)?.and_then(|s| s.send(b"x")).is_err(),
        "the lab's main table has no default route"
    );
    lab.write_config(
        "10s",
        "10m",
        r#"[failover]
failback_delay = "0s"

[[policy]]
name = "own"
uplinks = ["isp2", "isp1"]
balance = "failover"

[local]
policy = "own"
"#,
    )?;
    lab.start_agent()?;
    let src = |lab: &Lab, s: &UdpSocket| -> anyhow::Result<Option<String>> {
        Ok(uplink_tests::echo_source(s, 5)?.and_then(|a| lab.uplink_of_source(a)))
    };
    let udp = gateway_socket(&lab)??;
    assert_eq!(src(&lab, &udp)?.as_deref(), Some("isp2"));
    assert_eq!(
        lab.uplink_of_source(tcp_source(&lab)?).as_deref(),
        Some("isp2")
    );

    // isp2 fails silently: only its own probes can tell (were they steered by the
    // output chain like the gateway's other traffic, they would leave by isp1 and keep
    // isp2 up). The same socket's flow moves to isp1, and so do new connections.
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(
        Duration::from_secs(10),
        "the gateway's flow via isp1",
        || Ok(src(&lab, &udp)?.as_deref() == Some("isp1")),
    )?;
    assert_eq!(
        lab.uplink_of_source(tcp_source(&lab)?).as_deref(),
        Some("isp1")
    );
    assert_eq!(
        lab.uplink_up("isp2")?,
        Some(0.0),
        "isp2 is down, on its own probes"
    );

    lab.upstream_loss("isp2", 0)?;
    lab.wait_for(
        Duration::from_secs(15),
        "new connections back on isp2",
        || Ok(lab.uplink_of_source(tcp_source(&lab)?).as_deref() == Some("isp2")),
    )?;
    // The running flow stays where it is: failback never breaks a flow.
    assert_eq!(src(&lab, &udp)?.as_deref(), Some("isp1"));
    Ok(())
}

/// The seed's design (no default route in main) with a DNS forwarder on the gateway: a
/// LAN client asks the gateway's dnsmasq, which forwards to a resolver on the internet
/// host. With `[local] policy = "default"` the forward gets out; the answer comes back.
#[test]
fn a_dns_forwarder_on_the_gateway_resolves_through_the_local_policy() -> anyhow::Result<()> {
    let mut lab = Lab::build("localdns", uplink_tests::two_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", "[local]\npolicy = \"default\"\n")?;
    lab.start_agent()?;
    // The "ISP resolver" on the internet host, and the gateway's forwarder for the LAN.
    let _upstream = lab.resolver(
        &lab.ns("inet"),
        &[
            "--listen-address=203.0.113.10",
            "--address=/example.test/198.51.100.7",
        ],
    )?;
    let _forwarder = lab.resolver(
        &lab.ns("gw"),
        &["--listen-address=198.19.0.1", "--server=203.0.113.10"],
    )?;
    let dns: SocketAddr = "198.19.0.1:53".parse()?;
    let mut got = None;
    lab.wait_for(Duration::from_secs(5), "the forwarder answers", || {
        got = lab.resolve(1, dns, "example.test").ok();
        Ok(got.is_some())
    })?;
    assert_eq!(got, Some(std::net::Ipv4Addr::new(198, 51, 100, 7)));
    Ok(())
}

/// A reload that adds `[local]` created the output chain without its hook (a regular
/// chain that no packet enters) until the next structure resync: the gateway's own
/// traffic takes the policy's uplink right after the reload.
#[test]
fn a_reload_that_adds_local_hooks_the_output_chain() -> anyhow::Result<()> {
    let mut lab = Lab::build("localre", probed_uplinks(), 0, 0)?;
    let api = lab.api_config()?;
    let policy = r#"
[[policy]]
name = "own"
uplinks = ["isp2", "isp1"]
balance = "failover"
"#;
    // The structure resync (resync_interval) would repair the chain: far away.
    lab.write_config("10m", "10m", &format!("{policy}{api}"))?;
    lab.start_agent()?;
    lab.edit_config(policy, &format!("{policy}\n[local]\npolicy = \"own\"\n"))?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    let chain = lab.gw(&["nft", "-j", "list", "chain", "inet", "uplinkd", "output"])?;
    assert!(
        chain.contains("\"hook\": \"output\"") || chain.contains("\"hook\":\"output\""),
        "{chain}"
    );
    let udp = gateway_socket(&lab)??;
    let seen = uplink_tests::echo_source(&udp, 5)?.and_then(|a| lab.uplink_of_source(a));
    assert_eq!(seen.as_deref(), Some("isp2"));
    assert_eq!(
        lab.uplink_of_source(tcp_source(&lab)?).as_deref(),
        Some("isp2")
    );
    Ok(())
}

/// `[local]` re-steered sockets bound to an uplink: a UDP socket bound to isp1's address
/// left by isp2, masqueraded (VPN endpoints, SIP trunks, `curl --interface` broke). A
/// socket bound to an uplink's address or device leaves by that uplink, with its own
/// address; unbound ones still follow the policy.
#[test]
fn sockets_bound_to_an_uplink_leave_by_it() -> anyhow::Result<()> {
    let mut lab = Lab::build("localbind", probed_uplinks(), 0, 0)?;
    lab.write_config(
        "10s",
        "10m",
        r#"
[[policy]]
name = "own"
uplinks = ["isp2", "isp1"]
balance = "failover"

[local]
policy = "own"
"#,
    )?;
    lab.start_agent()?;
    let isp1: IpAddr = "100.64.1.2".parse()?;
    let bound = |bind: Option<IpAddr>, device: Option<&'static str>| -> anyhow::Result<UdpSocket> {
        in_netns(&lab.ns("gw"), move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            if let Some(d) = device {
                s.bind_device(Some(d.as_bytes()))?;
            }
            let any = SocketAddr::new(bind.unwrap_or(IpAddr::from([0, 0, 0, 0])), 0);
            s.bind(&any.into())?;
            s.connect(&server(false).into())?;
            s.set_read_timeout(Some(Duration::from_millis(300)))?;
            Ok::<_, std::io::Error>(UdpSocket::from(s))
        })?
        .map_err(Into::into)
    };
    let seen = |s: &UdpSocket| uplink_tests::echo_source(s, 5);
    assert_eq!(
        seen(&bound(None, None)?)?,
        Some("100.64.2.2".parse()?),
        "unbound: the policy's isp2"
    );
    assert_eq!(
        seen(&bound(Some(isp1), None)?)?,
        Some(isp1),
        "bound to isp1's address"
    );
    assert_eq!(
        seen(&bound(None, Some("wan1"))?)?,
        Some(isp1),
        "bound to wan1"
    );
    // TCP too (curl --interface ADDR): the source the server saw is isp1's.
    let conn = in_netns(&lab.ns("gw"), move || -> std::io::Result<TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::new(isp1, 0).into())?;
        s.connect_timeout(
            &SocketAddr::new(IpAddr::V4(SERVER4), TCP_ECHO_PORT).into(),
            Duration::from_secs(2),
        )?;
        Ok(s.into())
    })??;
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    (&conn).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    assert_eq!(
        line.split(' ')
            .next()
            .unwrap_or_default()
            .parse::<IpAddr>()?,
        isp1
    );
    Ok(())
}
