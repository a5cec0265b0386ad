//! The accept path against a real manager: bad input gets INVALID_ARGUMENT naming the field
//! and the limit (before any other check), nothing is written, and the server keeps serving.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use common::{Manager, Sim};
use push_manager::proto::BroadCastReq;
use tonic::Code;

fn req(msg_id: &str, payload: Vec<u8>) -> BroadCastReq {
    BroadCastReq {
        msg_id: msg_id.into(),
        payload: payload.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_clearly_and_the_server_keeps_serving() {
    let sim = Sim::start("node-1", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("node-1", sim.addr())], &[]);
    m.wait_ready().await;
    let mut client = m.client().await;

    let cases: Vec<(BroadCastReq, &str)> = vec![
        (req("a", vec![]), "payload is empty"),
        (
            req("b", vec![1; 1_048_577]),
            "payload is 1048577 bytes; max_payload_bytes is 1048576",
        ),
        (
            req(&"x".repeat(129), vec![1]),
            "msg_id is 129 bytes; max is 128 bytes",
        ),
        (req("tab\there", vec![1]), "msg_id has byte 0x09"),
    ];
    for (r, expected) in cases {
        let id = r.msg_id.clone();
        let status = client.broadcast(r).await.expect_err("rejected");
        assert_eq!(status.code(), Code::InvalidArgument, "{id}: {status:?}");
        assert!(
            status.message().contains(expected),
            "{id}: {}",
            status.message()
        );
    }
    // The limits are inclusive.
    let ok = client
        .broadcast(req(&"y".repeat(128), vec![2; 1_048_576]))
        .await
        .expect("a payload of exactly max_payload_bytes and a 128-byte msg_id are accepted")
        .into_inner();
    assert_eq!((ok.node_count, ok.duplicate), (1, false));
    // Nothing was written for the rejected ones: "a" is not a duplicate now.
    let a = client
        .broadcast(req("a", vec![3]))
        .await
        .unwrap()
        .into_inner();
    assert!(!a.duplicate);
    let again = client
        .broadcast(req("a", vec![4, 4]))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "same msg_id, any payload, is a duplicate");
    assert_eq!(again.node_count, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_known_node_is_unavailable_but_bad_input_is_still_invalid_first() {
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &[]);
    m.wait_ready().await;
    let mut client = m.client().await;
    let status = client.broadcast(req("a", vec![1])).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("no connect-nodes known"),
        "{status:?}"
    );
    let status = client.broadcast(req("a", vec![])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}
