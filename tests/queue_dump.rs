//! `queue-dump` on a store left by a real run, and the admin API on the same state: counts
//! match what was accepted and each other; list, show and export/import round-trip; replay
//! puts a dead letter back and it is then delivered; a locked store is refused clearly.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{payload, wait_until, Manager, Sim, FAST_RETRY};
use push_manager::proto::BroadCastReq;
use serde_json::Value;

const QUEUE_DUMP: &str = env!("CARGO_BIN_EXE_queue-dump");
const PUSH_MANAGER: &str = env!("CARGO_BIN_EXE_push-manager");
const CONVERGE: Duration = Duration::from_secs(60);

fn queue_dump(data: &Path, args: &[&str]) -> Output {
    Command::new(QUEUE_DUMP)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("PUSH_MANAGER_DATA_DIR")
        .output()
        .unwrap()
}

/// Runs queue-dump, expecting success; returns stdout.
fn ok(data: &Path, args: &[&str]) -> String {
    let out = queue_dump(data, args);
    assert!(
        out.status.success(),
        "queue-dump {args:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// node_id -> (pending, dead_letter) from `{"nodes": [...]}`.
fn counts(v: &Value) -> BTreeMap<String, (u64, u64)> {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node_id"].as_str().unwrap().to_string(),
                (
                    n["pending"].as_u64().unwrap(),
                    n["dead_letter"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// `push-manager admin --json <args>` against a running manager.
fn admin_json(manager: &Manager, args: &[&str]) -> Value {
    let out = Command::new(PUSH_MANAGER)
        .args(["admin", "--server", &manager.addr(), "--json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "admin {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn send(manager: &Manager, id: &str, topic: &str, body: Vec<u8>) {
    let reply = manager
        .client()
        .await
        .broadcast(BroadCastReq {
            msg_id: id.into(),
            payload: body.into(),
            topic: topic.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.node_count, 3, "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_dump_reads_a_real_store_and_replayed_dead_letters_are_delivered() {
    let one = Sim::start("node-1", &[]);
    let mut two = Sim::start("node-2", &[]);
    let mut three = Sim::start("node-3", &["--reject", "bad-1"]);
    let nodes = [
        ("node-1", one.addr()),
        ("node-2", two.addr()),
        ("node-3", three.addr()),
    ];
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &nodes, FAST_RETRY);
    m.wait_ready().await;

    // node-2 goes down while messages are accepted; node-3 refuses bad-1 for good.
    two.kill();
    let ok_ids: Vec<String> = (0..20).map(|i| format!("ok-{i}")).collect();
    for (i, id) in ok_ids.iter().enumerate() {
        send(&m, id, "orders", payload(i, 100)).await;
    }
    send(&m, "bad-1", "poison", b"refused by node-3".to_vec()).await;
    let mut all_ids = ok_ids.clone();
    all_ids.push("bad-1".into());

    wait_until("node-1 has everything", CONVERGE, || {
        let got = one.received_ids();
        all_ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    // The admin API shows the state converging: node-3 done, with one dead letter.
    let deadline = std::time::Instant::now() + CONVERGE;
    let live = loop {
        let v = admin_json(&m, &["nodes"]);
        let c = counts(&v);
        if c["node-3"] == (0, 1) && c["node-1"] == (0, 0) {
            break v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node-3 never settled: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let admin_counts = counts(&live);
    assert_eq!(admin_counts["node-2"], (21, 0), "{live}");
    let state2 = live["nodes"][1]["state"].as_str().unwrap().to_string();
    assert!(state2 == "backoff" || state2 == "online", "{live}");

    // A running manager holds the lock: clear message, distinct exit code.
    let locked = queue_dump(data.path(), &["summary"]);
    assert_eq!(locked.status.code(), Some(3), "{locked:?}");
    let err = String::from_utf8_lossy(&locked.stderr);
    assert!(
        err.contains("locked") && err.contains("push-manager admin"),
        "{err}"
    );

    assert!(m.terminate().await.success());

    // summary: every known node, the same counts as the admin API saw.
    let summary: Value = serde_json::from_str(&ok(data.path(), &["--json", "summary"])).unwrap();
    assert_eq!(counts(&summary), admin_counts, "{summary}");
    let table = ok(data.path(), &["summary", "--ages"]);
    assert!(
        table.contains("node-2") && table.contains("live entries by age"),
        "{table}"
    );

    // list: node-2's live queue in order, with the contract's fields.
    let listed = json_lines(&ok(data.path(), &["list", "--node", "node-2", "--json"]));
    let listed_ids: Vec<&str> = listed
        .iter()
        .map(|e| e["msg_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed_ids,
        all_ids.iter().map(String::as_str).collect::<Vec<_>>()
    );
    for e in &listed {
        assert!(e["attempts"].is_u64(), "{e}");
        let at = e["accepted_at"].as_str().unwrap();
        assert!(at.ends_with('Z'), "UTC: {at}");
        humantime::parse_rfc3339(at).unwrap();
    }
    let dead = json_lines(&ok(
        data.path(),
        &["list", "--node", "node-3", "--dead-letter", "--json"],
    ));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["msg_id"], "bad-1");
    assert_eq!(dead[0]["attempts"], 2);
    let some = json_lines(&ok(
        data.path(),
        &[
            "list", "--node", "node-2", "--json", "--limit", "3", "--topic", "poison",
        ],
    ));
    assert_eq!(some.len(), 1, "filters are exact");

    // show: the message in full, and who holds it.
    let shown = ok(data.path(), &["show", "ok-3"]);
    assert!(
        shown.contains("node-2") && shown.contains("orders"),
        "{shown}"
    );
    let raw = queue_dump(data.path(), &["show", "ok-3", "--raw"]);
    assert_eq!(raw.stdout, payload(3, 100));
    let missing = queue_dump(data.path(), &["show", "never-sent"]);
    assert_eq!(missing.status.code(), Some(1));

    // export, purge, import: the queue comes back the same.
    let export = ok(data.path(), &["export", "--node", "node-2"]);
    assert_eq!(export.lines().count(), 21);
    let file = data.path().join("node-2.jsonl");
    std::fs::write(&file, &export).unwrap();
    let dry = ok(data.path(), &["purge", "--node", "node-2", "--dry-run"]);
    assert!(dry.contains("would purge 21"), "{dry}");
    let purged = ok(data.path(), &["purge", "--node", "node-2", "--yes"]);
    assert!(purged.contains("purged 21"), "{purged}");
    let summary: Value = serde_json::from_str(&ok(data.path(), &["--json", "summary"])).unwrap();
    assert_eq!(counts(&summary)["node-2"], (0, 0));
    let imported = ok(data.path(), &["import", file.to_str().unwrap()]);
    assert!(imported.contains("imported 21"), "{imported}");
    let again = ok(data.path(), &["export", "--node", "node-2"]);
    let strip = |text: &str| -> Vec<(String, String)> {
        json_lines(text)
            .iter()
            .map(|r| {
                (
                    r["msg_id"].as_str().unwrap().to_string(),
                    r["payload"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        strip(&again),
        strip(&export),
        "same messages, same payloads"
    );
    let twice = ok(data.path(), &["import", file.to_str().unwrap()]);
    assert!(twice.contains("imported 0"), "{twice}");
    ok(data.path(), &["verify"]);

    // replay: the dead letter goes back to node-3's live queue...
    let replayed = ok(data.path(), &["replay", "--node", "node-3", "--all"]);
    assert!(replayed.contains("replayed 1"), "{replayed}");
    let summary: Value = serde_json::from_str(&ok(data.path(), &["--json", "summary"])).unwrap();
    assert_eq!(counts(&summary)["node-3"], (1, 0));

    // ...and is delivered once node-3 accepts it; node-2 gets its whole queue back.
    let port = three.port();
    three.kill();
    let three = Sim::start_on("node-3", port, &[]);
    two.restart();
    m.restart();
    m.wait_ready().await;
    wait_until("node-3 gets the replayed bad-1", CONVERGE, || {
        three.received_ids().contains_key("bad-1")
    })
    .await;
    wait_until("node-2 gets all 21", CONVERGE, || {
        let got = two.received_ids();
        all_ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    let got: BTreeSet<String> = three.received_ids().into_keys().collect();
    assert_eq!(
        got,
        BTreeSet::from(["bad-1".to_string()]),
        "only the replay"
    );
}

#[test]
fn queue_dump_refuses_a_missing_store_without_creating_one() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = dir.path().join("nowhere");
    for args in [&["summary"][..], &["purge", "--node", "a", "--yes"]] {
        let out = queue_dump(&nowhere, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--data-dir"), "{err}");
    }
    assert!(!nowhere.exists());
    let usage = queue_dump(&nowhere, &["purge", "--node", "a"]);
    assert_eq!(usage.status.code(), Some(2), "--yes is required");
}
