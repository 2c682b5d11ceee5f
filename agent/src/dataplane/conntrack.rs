//! Deletes the conntrack entries of one uplink (by its owned mark bits), so flows pinned to
//! a dead uplink re-establish elsewhere. Flows on other uplinks are never touched, and the
//! table is never flushed whole. Two ways: one ctnetlink message that has the kernel delete
//! every entry whose mark matches (the default: no process to spawn, no dump), or the
//! `conntrack` tool.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::DataplaneError;
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
    use std::io::{Error, ErrorKind};
    const NETLINK_NETFILTER: libc::c_int = 12;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPCTNL_MSG_CT_DELETE: u16 = 2;
    const CTA_MARK: u16 = 8;
    const CTA_MARK_MASK: u16 = 21;
    // SAFETY: plain socket syscalls on a descriptor this function owns (OwnedFd closes it).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        return Err(Error::last_os_error());
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: tv lives across the call; the size is its own.
    unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    // nlmsghdr (16) + nfgenmsg (4) + two u32 attributes (8 each), all in host order
    // except the attribute values (network order) and nfgenmsg.res_id.
    let len: u32 = 16 + 4 + 8 + 8;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
    // nfgenmsg: AF_UNSPEC covers IPv4 and IPv6; version 0; res_id 0.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    for (kind, value) in [(CTA_MARK, mark), (CTA_MARK_MASK, mask)] {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&value.to_be_bytes());
    }
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: msg and kernel outlive the call; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            raw,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: buf outlives the call; its length is given.
    let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        let e = Error::last_os_error();
        return Err(match e.kind() {
            ErrorKind::WouldBlock => Error::new(ErrorKind::TimedOut, "no answer from ctnetlink"),
            _ => e,
        });
    }
    let n = n as usize;
    // The answer is an NLMSG_ERROR whose error is 0 (the ACK) or -errno.
    let kind = (n >= 20).then(|| u16::from_ne_bytes([buf[4], buf[5]]));
    if kind != Some(libc::NLMSG_ERROR as u16) {
        return Err(Error::other(format!(
            "unexpected ctnetlink answer ({n} bytes)"
        )));
    }
    match i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]) {
        0 => Ok(()),
        // Nothing matched: nothing to delete.
        e if -e == libc::ENOENT => Ok(()),
        e => Err(Error::from_raw_os_error(-e)),
    }
}
