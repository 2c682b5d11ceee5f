//! Rendering: the desired table as nft JSON objects (chains, rules, sets, counters, the
//! verdict maps), each rule with the hash comment its signature is read by.

use super::*;

/// The table, its sets, chains and rules, in creation order, as nft JSON objects
/// (`{"table": …}`, `{"map": …}`, `{"set": …}`, …). Rules carry their hash comment.
pub(super) fn render_structure(s: &NftStructure) -> Vec<Value> {
    let t = || Cow::Owned(s.table.clone());
    let mut objs = Vec::new();
    let table = serde_json::to_value(NfListObject::Table(Table {
        family: NfFamily::INet,
        name: t(),
        handle: None,
    }))
    .expect("table serializes");
    let chain = |name: &str| Chain {
        family: NfFamily::INet,
        table: t(),
        name: Cow::Owned(name.to_string()),
        ..Chain::default()
    };
    // Regular chains first: base chains and maps refer to them.
    for u in &s.uplinks {
        objs.push(NfListObject::Chain(chain(&up_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&keep_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&home_chain(&u.name))));
        objs.push(NfListObject::Chain(chain(&inbound_chain(&u.name))));
    }
    objs.push(NfListObject::Chain(chain(UNASSIGNED)));
    objs.push(NfListObject::Chain(chain(OVERFLOW)));
    objs.push(NfListObject::Chain(chain(&policy_chain(DEFAULT_POLICY))));
    for p in &s.policies {
        objs.push(NfListObject::Chain(chain(&policy_chain(&p.name))));
    }
    objs.push(NfListObject::Chain(chain(RULES)));
    for r in s.rules.iter() {
        objs.push(NfListObject::Chain(chain(&rule_chain(&r.name))));
    }
    objs.push(NfListObject::Chain(chain(LAN)));
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Prerouting),
        prio: Some(-150),
        policy: Some(NfChainPolicy::Accept),
        ..chain(PREROUTING)
    }));
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::Filter),
        hook: Some(NfHook::Forward),
        prio: Some(0),
        policy: Some(NfChainPolicy::Accept),
        ..chain(ACCOUNTING)
    }));
    if let Some(local) = &s.local {
        if matches!(local, crate::plan::LocalVerdict::Spread(_)) {
            objs.push(NfListObject::Chain(chain(LOCAL)));
        }
        // A route chain: a changed mark makes the kernel look the route up again.
        objs.push(NfListObject::Chain(Chain {
            _type: Some(NfChainType::Route),
            hook: Some(NfHook::Output),
            prio: Some(-150),
            policy: Some(NfChainPolicy::Accept),
            ..chain(OUTPUT)
        }));
    }
    objs.push(NfListObject::Chain(Chain {
        _type: Some(NfChainType::NAT),
        hook: Some(NfHook::Postrouting),
        prio: Some(100),
        policy: Some(NfChainPolicy::Accept),
        ..chain(POSTROUTING)
    }));

    let rule = |chain: &str, expr: Vec<Statement<'static>>| {
        let comment = format!(
            "{COMMENT_PREFIX}{:016x}",
            fnv1a(
                serde_json::to_string(&expr)
                    .expect("rule serializes")
                    .as_bytes()
            )
        );
        NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: t(),
            chain: Cow::Owned(chain.to_string()),
            expr: Cow::Owned(expr),
            comment: Some(Cow::Owned(comment)),
            ..Rule::default()
        })
    };
    let meta = |key| Expression::Named(NamedExpression::Meta(Meta { key }));
    let ct_mark = || {
        Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("mark"),
            ..CT::default()
        }))
    };
    let payload = |protocol: &'static str| {
        Expression::Named(NamedExpression::Payload(Payload::PayloadField(
            PayloadField {
                protocol: Cow::Borrowed(protocol),
                field: Cow::Borrowed("saddr"),
            },
        )))
    };
    let set_bits = |current: Expression<'static>, value: u32| {
        Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                current,
                Expression::Number(!s.mask),
            ))),
            Expression::Number(value),
        ])))
    };

    for u in &s.uplinks {
        // While the uplink has no IPv6 next hop, its IPv6 connections (new ones in `up_`,
        // established ones in `keep_`) go by the detour's.
        let detour = |chain: &str| {
            u.v6_detour.as_ref().map(|to| {
                rule(
                    chain,
                    vec![
                        Statement::Match(Match {
                            left: meta(MetaKey::Nfproto),
                            right: Expression::String(Cow::Borrowed("ipv6")),
                            op: Operator::EQ,
                        }),
                        Statement::Goto(JumpTarget {
                            target: Cow::Owned(up_chain(to)),
                        }),
                    ],
                )
            })
        };
        objs.extend(detour(&up_chain(&u.name)));
        // Only the owned mark bits change; foreign bits pass through.
        objs.push(rule(
            &up_chain(&u.name),
            vec![
                Statement::Mangle(Mangle {
                    key: meta(MetaKey::Mark),
                    value: set_bits(meta(MetaKey::Mark), u.fwmark),
                }),
                Statement::Mangle(Mangle {
                    key: ct_mark(),
                    value: set_bits(ct_mark(), u.fwmark),
                }),
            ],
        ));
        // An established connection's later packets: one mark write, not two.
        objs.extend(detour(&keep_chain(&u.name)));
        objs.push(rule(
            &keep_chain(&u.name),
            vec![Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: set_bits(meta(MetaKey::Mark), u.fwmark),
            })],
        ));
        // The indirection failover rewrites: one rule, whatever the number of clients.
        // Failed over, it holds the spread, rendered with the policies'
        // (`render_policies`).
        if u.home.is_none() {
            objs.push(rule(
                &home_chain(&u.name),
                vec![Statement::Goto(JumpTarget {
                    target: Cow::Owned(up_chain(&u.name)),
                })],
            ));
        }
    }

    // A connection that arrives on an uplink (a port forward) is answered through it: its
    // conntrack entry gets the uplink's mark, which the sticky map restores on replies.
    for u in &s.uplinks {
        objs.push(rule(
            &inbound_chain(&u.name),
            vec![
                Statement::Match(Match {
                    left: Expression::Named(NamedExpression::CT(CT {
                        key: Cow::Borrowed("state"),
                        ..CT::default()
                    })),
                    right: Expression::String(Cow::Borrowed("new")),
                    op: Operator::IN,
                }),
                Statement::Mangle(Mangle {
                    key: ct_mark(),
                    value: set_bits(ct_mark(), u.fwmark),
                }),
            ],
        ));
    }

    // Only new connections are classified: one past the sticky lookup without an uplink
    // mark went by the main table (a `main` rule, or open before uplinkd) and stays
    // there; re-marking it mid-flow would send it out of another uplink with its old NAT
    // source when a rule or a set changes.
    objs.push(rule(
        LAN,
        vec![
            Statement::Match(Match {
                left: Expression::Named(NamedExpression::CT(CT {
                    key: Cow::Borrowed("state"),
                    ..CT::default()
                })),
                right: Expression::List(vec![
                    Expression::String(Cow::Borrowed("established")),
                    Expression::String(Cow::Borrowed("related")),
                ]),
                op: Operator::IN,
            }),
            Statement::Accept(None),
        ],
    ));
    for (proto, map) in [("ip", MAP_PIN4), ("ip6", MAP_PIN6)] {
        objs.push(rule(
            LAN,
            vec![Statement::VerdictMap(VerdictMap {
                key: payload(proto),
                data: Expression::String(Cow::Owned(format!("@{map}"))),
            })],
        ));
    }
    // Pins win over rules (the operator's word about one client); then the rules, which
    // end in the default policy.
    objs.push(rule(
        LAN,
        vec![Statement::Goto(JumpTarget {
            target: Cow::Borrowed(RULES),
        })],
    ));
    // One lookup for every masquerading interface (each listed once).
    let mut masquerading: Vec<SetItem> = Vec::new();
    for u in s.uplinks.iter().filter(|u| u.masquerade) {
        let item = SetItem::Element(Expression::String(Cow::Owned(u.interface.clone())));
        if !masquerading.contains(&item) {
            masquerading.push(item);
        }
    }
    if !masquerading.is_empty() {
        objs.push(rule(
            POSTROUTING,
            vec![
                Statement::Match(Match {
                    left: meta(MetaKey::Oifname),
                    right: Expression::Named(NamedExpression::Set(masquerading)),
                    op: Operator::EQ,
                }),
                Statement::Masquerade(None),
            ],
        ));
    }
    let mut out = vec![table];
    // Right after the table: the rules and elements that follow use them.
    out.extend(verdict_maps(&s.table, s.mask));
    out.extend(accounting_counters(s));
    out.extend(client_sets(&s.table, &s.uplinks));
    out.extend(render_sets(&s.table, &s.sets));
    out.extend(routed_sets(&s.table));
    if s.client_usage {
        out.extend(usage_sets(&s.table));
    }
    if !s.silent_dests.is_empty() {
        out.extend(dest_sets(&s.table));
    }
    let (chains, mut rules): (Vec<_>, Vec<_>) = objs
        .iter()
        .map(|o| serde_json::to_value(o).expect("object serializes"))
        .partition(|v| v.get("rule").is_none());
    // A new connection of a placed host behind a LAN router marks it active: right after
    // the guard that established connections stop at.
    let guard = rules
        .iter()
        .position(|r| r["rule"]["chain"] == LAN && r.to_string().contains("established"))
        .expect("the established-connection guard is rendered");
    for (i, r) in routed_rules(s, RoutedStep::Seen).into_iter().enumerate() {
        rules.insert(guard + 1 + i, r);
    }
    // Past the sticky lookup, one lookup of the input interface sorts the packet: the
    // LAN's to be classified, an uplink's to have its new connections marked (answered
    // through it), the rest untouched.
    let by_iface: Vec<Value> = s
        .lan_interfaces
        .iter()
        .map(|i| json!([i, goto(LAN)]))
        .chain(
            s.uplinks
                .iter()
                .enumerate()
                // Uplinks that share an interface: the first one's mark (a key is listed
                // once).
                .filter(|(i, u)| {
                    !s.lan_interfaces.contains(&u.interface)
                        && !s.uplinks[..*i].iter().any(|o| o.interface == u.interface)
                })
                .map(|(_, u)| json!([u.interface, goto(&inbound_chain(&u.name))])),
        )
        .collect();
    rules.extend(sticky_rules(s, PREROUTING));
    rules.push(raw_rule(
        &s.table,
        PREROUTING,
        vec![json!({"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": by_iface}}})],
        None,
    ));
    out.extend(chains);
    if s.client_usage {
        out.extend(
            [USAGE_OUT, USAGE_IN]
                .map(|c| json!({"chain": {"family": "inet", "table": s.table, "name": c}})),
        );
    }
    if !s.silent_dests.is_empty() {
        out.push(json!({"chain": {"family": "inet", "table": s.table, "name": DESTS}}));
    }
    out.extend(rules);
    out.extend(accounting_chain(s));
    out.extend(render_policies(s));
    out
}

/// A connection keeps the uplink it started on while that uplink is open: the first test
/// of every packet, so that an established connection's (nearly every packet) costs a
/// comparison or two and one mark write. The mark is compared with the first
/// `STICKY_COMPARED` uplinks' (no rule for one that is closed: the failover that closed it
/// deletes its connections), then looked up in the `sticky` map, which holds the other
/// open uplinks' (the rule is there only when the config has more). Packets from an uplink
/// get the mark too, which sends none of them elsewhere: the `main` rule before the
/// uplinks' mark rules routes them by the main table's specific routes, as a LAN packet
/// to the LAN.
pub(super) fn sticky_rules(s: &NftStructure, chain: &str) -> Vec<Value> {
    let mark = json!({"&": [{"ct": {"key": "mark"}}, s.mask]});
    let mut out: Vec<Value> = s
        .uplinks
        .iter()
        .take(STICKY_COMPARED)
        .filter(|u| u.open)
        .map(|u| {
            raw_rule(
                &s.table,
                chain,
                vec![
                    matches(mark.clone(), json!(u.fwmark)),
                    goto(&keep_chain(&u.name)),
                ],
                None,
            )
        })
        .collect();
    if s.uplinks.len() > STICKY_COMPARED {
        out.push(raw_rule(
            &s.table,
            chain,
            vec![json!({"vmap": {"key": mark, "data": format!("@{MAP_STICKY}")}})],
            None,
        ));
    }
    out
}

/// The uplinks' interfaces, each once (uplinks may share one), in config order.
pub(super) fn uplink_interfaces(s: &NftStructure) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for u in &s.uplinks {
        if !out.contains(&u.interface.as_str()) {
            out.push(&u.interface);
        }
    }
    out
}

/// Per uplink interface: packets and bytes out (`tx.`), and in: in reply to flows the LAN
/// opened, per family (`reply4.`, `reply6.`: passive health's evidence), and the rest
/// (`rx.`: connections that arrived on the uplink). Bytes in are the three together.
pub(super) const COUNTER_KINDS: [&str; 4] = ["tx", "rx", "reply4", "reply6"];

pub(super) fn accounting_counters(s: &NftStructure) -> Vec<Value> {
    uplink_interfaces(s)
        .into_iter()
        .flat_map(|i| COUNTER_KINDS.map(|k| format!("{k}.{i}")))
        .map(|name| json!({"counter": {"family": "inet", "table": s.table, "name": name}}))
        .collect()
}

/// The accounting chain. A reply (to a connection the LAN opened: a download's packets)
/// is counted in by one counter-map lookup of its input interface's index, in its
/// family's rule, and stops there, after comparisons of the connection's direction and
/// the family. Any other packet out of an uplink's interface is counted out by one
/// comparison of the output interface's index per uplink interface (nearly always one or
/// two: cheaper than a lookup) and stops there; one that arrived on an uplink in its
/// connection's original direction (a port forward, unsolicited) is counted in by its
/// input interface's index. Indexes, not names: a 4-byte load and key (copying a 16-byte
/// name was a fifth of the chain's cost); an interface that does not exist has no element
/// or rule (it has no packets either), and one that comes back under a new index rewrites
/// this chain (a link event replans). Replies to the LAN are all counted in: no uplink is
/// on a LAN interface (config refuses it); a packet from one uplink out of another counts
/// on one side only, in if it is a reply and out if not. Neither unsolicited packets nor
/// port-forwarded connections count as replies, and one family's traffic says nothing
/// about the other's path. A packet without a connection (`notrack`, invalid) is not
/// counted in. The opt-in per-client and per-destination rules come before these
/// (`accounting_chain`).
pub(super) fn accounting_rules(s: &NftStructure) -> Vec<Value> {
    let ifaces = uplink_interfaces(s);
    let meta = |key: &str| json!({"meta": {"key": key}});
    let direction = |dir: &str| matches(json!({"ct": {"key": "direction"}}), json!(dir));
    // Uplinks that share an interface share its index. An index is listed once (a key
    // twice is refused): two interfaces with one are a model behind the kernel, which
    // the next event or resync repairs.
    let mut present: Vec<(&str, u32)> = Vec::new();
    for i in &ifaces {
        let index = s
            .uplinks
            .iter()
            .find(|u| u.interface == *i)
            .and_then(|u| u.ifindex);
        if let Some(x) = index.filter(|x| !present.iter().any(|(_, p)| p == x)) {
            present.push((i, x));
        }
    }
    if present.is_empty() {
        return Vec::new();
    }
    // A named-counter lookup keyed by the input interface's index alone (4 bytes).
    let by_iif = |kind: &str| {
        let elems: Vec<Value> = present
            .iter()
            .map(|(i, x)| json!([x, format!("{kind}.{i}")]))
            .collect();
        json!({"counter": {"map": {"key": meta("iif"), "data": {"set": elems}}}})
    };
    let family = |f: &str| matches(meta("nfproto"), json!(f));
    let accept = || json!({"accept": null});
    let mut out = vec![
        raw_rule(
            &s.table,
            ACCOUNTING,
            vec![
                direction("reply"),
                family("ipv4"),
                by_iif("reply4"),
                accept(),
            ],
            None,
        ),
        // The family first: a packet out (IPv4, mostly) pays one more comparison, not
        // another connection lookup.
        raw_rule(
            &s.table,
            ACCOUNTING,
            vec![
                family("ipv6"),
                direction("reply"),
                by_iif("reply6"),
                accept(),
            ],
            None,
        ),
    ];
    out.extend(present.iter().map(|(i, x)| {
        raw_rule(
            &s.table,
            ACCOUNTING,
            vec![
                matches(meta("oif"), json!(x)),
                json!({"counter": format!("tx.{i}")}),
                accept(),
            ],
            None,
        )
    }));
    out.push(raw_rule(
        &s.table,
        ACCOUNTING,
        vec![direction("original"), by_iif("rx")],
        None,
    ));
    out
}

/// The accounting chain's rules and those of the chains it jumps to: the opt-in ones
/// first, since an uplink's outbound packets stop at their counter.
pub(super) fn accounting_chain(s: &NftStructure) -> Vec<Value> {
    let mut out = Vec::new();
    if s.client_usage {
        out.extend(usage_rules(s));
    }
    if !s.silent_dests.is_empty() {
        out.extend(dest_rules(s));
    }
    out.extend(accounting_rules(s));
    out
}

/// Per client address and uplink interface (its index), the bytes out (`usage_out4/6`:
/// LAN → uplink, by source) and in (`usage_in4/6`: uplink → LAN, by destination), each
/// element with its own counter, added by the packet path (`lan.client_usage`).
pub(crate) const USAGE_SETS: [(&str, bool, bool); 4] = [
    ("usage_out4", false, true),
    ("usage_out6", true, true),
    ("usage_in4", false, false),
    ("usage_in6", true, false),
];
/// Elements each usage set holds at most: beyond, a new client is not counted until an
/// idle one expires.
pub(super) const USAGE_SET_SIZE: u32 = 262_144;
/// An element idle this long goes (its bytes were read long before).
pub(super) const USAGE_IDLE_SECS: u64 = 600;
const USAGE_OUT: &str = "usage_out";
const USAGE_IN: &str = "usage_in";

pub(super) fn usage_sets(table: &str) -> Vec<Value> {
    USAGE_SETS
        .iter()
        .map(|(name, v6, _)| {
            let mut set = addr_iface_set(table, name, *v6, USAGE_IDLE_SECS, USAGE_SET_SIZE);
            set["set"]["stmt"] = json!([{"counter": null}]);
            set
        })
        .collect()
}

/// A set of address (of the family) . interface index elements that time out, filled by
/// the packet path (`update_addr_iface`).
fn addr_iface_set(table: &str, name: &str, v6: bool, timeout_secs: u64, size: u32) -> Value {
    let addr = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    json!({"set": {"family": "inet", "table": table, "name": name,
        "type": [addr, "iface_index"], "flags": ["timeout"],
        "timeout": timeout_secs, "size": size}})
}

/// In `chain`: a packet of the set's family refreshes (or adds) its element of `set`, the
/// packet's `addr` (`saddr`, `daddr`) and interface (`iif`, `oif`).
fn update_addr_iface(
    table: &str,
    chain: &str,
    set: &str,
    v6: bool,
    addr: &str,
    iface: &str,
) -> Value {
    let (ip, nfproto) = if v6 { ("ip6", "ipv6") } else { ("ip", "ipv4") };
    raw_rule(
        table,
        chain,
        vec![
            matches(json!({"meta": {"key": "nfproto"}}), json!(nfproto)),
            json!({"set": {"op": "update", "elem": {"concat": [payload(ip, addr), {"meta": {"key": iface}}]}, "set": format!("@{set}")}}),
        ],
        None,
    )
}

/// Per destination address and output interface, when a LAN packet last left for it
/// (`dests4`, `dests6`; the element's expiry tells), on the interfaces of uplinks without
/// probes: passive health counts the destinations that went unanswered.
pub(crate) const DEST_SETS: [(&str, bool); 2] = [("dests4", false), ("dests6", true)];
/// A destination is forgotten this long after its last packet.
pub(crate) const DEST_TIMEOUT_MS: u64 = 2_000;
const DEST_SET_SIZE: u32 = 65_536;
const DESTS: &str = "dests";

pub(super) fn dest_sets(table: &str) -> Vec<Value> {
    DEST_SETS
        .iter()
        .map(|(name, v6)| addr_iface_set(table, name, *v6, DEST_TIMEOUT_MS / 1000, DEST_SET_SIZE))
        .collect()
}

/// In the accounting chain: one lookup of the packet's interface (`key`: `iifname`,
/// `oifname`) that jumps where `by_iface` says.
fn accounting_vmap(table: &str, key: &str, by_iface: Vec<Value>) -> Value {
    raw_rule(
        table,
        ACCOUNTING,
        vec![json!({"vmap": {"key": {"meta": {"key": key}}, "data": {"set": by_iface}}})],
        None,
    )
}

/// Packets out of those interfaces refresh their destination: one lookup of the output
/// interface for every forwarded packet, and a set update for theirs.
pub(super) fn dest_rules(s: &NftStructure) -> Vec<Value> {
    let by_iface: Vec<Value> = s
        .silent_dests
        .iter()
        .map(|i| json!([i, {"jump": {"target": DESTS}}]))
        .collect();
    let mut out = vec![accounting_vmap(&s.table, "oifname", by_iface)];
    for (name, v6) in DEST_SETS {
        out.push(update_addr_iface(&s.table, DESTS, name, v6, "daddr", "oif"));
    }
    out
}

/// One lookup of the input interface sends a LAN packet to `usage_out` and an uplink's to
/// `usage_in`, where the family picks the set to update: two more lookups per forwarded
/// packet.
pub(super) fn usage_rules(s: &NftStructure) -> Vec<Value> {
    let by_iface: Vec<Value> = s
        .lan_interfaces
        .iter()
        .map(|i| json!([i, {"jump": {"target": USAGE_OUT}}]))
        .chain(
            uplink_interfaces(s)
                .into_iter()
                .filter(|i| !s.lan_interfaces.iter().any(|l| l == i))
                .map(|i| json!([i, {"jump": {"target": USAGE_IN}}])),
        )
        .collect();
    let mut out = vec![accounting_vmap(&s.table, "iifname", by_iface)];
    for (name, v6, outbound) in USAGE_SETS {
        let (chain, addr, iface) = if outbound {
            (USAGE_OUT, "saddr", "oif")
        } else {
            (USAGE_IN, "daddr", "iif")
        };
        out.push(update_addr_iface(&s.table, chain, name, v6, addr, iface));
    }
    out
}

/// A rule object with its hash comment, followed by `tag` (a `[[rule]]`'s name, for its
/// counters).
pub(super) fn raw_rule(table: &str, chain: &str, expr: Vec<Value>, tag: Option<&str>) -> Value {
    let body = Value::Array(expr);
    let mut comment = format!(
        "{COMMENT_PREFIX}{:016x}",
        fnv1a(body.to_string().as_bytes())
    );
    if let Some(t) = tag {
        comment.push_str(t);
    }
    json!({"rule": {"family": "inet", "table": table, "chain": chain, "expr": body, "comment": comment}})
}

/// Hosts behind LAN routers logged lately (no second log before this passes) and placed
/// ones active lately, per family. No `[[set]]` renders to these names (theirs end in
/// `_v4`/`_v6`).
pub(super) const ROUTED_NEW: [&str; 2] = ["routed_new4", "routed_new6"];
pub(super) const ROUTED_SEEN: [&str; 2] = ["routed_seen4", "routed_seen6"];
/// How long a logged, still unplaced host waits before its next packet is logged again.
pub(super) const ROUTED_RELOG_SECS: u64 = 2;
/// Hosts each dynamic set holds at most (the kernel refuses more; they are logged again).
pub(super) const ROUTED_SET_SIZE: u32 = 65_536;

/// The dynamic sets of hosts behind LAN routers (fixed, whatever the prefixes).
pub(super) fn routed_sets(table: &str) -> Vec<Value> {
    [ROUTED_NEW, ROUTED_SEEN]
        .into_iter()
        .flat_map(|names| {
            names
                .into_iter()
                .zip(["ipv4_addr", "ipv6_addr"])
                .map(|(name, t)| {
                    json!({"set": {"family": "inet", "table": table, "name": name, "type": t,
                    "flags": ["timeout"], "size": ROUTED_SET_SIZE}})
                })
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum RoutedStep {
    /// Log an unplaced host (once per `ROUTED_RELOG_SECS`).
    New,
    /// Mark a host's new connection (its activity, for idle expiry).
    Seen,
}

/// One rule per family with routed prefixes; none without.
pub(super) fn routed_rules(s: &NftStructure, step: RoutedStep) -> Vec<Value> {
    let mut out = Vec::new();
    for (i, (ip, v6)) in [("ip", false), ("ip6", true)].into_iter().enumerate() {
        let nets: Vec<Value> = s
            .routed
            .iter()
            .filter(|n| n.addr().is_ipv6() == v6)
            .map(|n| prefix(*n))
            .collect();
        if nets.is_empty() {
            continue;
        }
        let src = payload(ip, "saddr");
        let mut expr = vec![matches(src.clone(), json!({"set": nets}))];
        let elem = |set: &str, op: &str, timeout: u64| json!({"set": {"op": op, "elem": {"elem": {"val": src.clone(), "timeout": timeout}}, "set": format!("@{set}")}});
        match step {
            RoutedStep::New => {
                expr.push(json!({"match": {"op": "!=", "left": src.clone(), "right": format!("@{}", ROUTED_NEW[i])}}));
                expr.push(elem(ROUTED_NEW[i], "add", ROUTED_RELOG_SECS));
                expr.push(json!({"log": {"group": s.nflog_group, "snaplen": 40}}));
            }
            RoutedStep::Seen => {
                expr.push(elem(
                    ROUTED_SEEN[i],
                    "update",
                    s.routed_idle.as_secs().max(1),
                ));
            }
        }
        let chain = match step {
            RoutedStep::New => policy_chain(DEFAULT_POLICY),
            RoutedStep::Seen => LAN.to_string(),
        };
        out.push(raw_rule(&s.table, &chain, expr, None));
    }
    out
}

/// Where a packet that arrived on the uplink goes: its new connection is marked.
pub(super) fn inbound_chain(uplink: &str) -> String {
    format!("in_{uplink}")
}

pub(super) fn set_name(set: &str, v6: bool) -> String {
    format!("{set}_{}", if v6 { "v6" } else { "v4" })
}

/// Per uplink and family, the plain set of the client addresses homed on it.
pub(super) fn client_sets(table: &str, uplinks: &[crate::plan::NftUplink]) -> Vec<Value> {
    uplinks
        .iter()
        .flat_map(|u| [false, true].map(|v6| (u, v6)))
        .map(|(u, v6)| {
            json!({"set": {
                "family": "inet",
                "table": table,
                "name": client_set(&u.name, v6),
                "type": if v6 { "ipv6_addr" } else { "ipv4_addr" },
            }})
        })
        .collect()
}

/// Two nft sets per `[[set]]`, one per family.
pub(super) fn render_sets(table: &str, sets: &[SetConfig]) -> Vec<Value> {
    let mut out = Vec::new();
    for set in sets {
        for v6 in [false, true] {
            let elems: Vec<Value> = if v6 {
                set.v6.iter().map(|n| prefix(IpNet::V6(*n))).collect()
            } else {
                set.v4.iter().map(|n| prefix(IpNet::V4(*n))).collect()
            };
            let mut obj = json!({
                "family": "inet",
                "table": table,
                "name": set_name(&set.name, v6),
                "type": if v6 { "ipv6_addr" } else { "ipv4_addr" },
            });
            // An external set is plain (no interval flag): what dnsmasq's --nftset adds,
            // address by address.
            if !set.external {
                obj["flags"] = json!(["interval"]);
                if !elems.is_empty() {
                    obj["elem"] = Value::Array(elems);
                }
            }
            out.push(json!({ "set": obj }));
        }
    }
    out
}

pub(super) fn prefix(n: IpNet) -> Value {
    if n.prefix_len() == n.max_prefix_len() {
        json!(n.addr().to_string())
    } else {
        json!({"prefix": {"addr": n.addr().to_string(), "len": n.prefix_len()}})
    }
}

pub(super) fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

pub(super) fn matches(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

pub(super) fn goto(chain: &str) -> Value {
    json!({"goto": {"target": chain}})
}

/// What a `[[rule]]` matches on, when it is one kind of literal: consecutive rules of one
/// shape become one verdict-map lookup instead of one nft rule each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    Linear,
    Dst,
    Src,
    Ports { sport: bool },
    Dscp,
    Iif,
}

pub(super) fn shape(r: &crate::config::RuleConfig) -> Shape {
    use crate::config::Proto;
    let literal = |l: &[AddrMatch]| l.iter().all(|a| matches!(a, AddrMatch::Net(_)));
    let plain = r.proto == Proto::Any && r.sport.is_empty() && r.dport.is_empty();
    let rest_empty = r.dscp.is_empty() && r.iif.is_empty();
    match (r.src.is_empty(), r.dst.is_empty(), plain, rest_empty) {
        (true, false, true, true) if literal(&r.dst) => Shape::Dst,
        (false, true, true, true) if literal(&r.src) => Shape::Src,
        (true, true, false, true)
            if matches!(r.proto, Proto::Any | Proto::Tcp | Proto::Udp)
                && (r.sport.is_empty() != r.dport.is_empty()) =>
        {
            Shape::Ports {
                sport: !r.sport.is_empty(),
            }
        }
        (true, true, true, false) if r.iif.is_empty() => Shape::Dscp,
        (true, true, true, false) if r.dscp.is_empty() => Shape::Iif,
        _ => Shape::Linear,
    }
}

/// One map key of a shaped rule.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Key {
    Net(IpNet),
    Port {
        proto: &'static str,
        lo: u16,
        hi: u16,
    },
    Dscp(u8),
    Iif(String),
}

impl Key {
    /// Whether one packet could match both (nft refuses overlapping map keys, and the
    /// first rule must win).
    fn overlaps(&self, o: &Key) -> bool {
        match (self, o) {
            (Key::Net(a), Key::Net(b)) => a.contains(&b.network()) || b.contains(&a.network()),
            (
                Key::Port { proto, lo, hi },
                Key::Port {
                    proto: p2,
                    lo: l2,
                    hi: h2,
                },
            ) => proto == p2 && lo <= h2 && l2 <= hi,
            (a, b) => a == b,
        }
    }

    fn value(&self) -> Value {
        match self {
            Key::Net(n) => prefix(*n),
            Key::Port { proto, lo, hi } if lo == hi => json!({"concat": [proto, lo]}),
            Key::Port { proto, lo, hi } => json!({"concat": [proto, {"range": [lo, hi]}]}),
            Key::Dscp(d) => json!(d),
            Key::Iif(i) => json!(i),
        }
    }
}

pub(super) fn keys(r: &crate::config::RuleConfig, shape: Shape) -> Vec<Key> {
    use crate::config::Proto;
    let nets = |l: &[AddrMatch]| {
        l.iter()
            .filter_map(|a| match a {
                AddrMatch::Net(n) => Some(Key::Net(*n)),
                AddrMatch::Set(_) => None,
            })
            .collect()
    };
    match shape {
        Shape::Dst => nets(&r.dst),
        Shape::Src => nets(&r.src),
        Shape::Ports { sport } => {
            let protos: &[&'static str] = match r.proto {
                Proto::Tcp => &["tcp"],
                Proto::Udp => &["udp"],
                _ => &["tcp", "udp"],
            };
            let ports = if sport { &r.sport } else { &r.dport };
            protos
                .iter()
                .flat_map(|p| ports.iter().map(|&(lo, hi)| Key::Port { proto: p, lo, hi }))
                .collect()
        }
        Shape::Dscp => r.dscp.iter().map(|d| Key::Dscp(*d)).collect(),
        Shape::Iif => r.iif.iter().map(|i| Key::Iif(i.clone())).collect(),
        Shape::Linear => Vec::new(),
    }
}

pub fn rule_chain(rule: &str) -> String {
    format!("rule_{rule}")
}

/// The rules chain, each `[[rule]]`'s own chain (its counter and verdict), the policy
/// chains and the default policy's chain. Consecutive rules of one shape (destination
/// CIDRs only, source CIDRs only, ports only, DSCP only, LAN interfaces only) become one
/// verdict-map lookup, as long as no packet could match two of them; any other rule is
/// one nft rule per family it can match (and per combination of address alternatives).
pub(super) fn render_policies(s: &NftStructure) -> Vec<Value> {
    let table = s.table.as_str();
    let mut out = Vec::new();
    let target = |t: Target| match t {
        Target::Main => json!({"accept": null}),
        Target::Default => goto(&policy_chain(DEFAULT_POLICY)),
        Target::Policy(p) => goto(&policy_chain(&s.policies[p].name)),
    };
    let mut i = 0;
    let rules = &s.rules;
    while i < rules.len() {
        let sh = shape(&rules[i]);
        if sh == Shape::Linear {
            out.extend(linear_rule(s, &rules[i]));
            i += 1;
            continue;
        }
        // The run of rules of this shape whose keys no earlier one in the run overlaps.
        let mut group: Vec<(Key, &str)> = Vec::new();
        while i < rules.len() && shape(&rules[i]) == sh {
            let k = keys(&rules[i], sh);
            if k.iter().any(|k| group.iter().any(|(g, _)| g.overlaps(k))) {
                break;
            }
            group.extend(k.into_iter().map(|k| (k, rules[i].name.as_str())));
            i += 1;
        }
        let vmap = |key: Value, elems: Vec<&(Key, &str)>| {
            let items: Vec<Value> = elems
                .iter()
                .map(|(k, name)| json!([k.value(), goto(&rule_chain(name))]))
                .collect();
            vec![json!({"vmap": {"key": key, "data": {"set": items}}})]
        };
        let by_family = |v6: bool| {
            group
                .iter()
                .filter(|(k, _)| matches!(k, Key::Net(n) if n.addr().is_ipv6() == v6))
                .collect::<Vec<_>>()
        };
        let mut lookups: Vec<Vec<Value>> = Vec::new();
        match sh {
            Shape::Dst | Shape::Src => {
                let field = if sh == Shape::Dst { "daddr" } else { "saddr" };
                for (v6, ip) in [(false, "ip"), (true, "ip6")] {
                    let elems = by_family(v6);
                    if !elems.is_empty() {
                        lookups.push(vmap(payload(ip, field), elems));
                    }
                }
            }
            Shape::Ports { sport } => {
                let field = if sport { "sport" } else { "dport" };
                lookups.push(vmap(
                    json!({"concat": [{"meta": {"key": "l4proto"}}, payload("th", field)]}),
                    group.iter().collect(),
                ));
            }
            Shape::Dscp => {
                for ip in ["ip", "ip6"] {
                    lookups.push(vmap(payload(ip, "dscp"), group.iter().collect()));
                }
            }
            Shape::Iif => {
                lookups.push(vmap(
                    json!({"meta": {"key": "iifname"}}),
                    group.iter().collect(),
                ));
            }
            Shape::Linear => unreachable!("handled above"),
        }
        for l in lookups {
            out.push(raw_rule(table, RULES, l, None));
        }
    }
    for r in rules.iter() {
        out.push(raw_rule(
            table,
            &rule_chain(&r.name),
            vec![json!({"counter": null}), target(r.target)],
            Some(&format!("{RULE_TAG}{}", r.name)),
        ));
    }
    // The last rule's signature also covers the elements of uplinkd's own sets: a change
    // of elements rewrites the rules chain, and with it those sets.
    let own: Vec<&SetConfig> = s.sets.iter().filter(|x| !x.external).collect();
    let digest = format!(" sets:{:016x}", fnv1a(format!("{own:?}").as_bytes()));
    out.push(raw_rule(
        table,
        RULES,
        vec![goto(&policy_chain(DEFAULT_POLICY))],
        (!own.is_empty()).then_some(digest.as_str()),
    ));
    for p in &s.policies {
        if let Some(id) = p.ct_mark {
            // Only the policy bits change; the uplink bits are set by `up_`.
            let ct = json!({"ct": {"key": "mark"}});
            let value = json!({"|": [{"&": [ct, !s.policy_mask]}, id]});
            out.push(raw_rule(
                table,
                &policy_chain(&p.name),
                vec![json!({"mangle": {"key": ct, "value": value}})],
                None,
            ));
        }
        for e in verdict_rules(&p.verdict, &s.uplinks) {
            out.push(raw_rule(table, &policy_chain(&p.name), e, None));
        }
    }
    let mut default = verdict_rules(&s.default, &s.uplinks);
    if s.default == Verdict::Clients {
        // Before the unassigned verdict: an untracked address of a client at its address
        // cap is hashed over the survivors; an unplaced host behind a LAN router says so.
        let at = default.len() - 1;
        if !s.capped.is_empty() {
            let macs: Vec<Value> = s.capped.iter().map(|m| json!(m.to_string())).collect();
            default.insert(
                at,
                vec![
                    matches(payload("ether", "saddr"), json!({"set": macs})),
                    json!({"counter": null}),
                    goto(OVERFLOW),
                ],
            );
        }
        let at = default.len() - 1;
        for (i, r) in routed_rules(s, RoutedStep::New).into_iter().enumerate() {
            default.insert(
                at + i,
                r["rule"]["expr"].as_array().cloned().unwrap_or_default(),
            );
        }
    }
    for e in default {
        out.push(raw_rule(table, &policy_chain(DEFAULT_POLICY), e, None));
    }
    if let Some(local) = &s.local {
        out.extend(render_local(s, local));
    }
    // A failed-over uplink's new connections are marked as placed by the failover, unless
    // a policy with an SLA has named them already: its failback deletes them
    // (`failback_flows = "move"`, or those on a metered uplink).
    let ct = json!({"ct": {"key": "mark"}});
    for u in &s.uplinks {
        if let (Some(_), Some(away)) = (&u.home, u.away_mark) {
            out.push(raw_rule(
                table,
                &home_chain(&u.name),
                vec![
                    matches(json!({"&": [ct, s.policy_mask]}), json!(0)),
                    json!({"mangle": {"key": ct, "value": {"|": [ct, away]}}}),
                ],
                None,
            ));
        }
    }
    // A failed-over uplink's clients, and addresses uplinkd does not track, are hashed
    // by source address, as a client-mode policy is.
    let homes = s
        .uplinks
        .iter()
        .filter_map(|u| Some((home_chain(&u.name), u.home.clone()?)));
    for (chain, buckets) in homes.chain([(OVERFLOW.to_string(), s.overflow.clone())]) {
        let spread = if buckets.is_empty() {
            Verdict::Drop
        } else {
            Verdict::Spread {
                key: SpreadKey::Source,
                buckets,
            }
        };
        for e in verdict_rules(&spread, &[]) {
            out.push(raw_rule(table, &chain, e, None));
        }
    }
    out
}

/// The output chain: the gateway's own new connections that the first route lookup sent
/// to an uplink get the `[local]` policy's mark, and keep it as the LAN's do. Marked
/// packets (the agent's probes, bound to their uplink with SO_MARK, and anything an
/// operator marked) and traffic to the LAN or loopback are left alone.
pub(super) fn render_local(s: &NftStructure, local: &crate::plan::LocalVerdict) -> Vec<Value> {
    let table = s.table.as_str();
    let ct = |key: &str| json!({"ct": {"key": key}});
    let masked = |left: Value| json!({"&": [left, s.mask]});
    let uplinks: Vec<Value> = s.uplinks.iter().map(|u| json!(u.interface)).collect();
    // A socket bound to an uplink's address (a VPN endpoint, a SIP trunk, `curl
    // --interface ADDR`) was routed by its `from` rule: it keeps that uplink.
    let bound = [("ip", false), ("ip6", true)].map(|(ip, v6)| {
        let addrs: Vec<Value> = s
            .local_bound
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| json!(a.to_string()))
            .collect();
        (!addrs.is_empty()).then(|| {
            raw_rule(
                table,
                OUTPUT,
                vec![
                    matches(payload(ip, "saddr"), json!({"set": addrs})),
                    json!({"return": null}),
                ],
                None,
            )
        })
    });
    let mut out = vec![
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "!=", "left": masked(json!({"meta": {"key": "mark"}})), "right": 0}}),
                json!({"return": null}),
            ],
            None,
        ),
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": {"set": uplinks}}}),
                json!({"return": null}),
            ],
            None,
        ),
    ];
    out.extend(sticky_rules(s, OUTPUT));
    out.extend(bound.into_iter().flatten());
    out.extend([
        // A connection that was open before (no mark) keeps its route: re-marking it
        // mid-flow would change its source address.
        raw_rule(
            table,
            OUTPUT,
            vec![
                json!({"match": {"op": "in", "left": ct("state"), "right": "new"}}),
                goto(&match local {
                    crate::plan::LocalVerdict::Policy(p) => policy_chain(p),
                    crate::plan::LocalVerdict::Spread(_) => LOCAL.to_string(),
                }),
            ],
            None,
        ),
    ]);
    if let crate::plan::LocalVerdict::Spread(v) = local {
        for e in verdict_rules(v, &s.uplinks) {
            out.push(raw_rule(table, LOCAL, e, None));
        }
    }
    out
}

pub(super) fn unassigned_rule(table: &str, target: &str) -> Value {
    raw_rule(
        table,
        UNASSIGNED,
        vec![goto(target)],
        Some(&format!("{TARGET_TAG}{target}")),
    )
}

/// A rule nft cannot look up in a map: one nft rule per family it can match (and per
/// combination of address alternatives), each `goto rule_<name>`.
pub(super) fn linear_rule(s: &NftStructure, r: &crate::config::RuleConfig) -> Vec<Value> {
    let mut out = Vec::new();
    for v6 in [false, true] {
        if !(if v6 { r.v6 } else { r.v4 }) {
            continue;
        }
        let ip = if v6 { "ip6" } else { "ip" };
        // One alternative per address list: the literal prefixes as one anonymous set,
        // and each named set on its own (nft cannot OR a set reference with literals).
        let alternatives = |list: &[AddrMatch]| -> Vec<Option<Value>> {
            if list.is_empty() {
                return vec![None];
            }
            let nets: Vec<Value> = list
                .iter()
                .filter_map(|a| match a {
                    AddrMatch::Net(n) if n.addr().is_ipv6() == v6 => Some(prefix(*n)),
                    _ => None,
                })
                .collect();
            let mut alts = Vec::new();
            if !nets.is_empty() {
                alts.push(Some(json!({"set": nets})));
            }
            for a in list {
                if let AddrMatch::Set(i) = a {
                    alts.push(Some(json!(format!("@{}", set_name(&s.sets[*i].name, v6)))));
                }
            }
            alts
        };
        for src in alternatives(&r.src) {
            for dst in alternatives(&r.dst) {
                let mut expr = vec![matches(
                    json!({"meta": {"key": "nfproto"}}),
                    json!(if v6 { "ipv6" } else { "ipv4" }),
                )];
                if !r.iif.is_empty() {
                    expr.push(matches(
                        json!({"meta": {"key": "iifname"}}),
                        json!({"set": r.iif}),
                    ));
                }
                if let Some(src) = &src {
                    expr.push(matches(payload(ip, "saddr"), src.clone()));
                }
                if let Some(dst) = &dst {
                    expr.push(matches(payload(ip, "daddr"), dst.clone()));
                }
                match r.proto.number() {
                    Some(n) => expr.push(matches(json!({"meta": {"key": "l4proto"}}), json!(n))),
                    None if !r.sport.is_empty() || !r.dport.is_empty() => expr.push(matches(
                        json!({"meta": {"key": "l4proto"}}),
                        json!({"set": [6, 17]}),
                    )),
                    None => {}
                }
                for (field, ports) in [("sport", &r.sport), ("dport", &r.dport)] {
                    if ports.is_empty() {
                        continue;
                    }
                    let items: Vec<Value> = ports
                        .iter()
                        .map(|&(a, b)| {
                            if a == b {
                                json!(a)
                            } else {
                                json!({"range": [a, b]})
                            }
                        })
                        .collect();
                    expr.push(matches(payload("th", field), json!({"set": items})));
                }
                if !r.dscp.is_empty() {
                    expr.push(matches(payload(ip, "dscp"), json!({"set": r.dscp})));
                }
                expr.push(goto(&rule_chain(&r.name)));
                out.push(raw_rule(&s.table, RULES, expr, None));
            }
        }
    }
    out
}

/// A policy chain's rules; `uplinks` names the client sets a client-mode verdict looks
/// in (a client is in one of them).
pub(super) fn verdict_rules(v: &Verdict, uplinks: &[crate::plan::NftUplink]) -> Vec<Vec<Value>> {
    match v {
        Verdict::Uplink(u) => vec![vec![goto(&up_chain(u))]],
        Verdict::Default => vec![vec![goto(&policy_chain(DEFAULT_POLICY))]],
        Verdict::Drop => vec![vec![json!({"counter": null}), json!({"drop": null})]],
        Verdict::Clients => [("ip", false), ("ip6", true)]
            .into_iter()
            .flat_map(|(ip, v6)| {
                uplinks.iter().map(move |u| {
                    vec![
                        matches(
                            payload(ip, "saddr"),
                            json!(format!("@{}", client_set(&u.name, v6))),
                        ),
                        goto(&home_chain(&u.name)),
                    ]
                })
            })
            .chain([vec![goto(UNASSIGNED)]])
            .collect(),
        Verdict::Spread { key, buckets } => {
            let map = json!({"set": buckets
                .iter()
                .enumerate()
                .map(|(i, b)| json!([i, goto(&up_chain(b))]))
                .collect::<Vec<_>>()});
            let n = buckets.len();
            match key {
                SpreadKey::Random => vec![vec![json!({"vmap": {
                    "key": {"numgen": {"mode": "random", "mod": n, "offset": 0}},
                    "data": map,
                }})]],
                SpreadKey::Source | SpreadKey::Destination => [("ip", "ipv4"), ("ip6", "ipv6")]
                    .into_iter()
                    .map(|(ip, nfproto)| {
                        let expr = if *key == SpreadKey::Source {
                            payload(ip, "saddr")
                        } else {
                            json!({"concat": [payload(ip, "saddr"), payload(ip, "daddr")]})
                        };
                        vec![
                            matches(json!({"meta": {"key": "nfproto"}}), json!(nfproto)),
                            json!({"vmap": {
                                "key": {"jhash": {"mod": n, "seed": FALLBACK_SEED, "offset": 0, "expr": expr}},
                                "data": map.clone(),
                            }}),
                        ]
                    })
                    .collect(),
            }
        }
    }
}

/// Verdict maps, which the `nftables` crate's schema cannot express (its set types have no
/// `verdict`), as raw JSON; `render_structure` puts them right after the table.
pub(super) fn verdict_maps(table: &str, mask: u32) -> Vec<serde_json::Value> {
    // Every packet of an established connection looks its mark up in `sticky`. Declared
    // with a size (at most one element per mark id), a 4-byte key gets the kernel's fixed
    // hash with its one-word hash instead of the resizable one: a third of that lookup's
    // cost.
    let sticky_size = mask >> mask.trailing_zeros();
    [
        (MAP_STICKY, "mark", Some(sticky_size)),
        (MAP_PIN4, "ipv4_addr", None),
        (MAP_PIN6, "ipv6_addr", None),
    ]
    .into_iter()
    .map(|(name, key, size)| {
        let mut map =
            json!({"family": "inet", "table": table, "name": name, "type": key, "map": "verdict"});
        if let Some(size) = size {
            map["size"] = json!(size);
        }
        json!({ "map": map })
    })
    .collect()
}

/// The signature of uplinkd's own objects, read through the same parser as the kernel's
/// listing so that both sides are compared alike.
pub(super) fn signature_of(objs: &[Value]) -> Signature {
    let json: Vec<String> = objs.iter().map(|o| o.to_string()).collect();
    let items: Vec<ListItem> = json
        .iter()
        .map(|j| serde_json::from_str(j).expect("own objects parse back"))
        .collect();
    signature_of_items(items.iter())
}

pub(super) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
