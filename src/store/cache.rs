//! A shared cache of decoded message records, for the delivery workers.
//!
//! Every node's worker sends the same messages, usually within moments of each other. Without
//! the cache each of N workers reads and decodes each record from sled, so fan-out costs N
//! reads per message; with it the first worker's read serves the others, and fan-out costs
//! one read per message plus N cheap clones.
//!
//! Invariants:
//! - A message record never changes once written (sequence numbers are never reused, see the
//!   store's invariants), so a cached record is never stale.
//! - The cache holds at most [`CACHE_BYTES`] of records (by [`MessageRecord::size`]): past
//!   it, the lowest sequences go first, since delivery moves forward in sequence order. A
//!   worker far behind the others reads from sled as before.
//! - Records whose message was deleted (payload reclamation) are dropped from the cache
//!   with it ([`MessageCache::forget_below`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::record::MessageRecord;

/// Bytes of decoded records kept.
const CACHE_BYTES: usize = 32 << 20;

/// See the module docs.
#[derive(Default)]
pub(super) struct MessageCache {
    inner: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    records: BTreeMap<u64, Arc<MessageRecord>>,
    bytes: usize,
}

impl MessageCache {
    /// The cached record of message `seq`.
    pub(super) fn get(&self, seq: u64) -> Option<Arc<MessageRecord>> {
        let cached = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        cached.records.get(&seq).cloned()
    }

    /// Keeps `record` as message `seq`'s, evicting the lowest sequences past the bound.
    pub(super) fn insert(&self, seq: u64, record: Arc<MessageRecord>) {
        let mut cached = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let size = record.size();
        if let Some(old) = cached.records.insert(seq, record) {
            cached.bytes -= old.size();
        }
        cached.bytes += size;
        while cached.bytes > CACHE_BYTES {
            let Some((_, evicted)) = cached.records.pop_first() else {
                break;
            };
            cached.bytes -= evicted.size();
        }
    }

    /// Drops every record: for a reader that must see what is on disk (`verify`).
    pub(super) fn clear(&self) {
        let mut cached = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *cached = Cached::default();
    }

    /// Drops the records of messages below `lwm` (deleted from the store).
    pub(super) fn forget_below(&self, lwm: u64) {
        let mut cached = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let kept = cached.records.split_off(&lwm);
        let dropped: usize = cached.records.values().map(|r| r.size()).sum();
        cached.records = kept;
        cached.bytes -= dropped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(size: usize) -> Arc<MessageRecord> {
        Arc::new(MessageRecord {
            msg_id: String::new(),
            topic: String::new(),
            headers: Vec::new(),
            payload: vec![0; size].into(),
            accepted_at_ms: 0,
            ttl_ms: 0,
        })
    }

    #[test]
    fn bounded_by_bytes_lowest_sequences_first() {
        let cache = MessageCache::default();
        // Three fit, four do not.
        let size = CACHE_BYTES / 4 + 1;
        for seq in 1..=5 {
            cache.insert(seq, record(size));
        }
        assert!(
            cache.get(1).is_none() && cache.get(2).is_none(),
            "evicted first"
        );
        assert!((3..=5).all(|s| cache.get(s).is_some()));
        cache.forget_below(5);
        assert!(cache.get(4).is_none() && cache.get(5).is_some());
        let bytes = cache.inner.lock().unwrap().bytes;
        assert_eq!(bytes, record(size).size());
    }
}
