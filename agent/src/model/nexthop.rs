//! Next hops learned from the kernel (`gateway = "auto"`, `gateway6 = "auto"`): the default
//! routes that the system's DHCP client, the kernel's router-advert handling or a PPP/LTE
//! script put on an uplink's interface, in any table uplinkd does not own.

use std::net::IpAddr;

use super::failover::{EventKind, LogEntry};
use super::{Model, Uplink};
use crate::config::{Config, NextHop};

/// A default route on an uplink's interface, as the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LearnedRoute {
    pub v6: bool,
    pub table: u32,
    /// The route's priority (metric); with several, the lowest wins.
    pub metric: u32,
    /// `None`: a route by device (point-to-point, `default dev ppp0`).
    pub gateway: Option<IpAddr>,
}

impl LearnedRoute {
    /// A route replaces another in its slot (family, table, metric; the destination is
    /// always the default): IPv4 keeps one route per slot, and so does a replace.
    fn same_slot(&self, other: &LearnedRoute) -> bool {
        self.v6 == other.v6 && self.table == other.table && self.metric == other.metric
    }

    /// The same kernel object: IPv6 keeps one route per router in a slot (router adverts
    /// from two routers are two default routes of metric 1024 in main).
    fn same(&self, other: &LearnedRoute) -> bool {
        self.same_slot(other) && (!self.v6 || self.gateway == other.gateway)
    }
}

/// Defined beside the probes that route by it: the model builds on health, not the other
/// way round.
pub use crate::health::probe::Hop;

impl Uplink {
    /// The learned next hop of one family: the lowest metric wins, then the lowest table.
    pub fn learned(&self, v6: bool) -> Option<Option<IpAddr>> {
        self.learned
            .iter()
            .filter(|r| r.v6 == v6)
            .min_by_key(|r| (r.metric, r.table))
            .map(|r| r.gateway)
    }
}

/// The next hop of an uplink's family from its config and what was learned.
pub fn hop<A: Into<IpAddr> + Copy>(configured: Option<NextHop<A>>, u: &Uplink, v6: bool) -> Hop {
    match configured {
        None => Hop::Device,
        Some(NextHop::Static(a)) => Hop::Via(a.into()),
        Some(NextHop::Auto) => match u.learned(v6) {
            None => Hop::Unknown,
            Some(None) => Hop::Device,
            Some(Some(g)) => Hop::Via(g),
        },
    }
}

impl Model {
    /// A default route appeared on or left `interface`; returns whether an uplink's
    /// learned next hop changed.
    /// `replace`: the kernel said it replaced the slot's route (NLM_F_REPLACE).
    pub fn set_route(
        &mut self,
        interface: &str,
        route: LearnedRoute,
        present: bool,
        replace: bool,
    ) -> bool {
        let mut changed = false;
        for u in self.uplinks.iter_mut().filter(|u| u.interface == interface) {
            let before = (u.learned(false), u.learned(true));
            u.learned
                .retain(|r| !(r.same(&route) || (replace && r.same_slot(&route))));
            if present {
                u.learned.push(route);
                u.learned.sort();
            }
            changed |= before != (u.learned(false), u.learned(true));
        }
        changed
    }

    pub fn clear_routes(&mut self, interface: &str) {
        for u in self.uplinks.iter_mut().filter(|u| u.interface == interface) {
            u.learned.clear();
        }
    }

    /// The IPv4 and IPv6 next hops of uplink `i`.
    pub fn hops(&self, config: &Config, i: usize) -> (Hop, Hop) {
        let (c, u) = (&config.uplinks[i], &self.uplinks[i]);
        (hop(c.gateway, u, false), hop(c.gateway6, u, true))
    }
}

impl Model {
    /// Every uplink's next hops, to compare after route events.
    pub fn all_hops(&self, config: &Config) -> Vec<(Hop, Hop)> {
        (0..self.uplinks.len())
            .map(|i| self.hops(config, i))
            .collect()
    }

    /// Events for the learned next hops that differ from `before`.
    pub fn hop_events(&self, config: &Config, before: &[(Hop, Hop)]) -> Vec<LogEntry> {
        let mut out = Vec::new();
        for (i, (now, was)) in self.all_hops(config).iter().zip(before).enumerate() {
            let c = &config.uplinks[i];
            let families = [("IPv4", now.0, was.0, true), ("IPv6", now.1, was.1, c.ipv6)];
            for (family, now, was, carried) in families {
                if !carried || now == was {
                    continue;
                }
                let cause = match (was, now) {
                    (_, Hop::Unknown) => format!(
                        "{} lost its {family} gateway {} (the default route on {} went away: lease lost, router advert withdrawn, link down)",
                        c.name,
                        hop_name(was),
                        c.interface
                    ),
                    (Hop::Unknown, _) => {
                        format!("{} learned its {family} gateway {}", c.name, hop_name(now))
                    }
                    _ => format!(
                        "{} changed its {family} gateway from {} to {}",
                        c.name,
                        hop_name(was),
                        hop_name(now)
                    ),
                };
                out.push(LogEntry {
                    at: super::now_millis(),
                    uplink: c.name.clone(),
                    kind: EventKind::Gateway,
                    cause,
                    clients_moved: 0,
                });
            }
        }
        out
    }

    /// Where uplink `i`'s IPv6 connections go while it has no IPv6 next hop (`gateway6 =
    /// "auto"` and no router): the first usable uplink that has one. `None` while it has
    /// one, or nothing else does.
    pub fn v6_detour(&self, config: &Config, i: usize) -> Option<usize> {
        if !config.uplinks[i].ipv6 || self.hops(config, i).1 != Hop::Unknown {
            return None;
        }
        (0..self.uplinks.len()).find(|&j| {
            j != i
                && config.uplinks[j].ipv6
                && self.uplinks[j].usable()
                && self.hops(config, j).1 != Hop::Unknown
        })
    }
}

fn hop_name(h: Hop) -> String {
    match h {
        Hop::Via(g) => g.to_string(),
        Hop::Device => "(by device)".to_string(),
        Hop::Unknown => "(none)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(table: u32, metric: u32, gw: &str) -> LearnedRoute {
        LearnedRoute {
            v6: false,
            table,
            metric,
            gateway: Some(gw.parse().unwrap()),
        }
    }

    fn model() -> (Config, Model) {
        let text = "[lan]\ninterfaces=[\"lan0\"]\n[[uplink]]\nname=\"cable\"\ninterface=\"wan1\"\ngateway=\"auto\"\n";
        let config = Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let model = Model::new(&config);
        (config, model)
    }

    #[test]
    fn lowest_metric_wins_and_a_replaced_route_is_one_slot() {
        let (config, mut m) = model();
        assert_eq!(m.hops(&config, 0).0, Hop::Unknown);
        assert!(m.set_route("wan1", route(254, 100, "100.64.1.1"), true, false));
        assert!(m.set_route("wan1", route(100, 10, "100.64.9.1"), true, false));
        assert_eq!(
            m.hops(&config, 0).0,
            Hop::Via("100.64.9.1".parse().unwrap())
        );
        // The DHCP client replaces its route in table 100: same slot, new gateway.
        assert!(m.set_route("wan1", route(100, 10, "100.64.7.1"), true, false));
        assert_eq!(m.uplinks[0].learned.len(), 2);
        assert_eq!(
            m.hops(&config, 0).0,
            Hop::Via("100.64.7.1".parse().unwrap())
        );
        // Another interface's route changes nothing here.
        assert!(!m.set_route("wan2", route(100, 1, "100.64.5.1"), true, false));
        assert!(m.set_route("wan1", route(100, 10, "100.64.7.1"), false, false));
        assert_eq!(
            m.hops(&config, 0).0,
            Hop::Via("100.64.1.1".parse().unwrap())
        );
        // Gone: the uplink has no gateway again, and says so.
        m.set_link(
            "wan1",
            crate::model::LinkState {
                ifindex: Some(3),
                admin_up: true,
                carrier: true,
            },
        );
        assert!(m.set_route("wan1", route(254, 100, "100.64.1.1"), false, false));
        assert_eq!(m.hops(&config, 0).0, Hop::Unknown);
        assert_eq!(
            m.uplinks[0].link_problem(),
            Err(crate::health::LinkProblem::NoGateway)
        );
    }

    #[test]
    fn two_ipv6_routers_are_two_routes_until_one_is_withdrawn() {
        let text = "[lan]\ninterfaces=[\"lan0\"]\n[[uplink]]\nname=\"cable\"\ninterface=\"wan1\"\ngateway=\"100.64.1.1\"\ngateway6=\"auto\"\n";
        let config = Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let mut m = Model::new(&config);
        let ra = |gw: &str| LearnedRoute {
            v6: true,
            table: 254,
            metric: 1024,
            gateway: Some(gw.parse().unwrap()),
        };
        assert_eq!(m.hops(&config, 0).1, Hop::Unknown);
        m.set_route("wan1", ra("fe80::a"), true, false);
        m.set_route("wan1", ra("fe80::b"), true, false);
        m.set_route("wan1", ra("fe80::a"), false, false);
        assert_eq!(m.hops(&config, 0).1, Hop::Via("fe80::b".parse().unwrap()));
        m.set_route("wan1", ra("fe80::b"), false, false);
        assert_eq!(m.hops(&config, 0).1, Hop::Unknown);
        // A replace takes the slot whatever the router.
        m.set_route("wan1", ra("fe80::a"), true, false);
        m.set_route("wan1", ra("fe80::c"), true, true);
        assert_eq!(m.uplinks[0].learned.len(), 1);
    }

    #[test]
    fn a_device_route_is_a_point_to_point_hop() {
        let (config, mut m) = model();
        let dev = LearnedRoute {
            gateway: None,
            ..route(254, 0, "0.0.0.0")
        };
        m.set_route("wan1", dev, true, false);
        assert_eq!(m.hops(&config, 0).0, Hop::Device);
    }
}
