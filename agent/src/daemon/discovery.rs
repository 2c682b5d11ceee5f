//! The discovery owner: what the kernel says about links, addresses, routes and
//! neighbours (netlink events and dumps), and hosts behind LAN routers (NFLOG sightings
//! and their activity), turned into model changes. It keeps the interface names by
//! ifindex, the assignments adopted from the kernel's maps at start, and the next hops as
//! last seen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

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

/// Longest a resync's dump may take (the kernel answers one of 100k neighbours in well
/// under a second): past it the reading is given up, said, and asked again next time.
const DUMP_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept to replay over a dump read while they arrived; past this many the dump is
/// read again instead.
const REPLAY_MAX: usize = 65_536;

/// What a dump read beside the loop covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Read {
    /// The routes (the learned next hops come from the default ones).
    Routes,
    /// Links, addresses and routes: the periodic resync. Neighbours are left to their
    /// events (a lost one is an overrun, which reads them all) and to the full resync: a
    /// dump of 100k of them costs about 0.2 s of CPU.
    Links,
    /// Links, addresses, routes and neighbours.
    Inputs,
}

/// The kernel's inputs as a dump read them, beside the loop.
#[derive(Debug)]
pub(super) struct Dump {
    read: Read,
    links: Vec<Event>,
    addrs: Vec<Event>,
    routes: Vec<Event>,
    neighbours: Vec<Event>,
}

/// Neighbours of a dump applied per turn of the loop: 100k of them at once would hold it
/// up for tens of milliseconds.
const NEIGHBOURS_PER_TURN: usize = 4096;

/// A dump whose neighbours are being applied.
struct Applying {
    read: Read,
    neighbours: std::vec::IntoIter<Event>,
    present: HashMap<IpAddr, crate::model::Mac>,
    seen: Seen,
}

/// Reads what `read` covers.
async fn read_dump(handle: &rtnetlink::Handle, read: Read) -> Result<Dump, DiscoverError> {
    let mut d = Dump {
        read,
        links: Vec::new(),
        addrs: Vec::new(),
        routes: Vec::new(),
        neighbours: Vec::new(),
    };
    if read >= Read::Links {
        d.links = discover::dump_links(handle).await?;
        d.addrs = discover::dump_addrs(handle).await?;
    }
    d.routes = discover::dump_routes(handle).await?;
    if read == Read::Inputs {
        discover::dump_neighbours(|e| d.neighbours.push(e)).await?;
    }
    Ok(d)
}

pub(super) struct Discovery {
    handle: rtnetlink::Handle,
    /// Resync dumps are read beside the loop (a kernel slow to answer one holds up
    /// nothing) and come back here.
    dump_tx: mpsc::Sender<Result<Dump, DiscoverError>>,
    /// The dump being read, and the one asked for meanwhile.
    reading: Option<Read>,
    next: Option<Read>,
    /// The events applied since the dump being read was asked for, replayed over it: any
    /// of them may be newer than what it read. `None` past `REPLAY_MAX` (read again), and
    /// while no dump is read or applied.
    since: Option<Vec<Event>>,
    /// Replaying: a refused address is not counted twice.
    replaying: bool,
    /// A dump's neighbours being applied, a slice per turn of the loop.
    applying: Option<Applying>,
    /// The dump being read is older than a reload's own reading: dropped when it lands.
    discard: bool,
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
        dump_tx: mpsc::Sender<Result<Dump, DiscoverError>>,
    ) -> Discovery {
        Discovery {
            handle,
            dump_tx,
            reading: None,
            next: None,
            since: None,
            replaying: false,
            applying: None,
            discard: false,
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

    /// One netlink event as it arrives (kept for replay while a dump is read or applied).
    pub fn on_event(&mut self, ev: Event, model: &mut Model, config: &Config) -> Seen {
        if let Some(since) = &mut self.since {
            if since.len() < REPLAY_MAX {
                since.push(ev.clone());
            } else {
                self.since = None;
            }
        }
        self.apply_event(ev, model, config)
    }

    /// One event, from the socket or a dump.
    fn apply_event(&mut self, ev: Event, model: &mut Model, config: &Config) -> Seen {
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
        if self.replaying {
            return;
        }
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
    /// is repaired; at start and on reload, before anything is applied (the neighbours
    /// one datagram at a time: a start holds no copy of the dump).
    pub async fn resync(
        &mut self,
        model: &mut Model,
        config: &Config,
    ) -> Result<Seen, DiscoverError> {
        let mut seen = self.apply_links(discover::dump_links(&self.handle).await?, model, config);
        seen |= self.apply_addrs(discover::dump_addrs(&self.handle).await?, model, config);
        self.routes_stale = false;
        self.apply_routes(discover::dump_routes(&self.handle).await?, model, config);
        let mut present = HashMap::new();
        discover::dump_neighbours(|e| {
            seen |= self.dumped_neighbour(e, &mut present, model, config)
        })
        .await?;
        model.reconcile_present(&present, now_millis());
        Ok(seen)
    }

    /// Asks for a dump beside the loop (or, while one is read, for another after it); it
    /// comes back on the dump channel, for `apply_dump`.
    pub fn ask(&mut self, read: Read) {
        if !self.begin(read) {
            return;
        }
        let (handle, tx) = (self.handle.clone(), self.dump_tx.clone());
        tokio::spawn(async move {
            let r = match tokio::time::timeout(DUMP_TIMEOUT, read_dump(&handle, read)).await {
                Ok(r) => r,
                Err(_) => Err(DiscoverError::Timeout(DUMP_TIMEOUT)),
            };
            let _ = tx.send(r).await;
        });
    }

    /// Starts the reading of a dump, unless one is read already (then `read` is read
    /// after it); returns whether it started.
    fn begin(&mut self, read: Read) -> bool {
        // What the dump reads of the routes is from after this point.
        self.routes_stale = false;
        if self.reading.is_some() {
            self.next = self.next.max(Some(read));
            return false;
        }
        self.reading = Some(read);
        self.since = Some(Vec::new());
        true
    }

    /// A dump read beside the loop, applied as if read now: what it read, then the events
    /// that arrived meanwhile (any of them may be newer). Links, addresses and routes go at
    /// once; the neighbours a slice per turn (`apply_more`). Returns what it covered once
    /// it is all applied; `None` while neighbours remain, or when the dump was dropped.
    pub fn apply_dump(
        &mut self,
        d: Dump,
        model: &mut Model,
        config: &Config,
    ) -> Option<(Read, Seen)> {
        if std::mem::take(&mut self.discard) {
            self.reading = None;
            self.since = None;
            return None;
        }
        let mut seen = Seen::default();
        if d.read >= Read::Links {
            seen |= self.apply_links(d.links, model, config);
            seen |= self.apply_addrs(d.addrs, model, config);
        }
        self.apply_routes(d.routes, model, config);
        self.applying = Some(Applying {
            read: d.read,
            neighbours: d.neighbours.into_iter(),
            present: HashMap::new(),
            seen,
        });
        self.apply_more(model, config)
    }

    /// A dump's neighbours are being applied.
    pub fn applying(&self) -> bool {
        self.applying.is_some()
    }

    /// Applies the next slice of a dump's neighbours; once none remain, what they say
    /// is gone and the events since the ask are replayed. Returns what the dump covered
    /// then.
    pub fn apply_more(&mut self, model: &mut Model, config: &Config) -> Option<(Read, Seen)> {
        let mut a = self.applying.take()?;
        for e in a.neighbours.by_ref().take(NEIGHBOURS_PER_TURN) {
            a.seen |= self.dumped_neighbour(e, &mut a.present, model, config);
        }
        if a.neighbours.len() > 0 {
            self.applying = Some(a);
            return None;
        }
        self.reading = None;
        if a.read == Read::Inputs {
            model.reconcile_present(&a.present, now_millis());
        }
        match self.since.take() {
            Some(events) => {
                self.replaying = true;
                for e in events {
                    a.seen |= self.apply_event(e, model, config);
                }
                self.replaying = false;
            }
            // Too many events meanwhile to replay: the dump may be older than some.
            None => self.next = self.next.max(Some(a.read)),
        }
        Some((a.read, a.seen))
    }

    /// A reload reads the kernel itself: a dump being read or applied is older, and
    /// goes.
    pub fn drop_dump(&mut self) {
        if self.applying.take().is_some() {
            self.reading = None;
        }
        self.discard = self.reading.is_some();
        self.since = None;
        self.next = None;
    }

    /// The dump asked for could not be read; returns what it was to cover.
    pub fn dump_failed(&mut self) -> Option<Read> {
        self.since = None;
        self.discard = false;
        self.reading.take()
    }

    /// The dump asked for while the last one was read, if any.
    pub fn ask_next(&mut self) {
        if let Some(read) = self.next.take() {
            self.ask(read);
        }
    }

    /// A links dump: links it no longer lists are gone.
    fn apply_links(&mut self, links: Vec<Event>, model: &mut Model, config: &Config) -> Seen {
        let mut seen = Seen::default();
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
            seen |= self.apply_event(Event::LinkGone { ifindex }, model, config);
        }
        for e in links {
            seen |= self.apply_event(e, model, config);
        }
        seen
    }

    /// An addresses dump replaces the uplinks' addresses.
    fn apply_addrs(&mut self, addrs: Vec<Event>, model: &mut Model, config: &Config) -> Seen {
        let mut seen = Seen::default();
        for u in model.uplinks.clone() {
            model.clear_addrs(&u.interface);
        }
        for e in addrs {
            seen |= self.apply_event(e, model, config);
        }
        seen
    }

    /// A routes dump replaces the uplinks' routes and the LAN's.
    fn apply_routes(&mut self, routes: Vec<Event>, model: &mut Model, config: &Config) {
        for u in model.uplinks.clone() {
            model.clear_routes(&u.interface);
        }
        model.clear_lan_routes();
        for e in routes {
            self.apply_event(e, model, config);
        }
    }

    /// One neighbour of a dump; a LAN one with a MAC is recorded in `present`.
    fn dumped_neighbour(
        &mut self,
        e: Event,
        present: &mut HashMap<IpAddr, crate::model::Mac>,
        model: &mut Model,
        config: &Config,
    ) -> Seen {
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
        self.apply_event(e, model, config)
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

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\n";

    fn discovery() -> (Discovery, Model, Config) {
        let config = Config::parse(std::path::Path::new("t"), CONFIG).unwrap();
        let model = Model::new(&config);
        let (_conn, handle, _) = rtnetlink::new_connection().unwrap();
        let never = std::path::Path::new("/nonexistent");
        let counters = nft::Counters::new(nft::NftDriver::new(
            never,
            "uplinkd",
            Duration::from_secs(1),
        ));
        let d = Discovery::new(
            handle,
            BTreeMap::new(),
            Vec::new(),
            counters,
            mpsc::channel(1).0,
            crate::metrics::Metrics::new().lan_refused.clone(),
            mpsc::channel(1).0,
        );
        (d, model, config)
    }

    fn link(ifindex: u32, name: &str, carrier: bool) -> Event {
        Event::Link {
            ifindex,
            name: name.into(),
            admin_up: true,
            carrier,
        }
    }

    fn dump(links: Vec<Event>) -> Dump {
        Dump {
            read: Read::Inputs,
            links,
            addrs: Vec::new(),
            routes: Vec::new(),
            neighbours: Vec::new(),
        }
    }

    #[tokio::test]
    async fn events_that_arrive_while_a_dump_is_read_win_over_it() {
        let (mut d, mut model, config) = discovery();
        d.on_event(link(1, "lan0", true), &mut model, &config);
        d.on_event(link(2, "wan0", true), &mut model, &config);
        assert!(d.begin(Read::Inputs));
        assert!(!d.begin(Read::Routes), "one reading at a time");
        // While it is read: wan0 loses its carrier, and a host appears.
        d.on_event(link(2, "wan0", false), &mut model, &config);
        let ip: IpAddr = "198.19.0.10".parse().unwrap();
        d.on_event(
            Event::Neighbour {
                ifindex: 1,
                ip,
                mac: Some("02:00:00:00:00:0a".parse().unwrap()),
            },
            &mut model,
            &config,
        );
        // The dump read before either: wan0 with its carrier, no neighbour.
        let older = dump(vec![link(1, "lan0", true), link(2, "wan0", true)]);
        let (read, _) = d.apply_dump(older, &mut model, &config).expect("applied");
        assert_eq!(read, Read::Inputs);
        assert!(!model.uplinks[0].link.carrier, "the carrier loss stands");
        let client = model.client_by_addr(&ip).expect("the host is a client");
        assert!(
            client.addresses.get(&ip).is_some_and(|a| a.present),
            "the host stays present"
        );
        assert_eq!(
            d.next,
            Some(Read::Routes),
            "the routes asked for meanwhile follow"
        );
    }

    #[tokio::test]
    async fn too_many_events_while_a_dump_is_read_read_it_again() {
        let (mut d, mut model, config) = discovery();
        d.on_event(link(2, "wan0", true), &mut model, &config);
        assert!(d.begin(Read::Inputs));
        for i in 0..=REPLAY_MAX {
            d.on_event(link(2, "wan0", i % 2 == 1), &mut model, &config);
        }
        d.apply_dump(dump(vec![link(2, "wan0", true)]), &mut model, &config);
        assert_eq!(
            d.next,
            Some(Read::Inputs),
            "read again: the dump may be older"
        );
    }

    fn neighbour(n: u32, mac: u8) -> Event {
        Event::Neighbour {
            ifindex: 1,
            ip: IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + n)),
            mac: Some(format!("02:00:00:00:00:{mac:02x}").parse().unwrap()),
        }
    }

    #[tokio::test]
    async fn a_dumps_neighbours_are_applied_a_slice_per_turn() {
        let (mut d, mut model, config) = discovery();
        d.on_event(link(1, "lan0", true), &mut model, &config);
        assert!(d.begin(Read::Inputs));
        let mut older = dump(vec![link(1, "lan0", true)]);
        older.neighbours = (0..NEIGHBOURS_PER_TURN as u32 + 1)
            .map(|n| neighbour(n, 1))
            .collect();
        assert!(d.apply_dump(older, &mut model, &config).is_none());
        assert!(d.applying(), "one neighbour left for the next turn");
        // Between two slices, the last neighbour of the dump changes its MAC.
        let last = neighbour(NEIGHBOURS_PER_TURN as u32, 2);
        d.on_event(last.clone(), &mut model, &config);
        let (read, seen) = d.apply_more(&mut model, &config).expect("all applied");
        assert_eq!(read, Read::Inputs);
        assert!(seen.clients);
        assert!(!d.applying());
        let Event::Neighbour { ip, mac, .. } = last else {
            unreachable!()
        };
        let client = model.client_by_addr(&ip).expect("a client");
        assert_eq!(Some(client.mac), mac, "the newer MAC stands");
    }

    #[tokio::test]
    async fn a_dump_older_than_a_reload_is_dropped() {
        let (mut d, mut model, config) = discovery();
        d.on_event(link(2, "wan0", true), &mut model, &config);
        assert!(d.begin(Read::Inputs));
        d.drop_dump();
        // It lands after the reload read the kernel itself (wan0 down by then).
        d.on_event(link(2, "wan0", false), &mut model, &config);
        let older = dump(vec![link(2, "wan0", true)]);
        assert!(d.apply_dump(older, &mut model, &config).is_none());
        assert!(!d.applying());
        assert!(
            !model.uplinks[0].link.carrier,
            "the reload's reading stands"
        );
        assert!(d.begin(Read::Routes), "nothing is being read any more");
    }

    #[tokio::test]
    async fn the_periodic_resync_leaves_neighbours_to_their_events() {
        let (mut d, mut model, config) = discovery();
        d.on_event(link(1, "lan0", true), &mut model, &config);
        let host = neighbour(7, 7);
        d.on_event(host.clone(), &mut model, &config);
        let Event::Neighbour { ip, .. } = host else {
            unreachable!()
        };
        assert!(d.begin(Read::Links));
        let mut links = dump(vec![link(1, "lan0", true)]);
        links.read = Read::Links;
        assert!(d.apply_dump(links, &mut model, &config).is_some());
        let present = |model: &Model| {
            model
                .client_by_addr(&ip)
                .and_then(|c| c.addresses.get(&ip))
                .is_some_and(|a| a.present)
        };
        assert!(present(&model), "no neighbour read: none gone");
        // The full resync reads them: one the dump does not list is gone.
        assert!(d.begin(Read::Inputs));
        assert!(
            d.apply_dump(dump(vec![link(1, "lan0", true)]), &mut model, &config)
                .is_some()
        );
        assert!(!present(&model));
    }
}
