//! Hosts behind a router on the LAN are never the gateway's neighbours: they announce
//! themselves by their first connection. The dataplane logs the first packet of a host in
//! a routed prefix that has no assignment yet (once per host every few seconds) to an
//! NFLOG group; this reads the group and hands each sighting to the agent loop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_netfilter::nflog::{
    ConfigCmd, ConfigMode, PacketNla, ULogMessage, config_request,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::sys::{Socket, constants::NETLINK_NETFILTER};
use tokio::sync::mpsc;

use crate::model::Mac;

/// Bytes of each logged packet copied to us: the IPv6 header, the longer of the two.
const COPY_RANGE: u32 = 40;
/// Sightings waiting for the loop; more wait in the socket, then the kernel drops them
/// and the dataplane logs those hosts again a few seconds later.
const QUEUE: usize = 4096;

/// A host behind a LAN router opened a connection without an assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sighting {
    pub ip: IpAddr,
    /// The router's MAC: the packet's link-layer source.
    pub router: Option<Mac>,
}

#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    #[error("NFLOG socket: {0}")]
    Socket(std::io::Error),
    #[error(
        "NFLOG group {group} is taken by another program (ulogd, another uplinkd?); set dataplane.nflog_group to a free group (1-65535)"
    )]
    Busy { group: u16 },
    #[error("NFLOG group {group}: the kernel refused the binding: {0}", .code)]
    Refused { group: u16, code: i32 },
}

/// Binds `group` (before the dataplane logs to it) and reads it on a thread of its own.
pub fn listen(group: u16) -> Result<mpsc::Receiver<Sighting>, RoutedError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(RoutedError::Socket)?;
    socket.bind_auto().map_err(RoutedError::Socket)?;
    let bind = config_request(
        NetfilterProtoFamily::IPv4,
        group,
        vec![
            ConfigCmd::Bind.into(),
            ConfigMode::new_packet(COPY_RANGE).into(),
        ],
    );
    let mut buf = vec![0; bind.header.length as usize];
    bind.serialize(&mut buf);
    socket.send(&buf, 0).map_err(RoutedError::Socket)?;
    let mut rx = vec![0u8; 8192];
    let n = socket
        .recv(&mut &mut rx[..], 0)
        .map_err(RoutedError::Socket)?;
    if let Ok(m) = NetlinkMessage::<NetfilterMessage>::deserialize(&rx[..n])
        && let NetlinkPayload::Error(e) = m.payload
        && let Some(code) = e.code
    {
        let code = code.get().abs();
        return Err(if code == libc::EBUSY {
            RoutedError::Busy { group }
        } else {
            RoutedError::Refused { group, code }
        });
    }
    let (tx, out) = mpsc::channel(QUEUE);
    std::thread::Builder::new()
        .name("nflog".into())
        .spawn(move || read(socket, tx))
        .map_err(RoutedError::Socket)?;
    Ok(out)
}

fn read(socket: Socket, tx: mpsc::Sender<Sighting>) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            // ENOBUFS: the kernel dropped log messages; those hosts are logged again.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "NFLOG socket failed; hosts behind LAN routers are no longer placed until a restart");
                return;
            }
        };
        let mut at = 0;
        while at < n {
            let Ok(m) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..n]) else {
                break;
            };
            let len = m.header.length as usize;
            if let Some(s) = sighting(&m)
                && tx.blocking_send(s).is_err()
            {
                return;
            }
            if len == 0 {
                break;
            }
            at += (len + 3) & !3;
        }
    }
}

/// The source address and link-layer source of one logged packet.
fn sighting(m: &NetlinkMessage<NetfilterMessage>) -> Option<Sighting> {
    let NetlinkPayload::InnerMessage(NetfilterMessage {
        inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
        ..
    }) = &m.payload
    else {
        return None;
    };
    let mut ip = None;
    let mut router = None;
    for nla in nlas {
        match nla {
            PacketNla::Payload(p) => ip = source_of(p),
            PacketNla::HwAddr(h) => {
                use rtnetlink::packet_core::Emitable;
                // Its value: length (2 bytes), padding (2), address (8).
                let mut raw = [0u8; 12];
                if h.buffer_len() >= raw.len() + 4 {
                    let mut full = vec![0u8; h.buffer_len()];
                    h.emit(&mut full);
                    raw.copy_from_slice(&full[4..16]);
                    if u16::from_be_bytes([raw[0], raw[1]]) == 6 {
                        router = Mac::from_slice(&raw[4..10]);
                    }
                }
            }
            _ => {}
        }
    }
    Some(Sighting { ip: ip?, router })
}

/// The source address of an IPv4 or IPv6 packet.
fn source_of(p: &[u8]) -> Option<IpAddr> {
    match p.first()? >> 4 {
        4 if p.len() >= 20 => Some(IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15]))),
        6 if p.len() >= 24 => {
            let b: [u8; 16] = p[8..24].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_of_both_families() {
        let mut v4 = [0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 20, 0, 7]);
        assert_eq!(source_of(&v4), Some("10.20.0.7".parse().unwrap()));
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"2001:db8:20::7".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(source_of(&v6), Some("2001:db8:20::7".parse().unwrap()));
        assert_eq!(source_of(&v4[..10]), None);
        assert_eq!(source_of(&[0x10; 40]), None);
    }
}
