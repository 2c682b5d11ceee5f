//! Output: aligned tables (readable at 120 columns), JSON or YAML on stdout; per-gateway
//! errors on stderr. Tables come from the typed answers (`answer.rs`).

use serde_json::Value;
use uplink_api::v1;

use crate::Output;
use crate::fleet::{Failure, GatewayResult};
use crate::when;

/// Prints every gateway's result. `single`: one --gateway, so no per-gateway wrapping.
pub fn print(results: &[GatewayResult], out: Output, single: bool) {
    match out {
        Output::Json | Output::Yaml => {
            let doc = if single && results.len() == 1 && results[0].result.is_ok() {
                results[0]
                    .result
                    .as_ref()
                    .map(|a| a.json())
                    .unwrap_or_default()
            } else {
                Value::Array(
                    results
                        .iter()
                        .map(|r| match &r.result {
                            Ok(a) => serde_json::json!({"gateway": r.target.name, "address": r.target.address, "ok": true, "result": a.json()}),
                            Err(f) => serde_json::json!({"gateway": r.target.name, "address": r.target.address, "ok": false, "error": f.text(), "unreachable": matches!(f, Failure::Unreachable(_) | Failure::NotReady(_))}),
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
            let now = when::now_ms();
            for r in results {
                if !single {
                    println!("== {} ({})", r.target.name, r.target.address);
                }
                if let Ok(a) = &r.result {
                    print!("{}", a.table(out == Output::Wide, now));
                }
            }
        }
    }
    for r in results {
        if let Err(f) = &r.result {
            eprintln!("{}: {}", r.target.name, f.text());
        }
    }
}

/// One streamed event: local time in tables (a live stream has no "ago"), machine values in
/// JSON and YAML; `gateway` tags it when several gateways stream together.
pub fn event_line(e: &v1::Event, out: Output, gateway: Option<&str>) {
    let tagged = |v: Value| match gateway {
        Some(g) => {
            let mut v = v;
            v["gateway"] = Value::String(g.to_string());
            v
        }
        None => v,
    };
    let v = || tagged(serde_json::to_value(e).unwrap_or_default());
    match out {
        Output::Json => println!("{}", serde_json::to_string(&v()).unwrap_or_default()),
        Output::Yaml => print!("---\n{}", serde_yaml::to_string(&v()).unwrap_or_default()),
        _ => {
            let tag = gateway.map(|g| format!("{g}  ")).unwrap_or_default();
            println!(
                "{tag}{}  {:<10} {:<8} {}",
                when::local(e.at_ms),
                e.kind,
                e.uplink,
                e.cause
            )
        }
    }
}
