//! Runs uplinkd from the image's root filesystem the way the DaemonSet runs it, where
//! `podman run` cannot (no rlimits on these machines): the mounts, capabilities, read-only
//! root and no-new-privileges are read from `deploy/kubernetes/daemonset.yaml`, so the
//! test follows the manifest that ships.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One `volumeMounts` entry of the uplinkd container.
#[derive(Debug, Clone)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    pub sub_path: Option<String>,
    pub read_only: bool,
}

/// What the DaemonSet gives the uplinkd container.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub args: Vec<String>,
    pub mounts: Vec<Mount>,
    /// `capabilities.add`, lower case without `CAP_` (setpriv's spelling).
    pub caps: Vec<String>,
    pub read_only_root: bool,
    pub no_new_privs: bool,
}

impl PodSpec {
    pub fn from_daemonset(path: &Path) -> Result<PodSpec> {
        let doc: serde_yaml::Value = serde_yaml::from_str(&fs::read_to_string(path)?)?;
        let containers = doc["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .context("no containers")?;
        let c = containers
            .iter()
            .find(|c| c["name"].as_str() == Some("uplinkd"))
            .context("no uplinkd container")?;
        let strings = |v: &serde_yaml::Value| -> Vec<String> {
            v.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        };
        let sc = &c["securityContext"];
        if strings(&sc["capabilities"]["drop"]) != ["ALL"] {
            bail!("the DaemonSet no longer drops ALL capabilities: update this runner");
        }
        let mounts = c["volumeMounts"]
            .as_sequence()
            .context("no volumeMounts")?
            .iter()
            .map(|m| {
                Ok(Mount {
                    volume: m["name"].as_str().context("mount name")?.to_string(),
                    path: m["mountPath"].as_str().context("mountPath")?.to_string(),
                    sub_path: m["subPath"].as_str().map(str::to_string),
                    read_only: m["readOnly"].as_bool().unwrap_or(false),
                })
            })
            .collect::<Result<_>>()?;
        Ok(PodSpec {
            args: strings(&c["args"]),
            mounts,
            caps: strings(&sc["capabilities"]["add"])
                .iter()
                .map(|c| c.to_lowercase())
                .collect(),
            read_only_root: sc["readOnlyRootFilesystem"].as_bool() == Some(true),
            no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        })
    }
}

/// The image's root filesystem (a `podman export`) and, per volume of the pod, the host
/// directory that stands in for it.
#[derive(Debug, Clone)]
pub struct Container {
    pub rootfs: PathBuf,
    pub spec: PodSpec,
    pub volumes: BTreeMap<String, PathBuf>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Container {
    /// The command that starts the image's entry point in namespace `ns`: a private mount
    /// namespace with the pod's mounts, the root remounted read-only, then `chroot` and
    /// `setpriv` down to the pod's capabilities. Every step execs, so the child's pid is
    /// uplinkd's.
    pub fn command(&self, ns: &str) -> Result<Command> {
        let root = self.rootfs.to_str().context("utf-8 rootfs")?;
        let mut script = vec![format!("set -e; R={}", quote(root))];
        // A mount point of its own, so that it can be remounted read-only.
        script.push("mount --bind \"$R\" \"$R\"".into());
        script.push("mount -t proc proc \"$R/proc\"".into());
        script.push("mount -t sysfs -o ro sysfs \"$R/sys\"".into());
        for m in &self.spec.mounts {
            let host = self
                .volumes
                .get(&m.volume)
                .with_context(|| format!("no host path for volume {}", m.volume))?;
            let host = match &m.sub_path {
                Some(sub) => host.join(sub),
                None => host.clone(),
            };
            let target = format!("\"$R\"{}", quote(&m.path));
            // The mount point, created in the image's tree before it goes read-only.
            script.push(if host.is_dir() {
                format!("mkdir -p {target}")
            } else {
                format!("mkdir -p \"$(dirname {target})\"; touch {target}")
            });
            let host = quote(host.to_str().context("utf-8 volume path")?);
            script.push(format!("mount --bind {host} {target}"));
            if m.read_only {
                script.push(format!("mount -o remount,bind,ro {target}"));
            }
        }
        if self.spec.read_only_root {
            script.push("mount -o remount,bind,ro \"$R\"".into());
        }
        let caps: Vec<String> = self.spec.caps.iter().map(|c| format!("+{c}")).collect();
        let caps = format!("-all,{}", caps.join(","));
        let mut exec = format!(
            "exec chroot \"$R\" setpriv --bounding-set {caps} --inh-caps {caps} --ambient-caps {caps}"
        );
        if self.spec.no_new_privs {
            exec += " --no-new-privs";
        }
        exec += " /usr/bin/uplinkd";
        for a in &self.spec.args {
            exec += &format!(" {}", quote(a));
        }
        script.push(exec);
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script.join("\n")]);
        Ok(cmd)
    }
}
