//! The reclaimer: a thread of its own that deletes delivered payloads and expires dedupe
//! entries beside the commit rounds instead of between them.
//!
//! A deletion in sled 0.34.7 costs 20–90 µs (sled reads back from disk each 16-pack leaf it
//! rewrites). Run between commit rounds on the committer thread, steps of 64 stalled every
//! ack waiting meanwhile by 5–7 ms. Here they still cost the rounds something: the page
//! rewrites they cause are written by the next round's sync, which is why they are paced
//! ([`PACE_PER_RECORD`]).
//!
//! **Invariant 3** (see [`super`]): the reclaimer deletes message records only below a mark
//! the committer handed it with [`Reclaimer::reclaim_below`], and the committer hands over
//! only a low-water mark it read *before* a [`Store::sync`] that returned. The reclaimer
//! never syncs (only the committer calls `flush()`: concurrent flushes hang in sled 0.34.7,
//! sled#1308); its deletions reach the disk with the next round's sync, and any lost to a
//! crash are redone after restart, when the first mark is handed over again.
//!
//! Deletions are single-key removes, not batches: a sled batch holds the tree's write lock
//! while it applies, which would stall the committer's rounds and the delivery workers'
//! progress writes for as long as the step took.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use super::{now_ms, Store, StoreError};

/// Most message records, and most dedupe entries, removed per step; the thread checks for a
/// new mark, or for shutdown, between steps.
const STEP: usize = 32;
/// Pause after a step that left more to do, per record it removed: spreads the deletions
/// (and the page rewrites they cause, which the next round's sync must write) over the
/// time until the next mark instead of deleting a mark's worth in one burst. Caps
/// reclamation at 20,000 records a second, above what commit rounds write here: a round
/// writes one record per 16 KiB pack (and per 64 KiB chunk of a larger message), and
/// rounds are bounded by the fsync rate (about 4,500 a second on this machine). Batched
/// half-load ack p99 at 30,737 msgs/s, 8 A/B runs: 11.8 ms unpaced (steps of 256), 9.7 ms
/// paced (BENCHMARKS.md). Dedupe expiry is not paced: it removes one record per commit
/// round, whatever the round's size, and must keep up with the rounds.
const PACE_PER_RECORD: Duration = Duration::from_micros(50);
/// How often expired dedupe entries are looked for, once none are left over.
const EXPIRE_EVERY: Duration = Duration::from_millis(200);
/// How long a failed step waits before it is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The committer's handle on the reclaimer thread. Dropping it stops the thread and waits
/// for it (at most one step).
pub struct Reclaimer {
    /// Low-water marks, each synced before it was sent; `None` once stopping.
    marks: Option<mpsc::Sender<u64>>,
    /// Every message record below this sequence is deleted.
    reclaimed_below: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reclaimer {
    /// Starts the thread; dedupe entries older than `dedupe_window` are expired by it.
    pub fn spawn(store: Store, dedupe_window: Duration) -> Result<Reclaimer, StoreError> {
        let (tx, rx) = mpsc::channel();
        let reclaimed_below = Arc::new(AtomicU64::new(0));
        let progress = reclaimed_below.clone();
        let thread = std::thread::Builder::new()
            .name("reclaimer".into())
            .spawn(move || run(&store, &rx, &progress, dedupe_window))
            .map_err(|e| StoreError::io("starting the reclaimer thread", e))?;
        Ok(Reclaimer {
            marks: Some(tx),
            reclaimed_below,
            thread: Some(thread),
        })
    }

    /// Lets the thread delete every message record below `lwm`. The caller must have read
    /// `lwm` from the store before a [`Store::sync`] that succeeded (invariant 3).
    pub fn reclaim_below(&self, lwm: u64) {
        if let Some(marks) = &self.marks {
            // A send fails only if the thread is gone, which `stop` reports.
            let _ = marks.send(lwm);
        }
    }

    /// Every message record below this sequence is deleted (0 until the first mark is done).
    pub fn reclaimed_below(&self) -> u64 {
        self.reclaimed_below.load(Ordering::Acquire)
    }

    /// Stops the thread after its current step and waits for it; later calls do nothing.
    pub fn stop(&mut self) {
        self.marks = None;
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(
                    "the reclaimer thread panicked; payloads are reclaimed after the next restart"
                );
            }
        }
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The thread: deletes below the latest mark in paced steps until caught up, and expires
/// dedupe entries every [`EXPIRE_EVERY`] (at once again while a step finds more), until the
/// committer's handle is gone.
fn run(store: &Store, marks: &mpsc::Receiver<u64>, done: &AtomicU64, dedupe_window: Duration) {
    let mut target = 0;
    let mut next_delete = Instant::now();
    let mut next_expiry = Instant::now();
    loop {
        let behind = target > done.load(Ordering::Acquire);
        let due = if behind {
            next_delete.min(next_expiry)
        } else {
            next_expiry
        };
        match marks.recv_timeout(due.saturating_duration_since(Instant::now())) {
            Ok(lwm) => target = target.max(lwm),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        target = marks.try_iter().fold(target, u64::max);
        let now = Instant::now();
        if target > done.load(Ordering::Acquire) && now >= next_delete {
            match store.delete_messages_below(target, STEP) {
                Ok(n) if n < STEP => done.store(target, Ordering::Release),
                Ok(n) => next_delete = now + PACE_PER_RECORD * n as u32,
                Err(e) => {
                    tracing::warn!(error = %e, "reclaiming delivered payloads failed; will retry");
                    next_delete = now + RETRY_AFTER;
                }
            }
        }
        if now >= next_expiry {
            let cutoff = now_ms().saturating_sub(dedupe_window.as_millis() as u64);
            next_expiry = match store.expire_dedupe(cutoff, STEP) {
                Ok(n) if n >= STEP => now,
                Ok(_) => now + EXPIRE_EVERY,
                Err(e) => {
                    tracing::warn!(error = %e, "expiring dedupe entries failed; will retry");
                    now + RETRY_AFTER
                }
            };
        }
    }
}
