//! `uplinkd init` on the lab's gateway: it reads the kernel (changing nothing), names what
//! it found and why, its output passes check-config, and run as is it dispatches the lab's
//! clients.

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec, client_v4, uplinkd_bin};

fn init(lab: &Lab, args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns("gw")])
        .arg(uplinkd_bin())
        .arg("init")
        .args(args)
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn init_writes_a_config_that_runs_the_lab() -> anyhow::Result<()> {
    let ups = vec![
        UplinkSpec::new("isp1", 1, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ];
    let mut lab = Lab::build("init", ups, 3, 0)?;
    // What a gateway has before uplinkd: a static default route, a DHCP client's, and a
    // foreign ip rule inside uplinkd's default band.
    lab.gw(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "100.64.1.1",
        "dev",
        "wan1",
        "metric",
        "100",
    ])?;
    lab.gw(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "100.64.2.1",
        "dev",
        "wan2",
        "metric",
        "200",
        "proto",
        "dhcp",
    ])?;
    lab.gw(&[
        "ip", "rule", "add", "pref", "10050", "fwmark", "0x1", "lookup", "100",
    ])?;
    let kernel = |lab: &Lab| -> anyhow::Result<String> {
        Ok(lab.gw(&["ip", "rule"])?
            + &lab.gw(&["ip", "route", "show", "table", "all"])?
            + &lab.gw(&["nft", "list", "ruleset"])?)
    };
    let before = kernel(&lab)?;
    let (ok, text, err) = init(&lab, &[])?;
    assert!(ok, "{err}");
    assert_eq!(kernel(&lab)?, before, "init changed the kernel");
    for want in [
        "br-lan: a bridge with 198.19.0.1/24",
        "interfaces = [\"br-lan\"]",
        "gateway = \"100.64.1.1\"",
        "default via 100.64.2.1 (metric 200, table 254, dhcp)",
        "100.64.3.2 peer 100.64.3.1: a point-to-point link",
        "priority 10050",
        "rule_priority = 9000",
        "# probes = [\"icmp:ADDRESS\"]",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // --write: written once, never over an existing file.
    let file = lab.dir.join("init.toml");
    let path = file.to_str().unwrap();
    let (ok, _, err) = init(&lab, &["--write", path])?;
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&file)?, text);
    let (ok, _, err) = init(&lab, &["--write", path])?;
    assert!(!ok && err.contains("does not overwrite"), "{err}");
    let check = Command::new(uplinkd_bin())
        .args(["check-config", path])
        .output()?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // Run as is (with the test's state directory): every client is dispatched, and leaves by
    // the uplink it was given.
    std::fs::write(
        lab.config_path(),
        format!(
            "[agent]\nstate_dir = \"{}\"\n\n{text}",
            lab.state_dir().display()
        ),
    )?;
    lab.start_agent()?;
    let homes = lab.greet_clients()?;
    let mut used = std::collections::BTreeSet::new();
    for i in 1..=3 {
        let home = homes[&IpAddr::from(client_v4(i))].clone();
        // init names uplinks after their interfaces: wan<k> is the lab's uplink k.
        let k: usize = home.trim_start_matches("wan").parse()?;
        let seen = lab.probe(i, false, 10)?;
        assert_eq!(
            lab.uplink_of_source(seen),
            Some(lab.uplinks[k - 1].name.clone())
        );
        used.insert(home);
    }
    assert_eq!(used.len(), 3, "one client per uplink: {homes:?}");
    assert!(
        lab.gw(&["ip", "rule"])?.contains("9000:"),
        "uplinkd took the free band"
    );
    lab.wait_for(
        Duration::from_secs(5),
        "isp2's learned gateway in its table",
        || {
            Ok(lab
                .gw(&["ip", "route", "show", "table", "1002"])?
                .contains("via 100.64.2.1"))
        },
    )?;
    Ok(())
}

/// `init --write --force` over the packaged 0600 conffile wrote its temporary file with
/// `fs::write`: it followed a link planted in its place and took its mode from the umask,
/// leaving a 0644 config. Now the file is created afresh, 0600, and a link is refused.
#[test]
fn init_write_keeps_the_conffile_private_and_follows_no_link() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let lab = Lab::build("initmode", vec![UplinkSpec::new("isp1", 1, false)], 0, 0)?;
    let conf = lab.dir.join("uplinkd.toml");
    std::fs::write(&conf, "# the packaged example\n")?;
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o600))?;
    let path = conf.to_str().expect("utf-8");
    // A umask that would make a fresh file 0644.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 022; exec ip netns exec {} {} init --write {path} --force",
            lab.ns("gw"),
            uplinkd_bin().display()
        ))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&conf)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the config stays 0600");
    assert!(std::fs::read_to_string(&conf)?.contains("[[uplink]]"));

    // A link where the temporary file goes: refused, its target untouched.
    let victim = lab.dir.join("victim");
    std::fs::write(&victim, "keep\n")?;
    std::os::unix::fs::symlink(&victim, conf.with_extension("toml.tmp"))?;
    let (ok, _, err) = init(&lab, &["--write", path, "--force"])?;
    assert!(!ok, "refused: {err}");
    assert!(err.contains("cannot write"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim)?, "keep\n");
    Ok(())
}
