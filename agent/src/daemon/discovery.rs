//! The discovery owner: what the kernel says about links, addresses, routes and
//! neighbours (netlink events and dumps), and hosts behind LAN routers (NFLOG sightings
//! and their activity), turned into model changes. It keeps the interface names by
//! ifindex, the assignments adopted from the kernel's maps at start, and the next hops as
//! last seen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use prometheus::IntCounterVec;
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::{Config, NextHop};
use crate::dataplane::nft;
use crate::discover::{self, DiscoverError, Event};
use crate::metrics::RateLimitedWarning;
use crate::model::failover::LogEntry;
use crate::model::nexthop::Hop;
use crate::model::{Change, Limit, LinkState, Model, now_millis};

/// What an input changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    /// The plan changes.
    pub plan: bool,
    /// A client was added, moved or changed its addresses: the state file follows.
    pub clients: bool,
}

impl std::ops::BitOrAssign for Seen {
    fn bitor_assign(&mut self, o: Seen) {
        self.plan |= o.plan;
        self.clients |= o.clients;
    }
}

pub(super) struct Discovery {
    handle: rtnetlink::Handle,
    /// Every link the kernel has: ifindex → name.
    links: HashMap<u32, String>,
    /// Address → uplink name found in the kernel's maps at start, for clients the state
    /// file does not know. Emptied once the first dump has been matched.
    pub adopt: BTreeMap<IpAddr, String>,
    /// An uplink's address or link went away: the kernel deletes the IPv4 routes that
    /// depended on it without a netlink event, so the learned next hops are read again.
    pub routes_stale: bool,
    /// The next hops at the last look, to log what changed.
    hops: Vec<(Hop, Hop)>,
    /// Uplinks already warned about `accept_ra`, by interface.
    ra_warned: HashSet<String>,
    /// Reads which hosts behind LAN routers were active lately, beside the loop.
    counters: nft::Counters,
    activity_tx: mpsc::Sender<HashSet<IpAddr>>,
    /// Addresses refused by a LAN limit, reported at a bounded rate.
    lan_refusals: RateLimitedWarning,
    /// `uplinkd_lan_refused_total`, by limit.
    lan_refused: IntCounterVec,
}

impl Discovery {
    pub fn new(
        handle: rtnetlink::Handle,
        adopt: BTreeMap<IpAddr, String>,
        hops: Vec<(Hop, Hop)>,
        counters: nft::Counters,
        activity_tx: mpsc::Sender<HashSet<IpAddr>>,
        lan_refused: IntCounterVec,
    ) -> Discovery {
        Discovery {
            handle,
            links: HashMap::new(),
            adopt,
            routes_stale: false,
            hops,
            ra_warned: HashSet::new(),
            counters,
            activity_tx,
            lan_refusals: RateLimitedWarning::default(),
            lan_refused,
        }
    }

    /// One netlink event.
    pub fn on_event(&mut self, ev: Event, model: &mut Model, config: &Config) -> Seen {
        let plan = |plan: bool| Seen {
            plan,
            clients: false,
        };
        match ev {
            Event::Neighbour { ifindex, ip, mac } => {
                let Some(name) = self.links.get(&ifindex) else {
                    return Seen::default();
                };
                if !config.lan.interfaces.contains(name) {
                    return Seen::default();
                }
                let now = now_millis();
                match mac {
                    Some(mac) => {
                        let adopt = self.adopt.get(&ip).map(String::as_str);
                        match model.neighbour_present(ip, mac, now, adopt) {
                            Change::Clients => Seen {
                                plan: true,
                                clients: true,
                            },
                            Change::Refused(limit) => {
                                self.refused(ip, limit);
                                plan(false)
                            }
                            Change::Hashed(limit) => {
                                self.refused(ip, limit);
                                plan(true)
                            }
                            Change::None => plan(false),
                        }
                    }
                    None => {
                        model.neighbour_gone(ip, now);
                        plan(false)
                    }
                }
            }
            Event::Link {
                ifindex,
                name,
                admin_up,
                carrier,
            } => {
                self.routes_stale |= !admin_up && is_uplink(config, &name);
                if let Some(old) = self.links.insert(ifindex, name.clone())
                    && old != name
                {
                    // Renamed: the old name no longer refers to this ifindex.
                    model.set_link(&old, LinkState::default());
                }
                plan(model.set_link(
                    &name,
                    LinkState {
                        ifindex: Some(ifindex),
                        admin_up,
                        carrier,
                    },
                ))
            }
            Event::LinkGone { ifindex } => plan(match self.links.remove(&ifindex) {
                Some(name) => {
                    model.clear_addrs(&name);
                    model.clear_routes(&name);
                    model.set_link(&name, LinkState::default())
                }
                None => false,
            }),
            Event::Addr {
                ifindex,
                addr,
                present,
            } => plan(match self.links.get(&ifindex) {
                Some(name) => {
                    self.routes_stale |= !present && is_uplink(config, name);
                    model.set_addr(name, addr, present)
                }
                None => false,
            }),
            Event::Route {
                ifindex,
                route,
                protocol,
                present,
                replace,
            } => {
                let dp = &config.dataplane;
                if protocol == dp.route_protocol || dp.owned_tables().contains(&route.table) {
                    return Seen::default();
                }
                plan(match self.links.get(&ifindex) {
                    Some(name) => model.set_route(name, route, present, replace),
                    None => false,
                })
            }
            Event::PrefixRoute {
                ifindex,
                dst,
                gateway,
                protocol,
                present,
            } => {
                let lan = self
                    .links
                    .get(&ifindex)
                    .is_some_and(|n| config.lan.interfaces.contains(n));
                plan(
                    lan && protocol != config.dataplane.route_protocol
                        && model.set_lan_route(dst, gateway, present),
                )
            }
            Event::Overrun => Seen::default(),
        }
    }

    /// A host behind a LAN router opened a connection without an assignment.
    pub fn on_routed(&mut self, s: discover::routed::Sighting, model: &mut Model) -> Seen {
        match model.routed_present(s.ip, s.router, now_millis()) {
            Change::Clients => Seen {
                plan: true,
                clients: true,
            },
            Change::Refused(limit) | Change::Hashed(limit) => {
                self.refused(s.ip, limit);
                Seen::default()
            }
            Change::None => Seen::default(),
        }
    }

    /// An address a LAN limit keeps untracked (a neighbour, or a host behind a LAN
    /// router): counted, and said at a bounded rate.
    fn refused(&self, ip: IpAddr, limit: Limit) {
        self.lan_refused.with_label_values(&[limit.key()]).inc();
        self.lan_refusals.warn(|n| warn!(%ip, refused = n, limit = limit.key(), "LAN limit reached: address not tracked (its traffic is hashed over the surviving uplinks); raise the limit if this LAN really is that large"));
    }

    /// Reads which routed hosts were active lately, beside the loop; the answer comes
    /// back on the activity channel.
    pub fn read_routed_activity(&self, model: &Model) {
        if model.routed_prefixes().is_empty() {
            return;
        }
        let (reader, tx) = (self.counters.clone(), self.activity_tx.clone());
        tokio::spawn(async move {
            match reader.routed_seen().await {
                Ok(active) => {
                    let _ = tx.send(active).await;
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the activity of hosts behind LAN routers; they keep their uplinks meanwhile")
                }
            }
        });
    }

    /// Re-reads links, addresses, routes and neighbours from the kernel, so a lost event
    /// is repaired.
    pub async fn resync(
        &mut self,
        model: &mut Model,
        config: &Config,
    ) -> Result<Seen, DiscoverError> {
        let mut seen = Seen::default();
        let links = discover::dump_links(&self.handle).await?;
        let live: HashSet<u32> = links
            .iter()
            .filter_map(|e| match e {
                Event::Link { ifindex, .. } => Some(*ifindex),
                _ => None,
            })
            .collect();
        let stale: Vec<u32> = self
            .links
            .keys()
            .filter(|i| !live.contains(i))
            .copied()
            .collect();
        for ifindex in stale {
            seen |= self.on_event(Event::LinkGone { ifindex }, model, config);
        }
        for e in links {
            seen |= self.on_event(e, model, config);
        }
        let addrs = discover::dump_addrs(&self.handle).await?;
        for u in model.uplinks.clone() {
            model.clear_addrs(&u.interface);
        }
        for e in addrs {
            seen |= self.on_event(e, model, config);
        }
        self.read_routes(model, config).await?;
        let mut present = HashMap::new();
        discover::dump_neighbours(|e| {
            if let Event::Neighbour {
                ip,
                mac: Some(mac),
                ifindex,
            } = &e
                && self
                    .links
                    .get(ifindex)
                    .is_some_and(|n| config.lan.interfaces.contains(n))
            {
                present.insert(*ip, *mac);
            }
            seen |= self.on_event(e, model, config);
        })
        .await?;
        model.reconcile_present(&present, now_millis());
        Ok(seen)
    }

    /// Re-reads the default routes the learned next hops come from.
    pub async fn read_routes(
        &mut self,
        model: &mut Model,
        config: &Config,
    ) -> Result<(), DiscoverError> {
        self.routes_stale = false;
        let routes = discover::dump_routes(&self.handle).await?;
        for u in model.uplinks.clone() {
            model.clear_routes(&u.interface);
        }
        model.clear_lan_routes();
        for e in routes {
            self.on_event(e, model, config);
        }
        Ok(())
    }

    /// The learned next hops that changed since the last look, as events; warns once
    /// per interface about `accept_ra` where `gateway6 = "auto"` could never learn one.
    pub fn hop_events(&mut self, model: &Model, config: &Config) -> Vec<LogEntry> {
        let log = model.hop_events(config, &self.hops);
        self.hops = model.all_hops(config);
        for u in &config.uplinks {
            if u.gateway6 != Some(NextHop::Auto) || self.ra_warned.contains(&u.interface) {
                continue;
            }
            if discover::accepts_router_adverts(&u.interface) == Some(false) {
                self.ra_warned.insert(u.interface.clone());
                warn!(
                    uplink = %u.name,
                    "gateway6 = \"auto\" but the kernel ignores router adverts on {i} while it forwards: set net.ipv6.conf.{i}.accept_ra=2 (sysctl), or no IPv6 router is ever learned",
                    i = u.interface
                );
            }
        }
        log
    }

    /// A reload: interface names are read again from the kernel.
    pub fn forget_links(&mut self) {
        self.links.clear();
    }
}

fn is_uplink(config: &Config, interface: &str) -> bool {
    config.uplinks.iter().any(|u| u.interface == interface)
}

/// At start and on reload: a LAN bridge whose MAC follows its ports breaks clients for
/// seconds whenever a port is added, which looks like uplinkd losing traffic.
pub(super) fn warn_floating_bridge_macs(config: &Config) {
    for i in discover::bridges_with_floating_mac(&config.lan.interfaces) {
        warn!(
            interface = i,
            "LAN bridge without a fixed MAC address: adding a port can change the gateway's MAC under its clients, who go unanswered until their ARP entries expire; set one (ip link set {i} address ..., or MACAddress= in systemd-networkd)"
        );
    }
}
