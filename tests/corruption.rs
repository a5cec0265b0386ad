//! Corruption: a store whose files are truncated or garbled is refused at start with an
//! error naming the data dir and what to do; a single undecodable record met by a delivery
//! worker is moved to quarantine and the queue moves on.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{has_all, ids, send_all, wait_until, with_store, Manager, Sim};
use push_manager::store::{keys, Store};

const MANAGER_BIN: &str = env!("CARGO_BIN_EXE_push-manager");
const CONVERGE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(20);

/// A stopped data dir holding `n` messages queued for a node that never answered.
async fn stopped_store_with_messages(data: &Path, n: usize) -> Vec<String> {
    let mut node = Sim::start("node-1", &[]);
    let addr = node.addr();
    node.kill();
    let mut m = Manager::start(data, &[("node-1", addr)], &[]);
    m.wait_ready().await;
    let ids = ids("c", n);
    send_all(&m, &ids, 1).await;
    assert!(m.terminate().await.success());
    ids
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Runs `push-manager serve` on `data` and waits (bounded) for it to exit; returns whether
/// it succeeded and its stderr.
async fn serve_until_exit(data: &Path) -> (bool, String) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(MANAGER_BIN)
        .args(["serve", "--listen"])
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .arg("--data-dir")
        .arg(data)
        .args(["--static-node", "node-1=127.0.0.1:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > EXIT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "expected serve on a damaged store to exit within {EXIT_DEADLINE:?}; it ran: {}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (
        status.success(),
        std::fs::read_to_string(log.path()).unwrap_or_default(),
    )
}

fn garble(path: &Path, from: usize, len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let end = (from + len).min(bytes.len());
    for b in &mut bytes[from..end] {
        *b ^= 0xa5;
    }
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_or_garbled_store_is_refused_at_start() {
    let original = tempfile::tempdir().unwrap();
    stopped_store_with_messages(original.path(), 300).await;
    let log_len = std::fs::metadata(original.path().join("store/db"))
        .unwrap()
        .len() as usize;
    assert!(
        log_len > 8192,
        "the log holds the messages: {log_len} bytes"
    );

    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "log truncated to half",
            Box::new(move |d: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("store/db"))
                    .unwrap();
                f.set_len(log_len as u64 / 2).unwrap();
            }),
        ),
        (
            "log truncated to nothing",
            Box::new(|d: &Path| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("store/db"))
                    .unwrap();
                f.set_len(0).unwrap();
            }),
        ),
        (
            "log garbled at its start",
            Box::new(|d: &Path| garble(&d.join("store/db"), 0, 4096)),
        ),
        (
            "log garbled in the middle",
            Box::new(move |d: &Path| garble(&d.join("store/db"), log_len / 2, 4096)),
        ),
    ];
    for (what, damage) in cases {
        let copy = tempfile::tempdir().unwrap();
        let data = copy.path().join("data");
        copy_dir(original.path(), &data);
        damage(&data);
        let (ok, stderr) = serve_until_exit(&data).await;
        assert!(
            !ok,
            "{what}: serve must refuse a damaged store; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{what}: a refusal, not a panic:\n{stderr}"
        );
        let dir = data.display().to_string();
        for needle in [
            dir.as_str(),
            "is damaged",
            "queue-dump --data-dir",
            "verify",
            "backup",
        ] {
            assert!(
                stderr.contains(needle),
                "{what}: the error names {needle:?}:\n{stderr}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_is_quarantined_and_the_queue_moves_on() {
    let data = tempfile::tempdir().unwrap();
    let ids = stopped_store_with_messages(data.path(), 20).await;
    // Garble the pack holding c-7 in the stopped store (its checksum no longer matches),
    // through sled directly: the store's API never writes a bad record. The messages were
    // sent 32 at a time, so the pack usually holds others too: all of them go to quarantine.
    let seqs: BTreeMap<u64, String> = with_store(data.path(), |s| {
        ids.iter()
            .map(|id| (s.find_message(id).unwrap().held[0].seq, id.clone()))
            .collect()
    });
    let seq = *seqs.iter().find(|(_, id)| *id == "c-7").unwrap().0;
    let bad: BTreeSet<String> = {
        let db = sled::Config::new()
            .path(data.path().join("store"))
            .segment_size(8 * 1024 * 1024)
            .open()
            .unwrap();
        let heads: Vec<u64> = db
            .scan_prefix(keys::MESSAGES)
            .keys()
            .filter_map(|k| keys::parse_message(&k.unwrap()).filter(|(_, head)| *head))
            .map(|(last, _)| last)
            .collect();
        let last = *heads.iter().find(|l| **l >= seq).unwrap();
        let first = heads.iter().rev().find(|l| **l < seq).map_or(0, |l| l + 1);
        let key = keys::message(last);
        let mut value = db.get(&key).unwrap().unwrap().to_vec();
        let end = value.len() - 1;
        value[end] ^= 0xff;
        db.insert(&key, value).unwrap();
        db.flush().unwrap();
        seqs.range(first..=last).map(|(_, id)| id.clone()).collect()
    };
    assert!(bad.contains("c-7"), "{bad:?}");

    let node = Sim::start("node-1", &[]);
    let mut m = Manager::start(
        data.path(),
        &[("node-1", node.addr())],
        &["--backoff-initial", "20ms", "--backoff-max", "200ms"],
    );
    m.wait_ready().await;
    let good: Vec<String> = ids.iter().filter(|i| !bad.contains(*i)).cloned().collect();
    wait_until(
        "the node has every message but the garbled pack's",
        CONVERGE,
        || has_all(&node, &good),
    )
    .await;
    // New messages still flow behind it.
    let more = common::ids("after", 5);
    send_all(&m, &more, 1).await;
    wait_until("the node has the later messages", CONVERGE, || {
        has_all(&node, &more)
    })
    .await;
    let received = node.received_ids();
    assert!(bad.iter().all(|id| !received.contains_key(id)), "{bad:?}");
    wait_until("the quarantine is logged", CONVERGE, || {
        m.log().contains("moved to quarantine")
    })
    .await;
    assert!(
        m.is_running(),
        "the worker's error did not bring the manager down"
    );
    assert!(m.terminate().await.success());

    let store = Store::open(data.path()).unwrap();
    let report = store.verify(false).unwrap();
    assert!(report.quarantined >= 1, "{report:?}");
    assert!(
        report.problems.is_empty(),
        "nothing else is wrong: {report:?}"
    );
    assert!(
        store.ranges("node-1", None, 10).unwrap().is_empty(),
        "queue empty"
    );
    assert!(
        store.dead_letters("node-1").unwrap().is_empty(),
        "not dead-lettered"
    );
}
