//! Graceful shutdown with real processes: SIGTERM while deliveries are in flight to a slow
//! node drains (health NOT_SERVING, new Broadcasts UNAVAILABLE, exit 0) and loses nothing
//! acked; a second SIGTERM exits at once, still losing nothing acked.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{payload, wait_until, Manager, Sim};
use nix::sys::signal::Signal;
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::BroadCastReq;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const CONVERGE: Duration = Duration::from_secs(60);
/// The exit status of a drain cut short by a second signal (`shutdown::FORCED_EXIT_CODE`).
const FORCED_EXIT_CODE: i32 = push_manager::shutdown::FORCED_EXIT_CODE;

async fn send_all(client: &mut PushServerClient<Channel>, ids: &[String]) {
    for (i, id) in ids.iter().enumerate() {
        client
            .broadcast(BroadCastReq {
                msg_id: id.clone(),
                payload: payload(i, 256).into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("expected {id} to be acked, got {s:?}"));
    }
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Every id was answered OK by one of `sims` (across their restarts).
fn delivered(sims: &[&Sim], ids: &[String]) -> bool {
    let got: std::collections::HashSet<String> = sims
        .iter()
        .flat_map(|s| s.received_ids().into_keys())
        .collect();
    ids.iter().all(|id| got.contains(id))
}

/// Waits until the slow sim has answered at least one broadcast: from then on, with more
/// queued than the window holds, deliveries are in flight until the queue is done.
async fn wait_for_deliveries_in_flight(sim: &Sim) {
    wait_until("the slow node answered one broadcast", CONVERGE, || {
        !sim.received().is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_loses_nothing_acked() {
    // 40 messages, 10 in flight at a time, 1 s each: about 4 s of deliveries.
    let slow = Sim::start("slow", &["--latency-ms", "1000"]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("slow", slow.addr())], &[]);
    m.wait_ready().await;
    let mut client = m.client().await;
    let acked = ids("drain", 40);
    send_all(&mut client, &acked).await;
    wait_for_deliveries_in_flight(&slow).await;

    m.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    // Health flips while the in-flight deliveries finish, and the port keeps answering.
    let start = Instant::now();
    loop {
        match m.health().await {
            Ok(ServingStatus::NotServing) => break,
            Ok(ServingStatus::Serving) if start.elapsed() < CONVERGE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!(
                "expected health NOT_SERVING while draining, got {other:?}\n{}",
                m.log_tail(40)
            ),
        }
    }
    let refused = client
        .broadcast(BroadCastReq {
            msg_id: "during-drain".into(),
            payload: b"x".to_vec().into(),
            ..Default::default()
        })
        .await
        .expect_err("a Broadcast during the drain is refused");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");

    let status = m.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status}\n{}", m.log_tail(40));
    // Within --shutdown-timeout (10 s) and a margin for process start-up and teardown.
    assert!(signalled.elapsed() < Duration::from_secs(12));
    let log = m.log();
    assert!(log.contains("shutting down: draining"), "{log}");
    assert!(log.contains("push-manager stopped"), "{log}");

    // Nothing acked is lost: a restart delivers whatever the drain did not.
    m.restart();
    m.wait_ready().await;
    wait_until("the slow node has every acked message", CONVERGE, || {
        delivered(&[&slow], &acked)
    })
    .await;
    assert!(!slow.received_ids().contains_key("during-drain"));
    let status = m.terminate().await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_exits_at_once() {
    // Each delivery takes 4 s, two at a time: a graceful drain would wait seconds for the
    // ones in flight.
    let mut slow = Sim::start("slow", &["--latency-ms", "4000"]);
    let port = slow.port();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[("slow", slow.addr())],
        &[
            "--delivery-timeout",
            "60s",
            "--shutdown-timeout",
            "60s",
            "--max-in-flight",
            "2",
        ],
    );
    m.wait_ready().await;
    let mut client = m.client().await;
    let acked = ids("forced", 10);
    send_all(&mut client, &acked).await;
    wait_for_deliveries_in_flight(&slow).await;

    m.signal(Signal::SIGTERM);
    // The drain has begun, and is waiting for the deliveries in flight.
    let start = Instant::now();
    loop {
        match m.health().await {
            Ok(ServingStatus::NotServing) => break,
            Ok(ServingStatus::Serving) if start.elapsed() < CONVERGE => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!(
                "expected health NOT_SERVING while draining, got {other:?}\n{}",
                m.log_tail(40)
            ),
        }
    }
    assert!(
        m.is_running(),
        "the drain should still be waiting on the slow node"
    );

    m.signal(Signal::SIGTERM);
    let second = Instant::now();
    let status = m.wait_exit(Duration::from_secs(10)).await;
    assert!(
        second.elapsed() < Duration::from_millis(1500),
        "exited {:?} after the second signal",
        second.elapsed()
    );
    assert_eq!(status.code(), Some(FORCED_EXIT_CODE), "{status}");
    assert!(m.log().contains("second signal"), "{}", m.log_tail(20));

    // Nothing acked is lost: a fast node on the same address gets everything.
    slow.kill();
    let fast = Sim::start_on("slow", port, &[]);
    m.restart();
    m.wait_ready().await;
    wait_until(
        "every acked message is delivered after the restart",
        CONVERGE,
        || delivered(&[&fast, &slow], &acked),
    )
    .await;
    let status = m.terminate().await;
    assert!(status.success(), "{status}");
}
