//! The soak's short version (the hour-long one is `uplink-bench soak`): 60 seconds of
//! churn, failovers, scrapes and watchers; descriptors, tasks and RSS must not grow and the
//! flow on the healthy uplink must lose nothing.

use std::time::Duration;

use uplink_tests::soak::{SoakOptions, describe, run};

#[test]
fn one_minute_of_churn_leaks_nothing() -> anyhow::Result<()> {
    let opts = SoakOptions {
        duration: Duration::from_secs(60),
        clients: 2000,
        churn: 500,
        failover_every: Duration::from_secs(15),
        scrape_every: Duration::from_secs(1),
        watchers: 5,
        warmup: Duration::from_secs(20),
    };
    let r = run(&opts, |_| {})?;
    let text = format!("{:#?}", describe(&r));
    println!("{text}");
    assert_eq!(
        r.received, r.sent,
        "the healthy uplink's flow lost datagrams: {text}"
    );
    assert!(r.failovers >= 3 && r.scrapes >= 50, "{text}");
    assert!(
        r.watcher_lines.iter().all(|n| *n >= r.failovers),
        "every watcher saw every failover: {text}"
    );
    let (fds, tasks, rss) = (r.fds(), r.tasks(), r.rss());
    // Flat after the warm-up: the last reading within a small margin of the first, and
    // never far above it.
    assert!(
        fds.last <= fds.first + 4.0 && fds.max <= fds.first + 16.0,
        "{text}"
    );
    assert!(
        tasks.last <= tasks.first + 4.0 && tasks.max <= tasks.first + 64.0,
        "{text}"
    );
    assert!(rss.last <= rss.first * 1.15 + 2.0, "{text}");
    Ok(())
}
