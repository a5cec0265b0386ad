//! etcd failures against a real etcd: an outage (the manager keeps accepting and delivering,
//! logs it once, and picks up new nodes once etcd is back), a manager restart while etcd is
//! down (known nodes resume from the store), and a watch that falls behind a compaction.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::etcd::{wait_for_node_count, Etcd};
use common::{has_all, ids, send_all, wait_until, Manager, Sim};
use nix::sys::signal::Signal;

const PREFIX: &str = "/services/connect-node/";
const DISCOVER: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);
const FAST_BACKOFF: &[&str] = &["--backoff-initial", "20ms", "--backoff-max", "300ms"];

fn manager_args(etcd: &str) -> Vec<&str> {
    let mut args = vec!["--etcd", etcd];
    args.extend_from_slice(FAST_BACKOFF);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_keeps_delivery_going_and_new_nodes_come_after_it() {
    let mut etcd = Etcd::start().await;
    let url = etcd.url();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &manager_args(&url));
    m.wait_ready().await;
    let a = Sim::start("a", &["--etcd", &url]);
    wait_for_node_count(&m, 1, "a", DISCOVER).await;

    etcd.kill();
    wait_until("the manager notices the outage", DISCOVER, || {
        m.log().contains("etcd unavailable")
    })
    .await;
    let during = ids("during", 100);
    send_all(&m, &during, 1).await;
    wait_until("a has everything sent during the outage", CONVERGE, || {
        has_all(&a, &during)
    })
    .await;

    etcd.restart().await;
    wait_until("the manager sees etcd back", DISCOVER, || {
        m.log().contains("etcd answers again")
    })
    .await;
    let b = Sim::start("b", &["--etcd", &url]);
    wait_for_node_count(&m, 2, "b", DISCOVER).await;
    let after = ids("after", 20);
    send_all(&m, &after, 2).await;
    wait_until("both have what came after", CONVERGE, || {
        has_all(&a, &after) && has_all(&b, &after)
    })
    .await;

    let log = m.log();
    assert_eq!(
        log.matches("etcd unavailable").count(),
        1,
        "one outage, one warning, however many retries:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_etcd_down_resumes_known_nodes_from_the_store() {
    let mut etcd = Etcd::start().await;
    let url = etcd.url();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &manager_args(&url));
    m.wait_ready().await;
    let a = Sim::start("a", &["--etcd", &url]);
    let b = Sim::start("b", &["--etcd", &url, "--etcd-format", "naming"]);
    wait_for_node_count(&m, 2, "ab", DISCOVER).await;

    assert!(m.terminate().await.success());
    etcd.kill();
    m.restart();
    m.wait_ready().await;
    assert!(
        m.log().contains("etcd did not answer at start"),
        "{}",
        m.log_tail(20)
    );
    let resumed = ids("resumed", 30);
    send_all(&m, &resumed, 2).await;
    wait_until("both nodes get broadcasts without etcd", CONVERGE, || {
        has_all(&a, &resumed) && has_all(&b, &resumed)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_falls_behind_a_compaction_recovers() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &manager_args(&url));
    m.wait_ready().await;
    let a = Sim::start("a", &["--etcd", &url]);
    wait_for_node_count(&m, 1, "a", DISCOVER).await;

    // Freeze the manager so its watch stops reading. Enough events (about 40 MiB over 300
    // revisions) overflow the watch stream's buffers, so etcd marks the watcher as lagging;
    // after the compaction it can only tell it the history is gone.
    m.signal(Signal::SIGSTOP);
    let mut client = etcd.client().await;
    let junk = "x".repeat(128 << 10);
    for i in 0..300 {
        client
            .put(format!("{PREFIX}bulk"), format!("{i}{junk}"), None)
            .await
            .unwrap();
    }
    let late = Sim::start("late", &[]);
    etcd.put(&format!("{PREFIX}late"), &late.addr()).await;
    etcd.compact_all().await;
    m.signal(Signal::SIGCONT);

    wait_until(
        "the manager restarts its watch after the compaction",
        DISCOVER,
        || m.log().contains("fell behind a compaction"),
    )
    .await;
    wait_for_node_count(&m, 2, "late", DISCOVER).await;
    let after = ids("after", 10);
    send_all(&m, &after, 2).await;
    wait_until("both nodes get broadcasts", CONVERGE, || {
        has_all(&a, &after) && has_all(&late, &after)
    })
    .await;
}
