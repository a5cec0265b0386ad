//! Slow and flapping nodes do not hold up the others: a node answering in 2 s, or one
//! killed and restarted every second, leaves delivery to healthy nodes as fast as without
//! it; and a flapping node's backoff stays under `--backoff-max`, so it catches up promptly
//! once it stays up.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{has_all, ids, send_all, wait_until, Manager, Sim};

/// Healthy nodes must have everything this soon after the last ack: far below what the
/// slow node needs (messages / window × latency = 10 × 2 s), generous for a slow machine.
const HEALTHY_BOUND: Duration = Duration::from_secs(8);
const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answering_in_two_seconds_does_not_slow_the_others() {
    let fast1 = Sim::start("fast1", &[]);
    let fast2 = Sim::start("fast2", &[]);
    let slow = Sim::start("slow", &["--latency-ms", "2000"]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[
            ("fast1", fast1.addr()),
            ("fast2", fast2.addr()),
            ("slow", slow.addr()),
        ],
        &[],
    );
    m.wait_ready().await;

    let msgs = ids("s", 100);
    let sending = Instant::now();
    send_all(&m, &msgs, 3).await;
    let acked = Instant::now();
    assert!(
        acked - sending < HEALTHY_BOUND,
        "acks do not wait for the slow node: {:?}",
        acked - sending
    );
    wait_until("the healthy nodes have everything", HEALTHY_BOUND, || {
        has_all(&fast1, &msgs) && has_all(&fast2, &msgs)
    })
    .await;
    let healthy = acked.elapsed();
    let slow_has = slow.received().len();
    assert!(
        slow_has < msgs.len(),
        "the slow node is really slower ({slow_has} of {} in {healthy:?})",
        msgs.len()
    );
    // And it gets everything in the end, none lost for being slow.
    wait_until("the slow node has everything", CONVERGE, || {
        has_all(&slow, &msgs)
    })
    .await;
    eprintln!(
        "healthy nodes: {healthy:?} after the last ack; slow node: {:?}",
        acked.elapsed()
    );
    assert!(m.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_node_does_not_slow_the_others_and_its_backoff_is_capped() {
    const BACKOFF_MAX: Duration = Duration::from_millis(500);
    let fast = Sim::start("steady", &[]);
    let mut flappy = Sim::start("flappy", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[("steady", fast.addr()), ("flappy", flappy.addr())],
        &["--backoff-initial", "50ms", "--backoff-max", "500ms"],
    );
    m.wait_ready().await;

    // Five cycles of: down for half a second, up for half a second; broadcasts all along.
    let msgs = ids("f", 300);
    let flapping = async {
        for _ in 0..5 {
            flappy.kill();
            // The fault schedule, not a wait for a condition.
            tokio::time::sleep(Duration::from_millis(500)).await;
            flappy.restart();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        flappy.kill();
    };
    let sending = async {
        for wave in msgs.chunks(60) {
            send_all(&m, wave, 2).await;
            wait_until("the steady node keeps up", HEALTHY_BOUND, || {
                has_all(&fast, wave)
            })
            .await;
        }
        Instant::now()
    };
    let ((), acked) = tokio::join!(flapping, sending);
    wait_until("the steady node has everything", HEALTHY_BOUND, || {
        has_all(&fast, &msgs)
    })
    .await;
    eprintln!("steady node: {:?} after the last ack", acked.elapsed());

    // Back for good: the worker's backoff is at most the cap (+50% jitter), so it catches
    // up within that plus the time to send 300 small messages.
    flappy.restart();
    let back = Instant::now();
    let bound = BACKOFF_MAX.mul_f64(1.5) + Duration::from_secs(5);
    wait_until("the flapping node catches up", bound, || {
        has_all(&flappy, &msgs)
    })
    .await;
    eprintln!(
        "flapping node caught up {:?} after it stayed up",
        back.elapsed()
    );
    assert!(m.is_running());
}
