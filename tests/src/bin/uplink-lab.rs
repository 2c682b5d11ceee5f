//! The lab: a gateway with three uplinks (weights 2/1/1, the third point-to-point), six
//! clients (three with IPv6), one ISP per uplink and an internet host, with uplinkd running
//! on the gateway. Prints which uplink each client's traffic left by, as the internet host
//! saw it, until Ctrl-C; then removes everything it made.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;
use uplink_tests::{Lab, UplinkSpec, client_v4, client_v6};

fn main() -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))?;
    let once = std::env::args().any(|a| a == "--once");

    let uplinks = vec![
        UplinkSpec::new("isp1", 2, false),
        UplinkSpec::new("isp2", 1, false),
        UplinkSpec::new("lte", 1, true),
    ];
    eprintln!("building namespaces...");
    let mut lab = Lab::build("lab", uplinks, 6, 3)?;
    lab.write_config("10s", "10m", "")?;
    eprintln!(
        "starting uplinkd in {} (config {}, log {})",
        lab.ns("gw"),
        lab.config_path().display(),
        lab.log_path().display()
    );
    lab.start_agent()?;
    eprintln!(
        "namespaces: {}-*   e.g. `ip netns exec {} nft list table inet uplinkd`",
        lab.prefix,
        lab.ns("gw")
    );

    // First contact: the gateway learns each client from its ARP/ND traffic.
    for (&i, &v6) in &lab.clients {
        for is6 in [false, true].into_iter().filter(|&x| v6 || !x) {
            if let Err(e) = lab.probe(i, is6, 10) {
                eprintln!("warning: {e}");
            }
        }
    }
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        print_table(&lab)?;
        if once || stop.load(Ordering::SeqCst) {
            break;
        }
        for _ in 0..40 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    eprintln!("tearing down {}-*", lab.prefix);
    Ok(())
}

fn print_table(lab: &Lab) -> Result<()> {
    let assigned = lab.assignments().unwrap_or_default();
    println!(
        "\n{:<8} {:<22} {:<10} {:<22} {:<10}",
        "client", "address", "assigned", "internet saw", "left via"
    );
    for (&i, &v6) in &lab.clients {
        let mut addrs = vec![(std::net::IpAddr::from(client_v4(i)), false)];
        if v6 {
            addrs.push((client_v6(i).into(), true));
        }
        for (addr, is6) in addrs {
            let home = assigned.get(&addr).cloned().unwrap_or_else(|| "-".into());
            let (seen, via) = match lab.probe(i, is6, 5) {
                Ok(seen) => (
                    seen.to_string(),
                    lab.uplink_of_source(seen).unwrap_or_else(|| "?".into()),
                ),
                Err(_) => ("no answer".into(), "-".into()),
            };
            let flag = if via == home { "" } else { "  <- differs" };
            println!(
                "{:<8} {:<22} {:<10} {:<22} {:<10}{flag}",
                format!("c{i}"),
                addr,
                home,
                seen,
                via
            );
        }
    }
    Ok(())
}
