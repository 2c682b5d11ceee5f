//! The deployment kit, checked offline: the example configs (uplinkd check-config), alert
//! rules and their unit tests (promtool), the systemd unit (systemd-analyze) and the
//! agent's systemd notifications.

use std::path::{Path, PathBuf};
use std::time::Duration;

use uplink_tests::{Lab, UplinkSpec, sh};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The shipped configs (the annotated example and the Kubernetes ConfigMap's) are valid.
#[test]
fn example_configs_pass_check_config() -> anyhow::Result<()> {
    let example = deploy().join("uplinkd.toml");
    let configmap: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        deploy().join("kubernetes/configmap.yaml"),
    )?)?;
    let embedded = configmap["data"]["uplinkd.toml"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("configmap has no data.uplinkd.toml"))?;
    let dir = std::env::temp_dir().join(format!("ulexamples-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // The ConfigMap points at the mounted TLS Secret; stand in real files at those names.
    uplink_tests::make_certs(&dir)?;
    let d = dir.to_str().unwrap();
    std::fs::copy(dir.join("gw.crt"), dir.join("tls.crt"))?;
    std::fs::copy(dir.join("gw.key"), dir.join("tls.key"))?;
    let from_configmap = dir.join("configmap.toml");
    std::fs::write(
        &from_configmap,
        embedded.replace("/etc/uplink/tls/", &format!("{d}/")),
    )?;
    for path in [&example, &from_configmap] {
        let out = std::process::Command::new(uplink_tests::uplinkd_bin())
            .arg("--config")
            .arg(path)
            .arg("check-config")
            .output()?;
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn alert_rules_check_and_pass_their_unit_tests() -> anyhow::Result<()> {
    let dir = deploy().join("prometheus");
    let out = sh(&[
        "promtool",
        "check",
        "rules",
        dir.join("alerts.yaml").to_str().unwrap(),
    ])?;
    assert!(out.contains("SUCCESS: 8 rules found"), "{out}");
    for alert in [
        "UplinkDown",
        "AllUplinksDown",
        "UplinkDegraded",
        "UplinkFlapping",
        "AgentNotInSync",
        "StateNotSaved",
        "AgentRefusingInput",
        "AgentDown",
    ] {
        assert!(
            std::fs::read_to_string(dir.join("alerts_test.yaml"))?
                .contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
    sh(&[
        "promtool",
        "test",
        "rules",
        dir.join("alerts_test.yaml").to_str().unwrap(),
    ])?;
    sh(&[
        "promtool",
        "check",
        "config",
        dir.join("scrape.yaml").to_str().unwrap(),
    ])?;
    Ok(())
}

#[test]
fn systemd_unit_verifies() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(deploy().join("systemd/uplinkd.service"))?;
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "StateDirectory=uplinkd",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(key), "the unit lacks {key}");
    }
    // verify needs the executable to exist: point it at the binary under test.
    let dir = std::env::temp_dir().join(format!("uplinkd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("uplinkd.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/bin/uplinkd",
            uplink_tests::uplinkd_bin().to_str().unwrap(),
        ),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir)?;
    assert!(
        out.status.success() && !err.contains("uplinkd.service:"),
        "systemd-analyze verify: {err}"
    );
    Ok(())
}

/// READY=1 once the first apply is in sync, then WATCHDOG=1 at half the watchdog period.
#[test]
fn agent_notifies_systemd() -> anyhow::Result<()> {
    let mut lab = Lab::build("notify", vec![UplinkSpec::new("isp1", 1, false)], 0, 0)?;
    let socket = lab.dir.join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&socket)?;
    listener.set_read_timeout(Some(Duration::from_secs(5)))?;
    lab.agent_env = vec![
        ("NOTIFY_SOCKET".into(), socket.to_str().unwrap().into()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    lab.write_config("10s", "10m", "")?;
    lab.start_agent()?;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while got
        .iter()
        .filter(|m: &&String| m.contains("WATCHDOG=1"))
        .count()
        < 2
    {
        let n = uplink_tests::retry_eintr(|| listener.recv(&mut buf))?;
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].starts_with("READY=1"), "{got:?}");
    Ok(())
}

#[test]
fn kubernetes_manifests_validate_for_two_versions() -> anyhow::Result<()> {
    let dir = deploy().join("kubernetes");
    let kustomization: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
    let resources: Vec<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| dir.join(r.as_str().unwrap()).to_str().unwrap().to_string())
        .collect();
    assert_eq!(resources.len(), 3);
    for version in ["1.35.0", "1.37.0"] {
        let mut args = vec!["kubernetes-validate", "-k", version, "--strict"];
        args.extend(resources.iter().map(String::as_str));
        let out = sh(&args)?;
        assert_eq!(out.matches("passed").count(), 3, "{out}");
    }
    let ds = std::fs::read_to_string(dir.join("daemonset.yaml"))?;
    for key in [
        "hostNetwork: true",
        "drop: [\"ALL\"]",
        "add: [\"NET_ADMIN\", \"NET_RAW\"]",
        "readOnlyRootFilesystem: true",
        "allowPrivilegeEscalation: false",
        "priorityClassName: system-node-critical",
        "maxUnavailable: 1",
        "path: /healthz",
        "path: /readyz",
        "type: DirectoryOrCreate",
    ] {
        assert!(ds.contains(key), "the DaemonSet lacks {key}");
    }
    // The CRD objects (cert-manager, Prometheus Operator) are at least well-formed.
    for f in [
        dir.join("certificate.yaml"),
        deploy().join("prometheus/podmonitor.yaml"),
    ] {
        let v: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&f)?)?;
        assert!(v["kind"].as_str().is_some(), "{}", f.display());
    }
    Ok(())
}

/// Every metric the dashboard queries is one the agent really exports (from a scrape).
#[test]
fn dashboard_queries_real_metrics() -> anyhow::Result<()> {
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        deploy().join("grafana/uplink.json"),
    )?)?;
    assert!(
        dash["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "gateway")
    );
    let mut lab = Lab::build(
        "dash",
        vec![UplinkSpec::new("isp1", 1, false).with("probes = [\"icmp:203.0.113.10\"]")],
        0,
        0,
    )?;
    lab.write_config("10s", "10m", "[metrics]\nlisten = \"127.0.0.1:9477\"\n")?;
    lab.start_agent()?;
    // Histograms with labels appear with their first observation: let probes run.
    std::thread::sleep(Duration::from_millis(1000));
    let scrape = lab.gw(&["curl", "-s", "http://127.0.0.1:9477/metrics"])?;
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    exprs.push(
        dash["templating"]["list"][1]["definition"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    let mut checked = 0;
    for e in &exprs {
        for (i, _) in e.match_indices("uplinkd_") {
            let name: String = e[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                exported.contains(name.as_str()),
                "the dashboard queries {name}, which the agent does not export"
            );
            checked += 1;
        }
    }
    assert!(checked >= 12, "{checked}");
    Ok(())
}

/// `--log-format json`: one JSON object per line, for collectors.
#[test]
fn json_logs() -> anyhow::Result<()> {
    let ns = uplink_tests::Netns::new("jsonlog")?;
    let dir = std::env::temp_dir().join(&ns.0);
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nstate_dir = \"{}\"\n[lan]\ninterfaces = [\"br-lan\"]\n[metrics]\nenabled = false\n[[uplink]]\nname = \"a\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n",
            dir.join("state").display()
        ),
    )?;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(uplink_tests::uplinkd_bin())
        .args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let mut seen = Vec::new();
    while let Some(Ok(line)) = lines.next() {
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("not JSON: {line:?}: {e}"))?;
        let done = v["message"] == "initial apply done";
        seen.push(v);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir)?;
    let last = seen.last().expect("log lines");
    assert_eq!(last["message"], "initial apply done");
    assert_eq!(last["level"], "INFO");
    assert!(last["elapsed_ms"].is_u64(), "{last}");
    Ok(())
}

/// `kubectl kustomize` renders the kustomization, and the rendered objects validate.
#[test]
fn kustomization_renders() -> anyhow::Result<()> {
    let rendered = sh(&[
        "kubectl",
        "kustomize",
        deploy().join("kubernetes").to_str().unwrap(),
    ])?;
    for kind in ["kind: Namespace", "kind: ConfigMap", "kind: DaemonSet"] {
        assert!(rendered.contains(kind), "{kind} missing from the rendering");
    }
    let path = std::env::temp_dir().join(format!("uplink-rendered-{}.yaml", std::process::id()));
    std::fs::write(&path, &rendered)?;
    let out = sh(&[
        "kubernetes-validate",
        "-k",
        "1.37.0",
        "--strict",
        path.to_str().unwrap(),
    ]);
    std::fs::remove_file(&path)?;
    assert_eq!(out?.matches("passed").count(), 3);
    Ok(())
}
