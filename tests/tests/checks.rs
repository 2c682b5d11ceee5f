//! HTTP, DNS and captive-portal health checks on the real dataplane: an ISP that
//! redirects port 80 to its portal, an HTTP server whose page lacks `probe_expect`, and a
//! resolver (dnsmasq) that stops being reachable through the uplink.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec, in_netns, sh};

/// Answers every HTTP request on `addr` in namespace `ns` with what `answer` holds then.
fn serve_http(ns: &str, addr: SocketAddr, answer: Arc<Mutex<String>>) -> anyhow::Result<()> {
    let _ = sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/32", addr.ip()),
        "dev",
        "lo",
    ]);
    let listener = in_netns(ns, move || std::net::TcpListener::bind(addr))??;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                if conn.read(&mut buf).is_ok() {
                    let text = answer.lock().unwrap().clone();
                    let _ = conn.write_all(text.as_bytes());
                }
            });
        }
    });
    Ok(())
}

const NO_CONTENT: &str = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";

/// An ISP that sends port 80 to its own portal (302): the uplink goes down with the
/// portal's reason, and comes back once the redirect is gone. The other uplink, whose
/// check reaches the real server, stays up throughout.
#[test]
fn an_isp_redirecting_to_its_portal_takes_the_uplink_down_and_back() -> anyhow::Result<()> {
    let check = "probes = [\"http://203.0.113.80/generate_204\"]\n";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(check),
        UplinkSpec::new("isp2", 1, false).with(check),
    ];
    let mut lab = Lab::build("portal", uplinks, 1, 0)?;
    serve_http(
        &lab.ns("inet"),
        "203.0.113.80:80".parse()?,
        Arc::new(Mutex::new(NO_CONTENT.into())),
    )?;
    let isp1 = lab.ns("isp1");
    serve_http(
        &isp1,
        "100.64.1.1:8080".parse()?,
        Arc::new(Mutex::new(
            "HTTP/1.1 302 Found\r\nLocation: http://portal.example/login\r\nContent-Length: 0\r\n\r\n"
                .into(),
        )),
    )?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    lab.wait_for(Duration::from_secs(10), "both checks answered", || {
        Ok(["isp1", "isp2"].iter().all(|u| {
            lab.uplink_json(u).is_ok_and(|v| {
                v["probe_results"][0]
                    .as_str()
                    .is_some_and(|r| r.ends_with(" ms"))
            })
        }))
    })?;
    sh(&[
        "ip",
        "netns",
        "exec",
        &isp1,
        "nft",
        "add table ip portal { chain pre { type nat hook prerouting priority -100; iifname \"cpe\" tcp dport 80 dnat to 100.64.1.1:8080; }; }",
    ])?;
    let want = "captive portal: HTTP 302 to http://portal.example/login";
    lab.wait_for(Duration::from_secs(10), "isp1 down for its portal", || {
        let v = lab.uplink_json("isp1")?;
        Ok(v["state"] == "down" && v["down_reason"].as_str().is_some_and(|r| r.contains(want)))
    })?;
    let v = lab.uplink_json("isp1")?;
    assert!(
        v["probe_results"][0]
            .as_str()
            .is_some_and(|r| r.contains(want)),
        "{v}"
    );
    assert_eq!(lab.uplink_json("isp2")?["state"], "up");
    let (_, wide, _) = lab.ctl("view", &["uplinks", "-o", "wide"])?;
    assert!(wide.contains(want), "{wide}");

    sh(&[
        "ip", "netns", "exec", &isp1, "nft", "delete", "table", "ip", "portal",
    ])?;
    lab.wait_for(Duration::from_secs(15), "isp1 back", || {
        Ok(lab.uplink_json("isp1")?["state"] == "up")
    })?;
    Ok(())
}

/// A server that answers 200 with a page that lacks `probe_expect` (a portal that does not
/// redirect): down, saying so; the expected page brings it back.
#[test]
fn a_page_without_the_expected_text_takes_the_uplink_down() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false)
            .with("probes = [\"http://203.0.113.81/check\"]\nprobe_expect = \"uplink-ok\"\n"),
        UplinkSpec::new("isp2", 1, false),
    ];
    let mut lab = Lab::build("expect", uplinks, 1, 0)?;
    let page = Arc::new(Mutex::new(String::from(
        "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nuplink-ok",
    )));
    serve_http(&lab.ns("inet"), "203.0.113.81:80".parse()?, page.clone())?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    lab.wait_for(Duration::from_secs(10), "the check answered", || {
        let v = lab.uplink_json("isp1")?;
        Ok(v["state"] == "up"
            && v["probe_results"][0]
                .as_str()
                .is_some_and(|r| r.ends_with(" ms")))
    })?;
    *page.lock().unwrap() =
        "HTTP/1.1 200 OK\r\nContent-Length: 21\r\nConnection: close\r\n\r\nWelcome to Hotel WiFi"
            .into();
    lab.wait_for(Duration::from_secs(10), "isp1 down", || {
        let v = lab.uplink_json("isp1")?;
        Ok(v["state"] == "down"
            && v["down_reason"]
                .as_str()
                .is_some_and(|r| r.contains("without the expected text \"uplink-ok\"")))
    })?;
    *page.lock().unwrap() =
        "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nuplink-ok".into();
    lab.wait_for(Duration::from_secs(15), "isp1 back", || {
        Ok(lab.uplink_json("isp1")?["state"] == "up")
    })?;
    Ok(())
}

/// A DNS check against dnsmasq on the internet host: up while it answers through the
/// uplink, down once the ISP drops DNS, up again after.
#[test]
fn a_dns_check_follows_the_resolver_through_the_uplink() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false).with("probes = [\"dns:203.0.113.53/uplink.test\"]\n"),
    ];
    let mut lab = Lab::build("dnscheck", uplinks, 1, 0)?;
    let inet = lab.ns("inet");
    sh(&[
        "ip",
        "-n",
        &inet,
        "addr",
        "add",
        "203.0.113.53/32",
        "dev",
        "lo",
    ])?;
    let _resolver = lab.resolver(
        &inet,
        &[
            "--listen-address=203.0.113.53",
            "--address=/uplink.test/198.51.100.7",
        ],
    )?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    lab.start_agent()?;
    lab.wait_for(Duration::from_secs(10), "the DNS check answered", || {
        let v = lab.uplink_json("isp2")?;
        Ok(v["state"] == "up"
            && v["probe_results"][0]
                .as_str()
                .is_some_and(|r| r.ends_with(" ms")))
    })?;
    let isp2 = lab.ns("isp2");
    sh(&[
        "ip",
        "netns",
        "exec",
        &isp2,
        "nft",
        "add table inet nodns { chain f { type filter hook forward priority 0; udp dport 53 drop; }; }",
    ])?;
    lab.wait_for(Duration::from_secs(10), "isp2 down", || {
        let v = lab.uplink_json("isp2")?;
        Ok(v["state"] == "down"
            && v["probe_results"][0]
                .as_str()
                .is_some_and(|r| r.ends_with("no answer")))
    })?;
    sh(&[
        "ip", "netns", "exec", &isp2, "nft", "delete", "table", "inet", "nodns",
    ])?;
    lab.wait_for(Duration::from_secs(15), "isp2 back", || {
        Ok(lab.uplink_json("isp2")?["state"] == "up")
    })?;
    Ok(())
}
