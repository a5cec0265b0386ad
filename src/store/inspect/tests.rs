//! The inspection API, and that replay, purge, import and repair keep the store's
//! invariants (payloads kept while any queue needs them, fresh sequences, one batch).

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::sync::watch;

use super::super::commit::CommitOptions;
use super::super::*;
use super::*;

fn opts() -> CommitOptions {
    CommitOptions {
        durability: Durability::Fsync,
        dedupe_window: Duration::from_secs(600),
    }
}

struct Running {
    store: Store,
    commit: CommitHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    committed: watch::Receiver<u64>,
}

impl Running {
    fn start(dir: &std::path::Path, nodes: &[&str]) -> Running {
        let store = Store::open(dir).unwrap();
        for n in nodes {
            store.upsert_node(n, "127.0.0.1:1", true).unwrap();
        }
        let (tx, committed) = watch::channel(0);
        let (commit, thread) = Committer::spawn(store.clone(), opts(), tx).unwrap();
        Running {
            store,
            commit,
            thread: Some(thread),
            committed,
        }
    }

    async fn send(&self, id: &str, topic: &str, payload: &[u8]) {
        self.commit
            .accept(Accept {
                msg_id: Some(id.into()),
                topic: topic.into(),
                headers: vec![("h".into(), id.into())],
                payload: payload.to_vec().into(),
                ttl_ms: 0,
            })
            .await
            .unwrap();
    }

    /// Stops the committer: the store is offline from here on (same handle).
    async fn stop(&mut self) -> Store {
        self.commit.stop().await.unwrap();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.store.clone()
    }
}

fn live(store: &Store, node: &str) -> Vec<QueueEntry> {
    store
        .entries(
            node,
            QueueKind::Live,
            &Filter::default(),
            usize::MAX,
            now_ms(),
        )
        .unwrap()
}

fn dead(store: &Store, node: &str) -> Vec<QueueEntry> {
    store
        .entries(
            node,
            QueueKind::DeadLetter,
            &Filter::default(),
            usize::MAX,
            now_ms(),
        )
        .unwrap()
}

fn ids(entries: &[QueueEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e.message.as_ref().unwrap().msg_id.clone())
        .collect()
}

/// Dead-letters live entry `seq` of `node`, as a worker does after `max_attempts`.
fn kill_entry(store: &Store, node: &str, seq: u64) {
    let (start, mut range) = store
        .ranges(node, None, usize::MAX)
        .unwrap()
        .into_iter()
        .rfind(|(s, _)| *s <= seq)
        .unwrap();
    range.set_done((seq - start) as u32);
    let dead = DeadLetterRecord {
        seq,
        message: store.message(seq).unwrap(),
        attempts: 5,
        reason: "InvalidArgument: refused".into(),
        dead_at_ms: now_ms(),
    };
    store.dead_letter(node, start, &range, &dead).unwrap();
}

/// Marks every live entry of `node` delivered.
fn deliver_all(store: &Store, node: &str) {
    for (start, mut rec) in store.ranges(node, None, usize::MAX).unwrap() {
        for o in 0..rec.len {
            rec.set_done(o);
        }
        store.save_range(node, start, &rec).unwrap();
    }
}

#[tokio::test]
async fn summaries_and_listings_count_what_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a", "b"]);
    for i in 0..5 {
        let topic = if i % 2 == 0 { "even" } else { "odd" };
        r.send(&format!("m{i}"), topic, format!("payload {i}").as_bytes())
            .await;
    }
    let store = r.stop().await;
    store.upsert_node("late", "127.0.0.1:2", false).unwrap();
    let seq_m1 = store.dedupe("m1").unwrap().unwrap().seq;
    kill_entry(&store, "b", seq_m1);

    let sums = store.summaries(true, now_ms()).unwrap();
    let by: BTreeMap<_, _> = sums.iter().map(|(id, _, s)| (id.as_str(), s)).collect();
    assert_eq!(by.len(), 3, "every known node, empty ones too");
    assert_eq!((by["a"].pending, by["a"].dead_letter), (5, 0));
    assert_eq!((by["b"].pending, by["b"].dead_letter), (4, 1));
    assert_eq!((by["late"].pending, by["late"].dead_letter), (0, 0));
    assert_eq!(by["a"].bytes, Some(5 * 9));
    assert_eq!(by["a"].ages, Some([5, 0, 0, 0, 0]));
    assert!(by["a"].oldest_accepted_at_ms.is_some());
    assert_eq!(by["late"].oldest_accepted_at_ms, None);

    assert_eq!(ids(&live(&store, "a")), ["m0", "m1", "m2", "m3", "m4"]);
    assert_eq!(ids(&dead(&store, "b")), ["m1"]);
    let dl = &dead(&store, "b")[0];
    assert_eq!(dl.attempts, 5);
    assert_eq!(dl.dead_reason.as_deref(), Some("InvalidArgument: refused"));

    // Filters are exact and combine; limit and from work.
    let f = |topic: Option<&str>, msg: Option<&str>, from: Option<u64>| Filter {
        from_seq: from,
        older_than: None,
        topic: topic.map(String::from),
        msg_id: msg.map(String::from),
    };
    let now = now_ms();
    let got = store
        .entries("a", QueueKind::Live, &f(Some("odd"), None, None), 10, now)
        .unwrap();
    assert_eq!(ids(&got), ["m1", "m3"]);
    let got = store
        .entries(
            "a",
            QueueKind::Live,
            &f(Some("odd"), Some("m3"), None),
            10,
            now,
        )
        .unwrap();
    assert_eq!(ids(&got), ["m3"]);
    let got = store
        .entries(
            "a",
            QueueKind::Live,
            &f(None, None, Some(seq_m1 + 1)),
            2,
            now,
        )
        .unwrap();
    assert_eq!(ids(&got), ["m2", "m3"]);
    let old = Filter {
        older_than: Some(Duration::from_secs(3600)),
        ..Filter::default()
    };
    assert!(store
        .entries("a", QueueKind::Live, &old, 10, now)
        .unwrap()
        .is_empty());
    let old = Filter {
        older_than: Some(Duration::ZERO),
        ..Filter::default()
    };
    assert_eq!(
        store
            .entries("a", QueueKind::Live, &old, 10, now)
            .unwrap()
            .len(),
        5
    );

    let found = store.find_message("m1").unwrap();
    let holders: Vec<_> = found
        .held
        .iter()
        .map(|e| (e.node.as_str(), e.kind))
        .collect();
    assert_eq!(
        holders,
        [("a", QueueKind::Live), ("b", QueueKind::DeadLetter)]
    );
}

#[test]
fn an_unreadable_message_matches_only_filters_that_ask_nothing_of_it() {
    let f = Filter::default();
    assert!(f.matches(3, None, 0));
    let f = Filter {
        topic: Some(String::new()),
        ..Filter::default()
    };
    assert!(!f.matches(3, None, 0));
    let f = Filter {
        from_seq: Some(4),
        ..Filter::default()
    };
    assert!(!f.matches(3, None, 0));
}

#[tokio::test]
async fn offline_replay_makes_new_messages_for_one_node_and_keeps_payloads_needed() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a", "b"]);
    for i in 0..3 {
        r.send(&format!("m{i}"), "t", b"body").await;
    }
    let store = r.stop().await;
    let old_seq = store.dedupe("m1").unwrap().unwrap().seq;
    kill_entry(&store, "b", old_seq);
    let next = store.persisted_next_seq().unwrap();

    let dry = store
        .replay_dead_letters("b", &Filter::default(), true, now_ms())
        .unwrap();
    assert_eq!(dry.replayed.len(), 1);
    assert_eq!(dead(&store, "b").len(), 1, "a dry run writes nothing");

    let out = store
        .replay_dead_letters("b", &Filter::default(), false, now_ms())
        .unwrap();
    assert_eq!(out.replayed.len(), 1);
    let new_seq = out.replayed[0].1;
    assert_eq!(new_seq, next, "a fresh sequence above every other");
    assert_eq!(store.persisted_next_seq().unwrap(), next + 1);
    assert!(dead(&store, "b").is_empty(), "moved, not copied");
    let b = live(&store, "b");
    assert_eq!(ids(&b), ["m0", "m2", "m1"]);
    assert_eq!(b.last().unwrap().seq, new_seq);
    assert_eq!(b.last().unwrap().attempts, 0, "attempts reset");
    assert_eq!(ids(&live(&store, "a")), ["m0", "m1", "m2"], "a untouched");
    let replayed = store.message(new_seq).unwrap().unwrap();
    assert_eq!(replayed.msg_id, "m1");
    assert_eq!(replayed.payload[..], b"body"[..]);

    // Invariant 3: once a and b deliver everything but the replay, only the replayed
    // payload is still needed, and it is kept.
    deliver_all(&store, "a");
    for (start, mut rec) in store.ranges("b", None, usize::MAX).unwrap() {
        if start < new_seq {
            for o in 0..rec.len {
                rec.set_done(o);
            }
            store.save_range("b", start, &rec).unwrap();
        }
    }
    store.reclaim_payloads().unwrap();
    assert_eq!(store.message_count(), 1);
    assert!(store.message(new_seq).unwrap().is_some());
    deliver_all(&store, "b");
    store.reclaim_payloads().unwrap();
    assert_eq!(store.message_count(), 0);
}

#[tokio::test]
async fn replay_skips_what_cannot_be_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a"]);
    r.commit
        .accept(Accept {
            msg_id: Some("short".into()),
            topic: String::new(),
            headers: vec![],
            payload: vec![1].into(),
            ttl_ms: 1,
        })
        .await
        .unwrap();
    let store = r.stop().await;
    kill_entry(&store, "a", store.dedupe("short").unwrap().unwrap().seq);
    std::thread::sleep(Duration::from_millis(5));
    let out = store
        .replay_dead_letters("a", &Filter::default(), false, now_ms())
        .unwrap();
    assert!(out.replayed.is_empty());
    assert_eq!(out.skipped.len(), 1);
    assert!(out.skipped[0].1.contains("TTL"), "{:?}", out.skipped);
    assert_eq!(dead(&store, "a").len(), 1, "left where it was");
}

#[tokio::test]
async fn replay_on_a_running_store_goes_through_the_committer() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a", "b"]);
    r.send("x", "t", b"1").await;
    let seq = r.store.dedupe("x").unwrap().unwrap().seq;
    kill_entry(&r.store, "b", seq);

    let err = r
        .store
        .replay_dead_letters("b", &Filter::default(), false, now_ms())
        .unwrap_err();
    assert!(err.to_string().contains("admin API"), "{err}");

    let before = *r.committed.borrow();
    let out = r
        .commit
        .replay("b", Filter::default(), false)
        .await
        .unwrap();
    assert_eq!(out.replayed.len(), 1);
    let new_seq = out.replayed[0].1;
    assert!(new_seq > before);
    assert_eq!(
        *r.committed.borrow(),
        new_seq,
        "workers are woken up to the replayed sequence"
    );
    // The next round continues after the replay: nothing is overwritten.
    r.send("y", "t", b"2").await;
    let y = r.store.dedupe("y").unwrap().unwrap().seq;
    assert_eq!(y, new_seq + 1);
    assert_eq!(r.store.message(new_seq).unwrap().unwrap().msg_id, "x");
    assert_eq!(ids(&live(&r.store, "b")), ["x", "y"]);
    assert_eq!(ids(&live(&r.store, "a")), ["x", "y"]);
    r.stop().await;
}

#[tokio::test]
async fn purge_marks_entries_finished_and_never_drops_a_payload_another_node_needs() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a", "b"]);
    for i in 0..4 {
        let topic = if i < 2 { "old" } else { "new" };
        r.send(&format!("m{i}"), topic, b"p").await;
    }
    let store = r.stop().await;
    kill_entry(&store, "b", store.dedupe("m3").unwrap().unwrap().seq);

    let topic = Filter {
        topic: Some("old".into()),
        ..Filter::default()
    };
    let dry = store
        .purge("b", QueueKind::Live, &topic, true, now_ms())
        .unwrap();
    assert_eq!(ids(&dry), ["m0", "m1"]);
    assert_eq!(live(&store, "b").len(), 3, "dry run");

    let purged = store
        .purge("b", QueueKind::Live, &topic, false, now_ms())
        .unwrap();
    assert_eq!(ids(&purged), ["m0", "m1"]);
    assert_eq!(ids(&live(&store, "b")), ["m2"]);
    store.reclaim_payloads().unwrap();
    assert_eq!(store.message_count(), 4, "a still needs every payload");

    let all = store
        .purge("b", QueueKind::Live, &Filter::default(), false, now_ms())
        .unwrap();
    assert_eq!(ids(&all), ["m2"]);
    assert!(
        store.ranges("b", None, 10).unwrap().is_empty(),
        "complete ranges are deleted"
    );
    assert_eq!(
        dead(&store, "b").len(),
        1,
        "a live purge leaves dead letters"
    );
    let gone = store
        .purge(
            "b",
            QueueKind::DeadLetter,
            &Filter::default(),
            false,
            now_ms(),
        )
        .unwrap();
    assert_eq!(ids(&gone), ["m3"]);
    assert!(dead(&store, "b").is_empty());

    deliver_all(&store, "a");
    store.reclaim_payloads().unwrap();
    assert_eq!(store.message_count(), 0);
}

#[tokio::test]
async fn export_import_round_trips_and_importing_twice_queues_nothing_twice() {
    let src = tempfile::tempdir().unwrap();
    let mut r = Running::start(src.path(), &["a", "b"]);
    for i in 0..3 {
        r.send(&format!("m{i}"), "t", format!("body {i}").as_bytes())
            .await;
    }
    let store = r.stop().await;
    kill_entry(&store, "b", store.dedupe("m2").unwrap().unwrap().seq);
    let mut items = Vec::new();
    for node in ["a", "b"] {
        for e in live(&store, node).into_iter().chain(dead(&store, node)) {
            items.push(ImportItem {
                node: e.node.clone(),
                kind: e.kind,
                message: e.message.clone().unwrap(),
                attempts: e.attempts,
                dead_reason: e.dead_reason.clone().unwrap_or_default(),
                dead_at_ms: e.dead_at_ms.unwrap_or(0),
            });
        }
    }
    drop(store);
    drop(r);

    let dst = tempfile::tempdir().unwrap();
    let target = Store::open(dst.path()).unwrap();
    let out = target.import(items.clone(), false).unwrap();
    assert_eq!(out.imported, 6);
    assert_eq!(out.new_nodes, ["a", "b"]);
    assert_eq!(ids(&live(&target, "a")), ["m0", "m1", "m2"]);
    assert_eq!(ids(&live(&target, "b")), ["m0", "m1"]);
    assert_eq!(ids(&dead(&target, "b")), ["m2"]);
    assert_eq!(
        target.message_count(),
        3,
        "one record per message, shared by the nodes"
    );
    assert_eq!(
        live(&target, "a")[2].message.as_ref().unwrap().payload[..],
        b"body 2"[..]
    );
    let report = target.verify(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);

    let again = target.import(items, false).unwrap();
    assert_eq!(again.imported, 0);
    assert_eq!(again.skipped.len(), 6);
    assert_eq!(live(&target, "a").len(), 3);
}

#[tokio::test]
async fn verify_finds_and_repairs_without_losing_anything_silently() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = Running::start(dir.path(), &["a"]);
    r.send("ok", "t", b"fine").await;
    r.send("bad", "t", b"garbled").await;
    let store = r.stop().await;
    assert!(store.verify(false).unwrap().problems.is_empty());

    let bad = store.dedupe("bad").unwrap().unwrap().seq;
    store
        .tree()
        .insert(keys::message(bad), &b"\x01garbage"[..])
        .unwrap();
    let report = store.verify(false).unwrap();
    assert!(report.has_unrepaired());
    assert!(
        report.problems.iter().any(|p| p.key == format!("m/{bad}")),
        "{:?}",
        report.problems
    );

    let fixed = store.verify(true).unwrap();
    assert!(!fixed.has_unrepaired(), "{:?}", fixed.problems);
    assert_eq!(ids(&live(&store, "a")), ["ok"]);
    let d = dead(&store, "a");
    assert_eq!(d.len(), 1, "the entry went to the dead letters");
    assert_eq!(d[0].seq, bad);
    let after = store.verify(false).unwrap();
    assert!(after.problems.is_empty(), "{:?}", after.problems);
    assert_eq!(after.quarantined, 1, "the raw record is kept in quarantine");
}

#[test]
fn verify_catches_a_sequence_counter_below_what_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.upsert_node("a", "127.0.0.1:1", false).unwrap();
    let item = ImportItem {
        node: "a".into(),
        kind: QueueKind::Live,
        message: MessageRecord {
            msg_id: "m".into(),
            topic: String::new(),
            headers: vec![],
            payload: vec![1].into(),
            accepted_at_ms: 1,
            ttl_ms: 0,
        },
        attempts: 0,
        dead_reason: String::new(),
        dead_at_ms: 0,
    };
    store.import(vec![item], false).unwrap();
    store
        .tree()
        .insert(keys::META_NEXT_SEQ, record::encode(&1u64).unwrap())
        .unwrap();
    let report = store.verify(false).unwrap();
    assert!(
        report.problems.iter().any(|p| p.key == "meta/next_seq"),
        "{:?}",
        report.problems
    );
    store.verify(true).unwrap();
    assert_eq!(store.persisted_next_seq().unwrap(), 2);
}

#[test]
fn read_only_opens_refuse_missing_stores_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let err = Store::open_read_only(dir.path()).err().expect("no store");
    assert!(err.to_string().contains("check --data-dir"), "{err}");
    assert!(
        !dir.path().join("store").exists(),
        "a read-only open creates nothing"
    );
    drop(Store::open(dir.path()).unwrap());
    let store = Store::open_read_only(dir.path()).unwrap();
    let err = store.import(Vec::new(), false).unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert!(store.verify(true).is_err());
    assert!(store.verify(false).unwrap().problems.is_empty());
}

#[test]
fn import_ranges_cover_only_the_nodes_share() {
    let ranges = ranges_covering(&[(10, 0), (12, 3), (10 + MAX_ROUND as u64, 0)]);
    assert_eq!(ranges.len(), 2);
    let (start, r) = &ranges[0];
    assert_eq!((*start, r.len), (10, 3));
    assert_eq!(r.pending().collect::<Vec<_>>(), [0, 2]);
    assert_eq!(r.attempts, [(2, 3)]);
    assert_eq!(ranges[1].0, 10 + MAX_ROUND as u64);
}
