//! Differential test of the validator against the kernel: random configs (rules, sets,
//! policies, `[local]`) and random set edits through the model; every config that
//! `check-config` accepts is rendered as uplinkd renders it and handed to the real
//! `nft --check` in a namespace of its own. Anything the validator accepts, the kernel must
//! take.
//!
//! It runs for `UPLINK_DIFF_SECONDS` (default 20; docs/testing.md says how to run it for longer)
//! from a seed it prints; `UPLINK_DIFF_SEED=N` replays one run.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use uplink_tests::Netns;
use uplinkd::config::Config;
use uplinkd::model::Model;

/// xorshift64*: reproducible from the printed seed, no crate needed for a test's dice.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Prefixes that nest, overlap, touch and repeat, in both families: what makes interval
/// sets and maps conflict.
const NETS: &[&str] = &[
    "203.0.0.0/8",
    "203.0.113.0/24",
    "203.0.113.0/25",
    "203.0.113.128/25",
    "203.0.113.10",
    "203.0.112.0/24",
    "198.51.100.0/24",
    "198.51.100.7/32",
    "192.0.2.0/24",
    "0.0.0.0/0",
    "100.64.0.0/10",
    "2001:db8::/32",
    "2001:db8:1::/48",
    "2001:db8:1::5",
    "2001:db8:2::/48",
    "2001:db8:3::/47",
    "::/0",
];
const PORTS: &[&str] = &[
    "1-1024",
    "443",
    "80",
    "53",
    "1000-2000",
    "1500-2500",
    "2001-3000",
    "65535",
    "1",
    "22-23",
    "24",
];
const DSCP: &[&str] = &["ef", "46", "af41", "cs1", "8", "0", "be", "cs0", "63"];
const IIF: &[&str] = &["br-lan", "br-guest"];
const PROTOS: &[&str] = &["tcp", "udp", "any", "icmp", "icmpv6"];
const MODES: &[&str] = &["client", "connection", "destination", "failover"];

fn list(d: &mut Dice, pool: &[&str], max: usize, quote: bool) -> String {
    let n = 1 + d.below(max);
    let items: Vec<String> = (0..n)
        .map(|_| {
            let v = d.pick(pool);
            if quote {
                format!("{v:?}")
            } else {
                v.to_string()
            }
        })
        .collect();
    format!("[{}]", items.join(", "))
}

/// A config with random traffic policy over three uplinks.
fn random_config(d: &mut Dice) -> String {
    let mut c = String::from("[lan]\ninterfaces = [\"br-lan\", \"br-guest\"]\n");
    if d.chance(30) {
        // The policy ids' conntrack bits below, above and beside uplinkd's mark bits.
        c += *d.pick(&[
            "[dataplane]\nfwmark_mask = 0xff\n",
            "[dataplane]\nfwmark_mask = 0xf0000000\n",
            "[dataplane]\npolicy_mark_mask = 0\n",
            "[dataplane]\npolicy_mark_mask = 0x3\n",
        ]);
    }
    for k in 1..=3 {
        c += &format!(
            "[[uplink]]\nname = \"isp{k}\"\ninterface = \"wan{k}\"\ngateway = \"100.64.{k}.1\"\nweight = {}\n",
            1 + d.below(3)
        );
        if d.chance(50) {
            c += &format!("probes = [\"icmp:198.18.{k}.2\"]\n");
        }
    }
    if d.chance(50) {
        c += &format!("[dispatch]\nbalance = {:?}\n", d.pick(&MODES[..3]));
    }
    let sets = d.below(4);
    for s in 0..sets {
        c += &format!("[[set]]\nname = \"s{s}\"\n");
        if d.chance(20) {
            c += "external = true\n";
        } else if d.chance(85) {
            c += &format!("elements = {}\n", list(d, NETS, 8, true));
        }
    }
    let policies = d.below(4);
    for p in 0..policies {
        c += &format!("[[policy]]\nname = \"p{p}\"\n");
        if d.chance(70) {
            c += &format!(
                "uplinks = {}\n",
                list(d, &["isp1", "isp2", "isp3"], 3, true)
            );
        }
        if d.chance(70) {
            c += &format!("balance = {:?}\n", d.pick(MODES));
        }
        if d.chance(30) {
            c += "when_none = \"drop\"\n";
        }
        if d.chance(20) {
            c += "max_rtt = \"150ms\"\n";
        }
    }
    let mut targets = vec!["main".to_string(), "default".to_string()];
    targets.extend((0..policies).map(|p| format!("p{p}")));
    let mut addrs: Vec<String> = NETS.iter().map(|n| n.to_string()).collect();
    addrs.extend((0..sets).map(|s| format!("@s{s}")));
    let addrs: Vec<&str> = addrs.iter().map(String::as_str).collect();
    for r in 0..1 + d.below(8) {
        c += &format!(
            "[[rule]]\nname = \"r{r}\"\npolicy = {:?}\n",
            d.pick(&targets)
        );
        if d.chance(40) {
            c += &format!("src = {}\n", list(d, &addrs, 4, true));
        }
        if d.chance(50) {
            c += &format!("dst = {}\n", list(d, &addrs, 4, true));
        }
        if d.chance(40) {
            c += &format!("proto = {:?}\n", d.pick(PROTOS));
        }
        for key in ["sport", "dport"] {
            if d.chance(30) {
                c += &format!("{key} = {}\n", list(d, PORTS, 4, true));
            }
        }
        if d.chance(25) {
            c += &format!("dscp = {}\n", list(d, DSCP, 4, true));
        }
        if d.chance(20) {
            c += &format!("iif = {}\n", list(d, IIF, 3, true));
        }
    }
    if d.chance(30) {
        let local = d.pick(&targets);
        c += &format!("[local]\npolicy = {local:?}\n");
    }
    c
}

/// Operator edits through the API: elements added to (and taken from) listed sets.
fn random_edits(d: &mut Dice, config: &Config, model: &mut Model) {
    for set in config.sets.iter() {
        if set.external || !d.chance(50) {
            continue;
        }
        let add: Vec<IpNet> = (0..1 + d.below(4))
            .map(|_| uplinkd::config::parse_net(d.pick::<&str>(NETS)).expect("a pool prefix"))
            .collect();
        let _ = model.edit_set(&config.sets, set, &add, &[]);
        let present = model.set_elements(set);
        if !present.is_empty() && d.chance(30) {
            let del = [present[d.below(present.len())]];
            let _ = model.edit_set(&config.sets, set, &[], &del);
        }
    }
}

fn nft_check(ns: &Netns, payload: &str) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-c", "-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(payload.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_config_the_validator_accepts_the_kernel_takes() -> Result<()> {
    let seconds: u64 = std::env::var("UPLINK_DIFF_SECONDS")
        .ok()
        .map(|s| s.parse().context("UPLINK_DIFF_SECONDS"))
        .transpose()?
        .unwrap_or(20);
    let seed: u64 = match std::env::var("UPLINK_DIFF_SEED") {
        Ok(s) => s.parse().context("UPLINK_DIFF_SEED")?,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    };
    eprintln!(
        "differential config test: seed {seed} (UPLINK_DIFF_SEED={seed} replays it), {seconds} s"
    );
    let ns = Netns::new("diff")?;
    let mut dice = Dice(seed);
    let (mut accepted, mut refused_by_validator) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let text = random_config(&mut dice);
        let config = match Config::parse(Path::new("diff.toml"), &text) {
            Ok(c) => c,
            Err(e) => {
                if std::env::var("UPLINK_DIFF_VERBOSE").is_ok() {
                    eprintln!("validator: {e}");
                }
                refused_by_validator += 1;
                continue;
            }
        };
        accepted += 1;
        let mut model = Model::new(&config);
        random_edits(&mut dice, &config, &mut model);
        let desired = uplinkd::plan::plan(&config, &model);
        let payload = uplinkd::dataplane::nft::table_payload(&desired.nft.structure);
        if let Err(e) = nft_check(&ns, &payload) {
            bail!(
                "check-config accepts this config, the kernel refuses its table (seed {seed}):\n{e}\n--- config ---\n{text}\n--- set edits ---\n{:?}",
                model.set_edits
            );
        }
    }
    eprintln!(
        "{accepted} accepted configs taken by nft --check; {refused_by_validator} refused by the validator"
    );
    // The generator must mostly make valid configs, or it proves little.
    assert!(
        accepted >= 50 && accepted >= refused_by_validator / 4,
        "only {accepted} of {} generated configs were valid",
        accepted + refused_by_validator
    );
    Ok(())
}
