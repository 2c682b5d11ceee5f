//! Rules and routes through rtnetlink. Ours are recognised by the rtm protocol stamped on
//! them plus the owned priority band (rules) or table range (routes); nothing else is read
//! as ours, so nothing else is ever deleted.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteProtocol, RouteScope};
use netlink_packet_route::rule::{RuleAction as NlRuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use crate::plan::{Family, IfName, RouteSpec, RuleAction, RuleSpec};

use super::DataplaneError;

#[derive(Clone)]
pub struct NetlinkDriver {
    handle: Handle,
    protocol: u8,
    priorities: RangeInclusive<u32>,
    tables: RangeInclusive<u32>,
}

/// One of our objects as the kernel has it: the spec it means (if it is a shape uplinkd
/// writes) and the message to send back to delete it exactly.
pub struct Owned<S, M> {
    pub spec: Option<S>,
    pub message: M,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetlinkStats {
    pub added: usize,
    pub deleted: usize,
}

impl NetlinkDriver {
    pub fn new(
        handle: Handle,
        protocol: u8,
        priorities: RangeInclusive<u32>,
        tables: RangeInclusive<u32>,
    ) -> NetlinkDriver {
        NetlinkDriver {
            handle,
            protocol,
            priorities,
            tables,
        }
    }

    pub async fn read_rules(&self) -> Result<Vec<Owned<RuleSpec, RuleMessage>>, DataplaneError> {
        let mut out = Vec::new();
        for (family, version) in [(Family::V4, IpVersion::V4), (Family::V6, IpVersion::V6)] {
            let mut stream = self.handle.rule().get(version).execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|e| DataplaneError::netlink("dump ip rules", e))?
            {
                let mut priority = 0;
                let mut proto = None;
                let (mut mark, mut mask, mut table, mut suppress, mut source) =
                    (None, None, msg.header.table as u32, None, None);
                let (mut iif, mut oif) = (None, None);
                for a in &msg.attributes {
                    match a {
                        RuleAttribute::Priority(p) => priority = *p,
                        RuleAttribute::Protocol(p) => proto = Some(u8::from(*p)),
                        RuleAttribute::FwMark(m) => mark = Some(*m),
                        RuleAttribute::FwMask(m) => mask = Some(*m),
                        RuleAttribute::Table(t) => table = *t,
                        RuleAttribute::Source(a) => source = Some(*a),
                        RuleAttribute::Iifname(n) => iif = Some(n.as_str()),
                        RuleAttribute::Oifname(n) => oif = IfName::new(n),
                        // The kernel reports "unset" as u32::MAX.
                        RuleAttribute::SuppressPrefixLen(s) if *s != u32::MAX => {
                            suppress = Some(*s)
                        }
                        _ => {}
                    }
                }
                if !self.priorities.contains(&priority) || proto != Some(self.protocol) {
                    continue;
                }
                let host_len = if family == Family::V4 { 32 } else { 128 };
                let plain = msg.header.dst_len == 0 && msg.header.action == NlRuleAction::ToTable;
                let action = match (mark, suppress, source, iif, oif) {
                    (None, Some(0), None, None, None)
                        if table == RouteHeader::RT_TABLE_MAIN as u32 =>
                    {
                        Some(RuleAction::MainSpecific)
                    }
                    (Some(mark), None, None, None, None) => Some(RuleAction::FwMark {
                        mark,
                        mask: mask.unwrap_or(u32::MAX),
                        table,
                    }),
                    (None, None, Some(addr), None, None) if msg.header.src_len == host_len => {
                        Some(RuleAction::FromAddr { addr, table })
                    }
                    (None, None, None, Some("lo"), None) => Some(RuleAction::Local { table }),
                    (None, None, None, None, Some(ifname)) => {
                        Some(RuleAction::Oif { ifname, table })
                    }
                    _ => None,
                };
                let plain = plain && (source.is_some() || msg.header.src_len == 0);
                let spec = action.filter(|_| plain).map(|action| RuleSpec {
                    family,
                    priority,
                    action,
                });
                if spec.is_none() {
                    tracing::debug!(rule = ?msg, "owned rule of a shape uplinkd does not write; removing it");
                }
                out.push(Owned { spec, message: msg });
            }
        }
        Ok(out)
    }

    pub async fn read_routes(&self) -> Result<Vec<Owned<RouteSpec, RouteMessage>>, DataplaneError> {
        let mut out = Vec::new();
        for (family, af) in [
            (Family::V4, AddressFamily::Inet),
            (Family::V6, AddressFamily::Inet6),
        ] {
            // The kernel filters dumps by protocol (strict checking is on for this socket).
            let mut req = RouteMessage::default();
            req.header.address_family = af;
            req.header.protocol = RouteProtocol::from(self.protocol);
            req.header.table = RouteHeader::RT_TABLE_UNSPEC;
            let mut stream = self.handle.route().get(req).execute();
            while let Some(msg) = stream
                .try_next()
                .await
                .map_err(|e| DataplaneError::netlink("dump routes", e))?
            {
                let Some(r) = crate::discover::route_fields(&msg) else {
                    continue;
                };
                if r.protocol != self.protocol || !self.tables.contains(&r.table) {
                    continue;
                }
                let spec = r.oif.filter(|_| r.default).map(|oif| RouteSpec {
                    table: r.table,
                    family,
                    gateway: r.gateway,
                    oif,
                });
                out.push(Owned { spec, message: msg });
            }
        }
        Ok(out)
    }

    /// Adds missing rules and deletes ours that are not desired.
    pub async fn apply_rules(
        &self,
        desired: &BTreeSet<RuleSpec>,
    ) -> (NetlinkStats, Vec<DataplaneError>) {
        match self.read_rules().await {
            Ok(have) => {
                reconcile(
                    "ip rule",
                    have,
                    desired,
                    async |m| self.handle.rule().del(m).execute().await,
                    async |s| self.add_rule(s).await,
                )
                .await
            }
            Err(e) => (NetlinkStats::default(), vec![e]),
        }
    }

    async fn add_rule(&self, spec: &RuleSpec) -> Result<(), rtnetlink::Error> {
        let req = self
            .handle
            .rule()
            .add()
            .priority(spec.priority)
            .action(NlRuleAction::ToTable);
        let mut req = match spec.action {
            RuleAction::MainSpecific => req.table_id(RouteHeader::RT_TABLE_MAIN as u32),
            RuleAction::FwMark { mark, table, .. } => req.table_id(table).fw_mark(mark),
            RuleAction::FromAddr { table, .. }
            | RuleAction::Local { table }
            | RuleAction::Oif { table, .. } => req.table_id(table),
        };
        let msg = req.message_mut();
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::from(self.protocol)));
        match spec.action {
            RuleAction::MainSpecific => msg.attributes.push(RuleAttribute::SuppressPrefixLen(0)),
            RuleAction::FwMark { mask, .. } => msg.attributes.push(RuleAttribute::FwMask(mask)),
            RuleAction::FromAddr { addr, .. } => {
                msg.header.src_len = if addr.is_ipv4() { 32 } else { 128 };
                msg.attributes.push(RuleAttribute::Source(addr));
            }
            RuleAction::Local { .. } => msg.attributes.push(RuleAttribute::Iifname("lo".into())),
            RuleAction::Oif { ifname, .. } => msg
                .attributes
                .push(RuleAttribute::Oifname(ifname.as_str().into())),
        }
        match spec.family {
            Family::V4 => req.v4().execute().await,
            Family::V6 => req.v6().execute().await,
        }
    }

    pub async fn apply_routes(
        &self,
        desired: &BTreeSet<RouteSpec>,
    ) -> (NetlinkStats, Vec<DataplaneError>) {
        let del = async |m| match self.handle.route().del(m).execute().await {
            // The device went away and took the route with it.
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            r => r,
        };
        let add = async |s: &RouteSpec| {
            self.handle
                .route()
                .add(self.route_message(s))
                .replace()
                .execute()
                .await
        };
        match self.read_routes().await {
            Ok(have) => reconcile("route", have, desired, del, add).await,
            Err(e) => (NetlinkStats::default(), vec![e]),
        }
    }

    fn route_message(&self, spec: &RouteSpec) -> RouteMessage {
        let proto = RouteProtocol::from(self.protocol);
        match (spec.family, spec.gateway) {
            (Family::V4, gw) => {
                let b = RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(spec.table)
                    .protocol(proto)
                    .output_interface(spec.oif);
                match gw {
                    // onlink: the gateway need not be inside a subnet on the link yet (the
                    // address may come later), so the route does not wait for it.
                    Some(IpAddr::V4(g)) => b.gateway(g).onlink().build(),
                    _ => b.scope(RouteScope::Link).build(),
                }
            }
            (Family::V6, gw) => {
                let b = RouteMessageBuilder::<Ipv6Addr>::new()
                    .table_id(spec.table)
                    .protocol(proto)
                    .output_interface(spec.oif);
                match gw {
                    Some(IpAddr::V6(g)) => b.gateway(g).build(),
                    _ => b.build(),
                }
            }
        }
    }

    /// Deletes every rule and route uplinkd owns. Collects errors instead of stopping.
    pub async fn remove_all(&self) -> (NetlinkStats, Vec<DataplaneError>) {
        let (r, mut errors) = self.apply_rules(&BTreeSet::new()).await;
        let (t, e2) = self.apply_routes(&BTreeSet::new()).await;
        errors.extend(e2);
        (
            NetlinkStats {
                added: 0,
                deleted: r.deleted + t.deleted,
            },
            errors,
        )
    }
}

/// Deletes the owned objects that are not desired and adds the desired ones that are
/// missing. Keeps going past failures and returns them all, so one bad object does not
/// block the rest.
async fn reconcile<S: Ord + Copy + std::fmt::Debug, M>(
    what: &str,
    have: Vec<Owned<S, M>>,
    desired: &BTreeSet<S>,
    del: impl AsyncFn(M) -> Result<(), rtnetlink::Error>,
    add: impl AsyncFn(&S) -> Result<(), rtnetlink::Error>,
) -> (NetlinkStats, Vec<DataplaneError>) {
    let mut stats = NetlinkStats::default();
    let mut errors = Vec::new();
    let present: BTreeSet<S> = have.iter().filter_map(|o| o.spec).collect();
    for o in have {
        if o.spec.is_some_and(|s| desired.contains(&s)) {
            continue;
        }
        match del(o.message).await {
            Ok(()) => stats.deleted += 1,
            Err(e) => errors.push(DataplaneError::netlink(
                &format!("delete {what} {:?}", o.spec),
                e,
            )),
        }
    }
    for spec in desired.difference(&present) {
        match add(spec).await {
            Ok(()) => stats.added += 1,
            Err(e) => errors.push(DataplaneError::netlink(&format!("add {what} {spec:?}"), e)),
        }
    }
    (stats, errors)
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}
