//! etcd membership against a real etcd: discovery of both value formats, a node whose
//! lease expires (paused, queue kept, resumed on a new port under the same id), retirement
//! after `--offline-retention` (queue archived to JSON lines, static nodes never retired).

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine;
use common::etcd::{wait_for_node_count, Etcd};
use common::{has_all, ids, payload, send_all, wait_until, Manager, Sim};
use push_manager::report::ExportRecord;

const PREFIX: &str = "/services/connect-node/";
/// Membership changes are picked up within a second; generous for slow CI machines.
const DISCOVER: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);
const FAST_BACKOFF: &[&str] = &["--backoff-initial", "20ms", "--backoff-max", "300ms"];

fn manager_args<'a>(etcd: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["--etcd", etcd];
    args.extend_from_slice(FAST_BACKOFF);
    args.extend_from_slice(extra);
    args
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_registering_in_either_value_format_get_broadcasts() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &manager_args(&url, &[]));
    m.wait_ready().await;

    let plain = Sim::start("plain-node", &["--etcd", &url]);
    let naming = Sim::start("naming-node", &["--etcd", &url, "--etcd-format", "naming"]);
    // An unusable registration is ignored (and logged once), never a crash.
    etcd.put(&format!("{PREFIX}junk-node"), "not an address")
        .await;

    wait_for_node_count(&m, 2, "formats", DISCOVER).await;
    let values = etcd.get_prefix(PREFIX).await;
    let value = |id: &str| {
        values
            .iter()
            .find(|(k, _)| k == &format!("{PREFIX}{id}"))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{id} is not registered: {values:?}"))
    };
    assert_eq!(value("plain-node"), plain.addr());
    let json: serde_json::Value = serde_json::from_str(&value("naming-node")).unwrap();
    assert_eq!(json["Op"], 0);
    assert_eq!(json["Addr"], naming.addr());

    let ids = ids("fmt", 50);
    send_all(&m, &ids, 2).await;
    for sim in [&plain, &naming] {
        wait_until(&format!("{} has all 50", sim.node_id()), CONVERGE, || {
            has_all(sim, &ids)
        })
        .await;
    }
    let log = m.log();
    assert_eq!(
        count(&log, "junk-node has an unusable value"),
        1,
        "an unusable value is logged once, whatever the number of resyncs:\n{log}"
    );
    assert!(m.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_pauses_the_node_and_a_new_port_gets_everything() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[], &manager_args(&url, &[]));
    m.wait_ready().await;

    let mut node = Sim::start("flaky", &["--etcd", &url, "--lease-ttl", "1s"]);
    let first_port = node.port();
    wait_for_node_count(&m, 1, "flaky", DISCOVER).await;
    let before = ids("before", 10);
    send_all(&m, &before, 1).await;
    wait_until("flaky has the first 10", CONVERGE, || {
        has_all(&node, &before)
    })
    .await;

    // A crash: no deregistration, the lease expires by itself.
    node.kill();
    wait_until("the manager sees the node leave etcd", DISCOVER, || {
        m.log().contains("node left etcd")
    })
    .await;
    assert!(etcd.get(&format!("{PREFIX}flaky")).await.is_none());

    // Still known: its queue keeps receiving new broadcasts.
    let meanwhile = ids("meanwhile", 30);
    send_all(&m, &meanwhile, 1).await;

    // Same id, new port: it gets everything accepted while it was away.
    let back = Sim::start("flaky", &["--etcd", &url, "--lease-ttl", "1s"]);
    assert_ne!(back.port(), first_port);
    wait_until("the returning node has everything", CONVERGE, || {
        has_all(&back, &meanwhile)
    })
    .await;
    assert!(m.log().contains("node registered again"));
    let after = ids("after", 5);
    send_all(&m, &after, 1).await;
    wait_until("and what comes later", CONVERGE, || has_all(&back, &after)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_absent_past_retention_is_archived_and_static_nodes_stay() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let fixed = Sim::start("fixed", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[("fixed", fixed.addr())],
        &manager_args(&url, &["--offline-retention", "2s"]),
    );
    m.wait_ready().await;

    let mut leaving = Sim::start("leaving", &["--etcd", &url, "--lease-ttl", "1s"]);
    wait_for_node_count(&m, 2, "retire", DISCOVER).await;
    leaving.kill();
    wait_until("the node leaves etcd", DISCOVER, || {
        m.log().contains("node left etcd")
    })
    .await;
    // Accepted while it is away: queued for it, then archived, never dropped.
    let queued = ids("queued", 20);
    send_all(&m, &queued, 2).await;

    let archive_dir = data.path().join("archive");
    wait_until("the node is retired", CONVERGE, || {
        m.log().contains("node retired")
    })
    .await;
    let files: Vec<_> = std::fs::read_dir(&archive_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("leaving.") && name.ends_with(".jsonl"),
        "{name}"
    );
    let lines: Vec<ExportRecord> = std::fs::read_to_string(&files[0])
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let archived: HashSet<&str> = lines.iter().map(|l| l.msg_id.as_str()).collect();
    for (i, id) in queued.iter().enumerate() {
        assert!(archived.contains(id.as_str()), "{id} is archived");
        let line = lines.iter().find(|l| &l.msg_id == id).unwrap();
        assert_eq!(line.node_id, "leaving");
        assert_eq!(line.queue, "live");
        let body = base64::engine::general_purpose::STANDARD
            .decode(&line.payload)
            .unwrap();
        assert_eq!(body, payload(i, 256));
        assert!(line.accepted_at.ends_with('Z'));
    }

    // Gone from the fan-out; the static node is never retired and got everything.
    let later = ids("later", 5);
    send_all(&m, &later, 1).await;
    wait_until("the static node has everything", CONVERGE, || {
        has_all(&fixed, &queued) && has_all(&fixed, &later)
    })
    .await;

    // Coming back under the same id after retirement: a new node, with no old messages.
    let back = Sim::start("leaving", &["--etcd", &url]);
    wait_for_node_count(&m, 2, "back", DISCOVER).await;
    let fresh = ids("fresh", 5);
    send_all(&m, &fresh, 2).await;
    wait_until("the returning node gets new messages", CONVERGE, || {
        has_all(&back, &fresh)
    })
    .await;
    let got = back.received_ids();
    assert!(
        queued.iter().all(|id| !got.contains_key(id)),
        "archived messages are not delivered to the new node"
    );
}
