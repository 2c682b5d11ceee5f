//! `uplink-bench` explains itself: usage without a benchmark or with `--help`, a clear
//! error for an unknown one, and never a backtrace.

use std::process::Command;

fn bench(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_uplink-bench"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("uplink-bench runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn uplink_bench_prints_usage_not_a_backtrace() {
    let (code, out, _) = bench(&["--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("usage: uplink-bench") && out.contains("dispatch"),
        "{out}"
    );
    let (code, _, err) = bench(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("usage: uplink-bench"), "{err}");
    let (code, _, err) = bench(&["nosuch"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown benchmark \"nosuch\""), "{err}");
    let (code, _, err) = bench(&["startup", "--clients", "many"]);
    assert_eq!(code, 1);
    assert!(err.contains("--clients must be a number"), "{err}");
    for err in [bench(&[]).2, bench(&["nosuch"]).2] {
        assert!(!err.contains("backtrace"), "{err}");
    }
}
