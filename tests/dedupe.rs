//! The dedupe window (`--dedupe-window 1s`): a duplicate within the window answers
//! `duplicate = true`; after it the same msg_id is accepted anew; expired dedupe entries
//! are removed from the store in the background (the reclaimer thread, through the round
//! index, without scanning the dedupe keyspace).

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{has_all, ids, wait_until, Manager, Sim};
use push_manager::proto::{BroadCastReply, BroadCastReq};
use push_manager::store::Store;

const WINDOW: Duration = Duration::from_secs(1);
/// The reclaimer looks for expired entries every 200 ms: an expired entry is gone at most
/// one period (plus the pass itself) after the window ends; 2 s leaves ten, for slow machines.
const HOUSEKEEPING_BOUND: Duration = Duration::from_secs(2);
const CONVERGE: Duration = Duration::from_secs(60);

async fn send(m: &Manager, id: &str, body: &str) -> BroadCastReply {
    m.client()
        .await
        .broadcast(BroadCastReq {
            msg_id: id.to_string(),
            payload: body.as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_msg_id_is_a_duplicate_within_the_window_only_and_old_entries_are_removed() {
    let node = Sim::start("a", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[("a", node.addr())],
        &["--dedupe-window", "1s"],
    );
    m.wait_ready().await;

    let first = send(&m, "same", "one").await;
    assert!(!first.duplicate);
    let again = send(&m, "same", "two, another payload").await;
    assert!(again.duplicate, "within the window");
    assert_eq!(again.node_count, 1);
    let old = ids("old", 20);
    for id in &old {
        assert!(!send(&m, id, "x").await.duplicate);
    }
    let last_old = Instant::now();

    // The window is over (a time condition): the same msg_id is a new message.
    wait_until("the window is over", CONVERGE, || {
        last_old.elapsed() > WINDOW + Duration::from_millis(100)
    })
    .await;
    let anew = send(&m, "same", "three").await;
    assert!(!anew.duplicate, "accepted anew after the window");
    assert_eq!(anew.node_count, 1);
    let dup = send(&m, "same", "four").await;
    assert!(dup.duplicate, "and it opens a new window");
    wait_until("the node has both copies", CONVERGE, || {
        node.received_ids().get("same") == Some(&2) && has_all(&node, &old)
    })
    .await;

    // The reclaimer removes the expired entries by itself.
    wait_until("the reclaimer has had its chance", CONVERGE, || {
        last_old.elapsed() > WINDOW + HOUSEKEEPING_BOUND
    })
    .await;
    assert!(m.terminate().await.success());
    let store = Store::open_read_only(data.path()).unwrap();
    let left: Vec<&String> = old
        .iter()
        .filter(|id| store.dedupe(id).unwrap().is_some())
        .collect();
    assert!(left.is_empty(), "expired dedupe entries left: {left:?}");
}
