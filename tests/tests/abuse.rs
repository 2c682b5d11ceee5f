//! uplinkd under abuse, faults and operator mistakes (issue #9): each test reproduces a
//! defect found on a running agent and proves the fix with real packets, descriptors and
//! kernel state.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use uplink_tests::{
    Lab, UplinkSpec, client_v4, in_netns, outcome, probed_uplinks, two_uplinks, uplinkd_bin,
};

fn api_lab(tag: &str, uplinks: Vec<UplinkSpec>, clients: u32, extra: &str) -> anyhow::Result<Lab> {
    let mut lab = Lab::build(tag, uplinks, clients, 0)?;
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &format!("{extra}{api}"))?;
    lab.start_agent()?;
    Ok(lab)
}

/// The first client whose home is `uplink`.
fn client_on(homes: &BTreeMap<IpAddr, String>, uplink: &str) -> u32 {
    (1..=8)
        .find(|&i| {
            homes
                .get(&IpAddr::from(client_v4(i)))
                .is_some_and(|h| h == uplink)
        })
        .unwrap_or_else(|| panic!("no client homed on {uplink}: {homes:?}"))
}

/// Defect 1: tiers 1/1/2, both tier-1 uplinks drained (accepted: lte survives), then a
/// new client. The agent used to panic in placement; now the client is homed in tier 1
/// and carried by lte, and the drains survive a restart.
#[test]
fn a_new_client_lands_when_every_first_tier_uplink_is_drained() -> anyhow::Result<()> {
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true).with("tier = 2"),
    ];
    let mut lab = api_lab("drainall", uplinks, 2, "")?;
    lab.greet_clients()?;
    for u in ["isp1", "isp2"] {
        let (code, _, err) = lab.ctl("op", &["drain", u])?;
        assert_eq!(code, 0, "drain {u}: {err}");
    }
    let (code, _, err) = lab.ctl("op", &["drain", "lte"])?;
    assert_ne!(code, 0, "the last survivor cannot be drained");
    assert!(err.contains("last healthy uplink"), "{err}");
    lab.add_client(3, false)?;
    assert_eq!(
        lab.via(3)?,
        "lte",
        "the new client is carried by the survivor"
    );
    assert!(lab.agent_running(), "uplinkd survived the new client");
    let c3 = IpAddr::from(client_v4(3));
    lab.wait_for(Duration::from_secs(5), "c3 persisted", || {
        Ok(lab.assignments()?.contains_key(&c3))
    })?;
    assert_ne!(
        lab.assignments()?[&c3],
        "lte",
        "homed in tier 1, not on lte"
    );

    // The drains are operator decisions: a restart keeps them, even after a SIGKILL.
    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    let (code, out, err) = lab.ctl("view", &["uplinks"])?;
    assert_eq!(code, 0, "{err}");
    for u in ["isp1", "isp2"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(u) && l.contains("draining")),
            "{u} still drained after restart:\n{out}"
        );
    }
    assert_eq!(lab.via(1)?, "lte");
    Ok(())
}

/// Defect 2: every reload restarted the probers and left their ICMP receive tasks and
/// sockets behind (fds 17 → 167 after 50 reloads).
#[test]
fn reloads_do_not_leak_descriptors() -> anyhow::Result<()> {
    let probes =
        "probes = [\"icmp:203.0.113.10\", \"icmp:2001:db8:ffff::10\", \"tcp:203.0.113.10:9001\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(probes),
        UplinkSpec::new("isp2", 1, false).with(probes),
    ];
    let lab = api_lab("fdleak", uplinks, 1, "")?;
    lab.greet_clients()?;
    let before = lab.agent_fds()?;
    for _ in 0..50 {
        let (code, _, err) = lab.ctl("op", &["reload"])?;
        assert_eq!(code, 0, "{err}");
    }
    // Aborted tasks close their sockets as the runtime drops them: give it a moment.
    lab.wait_for(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || Ok(lab.agent_fds()? <= before + 4),
    )
    .map_err(|e| anyhow::anyhow!("fds {before} → {}: {e}", lab.agent_fds().unwrap_or(0)))?;
    // Still dispatching: the client's datagram is answered.
    lab.via(1)?;
    Ok(())
}

/// Raises this process's descriptor limit to its hard limit (the abuse tests hold
/// thousands of sockets).
fn raise_fd_limit() {
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
}

/// Opens `n` idle TCP connections from 127.0.0.2 to `port` on the gateway's loopback;
/// returns how many the agent closed at once (EOF within a second) and the ones it keeps.
fn idle_connections(lab: &Lab, port: u16, n: usize) -> anyhow::Result<(usize, Vec<TcpStream>)> {
    let conns = in_netns(&lab.ns("gw"), move || -> std::io::Result<Vec<TcpStream>> {
        (0..n)
            .map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())?;
                s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
                Ok(s.into())
            })
            .collect()
    })??;
    let mut kept = Vec::new();
    let mut closed = 0;
    for mut c in conns {
        c.set_read_timeout(Some(Duration::from_millis(1)))?;
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => kept.push(c),
        }
    }
    // Refusals happen as the agent accepts: look again at those still open.
    std::thread::sleep(Duration::from_millis(500));
    let mut open = Vec::new();
    for mut c in kept {
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => open.push(c),
        }
    }
    Ok((closed, open))
}

/// Defect 3: out of the box /metrics is not readable from the WAN side, and 1,100 idle
/// connections to the metrics and API ports no longer pin 1,100 descriptors each; a
/// carrier cut still fails over while they are held.
#[test]
fn listeners_are_bounded_and_metrics_are_not_on_the_wan() -> anyhow::Result<()> {
    raise_fd_limit();
    let mut lab = api_lab("listen", two_uplinks(), 2, "")?;
    let homes = lab.greet_clients()?;
    // Default config: the ISP cannot reach the metrics port on the gateway's WAN address,
    // the gateway itself can.
    let isp = lab.ns("isp1");
    let from_wan = uplink_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &isp,
        "curl",
        "-s",
        "-m",
        "2",
        "http://100.64.1.2:9477/metrics",
    ]);
    assert!(from_wan.is_err(), "metrics answered the WAN: {from_wan:?}");
    assert!(lab.scrape(9477)?.contains_key("uplinkd_in_sync"));

    let before = lab.agent_fds()?;
    let (closed_m, open_m) = idle_connections(&lab, 9477, 1100)?;
    let (closed_a, open_a) = idle_connections(&lab, 7443, 1100)?;
    let during = lab.agent_fds()?;
    // One address gets a quarter of the metrics slots and 32 of the API's.
    assert!(
        during <= before + 16 + 32 + 16,
        "fds {before} → {during} with 2,200 idle connections"
    );
    assert!(
        closed_m >= 1000,
        "metrics closed {closed_m} of 1100 at once"
    );
    assert!(closed_a >= 1000, "API closed {closed_a} of 1100 at once");
    // Everybody else is still served while that address holds its connections.
    assert!(lab.scrape(9477)?.contains_key("uplinkd_in_sync"));
    let (code, _, err) = lab.ctl("view", &["status"])?;
    assert_eq!(code, 0, "an operator gets in during the flood: {err}");

    // Failover works while the listeners are full.
    let c = client_on(&homes, "isp1");
    lab.carrier("isp1", false)?;
    assert_eq!(lab.via(c)?, "isp2");
    lab.carrier("isp1", true)?;

    drop(open_m);
    drop(open_a);
    lab.wait_for(Duration::from_secs(10), "a scrape after the flood", || {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_listener_connections_refused_total{listener=\"metrics\"}")
            .is_some_and(|n| *n >= 1000.0))
    })?;
    let m = lab.scrape(9477)?;
    assert!(
        m["uplinkd_listener_connections_refused_total{listener=\"api\"}"] >= 1000.0,
        "{m:?}"
    );
    let (code, _, err) = lab.ctl("view", &["status"])?;
    assert_eq!(code, 0, "API serves after the flood: {err}");
    assert!(lab.agent_running());
    Ok(())
}

/// An API lab of two uplinks and two clients whose `uplink` is cut (failback after
/// `failback_delay`); returns it and the client homed there, already moved to the other.
fn cut_a_home(tag: &str, uplink: &str, failback_delay: &str) -> anyhow::Result<(Lab, u32)> {
    let lab = api_lab(
        tag,
        two_uplinks(),
        2,
        &format!("[failover]\nfailback_delay = \"{failback_delay}\"\n"),
    )?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, uplink);
    lab.carrier(uplink, false)?;
    let other = if uplink == "isp1" { "isp2" } else { "isp1" };
    anyhow::ensure!(lab.via(c)? == other, "c{c} did not move off {uplink}");
    Ok((lab, c))
}

/// Defect 4: `uplinkd_uplink_clients` is who is on the link now; the homed count has its
/// own name. A dead uplink whose clients moved used to report them still.
#[test]
fn client_metrics_tell_who_is_on_each_uplink_now() -> anyhow::Result<()> {
    let (lab, _) = cut_a_home("carried", "isp2", "60s")?;
    lab.wait_for(
        Duration::from_secs(5),
        "carried counts after the failover",
        || {
            let m = lab.scrape(9477)?;
            Ok(m["uplinkd_uplink_clients{uplink=\"isp2\"}"] == 0.0
                && m["uplinkd_uplink_clients{uplink=\"isp1\"}"] == 2.0)
        },
    )?;
    let m = lab.scrape(9477)?;
    assert_eq!(m["uplinkd_uplink_clients_homed{uplink=\"isp2\"}"], 1.0);
    assert_eq!(m["uplinkd_uplink_clients_homed{uplink=\"isp1\"}"], 1.0);
    assert_eq!(m["uplinkd_uplink_serving{uplink=\"isp2\"}"], 0.0);
    let (_, out, _) = lab.ctl("view", &["uplinks", "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let isp2 = v
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "isp2"))
        .ok_or_else(|| anyhow::anyhow!("no isp2 in {out}"))?;
    assert_eq!(isp2["clients"], 1, "{isp2}");
    assert_eq!(isp2["clients_carried"], 0, "{isp2}");
    Ok(())
}

/// Defect 5: a second uplinkd with the same config used to apply before failing to bind,
/// rewriting the first one's failover (it starts optimistic, so a silently failed uplink
/// looked healthy to it). Now it fails first and names the running one; so does one with
/// another state_dir and the same nft table.
#[test]
fn a_second_instance_changes_nothing() -> anyhow::Result<()> {
    let uplinks = probed_uplinks();
    let mut lab = Lab::build("second", uplinks, 2, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, "isp2");
    lab.upstream_loss("isp2", 100)?;
    let home = || lab.gw(&["nft", "list", "chain", "inet", "uplinkd", "home_isp2"]);
    lab.wait_for(Duration::from_secs(10), "isp2 failed over", || {
        Ok(!home()?.contains("goto up_isp2"))
    })?;
    let before = home()?;
    let pid = lab.agent_pid().expect("running");
    let second = |config: &std::path::Path| {
        outcome(
            Command::new("ip")
                .args(["netns", "exec", &lab.ns("gw")])
                .arg(uplinkd_bin())
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info"),
        )
    };
    let (code, _, err) = second(&lab.config_path())?;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("another uplinkd (pid {pid})")) && err.contains("state_dir"),
        "{err}"
    );
    assert_eq!(home()?, before, "the second instance rewrote home_isp2");
    // Same table, another state directory.
    let other = lab.dir.join("other.toml");
    let text = std::fs::read_to_string(lab.config_path())?.replace(
        &lab.state_dir().display().to_string(),
        &lab.dir.join("state2").display().to_string(),
    );
    std::fs::write(&other, text)?;
    let (code, _, err) = second(&other)?;
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("another uplinkd (pid {pid})")) && err.contains("nft table"),
        "{err}"
    );
    assert_eq!(home()?, before, "the second instance rewrote home_isp2");
    assert_eq!(lab.via(c)?, "isp1", "still failed over");
    assert!(lab.agent_running());
    Ok(())
}

/// Defect 6: an uplink back from a cut waits out failback_delay before its clients return;
/// a pin to it in that window used to be acknowledged and not applied.
#[test]
fn a_pin_takes_effect_while_its_uplink_waits_for_failback() -> anyhow::Result<()> {
    let (lab, c) = cut_a_home("pinwait", "isp1", "120s")?;
    let ip = client_v4(c).to_string();
    lab.carrier("isp1", true)?;
    lab.wait_for(Duration::from_secs(10), "isp1 up again", || {
        let (_, out, _) = lab.ctl("view", &["uplinks"])?;
        Ok(out.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.first() == Some(&"isp1") && cols.get(1).is_some_and(|s| s.starts_with("up"))
        }))
    })?;
    assert_eq!(lab.via(c)?, "isp2", "the failback has not happened yet");
    let (code, _, err) = lab.ctl("op", &["pin", &ip, "isp1"])?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(lab.via(c)?, "isp1", "the pin took effect at once");
    let (_, out, _) = lab.ctl("view", &["uplinks"])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("isp1") && l.contains("up, failback in")),
        "the uplink says it waits for its failback:\n{out}"
    );
    let (_, out, _) = lab.ctl("view", &["clients"])?;
    let line = out
        .lines()
        .find(|l| l.contains(&ip))
        .ok_or_else(|| anyhow::anyhow!("{ip} not listed:\n{out}"))?;
    // MAC, ADDRESSES, HOME, CURRENT, REASON, LAST_SEEN ("2s ago").
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[3..5], ["isp1", "override"], "{line}");
    let m = lab.scrape(9477)?;
    assert!(
        m["uplinkd_uplink_failback_in_seconds{uplink=\"isp1\"}"] > 60.0,
        "{m:?}"
    );
    Ok(())
}

/// A restart during a silent failure: the uplink was down when the agent died, so it
/// starts down and its clients stay on the survivor instead of being sent back into the
/// dead path until the probes notice again.
#[test]
fn a_restart_keeps_traffic_off_an_uplink_that_was_down() -> anyhow::Result<()> {
    let uplinks = probed_uplinks();
    let mut lab = api_lab("restartdown", uplinks, 2, "")?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, "isp2");
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(Duration::from_secs(10), "isp2 down", || {
        let (_, out, _) = lab.ctl("view", &["uplinks"])?;
        Ok(out
            .lines()
            .any(|l| l.starts_with("isp2") && l.contains("down")))
    })?;
    assert_eq!(lab.via(c)?, "isp1");
    lab.stop_agent("KILL")?;
    lab.start_agent()?;
    // Before the first probe round could judge it, the restarted agent already has isp2
    // down and its clients elsewhere.
    let (_, out, _) = lab.ctl("view", &["uplinks"])?;
    assert!(
        out.lines()
            .any(|l| l.starts_with("isp2") && l.contains("down")),
        "isp2 after the restart:\n{out}"
    );
    let home = lab.gw(&["nft", "list", "chain", "inet", "uplinkd", "home_isp2"])?;
    assert!(
        !home.contains("goto up_isp2"),
        "home_isp2 sends to isp2:\n{home}"
    );
    assert_eq!(lab.via(c)?, "isp1");
    // And it comes back when the path works again.
    lab.upstream_loss("isp2", 0)?;
    lab.wait_for(Duration::from_secs(10), "isp2 up again", || {
        let (_, out, _) = lab.ctl("view", &["uplinks"])?;
        Ok(out
            .lines()
            .any(|l| l.starts_with("isp2") && l.contains("up")))
    })?;
    Ok(())
}

/// A hung `nft`: the command is killed after dataplane.command_timeout, /healthz says so,
/// and once nft works again the change that was waiting is applied.
#[test]
fn a_hung_nft_times_out_and_the_apply_is_retried() -> anyhow::Result<()> {
    let mut lab = Lab::build("hungnft", two_uplinks(), 1, 0)?;
    let hang = lab.dir.join("hang");
    let wrapper = script(
        &lab,
        "nft",
        format!(
            "while [ -e {} ]; do sleep 0.1; done\nexec /usr/sbin/nft \"$@\"\n",
            hang.display()
        ),
    )?;
    let api = lab.api_config()?;
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "[dataplane]\nnft = \"{}\"\ncommand_timeout = \"1s\"\n{api}",
            wrapper.display()
        ),
    )?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let healthz = |lab: &Lab| lab.http_status("http://127.0.0.1:7444/healthz");
    assert_eq!(healthz(&lab)?, "200");
    std::fs::write(&hang, "")?;
    lab.add_client(2, false)?;
    let _ = lab.probe(2, false, 1);
    lab.wait_for(Duration::from_secs(10), "/healthz unhealthy", || {
        Ok(healthz(&lab)? == "503")
    })?;
    let why = lab.gw(&["curl", "-s", "http://127.0.0.1:7444/healthz"])?;
    assert!(why.contains("command_timeout"), "{why}");
    std::fs::remove_file(&hang)?;
    let c2 = IpAddr::from(client_v4(2));
    lab.wait_for(
        Duration::from_secs(20),
        "c2 in the kernel's map after the retry",
        || Ok(lab.kernel_map("client4")?.contains_key(&c2)),
    )?;
    lab.wait_for(Duration::from_secs(5), "/healthz healthy again", || {
        Ok(healthz(&lab)? == "200")
    })?;
    assert!(lab.agent_running());
    Ok(())
}

/// An `nft` that hangs on demand: a transaction (`-f -`) that starts while `hang` exists
/// touches `hanging` and waits for `hang` to go; each transaction is logged to `log`;
/// listings pass untouched.
struct HungNft {
    hang: std::path::PathBuf,
    hanging: std::path::PathBuf,
    log: std::path::PathBuf,
}

/// Writes the agent's config with the API and such an `nft` (and a resync every `resync`).
fn hung_nft_config(lab: &Lab, resync: &str) -> anyhow::Result<HungNft> {
    let files = HungNft {
        hang: lab.dir.join("hang"),
        hanging: lab.dir.join("hanging"),
        log: lab.dir.join("transactions"),
    };
    let wrapper = script(
        lab,
        "nft",
        format!(
            "case \"$*\" in *\"-f -\"*)\n  tx=$(mktemp -p {dir})\n  cat > \"$tx\"\n  if [ -e {hang} ]; then touch {hanging}; while [ -e {hang} ]; do sleep 0.02; done; fi\n  {{ echo '=== transaction'; cat \"$tx\"; echo; }} >> {log}\n  exec /usr/sbin/nft \"$@\" < \"$tx\";;\nesac\nexec /usr/sbin/nft \"$@\"\n",
            dir = lab.dir.display(),
            hang = files.hang.display(),
            hanging = files.hanging.display(),
            log = files.log.display()
        ),
    )?;
    let api = lab.api_config()?;
    lab.write_config(
        resync,
        "10m",
        &format!(
            "[dataplane]\nnft = \"{}\"\ncommand_timeout = \"60s\"\n{api}",
            wrapper.display()
        ),
    )?;
    Ok(files)
}

/// Until the loop publishes its first model (the state restored, the kernel read, the
/// first apply done and its decisions on disk), reads are refused with UNAVAILABLE and
/// `/readyz` says the agent is starting. They were answered from an empty model: every
/// uplink "down: interface missing", no drain, no client, for as long as the first apply
/// took.
#[test]
fn reads_before_the_first_model_is_shown_are_refused() -> anyhow::Result<()> {
    let mut lab = Lab::build("starting", two_uplinks(), 1, 0)?;
    let HungNft { hang, hanging, .. } = hung_nft_config(&lab, "10s")?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let (code, _, err) = lab.ctl("op", &["drain", "isp1"])?;
    assert_eq!(code, 0, "drain isp1: {err}");
    lab.stop_agent("TERM")?;
    // Without its table the next start has a transaction to make, and it hangs.
    lab.gw(&["nft", "delete", "table", "inet", "uplinkd"])?;
    std::fs::write(&hang, "")?;
    lab.spawn_agent()?;
    lab.wait_for(Duration::from_secs(10), "the first apply hanging", || {
        Ok(hanging.exists())
    })?;
    for what in ["uplinks", "clients"] {
        let (code, out, err) = lab.ctl("view", &[what])?;
        assert_ne!(
            code, 0,
            "view {what} answered before the first model:\n{out}"
        );
        // UNAVAILABLE, which uplinkctl counts with the unreachable (exit code 4: try
        // again), and words as what it is.
        assert_eq!(code, 4, "view {what}: {err}");
        assert!(
            err.contains("not ready: uplinkd is starting"),
            "view {what}: {err}"
        );
    }
    let (code, out, err) = lab.ctl("view", &["status"])?;
    assert_ne!(code, 0, "status answered before the first model: {out}");
    assert!(err.contains("uplinkd is starting"), "status: {err}");
    assert_eq!(lab.http_status("http://127.0.0.1:7444/readyz")?, "503");
    let ready = lab.gw(&["curl", "-s", "http://127.0.0.1:7444/readyz"])?;
    assert!(ready.starts_with("uplinkd is starting"), "/readyz: {ready}");
    std::fs::remove_file(&hang)?;
    lab.wait_for(Duration::from_secs(20), "/readyz ready", || {
        Ok(lab.http_status("http://127.0.0.1:7444/readyz")? == "200")
    })?;
    let (code, out, err) = lab.ctl("view", &["uplinks"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("isp1") && l.contains("draining")),
        "the restored drain shown once started:\n{out}"
    );
    Ok(())
}

/// The loop decides while `nft` hangs: neighbours that arrive during a hung transaction
/// are placed and a silent upstream failure takes its uplink down, both visible in the
/// API while the transaction still hangs, and all of it lands in one merged transaction
/// once `nft` returns.
#[test]
fn a_hung_nft_holds_no_decision_back() -> anyhow::Result<()> {
    let mut lab = Lab::build("nfthang", probed_uplinks(), 1, 0)?;
    let HungNft { hang, hanging, log } = hung_nft_config(&lab, "10m")?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let new: Vec<IpAddr> = (30..33).map(|i| IpAddr::from(client_v4(i))).collect();
    let neigh = |i: usize| {
        lab.gw(&[
            "ip",
            "neigh",
            "replace",
            &new[i].to_string(),
            "lladdr",
            &format!("02:aa:00:00:00:{:02x}", 0x30 + i),
            "dev",
            uplink_tests::LAN_IF,
            "nud",
            "permanent",
        ])
    };
    std::fs::write(&hang, "")?;
    neigh(0)?;
    lab.wait_for(Duration::from_secs(10), "a transaction hanging", || {
        Ok(hanging.exists())
    })?;
    let before = std::fs::read_to_string(&log).unwrap_or_default();
    neigh(1)?;
    neigh(2)?;
    lab.upstream_loss("isp2", 100)?;
    let shown = lab.wait_for(
        Duration::from_secs(20),
        "the new clients and isp2 down in the API, nft still hanging",
        || {
            let (_, clients, _) = lab.ctl("view", &["clients", "-o", "json"])?;
            let (_, uplinks, _) = lab.ctl("view", &["uplinks", "-o", "json"])?;
            let u: serde_json::Value = serde_json::from_str(&uplinks)?;
            let isp2_down = u
                .as_array()
                .into_iter()
                .flatten()
                .any(|x| x["name"] == "isp2" && x["state"] == "down");
            Ok(new.iter().all(|ip| clients.contains(&format!("\"{ip}\"")))
                && isp2_down
                && hang.exists())
        },
    );
    std::fs::remove_file(&hang)?;
    shown?;
    assert_eq!(
        std::fs::read_to_string(&log).unwrap_or_default(),
        before,
        "no transaction ran during the hang"
    );
    // The hung transaction carries the first neighbour; the next one everything decided
    // meanwhile.
    lab.wait_for(
        Duration::from_secs(20),
        "the merged apply in the kernel",
        || {
            let k = lab.kernel_map("client4")?;
            Ok(new.iter().all(|ip| k.contains_key(ip)))
        },
    )?;
    // The failover landed too: whatever c1's home, it leaves by isp1.
    assert_eq!(
        lab.uplink_of_source(lab.probe(1, false, 20)?).as_deref(),
        Some("isp1")
    );
    let after = std::fs::read_to_string(&log)?;
    let txs: Vec<&str> = after[before.len()..]
        .split("=== transaction")
        .filter(|t| !t.trim().is_empty())
        .collect();
    assert!(
        txs.len() >= 2,
        "the hung transaction and the merged one: {txs:?}"
    );
    assert!(txs[0].contains(&new[0].to_string()), "{}", txs[0]);
    for ip in &new[1..] {
        assert!(
            txs[1].contains(&ip.to_string()),
            "{ip} in the merged one: {}",
            txs[1]
        );
    }
    Ok(())
}

/// The agent's resident memory in kB.
fn agent_rss_kb(lab: &Lab) -> anyhow::Result<u64> {
    let pid = lab
        .agent_pid()
        .ok_or_else(|| anyhow::anyhow!("agent not running"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

/// A LAN flood: one host announces 5,000 addresses, others 5,000 MACs. The limits hold
/// (lan.max_clients, lan.max_addresses_per_client), the refusals are counted, the clients
/// already present keep their uplinks, and the agent keeps serving.
#[test]
fn a_lan_flood_is_bounded_and_existing_clients_keep_their_uplinks() -> anyhow::Result<()> {
    let mut lab = Lab::build("lanflood", two_uplinks(), 2, 0)?;
    lab.write_config("10s", "10m", "[metrics]\nlisten = \"127.0.0.1:9477\"\n")?;
    let text = std::fs::read_to_string(lab.config_path())?.replace(
        "[lan]\n",
        "[lan]\nmax_clients = 1000\nmax_addresses_per_client = 8\n",
    );
    std::fs::write(lab.config_path(), text)?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let rss_before = agent_rss_kb(&lab)?;
    let mut batch = String::new();
    for n in 0..5000u32 {
        batch += &format!(
            "neigh replace 2001:db8:1::1:{:x} lladdr 02:ee:00:00:00:01 dev br-lan nud permanent\n",
            n
        );
        batch += &format!(
            "neigh replace 2001:db8:1::2:{:x} lladdr 02:ee:00:01:{:02x}:{:02x} dev br-lan nud permanent\n",
            n,
            n >> 8,
            n & 0xff
        );
    }
    let file = lab.dir.join("flood.batch");
    std::fs::write(&file, batch)?;
    lab.gw(&["ip", "-batch", file.to_str().unwrap()])?;
    lab.wait_for(Duration::from_secs(20), "the limits to be reached", || {
        let m = lab.scrape(9477)?;
        Ok(m.get("uplinkd_clients") == Some(&1000.0)
            && m.get("uplinkd_lan_neighbours_refused_total{limit=\"lan.max_clients\"}")
                .is_some_and(|n| *n >= 4000.0)
            && m.get(
                "uplinkd_lan_neighbours_refused_total{limit=\"lan.max_addresses_per_client\"}",
            )
            .is_some_and(|n| *n >= 4000.0))
    })?;
    for (ip, home) in &homes {
        let IpAddr::V4(v4) = ip else { continue };
        let i = u32::from(v4.octets()[3]) - 10;
        assert_eq!(&lab.via(i)?, home, "{ip} kept its uplink");
    }
    // No placement will come while the LAN is full: a new host's first packets are hashed
    // over the uplinks (`overflow`), not all sent to one of them, and it is answered.
    let unassigned = lab.gw(&["nft", "list", "chain", "inet", "uplinkd", "unassigned"])?;
    let first = unassigned
        .lines()
        .find(|l| l.contains("goto"))
        .unwrap_or_default();
    assert!(first.contains("goto overflow"), "{unassigned}");
    let overflow = lab.gw(&["nft", "list", "chain", "inet", "uplinkd", "overflow"])?;
    assert!(
        overflow.contains("goto up_isp1") && overflow.contains("goto up_isp2"),
        "{overflow}"
    );
    lab.add_client(3, false)?;
    lab.probe(3, false, 10)?;
    let map = lab.kernel_map("client6")?;
    let one_mac = map
        .keys()
        .filter(|ip| ip.to_string().starts_with("2001:db8:1::1:"))
        .count();
    assert_eq!(one_mac, 8, "one MAC's addresses are capped");
    let rss_after = agent_rss_kb(&lab)?;
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} kB → {rss_after} kB"
    );
    assert!(lab.agent_running());
    Ok(())
}

/// A tool wrapper that fails (or hangs) while `flag` exists, and runs the real tool
/// otherwise.
fn wrapper(
    lab: &Lab,
    tool: &str,
    flag: &std::path::Path,
    fail: &str,
) -> anyhow::Result<std::path::PathBuf> {
    script(
        lab,
        tool,
        format!(
            "if [ -e {} ]; then {fail}; fi\nexec /usr/sbin/{tool} \"$@\"\n",
            flag.display()
        ),
    )
}

/// An executable shell script `<tool>-wrapper` in the lab's directory, with `body`.
fn script(lab: &Lab, tool: &str, body: String) -> anyhow::Result<std::path::PathBuf> {
    let path = lab.dir.join(format!("{tool}-wrapper"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}

/// Conntrack entries in the gateway carrying uplink mark id `k`.
fn marked_flows(lab: &Lab, k: u32) -> anyhow::Result<usize> {
    let filter = format!("{:#x}/0x3f000000", k << 24);
    let out = lab.gw(&["conntrack", "-L", "-m", &filter])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// The dead uplink's conntrack entries are deleted at failover; when that fails, it is
/// retried (the flag used to be cleared before the deletion ran, so a failure stuck).
#[test]
fn a_failed_conntrack_deletion_is_retried() -> anyhow::Result<()> {
    let mut lab = Lab::build("ctretry", two_uplinks(), 2, 0)?;
    let broken = lab.dir.join("conntrack-broken");
    let ct = wrapper(
        &lab,
        "conntrack",
        &broken,
        "echo 'conntrack: simulated failure' >&2; exit 2",
    )?;
    lab.write_config(
        "10s",
        "10m",
        &format!(
            "[dataplane]\nconntrack = \"{}\"\nconntrack_flush = \"tool\"\n",
            ct.display()
        ),
    )?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, "isp2");
    let mut tcp = uplink_tests::TcpFlow::connect(&lab, c)?;
    assert_eq!(
        lab.uplink_of_source(tcp.exchange()?).as_deref(),
        Some("isp2")
    );
    assert!(marked_flows(&lab, 2)? >= 1, "the flow carries isp2's mark");
    std::fs::write(&broken, "")?;
    lab.carrier("isp2", false)?;
    lab.wait_for(Duration::from_secs(10), "the failed deletion", || {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_conntrack_flush_errors_total{uplink=\"isp2\"}")
            .is_some_and(|n| *n >= 1.0))
    })?;
    assert!(marked_flows(&lab, 2)? >= 1, "nothing was deleted yet");
    std::fs::remove_file(&broken)?;
    lab.wait_for(
        Duration::from_secs(10),
        "isp2's entries deleted by the retry",
        || Ok(marked_flows(&lab, 2)? == 0),
    )?;
    Ok(())
}

/// 100 SIGHUPs within a second, with probes on: descriptors stay flat and a flow on a
/// healthy uplink loses no datagram.
#[test]
fn a_storm_of_sighups_leaks_nothing_and_loses_nothing() -> anyhow::Result<()> {
    let probes = "probes = [\"icmp:203.0.113.10\", \"tcp:203.0.113.10:9001\"]";
    let uplinks = vec![
        UplinkSpec::new("isp1", 1, false).with(probes),
        UplinkSpec::new("isp2", 1, false).with(probes),
    ];
    let lab = api_lab("sighup", uplinks, 1, "")?;
    lab.greet_clients()?;
    let before = lab.agent_fds()?;
    let stream = uplink_tests::UdpStream::start(&lab, 1, false, Duration::from_millis(10))?;
    for _ in 0..100 {
        lab.signal_agent("HUP")?;
        std::thread::sleep(Duration::from_millis(10));
    }
    // Signals coalesce; a reload through the API after them proves the loop is serving.
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    let r = stream.finish()?;
    assert!(r.sent > 50, "{r:?}");
    assert_eq!(
        r.received, r.sent,
        "datagrams lost across the reloads: {r:?}"
    );
    lab.wait_for(
        Duration::from_secs(5),
        "descriptors back to the baseline",
        || Ok(lab.agent_fds()? <= before + 4),
    )?;
    Ok(())
}

/// A lab with one client and its agent; the state directory's path.
fn state_dir_lab(tag: &str) -> anyhow::Result<(Lab, String)> {
    let mut lab = Lab::build(tag, two_uplinks(), 1, 0)?;
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    lab.greet_clients()?;
    let dir = lab.state_dir().display().to_string();
    Ok((lab, dir))
}

/// Runs a command in the agent's mount namespace (ip netns exec gives it its own), where
/// a mount over the state directory is seen by the agent alone.
fn in_agent_mounts(pid: u32, args: &[&str]) -> anyhow::Result<String> {
    let pid = pid.to_string();
    let mut a = vec!["nsenter", "-t", pid.as_str(), "-m", "--"];
    a.extend_from_slice(args);
    uplink_tests::sh(&a)
}

/// A read-only state directory: a clear error, routing goes on, and the write is retried
/// and succeeds once the directory is writable again.
#[test]
fn a_read_only_state_dir_is_reported_and_retried() -> anyhow::Result<()> {
    let (mut lab, dir) = state_dir_lab("rostate")?;
    let pid = lab.agent_pid().expect("running");
    let nsenter = |args: &[&str]| in_agent_mounts(pid, args);
    // Root ignores permission bits, not a read-only mount.
    nsenter(&["mount", "--bind", &dir, &dir])?;
    nsenter(&["mount", "-o", "remount,bind,ro", &dir])?;
    let mark = lab.log_len();
    lab.add_client(2, false)?;
    assert!(lab.via(2).is_ok(), "routing goes on");
    lab.wait_for(Duration::from_secs(10), "the save error", || {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_state_save_errors_total{file=\"state.json\"}")
            .is_some_and(|n| *n >= 1.0))
    })?;
    // Named in the log, once (rate-limited), with the reason.
    let log = lab.log_since(mark);
    assert!(log.contains("Read-only file system"), "{log}");
    let c2 = IpAddr::from(client_v4(2));
    assert!(!lab.assignments()?.contains_key(&c2));
    nsenter(&["umount", &dir])?;
    lab.wait_for(Duration::from_secs(10), "c2 saved by the retry", || {
        Ok(lab.assignments()?.contains_key(&c2))
    })?;
    assert!(lab.agent_running());
    Ok(())
}

/// Passive health per family: an uplink whose IPv4 path is dead while IPv6 replies keep
/// flowing goes down on its (IPv4) probes. IPv6 traffic used to excuse every lost IPv4
/// round, and so did unsolicited inbound packets.
#[test]
fn ipv6_traffic_does_not_excuse_a_dead_ipv4_path() -> anyhow::Result<()> {
    let uplinks = probed_uplinks();
    let mut lab = Lab::build("passive6", uplinks, 2, 2)?;
    lab.write_config("10s", "10m", "[metrics]\nlisten = \"127.0.0.1:9477\"\n")?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, "isp1");
    let stream = uplink_tests::UdpStream::start(&lab, c, true, Duration::from_millis(10))?;
    // The ISP forwards IPv6 and drops IPv4.
    let isp1 = lab.ns("isp1");
    uplink_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &isp1,
        "nft",
        "add table inet v4_dead { chain f { type filter hook forward priority 0; meta nfproto ipv4 counter drop; }; }",
    ])?;
    lab.wait_for(
        Duration::from_secs(15),
        "isp1 down on its IPv4 probes",
        || Ok(lab.scrape(9477)?.get("uplinkd_uplink_up{uplink=\"isp1\"}") == Some(&0.0)),
    )?;
    let r = stream.finish()?;
    assert!(r.received > 0, "IPv6 replies flowed meanwhile: {r:?}");
    let m = lab.scrape(9477)?;
    assert_eq!(
        m["uplinkd_uplink_probe_rounds_lost_while_forwarding_total{uplink=\"isp1\"}"], 0.0,
        "no IPv4 round was excused by IPv6 traffic"
    );
    Ok(())
}

/// A reload that renames an uplink removes the old name's series: an alert on
/// "every uplink down" must not keep seeing a name that no longer exists.
#[test]
fn a_renamed_uplink_leaves_no_stale_series() -> anyhow::Result<()> {
    let lab = api_lab("stale", two_uplinks(), 1, "")?;
    lab.greet_clients()?;
    assert!(
        lab.scrape(9477)?
            .contains_key("uplinkd_uplink_up{uplink=\"isp2\"}")
    );
    let text = std::fs::read_to_string(lab.config_path())?.replace("\"isp2\"", "\"backup\"");
    std::fs::write(lab.config_path(), text)?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    let m = lab.scrape(9477)?;
    assert!(
        m.contains_key("uplinkd_uplink_up{uplink=\"backup\"}"),
        "{m:?}"
    );
    let stale: Vec<&String> = m.keys().filter(|k| k.contains("uplink=\"isp2\"")).collect();
    assert!(stale.is_empty(), "series of the old name: {stale:?}");
    Ok(())
}

/// An uplink interface renamed under the agent (udev, an operator): the uplink is gone
/// and its clients move; renamed back, it returns.
#[test]
fn a_renamed_uplink_interface_fails_over_and_back() -> anyhow::Result<()> {
    let mut lab = Lab::build("ifrename", two_uplinks(), 2, 0)?;
    lab.write_config("10s", "10m", "[failover]\nfailback_delay = \"0s\"\n")?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let c = client_on(&homes, "isp1");
    // A link must be down to be renamed: that alone is a carrier event, so rename it
    // while down and bring it up under the new name.
    lab.gw(&["ip", "link", "set", "wan1", "down"])?;
    lab.gw(&["ip", "link", "set", "wan1", "name", "wan1x"])?;
    lab.gw(&["ip", "link", "set", "wan1x", "up"])?;
    assert_eq!(lab.via(c)?, "isp2", "isp1's interface is gone");
    lab.gw(&["ip", "link", "set", "wan1x", "down"])?;
    lab.gw(&["ip", "link", "set", "wan1x", "name", "wan1"])?;
    lab.gw(&["ip", "link", "set", "wan1", "up"])?;
    // Its address and routes come back with the link (the lab's ISP answers at once).
    lab.wait_for(Duration::from_secs(10), "c back on isp1", || {
        Ok(lab.via(c)? == "isp1")
    })?;
    assert!(lab.agent_running());
    Ok(())
}

/// A full state directory (a 64 KB tmpfs, filled up): a clear error, routing goes on,
/// nothing half-written is left, and the write succeeds once there is room.
#[test]
fn a_full_state_dir_is_reported_and_retried() -> anyhow::Result<()> {
    let (mut lab, dir) = state_dir_lab("fullstate")?;
    let pid = lab.agent_pid().expect("running");
    let nsenter = |args: &[&str]| in_agent_mounts(pid, args);
    nsenter(&["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", &dir])?;
    let filler = format!("{dir}/filler");
    // dd stops with "No space left on device": the file system is full.
    let _ = nsenter(&["dd", "if=/dev/zero", &format!("of={filler}"), "bs=4k"]);
    let mark = lab.log_len();
    lab.add_client(2, false)?;
    assert!(lab.via(2).is_ok(), "routing goes on");
    lab.wait_for(Duration::from_secs(10), "the save error", || {
        Ok(lab
            .scrape(9477)?
            .get("uplinkd_state_save_errors_total{file=\"state.json\"}")
            .is_some_and(|n| *n >= 1.0))
    })?;
    assert!(
        lab.log_since(mark).contains("No space left on device"),
        "{}",
        lab.log_since(mark)
    );
    let left = nsenter(&["ls", "-a", &dir])?;
    assert!(
        !left.contains(".tmp"),
        "a partial temp file was left: {left}"
    );
    nsenter(&["rm", &filler])?;
    let c2 = IpAddr::from(client_v4(2));
    lab.wait_for(Duration::from_secs(10), "c2 saved by the retry", || {
        let text = nsenter(&["cat", &format!("{dir}/state.json")])?;
        Ok(text.contains(&c2.to_string()))
    })?;
    assert!(lab.agent_running());
    Ok(())
}

/// Probes start only once the first apply has put the uplinks' rules and routes in place.
/// A slow first apply (here `nft` takes 2 s, as 100k clients can) used to leave the probes
/// failing meanwhile, and healthy uplinks went down at start.
#[test]
fn probes_wait_for_the_first_apply() -> anyhow::Result<()> {
    let uplinks = probed_uplinks();
    let mut lab = Lab::build("slowstart", uplinks, 1, 0)?;
    let slow = lab.dir.join("slow");
    let nft = script(
        &lab,
        "nft",
        format!(
            "case \"$*\" in *\"-f -\"*) if [ -e {s} ]; then rm {s}; sleep 2; fi;; esac\nexec /usr/sbin/nft \"$@\"\n",
            s = slow.display()
        ),
    )?;
    lab.write_config(
        "10s",
        "10m",
        &format!("[dataplane]\nnft = \"{}\"\n", nft.display()),
    )?;
    std::fs::write(&slow, "")?;
    lab.start_agent()?;
    assert!(!slow.exists(), "the first apply went through the slow nft");
    lab.wait_for(
        Duration::from_secs(10),
        "probe answers on both uplinks",
        || {
            let m = lab.scrape(9477)?;
            Ok(["isp1", "isp2"].iter().all(|u| {
                m.get(&format!(
                    "uplinkd_uplink_probe_rtt_seconds_count{{uplink=\"{u}\"}}"
                ))
                .is_some_and(|n| *n >= 5.0)
            }))
        },
    )?;
    let m = lab.scrape(9477)?;
    for u in ["isp1", "isp2"] {
        assert_eq!(
            m[&format!("uplinkd_uplink_up{{uplink=\"{u}\"}}")],
            1.0,
            "{u}"
        );
        assert_eq!(
            m[&format!("uplinkd_uplink_flaps_total{{uplink=\"{u}\"}}")],
            0.0,
            "{u} went down at start"
        );
    }
    Ok(())
}

/// No TLS session resumption on the API: a resumed session skips the client-certificate
/// check, so a client whose CA left api.ca could come back on an old session. Every
/// reconnect is a full handshake. (Checked over TLS 1.2 session ids, which `openssl
/// s_client -reconnect` exercises; the server sends no TLS 1.3 tickets either.)
#[test]
fn api_sessions_are_never_resumed() -> anyhow::Result<()> {
    let lab = api_lab("noresume", two_uplinks(), 0, "")?;
    let certs = lab.dir.join("certs");
    let d = certs.display().to_string();
    let out = uplink_tests::sh(&[
        "ip",
        "netns",
        "exec",
        &lab.ns("gw"),
        "sh",
        "-c",
        &format!(
            "openssl s_client -connect 127.0.0.1:7443 -reconnect -CAfile {d}/ca.crt -cert {d}/view.crt -key {d}/view.key -alpn h2 -tls1_2 </dev/null 2>&1"
        ),
    ])?;
    let new = out.lines().filter(|l| l.starts_with("New, ")).count();
    let reused = out.lines().filter(|l| l.starts_with("Reused, ")).count();
    assert!(
        new >= 6,
        "six full handshakes: {new} new, {reused} reused\n{out}"
    );
    assert_eq!(reused, 0, "{out}");
    Ok(())
}

/// WatchEvents streams are capped (64 per agent): the next one gets RESOURCE_EXHAUSTED
/// with the reason, and a slot frees when a stream closes.
#[test]
fn event_streams_are_capped() -> anyhow::Result<()> {
    use uplink_api::v1::{WatchEventsRequest, agent_client::AgentClient};
    let lab = api_lab("watchcap", two_uplinks(), 0, "")?;
    let certs = lab.dir.join("certs");
    let ns = lab.ns("gw");
    in_netns(&ns, move || -> anyhow::Result<()> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::from_static("https://127.0.0.1:7443")
                .tls_config(uplink_tests::client_tls(&certs, "view", "127.0.0.1")?)?
                .connect()
                .await?;
            let mut client = AgentClient::new(channel);
            let mut open = Vec::new();
            for _ in 0..64 {
                open.push(
                    client
                        .watch_events(WatchEventsRequest {})
                        .await?
                        .into_inner(),
                );
            }
            let refused = client
                .watch_events(WatchEventsRequest {})
                .await
                .expect_err("the 65th stream is refused");
            assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
            assert!(refused.message().contains("64 event streams"), "{refused}");
            drop(open.pop());
            // The server notices the closed stream when it next writes to it or polls it.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match client.watch_events(WatchEventsRequest {}).await {
                    Ok(_) => break,
                    Err(_) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => anyhow::bail!("no slot came back: {e}"),
                }
            }
            anyhow::Ok(())
        })
    })?
}

/// Probes took isp2 down (silent upstream); a reload removed its `probes`; the path healed.
/// The reload kept the old health wholesale, probe verdict included, with no prober left
/// to lift it: isp2 stayed down for ever. Without probes the link alone judges it.
#[test]
fn a_reload_that_removes_an_uplinks_probes_lifts_their_verdict() -> anyhow::Result<()> {
    let lab = api_lab(
        "reprobe",
        probed_uplinks(),
        0,
        "[metrics]\nlisten = \"127.0.0.1:9477\"\n",
    )?;
    lab.upstream_loss("isp2", 100)?;
    lab.wait_for(Duration::from_secs(15), "isp2 down on its probes", || {
        Ok(lab.uplink_up("isp2")? == Some(0.0))
    })?;
    lab.upstream_loss("isp2", 0)?;
    let text = std::fs::read_to_string(lab.config_path())?;
    let (before, after) = text
        .split_once("name = \"isp2\"")
        .expect("isp2 in the config");
    let after = after.replacen("probes = [\"icmp:203.0.113.10\"]", "", 1);
    std::fs::write(lab.config_path(), format!("{before}name = \"isp2\"{after}"))?;
    let (code, _, err) = lab.ctl("op", &["reload"])?;
    assert_eq!(code, 0, "{err}");
    // The reload answers after its apply: the verdict is already taken.
    assert_eq!(
        lab.uplink_up("isp2")?,
        Some(1.0),
        "isp2 is judged by its link"
    );
    let (_, events, _) = lab.ctl("view", &["events"])?;
    assert!(
        events.contains("probes removed by a reload"),
        "the state change says why: {events}"
    );
    Ok(())
}
