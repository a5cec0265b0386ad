//! `BroadcastBatch` with real processes: on the manager (whole-call limits, per-item
//! results, one commit round and so one fsync per call), and toward nodes (batches to a node
//! that implements the call, unary calls to one that answers UNIMPLEMENTED, per-item refusals
//! handled like unary ones).

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::metrics::Metrics;
use common::{free_port, has_all, ids, payload, wait_until, Manager, Sim, FAST_RETRY};
use push_manager::proto::{BroadCastBatchReq, BroadCastReq};
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(60);

fn item(msg_id: &str, size: usize) -> BroadCastReq {
    BroadCastReq {
        msg_id: msg_id.to_string(),
        payload: payload(0, size).into(),
        ..Default::default()
    }
}

/// A manager on `sims` with its metrics on a free port.
async fn manager(data: &std::path::Path, sims: &[&Sim], extra: &[&str]) -> (Manager, Metrics) {
    let nodes: Vec<(&str, String)> = sims.iter().map(|s| (s.node_id(), s.addr())).collect();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics-listen", addr.as_str()];
    args.extend(extra);
    let mut m = Manager::start(data, &nodes, &args);
    m.wait_ready().await;
    (m, Metrics { addr })
}

#[tokio::test]
async fn a_batch_is_one_commit_round_and_a_bad_item_fails_alone() {
    let sim = Sim::start("node-1", &[]);
    let data = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(data.path(), &[&sim], &[]).await;
    let mut client = m.client().await;
    client
        .broadcast(item("earlier", 10))
        .await
        .expect("unary accepted");
    let rounds = "push_manager_commit_batch_size_count";
    let messages = "push_manager_commit_batch_size_sum";
    let rounds_before = metrics.get(rounds).await;
    let messages_before = metrics.get(messages).await;

    let batch = vec![
        item("a", 100),
        item("", 5), // the manager assigns an id
        item("bad id", 5),
        item("empty", 0),
        item("a", 7), // a duplicate of an item of the same call
        item("earlier", 3),
        item("b", 1000),
    ];
    let results = client
        .broadcast_batch(BroadCastBatchReq { messages: batch })
        .await
        .expect("the call is answered")
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    let invalid = Code::InvalidArgument as i32;
    assert_eq!(codes, [0, 0, invalid, invalid, 0, 0, 0], "{results:?}");
    assert!(
        results[2].error.contains("msg_id has byte 0x20"),
        "{results:?}"
    );
    assert!(results[3].error.contains("payload is empty"), "{results:?}");
    assert!(results[2].reply.is_none() && results[3].reply.is_none());
    let reply = |i: usize| results[i].reply.clone().unwrap();
    assert_eq!((reply(0).msg_id.as_str(), reply(0).duplicate), ("a", false));
    let assigned = reply(1).msg_id;
    assert!(!assigned.is_empty() && !reply(1).duplicate);
    assert_eq!((reply(4).msg_id.as_str(), reply(4).duplicate), ("a", true));
    assert_eq!(
        (reply(5).msg_id.as_str(), reply(5).duplicate),
        ("earlier", true)
    );
    assert!((0..7)
        .filter(|i| codes[*i] == 0)
        .all(|i| reply(i).node_count == 1));

    // Three new messages, made durable by one round: one fsync for the whole call.
    assert_eq!(metrics.get(rounds).await - rounds_before, 1.0);
    assert_eq!(metrics.get(messages).await - messages_before, 3.0);

    let want: Vec<String> = ["earlier", "a", "b", assigned.as_str()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    wait_until("node-1 has the accepted items", CONVERGE, || {
        has_all(&sim, &want)
    })
    .await;
    let got = sim.received_ids();
    assert_eq!(got.len(), 4, "nothing else delivered: {got:?}");
    assert_eq!(got["a"], 1, "the duplicate was not queued again");
}

#[tokio::test]
async fn calls_over_the_limits_are_refused_whole_and_write_nothing() {
    let sim = Sim::start("node-1", &[]);
    let data = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(data.path(), &[&sim], &[]).await;
    let mut client = m.client().await;
    let rounds = "push_manager_commit_batch_size_count";
    let before = metrics.get(rounds).await;

    let refused = |batch: Vec<BroadCastReq>| {
        let mut client = client.clone();
        async move {
            client
                .broadcast_batch(BroadCastBatchReq { messages: batch })
                .await
                .expect_err("refused whole")
        }
    };
    let empty = refused(Vec::new()).await;
    assert_eq!(empty.code(), Code::InvalidArgument, "{empty:?}");
    assert!(empty.message().contains("1 to 1000"), "{empty:?}");

    let many = refused((0..1001).map(|i| item(&format!("n{i}"), 1)).collect()).await;
    assert_eq!(many.code(), Code::InvalidArgument, "{many:?}");
    assert!(many.message().contains("1001 messages"), "{many:?}");

    // 16 payloads of max_payload_bytes: each item is valid, the call is over 16 MiB.
    let big = refused((0..16).map(|i| item(&format!("big{i}"), 1 << 20)).collect()).await;
    assert_eq!(big.code(), Code::InvalidArgument, "{big:?}");
    assert!(big.message().contains("at most 16777216 bytes"), "{big:?}");

    // 1000 items are fine.
    let results = client
        .broadcast_batch(BroadCastBatchReq {
            messages: ids("ok", 1000).iter().map(|id| item(id, 10)).collect(),
        })
        .await
        .expect("1000 items")
        .into_inner()
        .results;
    assert!(results.iter().all(|r| r.code == 0));
    assert_eq!(
        metrics.get(rounds).await - before,
        1.0,
        "only the last call wrote"
    );
    wait_until("node-1 has the 1000", CONVERGE, || {
        has_all(&sim, &ids("ok", 1000))
    })
    .await;
    let got = sim.received_ids();
    assert!(
        got.keys().all(|k| k.starts_with("ok")),
        "nothing of the refused calls was delivered"
    );
}

#[tokio::test]
async fn batch_capable_nodes_get_batches_and_others_fall_back_to_unary() {
    let batching = Sim::start("batching", &["--reject", "m-7"]);
    let unary = Sim::start("unary", &["--unary-only", "--reject", "m-7"]);
    let data = tempfile::tempdir().unwrap();
    let (m, metrics) = manager(data.path(), &[&batching, &unary], FAST_RETRY).await;
    let mut client = m.client().await;
    let all = ids("m", 300);
    for chunk in all.chunks(100) {
        let results = client
            .broadcast_batch(BroadCastBatchReq {
                messages: chunk.iter().map(|id| item(id, 64)).collect(),
            })
            .await
            .expect("accepted")
            .into_inner()
            .results;
        assert!(results.iter().all(|r| r.code == 0), "{results:?}");
    }
    let delivered: Vec<String> = all.iter().filter(|id| *id != "m-7").cloned().collect();
    for sim in [&batching, &unary] {
        wait_until(
            &format!("{} has everything", sim.node_id()),
            CONVERGE,
            || has_all(sim, &delivered),
        )
        .await;
    }
    // The refused item is dead-lettered after --max-attempts 2 on both paths.
    for node in ["batching", "unary"] {
        metrics
            .wait_for(
                &format!("push_manager_dead_letters_total{{node=\"{node}\"}}"),
                1.0,
            )
            .await;
    }

    let batched = batching.received();
    assert!(
        batched.iter().all(|r| r.call.as_deref() == Some("batch")),
        "a batch-capable node gets only batches"
    );
    let unaried = unary.received();
    assert!(
        unaried.iter().all(|r| r.call.as_deref() == Some("unary")),
        "an UNIMPLEMENTED node gets unary calls"
    );
    // The batch it refused as a whole was never offered: attempts start at 1 there too.
    assert!(
        unaried.iter().all(|r| r.attempt == 1),
        "{:?}",
        unaried.iter().find(|r| r.attempt != 1)
    );
    for sim in [&batching, &unary] {
        assert!(
            !sim.received_ids().contains_key("m-7"),
            "the refused item never counts as delivered"
        );
    }
}
