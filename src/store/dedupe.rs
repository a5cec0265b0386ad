//! The dedupe index: which msg_ids were accepted within the dedupe window, and under which
//! sequence.
//!
//! **Durable form**: one round record per commit round (`r/<accepted_at><start>`,
//! [`DedupeRound`]), written in the round's own batch (invariant 2: an entry never exists
//! without its message), holding the node count and the msg_id of every sequence of the
//! round in order. No record per message: a sled insert per message was, after the payloads
//! themselves, the accept path's largest cost (measured: the committer ran 1.57 × as many
//! accepts per second without it).
//!
//! **In memory**: a hash of each msg_id mapped to its sequence, rebuilt from the round
//! records when the store opens and kept in step by the committer (a round is indexed once
//! its batch is applied) and by expiry. About 20 bytes per msg_id accepted within the
//! window.
//!
//! Invariants:
//! - Every msg_id of every round record in the store is in the index, and nothing else is:
//!   rounds are added right after their batch is applied and removed right after their
//!   record is deleted, under the index's lock.
//! - A hash match is only a candidate: [`DedupeIndex::candidates`] gives sequences whose
//!   round record the caller reads to compare the msg_id itself, so a hash collision can
//!   never make a new message a duplicate.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use super::record::DedupeRound;

/// A round as the index knows it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Round {
    /// When it was accepted (part of its record's key).
    pub accepted_at_ms: u64,
    /// Sequences in it.
    pub len: u64,
}

/// See the module docs.
pub(super) struct DedupeIndex {
    hasher: RandomState,
    /// Hash of a msg_id → the sequence accepted under it.
    first: HashMap<u64, u64>,
    /// Further sequences for a hash already in `first` (a collision, or an id accepted again
    /// after its entry expired but before the old round was removed).
    more: HashMap<u64, Vec<u64>>,
    /// Indexed rounds by first sequence.
    rounds: BTreeMap<u64, Round>,
}

impl DedupeIndex {
    /// An empty index.
    pub(super) fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            first: HashMap::new(),
            more: HashMap::new(),
            rounds: BTreeMap::new(),
        }
    }

    fn hash(&self, msg_id: &str) -> u64 {
        self.hasher.hash_one(msg_id)
    }

    /// Indexes a round whose record is now in the store.
    pub(super) fn add_round(&mut self, start: u64, accepted_at_ms: u64, round: &DedupeRound) {
        for (seq, id) in (start..).zip(&round.msg_ids) {
            let h = self.hash(id);
            match self.first.entry(h) {
                Entry::Vacant(e) => {
                    e.insert(seq);
                }
                Entry::Occupied(_) => self.more.entry(h).or_default().push(seq),
            }
        }
        let len = round.msg_ids.len() as u64;
        self.rounds.insert(
            start,
            Round {
                accepted_at_ms,
                len,
            },
        );
    }

    /// Forgets a round whose record was deleted.
    pub(super) fn remove_round(&mut self, start: u64, round: &DedupeRound) {
        for (seq, id) in (start..).zip(&round.msg_ids) {
            let h = self.hash(id);
            if self.first.get(&h) == Some(&seq) {
                match self.more.get_mut(&h).and_then(Vec::pop) {
                    Some(next) => self.first.insert(h, next),
                    None => self.first.remove(&h),
                };
            } else if let Some(others) = self.more.get_mut(&h) {
                others.retain(|s| *s != seq);
            }
            if self.more.get(&h).is_some_and(Vec::is_empty) {
                self.more.remove(&h);
            }
        }
        self.rounds.remove(&start);
    }

    /// Sequences that may have been accepted under `msg_id`, each with its round's first
    /// sequence and its round; the caller checks the msg_id in the round record.
    pub(super) fn candidates(&self, msg_id: &str) -> Vec<(u64, u64, Round)> {
        let h = self.hash(msg_id);
        let seqs = self
            .first
            .get(&h)
            .into_iter()
            .chain(self.more.get(&h).into_iter().flatten());
        seqs.filter_map(|seq| {
            let (start, round) = self.rounds.range(..=*seq).next_back()?;
            (*seq < start + round.len).then_some((*seq, *start, *round))
        })
        .collect()
    }

    /// Number of msg_ids indexed.
    pub(super) fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(ids: &[&str]) -> DedupeRound {
        DedupeRound {
            node_count: 3,
            msg_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn candidates_follow_rounds_in_and_out() {
        let mut ix = DedupeIndex::new();
        let a = round(&["a", "b", "c"]);
        let b = round(&["d", "a"]);
        ix.add_round(10, 1, &a);
        ix.add_round(13, 2, &b);
        assert_eq!(ix.len(), 5);
        let seqs = |ix: &DedupeIndex, id| {
            let mut s: Vec<u64> = ix.candidates(id).iter().map(|c| c.0).collect();
            s.sort();
            s
        };
        assert_eq!(
            seqs(&ix, "a"),
            [10, 14],
            "accepted again after expiry: both"
        );
        assert_eq!(seqs(&ix, "c"), [12]);
        assert_eq!(ix.candidates("c")[0].1, 10, "its round's start");
        assert!(seqs(&ix, "zz").is_empty());
        ix.remove_round(10, &a);
        assert_eq!(seqs(&ix, "a"), [14]);
        assert!(seqs(&ix, "b").is_empty());
        ix.remove_round(13, &b);
        assert_eq!(ix.len(), 0);
        assert!(ix.first.is_empty() && ix.more.is_empty() && ix.rounds.is_empty());
    }
}
