//! Quotas and backpressure with real processes: `--disk-quota` and `--max-pending-per-node`
//! refuse with RESOURCE_EXHAUSTED, queue nothing for a refused message, never drop what is
//! queued, and accept again once deliveries make room.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{has_all, payload, wait_until, with_store, Manager, Sim};
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::BroadCastReq;
use tonic::transport::Channel;
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(60);
const FAST_BACKOFF: &[&str] = &["--backoff-initial", "20ms", "--backoff-max", "200ms"];

fn req(id: &str, size: usize) -> BroadCastReq {
    BroadCastReq {
        msg_id: id.to_string(),
        payload: payload(0, size).into(),
        ..Default::default()
    }
}

/// Sends new ids `<prefix>-N` one at a time until one is refused; returns the acked ids and
/// the refusal.
async fn send_until_refused(
    client: &mut PushServerClient<Channel>,
    prefix: &str,
    size: usize,
    max: usize,
) -> (Vec<String>, tonic::Status) {
    let mut acked = Vec::new();
    for i in 0..max {
        let id = format!("{prefix}-{i}");
        match client.broadcast(req(&id, size)).await {
            Ok(r) => {
                assert!(!r.into_inner().duplicate, "{id} is new");
                acked.push(id);
            }
            Err(status) => return (acked, status),
        }
    }
    panic!("expected a refusal within {max} broadcasts; all {max} were acked");
}

/// Polls with new ids until one is acked (each refused one writes nothing); returns it.
async fn wait_accepted(client: &mut PushServerClient<Channel>, prefix: &str) -> String {
    let start = Instant::now();
    for i in 0.. {
        let id = format!("{prefix}-{i}");
        match client.broadcast(req(&id, 64)).await {
            Ok(_) => return id,
            Err(s) if s.code() == Code::ResourceExhausted && start.elapsed() < CONVERGE => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("expected the manager to accept again, got {s:?}"),
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_quota_refuses_the_first_write_over_it_and_recovers_after_delivery() {
    let mut node = Sim::start("node-1", &[]);
    let nodes = [("node-1", node.addr())];
    let data = tempfile::tempdir().unwrap();
    // The size of this data dir's store before any message: the quota leaves 256 KiB above.
    let mut m = Manager::start(data.path(), &nodes, FAST_BACKOFF);
    m.wait_ready().await;
    assert!(m.terminate().await.success());
    let base = with_store(data.path(), |s| s.size_on_disk().unwrap());
    let room: u64 = 256 * 1024;
    let quota = (base + room).to_string();
    let mut args = FAST_BACKOFF.to_vec();
    args.extend(["--disk-quota", quota.as_str()]);
    let mut m = Manager::start(data.path(), &nodes, &args);
    m.wait_ready().await;
    let mut client = m.client().await;

    // The node is down: nothing is delivered, nothing is reclaimed, the store only grows.
    node.kill();
    let size = 4096;
    let (acked, refused) = send_until_refused(&mut client, "q", size, 1000).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("disk quota") && refused.message().contains("--disk-quota"),
        "{}",
        refused.message()
    );
    assert!(refused.message().contains("nothing was queued"));
    // The first write over the quota is refused: everything acked fits in the room left,
    // and the count stopped close to it (the refused message did not fit).
    let acked_bytes = (acked.len() * size) as u64;
    eprintln!(
        "base {base}, quota {quota}: {} acked of {size} bytes; refusal: {}",
        acked.len(),
        refused.message()
    );
    assert!(
        acked_bytes <= room,
        "{} acked x {size} bytes > {room}",
        acked.len()
    );
    assert!(
        acked_bytes + 2 * (size as u64) > room / 2,
        "only {} acked: the estimate is far too coarse",
        acked.len()
    );
    // Still refused; a duplicate writes nothing and is answered as before.
    let again = client.broadcast(req("q-late", size)).await.unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    let dup = client.broadcast(req(&acked[0], size)).await.unwrap();
    assert!(dup.into_inner().duplicate);

    // The node comes back: everything acked arrives, payloads are reclaimed, and the
    // manager accepts again without a restart.
    node.restart();
    wait_until("the node has every acked message", CONVERGE, || {
        has_all(&node, &acked)
    })
    .await;
    let late = wait_accepted(&mut client, "after").await;
    wait_until("the node has the message accepted after", CONVERGE, || {
        has_all(&node, std::slice::from_ref(&late))
    })
    .await;
    // Nothing refused was ever queued, so nothing refused was delivered.
    let got: HashSet<String> = node.received_ids().into_keys().collect();
    let first_refused = format!("q-{}", acked.len());
    assert!(
        !got.contains(&first_refused),
        "a refused message was queued"
    );
    assert!(!got.contains("q-late"), "a refused message was queued");
    assert!(got
        .iter()
        .all(|id| acked.contains(id) || id.starts_with("after-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_limit_per_node_refuses_without_dropping() {
    let up = Sim::start("node-up", &[]);
    let mut down = Sim::start("node-down", &[]);
    let nodes = [("node-up", up.addr()), ("node-down", down.addr())];
    let data = tempfile::tempdir().unwrap();
    let mut args = FAST_BACKOFF.to_vec();
    args.extend(["--max-pending-per-node", "5"]);
    down.kill();
    let mut m = Manager::start(data.path(), &nodes, &args);
    m.wait_ready().await;
    let mut client = m.client().await;

    let (acked, refused) = send_until_refused(&mut client, "p", 100, 100).await;
    assert_eq!(acked.len(), 5, "exactly the limit is accepted");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-pending-per-node is 5"),
        "{}",
        refused.message()
    );
    // The node that is up still gets what was accepted, never the refused one.
    wait_until("node-up has the 5 accepted", CONVERGE, || {
        has_all(&up, &acked)
    })
    .await;
    assert!(!up.received_ids().contains_key("p-5"));

    down.restart();
    wait_until("node-down has the 5 accepted", CONVERGE, || {
        has_all(&down, &acked)
    })
    .await;
    let late = wait_accepted(&mut client, "later").await;
    for sim in [&up, &down] {
        wait_until("the later message arrives", CONVERGE, || {
            has_all(sim, std::slice::from_ref(&late))
        })
        .await;
        assert!(
            !sim.received_ids().contains_key("p-5"),
            "refused was queued"
        );
    }
}
