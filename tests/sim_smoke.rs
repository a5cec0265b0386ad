//! The connect-node sim on its own: what it records and how its failure knobs answer.
//! Other tests trust the sim, so it is checked here without a manager.

mod common;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{parse_records, payload, Record, Sim};
use push_manager::proto::{BroadCastBatchReq, BroadCastReq};
use tonic::Code;

/// A request as a manager would deliver it.
fn delivery(msg_id: &str, seq: u64, attempt: u32) -> BroadCastReq {
    BroadCastReq {
        msg_id: msg_id.to_string(),
        payload: payload(seq as usize, 16).into(),
        manager_id: "m1".to_string(),
        seq,
        attempt,
        ..Default::default()
    }
}

/// A record line's identity: msg_id, seq, attempt, manager_id.
type Key = (String, u64, u32, String);

fn record(msg_id: &str, seq: u64, attempt: u32) -> Key {
    (msg_id.to_string(), seq, attempt, "m1".to_string())
}

fn keys(records: Vec<Record>) -> Vec<Key> {
    records
        .into_iter()
        .map(|r| (r.msg_id, r.seq, r.attempt, r.manager_id))
        .collect()
}

#[tokio::test]
async fn records_each_accepted_delivery_with_seq_and_attempt() {
    let sim = Sim::start("a", &[]);
    let mut client = sim.client().await;
    for (msg_id, seq, attempt) in [("m-1", 1, 1), ("m-2", 2, 1), ("m-1", 1, 2)] {
        let reply = client
            .broadcast(delivery(msg_id, seq, attempt))
            .await
            .expect("the sim answers OK by default")
            .into_inner();
        assert_eq!(reply.msg_id, msg_id);
    }

    assert_eq!(
        keys(sim.received()),
        vec![
            record("m-1", 1, 1),
            record("m-2", 2, 1),
            record("m-1", 1, 2)
        ]
    );
    let expected: HashMap<String, usize> = [("m-1".to_string(), 2), ("m-2".to_string(), 1)].into();
    assert_eq!(sim.received_ids(), expected);
}

#[tokio::test]
async fn reject_answers_invalid_argument_for_that_id_only() {
    let sim = Sim::start("a", &["--reject", "bad", "--reject", "worse"]);
    let mut client = sim.client().await;

    for msg_id in ["bad", "worse"] {
        let status = client
            .broadcast(delivery(msg_id, 1, 1))
            .await
            .expect_err("rejected id");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    client
        .broadcast(delivery("good", 2, 1))
        .await
        .expect("an id not rejected is accepted");

    assert_eq!(keys(sim.received()), vec![record("good", 2, 1)]);
}

#[tokio::test]
async fn fail_rate_one_answers_unavailable_and_records_nothing() {
    let sim = Sim::start("a", &["--fail-rate", "1.0"]);
    let mut client = sim.client().await;
    for seq in 1..=5 {
        let status = client
            .broadcast(delivery("m", seq, 1))
            .await
            .expect_err("always fails");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    assert!(sim.received().is_empty());
}

#[tokio::test]
async fn malformed_msg_id_is_invalid_argument() {
    let sim = Sim::start("a", &[]);
    let mut client = sim.client().await;
    for msg_id in ["", "has space", "tab\there"] {
        let status = client
            .broadcast(delivery(msg_id, 1, 1))
            .await
            .expect_err("malformed id");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{msg_id:?}: {status:?}"
        );
    }
    assert!(sim.received().is_empty());
}

#[tokio::test]
async fn latency_delays_the_answer() {
    let sim = Sim::start("a", &["--latency-ms", "200"]);
    let mut client = sim.client().await;
    let start = Instant::now();
    client
        .broadcast(delivery("m", 1, 1))
        .await
        .expect("slow but OK");
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "answered after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_batch_is_answered_item_by_item_and_only_ok_items_are_recorded() {
    let sim = Sim::start("a", &["--reject", "bad"]);
    let mut client = sim.client().await;
    let batch = BroadCastBatchReq {
        messages: vec![
            delivery("m1", 1, 1),
            delivery("bad", 2, 1),
            delivery("m3", 3, 2),
        ],
    };
    let results = client
        .broadcast_batch(batch)
        .await
        .expect("batch answered")
        .into_inner()
        .results;
    let codes: Vec<i32> = results.iter().map(|r| r.code).collect();
    assert_eq!(codes, [0, Code::InvalidArgument as i32, 0], "{results:?}");
    assert_eq!(
        results[0].reply.as_ref().map(|r| r.msg_id.as_str()),
        Some("m1")
    );
    assert!(results[1].reply.is_none() && results[1].error.contains("--reject"));
    let received = sim.received();
    assert!(received.iter().all(|r| r.call.as_deref() == Some("batch")));
    assert_eq!(keys(received), [record("m1", 1, 1), record("m3", 3, 2)]);
}

#[tokio::test]
async fn unary_only_answers_batches_unimplemented() {
    let sim = Sim::start("a", &["--unary-only"]);
    let mut client = sim.client().await;
    let batch = BroadCastBatchReq {
        messages: vec![delivery("m", 1, 1)],
    };
    let status = client
        .broadcast_batch(batch)
        .await
        .expect_err("--unary-only");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert!(sim.received().is_empty());
    client
        .broadcast(delivery("m", 1, 1))
        .await
        .expect("unary still works");
    assert_eq!(sim.received().len(), 1);
}

#[tokio::test]
async fn sigterm_exits_zero_and_reports_the_count() {
    let mut sim = Sim::start("a", &["--fail-rate", "0"]);
    let mut client = sim.client().await;
    client
        .broadcast(delivery("m", 1, 1))
        .await
        .expect("accepted");

    let status = sim.terminate().await;
    assert!(
        status.success(),
        "exit status {status}; stderr:\n{}",
        sim.log_tail(20)
    );
    assert!(
        sim.log_tail(5).contains("received 1 broadcasts"),
        "stderr:\n{}",
        sim.log_tail(20)
    );
}

#[tokio::test]
async fn restart_after_kill_keeps_address_and_record() {
    let mut sim = Sim::start("a", &[]);
    let port = sim.port();
    sim.client()
        .await
        .broadcast(delivery("before", 1, 1))
        .await
        .expect("accepted");

    sim.kill();
    assert!(!sim.is_running());
    sim.restart();
    assert_eq!(sim.port(), port, "the node comes back at the same address");
    sim.client()
        .await
        .broadcast(delivery("after", 2, 1))
        .await
        .expect("accepted");

    assert_eq!(
        keys(sim.received()),
        vec![record("before", 1, 1), record("after", 2, 1)]
    );
}

#[tokio::test]
async fn restart_ends_a_torn_last_line_so_new_records_parse() {
    let mut sim = Sim::start("a", &[]);
    sim.client()
        .await
        .broadcast(delivery("before", 1, 1))
        .await
        .expect("accepted");
    sim.kill();
    // What a SIGKILL in the middle of a write could leave behind.
    let mut file = OpenOptions::new()
        .append(true)
        .open(sim.record_path())
        .expect("the record file exists");
    file.write_all(b"torn\t2").expect("append a torn line");

    sim.restart();
    sim.client()
        .await
        .broadcast(delivery("after", 3, 1))
        .await
        .expect("accepted");

    assert_eq!(
        keys(sim.received()),
        vec![record("before", 1, 1), record("after", 3, 1)]
    );
}

#[test]
fn out_of_range_fail_rate_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_connect-node-sim"))
        .args(["--fail-rate", "1.5"])
        .output()
        .expect("the sim binary runs");
    assert_eq!(
        output.status.code(),
        Some(2),
        "clap's usage-error exit code"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("from 0.0 to 1.0"), "stderr: {stderr}");
    assert!(output.stdout.is_empty(), "nothing on stdout before binding");
}

#[test]
fn parse_records_skips_torn_and_unfinished_lines() {
    let text = "a\t1\t1\tm1\n\
                torn-by-kil\n\
                b\t2\t3\t\n\
                d\t4\t1\tm1\t1700000000000\t500\n\
                c\t3\t1\tm";
    let expected = vec![
        record("a", 1, 1),
        ("b".to_string(), 2, 3, String::new()),
        record("d", 4, 1),
    ];
    assert_eq!(keys(parse_records(text)), expected);
}

#[test]
fn payload_is_deterministic_and_sized() {
    assert_eq!(payload(7, 0), Vec::<u8>::new());
    assert_eq!(payload(7, 12), b"payload-7:pa".to_vec());
    assert_eq!(payload(7, 1000).len(), 1000);
}
