//! Delivery end to end with real processes: fan-out, node outages (also across a manager
//! restart, and what a down node is offered) and a poison message, against
//! `connect-node-sim`s on loopback.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::metrics::Metrics;
use common::{free_port, has_all, ids, send_all, wait_until, with_store, Manager, Sim};
use push_manager::store::{Filter, QueueKind, Store};

const CONVERGE: Duration = Duration::from_secs(60);
/// Short backoff so a returning node is retried quickly.
const FAST_BACKOFF: &[&str] = &["--backoff-initial", "20ms", "--backoff-max", "300ms"];

fn nodes(sims: &[&Sim]) -> Vec<(&'static str, String)> {
    let ids = ["node-1", "node-2", "node-3"];
    sims.iter().zip(ids).map(|(s, id)| (id, s.addr())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_reaches_every_node() {
    let (a, b, c) = (
        Sim::start("node-1", &[]),
        Sim::start("node-2", &[]),
        Sim::start("node-3", &[]),
    );
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &nodes(&[&a, &b, &c]), &[]);
    m.wait_ready().await;
    let ids = ids("fan", 1000);
    send_all(&m, &ids, 3).await;
    for sim in [&a, &b, &c] {
        wait_until(&format!("{} has all 1000", sim.node_id()), CONVERGE, || {
            has_all(sim, &ids)
        })
        .await;
        let records = sim.received();
        let seqs: HashSet<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs.len(), 1000, "one sequence number per message");
        assert!(records
            .iter()
            .all(|r| r.attempt >= 1 && !r.manager_id.is_empty()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_outage_does_not_delay_others_and_the_node_gets_everything_back() {
    let (a, b, mut c) = (
        Sim::start("node-1", &[]),
        Sim::start("node-2", &[]),
        Sim::start("node-3", &[]),
    );
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &nodes(&[&a, &b, &c]), FAST_BACKOFF);
    m.wait_ready().await;
    c.kill();
    let ids = ids("out", 500);
    send_all(&m, &ids, 3).await;
    // The healthy nodes converge while node-3 is still down.
    for sim in [&a, &b] {
        wait_until(&format!("{} has all 500", sim.node_id()), CONVERGE, || {
            has_all(sim, &ids)
        })
        .await;
    }
    assert!(c.received_ids().is_empty(), "node-3 was down");
    c.restart();
    wait_until("node-3 has all 500 after coming back", CONVERGE, || {
        has_all(&c, &ids)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_outage_across_a_manager_restart() {
    let (a, b, mut c) = (
        Sim::start("node-1", &[]),
        Sim::start("node-2", &[]),
        Sim::start("node-3", &[]),
    );
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &nodes(&[&a, &b, &c]), FAST_BACKOFF);
    m.wait_ready().await;
    c.kill();
    let ids = ids("rst", 300);
    send_all(&m, &ids, 3).await;
    let status = m.terminate().await;
    assert!(status.success(), "graceful shutdown exits 0, got {status}");
    m.restart();
    m.wait_ready().await;
    c.restart();
    for sim in [&a, &b, &c] {
        wait_until(&format!("{} has all 300", sim.node_id()), CONVERGE, || {
            has_all(sim, &ids)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_message_is_dead_lettered_and_the_rest_arrive() {
    let a = Sim::start("node-1", &[]);
    let b = Sim::start("node-2", &["--reject", "bad-7"]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &nodes(&[&a, &b]),
        &[
            "--max-attempts",
            "3",
            "--backoff-initial",
            "10ms",
            "--backoff-max",
            "50ms",
        ],
    );
    m.wait_ready().await;
    let mut ids = ids("ok", 50);
    ids.push("bad-7".to_string());
    send_all(&m, &ids, 2).await;
    let good: Vec<String> = ids.iter().filter(|i| *i != "bad-7").cloned().collect();
    wait_until("node-1 has everything", CONVERGE, || has_all(&a, &ids)).await;
    wait_until("node-2 has everything but the poison", CONVERGE, || {
        has_all(&b, &good)
    })
    .await;
    assert!(!b.received_ids().contains_key("bad-7"));

    // The dead letter is written once the third refusal comes back; read it from the store
    // of the stopped manager, retrying the stop-and-look until it is there.
    let mut dead = Vec::new();
    let deadline = std::time::Instant::now() + CONVERGE;
    while dead.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "bad-7 never reached node-2's dead letters"
        );
        let status = m.terminate().await;
        assert!(status.success());
        dead = with_store(data.path(), |s| s.dead_letters("node-2").unwrap());
        if dead.is_empty() {
            m.restart();
            m.wait_ready().await;
        }
    }
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].reason.contains("InvalidArgument"),
        "{}",
        dead[0].reason
    );
    let msg = dead[0].message.as_ref().expect("a full copy");
    assert_eq!(msg.msg_id, "bad-7");
    let store = Store::open(data.path()).unwrap();
    assert!(store.dead_letters("node-1").unwrap().is_empty());
    assert!(
        store.ranges("node-2", None, 10).unwrap().is_empty(),
        "nothing left live"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_node_is_probed_with_one_entry_at_a_time() {
    // A node never heard from gets a one-entry probe before any batch, and each probe while
    // it backs off carries one entry: the rest of its queue is not offered until it answers.
    let a = Sim::start("node-1", &[]);
    let mut b = Sim::start("node-2", &[]);
    b.kill();
    let data = tempfile::tempdir().unwrap();
    let metrics = Metrics {
        addr: format!("127.0.0.1:{}", free_port()),
    };
    let mut args = FAST_BACKOFF.to_vec();
    args.extend(["--metrics-listen", metrics.addr.as_str()]);
    let mut m = Manager::start(data.path(), &nodes(&[&a, &b]), &args);
    m.wait_ready().await;
    let ids = ids("probe", 300);
    send_all(&m, &ids, 2).await;
    wait_until("node-1 has all 300", CONVERGE, || has_all(&a, &ids)).await;
    let retries = r#"push_manager_deliveries_total{node="node-2",result="retry"}"#;
    let deadline = std::time::Instant::now() + CONVERGE;
    let mut failed = metrics.get(retries).await;
    while failed < 5.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "expected 5 failed offers to node-2 within {CONVERGE:?}, saw {failed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        failed = metrics.get(retries).await;
    }
    assert!(m.terminate().await.success());

    let entries = with_store(data.path(), |s| {
        s.entries(
            "node-2",
            QueueKind::Live,
            &Filter::default(),
            usize::MAX,
            push_manager::store::now_ms(),
        )
        .unwrap()
    });
    assert_eq!(entries.len(), 300, "node-2's queue is whole");
    let offered: Vec<(u64, u32)> = entries
        .iter()
        .filter(|e| e.attempts > 0)
        .map(|e| (e.seq, e.attempts))
        .collect();
    assert_eq!(
        offered.len(),
        1,
        "only the first entry was ever offered to the down node: {offered:?}"
    );
    assert_eq!(offered[0].0, entries[0].seq);
    assert!(offered[0].1 >= 5, "{offered:?}");

    b.restart();
    m.restart();
    m.wait_ready().await;
    wait_until("node-2 has all 300 once back", CONVERGE, || {
        has_all(&b, &ids)
    })
    .await;
}
