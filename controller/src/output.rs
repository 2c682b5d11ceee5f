//! Output: aligned tables (readable at 120 columns), JSON or YAML on stdout; per-gateway
//! errors on stderr.

use serde_json::Value;
use uplink_api::v1;

use crate::Output;
use crate::fleet::{Failure, GatewayResult};

/// Prints every gateway's result. `single`: one --gateway, so no per-gateway wrapping.
pub fn print(results: &[GatewayResult], out: Output, single: bool) {
    match out {
        Output::Json | Output::Yaml => {
            let doc = if single && results.len() == 1 && results[0].result.is_ok() {
                results[0].result.clone().unwrap_or_default()
            } else {
                Value::Array(
                    results
                        .iter()
                        .map(|r| match &r.result {
                            Ok(v) => serde_json::json!({"gateway": r.target.name, "address": r.target.address, "ok": true, "result": v}),
                            Err(f) => serde_json::json!({"gateway": r.target.name, "address": r.target.address, "ok": false, "error": failure_text(f), "unreachable": matches!(f, Failure::Unreachable(_))}),
                        })
                        .collect(),
                )
            };
            if out == Output::Json {
                println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
            } else {
                print!("{}", serde_yaml::to_string(&doc).unwrap_or_default());
            }
        }
        Output::Table | Output::Wide => {
            for r in results {
                if !single {
                    println!("== {} ({})", r.target.name, r.target.address);
                }
                if let Ok(v) = &r.result {
                    table(v, out == Output::Wide);
                }
            }
        }
    }
    for r in results {
        if let Err(f) = &r.result {
            eprintln!("{}: {}", r.target.name, failure_text(f));
        }
    }
}

fn failure_text(f: &Failure) -> String {
    match f {
        Failure::Error(e) => e.clone(),
        Failure::Unreachable(e) => format!("unreachable: {e}"),
    }
}

fn s(v: &Value, k: &str) -> String {
    match &v[k] {
        Value::String(x) if !x.is_empty() => x.clone(),
        Value::String(_) | Value::Null => "-".into(),
        Value::Number(n) => n
            .as_f64()
            .map(|f| {
                if f.fract() == 0.0 {
                    format!("{f:.0}")
                } else {
                    format!("{f:.1}")
                }
            })
            .unwrap_or_default(),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

fn render(headers: &[&str], rows: Vec<Vec<String>>) {
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
        println!("{}", out.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn table(v: &Value, wide: bool) {
    match v {
        Value::Array(items) if items.first().is_some_and(|i| i.get("interface").is_some()) => {
            let mut h = vec![
                "UPLINK",
                "STATE",
                "TIER",
                "WEIGHT",
                "CLIENTS",
                "RTT_MS",
                "LOSS",
                "JITTER_MS",
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
                ]);
            }
            let rows = items
                .iter()
                .map(|u| {
                    // "up, failback in 27s": usable, its clients still elsewhere.
                    let mut state = s(u, "state");
                    if let Some(ms) = u["failback_in_ms"].as_u64() {
                        state += &format!(", failback in {}s", ms.div_ceil(1000));
                    } else if u["failback_manual"].as_bool() == Some(true) {
                        state += ", awaiting failback";
                    } else if let Some(why) = u["down_reason"].as_str().filter(|w| !w.is_empty()) {
                        state += &format!(": {why}");
                    }
                    let mut r = vec![
                        s(u, "name"),
                        state,
                        s(u, "tier"),
                        s(u, "weight"),
                        s(u, "clients"),
                        s(u, "rtt_ms"),
                        s(u, "loss_ratio"),
                        s(u, "jitter_ms"),
                        s(u, "gateway"),
                    ];
                    if wide {
                        r.extend([
                            s(u, "interface"),
                            format!("{:#x}", u["fwmark"].as_u64().unwrap_or(0)),
                            s(u, "table"),
                            s(u, "serving"),
                            s(u, "gateway6"),
                            s(u, "addresses"),
                        ]);
                    }
                    r
                })
                .collect();
            render(&h, rows);
        }
        Value::Array(items) if items.first().is_some_and(|i| i.get("mac").is_some()) => {
            let mut h = vec!["MAC", "ADDRESSES", "HOME", "CURRENT", "REASON"];
            if wide {
                h.extend(["FIRST_SEEN_MS", "LAST_SEEN_MS"]);
            }
            let rows = items
                .iter()
                .map(|c| {
                    let mut r = vec![
                        s(c, "mac"),
                        s(c, "addresses"),
                        s(c, "home_uplink"),
                        s(c, "current_uplink"),
                        s(c, "reason"),
                    ];
                    if wide {
                        r.extend([s(c, "first_seen_ms"), s(c, "last_seen_ms")]);
                    }
                    r
                })
                .collect();
            render(&h, rows);
        }
        Value::Array(items) if items.first().is_some_and(|i| i.get("kind").is_some()) => {
            let rows = items
                .iter()
                .map(|e| {
                    vec![
                        s(e, "at_ms"),
                        s(e, "kind"),
                        s(e, "uplink"),
                        s(e, "clients_moved"),
                        s(e, "cause"),
                    ]
                })
                .collect();
            render(&["AT_MS", "KIND", "UPLINK", "MOVED", "WHAT"], rows);
        }
        Value::Array(items) if items.first().is_some_and(|i| i.get("using").is_some()) => {
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
                    let mut r = vec![
                        s(p, "name"),
                        s(p, "balance"),
                        s(p, "state"),
                        s(p, "using"),
                        p["skipped"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|x| x.as_str())
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            })
                            .filter(|x| !x.is_empty())
                            .unwrap_or_else(|| "-".into()),
                    ];
                    if wide {
                        r.extend([
                            s(p, "uplinks"),
                            s(p, "max_rtt_ms"),
                            s(p, "max_loss"),
                            s(p, "max_jitter_ms"),
                            s(p, "when_none"),
                        ]);
                    }
                    r
                })
                .collect();
            render(&h, rows);
        }
        Value::Array(items) if items.first().is_some_and(|i| i.get("match").is_some()) => {
            let rows = items
                .iter()
                .map(|r| {
                    vec![
                        s(r, "name"),
                        s(r, "policy"),
                        s(r, "packets"),
                        s(r, "bytes"),
                        s(r, "match"),
                    ]
                })
                .collect();
            render(&["RULE", "POLICY", "PACKETS", "BYTES", "MATCH"], rows);
        }
        Value::Array(items) if items.first().is_some_and(|i| i.get("external").is_some()) => {
            let rows = items.iter().map(set_row).collect();
            render(&["SET", "EXTERNAL", "ELEMENTS"], rows);
        }
        Value::Object(map) if map.contains_key("external") && map.contains_key("elements") => {
            render(&["SET", "EXTERNAL", "ELEMENTS"], vec![set_row(v)]);
        }
        Value::Object(map) if map.contains_key("summary") && map.contains_key("steps") => {
            println!("{}", s(v, "summary"));
            if wide {
                for step in map["steps"].as_array().into_iter().flatten() {
                    println!("  {}", step.as_str().unwrap_or_default());
                }
            }
        }
        Value::Array(items) if items.is_empty() => println!("(none)"),
        Value::Object(map) if map.contains_key("clients_per_uplink") => {
            let per: Vec<String> = map["clients_per_uplink"]
                .as_object()
                .map(|o| o.iter().map(|(k, v)| format!("{k}={v}")).collect())
                .unwrap_or_default();
            render(
                &[
                    "NAME",
                    "VERSION",
                    "UPTIME_S",
                    "CLIENTS",
                    "PER_UPLINK",
                    "OVERRIDES",
                    "GENERATION",
                    "IN_SYNC",
                ],
                vec![vec![
                    s(v, "name"),
                    s(v, "version"),
                    s(v, "uptime_seconds"),
                    s(v, "clients"),
                    per.join(","),
                    s(v, "overrides"),
                    s(v, "config_generation"),
                    s(v, "in_sync"),
                ]],
            );
        }
        Value::Object(map) => {
            let keys: Vec<&String> = map.keys().collect();
            let headers: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            render(
                &headers.iter().map(String::as_str).collect::<Vec<_>>(),
                vec![keys.iter().map(|k| s(v, k)).collect()],
            );
        }
        other => println!("{other}"),
    }
}

fn set_row(v: &Value) -> Vec<String> {
    let n = v["elements"].as_array().map_or(0, |a| a.len());
    let mut elements = s(v, "elements");
    if n == 0 {
        elements = "-".into();
    }
    vec![s(v, "name"), s(v, "external"), elements]
}

/// One streamed event.
pub fn event_line(e: &v1::Event, out: Output) {
    match out {
        Output::Json => println!("{}", serde_json::to_string(e).unwrap_or_default()),
        Output::Yaml => print!("---\n{}", serde_yaml::to_string(e).unwrap_or_default()),
        _ => println!("{}  {:<10} {:<8} {}", e.at_ms, e.kind, e.uplink, e.cause),
    }
}
