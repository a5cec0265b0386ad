//! One delivery worker per known node.
//!
//! The worker reads its node's ranges in sequence order (a bounded number at a time, so a
//! million-message backlog does not live in memory), keeps up to `max_in_flight` calls
//! outstanding, and records each finished entry in its range. A call carries up to
//! `delivery_batch` entries as one `BroadcastBatch` (at most [`BATCH_BYTES`] of payload,
//! and always at least one entry), or one entry as a unary `Broadcast` once the node has
//! answered a batch with UNIMPLEMENTED (until its address changes). It sleeps until a commit
//! round lands (the `committed` watch), a send completes, a timer is due, or its target
//! (address, online state) changes: there is no polling loop.
//!
//! Invariants:
//! - An entry is finished (bit set in its range) only after the node answered OK or
//!   ALREADY_EXISTS, its TTL ran out, or its dead letter was written in the same batch.
//! - Progress reaches the store at least every [`WRITE_BACK_EVERY`] and on shutdown; a
//!   crash in between only re-delivers (at-least-once), it never loses.
//! - Until the node has answered once on the current channel, and while it is backing off,
//!   at most one call (the probe) is in flight, carrying one entry; any answer from the node
//!   (OK or a permanent refusal) ends the backoff and opens the window. So a node that is
//!   down costs one request per backoff step, not a window of batches: with 100 nodes down
//!   while accepting, batches as probes took a quarter of the manager's CPU.
//! - A batch the node answered UNIMPLEMENTED was never offered: its entries go back
//!   unchanged (attempts not counted) and are sent again as unary calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::NodeClient;
use super::policy::{self, Outcome, Ttl};
use super::{DeliveryConfig, NodeState, NodeStatus, NodeTarget};
use crate::metrics::NodeMetrics;
use crate::store::{
    now_ms, DeadLetterRecord, MessageRecord, RangeRecord, ReadAhead, Store, StoreError,
};

/// How often partial progress on a range is written back.
const WRITE_BACK_EVERY: Duration = Duration::from_millis(100);
/// Entries kept loaded in memory per node.
const LOAD_TARGET: usize = 4096;
/// Ranges read from the store per query.
const LOAD_BATCH: usize = 64;
/// Pause after a store read error before trying again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Payload bytes one batch call carries at most (a larger single message goes alone): bounds
/// a worker's memory to `max_in_flight` × this, whatever the batch size. A tighter bound,
/// 1 MiB over all of a worker's calls, was tried and measured: the last calls under it
/// carried a few messages each, and draining 150,000 queued messages to 3 nodes fell from
/// 91,700 to 29,100 msgs/s at twice the manager CPU.
const BATCH_BYTES: usize = 1 << 20;

/// The state of one unfinished, loaded entry that is not in flight.
struct Entry {
    /// Offers so far (the next send carries `attempts + 1`).
    attempts: u32,
    /// Not offered again before this (after a permanent refusal).
    not_before: Option<Instant>,
    /// Per-entry backoff for permanent refusals, created on the first one. Boxed: a worker
    /// keeps up to [`LOAD_TARGET`] entries, and few ever need one (32 bytes an entry instead
    /// of 120).
    backoff: Option<Box<ExponentialBackoff>>,
}

/// A finished send of one entry.
struct Sent {
    seq: u64,
    epoch: u64,
    entry: Entry,
    result: Result<(), tonic::Status>,
}

/// What a finished call brings back.
enum Call {
    /// Each entry's answer.
    Answered(Vec<Sent>),
    /// The node does not implement `BroadcastBatch`: these entries were never offered.
    NoBatch(Vec<(u64, Entry)>),
}

/// An entry ready to go, with its request.
type Ready = (u64, Entry, crate::proto::BroadCastReq);

/// Delivers one node's queue; see the module docs.
pub(super) struct NodeWorker {
    pub(super) node: String,
    pub(super) store: Store,
    pub(super) cfg: Arc<DeliveryConfig>,
    pub(super) committed: watch::Receiver<u64>,
    pub(super) target: watch::Receiver<NodeTarget>,
    pub(super) status: watch::Sender<NodeStatus>,
    pub(super) shutdown: CancellationToken,
    pub(super) metrics: NodeMetrics,
}

struct State {
    client: Option<NodeClient>,
    /// Calls carry batches: `delivery_batch` > 1 and the node has not answered a batch with
    /// UNIMPLEMENTED since its address was last set.
    batch: bool,
    /// The node has answered a call on the current channel (made at start, on a new address
    /// and on new TLS settings); until then only a one-entry probe goes (see the module docs).
    answered: bool,
    target: NodeTarget,
    /// Loaded, unfinished ranges by start sequence.
    ranges: BTreeMap<u64, RangeRecord>,
    /// Ranges changed in memory since last written.
    dirty: BTreeSet<u64>,
    /// Start of the last range loaded.
    loaded_until: Option<u64>,
    /// The store may hold ranges beyond `loaded_until`.
    maybe_more: bool,
    /// Entries ready to send, in sequence order.
    entries: BTreeMap<u64, Entry>,
    /// Entries waiting for their `not_before` after a permanent refusal (few).
    waiting: BTreeMap<u64, Entry>,
    /// Node-level backoff, and the instant the next probe may go.
    backoff: ExponentialBackoff,
    blocked_until: Option<Instant>,
    /// Bumped whenever the backoff escalates: a failure of a send started in an older epoch
    /// does not escalate it again.
    epoch: u64,
    last_write_back: Instant,
    /// The node's last failure, for the status.
    last_error: Option<String>,
    /// The first unfinished entry as `(range start, seq)`, whose accepted time the metrics
    /// show; recomputed when `head_stale`.
    head: Option<(u64, u64)>,
    head_stale: bool,
    /// Accepted time of each loaded range (ms since the epoch), learned from messages read
    /// for sending: every message of a range was accepted in the same commit round and
    /// carries that round's time, so one read tells it for the whole range.
    range_times: HashMap<u64, u64>,
    /// The state last given to the metrics.
    metrics_state: Option<NodeState>,
    /// Messages read ahead for this node ([`Store::next_message`]).
    ahead: ReadAhead,
}

impl NodeWorker {
    /// Runs until shutdown; then waits for in-flight sends and writes progress back.
    pub(super) async fn run(mut self) {
        let cfg = self.cfg.clone();
        let mut st = State {
            client: None,
            batch: false,
            answered: false,
            target: self.target.borrow_and_update().clone(),
            ranges: BTreeMap::new(),
            dirty: BTreeSet::new(),
            loaded_until: None,
            maybe_more: true,
            entries: BTreeMap::new(),
            waiting: BTreeMap::new(),
            backoff: policy::backoff(cfg.backoff_initial, cfg.backoff_max),
            blocked_until: None,
            epoch: 0,
            last_write_back: Instant::now(),
            last_error: None,
            head: None,
            head_stale: true,
            range_times: HashMap::new(),
            metrics_state: None,
            ahead: ReadAhead::default(),
        };
        self.connect(&mut st);
        // Reloaded certificates toward nodes: a new channel for the calls from then on.
        let mut tls_updates = cfg.node_tls.clone();
        let mut in_flight = FuturesUnordered::new();
        let mut committer_alive = true;
        loop {
            if st.maybe_more {
                if let Err(e) = self.refill(&mut st, in_flight.len()) {
                    tracing::error!(node = %self.node, error = %e, "reading the queue failed");
                    st.blocked_until = Some(Instant::now() + STORE_RETRY);
                }
            }
            self.launch(&mut st, &mut in_flight);
            self.track_oldest(&mut st);
            self.publish(&mut st);
            let wake = self.next_wake(&st);
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                Some(call) = in_flight.next(), if !in_flight.is_empty() => {
                    self.on_call(&mut st, call);
                }
                r = self.committed.changed(), if committer_alive => {
                    committer_alive = r.is_ok();
                    st.maybe_more = true;
                }
                r = self.target.changed() => {
                    if r.is_err() {
                        break;
                    }
                    self.retarget(&mut st);
                }
                reloaded = tls_changed(&mut tls_updates) => {
                    if reloaded {
                        tracing::info!(node = %self.node, "TLS settings reloaded; reconnecting");
                        self.connect(&mut st);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            self.write_back(&mut st, false);
        }
        while let Some(call) = in_flight.next().await {
            self.on_call(&mut st, call);
        }
        self.write_back(&mut st, true);
    }

    fn connect(&self, st: &mut State) {
        st.client = None;
        // A new address may be a newer node: offer it batches again, once it answers.
        st.batch = self.cfg.delivery_batch > 1;
        st.answered = false;
        if st.target.addr.is_empty() {
            return;
        }
        let tls = self.cfg.node_tls.as_ref().map(|rx| rx.borrow().clone());
        match NodeClient::connect(&st.target.addr, self.cfg.delivery_timeout, tls) {
            Ok(c) => st.client = Some(c),
            Err(e) => tracing::error!(node = %self.node, error = %e, "cannot deliver to node"),
        }
    }

    /// A new address, online state or registration: reconnect if needed, and end any
    /// backoff so the node is tried at once.
    fn retarget(&mut self, st: &mut State) {
        let target = self.target.borrow_and_update().clone();
        let readdress = target.addr != st.target.addr;
        let reregistered = target.generation != st.target.generation;
        st.target = target;
        if readdress {
            tracing::info!(node = %self.node, addr = %st.target.addr, "node address changed");
            self.connect(st);
        }
        if readdress || reregistered {
            st.backoff.reset();
            if st.blocked_until.take().is_some() {
                tracing::info!(node = %self.node, "node registered again; backoff ended");
            }
        }
    }

    /// Loads ranges until [`LOAD_TARGET`] entries are in memory or the queue is exhausted.
    fn refill(&self, st: &mut State, in_flight: usize) -> Result<(), StoreError> {
        while st.entries.len() + st.waiting.len() + in_flight < LOAD_TARGET {
            let batch = self.store.ranges(&self.node, st.loaded_until, LOAD_BATCH)?;
            let exhausted = batch.len() < LOAD_BATCH;
            for (start, rec) in batch {
                for off in rec.pending() {
                    let attempts = rec
                        .attempts
                        .iter()
                        .find(|(o, _)| *o == off)
                        .map_or(0, |(_, a)| *a);
                    st.entries.insert(
                        start + u64::from(off),
                        Entry {
                            attempts,
                            not_before: None,
                            backoff: None,
                        },
                    );
                }
                st.loaded_until = Some(start);
                st.ranges.insert(start, rec);
                if st.head.is_none() {
                    st.head_stale = true;
                }
            }
            if exhausted {
                st.maybe_more = false;
                break;
            }
        }
        Ok(())
    }

    /// Starts calls while the window allows.
    fn launch(
        &self,
        st: &mut State,
        in_flight: &mut FuturesUnordered<futures::future::BoxFuture<'static, Call>>,
    ) {
        if !st.target.delivers() {
            return;
        }
        let Some(client) = st.client.clone() else {
            return;
        };
        let now = Instant::now();
        let (window, per_call) = match st.blocked_until {
            Some(until) if now < until => return,
            Some(_) => (1, 1),
            None if !st.answered => (1, 1),
            None if st.batch => (self.cfg.max_in_flight, self.cfg.delivery_batch),
            None => (self.cfg.max_in_flight, 1),
        };
        let due: Vec<u64> = st
            .waiting
            .iter()
            .filter(|(_, e)| e.not_before.is_none_or(|t| t <= now))
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            if let Some(e) = st.waiting.remove(&seq) {
                st.entries.insert(seq, e);
            }
        }
        while in_flight.len() < window {
            let mut call: Vec<Ready> = Vec::new();
            let mut bytes = 0;
            while call.len() < per_call && (call.is_empty() || bytes < BATCH_BYTES) {
                match self.next_ready(st, now, bytes) {
                    Some(ready) => {
                        bytes += ready.2.payload.len();
                        call.push(ready);
                    }
                    None => break,
                }
            }
            if call.is_empty() {
                break;
            }
            let epoch = st.epoch;
            let client = client.clone();
            in_flight.push(Box::pin(Self::send(client, call, st.batch, epoch)));
        }
    }

    /// The next entry to send and its request, or `None` when there is none (or a store
    /// error paused the worker). Entries that cannot be sent (expired, quarantined, missing)
    /// are settled on the way. `bytes`: payload already in the call being built; an entry
    /// that would take it past [`BATCH_BYTES`] is left for the next call.
    fn next_ready(&self, st: &mut State, now: Instant, bytes: usize) -> Option<Ready> {
        loop {
            let (seq, mut entry) = st.entries.pop_first()?;
            let msg = match self.store.next_message(seq, &mut st.ahead) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    // Quarantined already (by another node's worker, or `verify --repair`).
                    if let Ok(true) = self.store.message_quarantined(seq) {
                        tracing::error!(
                            node = %self.node, seq,
                            "message {seq}'s record is in quarantine; the entry leaves the queue"
                        );
                        self.metrics.quarantined();
                        self.finish(st, seq);
                        continue;
                    }
                    let reason = format!("message {seq}'s record is missing");
                    tracing::error!(node = %self.node, seq, "{reason}; moving to dead letters");
                    self.dead_letter(st, seq, entry, None, reason);
                    continue;
                }
                Err(e @ StoreError::Corrupt { .. }) => {
                    self.quarantine(st, seq, entry, &e);
                    continue;
                }
                Err(e) => {
                    tracing::error!(node = %self.node, seq, error = %e, "reading a message failed");
                    st.entries.insert(seq, entry);
                    st.blocked_until = Some(now + STORE_RETRY);
                    return None;
                }
            };
            if bytes > 0 && bytes + msg.payload.len() > BATCH_BYTES {
                st.entries.insert(seq, entry);
                return None;
            }
            if let Some((start, _)) = Self::locate(st, seq) {
                st.range_times.entry(start).or_insert(msg.accepted_at_ms);
            }
            let ttl_ms = match policy::ttl_at(&msg, now_ms()) {
                Ttl::Expired => {
                    tracing::debug!(node = %self.node, seq, msg_id = %msg.msg_id, "expired undelivered");
                    self.metrics.expired();
                    self.finish(st, seq);
                    continue;
                }
                Ttl::Remaining(ms) => ms,
                Ttl::Forever => 0,
            };
            entry.attempts += 1;
            let req = self.request(&msg, seq, entry.attempts, ttl_ms);
            return Some((seq, entry, req));
        }
    }

    /// One call: a `BroadcastBatch` when `batch`, else a unary `Broadcast` per entry (then
    /// `call` holds one).
    async fn send(client: NodeClient, call: Vec<Ready>, batch: bool, epoch: u64) -> Call {
        let answered = |entries: Vec<(u64, Entry)>, results: Vec<Result<(), tonic::Status>>| {
            Call::Answered(
                entries
                    .into_iter()
                    .zip(results)
                    .map(|((seq, entry), result)| Sent {
                        seq,
                        epoch,
                        entry,
                        result,
                    })
                    .collect(),
            )
        };
        let (entries, reqs): (Vec<(u64, Entry)>, Vec<_>) = call
            .into_iter()
            .map(|(seq, entry, req)| ((seq, entry), req))
            .unzip();
        if !batch {
            let mut results = Vec::with_capacity(reqs.len());
            for req in reqs {
                results.push(client.clone().broadcast(req).await);
            }
            return answered(entries, results);
        }
        match client.broadcast_batch(reqs).await {
            Ok(results) => answered(entries, results),
            Err(status) if status.code() == tonic::Code::Unimplemented => Call::NoBatch(entries),
            Err(status) => {
                let results = entries.iter().map(|_| Err(status.clone())).collect();
                answered(entries, results)
            }
        }
    }

    fn on_call(&self, st: &mut State, call: Call) {
        match call {
            Call::Answered(sent) => {
                for s in sent {
                    self.on_sent(st, s);
                }
            }
            Call::NoBatch(entries) => {
                st.answered = true;
                if st.batch {
                    tracing::info!(node = %self.node, "node does not implement BroadcastBatch; delivering with unary calls");
                    st.batch = false;
                }
                for (seq, mut entry) in entries {
                    entry.attempts -= 1;
                    st.entries.insert(seq, entry);
                }
            }
        }
    }

    fn request(
        &self,
        msg: &MessageRecord,
        seq: u64,
        attempt: u32,
        ttl_ms: u64,
    ) -> crate::proto::BroadCastReq {
        crate::proto::BroadCastReq {
            msg_id: msg.msg_id.clone(),
            payload: msg.payload.clone(),
            topic: msg.topic.clone(),
            ttl_ms,
            headers: msg.headers.iter().cloned().collect(),
            manager_id: self.cfg.manager_id.clone(),
            seq,
            attempt,
        }
    }

    fn on_sent(&self, st: &mut State, sent: Sent) {
        let Sent {
            seq,
            epoch,
            mut entry,
            result,
        } = sent;
        let code = result
            .as_ref()
            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        let outcome = policy::classify(code);
        self.metrics.delivery(outcome);
        let now = Instant::now();
        if matches!(outcome, Outcome::Delivered | Outcome::Permanent) {
            st.answered = true;
            if st.blocked_until.take().is_some() {
                st.backoff.reset();
                tracing::info!(node = %self.node, "node answers again; backoff ended");
            }
        }
        match outcome {
            Outcome::Delivered => self.finish(st, seq),
            Outcome::Retry | Outcome::NodeProblem => {
                let status = result.err();
                let message = status.as_ref().map_or("", |s| s.message());
                st.last_error = Some(format!("{code:?}: {message}"));
                if outcome == Outcome::NodeProblem {
                    tracing::warn!(node = %self.node, ?code, message, "node refuses deliveries");
                } else {
                    tracing::debug!(node = %self.node, seq, attempt = entry.attempts, ?code, message, "delivery failed; will retry");
                }
                self.record_attempts(st, seq, entry.attempts);
                st.entries.insert(seq, entry);
                if epoch == st.epoch {
                    let delay = st.backoff.next_backoff().unwrap_or(self.cfg.backoff_max);
                    if st.blocked_until.is_none() {
                        tracing::info!(node = %self.node, ?code, message, ?delay, "node failing; backing off");
                    } else {
                        tracing::debug!(node = %self.node, ?code, message, ?delay, "probe failed");
                    }
                    st.blocked_until = Some(now + delay);
                    st.epoch += 1;
                }
            }
            Outcome::Permanent => {
                let reason = result
                    .err()
                    .map_or_else(String::new, |s| format!("{:?}: {}", s.code(), s.message()));
                if entry.attempts >= self.cfg.max_attempts {
                    tracing::warn!(node = %self.node, seq, attempts = entry.attempts, %reason, "dead-lettering");
                    let msg = match self.store.message(seq) {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::error!(node = %self.node, seq, error = %e, "dead letter without its message");
                            None
                        }
                    };
                    self.dead_letter(st, seq, entry, msg, reason);
                } else {
                    let b = entry.backoff.get_or_insert_with(|| {
                        Box::new(policy::backoff(
                            self.cfg.backoff_initial,
                            self.cfg.backoff_max,
                        ))
                    });
                    let delay = b.next_backoff().unwrap_or(self.cfg.backoff_max);
                    tracing::debug!(node = %self.node, seq, attempts = entry.attempts, %reason, ?delay, "refused; will offer again");
                    entry.not_before = Some(now + delay);
                    self.record_attempts(st, seq, entry.attempts);
                    st.waiting.insert(seq, entry);
                }
            }
        }
    }

    /// The range holding `seq`, as `(start, offset)`.
    fn locate(st: &State, seq: u64) -> Option<(u64, u32)> {
        let (start, rec) = st.ranges.range(..=seq).next_back()?;
        let off = u32::try_from(seq - start).ok()?;
        (off < rec.len).then_some((*start, off))
    }

    fn record_attempts(&self, st: &mut State, seq: u64, attempts: u32) {
        let Some((start, off)) = Self::locate(st, seq) else {
            return;
        };
        if let Some(rec) = st.ranges.get_mut(&start) {
            match rec.attempts.iter_mut().find(|(o, _)| *o == off) {
                Some(slot) => slot.1 = attempts,
                None => rec.attempts.push((off, attempts)),
            }
            st.dirty.insert(start);
        }
    }

    /// Marks `seq` finished; a complete range is deleted at once.
    fn finish(&self, st: &mut State, seq: u64) {
        let Some((start, off)) = Self::locate(st, seq) else {
            return;
        };
        let Some(rec) = st.ranges.get_mut(&start) else {
            return;
        };
        if !rec.is_done(off) {
            rec.set_done(off);
            // Once per entry: the queue depth invariant in crate::metrics.
            self.metrics.queue_removed(1);
            if st.head.is_some_and(|(_, head)| head == seq) {
                st.head_stale = true;
            }
        }
        if rec.is_complete() {
            match self.store.save_range(&self.node, start, rec) {
                Ok(()) => {
                    st.ranges.remove(&start);
                    st.dirty.remove(&start);
                    st.range_times.remove(&start);
                }
                Err(e) => {
                    tracing::error!(node = %self.node, error = %e, "saving progress failed");
                    st.dirty.insert(start);
                }
            }
        } else {
            st.dirty.insert(start);
        }
    }

    /// Message `seq` cannot be decoded: its record goes to the quarantine keyspace (kept,
    /// for an operator; `queue-dump verify` counts it) and the entry leaves this node's
    /// queue, reported at error and in `push_manager_quarantined_total`, so one bad record
    /// never stops the worker or holds up the entries behind it. Other nodes' entries for it
    /// find it quarantined and leave their queues the same way. On a store error the entry
    /// stays live and is retried.
    fn quarantine(&self, st: &mut State, seq: u64, mut entry: Entry, error: &StoreError) {
        match self.store.quarantine_message(seq) {
            Ok(key) => {
                let key = key.unwrap_or_else(|| "(gone already)".into());
                tracing::error!(
                    node = %self.node, seq, %error,
                    "undecodable message record moved to quarantine as x/{key}; the entry \
                     leaves the queue (see queue-dump verify)"
                );
                self.metrics.quarantined();
                self.finish(st, seq);
            }
            Err(e) => {
                tracing::error!(node = %self.node, seq, error = %e, "quarantining a message failed");
                entry.not_before = Some(Instant::now() + STORE_RETRY);
                st.waiting.insert(seq, entry);
            }
        }
    }

    /// Moves `seq` to the dead letters; on a store error the entry stays live and is retried.
    fn dead_letter(
        &self,
        st: &mut State,
        seq: u64,
        mut entry: Entry,
        message: Option<MessageRecord>,
        reason: String,
    ) {
        let Some((start, off)) = Self::locate(st, seq) else {
            return;
        };
        let Some(rec) = st.ranges.get(&start) else {
            return;
        };
        let mut updated = rec.clone();
        updated.set_done(off);
        let dead = DeadLetterRecord {
            seq,
            message,
            attempts: entry.attempts,
            reason,
            dead_at_ms: now_ms(),
        };
        match self.store.dead_letter(&self.node, start, &updated, &dead) {
            Ok(()) => {
                self.metrics.dead_lettered();
                if st.head.is_some_and(|(_, head)| head == seq) {
                    st.head_stale = true;
                }
                st.dirty.remove(&start);
                if updated.is_complete() {
                    st.ranges.remove(&start);
                    st.range_times.remove(&start);
                } else {
                    st.ranges.insert(start, updated);
                }
            }
            Err(e) => {
                tracing::error!(node = %self.node, seq, error = %e, "writing a dead letter failed");
                entry.not_before = Some(Instant::now() + STORE_RETRY);
                st.waiting.insert(seq, entry);
            }
        }
    }

    fn write_back(&self, st: &mut State, force: bool) {
        if st.dirty.is_empty() || (!force && st.last_write_back.elapsed() < WRITE_BACK_EVERY) {
            return;
        }
        st.last_write_back = Instant::now();
        let dirty = std::mem::take(&mut st.dirty);
        for start in dirty {
            let Some(rec) = st.ranges.get(&start) else {
                continue;
            };
            if let Err(e) = self.store.save_range(&self.node, start, rec) {
                tracing::error!(node = %self.node, error = %e, "saving progress failed");
                st.dirty.insert(start);
            }
        }
    }

    /// Publishes the node's status if it changed.
    fn publish(&self, st: &mut State) {
        let now = Instant::now();
        // Backing off lasts until the node answers again (see the module docs), probes
        // included: a probe in flight is not the node being back.
        let backing_off = st.blocked_until.is_some();
        let state = if st.target.held {
            NodeState::Held
        } else if !st.target.online {
            NodeState::Offline
        } else if backing_off {
            NodeState::Backoff
        } else {
            NodeState::Online
        };
        if st.metrics_state != Some(state) {
            self.metrics.set_state(state);
            st.metrics_state = Some(state);
        }
        let backoff_until = st
            .blocked_until
            .filter(|t| *t > now)
            .map(|t| std::time::SystemTime::now() + (t - now));
        self.status.send_if_modified(|s| {
            let changed = s.state != state
                || s.addr != st.target.addr
                || s.last_error != st.last_error
                || (s.backoff_until.is_some() != backoff_until.is_some());
            if changed {
                if s.state != state {
                    tracing::info!(node = %self.node, from = s.state.label(), to = state.label(), "node state");
                }
                *s = NodeStatus {
                    state,
                    addr: st.target.addr.clone(),
                    backoff_until,
                    last_error: st.last_error.clone(),
                };
            }
            changed
        });
    }

    /// Gives the metrics the accepted time of the node's first unfinished entry, when that
    /// entry may have changed. The first loaded range with an unfinished entry holds it:
    /// ranges are loaded in sequence order from the queue's start, and leave memory only
    /// once complete. The time comes from `range_times` (filled by the reads `launch` does
    /// anyway); only a range that became the head without being sent from (an offline or
    /// held node) costs one message read, once per head range, never one per delivery.
    fn track_oldest(&self, st: &mut State) {
        if !st.head_stale {
            return;
        }
        let head = st.ranges.iter().find_map(|(start, rec)| {
            rec.pending()
                .next()
                .map(|off| (*start, start + u64::from(off)))
        });
        let Some((start, seq)) = head else {
            if st.maybe_more {
                // Nothing loaded yet but the store may hold more: decide after the refill.
                return;
            }
            st.head = None;
            st.head_stale = false;
            self.metrics.set_oldest(None);
            return;
        };
        let same_range = st.head.is_some_and(|(s, _)| s == start);
        st.head = Some((start, seq));
        st.head_stale = false;
        if same_range {
            return;
        }
        let accepted_at = match st.range_times.get(&start) {
            Some(t) => Some(*t),
            None => match self.store.message(seq) {
                Ok(Some(m)) => {
                    st.range_times.insert(start, m.accepted_at_ms);
                    Some(m.accepted_at_ms)
                }
                // A missing or unreadable message is dead-lettered by `launch`; its range
                // shows as empty meanwhile.
                Ok(None) | Err(_) => None,
            },
        };
        self.metrics.set_oldest(accepted_at);
    }

    /// The next instant something is due: backoff end, a waiting entry, or write-back.
    fn next_wake(&self, st: &State) -> Instant {
        let far = Instant::now() + Duration::from_secs(3600);
        let mut wake = far;
        if let Some(t) = st.blocked_until {
            wake = wake.min(t);
        }
        if let Some(t) = st.waiting.values().filter_map(|e| e.not_before).min() {
            wake = wake.min(t);
        }
        if !st.dirty.is_empty() {
            wake = wake.min(st.last_write_back + WRITE_BACK_EVERY);
        }
        wake
    }
}

/// Waits for a new TLS configuration toward nodes: true when one was published. Never
/// resolves without TLS; once the publisher is gone (the server is stopping) it stops
/// watching and returns false once.
async fn tls_changed(
    updates: &mut Option<watch::Receiver<tonic::transport::ClientTlsConfig>>,
) -> bool {
    match updates {
        Some(rx) => match rx.changed().await {
            Ok(()) => true,
            Err(_) => {
                *updates = None;
                false
            }
        },
        None => std::future::pending().await,
    }
}
