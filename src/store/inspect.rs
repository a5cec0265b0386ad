//! Inspection and repair of the queues: everything `queue-dump` and the admin API read or
//! change, through typed records only.
//!
//! # How these operations keep the store's invariants
//!
//! - **Replay** ([`Store::replay_dead_letters`]) moves dead letters back into the live queue
//!   as *new* messages: each gets a fresh sequence number above every existing one, a new
//!   message record (same msg_id, topic, headers, payload, acceptance time and TTL), and a
//!   new range record covering only that node, with attempts reset. The dead letters are
//!   removed, the records written and `meta/next_seq` advanced in one batch, then synced.
//!   Because the new sequences are above every range start, a running node worker finds
//!   them by scanning forward, and the low-water mark (invariant 3) counts them like any
//!   other range. Sequence numbers belong to the committer: on a running manager a replay
//!   runs on the committer thread ([`super::CommitHandle::replay`]); offline, the store
//!   refuses it while a committer is running in this process.
//! - **Import** ([`Store::import`]) works the same way: fresh sequences, one message record
//!   per distinct message, one range per node, dead letters as full copies, all in one
//!   synced batch. Offline only.
//! - **Purge** ([`Store::purge`]) marks live entries finished (like a delivery) or deletes
//!   dead letters; it never deletes a message record. Payloads are reclaimed by the usual
//!   low-water mark: by the reclaimer thread on a running manager (`store/reclaim.rs`), or by
//!   [`Store::reclaim_payloads`] offline. A node's live queue is owned by its worker while a
//!   manager runs: purge it only with that worker paused.
//! - **Verify** ([`Store::verify`]) reads every record; with `repair`, it moves undecodable
//!   records to the quarantine keyspace `x/<original key>` (raw bytes, never deleted) and
//!   moves live entries whose payload is missing to the node's dead letters, so nothing
//!   disappears silently.
//!
//! Filters are exact: an entry whose message cannot be read matches only a filter that
//! asks nothing about the message (no `older_than`, `topic`, `msg_id`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[cfg(test)]
mod tests;

use super::commit::MAX_ROUND;
use super::{keys, migrate, now_ms, record, Store, StoreError};
use super::{DeadLetterRecord, MessageRecord, NodeRecord, RangeRecord};

use super::keys::{DEAD, META, QUARANTINE};

/// Ranges read per store query while walking a queue.
const PAGE: usize = 64;

/// Upper bounds of the age buckets of [`NodeSummary::ages`]: up to 1 minute, 10 minutes,
/// 1 hour, 1 day, and older.
pub const AGE_BUCKETS: [(&str, Option<Duration>); 5] = [
    ("1m", Some(Duration::from_secs(60))),
    ("10m", Some(Duration::from_secs(600))),
    ("1h", Some(Duration::from_secs(3600))),
    ("1d", Some(Duration::from_secs(86_400))),
    ("older", None),
];

/// Which of a node's two queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueKind {
    /// Entries still to deliver (in flight and backing off included).
    Live,
    /// Entries the node refused permanently, kept whole.
    DeadLetter,
}

impl QueueKind {
    /// The name used in JSON and export files: `live` or `dead_letter`.
    pub fn label(self) -> &'static str {
        match self {
            QueueKind::Live => "live",
            QueueKind::DeadLetter => "dead_letter",
        }
    }

    /// The inverse of [`QueueKind::label`].
    pub fn from_label(s: &str) -> Option<QueueKind> {
        match s {
            "live" => Some(QueueKind::Live),
            "dead_letter" => Some(QueueKind::DeadLetter),
            _ => None,
        }
    }
}

/// Which entries a listing or bulk operation applies to; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only sequences at or above this.
    pub from_seq: Option<u64>,
    /// Only messages accepted at least this long ago.
    pub older_than: Option<Duration>,
    /// Only messages with exactly this topic.
    pub topic: Option<String>,
    /// Only the message with exactly this msg_id.
    pub msg_id: Option<String>,
}

impl Filter {
    /// Whether the filter asks anything about the message itself.
    fn needs_message(&self) -> bool {
        self.older_than.is_some() || self.topic.is_some() || self.msg_id.is_some()
    }

    /// Whether the entry `seq` holding `msg` (`None`: unreadable) matches at `now_ms`.
    pub fn matches(&self, seq: u64, msg: Option<&MessageRecord>, now_ms: u64) -> bool {
        if self.from_seq.is_some_and(|from| seq < from) {
            return false;
        }
        let Some(msg) = msg else {
            return !self.needs_message();
        };
        if let Some(age) = self.older_than {
            let cutoff = now_ms.saturating_sub(age.as_millis() as u64);
            if msg.accepted_at_ms > cutoff {
                return false;
            }
        }
        if self.topic.as_ref().is_some_and(|t| *t != msg.topic) {
            return false;
        }
        self.msg_id.as_ref().is_none_or(|m| *m == msg.msg_id)
    }
}

/// One entry of a node's live queue or dead letters, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    /// The node whose queue holds it.
    pub node: String,
    /// Which queue.
    pub kind: QueueKind,
    /// Its sequence number (for a dead letter: the one it had while live).
    pub seq: u64,
    /// Offers made to the node so far (live: as last written back by the worker).
    pub attempts: u32,
    /// The message; `None` when its record is missing or unreadable (see `problem`).
    pub message: Option<MessageRecord>,
    /// Why `message` is `None`.
    pub problem: Option<String>,
    /// Dead letters: the node's last answer (or the store error) that dead-lettered it.
    pub dead_reason: Option<String>,
    /// Dead letters: when, milliseconds since the Unix epoch.
    pub dead_at_ms: Option<u64>,
}

/// A node's queue in numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSummary {
    /// Live entries: in flight and backing off included, dead letters excluded.
    pub pending: u64,
    /// Dead letters.
    pub dead_letter: u64,
    /// Acceptance time of the oldest live entry, if there is one and it is readable.
    pub oldest_accepted_at_ms: Option<u64>,
    /// Payload bytes of the live entries (only with `detail`).
    pub bytes: Option<u64>,
    /// Live entries per age bucket of [`AGE_BUCKETS`] (only with `detail`; unreadable
    /// entries are not counted).
    pub ages: Option<[u64; 5]>,
}

/// What a replay did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// `(dead letter, new sequence)` for each entry put back into the live queue.
    pub replayed: Vec<(QueueEntry, u64)>,
    /// Matching dead letters left where they are, with the reason.
    pub skipped: Vec<(QueueEntry, String)>,
    /// The sequence counter after the replay.
    pub next_seq: u64,
}

/// Where a msg_id is (see [`Store::find_message`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FoundMessage {
    /// Every live entry and dead letter holding it, on any node, in node order.
    pub held: Vec<QueueEntry>,
    /// Message records with that msg_id that no queue holds any more (delivered everywhere,
    /// not reclaimed yet), by sequence.
    pub delivered: Vec<(u64, MessageRecord)>,
}

/// One entry to import (see [`Store::import`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportItem {
    /// The node to queue it for.
    pub node: String,
    /// Live queue or dead letters.
    pub kind: QueueKind,
    /// The message.
    pub message: MessageRecord,
    /// Offers made so far (kept for dead letters and live entries alike).
    pub attempts: u32,
    /// Dead letters: why.
    pub dead_reason: String,
    /// Dead letters: when, milliseconds since the Unix epoch.
    pub dead_at_ms: u64,
}

/// What an import did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Entries written (or that would be).
    pub imported: usize,
    /// Entries skipped because that node's queue already holds that msg_id, with a note.
    pub skipped: Vec<(ImportItem, String)>,
    /// Nodes that were not known and were created with an empty address.
    pub new_nodes: Vec<String>,
}

/// One problem found by [`Store::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The record concerned, readable.
    pub key: String,
    /// What is wrong.
    pub what: String,
    /// What `--repair` did about it; `None` when nothing was (or could be) done.
    pub repaired: Option<String>,
}

/// The result of [`Store::verify`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Records already in quarantine (not checked again).
    pub quarantined: u64,
    /// Everything wrong, in key order.
    pub problems: Vec<Problem>,
    /// Things worth knowing that are not errors (e.g. keys of a newer build).
    pub notes: Vec<String>,
}

impl VerifyReport {
    /// Whether a problem remains that was not repaired.
    pub fn has_unrepaired(&self) -> bool {
        self.problems.iter().any(|p| p.repaired.is_none())
    }
}

/// `l/<node>\0<seq>` → node id.
fn node_of_dead(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(DEAD)?;
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

impl Store {
    // ----- guards -----

    /// Refuses operations that write outside the committer's sequence (import, offline
    /// replay, payload reclamation) while a committer runs, and any write on a store opened
    /// read-only.
    fn ensure_offline_writer(&self, what: &str) -> Result<(), StoreError> {
        if self.inner.read_only {
            return Err(StoreError::Engine {
                what: what.to_string(),
                reason: "the store was opened read-only; open it for writing".into(),
            });
        }
        if self.inner.committer_running.load(Ordering::SeqCst) {
            return Err(StoreError::Engine {
                what: what.to_string(),
                reason: "a committer owns this store's sequence numbers; go through the \
                         running manager (its admin API) instead"
                    .into(),
            });
        }
        Ok(())
    }

    fn ensure_writable(&self, what: &str) -> Result<(), StoreError> {
        if self.inner.read_only {
            return Err(StoreError::Engine {
                what: what.to_string(),
                reason: "the store was opened read-only; open it for writing".into(),
            });
        }
        Ok(())
    }

    // ----- store-wide facts -----

    /// The on-disk format version (see [`migrate`]).
    pub fn format_version(&self) -> Result<u32, StoreError> {
        migrate::format_version(self.tree())
    }

    /// Bytes the store's files take on disk, as sled counts them.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.tree()
            .size_on_disk()
            .map_err(|e| StoreError::sled("measuring the store", e))
    }

    /// The sequence number the next message will get, as last persisted.
    pub fn persisted_next_seq(&self) -> Result<u64, StoreError> {
        self.next_seq()
    }

    // ----- walking queues -----

    /// Calls `f(start, range, offset)` for every unfinished entry of `node`'s live queue at or
    /// above `from`, in sequence order, until it returns false.
    fn walk_live(
        &self,
        node: &str,
        from: u64,
        mut f: impl FnMut(u64, &RangeRecord, u32) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut after = None;
        loop {
            let page = self.ranges(node, after, PAGE)?;
            let exhausted = page.len() < PAGE;
            for (start, rec) in &page {
                after = Some(*start);
                if start.saturating_add(u64::from(rec.len)) <= from {
                    continue;
                }
                for off in rec.pending() {
                    if start + u64::from(off) >= from && !f(*start, rec, off)? {
                        return Ok(());
                    }
                }
            }
            if exhausted {
                return Ok(());
            }
        }
    }

    /// The message of live entry `seq`, or why there is none.
    fn message_or_problem(&self, seq: u64) -> (Option<MessageRecord>, Option<String>) {
        match self.message(seq) {
            Ok(Some(m)) => (Some(m), None),
            Ok(None) => (None, Some(format!("message {seq}'s record is missing"))),
            Err(e) => (None, Some(e.to_string())),
        }
    }

    fn live_entry(&self, node: &str, seq: u64, rec: &RangeRecord, off: u32) -> QueueEntry {
        let (message, problem) = self.message_or_problem(seq);
        QueueEntry {
            node: node.to_string(),
            kind: QueueKind::Live,
            seq,
            attempts: rec
                .attempts
                .iter()
                .find(|(o, _)| *o == off)
                .map_or(0, |(_, a)| *a),
            message,
            problem,
            dead_reason: None,
            dead_at_ms: None,
        }
    }

    fn dead_entry(node: &str, d: DeadLetterRecord) -> QueueEntry {
        let problem = d
            .message
            .is_none()
            .then(|| "the dead letter has no copy of its message".to_string());
        QueueEntry {
            node: node.to_string(),
            kind: QueueKind::DeadLetter,
            seq: d.seq,
            attempts: d.attempts,
            message: d.message,
            problem,
            dead_reason: Some(d.reason),
            dead_at_ms: Some(d.dead_at_ms),
        }
    }

    /// Calls `f` for each of `node`'s dead letters at or above `from`, until it returns false.
    fn walk_dead(
        &self,
        node: &str,
        from: u64,
        mut f: impl FnMut(QueueEntry) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = keys::dead_prefix(node);
        let end = keys::dead(node, u64::MAX);
        for item in self.tree().range(keys::dead(node, from)..=end) {
            let (k, v) = item.map_err(|e| StoreError::sled("scanning dead letters", e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            let d: DeadLetterRecord = record::decode(&k, &v)?;
            if !f(Self::dead_entry(node, d))? {
                break;
            }
        }
        Ok(())
    }

    /// Up to `limit` entries of `node`'s `kind` queue matching `filter`, in sequence order.
    pub fn entries(
        &self,
        node: &str,
        kind: QueueKind,
        filter: &Filter,
        limit: usize,
        now_ms: u64,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let from = filter.from_seq.unwrap_or(0);
        match kind {
            QueueKind::Live => self.walk_live(node, from, |start, rec, off| {
                let e = self.live_entry(node, start + u64::from(off), rec, off);
                if filter.matches(e.seq, e.message.as_ref(), now_ms) {
                    out.push(e);
                }
                Ok(out.len() < limit)
            })?,
            QueueKind::DeadLetter => self.walk_dead(node, from, |e| {
                if filter.matches(e.seq, e.message.as_ref(), now_ms) {
                    out.push(e);
                }
                Ok(out.len() < limit)
            })?,
        }
        Ok(out)
    }

    /// Counts of `node`'s queues. With `detail`, every live message is read for
    /// [`NodeSummary::bytes`] and [`NodeSummary::ages`]; without, only the first.
    pub fn node_summary(
        &self,
        node: &str,
        detail: bool,
        now_ms: u64,
    ) -> Result<NodeSummary, StoreError> {
        let mut s = NodeSummary::default();
        let mut bytes = 0u64;
        let mut ages = [0u64; 5];
        let mut first = true;
        self.walk_live(node, 0, |start, _, off| {
            s.pending += 1;
            let seq = start + u64::from(off);
            if first || detail {
                if let Ok(Some(m)) = self.message(seq) {
                    if first {
                        s.oldest_accepted_at_ms = Some(m.accepted_at_ms);
                    }
                    bytes += m.payload.len() as u64;
                    let age = Duration::from_millis(now_ms.saturating_sub(m.accepted_at_ms));
                    let bucket = AGE_BUCKETS
                        .iter()
                        .position(|(_, max)| max.is_none_or(|max| age <= max))
                        .unwrap_or(AGE_BUCKETS.len() - 1);
                    ages[bucket] += 1;
                }
                first = false;
            }
            Ok(true)
        })?;
        s.dead_letter = self.tree().scan_prefix(keys::dead_prefix(node)).count() as u64;
        if detail {
            s.bytes = Some(bytes);
            s.ages = Some(ages);
        }
        Ok(s)
    }

    /// Every known node (and every node that still has a queue or dead letters) with its
    /// record and counts, by node id. A node with dead letters but no record is reported
    /// with an empty address.
    pub fn summaries(
        &self,
        detail: bool,
        now_ms: u64,
    ) -> Result<Vec<(String, NodeRecord, NodeSummary)>, StoreError> {
        let mut nodes = self.nodes()?;
        for item in self.tree().scan_prefix(DEAD).keys() {
            let k = item.map_err(|e| StoreError::sled("scanning dead letters", e))?;
            if let Some(id) = node_of_dead(&k) {
                if !nodes.contains_key(id) {
                    nodes.insert(id.to_string(), orphan_node_record());
                }
            }
        }
        nodes
            .into_iter()
            .map(|(id, rec)| {
                let s = self.node_summary(&id, detail, now_ms)?;
                Ok((id, rec, s))
            })
            .collect()
    }

    /// Where `msg_id` is: see [`FoundMessage`].
    pub fn find_message(&self, msg_id: &str) -> Result<FoundMessage, StoreError> {
        // An unreadable pack is verify's business; here it just cannot match.
        let records: BTreeMap<u64, MessageRecord> = self
            .readable_messages()?
            .into_iter()
            .filter(|(_, m)| m.msg_id == msg_id)
            .collect();
        let filter = Filter {
            msg_id: Some(msg_id.to_string()),
            ..Filter::default()
        };
        let mut found = Vec::new();
        let mut held = BTreeSet::new();
        for (node, _, _) in self.summaries(false, 0)? {
            self.walk_live(&node, 0, |start, rec, off| {
                let seq = start + u64::from(off);
                if records.contains_key(&seq) {
                    held.insert(seq);
                    found.push(self.live_entry(&node, seq, rec, off));
                }
                Ok(true)
            })?;
            self.walk_dead(&node, 0, |e| {
                if filter.matches(e.seq, e.message.as_ref(), 0) {
                    found.push(e);
                }
                Ok(true)
            })?;
        }
        let delivered = records
            .into_iter()
            .filter(|(seq, _)| !held.contains(seq))
            .collect();
        Ok(FoundMessage {
            held: found,
            delivered,
        })
    }

    // ----- replay -----

    /// Moves `node`'s dead letters matching `filter` back into its live queue as new
    /// messages (see the module docs), offline. Dead letters without a copy of their
    /// message, and messages whose TTL has run out (they would never be delivered), are
    /// skipped and stay dead letters. With `dry_run`, nothing is written.
    pub fn replay_dead_letters(
        &self,
        node: &str,
        filter: &Filter,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<ReplayOutcome, StoreError> {
        if !dry_run {
            self.ensure_offline_writer("replaying dead letters")?;
        }
        let next_seq = self.next_seq()?;
        self.replay_at(node, filter, dry_run, next_seq, now_ms)
    }

    /// The replay itself, allocating sequences from `next_seq`: called offline, or by the
    /// committer, which owns the counter on a running manager.
    pub(crate) fn replay_at(
        &self,
        node: &str,
        filter: &Filter,
        dry_run: bool,
        next_seq: u64,
        now_ms: u64,
    ) -> Result<ReplayOutcome, StoreError> {
        let mut out = ReplayOutcome {
            next_seq,
            ..ReplayOutcome::default()
        };
        let mut chosen = Vec::new();
        self.walk_dead(node, 0, |e| {
            if !filter.matches(e.seq, e.message.as_ref(), now_ms) {
                return Ok(true);
            }
            match &e.message {
                None => out.skipped.push((
                    e,
                    "no copy of the message was kept; nothing to replay".to_string(),
                )),
                Some(m) if m.expires_at_ms().is_some_and(|t| t <= now_ms) => out.skipped.push((
                    e,
                    "its TTL has run out; a replay would never be delivered".to_string(),
                )),
                Some(_) => chosen.push(e),
            }
            Ok(true)
        })?;
        if chosen.is_empty() {
            return Ok(out);
        }
        let mut batch = sled::Batch::default();
        let mut seq = next_seq;
        for group in chosen.chunks(MAX_ROUND) {
            let start = seq;
            for e in group {
                if let Some(m) = &e.message {
                    Store::put_message(&mut batch, seq, m)?;
                }
                batch.remove(keys::dead(node, e.seq));
                seq += 1;
            }
            batch.insert(
                keys::range(node, start),
                record::encode(&RangeRecord::new(group.len() as u32))?,
            );
        }
        batch.insert(keys::META_NEXT_SEQ, record::encode(&seq)?);
        if !dry_run {
            self.ensure_writable("replaying dead letters")?;
            if !self.tree().contains_key(keys::node(node)).unwrap_or(false) {
                // A queue never exists without its node record (invariant 2).
                batch.insert(keys::node(node), record::encode(&orphan_node_record())?);
            }
            self.apply(batch, "replaying dead letters")?;
            self.sync()?;
            out.next_seq = seq;
        }
        out.replayed = chosen.into_iter().zip(next_seq..).collect();
        Ok(out)
    }

    // ----- purge -----

    /// Removes `node`'s entries of `kind` matching `filter` and returns them. Live entries are
    /// marked finished, exactly as a delivery does; their payloads are reclaimed later by the
    /// low-water mark. On a running manager, purge a live queue only while its worker is
    /// paused. With `dry_run`, nothing is written.
    pub fn purge(
        &self,
        node: &str,
        kind: QueueKind,
        filter: &Filter,
        dry_run: bool,
        now_ms: u64,
    ) -> Result<Vec<QueueEntry>, StoreError> {
        let mut purged = Vec::new();
        let mut batch = sled::Batch::default();
        match kind {
            QueueKind::Live => {
                let mut changed: BTreeMap<u64, RangeRecord> = BTreeMap::new();
                self.walk_live(node, filter.from_seq.unwrap_or(0), |start, rec, off| {
                    let e = self.live_entry(node, start + u64::from(off), rec, off);
                    if filter.matches(e.seq, e.message.as_ref(), now_ms) {
                        changed
                            .entry(start)
                            .or_insert_with(|| rec.clone())
                            .set_done(off);
                        purged.push(e);
                    }
                    Ok(true)
                })?;
                for (start, rec) in changed {
                    let key = keys::range(node, start);
                    if rec.is_complete() {
                        batch.remove(key);
                    } else {
                        batch.insert(key, record::encode(&rec)?);
                    }
                }
            }
            QueueKind::DeadLetter => {
                self.walk_dead(node, filter.from_seq.unwrap_or(0), |e| {
                    if filter.matches(e.seq, e.message.as_ref(), now_ms) {
                        batch.remove(keys::dead(node, e.seq));
                        purged.push(e);
                    }
                    Ok(true)
                })?;
            }
        }
        if !dry_run && !purged.is_empty() {
            self.ensure_writable("purging a queue")?;
            self.apply(batch, "purging a queue")?;
            self.sync()?;
        }
        Ok(purged)
    }

    /// Deletes every message record no queue needs any more (below the low-water mark),
    /// offline; returns how many. The state the mark is computed from is synced before the
    /// deletion (invariant 3).
    pub fn reclaim_payloads(&self) -> Result<usize, StoreError> {
        self.ensure_offline_writer("reclaiming payloads")?;
        let lwm = self.low_water_mark(self.next_seq()?)?;
        self.sync()?;
        let mut total = 0;
        loop {
            let n = self.delete_messages_below(lwm, 10_000)?;
            total += n;
            if n < 10_000 {
                break;
            }
        }
        self.sync()?;
        Ok(total)
    }

    // ----- import -----

    /// Queues `items` again (an export put back), offline, in one synced batch: fresh
    /// sequences, one message record per distinct message shared by the nodes that hold it,
    /// one range per node, dead letters as full copies. An item is skipped when its node's
    /// queue of that kind already holds its msg_id, so importing the same file twice queues
    /// nothing twice. Unknown nodes are created with an empty address. With `dry_run`,
    /// nothing is written.
    pub fn import(
        &self,
        items: Vec<ImportItem>,
        dry_run: bool,
    ) -> Result<ImportOutcome, StoreError> {
        if !dry_run {
            self.ensure_offline_writer("importing")?;
        }
        let mut out = ImportOutcome::default();
        let known = self.nodes()?;
        // msg_ids each (node, kind) already holds.
        let mut present: BTreeMap<(String, QueueKind), BTreeSet<String>> = BTreeMap::new();
        let mut wanted: Vec<ImportItem> = Vec::new();
        for item in items {
            let slot = (item.node.clone(), item.kind);
            if !present.contains_key(&slot) {
                let mut ids = BTreeSet::new();
                for e in self.entries(&item.node, item.kind, &Filter::default(), usize::MAX, 0)? {
                    if let Some(m) = e.message {
                        ids.insert(m.msg_id);
                    }
                }
                present.insert(slot.clone(), ids);
            }
            let ids = present.entry(slot).or_default();
            if !ids.insert(item.message.msg_id.clone()) {
                let note = format!(
                    "node {} already holds msg_id {} in its {} queue",
                    item.node,
                    item.message.msg_id,
                    item.kind.label()
                );
                out.skipped.push((item, note));
                continue;
            }
            if !known.contains_key(&item.node) && !out.new_nodes.contains(&item.node) {
                out.new_nodes.push(item.node.clone());
            }
            wanted.push(item);
        }
        out.imported = wanted.len();
        if wanted.is_empty() || dry_run {
            return Ok(out);
        }

        let mut seq = self.next_seq()?;
        let mut batch = sled::Batch::default();
        // One message record per distinct live message; each node's share in sequence order.
        // (msg_id, accepted_at) -> the records written for it, with their sequences.
        let mut messages: HashMap<(String, u64), Vec<(u64, MessageRecord)>> = HashMap::new();
        let mut per_node: BTreeMap<String, Vec<(u64, u32)>> = BTreeMap::new();
        for item in wanted {
            match item.kind {
                QueueKind::Live => {
                    let same = messages
                        .entry((item.message.msg_id.clone(), item.message.accepted_at_ms))
                        .or_default();
                    let s = match same.iter().find(|(_, m)| *m == item.message) {
                        Some((s, _)) => *s,
                        None => {
                            Store::put_message(&mut batch, seq, &item.message)?;
                            same.push((seq, item.message));
                            seq += 1;
                            seq - 1
                        }
                    };
                    per_node
                        .entry(item.node)
                        .or_default()
                        .push((s, item.attempts));
                }
                QueueKind::DeadLetter => {
                    let dead = DeadLetterRecord {
                        seq,
                        message: Some(item.message),
                        attempts: item.attempts,
                        reason: item.dead_reason,
                        dead_at_ms: item.dead_at_ms,
                    };
                    batch.insert(keys::dead(&item.node, seq), record::encode(&dead)?);
                    seq += 1;
                }
            }
        }
        for (node, mut share) in per_node {
            share.sort_unstable();
            for (start, rec) in ranges_covering(&share) {
                batch.insert(keys::range(&node, start), record::encode(&rec)?);
            }
        }
        for node in &out.new_nodes {
            let now = now_ms();
            let rec = NodeRecord {
                first_seen_ms: now,
                last_seen_ms: now,
                ..orphan_node_record()
            };
            batch.insert(keys::node(node), record::encode(&rec)?);
        }
        batch.insert(keys::META_NEXT_SEQ, record::encode(&seq)?);
        self.apply(batch, "importing")?;
        self.sync()?;
        Ok(out)
    }

    // ----- verify -----

    /// Reads every record and checks it: checksum and decoding, range structure, that every
    /// live entry's message exists and that the sequence counter is above every sequence in
    /// use. With `repair` (offline only): undecodable records go to quarantine, live entries
    /// without a readable message go to their node's dead letters, a missing node record is
    /// recreated with an empty address, a sequence counter that is too low is raised.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        if repair {
            self.ensure_offline_writer("repairing")?;
        }
        // Decoded messages cached by earlier reads would hide what is on disk now.
        self.inner.messages.clear();
        let mut report = VerifyReport::default();
        let mut batch = sled::Batch::default();
        let mut max_seq: Option<u64> = None;
        let mut heads = Vec::new();
        let mut ranges: BTreeMap<(String, u64), RangeRecord> = BTreeMap::new();
        let mut queue_nodes = BTreeSet::new();
        let mut node_records = BTreeSet::new();
        let mut stored_next_seq = None;

        for item in self.tree().iter() {
            let (k, v) = item.map_err(|e| StoreError::sled("reading every record", e))?;
            if k.starts_with(QUARANTINE) {
                report.quarantined += 1;
                continue;
            }
            report.records += 1;
            let name = keys::display(&k);
            let checked: Result<(), StoreError> = if k.starts_with(META) {
                match &k[..] {
                    k2 if k2 == keys::META_FORMAT => record::decode::<u32>(&k, &v).map(drop),
                    k2 if k2 == keys::META_MANAGER_ID => record::decode::<String>(&k, &v).map(drop),
                    k2 if k2 == keys::META_NEXT_SEQ => record::decode::<u64>(&k, &v).map(|n| {
                        stored_next_seq = Some(n);
                    }),
                    _ => {
                        report.notes.push(format!(
                            "{name}: a key this build does not know (written by a newer \
                             build?); left alone"
                        ));
                        Ok(())
                    }
                }
            } else if k.starts_with(keys::MESSAGES) {
                match keys::parse_message(&k) {
                    Some((seq, true)) => {
                        max_seq = max_seq.max(Some(seq));
                        heads.push(seq);
                        record::decode::<record::MessageHead>(&k, &v).map(drop)
                    }
                    Some((_, false)) => record::decode::<Vec<u8>>(&k, &v).map(drop),
                    None => Err(StoreError::Corrupt {
                        key: name.clone(),
                        reason: "a message key of unexpected length".into(),
                    }),
                }
            } else if k.starts_with(keys::QUEUES) {
                match (keys::node_of_range(&k), keys::trailing_u64(&k)) {
                    (Some(node), Some(start)) => {
                        let node = node.to_string();
                        record::decode::<RangeRecord>(&k, &v).and_then(|r| {
                            check_range(&r).map_err(|reason| StoreError::Corrupt {
                                key: name.clone(),
                                reason,
                            })?;
                            let end = start + u64::from(r.len.max(1)) - 1;
                            max_seq = max_seq.max(Some(end));
                            queue_nodes.insert(node.clone());
                            ranges.insert((node, start), r);
                            Ok(())
                        })
                    }
                    _ => Err(StoreError::Corrupt {
                        key: name.clone(),
                        reason: "a queue key without a node id and sequence".into(),
                    }),
                }
            } else if k.starts_with(DEAD) {
                if let Some(node) = node_of_dead(&k) {
                    queue_nodes.insert(node.to_string());
                }
                record::decode::<DeadLetterRecord>(&k, &v).map(|d| {
                    max_seq = max_seq.max(Some(d.seq));
                })
            } else if k.starts_with(keys::NODES) {
                node_records.insert(String::from_utf8_lossy(&k[keys::NODES.len()..]).into_owned());
                record::decode::<NodeRecord>(&k, &v).map(drop)
            } else if k.starts_with(keys::DEDUPE_ROUNDS) {
                super::decode_round(&k, &v).map(drop)
            } else if k.starts_with(keys::ABSENT) {
                record::decode::<u64>(&k, &v).map(drop)
            } else if k.starts_with(keys::ARCHIVE_PROGRESS) {
                record::decode::<super::ArchiveProgress>(&k, &v).map(drop)
            } else {
                Err(StoreError::Corrupt {
                    key: name.clone(),
                    reason: "a key outside every keyspace of the store".into(),
                })
            };
            if let Err(e) = checked {
                let what = match e {
                    StoreError::Corrupt { reason, .. } => reason,
                    other => other.to_string(),
                };
                let repairable = !k.starts_with(META);
                let repaired = (repair && repairable).then(|| {
                    quarantine(&mut batch, &k, &v);
                    format!("moved to quarantine as x/{name}")
                });
                report.problems.push(Problem {
                    key: name,
                    what,
                    repaired,
                });
            }
        }

        // Message heads whose chunks do not add up.
        let mut unreadable = BTreeMap::new();
        for seq in heads {
            if let Err(e) = self.message(seq) {
                unreadable.insert(seq, e.to_string());
            }
        }
        let quarantined_keys: BTreeSet<String> =
            report.problems.iter().map(|p| p.key.clone()).collect();
        for (seq, why) in &unreadable {
            let key = keys::message(*seq);
            let name = keys::display(&key);
            if quarantined_keys.contains(&name) {
                continue;
            }
            let repaired = if repair {
                match self.tree().get(&key) {
                    Ok(Some(v)) => {
                        quarantine(&mut batch, &key, &v);
                        Some(format!("moved to quarantine as x/{name}"))
                    }
                    _ => None,
                }
            } else {
                None
            };
            report.problems.push(Problem {
                key: name,
                what: why.clone(),
                repaired,
            });
        }

        // Live entries whose message is missing or unreadable.
        for ((node, start), rec) in &ranges {
            let mut fixed = rec.clone();
            let mut dead = Vec::new();
            for off in rec.pending() {
                let seq = start + u64::from(off);
                let why = match self.message(seq) {
                    Ok(Some(_)) => continue,
                    Ok(None) => format!("live entry {node}/{seq} has no message record"),
                    Err(e) => format!("live entry {node}/{seq} has an unreadable message: {e}"),
                };
                let attempts = rec
                    .attempts
                    .iter()
                    .find(|(o, _)| *o == off)
                    .map_or(0, |(_, a)| *a);
                fixed.set_done(off);
                dead.push((seq, attempts, why));
            }
            if dead.is_empty() {
                continue;
            }
            for (seq, attempts, why) in dead {
                let repaired = if repair {
                    let d = DeadLetterRecord {
                        seq,
                        message: None,
                        attempts,
                        reason: format!("{why} (moved by queue-dump verify --repair)"),
                        dead_at_ms: now_ms(),
                    };
                    batch.insert(keys::dead(node, seq), record::encode(&d)?);
                    Some(format!("moved to {node}'s dead letters"))
                } else {
                    None
                };
                report.problems.push(Problem {
                    key: keys::display(&keys::range(node, *start)),
                    what: why,
                    repaired,
                });
            }
            if repair {
                let key = keys::range(node, *start);
                if fixed.is_complete() {
                    batch.remove(key);
                } else {
                    batch.insert(key, record::encode(&fixed)?);
                }
            }
        }

        // Queues of nodes without a record.
        for node in queue_nodes.difference(&node_records) {
            let key = keys::node(node);
            let repaired = if repair {
                batch.insert(key.clone(), record::encode(&orphan_node_record())?);
                Some("recreated the node record with an empty address".to_string())
            } else {
                None
            };
            report.problems.push(Problem {
                key: keys::display(&key),
                what: format!("node {node} has queued entries but no node record"),
                repaired,
            });
        }

        // The sequence counter must be above every sequence in use.
        let next = stored_next_seq.unwrap_or(1);
        if let Some(max) = max_seq.filter(|m| *m >= next) {
            let repaired = if repair {
                batch.insert(keys::META_NEXT_SEQ, record::encode(&(max + 1))?);
                Some(format!("raised to {}", max + 1))
            } else {
                None
            };
            report.problems.push(Problem {
                key: "meta/next_seq".into(),
                what: format!(
                    "the sequence counter is {next} but sequence {max} is in use; new \
                     messages would overwrite old ones"
                ),
                repaired,
            });
        }

        if repair && report.problems.iter().any(|p| p.repaired.is_some()) {
            self.apply(batch, "repairing")?;
            self.sync()?;
        }
        Ok(report)
    }
}

/// Adds to `batch` the move of one record to quarantine: `x/<key>` gets its raw bytes (kept,
/// never deleted) and `key` is removed. Used by `verify --repair` and by the delivery
/// workers ([`Store::quarantine_message`]).
pub(super) fn quarantine(batch: &mut sled::Batch, key: &[u8], value: &[u8]) {
    let mut q = QUARANTINE.to_vec();
    q.extend_from_slice(key);
    batch.insert(q, value.to_vec());
    batch.remove(key.to_vec());
}

impl Store {
    /// Moves the pack holding message `seq` (its head and every chunk) to quarantine in one
    /// batch, for a delivery worker that met it undecodable; its other messages go with it.
    /// Returns the pack's key (`None`: already gone). Not synced on its own: a crash before
    /// the next sync leaves the pack in place, to be met (and quarantined) again.
    pub fn quarantine_message(&self, seq: u64) -> Result<Option<String>, StoreError> {
        self.ensure_writable("quarantining a message")?;
        let Some((last, _, _)) = self.pack_head_from(b"", seq)? else {
            return Ok(None);
        };
        let head = keys::message(last);
        let mut batch = sled::Batch::default();
        for item in self.tree().scan_prefix(&head) {
            let (k, v) =
                item.map_err(|e| StoreError::sled("reading a message to quarantine", e))?;
            quarantine(&mut batch, &k, &v);
        }
        self.apply(batch, "quarantining a message")?;
        Ok(Some(keys::display(&head)))
    }

    /// Whether message `seq` is in quarantine (its pack moved there by a worker or by
    /// `verify --repair`). Packs never overlap and sequences are assigned without gaps, so
    /// the pack that held `seq` is the first head at or after it, live or quarantined: `seq`
    /// is quarantined when a quarantined head comes before any live one.
    pub fn message_quarantined(&self, seq: u64) -> Result<bool, StoreError> {
        let Some((quarantined, _, _)) = self.pack_head_from(QUARANTINE, seq)? else {
            return Ok(false);
        };
        Ok(self
            .pack_head_from(b"", seq)?
            .is_none_or(|(live, _, _)| live > quarantined))
    }
}

/// A node record for a node known only from its queue.
fn orphan_node_record() -> NodeRecord {
    NodeRecord {
        addr: String::new(),
        first_seen_ms: 0,
        last_seen_ms: 0,
        is_static: false,
        held: false,
    }
}

/// Structural checks of a range record beyond decoding.
fn check_range(r: &RangeRecord) -> Result<(), String> {
    if r.len == 0 {
        return Err("a range of length 0".into());
    }
    if r.done.len() != (r.len as usize).div_ceil(8) {
        return Err(format!(
            "its bitmap has {} bytes for {} entries",
            r.done.len(),
            r.len
        ));
    }
    if let Some((o, _)) = r.attempts.iter().find(|(o, _)| *o >= r.len) {
        return Err(format!(
            "attempts recorded for offset {o}, beyond its {} entries",
            r.len
        ));
    }
    Ok(())
}

/// Range records covering the sorted sequences `share` (with their attempts), each at most
/// [`MAX_ROUND`] long, every sequence in between that is not in `share` marked finished.
fn ranges_covering(share: &[(u64, u32)]) -> Vec<(u64, RangeRecord)> {
    let mut out: Vec<(u64, RangeRecord)> = Vec::new();
    let mut i = 0;
    while i < share.len() {
        let start = share[i].0;
        let mut j = i;
        while j + 1 < share.len() && share[j + 1].0 - start < MAX_ROUND as u64 {
            j += 1;
        }
        let len = (share[j].0 - start + 1) as u32;
        let mut rec = RangeRecord::new(len);
        let mine: BTreeMap<u32, u32> = share[i..=j]
            .iter()
            .map(|(s, a)| ((s - start) as u32, *a))
            .collect();
        for off in 0..len {
            match mine.get(&off) {
                None => rec.set_done(off),
                Some(0) => {}
                Some(a) => rec.attempts.push((off, *a)),
            }
        }
        out.push((start, rec));
        i = j + 1;
    }
    out
}
