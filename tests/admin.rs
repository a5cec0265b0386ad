//! The admin API on a running manager: hold/release (and the hold surviving a restart),
//! replay and purge while deliveries run, drain, and `--no-admin`.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{has_all, ids, payload, wait_until, Manager, Sim, FAST_RETRY};
use push_manager::proto::admin::admin_client::AdminClient;
use push_manager::proto::admin::*;
use push_manager::proto::BroadCastReq;
use tonic::transport::{Channel, Endpoint};

const CONVERGE: Duration = Duration::from_secs(60);

async fn admin(m: &Manager) -> AdminClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", m.addr()))
        .unwrap()
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .unwrap();
    AdminClient::new(channel)
}

async fn nodes(m: &Manager) -> BTreeMap<String, NodeInfo> {
    admin(m)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.node_id.clone(), n))
        .collect()
}

/// Polls ListNodes until `f` holds for the named node.
async fn wait_node(m: &Manager, id: &str, what: &str, f: impl Fn(&NodeInfo) -> bool) {
    let start = Instant::now();
    loop {
        let all = nodes(m).await;
        if all.get(id).is_some_and(&f) {
            return;
        }
        assert!(
            start.elapsed() < CONVERGE,
            "timed out waiting until {what}: {:?}",
            all.get(id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn send(m: &Manager, ids: &[String], topic: &str) {
    let mut client = m.client().await;
    for (i, id) in ids.iter().enumerate() {
        client
            .broadcast(BroadCastReq {
                msg_id: id.clone(),
                payload: payload(i, 64).into(),
                topic: topic.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_parks_a_node_across_a_restart_and_release_delivers_its_queue() {
    let held = Sim::start("held", &[]);
    let free = Sim::start("free", &[]);
    let data = tempfile::tempdir().unwrap();
    let nodes_cfg = [("held", held.addr()), ("free", free.addr())];
    let mut m = Manager::start(data.path(), &nodes_cfg, FAST_RETRY);
    m.wait_ready().await;

    let info = admin(&m)
        .await
        .hold_node(NodeRequest {
            node_id: "held".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.held);
    assert_eq!(info.state, "held");
    let unknown = admin(&m)
        .await
        .hold_node(NodeRequest {
            node_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // The free node is the control: once it has everything, the held one would have too.
    let first = ids("a", 5);
    send(&m, &first, "t").await;
    wait_until("free has the first batch", CONVERGE, || {
        has_all(&free, &first)
    })
    .await;
    assert!(held.received().is_empty(), "held: nothing delivered");
    wait_node(&m, "held", "held shows 5 pending", |n| n.pending == 5).await;

    // The hold survives a restart.
    assert!(m.terminate().await.success());
    m.restart();
    m.wait_ready().await;
    let after = nodes(&m).await;
    assert!(after["held"].held, "{:?}", after["held"]);
    assert_eq!(after["held"].state, "held");
    assert_eq!(after["held"].pending, 5);
    let second = ids("b", 3);
    send(&m, &second, "t").await;
    wait_until("free has the second batch", CONVERGE, || {
        has_all(&free, &second)
    })
    .await;
    assert!(held.received().is_empty(), "still held after the restart");

    let info = admin(&m)
        .await
        .release_node(NodeRequest {
            node_id: "held".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!info.held);
    assert_ne!(info.state, "held");
    let everything: Vec<String> = first.iter().chain(&second).cloned().collect();
    wait_until("the released node gets its queue", CONVERGE, || {
        has_all(&held, &everything)
    })
    .await;
    wait_node(&m, "held", "held's queue is empty", |n| n.pending == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_purge_on_a_running_manager() {
    let mut sim = Sim::start("n1", &["--reject", "bad-1"]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("n1", sim.addr())], FAST_RETRY);
    m.wait_ready().await;
    send(&m, &["bad-1".to_string()], "poison").await;
    wait_node(&m, "n1", "bad-1 is dead-lettered", |n| {
        n.dead_letter == 1 && n.pending == 0
    })
    .await;
    let mut client = admin(&m).await;
    let peek = client
        .peek_queue(PeekQueueRequest {
            node_id: "n1".into(),
            dead_letter: true,
            limit: 0,
            filter: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(peek.entries.len(), 1);
    assert_eq!(peek.entries[0].msg_id, "bad-1");
    assert_eq!(peek.entries[0].attempts, 2);
    assert!(peek.entries[0].dead_reason.contains("InvalidArgument"));

    // An empty replay request is refused rather than replaying everything.
    let refused = client
        .replay_dead_letters(ReplayDeadLettersRequest {
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // The node is fixed; the replayed dead letter reaches it while the manager runs.
    let port = sim.port();
    sim.kill();
    let mut sim = Sim::start_on("n1", port, &[]);
    let out = client
        .replay_dead_letters(ReplayDeadLettersRequest {
            node_id: "n1".into(),
            filter: Some(Filter {
                msg_id: Some("bad-1".into()),
                ..Default::default()
            }),
            all: false,
            dry_run: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.replayed_count, 1);
    assert!(out.replayed[0].new_seq > out.replayed[0].entry.as_ref().unwrap().seq);
    wait_until("the replayed message is delivered", CONVERGE, || {
        sim.received_ids().contains_key("bad-1")
    })
    .await;
    wait_node(&m, "n1", "n1 is empty", |n| {
        n.pending == 0 && n.dead_letter == 0
    })
    .await;

    // Purge: refused without confirm; with it, exactly the matching entries go.
    sim.kill();
    let drop_ids = ids("drop", 4);
    let keep_ids = ids("keep", 3);
    send(&m, &drop_ids, "stale").await;
    send(&m, &keep_ids, "fresh").await;
    wait_node(&m, "n1", "7 queued while n1 is down", |n| n.pending == 7).await;
    let stale = Some(Filter {
        topic: Some("stale".into()),
        ..Default::default()
    });
    let refused = client
        .purge_queue(PurgeQueueRequest {
            node_id: "n1".into(),
            filter: stale.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    let dry = client
        .purge_queue(PurgeQueueRequest {
            node_id: "n1".into(),
            filter: stale.clone(),
            dry_run: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dry.purged_count, 4);
    assert_eq!(nodes(&m).await["n1"].pending, 7, "a dry run purges nothing");
    let purged = client
        .purge_queue(PurgeQueueRequest {
            node_id: "n1".into(),
            filter: stale,
            confirm: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purged_count, 4);
    let got: Vec<&str> = purged.purged.iter().map(|e| e.msg_id.as_str()).collect();
    assert_eq!(got, ["drop-0", "drop-1", "drop-2", "drop-3"]);
    assert_eq!(nodes(&m).await["n1"].pending, 3);

    sim.restart();
    wait_until("n1 gets what was kept", CONVERGE, || {
        has_all(&sim, &keep_ids)
    })
    .await;
    let got = sim.received_ids();
    assert!(
        drop_ids.iter().all(|id| !got.contains_key(id)),
        "purged entries are never delivered: {got:?}"
    );
    wait_node(&m, "n1", "n1 is empty again", |n| n.pending == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_broadcasts_and_reports_empty_queues() {
    let sim = Sim::start("n1", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("n1", sim.addr())], FAST_RETRY);
    m.wait_ready().await;
    let sent = ids("d", 20);
    send(&m, &sent, "t").await;
    let reply = admin(&m)
        .await
        .drain(DrainRequest { wait_ms: 30_000 })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.empty, "{:?}", reply.nodes);
    assert!(has_all(&sim, &sent));
    let refused = m
        .client()
        .await
        .broadcast(BroadCastReq {
            msg_id: "late".into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let listed = admin(&m)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(listed.draining);
    assert!(m.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_admin_switches_the_api_off() {
    let sim = Sim::start("n1", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("n1", sim.addr())], &["--no-admin"]);
    m.wait_ready().await;
    let err = admin(&m)
        .await
        .list_nodes(ListNodesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_push-manager"))
        .args(["admin", "--server", &m.addr(), "nodes"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("--no-admin"), "{msg}");
}
