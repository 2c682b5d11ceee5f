//! The shipped image, run with exactly the DaemonSet's privileges (mounts, NET_ADMIN +
//! NET_RAW only, read-only root, no new privileges) in a lab gateway: it dispatches, fails
//! over with the image's own `nft` and `conntrack`, and answers /healthz and /readyz.
//!
//! Needs the image's root filesystem: `bash .ci/image` builds the image and runs this test
//! (CI does); by hand, `UPLINK_ROOTFS=DIR cargo test --test image -- --ignored`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use uplink_tests::container::{Container, PodSpec};
use uplink_tests::{Lab, client_v4, echo_source, probed_uplinks};

fn daemonset() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/daemonset.yaml")
}

#[test]
#[ignore = "needs the image's root filesystem: bash .ci/image"]
fn the_image_runs_with_the_daemonsets_privileges() -> anyhow::Result<()> {
    let rootfs = PathBuf::from(
        std::env::var("UPLINK_ROOTFS")
            .context("UPLINK_ROOTFS: the exported root filesystem of the image")?,
    );
    for tool in ["usr/bin/uplinkd", "usr/sbin/nft", "usr/sbin/conntrack"] {
        ensure!(rootfs.join(tool).exists(), "the image has no /{tool}");
    }
    let spec = PodSpec::from_daemonset(&daemonset())?;
    let mut lab = Lab::build("image", probed_uplinks(), 2, 0)?;
    // The config as the ConfigMap would mount it: paths inside the container.
    let api = lab.api_config()?;
    lab.write_config("10s", "10m", &api)?;
    let certs = lab.dir.join("certs");
    lab.edit_config(certs.to_str().unwrap(), "/etc/uplink/tls")?;
    lab.edit_config(lab.state_dir().to_str().unwrap(), "/var/lib/uplinkd")?;
    let (tmp, run) = (lab.dir.join("tmp"), lab.dir.join("run"));
    for d in [&tmp, &run, &lab.state_dir()] {
        std::fs::create_dir_all(d)?;
    }
    let config = lab.config_path();
    let volumes = BTreeMap::from([
        ("config".into(), config.parent().unwrap().to_path_buf()),
        ("tls".into(), certs),
        ("state".into(), lab.state_dir()),
        ("tmp".into(), tmp),
        ("run".into(), run.clone()),
    ]);
    ensure!(
        spec.mounts
            .iter()
            .any(|m| m.volume == "config" && m.sub_path.as_deref() == Some("uplinkd.toml")),
        "the DaemonSet mounts the config differently: {:?}",
        spec.mounts
    );
    lab.container = Some(Container {
        rootfs: rootfs.clone(),
        spec,
        volumes,
    });
    lab.start_agent()?;

    // Exactly the pod's privileges.
    let pid = lab.agent_pid().context("agent pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("CapEff:"), "0000000000003000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000003000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root"))?,
        rootfs,
        "not chrooted into the image"
    );
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    let root_opts = mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .rfind(|f| f.get(4) == Some(&"/"))
        .map(|f| f[5].to_string())
        .context("no root mount")?;
    assert!(root_opts.split(',').any(|o| o == "ro"), "root {root_opts}");
    // The host-wide table lock lives in the pod's /run/uplinkd volume.
    assert!(
        std::fs::read_dir(&run)?.count() > 0,
        "no lock file in the /run/uplinkd volume"
    );

    lab.wait_for(Duration::from_secs(10), "/readyz 200", || {
        Ok(lab.http_status("http://127.0.0.1:7444/readyz")? == "200")
    })?;
    assert_eq!(lab.http_status("http://127.0.0.1:7444/healthz")?, "200");

    // Dispatch: each client leaves by the uplink it was assigned.
    let homes = lab.greet_clients()?;
    let home = |i: u32| homes[&IpAddr::from(client_v4(i))].clone();
    for i in [1, 2] {
        let seen = lab.probe(i, false, 10)?;
        assert_eq!(lab.uplink_of_source(seen), Some(home(i)), "client c{i}");
    }
    assert_ne!(home(1), home(2), "both clients on one uplink: {homes:?}");

    // Failover with the image's tools: a running flow of the client on isp2 is answered
    // from isp1 once its NAT entry (conntrack -D) is gone and the nft maps moved.
    let c = if home(1) == "isp2" { 1 } else { 2 };
    let sock = lab.client_socket(c, false)?;
    let before = echo_source(&sock, 10)?.context("no answer before the failover")?;
    assert_eq!(lab.uplink_of_source(before).as_deref(), Some("isp2"));
    lab.carrier("isp2", false)?;
    lab.wait_for(
        Duration::from_secs(10),
        "the flow answered via isp1",
        || Ok(echo_source(&sock, 1)?.and_then(|s| lab.uplink_of_source(s)) == Some("isp1".into())),
    )?;
    let m = lab.scrape(9477)?;
    assert_eq!(
        m.get("uplinkd_uplink_up{uplink=\"isp2\"}"),
        Some(&0.0),
        "{m:?}"
    );
    assert_eq!(
        m.get("uplinkd_conntrack_flush_errors_total{uplink=\"isp2\"}")
            .copied()
            .unwrap_or(0.0),
        0.0
    );
    lab.carrier("isp2", true)?;
    lab.wait_for(Duration::from_secs(10), "isp2 back up", || {
        Ok(lab.scrape(9477)?.get("uplinkd_uplink_up{uplink=\"isp2\"}") == Some(&1.0))
    })?;
    assert_eq!(lab.http_status("http://127.0.0.1:7444/readyz")?, "200");
    Ok(())
}
