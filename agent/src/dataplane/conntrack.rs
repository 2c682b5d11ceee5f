//! Deletes the conntrack entries of one uplink (by its owned mark bits), so flows pinned to
//! a dead uplink re-establish elsewhere. Flows on other uplinks are never touched, and the
//! table is never flushed whole. Two ways: one ctnetlink message that has the kernel delete
//! every entry whose mark matches (the default: no process to spawn, no dump), or the
//! `conntrack` tool.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{DataplaneError, nfnl};
pub use crate::config::ConntrackFlush;

#[derive(Clone)]
pub struct Conntrack {
    bin: PathBuf,
    timeout: Duration,
    via: ConntrackFlush,
}

impl Conntrack {
    pub fn new(bin: &Path, timeout: Duration, via: ConntrackFlush) -> Conntrack {
        Conntrack {
            bin: bin.to_owned(),
            timeout,
            via,
        }
    }

    /// Fails with a clear error when the tool is configured and cannot be run.
    pub async fn check(&self) -> Result<(), DataplaneError> {
        match self.via {
            ConntrackFlush::Netlink => Ok(()),
            ConntrackFlush::Tool => self.run(&["--version"]).await.map(|_| ()),
        }
    }

    /// Deletes IPv4 and IPv6 entries whose mark has `mark` in the `mask` bits; returns how
    /// many went when the tool says (ctnetlink's flush does not count).
    pub async fn delete_mark(&self, mark: u32, mask: u32) -> Result<Option<usize>, DataplaneError> {
        match self.via {
            ConntrackFlush::Netlink => {
                let timeout = self.timeout;
                tokio::task::spawn_blocking(move || flush_mark_netlink(mark, mask, timeout))
                    .await
                    .map_err(|e| DataplaneError::ConntrackNetlink(std::io::Error::other(e)))?
                    .map_err(DataplaneError::ConntrackNetlink)
                    .map(|()| None)
            }
            ConntrackFlush::Tool => self.delete_mark_tool(mark, mask).await.map(Some),
        }
    }

    /// Deletes the entries whose replies go to `addr`: flows masqueraded to an address
    /// the uplink no longer has. Always the tool (ctnetlink's filtered flush cannot select
    /// by address); a missing tool is an error that names it.
    pub async fn delete_reply_dst(&self, addr: std::net::IpAddr) -> Result<usize, DataplaneError> {
        let family = if addr.is_ipv4() { "ipv4" } else { "ipv6" };
        self.run(&["-D", "-f", family, "--reply-dst", &addr.to_string()])
            .await
    }

    async fn delete_mark_tool(&self, mark: u32, mask: u32) -> Result<usize, DataplaneError> {
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

/// Has the kernel delete every conntrack entry (both families) whose mark has `mark` in
/// the `mask` bits: one IPCTNL_MSG_CT_DELETE with CTA_MARK and CTA_MARK_MASK and no tuple
/// (the kernel's filtered flush, Linux ≥ 3.19). Blocking; waits at most `timeout` for the
/// kernel's answer.
pub fn flush_mark_netlink(mark: u32, mask: u32, timeout: Duration) -> std::io::Result<()> {
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const CTA_MARK: u16 = 8;
    const CTA_MARK_MASK: u16 = 21;
    let mut attrs = Vec::new();
    for (kind, value) in [(CTA_MARK, mark), (CTA_MARK_MASK, mask)] {
        nfnl::put_attr(&mut attrs, kind, &value.to_be_bytes());
    }
    // AF_UNSPEC covers IPv4 and IPv6.
    match nfnl::Nfnl::open(timeout)?.acknowledged(
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
        libc::AF_UNSPEC as u8,
        &attrs,
    ) {
        // Nothing matched: nothing to delete.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
