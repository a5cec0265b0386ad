//! Offline retention under crashes: a node with a large queue is retired (archived page by
//! page, then removed) while the manager is SIGKILLed several times in the middle; after the
//! restarts the archive holds every entry exactly once, and the node is gone from the store.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::etcd::Etcd;
use common::{free_port, wait_until, Manager};
use push_manager::report::ExportRecord;

const PREFIX: &str = "/services/connect-node/";
const QUEUE_DUMP: &str = env!("CARGO_BIN_EXE_queue-dump");
const ENTRIES: usize = 12_000;
/// Small pages make the retirement long enough (hundreds of steps, each with two fsyncs)
/// for kills to land in the middle of it.
const PAGE: &str = "10";
const KILLS: usize = 3;
const DEADLINE: Duration = Duration::from_secs(180);

fn archive_file(dir: &Path) -> Option<PathBuf> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir.join("archive"))
        .ok()?
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        files.len() <= 1,
        "one archive file per retirement: {files:?}"
    );
    files.into_iter().next()
}

fn archive_len(dir: &Path) -> u64 {
    archive_file(dir)
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_killed_midway_archives_every_entry_exactly_once() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    // Registered at an address nobody listens on: every delivery fails, the queue grows.
    etcd.put(
        &format!("{PREFIX}ghost"),
        &format!("127.0.0.1:{}", free_port()),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start_with_env(
        data.path(),
        &[],
        &["--etcd", &url, "--offline-retention", "1s"],
        &[("PUSH_MANAGER_RETIRE_PAGE_ENTRIES", PAGE)],
    );
    m.wait_ready().await;
    common::etcd::wait_for_node_count(&m, 1, "ghost", Duration::from_secs(20)).await;

    let queued = common::ids("ret", ENTRIES);
    common::send_all(&m, &queued, 1).await;

    // The node leaves etcd; a second later its retirement starts.
    etcd.delete(&format!("{PREFIX}ghost")).await;
    let start = Instant::now();
    let mut kills = 0;
    let mut kill_points = Vec::new();
    while kills < KILLS {
        let before = archive_len(data.path());
        // Kill once this run has archived a few pages more, at a moment that varies.
        let target = before + 250_000 * (kills as u64 + 1);
        wait_until("the retirement makes progress", DEADLINE, || {
            archive_len(data.path()) >= target || m.log().contains("node retired")
        })
        .await;
        if m.log().contains("node retired") {
            break;
        }
        m.kill9();
        kills += 1;
        kill_points.push(archive_len(data.path()));
        m.restart();
        m.wait_ready().await;
    }
    assert!(
        kills >= 1,
        "the retirement finished before any kill; make the queue larger"
    );
    wait_until("the node is retired", DEADLINE, || {
        m.log().contains("node retired")
    })
    .await;
    eprintln!(
        "retired {ENTRIES} entries in {:?} with {kills} SIGKILLs at archive sizes {kill_points:?}",
        start.elapsed()
    );

    let path = archive_file(data.path()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.ends_with('\n'), "no torn last line");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in text.lines() {
        let rec: ExportRecord = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("every line parses ({e}): {line:?}"));
        assert_eq!(rec.node_id, "ghost");
        assert_eq!(rec.queue, "live");
        *seen.entry(rec.msg_id).or_default() += 1;
    }
    let repeated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "lines repeated: {repeated:?}");
    let missing: Vec<_> = queued.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(missing.is_empty(), "{} entries missing", missing.len());
    // The probes sent to learn the node count were queued for it too.
    let extra: Vec<_> = seen
        .keys()
        .filter(|id| !id.starts_with("ret-") && !id.starts_with("probe-"))
        .collect();
    assert!(extra.is_empty(), "unexpected lines: {extra:?}");

    // Stopped, the store has neither the node nor any entry of it.
    assert!(m.terminate().await.success());
    let out = std::process::Command::new(QUEUE_DUMP)
        .args(["--data-dir", &data.path().display().to_string()])
        .args(["summary", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        summary["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["node_id"] != "ghost"),
        "{summary}"
    );
    let out = std::process::Command::new(QUEUE_DUMP)
        .args(["--data-dir", &data.path().display().to_string(), "verify"])
        .output()
        .unwrap();
    assert!(out.status.success(), "verify: {out:?}");
}
