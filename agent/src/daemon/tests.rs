//! The loop's apply scheduling without a kernel: the test plays the executor, taking the
//! jobs the agent sends and answering them as it likes (late, failed). Discovery events
//! are fed in as netlink would deliver them. The kernel's side is the namespace tests'.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::executor::{Applied, Job};
use super::*;
use crate::dataplane::{ApplyReport, DataplaneError};
use crate::plan::FlushOf;

const CONFIG: &str = "[lan]\ninterfaces = [\"lan0\"]\n[[uplink]]\nname = \"a\"\ninterface = \"wan0\"\ngateway = \"100.64.0.1\"\n[[uplink]]\nname = \"b\"\ninterface = \"wan1\"\ngateway = \"100.64.1.1\"\n";

struct Bench {
    agent: Agent,
    jobs: mpsc::Receiver<Job>,
    dir: PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn bench(tag: &str, extra: &str) -> Bench {
    let dir = std::env::temp_dir().join(format!("uplinkd-daemon-{tag}-{}", std::process::id()));
    let text = format!("{extra}\n{CONFIG}");
    let config = Arc::new(Config::parse(Path::new("t"), &text).unwrap());
    let (conn, handle, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    let state = StateFile::new(&dir);
    let (decisions_tx, _saved) = persist::spawn(state.clone());
    let (jobs_tx, jobs) = mpsc::channel(1);
    let never = Path::new("/nonexistent");
    let agent = Agent::new(
        config.clone(),
        dir.join("uplinkd.toml"),
        Model::new(&config),
        BTreeMap::new(),
        Wiring {
            jobs: jobs_tx,
            takes_increment: false,
            decisions_tx,
            conntrack: crate::dataplane::conntrack::Conntrack::new(
                never,
                Duration::from_secs(1),
                crate::config::ConntrackFlush::Netlink,
            ),
            counters: nft::Counters::new(nft::NftDriver::new(
                never,
                "uplinkd",
                Duration::from_secs(1),
            )),
            state,
            handle,
            probe_tx: mpsc::channel(1).0,
            passive_tx: mpsc::channel(1).0,
            suspect_tx: mpsc::channel(1).0,
            silent_tx: mpsc::channel(1).0,
            activity_tx: mpsc::channel(1).0,
            quota_tx: mpsc::channel(1).0,
            dump_tx: mpsc::channel(1).0,
        },
    );
    let mut b = Bench { agent, jobs, dir };
    // Links as the first dump has them: lan0 is 1, wan0 2, wan1 3.
    for (i, name) in ["lan0", "wan0", "wan1"].iter().enumerate() {
        link(&mut b, i as u32 + 1, name, true);
    }
    for (i, addr) in [(2, "100.64.0.2"), (3, "100.64.1.2")] {
        b.agent.on_event(Event::Addr {
            ifindex: i,
            addr: addr.parse().unwrap(),
            present: true,
        });
    }
    b.agent.links_changed();
    b
}

fn link(b: &mut Bench, ifindex: u32, name: &str, carrier: bool) {
    b.agent.on_event(Event::Link {
        ifindex,
        name: name.into(),
        admin_up: true,
        carrier,
    });
}

fn neighbour(b: &mut Bench, n: u8) -> IpAddr {
    let ip: IpAddr = format!("198.19.0.{n}").parse().unwrap();
    let dirty = b.agent.on_event(Event::Neighbour {
        ifindex: 1,
        ip,
        mac: Some(format!("02:00:00:00:00:{n:02x}").parse().unwrap()),
    });
    if dirty {
        b.agent.request_apply(ReadBack::Cache);
    }
    ip
}

/// Neighbours `ns` arrive one at a time, each applied cleanly.
fn placed(b: &mut Bench, ns: std::ops::Range<u8>) {
    for n in ns {
        neighbour(b, n);
        let j = job(b).unwrap();
        assert!(answer(b, &j, Vec::new()));
    }
}

/// A link event as the loop handles it: judged, then applied.
fn carrier(b: &mut Bench, ifindex: u32, name: &str, up: bool) {
    link(b, ifindex, name, up);
    b.agent.links_changed();
    b.agent.request_apply(ReadBack::Cache);
}

/// The job the agent sent, if any.
fn job(b: &mut Bench) -> Option<Job> {
    b.jobs.try_recv().ok()
}

/// The addresses whose elements a job changes; `None`: a whole plan.
fn changed(j: &Job) -> Option<Vec<IpAddr>> {
    j.desired.nft.changed.as_ref().map(|c| {
        c.iter()
            .filter_map(|(k, _)| match k {
                crate::plan::ElemKey::V4(a) => Some(IpAddr::V4(*a)),
                crate::plan::ElemKey::V6(a) => Some(IpAddr::V6(*a)),
                _ => None,
            })
            .collect()
    })
}

/// Answers a job as the executor does: the flows are deleted (uncounted, as ctnetlink's
/// flush) only when the plan applied cleanly.
fn answer(b: &mut Bench, j: &Job, errors: Vec<DataplaneError>) -> bool {
    let clean = errors.is_empty();
    b.agent.on_applied(Applied {
        seq: j.seq,
        report: ApplyReport {
            errors,
            ..ApplyReport::default()
        },
        takes_increment: true,
        flushed: j
            .flushes
            .iter()
            .map(|f| (*f, clean.then_some(Ok(None))))
            .collect(),
        elapsed: Duration::ZERO,
    })
}

/// The start: the first job is whole, and a clean answer lets the next ones be increments.
fn started(tag: &str) -> Bench {
    started_with(tag, "")
}

fn started_with(tag: &str, extra: &str) -> Bench {
    let mut b = bench(tag, extra);
    b.agent.request_apply(ReadBack::Cache);
    let first = job(&mut b).expect("the first job");
    assert_eq!(changed(&first), None, "the first plan is whole");
    assert!(answer(&mut b, &first, Vec::new()));
    b
}

#[tokio::test]
async fn what_changes_during_an_apply_lands_in_one_merged_job() {
    let mut b = started("merge");
    let first = neighbour(&mut b, 10);
    let j1 = job(&mut b).expect("sent at once: the executor was idle");
    assert_eq!(changed(&j1), Some(vec![first]));
    // The executor is busy: the loop decides, sends nothing.
    let more: Vec<IpAddr> = (11..14).map(|n| neighbour(&mut b, n)).collect();
    assert!(job(&mut b).is_none(), "one job in flight at a time");
    assert_eq!(
        b.agent.model.clients().len(),
        4,
        "placed while the apply runs"
    );
    assert!(answer(&mut b, &j1, Vec::new()));
    let j2 = job(&mut b).expect("what was decided meanwhile");
    let mut got = changed(&j2).expect("an increment");
    got.sort();
    assert_eq!(got, more, "every address decided meanwhile, and only those");
    assert!(answer(&mut b, &j2, Vec::new()));
    assert!(job(&mut b).is_none(), "nothing left");
}

#[tokio::test]
async fn an_api_write_answers_once_its_apply_is_answered() {
    let mut b = started("waiter");
    let ip = neighbour(&mut b, 10);
    let j1 = job(&mut b).unwrap();
    let (tx, mut rx) = oneshot::channel();
    b.agent
        .handle(api::Command::SetOverride {
            ip,
            uplink: "b".into(),
            ttl: None,
            reply: tx,
        })
        .await;
    // The pin came after job 1 was planned: job 1's answer does not answer it.
    assert!(answer(&mut b, &j1, Vec::new()));
    assert!(rx.try_recv().is_err(), "not yet in the kernel");
    let j2 = job(&mut b).expect("the pin's job");
    assert!(answer(&mut b, &j2, Vec::new()));
    let pinned = rx.try_recv().expect("answered").expect("accepted");
    assert_eq!(pinned.uplink, "b");
    // A refused apply: the write is recorded, and says the kernel refused it.
    let (tx, mut rx) = oneshot::channel();
    b.agent
        .handle(api::Command::ClearOverride { ip, reply: tx })
        .await;
    let j3 = job(&mut b).unwrap();
    assert!(!answer(&mut b, &j3, vec![DataplaneError::NeedsWholePlan]));
    let refused = rx.try_recv().expect("answered").unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("recorded but the kernel refused it"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_failed_apply_replans_whole_and_keeps_its_flow_deletions() {
    let mut b = started("failed");
    placed(&mut b, 10..14);
    // a loses its carrier: its clients fail over, and its flows are to be deleted once the
    // new paths are in.
    carrier(&mut b, 2, "wan0", false);
    let j = job(&mut b).expect("the failover");
    assert!(
        j.flushes.iter().any(|f| f.of == FlushOf::Uplink(0)),
        "{:?}",
        j.flushes
    );
    assert!(!answer(&mut b, &j, vec![DataplaneError::NeedsWholePlan]));
    assert!(!b.agent.publish.in_sync());
    // The retry plans everything, and deletes the flows it could not delete before.
    b.agent.request_apply(ReadBack::Cache);
    let retry = job(&mut b).expect("the retry");
    assert_eq!(changed(&retry), None, "whole after a failure");
    assert!(retry.flushes.iter().any(|f| f.of == FlushOf::Uplink(0)));
    assert!(answer(&mut b, &retry, Vec::new()));
    assert!(b.agent.publish.in_sync());
}

#[tokio::test]
async fn an_apply_planned_before_a_reload_is_answered_after_it() {
    let mut b = started("reload");
    placed(&mut b, 10..12);
    // b loses its address and fails over; its job (flows of uplink 1 and those NATed to
    // its old address to delete) is still running when a reload takes b out of the config.
    b.agent.on_event(Event::Addr {
        ifindex: 3,
        addr: "100.64.1.2".parse().unwrap(),
        present: false,
    });
    b.agent.links_changed();
    b.agent.request_apply(ReadBack::Cache);
    let old = job(&mut b).expect("the failover");
    assert!(old.flushes.iter().any(|f| f.of == FlushOf::Uplink(1)));
    std::fs::create_dir_all(&b.dir).unwrap();
    let one = &CONFIG[..CONFIG.rfind("[[uplink]]").unwrap()];
    std::fs::write(&b.agent.config_path, one).unwrap();
    b.agent.reload().await.expect("reloaded");
    assert!(
        job(&mut b).is_none(),
        "the reload waits for the job in flight"
    );
    // Its failure retries nothing by the old indices (uplink 1 is gone).
    assert!(!answer(&mut b, &old, vec![DataplaneError::NeedsWholePlan]));
    let reload = job(&mut b).expect("the reload's apply");
    assert_eq!(changed(&reload), None);
    assert!(reload.flushes.is_empty(), "{:?}", reload.flushes);
    assert!(answer(&mut b, &reload, Vec::new()));
}

#[tokio::test]
async fn a_drain_moves_the_uplinks_clients_and_answers_with_the_uplink_drained() {
    let mut b = started("drain");
    placed(&mut b, 10..14);
    let mut rx = drain(&mut b, "a").await;
    let j = job(&mut b).expect("the drain's job");
    // a's clients are hashed over b; b's own stay direct.
    assert_eq!(home(&j, "a"), Some(vec!["b".to_string()]));
    assert_eq!(home(&j, "b"), None);
    assert!(rx.try_recv().is_err(), "answered only once applied");
    assert!(answer(&mut b, &j, Vec::new()));
    let view = rx.try_recv().unwrap().unwrap();
    assert_eq!(view.name, "a");
    assert_eq!(
        view.state,
        uplink_api::v1::UplinkState::Draining as i32,
        "{view:?}"
    );
    // Draining it again changes nothing: answered at once, no job.
    let mut rx = drain(&mut b, "a").await;
    assert!(rx.try_recv().unwrap().is_ok());
    assert!(job(&mut b).is_none());
}

/// An operator drains `uplink`; the receiver gets the answer.
async fn drain(
    b: &mut Bench,
    uplink: &str,
) -> oneshot::Receiver<Result<v1::Uplink, api::ApiError>> {
    let (tx, rx) = oneshot::channel();
    b.agent
        .handle(api::Command::Drain {
            uplink: uplink.into(),
            drain: true,
            reply: tx,
        })
        .await;
    rx
}

/// The uplink's `home_` target in a job: `None` direct, else the spread it fails over to.
fn home(j: &Job, uplink: &str) -> Option<Vec<String>> {
    j.desired
        .nft
        .structure
        .uplinks
        .iter()
        .find(|u| u.name == uplink)
        .unwrap()
        .home
        .clone()
}

#[tokio::test]
async fn a_manual_failback_waits_for_the_operator_and_answers_once_applied() {
    let mut b = started_with("failback", "[failover]\nfailback = \"manual\"");
    placed(&mut b, 10..14);
    carrier(&mut b, 2, "wan0", false);
    let down = job(&mut b).unwrap();
    assert_eq!(home(&down, "a"), Some(vec!["b".to_string()]));
    assert!(answer(&mut b, &down, Vec::new()));
    // The carrier is back; a manual failback keeps a's clients on b.
    carrier(&mut b, 2, "wan0", true);
    let up = job(&mut b).unwrap();
    assert_eq!(
        home(&up, "a"),
        Some(vec!["b".to_string()]),
        "still failed over"
    );
    assert!(answer(&mut b, &up, Vec::new()));
    let (tx, mut rx) = oneshot::channel();
    b.agent
        .handle(api::Command::Failback {
            uplink: "a".into(),
            reply: tx,
        })
        .await;
    let back = job(&mut b).expect("the failback's job");
    assert_eq!(home(&back, "a"), None, "a's clients go home");
    assert!(rx.try_recv().is_err());
    assert!(answer(&mut b, &back, Vec::new()));
    assert!(rx.try_recv().unwrap().unwrap().serving);
}

#[tokio::test]
async fn an_automatic_failback_sends_the_clients_home_once_the_delay_has_run() {
    let mut b = started_with("autoback", "[failover]\nfailback_delay = \"10s\"");
    placed(&mut b, 10..14);
    carrier(&mut b, 2, "wan0", false);
    let down = job(&mut b).unwrap();
    assert_eq!(home(&down, "a"), Some(vec!["b".to_string()]));
    assert!(answer(&mut b, &down, Vec::new()));
    // The carrier is back: a is up again, but its clients wait out the delay on b.
    let back_at = Instant::now();
    carrier(&mut b, 2, "wan0", true);
    if let Some(up) = job(&mut b) {
        assert_eq!(
            home(&up, "a"),
            Some(vec!["b".to_string()]),
            "not before the delay"
        );
        assert!(answer(&mut b, &up, Vec::new()));
    }
    b.agent.housekeeping(back_at + Duration::from_secs(5));
    if let Some(early) = job(&mut b) {
        assert_eq!(home(&early, "a"), Some(vec!["b".to_string()]), "5 s in");
        assert!(answer(&mut b, &early, Vec::new()));
    }
    b.agent.housekeeping(back_at + Duration::from_secs(11));
    let home_again = job(&mut b).expect("the failback's apply");
    assert_eq!(home(&home_again, "a"), None, "a's clients go home");
    assert!(
        home_again.flushes.is_empty(),
        "the flows the failover moved stay where they are (failback_flows keep): {:?}",
        home_again.flushes
    );
    assert!(answer(&mut b, &home_again, Vec::new()));
    assert!(job(&mut b).is_none());
}

#[tokio::test]
async fn a_pin_that_expires_leaves_the_kernel_at_the_next_pass() {
    let mut b = started("pin");
    placed(&mut b, 10..12);
    let ip: IpAddr = "198.19.0.10".parse().unwrap();
    let (tx, mut rx) = oneshot::channel();
    b.agent
        .handle(api::Command::SetOverride {
            ip,
            uplink: "a".into(),
            ttl: Some(Duration::from_millis(1)),
            reply: tx,
        })
        .await;
    let j = job(&mut b).expect("the pin's job");
    let pin = crate::plan::ElemKey::Pin4("198.19.0.10".parse().unwrap());
    // The pin's element (pins are planned whole: there are few), straight to a's chain.
    let pinned_to = |j: &Job| j.desired.nft.elements.get(&pin).map(|t| t.to_string());
    assert_eq!(pinned_to(&j).as_deref(), Some("up_a"));
    assert!(answer(&mut b, &j, Vec::new()));
    assert_eq!(rx.try_recv().unwrap().unwrap().uplink, "a");
    // Once its time is up, the next pass takes the pin out of the kernel.
    std::thread::sleep(Duration::from_millis(5));
    b.agent.housekeeping(Instant::now());
    let expired = job(&mut b).expect("the expiry's job");
    assert_eq!(pinned_to(&expired), None, "the pin element is gone");
    assert!(answer(&mut b, &expired, Vec::new()));
}

#[tokio::test]
async fn failback_with_move_deletes_the_flows_the_failover_placed_once_home_is_back() {
    let mut b = started_with(
        "moveback",
        "[failover]\nfailback_delay = \"0s\"\nfailback_flows = \"move\"",
    );
    placed(&mut b, 10..14);
    let away = |j: &Job, u: &str| {
        j.desired
            .nft
            .structure
            .uplinks
            .iter()
            .find(|x| x.name == u)
            .unwrap()
            .away_mark
    };
    carrier(&mut b, 2, "wan0", false);
    let down = job(&mut b).unwrap();
    assert_eq!(home(&down, "a"), Some(vec!["b".to_string()]));
    // a's new connections are marked as placed by its failover: a's id, from the top.
    assert_eq!(away(&down, "a"), Some(0x00ff_0000));
    assert_eq!(away(&down, "b"), None);
    assert!(
        !down
            .flushes
            .iter()
            .any(|f| matches!(f.of, FlushOf::Failback(_)))
    );
    assert!(answer(&mut b, &down, Vec::new()));
    carrier(&mut b, 2, "wan0", true);
    let back = job(&mut b).expect("the failback");
    assert_eq!(home(&back, "a"), None);
    assert_eq!(away(&back, "a"), None);
    let f = back
        .flushes
        .iter()
        .find(|f| f.of == FlushOf::Failback(0))
        .expect("the failback deletes the flows its failover placed");
    assert_eq!((f.mark, f.mask), (0x00ff_0000, 0x00ff_0000));
    // Refused: the flows are deleted by the retry, which plans whole.
    assert!(!answer(&mut b, &back, vec![DataplaneError::NeedsWholePlan]));
    b.agent.request_apply(ReadBack::Cache);
    let retry = job(&mut b).expect("the retry");
    assert!(retry.flushes.iter().any(|f| f.of == FlushOf::Failback(0)));
    assert!(answer(&mut b, &retry, Vec::new()));
    // Done: the next plan deletes nothing more.
    neighbour(&mut b, 20);
    let next = job(&mut b).unwrap();
    assert!(next.flushes.is_empty(), "{:?}", next.flushes);
}

#[tokio::test]
async fn failback_with_keep_deletes_nothing() {
    let mut b = started_with("keepback", "[failover]\nfailback_delay = \"0s\"");
    placed(&mut b, 10..14);
    carrier(&mut b, 2, "wan0", false);
    let down = job(&mut b).unwrap();
    assert!(answer(&mut b, &down, Vec::new()));
    carrier(&mut b, 2, "wan0", true);
    let back = job(&mut b).expect("the failback");
    assert_eq!(home(&back, "a"), None);
    assert!(back.flushes.is_empty(), "{:?}", back.flushes);
    assert!(
        back.desired
            .nft
            .structure
            .uplinks
            .iter()
            .all(|u| u.away_mark.is_none())
    );
}
