//! Follows the sims' record files: which of the bench's messages each node has, when each
//! first arrived (the sims stamp arrivals in Unix ms), and so the accept-to-node latency and
//! the delivery rate. Only first arrivals count; redeliveries (at-least-once) are counted
//! apart.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use push_manager::harness::RecordTail;

use crate::load::{new_histogram, Progress, Stamps};

/// One node's record file and what it showed so far.
struct NodeTrack {
    tail: RecordTail,
    seen: Vec<bool>,
    distinct: usize,
    first_arrival_ms: Option<u64>,
    last_arrival_ms: Option<u64>,
}

/// Every node's deliveries of the bench's messages.
pub struct Tracker {
    nodes: Vec<NodeTrack>,
    prefix: String,
    messages: usize,
    stamps: Arc<Stamps>,
    progress: Arc<Progress>,
    /// Accept-to-node latency in µs, one sample per (message, node) first arrival.
    pub latency_us: Histogram<u64>,
    /// Deliveries of a message a node already had.
    pub duplicates: u64,
    /// Record lines that are not one of this run's messages.
    pub foreign: u64,
    /// First arrivals that came as an item of a `BroadcastBatch` call.
    pub via_batch: u64,
    /// First arrivals that came as a unary `Broadcast` call.
    pub via_unary: u64,
}

impl Tracker {
    /// A tracker of `records` (one per node) for `messages` messages named `<prefix><n>`.
    pub fn new(
        records: Vec<PathBuf>,
        prefix: &str,
        messages: usize,
        stamps: Arc<Stamps>,
        progress: Arc<Progress>,
    ) -> Result<Self> {
        Ok(Tracker {
            nodes: records
                .iter()
                .map(|r| NodeTrack {
                    tail: RecordTail::new(r),
                    seen: vec![false; messages],
                    distinct: 0,
                    first_arrival_ms: None,
                    last_arrival_ms: None,
                })
                .collect(),
            prefix: prefix.to_string(),
            messages,
            stamps,
            progress,
            latency_us: new_histogram()?,
            duplicates: 0,
            foreign: 0,
            via_batch: 0,
            via_unary: 0,
        })
    }

    /// Reads what the record files gained since the last poll.
    pub fn poll(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            let lines = node
                .tail
                .read_new()
                .map_err(|e| anyhow::anyhow!("reading a sim's record: {e}"))?;
            for line in lines {
                let Some(n) = line
                    .msg_id
                    .strip_prefix(&self.prefix)
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|n| *n < self.messages)
                else {
                    self.foreign += 1;
                    continue;
                };
                if node.seen[n] {
                    self.duplicates += 1;
                    continue;
                }
                node.seen[n] = true;
                node.distinct += 1;
                self.progress.delivered.fetch_add(1, Ordering::Relaxed);
                match line.call.as_deref() {
                    Some("batch") => self.via_batch += 1,
                    Some("unary") => self.via_unary += 1,
                    // Older sims do not say how a message came.
                    _ => {}
                }
                if let Some(arrival) = line.arrival_unix_ms {
                    node.first_arrival_ms =
                        Some(node.first_arrival_ms.map_or(arrival, |f| f.min(arrival)));
                    node.last_arrival_ms =
                        Some(node.last_arrival_ms.map_or(arrival, |l| l.max(arrival)));
                    if let Some(sent) = self.stamps.get(n) {
                        // Arrivals have ms resolution: an arrival within the ms of its send
                        // reads as slightly before it, hence the floor at 1 µs.
                        let us = (arrival * 1000).saturating_sub(sent).max(1);
                        self.latency_us.saturating_record(us);
                    }
                }
            }
        }
        Ok(())
    }

    /// Distinct (message, node) deliveries so far.
    pub fn delivered(&self) -> u64 {
        self.nodes.iter().map(|n| n.distinct as u64).sum()
    }

    /// Whether every node has every message.
    pub fn complete(&self) -> bool {
        self.nodes.iter().all(|n| n.distinct == self.messages)
    }

    /// Whether any node got any of the messages yet.
    pub fn any(&self) -> bool {
        self.nodes.iter().any(|n| n.distinct > 0)
    }

    /// Earliest first arrival over all nodes (Unix ms).
    pub fn first_arrival_ms(&self) -> Option<u64> {
        self.nodes.iter().filter_map(|n| n.first_arrival_ms).min()
    }

    /// Latest first arrival over all nodes (Unix ms): when the last node got its last
    /// message.
    pub fn last_arrival_ms(&self) -> Option<u64> {
        self.nodes.iter().filter_map(|n| n.last_arrival_ms).max()
    }

    /// Per node: messages it still lacks.
    pub fn missing(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .map(|n| self.messages - n.distinct)
            .collect()
    }

    /// Polls until every node has every message, or fails after `timeout`, or after
    /// `stall` without any new delivery (a stuck run says so instead of waiting out the
    /// whole timeout).
    pub async fn wait_complete(&mut self, timeout: Duration, stall: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last_progress = Instant::now();
        let mut last_count = self.delivered();
        loop {
            self.poll()?;
            if self.complete() {
                return Ok(());
            }
            let count = self.delivered();
            if count != last_count {
                last_count = count;
                last_progress = Instant::now();
            }
            if Instant::now() > deadline || last_progress.elapsed() > stall {
                bail!(
                    "delivery did not complete: {} of {} deliveries after {:.0} s (no new \
                     delivery for {:.0} s); messages missing per node: {:?}",
                    count,
                    self.messages * self.nodes.len(),
                    (timeout - deadline.saturating_duration_since(Instant::now())).as_secs_f64(),
                    last_progress.elapsed().as_secs_f64(),
                    self.missing()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until any node has any message; fails after `timeout`.
    pub async fn wait_any(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.poll().context("waiting for the first delivery")?;
            if self.any() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no delivery within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
