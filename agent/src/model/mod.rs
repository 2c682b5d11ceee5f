//! The model: uplinks as the kernel reports them and clients as the neighbour table shows
//! them, each with a sticky home uplink. Pure data; no I/O.

pub mod assign;
pub mod failover;
pub mod mac;
pub mod nexthop;
pub mod set_edits;
pub mod sla;
pub mod state_file;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::config::{Config, QuotaAction};
use crate::health::{Health, UplinkState};
pub use mac::Mac;
use state_file::{Decisions, UplinkRuntime};

/// Milliseconds since the Unix epoch: persisted, so wall-clock.
pub type Millis = u64;

/// How stale a present address's `last_seen` may get before a sighting rewrites it.
const LAST_SEEN_GRANULARITY: Millis = 60_000;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// An uplink interface as the kernel currently has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkState {
    /// `None` while the interface does not exist.
    pub ifindex: Option<u32>,
    pub admin_up: bool,
    /// LOWER_UP: the link layer below is up.
    pub carrier: bool,
}

#[derive(Debug, Clone)]
pub struct Uplink {
    pub name: String,
    pub interface: String,
    pub weight: u32,
    pub tier: u32,
    pub link: LinkState,
    /// The interface's addresses (IPv4, and IPv6 other than link-local).
    pub addrs: Vec<IpAddr>,
    pub health: Health,
    /// Whether the uplink carries its own clients. False from failover until failback.
    pub serving: bool,
    /// Continuously usable since, for the failback delay.
    pub usable_since: Option<Instant>,
    /// Its conntrack entries must go once its clients have somewhere else to be.
    pub needs_flush: bool,
    /// A plan sent its clients elsewhere (failed over or drained): the connections that
    /// plan placed may have to come home with them (`failback_flows = "move"`, metered
    /// uplinks).
    pub away: bool,
    /// Drained by an operator: its clients' new flows go elsewhere, no new client lands on
    /// it, established flows finish on it.
    pub drained: bool,
    /// Over its quota with `quota_action` standby or stop (alert changes nothing here).
    pub over_quota: Option<QuotaAction>,
    /// It went over its quota: the flows it carries are deleted once the plan that moves
    /// its clients is in the kernel.
    pub quota_flush: bool,
    /// Held down for flapping until then (Unix milliseconds), for the decisions file.
    pub held_until: Option<Millis>,
    /// `gateway = "auto"`: without a learned IPv4 next hop the uplink is down.
    pub auto_gateway: bool,
    /// Default routes on the interface in tables uplinkd does not own.
    pub learned: Vec<nexthop::LearnedRoute>,
    /// Addresses that left the interface (a redial, a renumbering): the flows NATed to
    /// them are dead and must be deleted, once the new paths are in the kernel.
    pub gone_addrs: Vec<IpAddr>,
}

impl Uplink {
    pub fn new(
        name: &str,
        interface: &str,
        weight: u32,
        tier: u32,
        probing: bool,
        stats_window: usize,
    ) -> Uplink {
        Uplink {
            name: name.to_string(),
            interface: interface.to_string(),
            weight,
            tier,
            link: LinkState::default(),
            addrs: Vec::new(),
            health: Health::new(probing, stats_window, Instant::now()),
            serving: true,
            usable_since: None,
            needs_flush: false,
            away: false,
            drained: false,
            over_quota: None,
            quota_flush: false,
            held_until: None,
            auto_gateway: false,
            learned: Vec::new(),
            gone_addrs: Vec::new(),
        }
    }

    pub fn state(&self) -> UplinkState {
        self.health.state()
    }

    pub fn usable(&self) -> bool {
        self.health.state().usable()
    }

    /// Over its quota with `quota_action = "stop"`: it carries nothing.
    pub fn quota_stopped(&self) -> bool {
        self.over_quota == Some(QuotaAction::Stop)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The neighbour entry exists (not deleted, not FAILED).
    pub present: bool,
    /// While present: when it was last confirmed; once gone: when it went away.
    pub last_seen: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub mac: Mac,
    /// The uplink this client was assigned to; sticky across restarts.
    pub home: String,
    pub first_seen: Millis,
    pub addresses: AddrMap,
    /// A host behind a router on the LAN (`mac` is then its `Mac::routed` key): the
    /// router's MAC.
    pub via: Option<Mac>,
}

/// A client's addresses: a sorted small vector. Most clients have one to three addresses,
/// and at 100k clients a map node per client would cost tens of megabytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddrMap(Vec<(IpAddr, Address)>);

impl AddrMap {
    pub fn insert(&mut self, ip: IpAddr, a: Address) -> Option<Address> {
        match self.0.binary_search_by(|(k, _)| k.cmp(&ip)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, a)),
            Err(i) => {
                // One slot at a time: Vec's first growth reserves four (160 bytes), 12 MB
                // unused at 100k one-address clients.
                self.0.reserve_exact(1);
                self.0.insert(i, (ip, a));
                None
            }
        }
    }

    pub fn get(&self, ip: &IpAddr) -> Option<&Address> {
        let i = self.0.binary_search_by(|(k, _)| k.cmp(ip)).ok()?;
        Some(&self.0[i].1)
    }

    pub fn get_mut(&mut self, ip: &IpAddr) -> Option<&mut Address> {
        let i = self.0.binary_search_by(|(k, _)| k.cmp(ip)).ok()?;
        Some(&mut self.0[i].1)
    }

    pub fn remove(&mut self, ip: &IpAddr) -> Option<Address> {
        let i = self.0.binary_search_by(|(k, _)| k.cmp(ip)).ok()?;
        Some(self.0.remove(i).1)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&IpAddr, &mut Address) -> bool) {
        self.0.retain_mut(|(k, a)| keep(k, a));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &Address)> {
        self.0.iter().map(|(k, a)| (k, a))
    }

    pub fn keys(&self) -> impl Iterator<Item = &IpAddr> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &Address> {
        self.0.iter().map(|(_, a)| a)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut Address> {
        self.0.iter_mut().map(|(_, a)| a)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(IpAddr, Address)> for AddrMap {
    fn from_iter<I: IntoIterator<Item = (IpAddr, Address)>>(it: I) -> AddrMap {
        let mut m = AddrMap::default();
        for (ip, a) in it {
            m.insert(ip, a);
        }
        m
    }
}

impl<const N: usize> From<[(IpAddr, Address); N]> for AddrMap {
    fn from(a: [(IpAddr, Address); N]) -> AddrMap {
        a.into_iter().collect()
    }
}

/// What a model change means for the dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// Client maps changed.
    Clients,
    /// Not taken: a LAN limit is reached. The address is left to the `unassigned` verdict
    /// (a hash over the survivors while the LAN is full), so its traffic still flows;
    /// nothing already tracked changes.
    Refused(Limit),
    /// Not taken as a client's address (`lan.max_addresses_per_client`), and the client
    /// is newly at its cap: its further addresses are hashed over the survivors by weight
    /// (one rule element for its MAC, whatever their number).
    Hashed(Limit),
}

/// The LAN limits that bound the agent's memory whatever the LAN announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `lan.max_clients`
    Clients,
    /// `lan.max_addresses_per_client`
    AddressesPerClient,
}

impl Limit {
    pub fn key(self) -> &'static str {
        match self {
            Limit::Clients => "lan.max_clients",
            Limit::AddressesPerClient => "lan.max_addresses_per_client",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub uplinks: Vec<Uplink>,
    /// Persistent maps: a clone shares them, so the agent loop hands the API a snapshot of
    /// 100k clients for the cost of a pointer, and a write copies only the path it
    /// changes.
    clients: imbl::OrdMap<Mac, Client>,
    by_addr: imbl::OrdMap<IpAddr, Mac>,
    /// Clients per uplink, in config order.
    counts: Vec<usize>,
    prefixes: Vec<IpNet>,
    /// Every uplink is down (logged once when it happens and once when it ends).
    all_down: bool,
    /// Operator pins: client address → uplink, until an optional deadline.
    pub overrides: BTreeMap<IpAddr, Override>,
    max_clients: usize,
    max_addresses: usize,
    /// Per policy (config order), per uplink: the SLA verdict.
    pub sla: Vec<Vec<sla::SlaState>>,
    /// (policy, uplink): a policy left the uplink for its SLA; the flows it classified
    /// there are to be deleted once its new verdict is in the kernel.
    pub sla_flushes: Vec<(usize, usize)>,
    /// Where the kernel sends a new client's packets before its assignment lands: set
    /// once that verdict is applied.
    pub unassigned_to: Option<String>,
    /// New clients placed on another uplink than the one their first packets took (they
    /// arrived together, and each placement changes the next): their later flows leave
    /// with another public address.
    pub moved_on_arrival: u64,
    /// Operators' edits of `[[set]]` elements, by set name.
    pub set_edits: BTreeMap<String, set_edits::SetEdits>,
    /// The configured sets with those edits applied, rebuilt when they change
    /// (`keep_set_edits`, `edit_set`), so that a placement does not copy them.
    edited_sets: Option<std::sync::Arc<Vec<crate::config::SetConfig>>>,
    /// `lan.routed`, when set.
    routed_config: Option<Vec<IpNet>>,
    /// Routes through a gateway on a LAN interface: prefix → router.
    lan_routes: BTreeMap<IpNet, IpAddr>,
    /// How many clients are hosts behind LAN routers (kept, as `counts` is).
    routed_clients: usize,
    /// Clients that announced more addresses than `lan.max_addresses_per_client`: their
    /// untracked addresses are hashed over the survivors (`ether saddr` → `overflow`).
    capped: imbl::OrdSet<Mac>,
    /// State changes a reload's new health settings caused (`keep_runtime`), settled by
    /// the next `refresh_links`.
    reconfigured: Vec<(usize, crate::health::Transition)>,
    /// Addresses whose map element (address → home) may have changed since the last
    /// `take_touched`: an apply sends only these to the kernel.
    touched: Touched,
    /// Addresses that went away, by when: expiry reads the oldest instead of walking every
    /// client. An entry is a hint, checked against the address when it comes due (the
    /// address may be back, or gone again since).
    gone: imbl::OrdSet<(Millis, IpAddr)>,
}

/// The client addresses an incremental apply must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// Every one (a start, a restore, more changes than a delta is worth).
    All,
    Some(std::collections::HashSet<IpAddr>),
}

/// Beyond this many touched addresses a full plan costs less than a delta (and the
/// journal stays small in every snapshot the API holds).
const TOUCHED_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub uplink: String,
    /// Unix milliseconds; `None` = until cleared.
    pub until: Option<Millis>,
}

impl Model {
    pub fn new(config: &Config) -> Model {
        Model {
            uplinks: config
                .uplinks
                .iter()
                .map(|u| Uplink {
                    auto_gateway: u.gateway == Some(crate::config::NextHop::Auto),
                    ..Uplink::new(
                        &u.name,
                        &u.interface,
                        u.weight,
                        u.tier,
                        !u.probes.is_empty(),
                        config.health.stats_window as usize,
                    )
                })
                .collect(),
            clients: imbl::OrdMap::new(),
            by_addr: imbl::OrdMap::new(),
            counts: vec![0; config.uplinks.len()],
            prefixes: config.lan.prefixes.clone(),
            all_down: false,
            overrides: BTreeMap::new(),
            max_clients: config.lan.max_clients,
            max_addresses: config.lan.max_addresses_per_client,
            sla: Vec::new(),
            sla_flushes: Vec::new(),
            unassigned_to: None,
            moved_on_arrival: 0,
            set_edits: BTreeMap::new(),
            edited_sets: None,
            routed_config: config.lan.routed.clone(),
            lan_routes: BTreeMap::new(),
            routed_clients: 0,
            reconfigured: Vec::new(),
            capped: imbl::OrdSet::new(),
            touched: Touched::All,
            gone: imbl::OrdSet::new(),
        }
    }

    pub fn uplink(&self, name: &str) -> Option<&Uplink> {
        self.uplinks.iter().find(|u| u.name == name)
    }

    /// Records the kernel state of an interface; returns whether an uplink changed.
    pub fn set_link(&mut self, interface: &str, link: LinkState) -> bool {
        let mut changed = false;
        for u in self.uplinks.iter_mut().filter(|u| u.interface == interface) {
            changed |= u.link != link;
            u.link = link;
        }
        changed
    }

    /// Whether an address should be dispatched at all.
    pub fn wants(&self, ip: IpAddr) -> bool {
        let unicast = match ip {
            IpAddr::V4(a) => {
                !(a.is_unspecified()
                    || a.is_broadcast()
                    || a.is_multicast()
                    || a.is_loopback()
                    || a.is_link_local())
            }
            // Link-local v6 never leaves the LAN, so it is never dispatched.
            IpAddr::V6(a) => {
                !(a.is_unspecified()
                    || a.is_multicast()
                    || a.is_loopback()
                    || a.is_unicast_link_local())
            }
        };
        unicast && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| p.contains(&ip)))
    }

    pub fn clients(&self) -> &imbl::OrdMap<Mac, Client> {
        &self.clients
    }

    /// How many clients are hosts behind LAN routers.
    pub fn routed_clients(&self) -> usize {
        self.routed_clients
    }

    /// Client counts per uplink, in config order.
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    fn uplink_index(&self, name: &str) -> Option<usize> {
        self.uplinks.iter().position(|u| u.name == name)
    }

    /// Where a new client goes: the lowest configured tier (a higher tier carries clients
    /// only by failover), preferring healthy uplinks over degraded ones over dead ones, and
    /// undrained ones (within quota) over drained ones. Every uplink may be drained or down at once (a
    /// drain is accepted while a higher tier survives), so the last choice is any uplink of
    /// that tier: its `home_` chain then spreads the client over the survivors. A new
    /// client's first packets are sent here too, so its assignment moves nothing.
    pub fn next_home(&self) -> String {
        let tier = self.uplinks.iter().map(|u| u.tier).min().unwrap_or(1);
        let in_tier = |i: usize| self.uplinks[i].tier == tier;
        let open = |i: usize| {
            in_tier(i) && !self.uplinks[i].drained && self.uplinks[i].over_quota.is_none()
        };
        let preferences: [&dyn Fn(usize) -> bool; 4] = [
            &|i| open(i) && self.uplinks[i].state() == UplinkState::Up,
            &|i| open(i) && self.uplinks[i].usable(),
            &open,
            &in_tier,
        ];
        let i = preferences
            .iter()
            .find_map(|ok| assign::least_loaded(&self.uplinks, &self.counts, ok))
            .unwrap_or_default();
        self.uplinks
            .get(i)
            .map(|u| u.name.clone())
            .unwrap_or_default()
    }

    /// Adds a client, keeping the per-uplink counts (placement reads them for every new
    /// client, so they are kept rather than recounted).
    fn add_client(&mut self, c: Client) {
        if let Some(i) = self.uplink_index(&c.home) {
            self.counts[i] += 1;
        }
        self.routed_clients += c.mac.is_routed() as usize;
        self.clients.insert(c.mac, c);
    }

    fn drop_client(&mut self, mac: Mac) -> Option<Client> {
        let c = self.clients.remove(&mac)?;
        self.capped.remove(&mac);
        if let Some(i) = self.uplink_index(&c.home) {
            self.counts[i] -= 1;
        }
        self.routed_clients -= c.mac.is_routed() as usize;
        Some(c)
    }

    /// A neighbour entry with a link-layer address exists for `ip`. `adopt` is the uplink
    /// the kernel already steers this address to, used for a client the model does not
    /// know (a restart without a state file).
    pub fn neighbour_present(
        &mut self,
        ip: IpAddr,
        mac: Mac,
        now: Millis,
        adopt: Option<&str>,
    ) -> Change {
        // A group address is no station's (and is the key space of routed hosts).
        if !self.wants(ip) || mac.is_routed() {
            return Change::None;
        }
        self.place(ip, mac, now, adopt)
    }

    /// A host behind a router on the LAN (`router`: the router's MAC) opened a
    /// connection without an assignment: it is a client of its own, placed as a
    /// neighbour is. Addresses outside the routed prefixes are left to neighbour
    /// discovery.
    pub fn routed_present(&mut self, ip: IpAddr, router: Option<Mac>, now: Millis) -> Change {
        if !self.wants(ip) || !self.routed_prefixes().iter().any(|p| p.contains(&ip)) {
            return Change::None;
        }
        let key = Mac::routed(ip);
        let change = self.place(ip, key, now, None);
        if router.is_some()
            && let Some(c) = self.clients.get_mut(&key)
            && c.via != router
        {
            c.via = router;
        }
        change
    }

    /// The routed hosts that opened a connection lately (`active`, read from the
    /// dataplane) are present as of `now`; the others are gone, and expire as gone
    /// neighbours do.
    pub fn routed_activity(&mut self, active: &std::collections::HashSet<IpAddr>, now: Millis) {
        let routed: Vec<(IpAddr, Mac)> = self
            .by_addr
            .iter()
            .filter(|(_, m)| m.is_routed())
            .map(|(ip, m)| (*ip, *m))
            .collect();
        for (ip, key) in routed {
            if active.contains(&ip) {
                let stale = self
                    .clients
                    .get(&key)
                    .and_then(|c| c.addresses.get(&ip))
                    .is_none_or(|a| {
                        !a.present || now.saturating_sub(a.last_seen) >= LAST_SEEN_GRANULARITY
                    });
                if stale && let Some(c) = self.clients.get_mut(&key) {
                    c.addresses.insert(
                        ip,
                        Address {
                            present: true,
                            last_seen: now,
                        },
                    );
                }
            } else {
                self.neighbour_gone(ip, now);
            }
        }
    }

    /// The prefixes whose hosts are routed clients: `lan.routed`, or else the kernel's
    /// routes through a gateway on a LAN interface.
    pub fn routed_prefixes(&self) -> Vec<IpNet> {
        match &self.routed_config {
            Some(list) => list.clone(),
            None => IpNet::aggregate(&self.lan_routes.keys().copied().collect()),
        }
    }

    /// A route to `dst` through `gateway` on a LAN interface appeared or went away;
    /// returns whether the routed prefixes changed.
    pub fn set_lan_route(&mut self, dst: IpNet, gateway: IpAddr, present: bool) -> bool {
        let before = self.routed_prefixes();
        if present {
            self.lan_routes.insert(dst, gateway);
        } else if self.lan_routes.get(&dst) == Some(&gateway) {
            self.lan_routes.remove(&dst);
        }
        before != self.routed_prefixes()
    }

    pub fn clear_lan_routes(&mut self) {
        self.lan_routes.clear();
    }

    /// The router a routed prefix containing `ip` goes through, as the kernel's route
    /// says (configured prefixes without a route have none).
    pub fn router_of(&self, ip: IpAddr) -> Option<(IpNet, IpAddr)> {
        self.lan_routes
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(n, g)| (*n, *g))
    }

    /// The router a routed host comes through: its address (the route to the host's
    /// prefix) and its MAC, as far as known; empty for a neighbour.
    pub fn via(&self, c: &Client) -> String {
        if !c.mac.is_routed() {
            return String::new();
        }
        let router = c
            .addresses
            .keys()
            .find_map(|ip| self.router_of(*ip))
            .map(|(_, gw)| gw.to_string());
        match (router, c.via) {
            (Some(r), Some(m)) => format!("{r} ({m})"),
            (Some(r), None) => r,
            (None, Some(m)) => m.to_string(),
            (None, None) => "a LAN router".to_string(),
        }
    }

    /// Tracks `ip` for client `mac` (a neighbour, or a routed host's key).
    fn place(&mut self, ip: IpAddr, mac: Mac, now: Millis, adopt: Option<&str>) -> Change {
        let known = self.by_addr.get(&ip).is_some_and(|m| *m == mac);
        // The common case (every entry of a resync's dump): a known address of its own
        // client, seen again. One lookup of the client, and none for writing while its
        // sighting is recent: a neighbour dump of 100k clients then leaves the maps (and
        // the snapshot the API holds, which shares them) untouched.
        if known && let Some(c) = self.clients.get(&mac) {
            let fresh = c.addresses.get(&ip).is_some_and(|a| {
                a.present && now.saturating_sub(a.last_seen) < LAST_SEEN_GRANULARITY
            });
            if fresh {
                return Change::None;
            }
            let client = self.clients.get_mut(&mac).expect("looked up above");
            let seen = Address {
                present: true,
                last_seen: now,
            };
            return match client.addresses.insert(ip, seen) {
                Some(_) => Change::None,
                None => Change::Clients,
            };
        }
        // Limits first, so that a refusal changes nothing already tracked.
        if !known {
            match self.clients.get(&mac) {
                None if self.clients.len() >= self.max_clients => {
                    return Change::Refused(Limit::Clients);
                }
                Some(c) if c.addresses.len() >= self.max_addresses => {
                    // Not the next placement's uplink (one host's thousand addresses would
                    // all land there): hashed over the survivors by weight, by its MAC.
                    let limit = Limit::AddressesPerClient;
                    return match self.capped.insert(mac) {
                        None => Change::Hashed(limit),
                        Some(_) => Change::Refused(limit),
                    };
                }
                _ => {}
            }
        }
        let mut change = Change::None;
        if let Some(&owner) = self.by_addr.get(&ip)
            && owner != mac
        {
            // The address moved to another host (DHCP reuse): it follows the new host.
            self.remove_address(owner, ip);
            change = Change::Clients;
        }
        if !self.clients.contains_key(&mac) {
            let home = match adopt.filter(|name| self.uplink(name).is_some()) {
                Some(name) => name.to_string(),
                None => {
                    let home = self.next_home();
                    if self.unassigned_to.as_ref().is_some_and(|u| *u != home) {
                        self.moved_on_arrival += 1;
                    }
                    home
                }
            };
            self.add_client(Client {
                mac,
                home,
                first_seen: now,
                addresses: AddrMap::default(),
                via: None,
            });
            change = Change::Clients;
        }
        let client = self.clients.get_mut(&mac).expect("inserted above");
        match client.addresses.insert(
            ip,
            Address {
                present: true,
                last_seen: now,
            },
        ) {
            Some(_) => {}
            None => change = Change::Clients,
        }
        if self.by_addr.insert(ip, mac) != Some(mac) {
            self.touch(ip);
        }
        change
    }

    /// The neighbour entry for `ip` was deleted or failed. The address stays mapped until
    /// it has been gone for the idle timeout.
    pub fn neighbour_gone(&mut self, ip: IpAddr, now: Millis) {
        if let Some(mac) = self.by_addr.get(&ip)
            && let Some(addr) = self
                .clients
                .get_mut(mac)
                .and_then(|c| c.addresses.get_mut(&ip))
            && addr.present
        {
            addr.present = false;
            addr.last_seen = now;
            self.gone.insert((now, ip));
        }
    }

    /// Addresses not in `present` (a fresh neighbour dump) are marked gone as of `now`.
    /// Routed hosts are never neighbours: their activity says (`routed_activity`).
    pub fn reconcile_present(&mut self, present: &HashMap<IpAddr, Mac>, now: Millis) {
        let gone: Vec<IpAddr> = self
            .by_addr
            .iter()
            .filter(|(ip, m)| !m.is_routed() && !present.contains_key(ip))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in gone {
            self.neighbour_gone(ip, now);
            // Restored as gone and still absent: due from its last sighting.
            if let Some(a) = self.client_by_addr(&ip).and_then(|c| c.addresses.get(&ip))
                && !a.present
            {
                self.gone.insert((a.last_seen, ip));
            }
        }
    }

    /// Drops addresses gone for at least `idle`, then clients left without addresses.
    /// Returns the released clients.
    pub fn expire(&mut self, now: Millis, idle: Duration) -> Vec<Client> {
        let idle = idle.as_millis() as u64;
        let mut released = Vec::new();
        while let Some(&(at, ip)) = self.gone.get_min() {
            if now.saturating_sub(at) < idle {
                break;
            }
            self.gone.remove(&(at, ip));
            let Some(&mac) = self.by_addr.get(&ip) else {
                continue;
            };
            let still_gone = self
                .clients
                .get(&mac)
                .and_then(|c| c.addresses.get(&ip))
                .is_some_and(|a| !a.present && a.last_seen == at);
            if still_gone && let Some(c) = self.remove_address(mac, ip) {
                released.push(c);
            }
        }
        released
    }

    /// Removes one address; returns the client if that was its last one.
    fn remove_address(&mut self, mac: Mac, ip: IpAddr) -> Option<Client> {
        self.by_addr.remove(&ip);
        self.touch(ip);
        let client = self.clients.get_mut(&mac)?;
        client.addresses.remove(&ip);
        // Below its cap again: a further address is tracked, not hashed.
        self.capped.remove(&mac);
        if client.addresses.is_empty() {
            self.drop_client(mac)
        } else {
            None
        }
    }

    /// Restores clients from the state file. Homes on uplinks no longer configured are
    /// re-assigned; every restored address starts as gone (as of its last sighting) until
    /// the neighbour dump confirms it.
    pub fn restore(&mut self, mut clients: Vec<Client>) -> usize {
        // A MAC listed twice (a hand-edited or foreign file) is one client: its addresses
        // merge under the first entry's home, so it is counted once. In place: at 100k
        // clients a second collection would add its size to the start-up peak.
        clients.sort_by_key(|c| c.mac);
        clients.dedup_by(|later, first| {
            if later.mac != first.mac {
                return false;
            }
            for (ip, a) in later.addresses.iter() {
                first.addresses.insert(*ip, a.clone());
            }
            true
        });
        let mut reassigned = 0;
        let mut orphans = Vec::new();
        for mut c in clients {
            for a in c.addresses.values_mut() {
                a.present = false;
            }
            c.addresses.retain(|ip, _| self.wants(*ip));
            if c.addresses.is_empty() {
                continue;
            }
            if self.uplink(&c.home).is_none() {
                orphans.push(c);
                continue;
            }
            self.insert(c);
        }
        for mut c in orphans {
            c.home = self.next_home();
            reassigned += 1;
            self.insert(c);
        }
        reassigned
    }

    /// The decisions file's content: each uplink's runtime decisions and the pins.
    pub fn decisions(&self) -> Decisions {
        Decisions {
            uplinks: self
                .uplinks
                .iter()
                .map(|u| {
                    (
                        u.name.clone(),
                        UplinkRuntime {
                            drained: u.drained,
                            usable: u.usable(),
                            serving: u.serving,
                            held_until: u.held_until,
                        },
                    )
                })
                .collect(),
            overrides: self.overrides.clone(),
            sets: self.set_edits.clone(),
        }
    }

    /// Restores decisions saved before a restart: pins, drains, failovers still waiting
    /// for their failback, and uplinks that were down (they stay down until probes
    /// confirm them). What names an uplink no longer configured is dropped.
    pub fn restore_decisions(&mut self, saved: Decisions) {
        for u in &mut self.uplinks {
            let Some(r) = saved.uplinks.get(&u.name) else {
                continue;
            };
            u.drained = r.drained;
            u.serving = r.serving && r.usable;
            if !r.usable {
                u.health.start_down();
            }
            // A flap hold runs to its end, not to the restart.
            if let Some(until) = r.held_until {
                let left = Duration::from_millis(until.saturating_sub(now_millis()));
                if !left.is_zero() {
                    u.health.hold_for(left, Instant::now());
                    u.held_until = Some(until);
                }
            }
        }
        self.overrides = saved
            .overrides
            .into_iter()
            .filter(|(_, o)| self.uplink(&o.uplink).is_some())
            .collect();
        // Filtered against the config by the caller (`keep_set_edits`).
        self.set_edits = saved.sets;
    }

    fn insert(&mut self, c: Client) {
        // A restored neighbour's address is indexed by the first neighbour dump if it is
        // still absent (`reconcile_present`): 100k entries are not held at every warm
        // start. A routed host is never in that dump.
        for (ip, a) in c.addresses.iter().filter(|_| c.mac.is_routed()) {
            if !a.present {
                self.gone.insert((a.last_seen, *ip));
            }
        }
        for ip in c.addresses.keys() {
            self.touch(*ip);
            if let Some(old) = self.by_addr.insert(*ip, c.mac)
                && old != c.mac
                && let Some(prev) = self.clients.get_mut(&old)
            {
                prev.addresses.remove(ip);
                if prev.addresses.is_empty() {
                    self.drop_client(old);
                }
            }
        }
        self.add_client(c);
    }

    fn touch(&mut self, ip: IpAddr) {
        if let Touched::Some(set) = &mut self.touched {
            if set.len() < TOUCHED_MAX {
                set.insert(ip);
            } else {
                self.touched = Touched::All;
            }
        }
    }

    /// The addresses touched since the last call; the journal starts afresh.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::replace(&mut self.touched, Touched::Some(Default::default()))
    }

    /// The next apply looks at every address (the last one failed, or its plan was not
    /// incremental).
    pub fn touch_all(&mut self) {
        self.touched = Touched::All;
    }

    /// Drops overrides past their deadline; returns the addresses.
    pub fn expire_overrides(&mut self, now: Millis) -> Vec<IpAddr> {
        let expired: Vec<IpAddr> = self
            .overrides
            .iter()
            .filter(|(_, o)| o.until.is_some_and(|t| t <= now))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &expired {
            self.overrides.remove(ip);
        }
        expired
    }

    /// The client that has `ip`.
    pub fn client_by_addr(&self, ip: &IpAddr) -> Option<&Client> {
        self.by_addr.get(ip).and_then(|m| self.clients.get(m))
    }

    /// Every mapped address with its client's home uplink.
    /// Clients at their address cap, whose further addresses are hashed over the
    /// survivors.
    pub fn capped_clients(&self) -> impl Iterator<Item = &Mac> {
        self.capped.iter()
    }

    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, &str)> {
        self.clients
            .values()
            .flat_map(|c| c.addresses.keys().map(move |ip| (*ip, c.home.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn model(weights: &[u32]) -> Model {
        let mut text = String::from(
            "[lan]\ninterfaces=[\"lan0\"]\nprefixes=[\"10.0.0.0/8\",\"2001:db8::/32\"]\n",
        );
        for (i, w) in weights.iter().enumerate() {
            text += &format!(
                "[[uplink]]\nname=\"u{i}\"\ninterface=\"wan{i}\"\ngateway=\"100.64.{i}.1\"\nweight={w}\n"
            );
        }
        Model::new(&Config::parse(Path::new("t"), &text).unwrap())
    }

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A client as a state file holds it: MAC `m`, address 10.0.0.`n`.
    fn saved(m: u8, n: u8, home: &str) -> Client {
        Client {
            mac: mac(m),
            via: None,
            home: home.into(),
            first_seen: 0,
            addresses: [(
                ip(&format!("10.0.0.{n}")),
                Address {
                    present: true,
                    last_seen: 0,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn weighted_balance_gives_4_2_2() {
        let mut m = model(&[2, 1, 1]);
        for n in 1..=8 {
            m.neighbour_present(ip(&format!("10.0.0.{n}")), mac(n), 0, None);
        }
        assert_eq!(m.counts(), [4, 2, 2]);
    }

    #[test]
    fn one_client_many_addresses_counts_once_and_shares_home() {
        let mut m = model(&[1, 1]);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, None);
        m.neighbour_present(ip("2001:db8::1"), mac(1), 0, None);
        m.neighbour_present(ip("10.0.0.2"), mac(2), 0, None);
        assert_eq!(m.counts(), [1, 1]);
        let homes: Vec<_> = m.addresses().filter(|(_, h)| *h == "u0").collect();
        assert_eq!(homes.len(), 2);
    }

    #[test]
    fn ignores_link_local_and_out_of_prefix() {
        let mut m = model(&[1]);
        assert_eq!(
            m.neighbour_present(ip("fe80::1"), mac(1), 0, None),
            Change::None
        );
        assert_eq!(
            m.neighbour_present(ip("192.168.1.1"), mac(1), 0, None),
            Change::None
        );
        assert!(m.clients.is_empty());
    }

    #[test]
    fn idle_release_then_least_loaded() {
        let mut m = model(&[1, 1]);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, None);
        m.neighbour_present(ip("10.0.0.2"), mac(2), 0, None);
        m.neighbour_gone(ip("10.0.0.1"), 1_000);
        assert!(
            m.expire(5_000, Duration::from_secs(10)).is_empty(),
            "not idle long enough"
        );
        let released = m.expire(11_000, Duration::from_secs(10));
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].home, "u0");
        assert_eq!(m.counts(), [0, 1]);
        m.neighbour_present(ip("10.0.0.3"), mac(3), 12_000, None);
        assert_eq!(m.clients[&mac(3)].home, "u0");
    }

    #[test]
    fn returning_address_is_not_released() {
        let mut m = model(&[1]);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, None);
        m.neighbour_gone(ip("10.0.0.1"), 1_000);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 2_000, None);
        assert!(m.expire(100_000, Duration::from_secs(10)).is_empty());
    }

    #[test]
    fn address_moving_to_another_host_follows_it() {
        let mut m = model(&[1, 1]);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, None);
        m.neighbour_present(ip("10.0.0.1"), mac(2), 0, None);
        assert!(
            !m.clients.contains_key(&mac(1)),
            "old host had no other address"
        );
        assert_eq!(m.clients[&mac(2)].addresses.len(), 1);
    }

    #[test]
    fn lan_limits_refuse_without_touching_what_is_tracked() {
        let mut text = String::from(
            "[lan]\ninterfaces=[\"lan0\"]\nmax_clients=2\nmax_addresses_per_client=2\n",
        );
        text += "[[uplink]]\nname=\"u0\"\ninterface=\"wan0\"\ngateway=\"100.64.0.1\"\n";
        let mut m = Model::new(&Config::parse(Path::new("t"), &text).unwrap());
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, None);
        m.neighbour_present(ip("10.0.0.2"), mac(1), 0, None);
        // Beyond a client's limit an address is hashed over the survivors (once).
        assert_eq!(
            m.neighbour_present(ip("10.0.0.3"), mac(1), 0, None),
            Change::Hashed(Limit::AddressesPerClient)
        );
        assert_eq!(
            m.neighbour_present(ip("10.0.0.3"), mac(1), 1, None),
            Change::Refused(Limit::AddressesPerClient)
        );
        assert_eq!(m.capped_clients().collect::<Vec<_>>(), [&mac(1)]);
        // A known address of a full client is still refreshed.
        assert_eq!(
            m.neighbour_present(ip("10.0.0.2"), mac(1), 5, None),
            Change::None
        );
        m.neighbour_present(ip("10.0.1.1"), mac(2), 0, None);
        assert_eq!(
            m.neighbour_present(ip("10.0.2.1"), mac(3), 0, None),
            Change::Refused(Limit::Clients)
        );
        assert_eq!(m.clients.len(), 2);
        assert_eq!(m.counts(), [2]);
        assert_eq!(m.by_addr.len(), 3);
    }

    #[test]
    fn duplicate_macs_in_a_state_file_count_once() {
        let mut m = model(&[1, 1]);
        m.restore(vec![saved(1, 1, "u0"), saved(1, 2, "u1")]);
        assert_eq!(m.clients.len(), 1);
        assert_eq!(m.counts(), [1, 0], "one client, counted once, first home");
        assert_eq!(m.clients[&mac(1)].addresses.len(), 2);
        assert_eq!(m.client_by_addr(&ip("10.0.0.2")).unwrap().home, "u0");
    }

    #[test]
    fn adoption_keeps_the_kernel_home() {
        let mut m = model(&[1, 1]);
        m.neighbour_present(ip("10.0.0.1"), mac(1), 0, Some("u1"));
        assert_eq!(m.clients[&mac(1)].home, "u1");
        m.neighbour_present(ip("10.0.0.2"), mac(2), 0, Some("gone"));
        assert_eq!(
            m.clients[&mac(2)].home,
            "u0",
            "unknown uplink falls back to least loaded"
        );
    }

    #[test]
    fn restore_keeps_homes_and_reassigns_orphans() {
        let mut m = model(&[1, 1]);
        let reassigned = m.restore(vec![
            saved(1, 1, "u1"),
            saved(2, 2, "u1"),
            saved(3, 3, "removed"),
        ]);
        assert_eq!(reassigned, 1);
        assert_eq!(m.clients[&mac(1)].home, "u1");
        assert_eq!(m.clients[&mac(3)].home, "u0");
        assert!(
            !m.clients[&mac(1)]
                .addresses
                .values()
                .next()
                .unwrap()
                .present
        );
    }

    /// Expiry reads an index, not every client: a restored address the first neighbour
    /// dump does not confirm still expires an idle timeout after it was last seen, and a
    /// confirmed one does not.
    #[test]
    fn restored_addresses_absent_from_the_dump_expire() {
        let mut m = model(&[1, 1]);
        m.restore(vec![saved(1, 1, "u0"), saved(2, 2, "u1")]);
        let present = HashMap::from([(ip("10.0.0.2"), mac(2))]);
        m.neighbour_present(ip("10.0.0.2"), mac(2), 5, None);
        m.reconcile_present(&present, 5);
        let idle = Duration::from_millis(100);
        assert!(m.expire(99, idle).is_empty(), "not due yet");
        let released = m.expire(100, idle);
        assert_eq!(released.iter().map(|c| c.mac).collect::<Vec<_>>(), [mac(1)]);
        assert!(m.expire(10_000, idle).is_empty(), "the confirmed one stays");
    }

    #[test]
    fn routed_hosts_are_placed_only_inside_routed_prefixes_and_expire_when_inactive() {
        let mut m = model(&[2, 1]);
        let router = Some(mac(9));
        assert_eq!(
            m.routed_present(ip("10.20.0.5"), router, 0),
            Change::None,
            "no routed prefix yet"
        );
        assert!(m.set_lan_route("10.20.0.0/24".parse().unwrap(), ip("10.0.0.254"), true));
        for n in 1..=6 {
            let h = ip(&format!("10.20.0.{n}"));
            assert_eq!(m.routed_present(h, router, 0), Change::Clients);
        }
        assert_eq!(m.counts(), &[4, 2], "least-loaded by weight, as neighbours");
        assert_eq!(m.routed_clients(), 6);
        let c = m.client_by_addr(&ip("10.20.0.1")).unwrap();
        assert!(c.mac.is_routed() && c.via == router);
        assert_eq!(m.via(c), format!("10.0.0.254 ({})", mac(9)));
        // A neighbour dump never lists them: they stay present.
        m.reconcile_present(&HashMap::new(), 1);
        assert!(m.expire(600_001, Duration::from_secs(600)).is_empty());
        // The activity read: 10.20.0.1 opened a connection lately, the others did not.
        let active = std::collections::HashSet::from([ip("10.20.0.1")]);
        m.routed_activity(&active, 1_000);
        let released = m.expire(601_000, Duration::from_secs(600));
        assert_eq!(released.len(), 5);
        assert_eq!(m.routed_clients(), 1);
        // A station's MAC never has the group bit; one that does is no neighbour.
        assert_eq!(
            m.neighbour_present(ip("10.0.0.9"), Mac::routed(ip("10.20.0.9")), 0, None),
            Change::None
        );
    }

    #[test]
    fn routed_keys_are_unique_per_ipv4_address_and_marked() {
        let a = Mac::routed(ip("10.20.0.1"));
        assert_ne!(a, Mac::routed(ip("10.20.0.2")));
        assert_ne!(
            Mac::routed(ip("2001:db8:20::1")),
            Mac::routed(ip("2001:db8:20::2"))
        );
        assert!(a.is_routed() && !mac(1).is_routed());
    }
}
