//! Crash safety with a real SIGKILL: concurrent senders keep broadcasting while the manager
//! is killed at random moments and restarted on the same data dir; afterwards every msg_id
//! that was acked OK has reached every node (duplicates allowed and counted).
//!
//! `PUSH_MANAGER_CRASH_ROUNDS` sets the number of kills (default 5, the CI run); a long run
//! on demand: `PUSH_MANAGER_CRASH_ROUNDS=200 cargo test --release --test crash`.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{payload, wait_until, Manager, Sim};
use push_manager::proto::BroadCastReq;
use push_manager::store::Store;
use rand::Rng;

const SENDERS: usize = 4;

/// One sender: unique msg_ids, recording each one acked OK; errors (the manager is down)
/// are not acks and are simply followed by the next message.
async fn sender(addr: String, n: usize, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>) {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("valid address")
        .timeout(Duration::from_secs(5))
        .connect_timeout(Duration::from_secs(1));
    let mut client =
        push_manager::proto::push_server_client::PushServerClient::new(endpoint.connect_lazy());
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("s{n}-{i}");
        i += 1;
        let req = BroadCastReq {
            msg_id: id.clone(),
            payload: payload(i, 512).into(),
            ..Default::default()
        };
        match client.broadcast(req).await {
            Ok(_) => acked.lock().unwrap().push(id),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_survive_sigkill_of_the_manager() {
    let rounds: usize = std::env::var("PUSH_MANAGER_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let sims = [
        Sim::start("node-1", &[]),
        Sim::start("node-2", &[]),
        Sim::start("node-3", &[]),
    ];
    let nodes: Vec<(&str, String)> = sims.iter().map(|s| (s.node_id(), s.addr())).collect();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &nodes, &["--backoff-max", "300ms"]);
    m.wait_ready().await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = (0..SENDERS)
        .map(|n| tokio::spawn(sender(m.addr(), n, stop.clone(), acked.clone())))
        .collect();

    let mut rng = rand::thread_rng();
    for round in 0..rounds {
        let before = acked.lock().unwrap().len();
        // Let traffic flow (and commit rounds happen) for a random while, then crash.
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..400))).await;
        m.kill9();
        let at_kill = acked.lock().unwrap().len();
        assert!(
            at_kill > before,
            "round {round}: senders made progress before the kill"
        );
        m.restart();
        m.wait_ready().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    assert!(acked.len() > 100, "only {} acked", acked.len());
    let mut duplicates = 0;
    for sim in &sims {
        wait_until(
            &format!("{} has all {} acked messages", sim.node_id(), acked.len()),
            Duration::from_secs(90),
            || {
                let got = sim.received_ids();
                acked.iter().all(|id| got.contains_key(id))
            },
        )
        .await;
        duplicates += sim.received_ids().values().map(|n| n - 1).sum::<usize>();
    }
    eprintln!(
        "{rounds} kills: {} acked, all delivered to 3 nodes, {duplicates} duplicate deliveries",
        acked.len()
    );

    // A clean stop leaves the store consistent and, once everything is delivered, empty.
    assert!(m.terminate().await.success());
    let store = Store::open(data.path()).unwrap();
    for sim in &sims {
        assert!(
            store.ranges(sim.node_id(), None, 10).unwrap().is_empty(),
            "{} has nothing left to deliver",
            sim.node_id()
        );
    }
    for id in acked.iter().take(200) {
        assert!(
            store.dedupe(id).unwrap().is_some(),
            "dedupe entry of {id} survived"
        );
    }
}
