//! Deletes the conntrack entries of one uplink (by its owned mark bits) with the
//! `conntrack` tool, so flows pinned to a dead uplink re-establish elsewhere. Flows on other
//! uplinks are never touched, and the table is never flushed whole.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::DataplaneError;

pub struct Conntrack {
    bin: PathBuf,
    timeout: Duration,
}

impl Conntrack {
    pub fn new(bin: &Path, timeout: Duration) -> Conntrack {
        Conntrack {
            bin: bin.to_owned(),
            timeout,
        }
    }

    pub async fn check(&self) -> Result<(), DataplaneError> {
        self.run(&["--version"]).await.map(|_| ())
    }

    /// Deletes IPv4 and IPv6 entries whose mark has `mark` in the `mask` bits; returns how
    /// many went.
    pub async fn delete_mark(&self, mark: u32, mask: u32) -> Result<usize, DataplaneError> {
        let filter = format!("{mark:#x}/{mask:#x}");
        let mut total = 0;
        for family in ["ipv4", "ipv6"] {
            total += self.run(&["-D", "-f", family, "-m", &filter]).await?;
        }
        Ok(total)
    }

    /// Runs the tool; returns the count it reports ("N flow entries have been deleted").
    async fn run(&self, args: &[&str]) -> Result<usize, DataplaneError> {
        let command = || format!("{} {}", self.bin.display(), args.join(" "));
        let run = tokio::process::Command::new(&self.bin)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(self.timeout, run)
            .await
            .map_err(|_| DataplaneError::Timeout {
                command: command(),
                after: self.timeout,
            })?
            .map_err(|source| DataplaneError::ConntrackMissing {
                path: self.bin.clone(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let count = stderr
            .split("conntrack-tools): ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        // Deleting nothing exits 1 with a count of 0.
        match count {
            Some(n) => Ok(n),
            None if out.status.success() => Ok(0),
            None => Err(DataplaneError::Conntrack {
                command: command(),
                stderr: stderr.trim().to_string(),
            }),
        }
    }
}
