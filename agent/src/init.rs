//! `uplinkd init`: a starter config from what the kernel shows now (links, addresses,
//! default routes, ip rules), each choice explained in a comment. It only reads: nothing in
//! the kernel is changed.

use std::fmt::Write as _;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo};
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteProtocol};
use netlink_packet_route::rule::RuleAttribute;
use rtnetlink::{Handle, IpVersion};

use crate::config::DataplaneConfig;

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("reading {what} from the kernel: {source}")]
    Dump {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

/// An interface as the kernel has it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Iface {
    pub index: u32,
    pub name: String,
    pub bridge: bool,
    pub loopback: bool,
    pub up: bool,
    pub carrier: bool,
    /// A port of a bridge or bond: not an uplink or LAN of its own.
    pub enslaved: bool,
    /// Address, prefix length, and the peer of a point-to-point address.
    pub addrs: Vec<(IpAddr, u8, Option<IpAddr>)>,
}

pub use crate::discover::RouteFields as Route;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub v6: bool,
    pub priority: u32,
    pub protocol: u8,
    pub table: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub host: String,
    pub ifaces: Vec<Iface>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
}

const RTPROT_BOOT: u8 = 3;
const RTPROT_STATIC: u8 = 4;

fn proto_name(p: u8) -> String {
    match RouteProtocol::from(p) {
        RouteProtocol::Boot => "boot (ip route)".into(),
        RouteProtocol::Static => "static".into(),
        RouteProtocol::Dhcp => "dhcp".into(),
        RouteProtocol::Ra => "ra (router advert)".into(),
        RouteProtocol::Kernel => "kernel".into(),
        other => format!("{}", u8::from(other)),
    }
}

/// Reads links, addresses, routes and rules.
pub async fn gather(handle: &Handle) -> Result<Facts, InitError> {
    let dump = |what| move |source| InitError::Dump { what, source };
    let mut facts = Facts {
        host: std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default(),
        ..Facts::default()
    };
    let links: Vec<_> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(dump("links"))?;
    for m in links {
        let mut i = Iface {
            index: m.header.index,
            up: m.header.flags.contains(LinkFlags::Up),
            carrier: m.header.flags.contains(LinkFlags::LowerUp),
            loopback: m.header.flags.contains(LinkFlags::Loopback),
            ..Iface::default()
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => i.name = n.clone(),
                LinkAttribute::Controller(_) => i.enslaved = true,
                LinkAttribute::LinkInfo(info) => {
                    i.bridge = info
                        .iter()
                        .any(|x| matches!(x, LinkInfo::Kind(InfoKind::Bridge)))
                }
                _ => {}
            }
        }
        facts.ifaces.push(i);
    }
    let addrs: Vec<_> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(dump("addresses"))?;
    for m in addrs {
        let Some((ip, peer)) = crate::discover::addr_fields(&m) else {
            continue;
        };
        if let IpAddr::V6(a) = ip
            && a.is_unicast_link_local()
        {
            continue;
        }
        if let Some(i) = facts.ifaces.iter_mut().find(|i| i.index == m.header.index) {
            i.addrs.push((ip, m.header.prefix_len, peer));
        }
    }
    for af in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RouteMessage::default();
        req.header.address_family = af;
        req.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let msgs: Vec<RouteMessage> = handle
            .route()
            .get(req)
            .execute()
            .try_collect()
            .await
            .map_err(dump("routes"))?;
        facts.routes.extend(
            msgs.iter()
                .filter_map(crate::discover::route_fields)
                .filter(|r| r.unicast),
        );
    }
    for (v6, version) in [(false, IpVersion::V4), (true, IpVersion::V6)] {
        let msgs: Vec<_> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(dump("ip rules"))?;
        for m in msgs {
            let mut r = Rule {
                v6,
                priority: 0,
                protocol: 0,
                table: m.header.table as u32,
            };
            for a in &m.attributes {
                match a {
                    RuleAttribute::Priority(p) => r.priority = *p,
                    RuleAttribute::Protocol(p) => r.protocol = u8::from(*p),
                    RuleAttribute::Table(t) => r.table = *t,
                    _ => {}
                }
            }
            facts.rules.push(r);
        }
    }
    Ok(facts)
}

/// A name the config accepts (`A-Z a-z 0-9 - _`, ≤ 32 characters) from an interface name.
fn uplink_name(interface: &str) -> String {
    let n: String = interface
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if n.is_empty() { "uplink".into() } else { n }
}

fn quoted(v: &[String]) -> String {
    v.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The starter config, with a comment for every choice.
pub fn render(f: &Facts, dp: &DataplaneConfig) -> String {
    let owned_tables = dp.owned_tables();
    // Default routes uplinkd would learn from: not in its own tables, not its own.
    let defaults = |i: &Iface, v6: bool| -> Vec<&Route> {
        let mut r: Vec<&Route> = f
            .routes
            .iter()
            .filter(|r| {
                r.default
                    && r.v6 == v6
                    && r.oif == Some(i.index)
                    && !owned_tables.contains(&r.table)
                    && r.protocol != dp.route_protocol
            })
            .collect();
        r.sort_by_key(|r| (r.metric, r.table));
        r
    };
    let has_v4 = |i: &Iface| i.addrs.iter().any(|(a, _, _)| a.is_ipv4());
    let candidates: Vec<&Iface> = f
        .ifaces
        .iter()
        .filter(|i| !i.loopback && !i.enslaved && i.up)
        .collect();
    let uplinks: Vec<&Iface> = candidates
        .iter()
        .copied()
        .filter(|i| {
            !defaults(i, false).is_empty()
                || (!i.bridge && i.carrier && has_v4(i) && !private_lan(i))
        })
        .collect();
    let lan: Vec<&Iface> = candidates
        .iter()
        .copied()
        .filter(|i| !uplinks.iter().any(|u| u.index == i.index) && has_v4(i))
        .filter(|i| i.bridge || private_lan(i))
        .collect();

    let mut out = String::new();
    let host = if f.host.is_empty() {
        String::new()
    } else {
        format!(" on {}", f.host)
    };
    let _ = writeln!(
        out,
        "# Written by `uplinkd init`{host} from what the kernel shows now; nothing was changed.\n# Read every comment, edit what is wrong, then: uplinkd check-config FILE\n"
    );

    // The owned ranges against what is already there.
    let band = dp.owned_priorities();
    let foreign_rules: Vec<&Rule> = f
        .rules
        .iter()
        .filter(|r| band.contains(&r.priority) && r.protocol != dp.route_protocol)
        .collect();
    let foreign_tables: Vec<u32> = {
        let mut t: Vec<u32> = f
            .routes
            .iter()
            .filter(|r| owned_tables.contains(&r.table) && r.protocol != dp.route_protocol)
            .map(|r| r.table)
            .collect();
        t.sort();
        t.dedup();
        t
    };
    let mut dataplane = Vec::new();
    if foreign_rules.is_empty() {
        let _ = writeln!(
            out,
            "# ip rules: priorities {}..={} are free for uplinkd.",
            band.start(),
            band.end()
        );
    } else {
        for r in &foreign_rules {
            let _ = writeln!(
                out,
                "# ip rules: a rule that is not uplinkd's sits in its default band {}..={}: priority {} ({}, protocol {}, table {}).",
                band.start(),
                band.end(),
                r.priority,
                if r.v6 { "IPv6" } else { "IPv4" },
                r.protocol,
                r.table
            );
        }
        // Below the default first (uplinkd's rules must come before catch-all ones),
        // then above it.
        let free = (1..=9u32)
            .rev()
            .chain(11..=32)
            .map(|k| k * 1000)
            .find(|&p| {
                !f.rules
                    .iter()
                    .any(|r| (p..p + crate::config::RULE_PRIORITY_BAND).contains(&r.priority))
            })
            .unwrap_or(40_000);
        let _ = writeln!(out, "#   so uplinkd takes priorities {free}.. instead:");
        dataplane.push(format!("rule_priority = {free}"));
    }
    if foreign_tables.is_empty() {
        let _ = writeln!(
            out,
            "# Routing tables {}..={} hold no routes: free for uplinkd.",
            owned_tables.start(),
            owned_tables.end()
        );
    } else {
        let _ = writeln!(
            out,
            "# Routing tables {:?} (inside uplinkd's default {}..={}) already hold routes that are not uplinkd's;",
            foreign_tables,
            owned_tables.start(),
            owned_tables.end()
        );
        let span = owned_tables.end() - owned_tables.start() + 1;
        let base = (1..=60)
            .map(|k| k * 1000 + dp.table_base)
            .find(|b| {
                !f.routes
                    .iter()
                    .any(|r| (b + 1..=b + span).contains(&r.table))
            })
            .unwrap_or(5000);
        let _ = writeln!(out, "#   so uplinkd's tables start above {base} instead:");
        dataplane.push(format!("table_base = {base}"));
    }
    if !dataplane.is_empty() {
        let _ = writeln!(out, "[dataplane]\n{}", dataplane.join("\n"));
    }
    out.push('\n');

    let _ = writeln!(out, "[lan]");
    if lan.is_empty() {
        let _ = writeln!(
            out,
            "# No bridge or interface with a private address and no default route was found:\n# name the LAN interface(s) here.\ninterfaces = [\"CHANGE-ME\"]"
        );
    } else {
        for i in &lan {
            let addrs: Vec<String> = i.addrs.iter().map(|(a, p, _)| format!("{a}/{p}")).collect();
            let _ = writeln!(
                out,
                "# {}: {} with {} and no default route: where the clients are.",
                i.name,
                if i.bridge { "a bridge" } else { "an interface" },
                addrs.join(", ")
            );
        }
        let names: Vec<String> = lan.iter().map(|i| i.name.clone()).collect();
        let _ = writeln!(out, "interfaces = [{}]", quoted(&names));
    }

    if uplinks.is_empty() {
        let _ = writeln!(
            out,
            "\n# No interface with a default route, or with carrier and a public-looking address,\n# was found: add one [[uplink]] per ISP link.\n[[uplink]]\nname = \"isp1\"\ninterface = \"CHANGE-ME\"\ngateway = \"auto\""
        );
    }
    for i in &uplinks {
        let _ = writeln!(
            out,
            "\n[[uplink]]\nname = {:?}\ninterface = {:?}",
            uplink_name(&i.name),
            i.name
        );
        let v4 = defaults(i, false);
        let peer = i
            .addrs
            .iter()
            .find_map(|(a, _, p)| p.filter(|_| a.is_ipv4()).map(|p| (*a, p)));
        match (v4.first(), peer) {
            (_, Some((local, peer))) => {
                let _ = writeln!(
                    out,
                    "# {local} peer {peer}: a point-to-point link (PPP, LTE), routed by device: no gateway."
                );
            }
            (Some(r), None) => match r.gateway {
                Some(g) if r.protocol == RTPROT_BOOT || r.protocol == RTPROT_STATIC => {
                    let _ = writeln!(
                        out,
                        "# default via {g} (metric {}, table {}, {}): a fixed gateway. If DHCP or a\n# redial sets it, write \"auto\" instead and uplinkd follows it.\ngateway = \"{g}\"",
                        r.metric,
                        r.table,
                        proto_name(r.protocol)
                    );
                }
                Some(g) => {
                    let _ = writeln!(
                        out,
                        "# default via {g} (metric {}, table {}, {}): installed by a client that may\n# change it, so uplinkd learns it (\"auto\") and follows renewals and redials.\ngateway = \"auto\"",
                        r.metric,
                        r.table,
                        proto_name(r.protocol)
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "# default dev {} (no gateway): routed by device; \"auto\" follows the route.\ngateway = \"auto\"",
                        i.name
                    );
                }
            },
            (None, None) => {
                let _ = writeln!(
                    out,
                    "# No default route on {} now: \"auto\" waits for one (a DHCP lease, a PPP script);\n# or write the ISP's gateway address.\ngateway = \"auto\"",
                    i.name
                );
            }
        }
        let v6 = defaults(i, true);
        let global6 = i.addrs.iter().any(|(a, _, _)| a.is_ipv6());
        match v6.first() {
            Some(r) if r.protocol == u8::from(RouteProtocol::Ra) => {
                let _ = writeln!(
                    out,
                    "# IPv6: a router advertises itself ({}): follow it.\ngateway6 = \"auto\"",
                    r.gateway.map(|g| g.to_string()).unwrap_or_default()
                );
            }
            Some(r) => match r.gateway {
                Some(g) => {
                    let _ = writeln!(
                        out,
                        "# IPv6: default via {g} ({}).\ngateway6 = \"{g}\"",
                        proto_name(r.protocol)
                    );
                }
                None => {
                    let _ = writeln!(out, "# IPv6: routed by device.");
                }
            },
            None if global6 && peer.is_none() => {
                let _ = writeln!(
                    out,
                    "# IPv6: a global address but no IPv6 default route: no IPv6 on this uplink until\n# you set gateway6 (an address, or \"auto\" for router adverts with accept_ra = 2).\nipv6 = false"
                );
            }
            None => {}
        }
        let _ = writeln!(
            out,
            "# Probes catch what link events cannot (an ISP that stops forwarding): a stable host\n# beyond the ISP, e.g. its DNS resolver. Without them only link events count.\n# probes = [\"icmp:ADDRESS\"]"
        );
    }
    out
}

/// An interface whose IPv4 addresses are all private (RFC 1918, or the benchmark range
/// labs use) and that carries no default route: a LAN rather than an uplink.
fn private_lan(i: &Iface) -> bool {
    let v4: Vec<std::net::Ipv4Addr> = i
        .addrs
        .iter()
        .filter_map(|(a, _, _)| match a {
            IpAddr::V4(a) => Some(*a),
            _ => None,
        })
        .collect();
    !v4.is_empty()
        && v4.iter().all(|a| {
            let o = a.octets();
            a.is_private() || (o[0] == 198 && (o[1] & 0xfe) == 18)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(index: u32, name: &str, addrs: &[(&str, u8, Option<&str>)]) -> Iface {
        Iface {
            index,
            name: name.into(),
            up: true,
            carrier: true,
            addrs: addrs
                .iter()
                .map(|(a, p, peer)| (a.parse().unwrap(), *p, peer.map(|x| x.parse().unwrap())))
                .collect(),
            ..Iface::default()
        }
    }

    fn dp() -> DataplaneConfig {
        crate::config::Config::parse(
            std::path::Path::new("x.toml"),
            "[lan]\ninterfaces=[\"l\"]\n[[uplink]]\nname=\"a\"\ninterface=\"w\"\n",
        )
        .unwrap()
        .dataplane
    }

    #[test]
    fn lan_uplinks_gateways_and_a_foreign_rule_are_explained() {
        let mut lan = iface(2, "br-lan", &[("198.19.0.1", 24, None)]);
        lan.bridge = true;
        let facts = Facts {
            host: "gw".into(),
            ifaces: vec![
                lan,
                iface(3, "wan1", &[("100.64.1.2", 24, None)]),
                iface(4, "wan2", &[("100.64.2.50", 24, None)]),
                iface(5, "ppp0", &[("100.64.3.2", 32, Some("100.64.3.1"))]),
            ],
            routes: vec![
                Route {
                    oif: Some(3),
                    default: true,
                    unicast: true,
                    v6: false,
                    gateway: Some("100.64.1.1".parse().unwrap()),
                    metric: 100,
                    table: 254,
                    protocol: RTPROT_BOOT,
                    dst: None,
                },
                Route {
                    oif: Some(4),
                    default: true,
                    unicast: true,
                    v6: false,
                    gateway: Some("100.64.2.1".parse().unwrap()),
                    metric: 200,
                    table: 254,
                    protocol: 16,
                    dst: None,
                },
            ],
            rules: vec![Rule {
                v6: false,
                priority: 10_050,
                protocol: 0,
                table: 254,
            }],
        };
        let text = render(&facts, &dp());
        assert!(text.contains("interfaces = [\"br-lan\"]"), "{text}");
        assert!(text.contains("gateway = \"100.64.1.1\""), "{text}");
        assert!(text.contains("(metric 200, table 254, dhcp)"), "{text}");
        assert!(
            text.contains("100.64.3.2 peer 100.64.3.1: a point-to-point"),
            "{text}"
        );
        assert!(text.contains("priority 10050"), "{text}");
        assert!(text.contains("rule_priority = 9000"), "{text}");
        // It is a valid config as it stands.
        let config = crate::config::Config::parse(std::path::Path::new("init.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.uplinks.len(), 3);
        assert_eq!(config.dataplane.rule_priority, 9000);
    }
}
