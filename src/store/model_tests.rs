//! Model-based test of the queue: random sequences of enqueue (with repeated msg_ids),
//! delivery, dead-lettering, payload reclamation and restart, checked after every step
//! against a plain in-memory model and the store's invariants.

// Test code: a panic is a failed test with its message.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::watch;

use super::commit::CommitOptions;
use super::*;

const NODES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Action {
    /// Accept these msg_ids concurrently (one or more commit rounds).
    Enqueue(Vec<u8>),
    /// Node `n` finishes its `k`-th pending entry (delivered).
    Deliver(usize, usize),
    /// Node `n` dead-letters its `k`-th pending entry.
    DeadLetter(usize, usize),
    /// Reclaim payloads below the low-water mark.
    Reclaim,
    /// Stop the committer, close and reopen the store.
    Restart,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => prop::collection::vec(0u8..40, 1..8).prop_map(Action::Enqueue),
        4 => (0..NODES.len(), 0usize..8).prop_map(|(n, k)| Action::Deliver(n, k)),
        1 => (0..NODES.len(), 0usize..8).prop_map(|(n, k)| Action::DeadLetter(n, k)),
        1 => Just(Action::Reclaim),
        1 => Just(Action::Restart),
    ]
}

/// What the store should hold.
#[derive(Default)]
struct Model {
    /// msg_id -> seq, for every accepted message.
    accepted: BTreeMap<String, u64>,
    /// Per node: pending seq -> msg_id.
    pending: [BTreeMap<u64, String>; 3],
    /// Per node: dead-lettered seqs.
    dead: [BTreeSet<u64>; 3],
}

struct Live {
    store: Store,
    commit: CommitHandle,
    thread: std::thread::JoinHandle<()>,
}

fn open(dir: &std::path::Path) -> Live {
    let store = Store::reopen(dir, Duration::from_secs(10)).unwrap();
    for n in NODES {
        store.upsert_node(n, "127.0.0.1:1", true).unwrap();
    }
    let (tx, _rx) = watch::channel(0);
    let opts = CommitOptions {
        durability: Durability::Fsync,
        dedupe_window: Duration::from_secs(600),
    };
    let (commit, thread) = Committer::spawn(store.clone(), opts, tx).unwrap();
    Live {
        store,
        commit,
        thread,
    }
}

/// Finishes (delivered or dead-lettered) `seq` for `node` the way a worker does.
fn finish(store: &Store, node: &str, seq: u64, dead: bool) {
    let (start, mut rec) = store
        .ranges(node, None, usize::MAX)
        .unwrap()
        .into_iter()
        .rfind(|(s, _)| *s <= seq)
        .expect("a range holds every pending seq");
    rec.set_done((seq - start) as u32);
    if dead {
        let d = DeadLetterRecord {
            seq,
            message: store.message(seq).unwrap(),
            attempts: 5,
            reason: "model".into(),
            dead_at_ms: now_ms(),
        };
        store.dead_letter(node, start, &rec, &d).unwrap();
    } else {
        store.save_range(node, start, &rec).unwrap();
    }
}

fn check(store: &Store, model: &Model) {
    for (i, node) in NODES.iter().enumerate() {
        let mut pending = BTreeMap::new();
        for (start, rec) in store.ranges(node, None, usize::MAX).unwrap() {
            for o in rec.pending() {
                let seq = start + u64::from(o);
                // Invariant 3: a pending entry's payload is still there.
                let m = store
                    .message(seq)
                    .unwrap()
                    .expect("payload of a pending entry");
                pending.insert(seq, m.msg_id);
            }
        }
        assert_eq!(pending, model.pending[i], "pending of node {node}");
        let dead: BTreeSet<u64> = store
            .dead_letters(node)
            .unwrap()
            .iter()
            .map(|d| d.seq)
            .collect();
        assert_eq!(dead, model.dead[i], "dead letters of node {node}");
        for d in store.dead_letters(node).unwrap() {
            assert!(d.message.is_some(), "a dead letter keeps a full copy");
        }
    }
    // Invariant 2: every accepted msg_id has its dedupe entry pointing at its sequence.
    for (id, seq) in &model.accepted {
        assert_eq!(
            store.dedupe(id).unwrap().map(|d| d.seq),
            Some(*seq),
            "dedupe of {id}"
        );
    }
}

fn run(actions: Vec<Action>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut live = Some(open(dir.path()));
    let mut model = Model::default();
    for action in actions {
        let l = live.as_ref().unwrap();
        match action {
            Action::Enqueue(ids) => {
                let replies = rt.block_on(futures::future::join_all(ids.iter().map(|i| {
                    l.commit.accept(Accept {
                        msg_id: Some(format!("id-{i}")),
                        topic: String::new(),
                        headers: vec![],
                        payload: vec![*i; 1 + *i as usize].into(),
                        ttl_ms: 0,
                    })
                })));
                for r in replies {
                    let r = r.unwrap();
                    assert_eq!(r.node_count, 3);
                    let seq = l.store.dedupe(&r.msg_id).unwrap().unwrap().seq;
                    if r.duplicate {
                        assert_eq!(model.accepted.get(&r.msg_id), Some(&seq));
                    } else {
                        assert!(model.accepted.insert(r.msg_id.clone(), seq).is_none());
                        for p in &mut model.pending {
                            p.insert(seq, r.msg_id.clone());
                        }
                    }
                }
            }
            Action::Deliver(n, k) | Action::DeadLetter(n, k) => {
                let dead = matches!(action, Action::DeadLetter(..));
                if let Some(seq) = model.pending[n].keys().nth(k).copied() {
                    finish(&l.store, NODES[n], seq, dead);
                    model.pending[n].remove(&seq);
                    if dead {
                        model.dead[n].insert(seq);
                    }
                }
            }
            Action::Reclaim => {
                let lwm = l.store.low_water_mark(l.store.next_seq().unwrap()).unwrap();
                l.store.sync().unwrap();
                l.store.delete_messages_below(lwm, usize::MAX).unwrap();
            }
            Action::Restart => {
                let Live {
                    store,
                    commit,
                    thread,
                } = live.take().unwrap();
                rt.block_on(commit.stop()).unwrap();
                thread.join().unwrap();
                drop(store);
                live = Some(open(dir.path()));
            }
        }
        check(&live.as_ref().unwrap().store, &model);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn queue_matches_the_model(actions in prop::collection::vec(action(), 1..40)) {
        run(actions);
    }
}
