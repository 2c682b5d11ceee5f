//! Discovery: links and neighbours from rtnetlink, a dump at start and at each resync,
//! live events in between. No polling stands in for events.

use std::net::IpAddr;

use ipnet::IpNet;
use std::path::Path;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use rtnetlink::packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::sys::protocols::NETLINK_ROUTE;
use rtnetlink::sys::{AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;

pub mod routed;

use crate::model::Mac;
use crate::model::nexthop::LearnedRoute;

const NLM_F_REPLACE: u16 = 0x100;

/// Bulk arrivals (thousands of neighbours at once) must not overflow the event socket.
const EVENT_SOCKET_BUFFER: usize = 32 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A neighbour entry; `mac: None` means it was deleted or failed.
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
        mac: Option<Mac>,
    },
    Link {
        ifindex: u32,
        name: String,
        admin_up: bool,
        carrier: bool,
    },
    /// An address on an interface (IPv6 link-local excluded).
    Addr {
        ifindex: u32,
        addr: IpAddr,
        present: bool,
    },
    LinkGone {
        ifindex: u32,
    },
    /// A default route through an interface (single next hop), in any table.
    Route {
        ifindex: u32,
        route: LearnedRoute,
        /// Its rtm protocol: uplinkd's own routes are not learned.
        protocol: u8,
        present: bool,
        /// NLM_F_REPLACE: it replaced whatever route held its slot (table and metric).
        replace: bool,
    },
    /// A route to a prefix through a gateway in the main table: on a LAN interface, the
    /// prefix is behind a router on the LAN and its hosts are clients.
    PrefixRoute {
        ifindex: u32,
        dst: IpNet,
        gateway: IpAddr,
        protocol: u8,
        present: bool,
    },
    /// The kernel dropped events (socket buffer overrun): re-dump everything.
    Overrun,
}

/// The LAN interfaces that are bridges without a fixed MAC address. Linux gives such a
/// bridge its lowest port's MAC, so plugging in a port can change the gateway's MAC under
/// clients that cached the old one, and they go unanswered until their ARP entry expires.
/// From sysfs (netlink does not carry it): `addr_assign_type` 3 = set by the administrator.
pub fn bridges_with_floating_mac(interfaces: &[String]) -> Vec<&str> {
    let net = Path::new("/sys/class/net");
    interfaces
        .iter()
        .filter(|i| {
            let dir = net.join(i);
            dir.join("bridge").is_dir()
                && std::fs::read_to_string(dir.join("addr_assign_type"))
                    .is_ok_and(|t| t.trim() != "3")
        })
        .map(String::as_str)
        .collect()
}

/// Whether the kernel takes router adverts on `interface` while it forwards: with IPv6
/// forwarding on, `accept_ra` must be 2, or no router (and no `gateway6 = "auto"`) is ever
/// learned. `None` when the interface or its sysctls do not exist (yet).
pub fn accepts_router_adverts(interface: &str) -> Option<bool> {
    let read = |key: &str| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{interface}/{key}"))
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    let (accept, forwarding) = (read("accept_ra")?, read("forwarding")?);
    Some(accept == 2 || (accept == 1 && forwarding == 0))
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("netlink dump of neighbours: {0}")]
    Neighbours(std::io::Error),
    #[error("netlink dump of {what}: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("the kernel did not finish a netlink dump within {0:?}")]
    Timeout(std::time::Duration),
}

/// Subscribes to link and neighbour events. Subscribe before dumping, so nothing that
/// happens in between is missed.
pub fn subscribe() -> Result<mpsc::UnboundedReceiver<Event>, DiscoverError> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    force_rx_buffer(conn.socket_mut().socket_mut(), EVENT_SOCKET_BUFFER)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((msg, _)) = messages.next().await {
            let event = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                    neighbour_event(&m, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => {
                    neighbour_event(&m, true)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    link_event(&m, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    link_event(&m, true)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(m)) => {
                    addr_event(&m, true)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(m)) => {
                    addr_event(&m, false)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(m)) => {
                    route_event(&m, true, msg.header.flags & NLM_F_REPLACE != 0)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(m)) => {
                    route_event(&m, false, false)
                }
                NetlinkPayload::Overrun(_) => Some(Event::Overrun),
                _ => None,
            };
            if let Some(e) = event
                && tx.send(e).is_err()
            {
                break;
            }
        }
        tracing::error!("netlink event socket closed");
    });
    Ok(rx)
}

/// SO_RCVBUF is capped by net.core.rmem_max (often 208 KiB); with CAP_NET_ADMIN,
/// SO_RCVBUFFORCE is not. Falls back to the capped size without the capability.
fn force_rx_buffer(socket: &rtnetlink::sys::Socket, size: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = size as libc::c_int;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        socket.set_rx_buf_sz(size)
    }
}

pub async fn dump_links(handle: &Handle) -> Result<Vec<Event>, DiscoverError> {
    let links: Vec<LinkMessage> =
        handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| DiscoverError::Dump {
                what: "links",
                source,
            })?;
    Ok(links.iter().filter_map(|m| link_event(m, false)).collect())
}

pub async fn dump_addrs(handle: &Handle) -> Result<Vec<Event>, DiscoverError> {
    let msgs: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|source| DiscoverError::Dump {
            what: "addresses",
            source,
        })?;
    Ok(msgs.iter().filter_map(|m| addr_event(m, true)).collect())
}

/// An address message's own address and, on a point-to-point address, its peer: there
/// IFA_LOCAL is ours and IFA_ADDRESS the peer.
pub fn addr_fields(m: &AddressMessage) -> Option<(IpAddr, Option<IpAddr>)> {
    let (mut local, mut address) = (None, None);
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    match (local, address) {
        (Some(l), Some(a)) if l != a => Some((l, Some(a))),
        (Some(l), _) => Some((l, None)),
        (None, a) => a.map(|a| (a, None)),
    }
}

fn addr_event(m: &AddressMessage, present: bool) -> Option<Event> {
    let (addr, _) = addr_fields(m)?;
    if let IpAddr::V6(a) = addr
        && a.is_unicast_link_local()
    {
        return None;
    }
    Some(Event::Addr {
        ifindex: m.header.index,
        addr,
        present,
    })
}

/// Every default route of both families, in every table, and the prefix routes through a
/// gateway in main.
pub async fn dump_routes(handle: &Handle) -> Result<Vec<Event>, DiscoverError> {
    let mut out = Vec::new();
    for af in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RouteMessage::default();
        req.header.address_family = af;
        req.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let mut s = handle.route().get(req).execute();
        while let Some(m) = s.try_next().await.map_err(|source| DiscoverError::Dump {
            what: "routes",
            source,
        })? {
            out.extend(route_event(&m, true, false));
        }
    }
    Ok(out)
}

/// What uplinkd reads of a route message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFields {
    pub v6: bool,
    pub table: u32,
    pub oif: Option<u32>,
    /// The route's priority.
    pub metric: u32,
    /// `None`: by device.
    pub gateway: Option<IpAddr>,
    /// A unicast route to 0.0.0.0/0 or ::/0.
    pub default: bool,
    pub unicast: bool,
    pub protocol: u8,
    /// The destination prefix (`None` for the default route).
    pub dst: Option<IpNet>,
}

/// The fields of an IPv4 or IPv6 route (`None` for other families).
pub fn route_fields(m: &RouteMessage) -> Option<RouteFields> {
    let v6 = match m.header.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let unicast = m.header.kind == RouteType::Unicast;
    let mut r = RouteFields {
        v6,
        table: m.header.table as u32,
        oif: None,
        metric: 0,
        gateway: None,
        default: unicast && m.header.destination_prefix_length == 0,
        unicast,
        protocol: m.header.protocol.into(),
        dst: None,
    };
    let len = m.header.destination_prefix_length;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) if len > 0 => {
                r.dst = IpNet::new(IpAddr::V4(*d), len).ok()
            }
            RouteAttribute::Destination(RouteAddress::Inet6(d)) if len > 0 => {
                r.dst = IpNet::new(IpAddr::V6(*d), len).ok()
            }
            RouteAttribute::Table(t) => r.table = *t,
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => r.gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => r.gateway = Some(IpAddr::V6(*g)),
            _ => {}
        }
    }
    Some(r)
}

/// A default unicast route with one next hop; anything else is not a next hop to learn
/// (multipath routes included: their hops are not one uplink's).
fn route_event(m: &RouteMessage, present: bool, replace: bool) -> Option<Event> {
    let r = route_fields(m)?;
    if !r.default {
        // A prefix through a gateway, in main: maybe a router on the LAN.
        return match (r.dst, r.gateway, r.oif) {
            (Some(dst), Some(gateway), Some(ifindex))
                if r.unicast && r.table == u32::from(RouteHeader::RT_TABLE_MAIN) =>
            {
                Some(Event::PrefixRoute {
                    ifindex,
                    dst: dst.trunc(),
                    gateway,
                    protocol: r.protocol,
                    present,
                })
            }
            _ => None,
        };
    }
    Some(Event::Route {
        ifindex: r.oif?,
        route: LearnedRoute {
            v6: r.v6,
            table: r.table,
            metric: r.metric,
            gateway: r.gateway,
        },
        protocol: r.protocol,
        present,
        replace,
    })
}

/// Dumps the neighbour tables on a socket of its own, handing each entry to `f` as its
/// datagram is read. Not through rtnetlink's connection: it parses a dump ahead of its
/// reader into an unbounded queue (about 20 MB at 100k neighbours, the largest part of a
/// start's peak memory); here the kernel waits for the next read, so a dump holds one
/// datagram at a time.
pub async fn dump_neighbours(mut f: impl FnMut(Event)) -> Result<(), DiscoverError> {
    let dump = DiscoverError::Neighbours;
    let socket = TokioSocket::new(NETLINK_ROUTE).map_err(dump)?;
    // The kernel caps a dump's datagrams at 32 KiB.
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    for (seq, family) in [(1, AddressFamily::Inet), (2, AddressFamily::Inet6)] {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = seq;
        let mut ask = NeighbourMessage::default();
        ask.header.family = family;
        let mut req = NetlinkMessage::new(
            header,
            NetlinkPayload::from(RouteNetlinkMessage::GetNeighbour(ask)),
        );
        req.finalize();
        let mut out = vec![0; req.buffer_len()];
        req.serialize(&mut out);
        socket
            .send_to(&out, &SocketAddr::new(0, 0))
            .await
            .map_err(dump)?;
        'dump: loop {
            buf.clear();
            socket.recv(&mut buf).await.map_err(dump)?;
            let mut data = &buf[..];
            while !data.is_empty() {
                let msg =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(data).map_err(|e| {
                        dump(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            e.to_string(),
                        ))
                    })?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == seq {
                    match msg.payload {
                        NetlinkPayload::Done(d) if d.code < 0 => {
                            return Err(dump(std::io::Error::from_raw_os_error(-d.code)));
                        }
                        NetlinkPayload::Done(_) => break 'dump,
                        NetlinkPayload::Error(e) if e.code.is_some() => {
                            return Err(dump(e.to_io()));
                        }
                        NetlinkPayload::Error(_) => break 'dump,
                        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                            if let Some(e) = neighbour_event(&m, false) {
                                f(e);
                            }
                        }
                        _ => {}
                    }
                }
                // Messages start on 4-byte boundaries.
                let next = (len + 3) & !3;
                if len == 0 || next >= data.len() {
                    break;
                }
                data = &data[next..];
            }
        }
    }
    Ok(())
}

fn neighbour_event(m: &NeighbourMessage, deleted: bool) -> Option<Event> {
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => ip = Some(IpAddr::V4(*a)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                ip = Some(IpAddr::V6(*a))
            }
            NeighbourAttribute::LinkLayerAddress(l) => mac = Mac::from_slice(l),
            _ => {}
        }
    }
    let ip = ip?;
    let present = match m.header.state {
        NeighbourState::Reachable
        | NeighbourState::Stale
        | NeighbourState::Delay
        | NeighbourState::Probe
        | NeighbourState::Permanent
        | NeighbourState::Noarp => true,
        NeighbourState::Failed => false,
        // Incomplete: resolution in progress, nothing known yet.
        _ if !deleted => return None,
        _ => false,
    };
    let mac = if deleted || !present {
        None
    } else {
        Some(mac?)
    };
    Some(Event::Neighbour {
        ifindex: m.header.ifindex,
        ip,
        mac,
    })
}

fn link_event(m: &LinkMessage, deleted: bool) -> Option<Event> {
    if deleted {
        return Some(Event::LinkGone {
            ifindex: m.header.index,
        });
    }
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Event::Link {
        ifindex: m.header.index,
        name,
        admin_up: m.header.flags.contains(LinkFlags::Up),
        carrier: m.header.flags.contains(LinkFlags::LowerUp),
    })
}
