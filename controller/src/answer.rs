//! A gateway's answer, typed by the request that got it. Tables are rendered from these
//! types (so a field's meaning, not the shape of its JSON, picks the layout); JSON and YAML
//! serialize them as they are, with machine values (Unix milliseconds, marks as numbers).

use serde_json::Value;
use uplink_api::names;
use uplink_api::v1;

use crate::when;

/// JSON and YAML are the wrapped type itself (untagged).
#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum Answer {
    Status(v1::AgentStatus),
    Uplinks(Vec<v1::Uplink>),
    /// The uplink a write (drain, undrain, failback) changed: shown as `uplinks` shows it.
    Uplink(Box<v1::Uplink>),
    Clients(Vec<v1::Client>),
    Pinned(v1::Override),
    Unpinned {
        unpinned: String,
    },
    Events(Vec<v1::Event>),
    Policies(Vec<v1::Policy>),
    Rules(Vec<v1::Rule>),
    Explanation(v1::Explanation),
    Sets(Vec<v1::Set>),
    /// The set a write (set add, set del) changed: shown as `sets` shows it.
    Set(v1::Set),
    Reloaded(v1::ReloadConfigResponse),
    Top(v1::ListTopTalkersResponse),
}

impl Answer {
    /// The answer to a write on one uplink.
    pub fn uplink(u: v1::Uplink) -> Answer {
        Answer::Uplink(Box::new(u))
    }

    /// The machine form, for JSON and YAML.
    pub fn json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// The human form: an aligned table, or one confirmation line for a write that has no
    /// read view. `now` is Unix milliseconds, for "in 29s" and "3m ago".
    pub fn table(&self, wide: bool, now: u64) -> String {
        match self {
            Answer::Status(s) => status(s),
            Answer::Uplinks(u) => uplinks(u, wide),
            Answer::Uplink(u) => uplinks(std::slice::from_ref(&**u), wide),
            Answer::Clients(c) => clients(c, wide, now),
            Answer::Top(t) => render(
                &[
                    "ADDRESS",
                    "MAC",
                    "UPLINK",
                    &format!("BYTES_{}S", t.window_seconds),
                ],
                t.talkers
                    .iter()
                    .map(|t| {
                        vec![
                            t.address.clone(),
                            or_dash(&t.mac),
                            t.uplink.clone(),
                            bytes(t.bytes),
                        ]
                    })
                    .collect(),
            ),
            Answer::Pinned(o) => {
                let until = if o.expires_at_ms == 0 {
                    "until unpinned".to_string()
                } else {
                    format!(
                        "until {} ({})",
                        when::local(o.expires_at_ms),
                        when::relative(o.expires_at_ms, now)
                    )
                };
                format!("pinned {} to {} {until}\n", o.client, o.uplink)
            }
            Answer::Unpinned { unpinned } => format!("unpinned {unpinned}\n"),
            Answer::Events(e) => events(e, wide, now),
            Answer::Policies(p) => policies(p, wide),
            Answer::Rules(r) => render(
                &["RULE", "POLICY", "PACKETS", "BYTES", "MATCH"],
                r.iter()
                    .map(|r| {
                        vec![
                            r.name.clone(),
                            r.policy.clone(),
                            r.packets.to_string(),
                            r.bytes.to_string(),
                            or_dash(&r.r#match),
                        ]
                    })
                    .collect(),
            ),
            Answer::Explanation(x) => {
                let mut out = format!("{}\n", x.summary);
                if wide {
                    for step in &x.steps {
                        out += &format!("  {step}\n");
                    }
                }
                out
            }
            Answer::Sets(s) => sets(s),
            Answer::Set(s) => sets(std::slice::from_ref(s)),
            Answer::Reloaded(r) => {
                format!("config reloaded (generation {})\n", r.config_generation)
            }
        }
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn opt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(f) if f.fract() == 0.0 => format!("{f:.0}"),
        Some(f) => format!("{f:.1}"),
    }
}

/// Bytes in decimal units (as ISPs bill them): `950 B`, `1.4 MB`, `35.4 MB`, `1.1 GB`.
fn bytes(n: u64) -> String {
    uplink_api::size::format(n)
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// Columns padded to the widest cell; the last one is not padded.
pub fn render(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    if rows.is_empty() {
        return "(none)\n".into();
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out += c;
            } else {
                out += &format!("{c:<w$}  ");
            }
        }
        format!("{}\n", out.trim_end())
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out += &line(r);
    }
    out
}

fn status(s: &v1::AgentStatus) -> String {
    let per: Vec<String> = s
        .clients_per_uplink
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut out = render(
        &[
            "NAME",
            "VERSION",
            "UP_FOR",
            "CLIENTS",
            "PER_UPLINK",
            "OVERRIDES",
            "GENERATION",
            "IN_SYNC",
        ],
        vec![vec![
            s.name.clone(),
            s.version.clone(),
            when::span(s.uptime_seconds),
            s.clients.to_string(),
            list(&per),
            s.overrides.to_string(),
            s.config_generation.to_string(),
            s.in_sync.to_string(),
        ]],
    );
    // What the operator asked for and does not have: said below the table, in full.
    for r in &s.refused {
        out += &format!("refused by the kernel, left out: {r}\n");
    }
    out
}

fn uplinks(items: &[v1::Uplink], wide: bool) -> String {
    let mut h = vec![
        "UPLINK",
        "STATE",
        "TIER",
        "WEIGHT",
        // Homed: clients whose home it is (they return after a failover); carried: the
        // clients whose new connections use it now.
        "HOMED",
        "CARRIED",
        "RTT_MS",
        "LOSS",
        "JITTER_MS",
        // Bytes in and out in the uplink's usage period (quota_period).
        "USED",
        // The cap per period ("set": an operator's, over the config's).
        "QUOTA",
        "GATEWAY",
    ];
    if wide {
        h.extend([
            "INTERFACE",
            "FWMARK",
            "TABLE",
            "SERVING",
            "GATEWAY6",
            "ADDRESSES",
            "METERED",
            // The probes' pace now, and what a day of it costs (an estimate).
            "PROBE_EVERY",
            "PROBE_PER_DAY",
            // Each probe's last result.
            "PROBES",
        ]);
    }
    let rows = items
        .iter()
        .map(|u| {
            // "up, failback in 27s": usable, its clients still elsewhere.
            let mut state = names::uplink_state(u.state);
            if let Some(ms) = u.failback_in_ms {
                state += &format!(", failback in {}", when::span(ms.div_ceil(1000)));
            } else if u.failback_manual {
                state += ", awaiting failback";
            } else if !u.down_reason.is_empty() {
                state += &format!(": {}", u.down_reason);
            }
            if u.quota_level == "exhausted" {
                state += &format!(", quota used up ({})", u.quota_action);
            } else if u.quota_level == "warning" {
                state += ", quota 80 % used";
            }
            let quota = match u.quota_bytes {
                None => "-".to_string(),
                Some(q) if u.quota_set => format!("{} set", bytes(q)),
                Some(q) => bytes(q),
            };
            let mut r = vec![
                u.name.clone(),
                state,
                u.tier.to_string(),
                u.weight.to_string(),
                u.clients.to_string(),
                u.clients_carried.to_string(),
                opt(u.rtt_ms),
                opt(u.loss_ratio),
                opt(u.jitter_ms),
                bytes(u.used_rx_bytes.saturating_add(u.used_tx_bytes)),
                quota,
                or_dash(&u.gateway),
            ];
            if wide {
                r.extend([
                    u.interface.clone(),
                    format!("{:#x}", u.fwmark),
                    u.table.to_string(),
                    u.serving.to_string(),
                    or_dash(&u.gateway6),
                    list(&u.addresses),
                    u.metered.to_string(),
                    u.probe_interval_ms
                        .map_or("-".into(), |ms| format!("{}ms", ms.round())),
                    u.probe_bytes_per_day.map_or("-".into(), bytes),
                    if u.probe_results.is_empty() {
                        "-".into()
                    } else {
                        u.probe_results.join("; ")
                    },
                ]);
            }
            r
        })
        .collect();
    render(&h, rows)
}

fn clients(items: &[v1::Client], wide: bool, now: u64) -> String {
    let mut h = vec!["MAC", "ADDRESSES", "HOME", "CURRENT", "REASON", "LAST_SEEN"];
    if wide {
        // Bytes in/out per uplink since the agent counts them (lan.client_usage).
        h.extend(["FIRST_SEEN", "USAGE"]);
    }
    let rows = items
        .iter()
        .map(|c| {
            let seen = |ms: u64| {
                if wide {
                    when::local(ms)
                } else {
                    when::relative(ms, now)
                }
            };
            let mut r = vec![
                if c.via.is_empty() {
                    c.mac.clone()
                } else {
                    format!("via {}", c.via)
                },
                list(&c.addresses),
                c.home_uplink.clone(),
                c.current_uplink.clone(),
                names::reason(c.reason),
                seen(c.last_seen_ms),
            ];
            if wide {
                r.push(seen(c.first_seen_ms));
                let usage: Vec<String> = c
                    .usage
                    .iter()
                    .map(|u| format!("{}:{}/{}", u.uplink, bytes(u.rx_bytes), bytes(u.tx_bytes)))
                    .collect();
                r.push(list(&usage));
            }
            r
        })
        .collect();
    render(&h, rows)
}

fn events(items: &[v1::Event], wide: bool, now: u64) -> String {
    let rows = items
        .iter()
        .map(|e| {
            vec![
                if wide {
                    when::local(e.at_ms)
                } else {
                    when::relative(e.at_ms, now)
                },
                e.kind.clone(),
                or_dash(&e.uplink),
                e.clients_moved.to_string(),
                e.cause.clone(),
            ]
        })
        .collect();
    render(&["WHEN", "KIND", "UPLINK", "MOVED", "WHAT"], rows)
}

fn policies(items: &[v1::Policy], wide: bool) -> String {
    let mut h = vec!["POLICY", "BALANCE", "STATE", "USING", "WHY_NOT_OTHERS"];
    if wide {
        h.extend([
            "CANDIDATES",
            "MAX_RTT_MS",
            "MAX_LOSS",
            "MAX_JITTER_MS",
            "WHEN_NONE",
        ]);
    }
    let rows = items
        .iter()
        .map(|p| {
            let skipped = if p.skipped.is_empty() {
                "-".to_string()
            } else {
                p.skipped.join("; ")
            };
            let mut r = vec![
                p.name.clone(),
                p.balance.clone(),
                or_dash(&p.state),
                list(&p.using),
                skipped,
            ];
            if wide {
                r.extend([
                    list(&p.uplinks),
                    opt(p.max_rtt_ms),
                    opt(p.max_loss),
                    opt(p.max_jitter_ms),
                    or_dash(&p.when_none),
                ]);
            }
            r
        })
        .collect();
    render(&h, rows)
}

fn sets(items: &[v1::Set]) -> String {
    render(
        &["SET", "EXTERNAL", "ELEMENTS"],
        items
            .iter()
            .map(|s| vec![s.name.clone(), s.external.to_string(), list(&s.elements)])
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_answer_with_their_read_view_or_one_line() {
        let now = 1_795_619_900_000;
        let o = v1::Override {
            client: "198.19.0.11".into(),
            uplink: "lte".into(),
            expires_at_ms: now + 29_400,
        };
        let line = Answer::Pinned(o).table(false, now);
        assert!(
            line.starts_with("pinned 198.19.0.11 to lte until "),
            "{line}"
        );
        assert!(line.ends_with("(in 30s)\n"), "{line}");
        let u = v1::Uplink {
            name: "isp2".into(),
            state: v1::UplinkState::Draining as i32,
            fwmark: 0x0200_0000,
            ..Default::default()
        };
        let drained = Answer::uplink(u.clone()).table(true, now);
        assert_eq!(drained, Answer::Uplinks(vec![u]).table(true, now));
        assert!(drained.contains("0x2000000"), "{drained}");
        assert!(drained.starts_with("UPLINK  STATE"), "{drained}");
    }

    #[test]
    fn event_times_read_as_people_read_them() {
        let now = 1_795_619_900_000;
        let e = v1::Event {
            at_ms: now - 185_000,
            kind: "failover".into(),
            uplink: "isp1".into(),
            cause: "carrier lost".into(),
            ..Default::default()
        };
        let t = Answer::Events(vec![e.clone()]).table(false, now);
        assert!(t.lines().nth(1).unwrap().starts_with("3m ago"), "{t}");
        let w = Answer::Events(vec![e]).table(true, now);
        // Local RFC 3339, to the second, with the UTC offset.
        let stamp = w.lines().nth(1).unwrap().split_whitespace().next().unwrap();
        assert_eq!(stamp.len(), "2026-11-25T21:00:00+00:00".len(), "{stamp}");
        assert!(stamp.starts_with("2026-"), "{stamp}");
    }
}
