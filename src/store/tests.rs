//! The store's invariants (module docs of `store`), tested through its public API.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::sync::watch;

use super::commit::CommitOptions;
use super::*;

fn accept(id: &str, payload: Vec<u8>) -> Accept {
    Accept {
        msg_id: Some(id.to_string()),
        topic: "t".into(),
        headers: vec![("h".into(), "v".into())],
        payload: payload.into(),
        ttl_ms: 0,
    }
}

/// Commits `(msg_id, payload)` items as one `accept_batch` call (one round); panics if any
/// is refused.
async fn commit_batch(commit: &CommitHandle, items: impl IntoIterator<Item = (String, Vec<u8>)>) {
    let batch = items.into_iter().map(|(id, p)| accept(&id, p)).collect();
    for result in commit.accept_batch(batch).await {
        result.unwrap();
    }
}

/// Commits `n` messages `{prefix}{i}` in one round, each over a pack's 16 KiB, so each is a
/// message record of its own.
async fn commit_one_record_each(commit: &CommitHandle, prefix: &str, n: usize) {
    let big = vec![3; record::PACK_BYTES + 1];
    commit_batch(
        commit,
        (0..n).map(|i| (format!("{prefix}{i}"), big.clone())),
    )
    .await;
}

fn opts() -> CommitOptions {
    CommitOptions {
        durability: Durability::Fsync,
        dedupe_window: Duration::from_secs(600),
    }
}

thread_local! {
    /// Committer threads of this test, joined by [`join_committers`].
    static THREADS: std::cell::RefCell<Vec<std::thread::JoinHandle<()>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Waits for the committers stopped so far to let go of the store.
fn join_committers() {
    for t in THREADS.with(|t| std::mem::take(&mut *t.borrow_mut())) {
        t.join().unwrap();
    }
}

/// Opens a store with `nodes` known and starts a committer on it.
fn setup(dir: &std::path::Path, nodes: &[&str]) -> (Store, CommitHandle, watch::Receiver<u64>) {
    let store = Store::open(dir).unwrap();
    for n in nodes {
        store.upsert_node(n, "127.0.0.1:1", true).unwrap();
    }
    let (tx, rx) = watch::channel(0);
    let (handle, thread) = Committer::spawn(store.clone(), opts(), tx).unwrap();
    THREADS.with(|t| t.borrow_mut().push(thread));
    (store, handle, rx)
}

/// Marks every entry of `node` finished, as a worker does after deliveries.
fn finish_all(store: &Store, node: &str) {
    for (start, mut rec) in store.ranges(node, None, usize::MAX).unwrap() {
        for o in 0..rec.len {
            rec.set_done(o);
        }
        store.save_range(node, start, &rec).unwrap();
    }
}

#[tokio::test]
async fn round_is_complete_for_every_node_and_dedupe_points_at_it() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, committed) = setup(dir.path(), &["a", "b", "c"]);
    let replies = futures::future::join_all(
        (0..50).map(|i| commit.accept(accept(&format!("m{i}"), vec![i as u8; 100]))),
    )
    .await;
    for r in &replies {
        let r = r.as_ref().unwrap();
        assert_eq!((r.node_count, r.duplicate), (3, false));
    }
    assert_eq!(
        *committed.borrow(),
        50,
        "workers are told up to the last sequence"
    );
    for i in 0..50 {
        let d = store
            .dedupe(&format!("m{i}"))
            .unwrap()
            .expect("dedupe entry");
        let m = store
            .message(d.seq)
            .unwrap()
            .expect("message of a dedupe entry");
        assert_eq!(m.msg_id, format!("m{i}"));
        assert_eq!(m.headers, vec![("h".to_string(), "v".to_string())]);
    }
    for n in ["a", "b", "c"] {
        let pending: usize = store
            .ranges(n, None, usize::MAX)
            .unwrap()
            .iter()
            .map(|(_, r)| r.pending().count())
            .sum();
        assert_eq!(pending, 50, "node {n} has every message");
    }
    // Fewer range records than messages: fan-out is per round, not per message.
    assert!(store.ranges("a", None, usize::MAX).unwrap().len() <= 50);
}

#[tokio::test]
async fn duplicates_repeat_the_original_count_and_queue_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a", "b"]);
    let first = commit.accept(accept("x", vec![1])).await.unwrap();
    store.upsert_node("c", "127.0.0.1:2", false).unwrap();
    let again = commit.accept(accept("x", vec![2, 2])).await.unwrap();
    assert_eq!(first.node_count, 2);
    assert_eq!((again.node_count, again.duplicate), (2, true));
    assert!(
        store.ranges("c", None, 10).unwrap().is_empty(),
        "a late node gets nothing old"
    );
    // Two copies of one msg_id in the same round: one accepted, one duplicate.
    let (r1, r2) = tokio::join!(
        commit.accept(accept("y", vec![1])),
        commit.accept(accept("y", vec![1]))
    );
    let dups = [r1.unwrap().duplicate, r2.unwrap().duplicate];
    assert_eq!(dups.iter().filter(|d| **d).count(), 1, "{dups:?}");
}

#[tokio::test]
async fn no_nodes_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &[]);
    assert_eq!(
        commit.accept(accept("x", vec![1])).await,
        Err(CommitError::NoNodes)
    );
    assert_eq!(store.dedupe("x").unwrap(), None);
    assert_eq!(store.message_count(), 0);
}

#[tokio::test]
async fn acked_messages_survive_reopen_with_assigned_ids() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let (_store, commit, _) = setup(dir.path(), &["a"]);
        let mut ids = Vec::new();
        for _ in 0..3 {
            let mut a = accept("", vec![9; 10]);
            a.msg_id = None;
            ids.push(commit.accept(a).await.unwrap().msg_id);
        }
        commit.stop().await.unwrap();
        ids
    };
    join_committers();
    let store = Store::reopen(dir.path(), Duration::from_secs(10)).unwrap();
    assert_eq!(&*store.known_nodes(), &["a".to_string()]);
    for id in &ids {
        assert!(store.dedupe(id).unwrap().is_some(), "{id} survived");
    }
    assert_eq!(store.next_seq().unwrap(), 4, "sequence numbers continue");
}

#[tokio::test]
async fn payload_is_kept_until_every_node_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a", "b"]);
    commit.accept(accept("x", vec![1; 10])).await.unwrap();
    let next = store.next_seq().unwrap();
    finish_all(&store, "a");
    let lwm = store.low_water_mark(next).unwrap();
    assert_eq!(
        store.delete_messages_below(lwm, 100).unwrap(),
        0,
        "b still needs it"
    );
    assert_eq!(store.message_count(), 1);
    finish_all(&store, "b");
    let lwm = store.low_water_mark(next).unwrap();
    assert_eq!(store.delete_messages_below(lwm, 100).unwrap(), 1);
    assert_eq!(store.message_count(), 0);
}

/// While rounds keep coming, delivered payloads are reclaimed beside them (the reclaimer
/// thread), and nothing undelivered goes with them.
#[tokio::test]
async fn delivered_payloads_are_reclaimed_while_accepts_keep_coming() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a"]);
    commit_one_record_each(&commit, "old", 600).await;
    finish_all(&store, "a");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut newer = 0;
    loop {
        commit
            .accept(accept(&format!("new{newer}"), vec![1; 10]))
            .await
            .unwrap();
        newer += 1;
        let left = store.message_count();
        assert!(
            left >= newer,
            "an undelivered message was reclaimed: {left} < {newer}"
        );
        if left == newer {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} delivered payloads still stored after 20 s of accepts",
            left - newer
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The reclaimer deletes what lies below the mark it was handed, in steps, and nothing at
/// or above it, even when every node is done with it (invariant 3 rests on the committer's
/// choice of mark).
#[tokio::test]
async fn the_reclaimer_deletes_below_its_mark_and_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a"]);
    commit_one_record_each(&commit, "m", 600).await;
    // The committer (and its reclaimer) stop before anything is delivered: only the
    // reclaimer below may delete.
    commit.stop().await.unwrap();
    join_committers();
    finish_all(&store, "a");
    let mut reclaimer = reclaim::Reclaimer::spawn(store.clone(), Duration::from_secs(600)).unwrap();
    // Sequences are 1..=600, one record each: 300 lie below 301, more than a step.
    reclaimer.reclaim_below(301);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reclaimer.reclaimed_below() < 301 {
        assert!(
            std::time::Instant::now() < deadline,
            "the reclaimer did not reach its mark in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    reclaimer.stop();
    assert_eq!(store.message_count(), 300);
    assert!(
        store.message(300).unwrap().is_none(),
        "below the mark: deleted"
    );
    assert!(store.message(301).unwrap().is_some(), "at the mark: kept");
}

#[tokio::test]
async fn dead_letters_keep_a_full_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a"]);
    commit.accept(accept("x", vec![5; 3])).await.unwrap();
    let (start, range) = store.ranges("a", None, 1).unwrap().remove(0);
    let mut done = range.clone();
    done.set_done(0);
    let msg = store.message(start).unwrap();
    let dead = DeadLetterRecord {
        seq: start,
        message: msg.clone(),
        attempts: 5,
        reason: "InvalidArgument: no".into(),
        dead_at_ms: now_ms(),
    };
    store.dead_letter("a", start, &done, &dead).unwrap();
    assert!(store.ranges("a", None, 10).unwrap().is_empty());
    assert_eq!(store.dead_letters("a").unwrap(), vec![dead]);
    // The live queue no longer needs the payload; the dead letter has its own copy.
    let lwm = store.low_water_mark(store.next_seq().unwrap()).unwrap();
    store.delete_messages_below(lwm, 10).unwrap();
    assert_eq!(store.dead_letters("a").unwrap()[0].message, msg);
}

#[tokio::test]
async fn payloads_up_to_the_limit_stay_inline_where_fsync_covers_them() {
    // sled 0.34.7 writes a page over a quarter of its segment size to a blob file it never
    // fsyncs. Chunked records keep every page (up to 17 items) far below that.
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a", "b"]);
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let mut sizes = vec![1_048_576, 1_048_576, 300_000, 200_000, 131_072];
    sizes.extend(std::iter::repeat_n(70_000, 20));
    for (i, size) in sizes.iter().enumerate() {
        let id = format!("m{i}");
        commit
            .accept(accept(&id, big[..*size].to_vec()))
            .await
            .unwrap();
    }
    // Rewrites and deletes make sled consolidate pages holding these records.
    finish_all(&store, "a");
    commit.stop().await.unwrap();
    for (i, size) in sizes.iter().enumerate() {
        let seq = store.dedupe(&format!("m{i}")).unwrap().unwrap().seq;
        assert_eq!(store.message(seq).unwrap().unwrap().payload, big[..*size]);
    }
    assert_eq!(store.message_count(), sizes.len());
    let blobs = std::fs::read_dir(store.dir().join("blobs")).map_or(0, |d| d.count());
    let ever = store.inner.synced_blobs.lock().unwrap().len();
    assert_eq!((blobs, ever), (0, 0), "sled wrote pages to blob files");
}

#[test]
fn newer_format_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        migrate::force_format(store.tree(), migrate::CURRENT_FORMAT + 1).unwrap();
    }
    let err = Store::reopen(dir.path(), Duration::from_secs(10))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains(&format!("store format {}", migrate::CURRENT_FORMAT + 1)),
        "{err}"
    );
    assert!(
        err.contains(&format!("({})", migrate::CURRENT_FORMAT)),
        "{err}"
    );
}

#[test]
fn new_store_is_migrated_to_the_current_format() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        migrate::format_version(store.tree()).unwrap(),
        migrate::CURRENT_FORMAT
    );
    assert_eq!(store.next_seq().unwrap(), 1);
}

/// A format-1 store (one record per message, written here byte for byte as format 1 wrote
/// them: a `MessageHead` over the message's own encoding, chunked at 64 KiB) opens as
/// format 2, its messages readable as packs of one, its dedupe entries folded into a dedupe
/// round, and new rounds write packs next to them.
#[tokio::test]
async fn a_format_1_store_is_migrated_and_its_messages_read_as_packs_of_one() {
    let dir = tempfile::tempdir().unwrap();
    let old: Vec<MessageRecord> = [10, 150 * 1024, 20]
        .iter()
        .enumerate()
        .map(|(i, size)| MessageRecord {
            msg_id: format!("old{i}"),
            topic: "t".into(),
            headers: vec![],
            payload: vec![i as u8; *size].into(),
            accepted_at_ms: 1,
            ttl_ms: 0,
        })
        .collect();
    {
        let store = Store::open(dir.path()).unwrap();
        store.upsert_node("a", "127.0.0.1:1", false).unwrap();
        let mut batch = sled::Batch::default();
        for (seq, m) in (1u64..).zip(&old) {
            let bytes = bincode::encode_to_vec(m, bincode::config::standard()).unwrap();
            let mut chunks = bytes.chunks(record::MESSAGE_CHUNK);
            let head = record::MessageHead {
                chunks: bytes.len().div_ceil(record::MESSAGE_CHUNK) as u32,
                len: bytes.len() as u64,
                body: chunks.next().unwrap().to_vec(),
            };
            batch.insert(keys::message(seq), record::encode(&head).unwrap());
            for (i, c) in chunks.enumerate() {
                let key = keys::message_chunk(seq, i as u32 + 1);
                batch.insert(key, record::encode(&c.to_vec()).unwrap());
            }
        }
        batch.insert(
            keys::range("a", 1),
            record::encode(&RangeRecord::new(3)).unwrap(),
        );
        batch.insert(keys::META_NEXT_SEQ, record::encode(&4u64).unwrap());
        // Format 1's dedupe: an entry per msg_id and the round's list of them.
        let at = now_ms();
        for (seq, m) in (1u64..).zip(&old) {
            let d = DedupeRecord {
                seq,
                node_count: 1,
                accepted_at_ms: at,
            };
            batch.insert(keys::dedupe(&m.msg_id), record::encode(&d).unwrap());
        }
        let ids = old.iter().map(|m| m.msg_id.clone()).collect();
        let round = record::RoundIndex { msg_ids: ids };
        batch.insert(keys::round_index(at, 1), record::encode(&round).unwrap());
        store.tree().apply_batch(batch).unwrap();
        migrate::force_format(store.tree(), 1).unwrap();
    }
    let store = Store::reopen(dir.path(), Duration::from_secs(10)).unwrap();
    assert_eq!(migrate::format_version(store.tree()).unwrap(), 2);
    for (seq, m) in (1u64..).zip(&old) {
        assert_eq!(&store.message(seq).unwrap().unwrap(), m, "m/{seq}");
    }
    assert!(store.verify(false).unwrap().problems.is_empty());
    let d = store
        .dedupe("old1")
        .unwrap()
        .expect("dedupe survives the migration");
    assert_eq!((d.seq, d.node_count), (2, 1));
    for legacy in [keys::DEDUPE, keys::ROUNDS] {
        assert_eq!(
            store.tree().scan_prefix(legacy).count(),
            0,
            "format-1 records gone"
        );
    }
    let (tx, _rx) = watch::channel(0);
    let (commit, thread) = Committer::spawn(store.clone(), opts(), tx).unwrap();
    THREADS.with(|t| t.borrow_mut().push(thread));
    commit_batch(&commit, (0..3).map(|i| (format!("new{i}"), vec![i]))).await;
    commit.stop().await.unwrap();
    assert_eq!(store.message_count(), 6);
    assert_eq!(store.message(4).unwrap().unwrap().msg_id, "new0");
    assert_eq!(store.message(6).unwrap().unwrap().msg_id, "new2");
    assert_eq!(store.message(2).unwrap().unwrap(), old[1]);
    assert_eq!(store.dedupe("new2").unwrap().unwrap().seq, 6);
    assert_eq!(store.dedupe("old2").unwrap().unwrap().seq, 3);
}

#[test]
fn a_second_open_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).err().expect("locked");
    assert_eq!(err.code(), "locked", "{err}");
}

#[test]
fn a_garbled_record_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.upsert_node("a", "127.0.0.1:1", false).unwrap();
    store
        .tree()
        .insert(keys::message(7), &b"\x01garbage"[..])
        .unwrap();
    let err = store.message(7).unwrap_err().to_string();
    assert!(err.contains("m/7"), "{err}");
    store.tree().insert(keys::node("b"), &b"\x09"[..]).unwrap();
    let err = store.nodes().unwrap_err().to_string();
    assert!(err.contains("n/b"), "{err}");
}

#[tokio::test]
async fn a_garbled_range_record_is_quarantined_and_rebuilt_never_blocking_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _) = setup(dir.path(), &["a"]);
    let (r1, r2) = tokio::join!(
        commit.accept(accept("x", vec![1])),
        commit.accept(accept("y", vec![2]))
    );
    r1.unwrap();
    r2.unwrap();
    commit.accept(accept("z", vec![3])).await.unwrap();
    let ranges = store.ranges("a", None, 10).unwrap();
    let (first, original) = ranges[0].clone();
    store
        .tree()
        .insert(keys::range("a", first), &b"\x01garbage"[..])
        .unwrap();

    let read = store.ranges("a", None, 10).unwrap();
    assert_eq!(read.len(), ranges.len(), "no range dropped");
    assert_eq!(read[0].0, first);
    assert_eq!(read[0].1.len, original.len, "rebuilt up to the next range");
    assert_eq!(
        read[0].1.pending().count() as u32,
        original.len,
        "every entry pending"
    );
    let mut q = keys::QUARANTINE.to_vec();
    q.extend_from_slice(&keys::range("a", first));
    assert_eq!(
        store.tree().get(q).unwrap().as_deref(),
        Some(&b"\x01garbage"[..])
    );
    // Read again: the rebuilt record is a normal one now.
    assert_eq!(store.ranges("a", None, 10).unwrap()[0].1, read[0].1);
}

/// The dedupe index is rebuilt from the rounds at open and answers with the round's node
/// count; an unreadable round is left out (those ids are simply not deduplicated), reported
/// by verify, and moved to quarantine by expiry.
#[tokio::test]
async fn the_dedupe_index_survives_reopen_and_skips_an_unreadable_round() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (_store, commit, _rx) = setup(dir.path(), &["a", "b"]);
        for r in 0..2 {
            commit_batch(&commit, (0..3).map(|i| (format!("r{r}-{i}"), vec![1]))).await;
        }
        commit.stop().await.unwrap();
        join_committers();
    }
    let store = Store::reopen(dir.path(), Duration::from_secs(10)).unwrap();
    let d = store.dedupe("r1-2").unwrap().unwrap();
    assert_eq!((d.seq, d.node_count), (store.next_seq().unwrap() - 1, 2));
    assert!(store.dedupe("r1-3").unwrap().is_none());
    let rounds: Vec<Vec<u8>> = store
        .tree()
        .scan_prefix(keys::DEDUPE_ROUNDS)
        .keys()
        .map(|k| k.unwrap().to_vec())
        .collect();
    assert_eq!(rounds.len(), 2);
    store
        .tree()
        .insert(&rounds[0], &b"\x01garbage"[..])
        .unwrap();
    drop(store);
    let store = Store::reopen(dir.path(), Duration::from_secs(10)).unwrap();
    assert!(store.dedupe("r0-0").unwrap().is_none(), "left out");
    assert!(store.dedupe("r1-0").unwrap().is_some());
    let report = store.verify(false).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(store.expire_dedupe(now_ms() + 1, 100).unwrap(), 4);
    assert_eq!(store.tree().scan_prefix(keys::DEDUPE_ROUNDS).count(), 0);
    assert!(store.dedupe("r1-0").unwrap().is_none(), "expired");
    assert_eq!(store.verify(false).unwrap().quarantined, 1);
}

#[tokio::test]
async fn dedupe_expiry_goes_a_round_at_a_time_and_stops_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _rx) = setup(dir.path(), &["a"]);
    // Three rounds of five: a batch is committed as one round.
    for r in 0..3 {
        commit_batch(&commit, (0..5).map(|i| (format!("r{r}-{i}"), vec![1]))).await;
    }
    let everything = now_ms() + 1;
    // The limit is reached inside the second round: that round still goes whole.
    assert_eq!(store.expire_dedupe(everything, 6).unwrap(), 10);
    let kept = |r: usize| (0..5).all(|i| store.dedupe(&format!("r{r}-{i}")).unwrap().is_some());
    assert!(!kept(0) && !kept(1) && kept(2));
    assert_eq!(store.expire_dedupe(everything, 6).unwrap(), 5);
    assert!(!kept(2));
    assert_eq!(store.expire_dedupe(everything, 6).unwrap(), 0);
    commit.stop().await.unwrap();
}

#[tokio::test]
async fn shared_reads_read_ahead_and_a_bad_pack_ahead_fails_only_its_own_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _rx) = setup(dir.path(), &["a"]);
    let big = vec![9u8; 200 * 1024];
    let payload = |i: u8| if i == 3 { big.clone() } else { vec![i] };
    // One round, three packs: 0..=2, 3 alone (over 64 KiB: chunked), 4..=9.
    commit_batch(&commit, (0..10u8).map(|i| (format!("m{i}"), payload(i)))).await;
    // A later round: pack 10..=11.
    commit_batch(&commit, (10..12u8).map(|i| (format!("m{i}"), payload(i)))).await;
    commit.stop().await.unwrap();
    let first = store.dedupe("m0").unwrap().unwrap().seq;
    let heads: Vec<u64> = store
        .tree()
        .scan_prefix(keys::MESSAGES)
        .keys()
        .filter_map(|k| keys::parse_message(&k.unwrap()).filter(|(_, head)| *head))
        .map(|(last, _)| last - first)
        .collect();
    assert_eq!(heads, [2, 3, 9, 11], "packs end at these offsets");
    store
        .tree()
        .insert(keys::message(first + 9), &b"\x01garbage"[..])
        .unwrap();

    let m = store.shared_message(first).unwrap().unwrap();
    assert_eq!(m.payload[..], [0]);
    // Read ahead up to the bad pack, the chunked one included.
    for i in 1..4u8 {
        let cached = store.inner.messages.get(first + u64::from(i)).unwrap();
        assert_eq!(cached.payload, payload(i), "m{i}");
    }
    assert!(store.inner.messages.get(first + 4).is_none());
    for i in 4..10 {
        let err = store.shared_message(first + i).unwrap_err().to_string();
        assert!(err.contains(&format!("m/{}", first + 9)), "{err}");
    }
    assert_eq!(
        store.shared_message(first + 10).unwrap().unwrap().payload[..],
        [10]
    );
    assert_eq!(
        store.message(first + 11).unwrap().unwrap().payload[..],
        [11]
    );
    assert!(store.shared_message(first + 12).unwrap().is_none());
}

/// A forward reader's read-ahead is its own: it serves the reader after the shared cache
/// dropped it (here the cache is cleared and the pack garbled on disk, so any second read
/// would fail), and entries the reader skips past are dropped.
#[tokio::test]
async fn a_readers_own_read_ahead_outlives_the_shared_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (store, commit, _rx) = setup(dir.path(), &["a"]);
    commit_batch(&commit, (0..20u8).map(|i| (format!("m{i}"), vec![i]))).await;
    commit.stop().await.unwrap();
    let first = store.dedupe("m0").unwrap().unwrap().seq;
    let last = first + 19;

    let mut ahead = ReadAhead::default();
    assert_eq!(
        store
            .next_message(first, &mut ahead)
            .unwrap()
            .unwrap()
            .payload[..],
        [0]
    );
    assert_eq!(ahead.0.len(), 19, "the rest of the pack");
    store.inner.messages.clear();
    store
        .tree()
        .insert(keys::message(last), &b"\x01garbage"[..])
        .unwrap();
    assert!(
        store.shared_message(first + 1).is_err(),
        "gone from the cache"
    );
    assert_eq!(
        store
            .next_message(first + 1, &mut ahead)
            .unwrap()
            .unwrap()
            .payload[..],
        [1]
    );
    assert_eq!(
        store
            .next_message(first + 5, &mut ahead)
            .unwrap()
            .unwrap()
            .payload[..],
        [5]
    );
    assert_eq!(ahead.0.len(), 14, "2, 3 and 4 were skipped past");
    assert_eq!(
        store
            .next_message(last, &mut ahead)
            .unwrap()
            .unwrap()
            .payload[..],
        [19]
    );
    assert!(ahead.0.is_empty());
    assert!(
        store.next_message(first + 3, &mut ahead).is_err(),
        "going back reads again"
    );
}

/// Migration 0002 converts dedupe rounds a step at a time: a store whose migration stopped
/// part-way (one round converted, the version still 1) is finished by the next open, and
/// every msg_id answers as before.
#[test]
fn a_migration_stopped_part_way_is_finished_by_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let at = now_ms();
    let round = |start: u64, ids: &[&str]| {
        let mut batch = sled::Batch::default();
        for (seq, id) in (start..).zip(ids) {
            let d = DedupeRecord {
                seq,
                node_count: 2,
                accepted_at_ms: at,
            };
            batch.insert(keys::dedupe(id), record::encode(&d).unwrap());
        }
        let msg_ids = ids.iter().map(|s| s.to_string()).collect();
        let index = record::RoundIndex { msg_ids };
        batch.insert(
            keys::round_index(at, start),
            record::encode(&index).unwrap(),
        );
        batch
    };
    {
        let store = Store::open(dir.path()).unwrap();
        store.tree().apply_batch(round(1, &["a", "b"])).unwrap();
        store.tree().apply_batch(round(3, &["c"])).unwrap();
        // The first round already converted, as a step of 0002 leaves it.
        let mut step = sled::Batch::default();
        let converted = DedupeRound {
            node_count: 2,
            msg_ids: vec!["a".into(), "b".into()],
        };
        step.insert(
            keys::dedupe_round(at, 1),
            record::encode(&converted).unwrap(),
        );
        step.remove(keys::round_index(at, 1));
        step.remove(keys::dedupe("a"));
        step.remove(keys::dedupe("b"));
        store.tree().apply_batch(step).unwrap();
        migrate::force_format(store.tree(), 1).unwrap();
    }
    let store = Store::reopen(dir.path(), Duration::from_secs(10)).unwrap();
    assert_eq!(migrate::format_version(store.tree()).unwrap(), 2);
    for (id, seq) in [("a", 1), ("b", 2), ("c", 3)] {
        let d = store.dedupe(id).unwrap().unwrap();
        assert_eq!(
            (d.seq, d.node_count, d.accepted_at_ms),
            (seq, 2, at),
            "{id}"
        );
    }
    for legacy in [keys::DEDUPE, keys::ROUNDS] {
        assert_eq!(store.tree().scan_prefix(legacy).count(), 0);
    }
    assert_eq!(store.tree().scan_prefix(keys::DEDUPE_ROUNDS).count(), 2);
}
