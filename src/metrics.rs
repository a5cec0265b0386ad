//! Prometheus metrics: the series named in CONTRACT.md section 6, served as Prometheus text
//! (format 0.0.4) on `GET /metrics` at `--metrics-listen`.
//!
//! One [`Metrics`] per server, owning its own registry (no process-global state, so tests
//! can run several servers in one process). The hot paths touch only handles resolved once:
//! a delivery worker holds its node's [`NodeMetrics`] (an atomic add per outcome); the
//! committer updates per-node gauges once per commit round, not per message. Label
//! cardinality is bounded by the number of known nodes: `node` is the only unbounded
//! label, and every other label takes a fixed set of values.
//!
//! # Queue depth is counted, not sampled
//!
//! Invariant: `push_manager_queue_depth{node}` equals the number of live entries in that
//! node's queue (unfinished and not dead-lettered, including in-flight and backing-off
//! ones), plus the entries of a commit round being written at this moment. Three writers
//! keep it, each exact, so it never drifts:
//!
//! - at start, before the committer and the workers run, [`Metrics::count_queues`] sets each
//!   known node's gauge from the store (one scan of its range records, never repeated);
//! - the committer adds a round's length to each node of the round *before* applying the
//!   round's batch, and takes it back only if the batch was not applied, so an entry is
//!   counted before any worker can load it (the gauge never dips below the truth);
//! - a worker subtracts one when it marks an entry finished (delivered, expired or
//!   dead-lettered), which happens once per entry.
//!
//! Anything else that adds entries to or removes them from a live queue on a running
//! manager must call [`NodeMetrics::queue_added`] / [`NodeMetrics::queue_removed`] in the
//! same way; a node whose queue is archived calls [`Metrics::forget_node`].
//!
//! # Oldest age is computed at scrape time
//!
//! Each worker publishes the accepted time of its node's first unfinished entry (0 when the
//! queue is empty); the age is `now - accepted_at`, computed when `/metrics` is read, so it
//! grows between events instead of being a stale sample. See the worker's `track_oldest`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::dispatch::policy::Outcome;
use crate::dispatch::NodeState;
use crate::store::{now_ms, Store, StoreError};

/// Upper bounds of the ack latency histogram, in seconds: from a fast fsync to the 5 s that
/// a stuck disk would show.
const ACK_LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Ranges read per query when counting a queue at start.
const COUNT_BATCH: usize = 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeResultLabel {
    node: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeStateLabel {
    node: String,
    state: &'static str,
}

/// The labels `push_manager_deliveries_total{result}` takes.
const DELIVERY_RESULTS: [&str; 3] = ["ok", "retry", "permanent"];

/// The accepted time (ms since the epoch, 0 = empty queue) of each node's oldest entry;
/// exported as `push_manager_queue_oldest_age_seconds` when scraped.
#[derive(Debug, Default)]
struct OldestAges {
    nodes: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

impl OldestAges {
    fn slot(&self, node: &str) -> Arc<AtomicU64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.entry(node.to_string()).or_default().clone()
    }
}

impl Collector for OldestAges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = now_ms();
        let ages: Vec<(NodeLabel, f64)> = {
            let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            nodes
                .iter()
                .map(|(node, at)| {
                    let at = at.load(Ordering::Relaxed);
                    let age_ms = if at == 0 { 0 } else { now.saturating_sub(at) };
                    (NodeLabel { node: node.clone() }, age_ms as f64 / 1000.0)
                })
                .collect()
        };
        let mut metric = encoder.encode_descriptor(
            "push_manager_queue_oldest_age_seconds",
            "Age of the oldest undelivered entry in the node's queue (0 when empty)",
            None,
            MetricType::Gauge,
        )?;
        for (labels, age) in &ages {
            ConstGauge::new(*age).encode(metric.encode_family(labels)?)?;
        }
        Ok(())
    }
}

/// Every series of one server; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    queue_depth: Family<NodeLabel, Gauge>,
    oldest: Arc<OldestAges>,
    broadcasts: Family<ResultLabel, Counter>,
    deliveries: Family<NodeResultLabel, Counter>,
    dead_letters: Family<NodeLabel, Counter>,
    expired: Family<NodeLabel, Counter>,
    quarantined: Family<NodeLabel, Counter>,
    ack_latency: Histogram,
    node_state: Family<NodeStateLabel, Gauge>,
    commit_rounds: Counter,
    commit_batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series of the contract; `broadcasts_total` starts with all
    /// three results at 0, per-node series appear when a node is first seen.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let queue_depth = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "push_manager_queue_depth",
            "Entries in the node's live queue (in flight and backing off included, dead \
             letters excluded)",
            queue_depth.clone(),
        );
        let oldest = Arc::new(OldestAges::default());
        registry.register_collector(Box::new(oldest.clone()));
        let broadcasts = Family::<ResultLabel, Counter>::default();
        registry.register(
            // The client appends `_total` to counters.
            "push_manager_broadcasts",
            "Broadcast calls by result: accepted (new and durable), duplicate, rejected (any \
             error answer)",
            broadcasts.clone(),
        );
        for result in ["accepted", "duplicate", "rejected"] {
            drop(broadcasts.get_or_create(&ResultLabel { result }));
        }
        let deliveries = Family::<NodeResultLabel, Counter>::default();
        registry.register(
            "push_manager_deliveries",
            "Delivery answers by node and result: ok, retry (transient or node-level \
             failure), permanent (the node refused the message)",
            deliveries.clone(),
        );
        let dead_letters = Family::<NodeLabel, Counter>::default();
        registry.register(
            "push_manager_dead_letters",
            "Entries moved to the node's dead letters",
            dead_letters.clone(),
        );
        let expired = Family::<NodeLabel, Counter>::default();
        registry.register(
            "push_manager_expired",
            "Entries dropped for the node because their TTL ran out before delivery",
            expired.clone(),
        );
        let quarantined = Family::<NodeLabel, Counter>::default();
        registry.register(
            "push_manager_quarantined",
            "Entries whose message record could not be decoded: the record was moved to the \
             quarantine keyspace and the entry left the node's queue",
            quarantined.clone(),
        );
        let ack_latency = Histogram::new(ACK_LATENCY_BUCKETS);
        registry.register(
            "push_manager_ack_latency_seconds",
            "Time from a Broadcast call's arrival to its OK reply (durable by then)",
            ack_latency.clone(),
        );
        let node_state = Family::<NodeStateLabel, Gauge>::default();
        registry.register(
            "push_manager_node_state",
            "1 for the node's current delivery state (online, offline, backoff, held), 0 for \
             the others",
            node_state.clone(),
        );
        let commit_rounds = Counter::default();
        registry.register(
            "push_manager_commit_rounds",
            "Commit rounds that made new messages durable (one fsync each in fsync mode)",
            commit_rounds.clone(),
        );
        let commit_batch_size =
            Histogram::new(exponential_buckets(1.0, 2.0, 13).collect::<Vec<_>>());
        registry.register(
            "push_manager_commit_batch_size",
            "New messages made durable per commit round",
            commit_batch_size.clone(),
        );
        Metrics {
            registry,
            queue_depth,
            oldest,
            broadcasts,
            deliveries,
            dead_letters,
            expired,
            quarantined,
            ack_latency,
            node_state,
            commit_rounds,
            commit_batch_size,
        }
    }

    /// The series of `node`, created (at 0) if this is the first time it is seen. Resolve it
    /// once and keep it: every update through it is an atomic operation.
    pub fn node(&self, node: &str) -> NodeMetrics {
        let label = NodeLabel {
            node: node.to_string(),
        };
        let delivery = |result| {
            self.deliveries.get_or_create_owned(&NodeResultLabel {
                node: node.to_string(),
                result,
            })
        };
        NodeMetrics {
            depth: self.queue_depth.get_or_create_owned(&label),
            oldest_accepted_ms: self.oldest.slot(node),
            ok: delivery(Outcome::Delivered.label()),
            retry: delivery(Outcome::Retry.label()),
            permanent: delivery(Outcome::Permanent.label()),
            dead_letters: self.dead_letters.get_or_create_owned(&label),
            expired: self.expired.get_or_create_owned(&label),
            quarantined: self.quarantined.get_or_create_owned(&label),
            states: NodeState::ALL.map(|s| {
                self.node_state.get_or_create_owned(&NodeStateLabel {
                    node: node.to_string(),
                    state: s.label(),
                })
            }),
        }
    }

    /// Drops every series of `node` (its queue was archived and it is no longer known).
    pub fn forget_node(&self, node: &str) {
        let label = NodeLabel {
            node: node.to_string(),
        };
        self.queue_depth.remove(&label);
        self.dead_letters.remove(&label);
        self.expired.remove(&label);
        self.quarantined.remove(&label);
        for result in DELIVERY_RESULTS {
            self.deliveries.remove(&NodeResultLabel {
                node: node.to_string(),
                result,
            });
        }
        for s in NodeState::ALL {
            self.node_state.remove(&NodeStateLabel {
                node: node.to_string(),
                state: s.label(),
            });
        }
        self.oldest
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// Sets every known node's queue depth from the store. Call once at start, before the
    /// committer and the workers run (see the module docs); blocking.
    pub fn count_queues(&self, store: &Store) -> Result<(), StoreError> {
        for node in store.nodes()?.keys() {
            let mut pending: i64 = 0;
            let mut after = None;
            loop {
                let ranges = store.ranges(node, after, COUNT_BATCH)?;
                for (start, rec) in &ranges {
                    pending += rec.pending().count() as i64;
                    after = Some(*start);
                }
                if ranges.len() < COUNT_BATCH {
                    break;
                }
            }
            self.node(node).depth.set(pending);
        }
        Ok(())
    }

    /// A commit round with `len` new messages is about to be applied for `nodes`.
    pub fn round_queued(&self, nodes: &[String], len: u32) {
        for node in nodes {
            // One lookup per node per round, on the committer thread: no full NodeMetrics.
            self.queue_depth
                .get_or_create(&NodeLabel { node: node.clone() })
                .inc_by(i64::from(len));
        }
    }

    /// The largest queue depth (pending entries) over `nodes`: what the per-node pending
    /// limit (`--max-pending-per-node`) is checked against, without reading the store.
    pub fn max_queue_depth(&self, nodes: &[String]) -> u64 {
        nodes
            .iter()
            .map(|node| {
                self.queue_depth
                    .get_or_create(&NodeLabel { node: node.clone() })
                    .get()
            })
            .max()
            .map_or(0, |d| u64::try_from(d).unwrap_or(0))
    }

    /// The batch announced by [`Metrics::round_queued`] was not applied after all.
    pub fn round_not_queued(&self, nodes: &[String], len: u32) {
        for node in nodes {
            self.queue_depth
                .get_or_create(&NodeLabel { node: node.clone() })
                .dec_by(i64::from(len));
        }
    }

    /// A commit round succeeded: `accepted` new messages are durable and `duplicates`
    /// callers are answered `duplicate`.
    pub fn round_committed(&self, accepted: u64, duplicates: u64) {
        self.broadcast_results("accepted", accepted);
        self.broadcast_results("duplicate", duplicates);
        if accepted > 0 {
            self.commit_rounds.inc();
            self.commit_batch_size.observe(accepted as f64);
        }
    }

    /// A Broadcast call was answered with an error.
    pub fn broadcast_rejected(&self) {
        self.broadcast_results("rejected", 1);
    }

    fn broadcast_results(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.broadcasts
                .get_or_create(&ResultLabel { result })
                .inc_by(n);
        }
    }

    /// A Broadcast call was answered OK `seconds` after it arrived.
    pub fn observe_ack_latency(&self, seconds: f64) {
        self.ack_latency.observe(seconds);
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// One node's series, resolved once; cheap to clone.
#[derive(Debug, Clone)]
pub struct NodeMetrics {
    depth: Gauge,
    oldest_accepted_ms: Arc<AtomicU64>,
    ok: Counter,
    retry: Counter,
    permanent: Counter,
    dead_letters: Counter,
    expired: Counter,
    quarantined: Counter,
    /// In the order of [`NodeState::ALL`].
    states: [Gauge; 4],
}

impl NodeMetrics {
    /// `n` entries joined the node's live queue.
    pub fn queue_added(&self, n: u32) {
        self.depth.inc_by(i64::from(n));
    }

    /// `n` entries left the node's live queue.
    pub fn queue_removed(&self, n: u32) {
        self.depth.dec_by(i64::from(n));
    }

    /// The node answered a delivery.
    pub fn delivery(&self, outcome: Outcome) {
        match outcome {
            Outcome::Delivered => &self.ok,
            Outcome::Retry | Outcome::NodeProblem => &self.retry,
            Outcome::Permanent => &self.permanent,
        }
        .inc();
    }

    /// An entry was moved to the dead letters (it leaves the live queue).
    pub fn dead_lettered(&self) {
        self.dead_letters.inc();
        self.queue_removed(1);
    }

    /// An entry's message record could not be decoded and was quarantined; the entry leaves
    /// the live queue (the worker marks it finished, which counts the removal).
    pub fn quarantined(&self) {
        self.quarantined.inc();
    }

    /// An entry's TTL ran out before delivery; it is finished as well, and leaves the queue
    /// through the same path as a delivered one.
    pub fn expired(&self) {
        self.expired.inc();
    }

    /// The accepted time (ms since the epoch) of the node's oldest live entry; `None` when
    /// the queue is empty.
    pub fn set_oldest(&self, accepted_at_ms: Option<u64>) {
        // 0 stands for "empty"; a real accepted time is never 0.
        let value = accepted_at_ms.map_or(0, |t| t.max(1));
        self.oldest_accepted_ms.store(value, Ordering::Relaxed);
    }

    /// The node's current delivery state: 1 for it, 0 for the others.
    pub fn set_state(&self, state: NodeState) {
        for (s, gauge) in NodeState::ALL.iter().zip(&self.states) {
            gauge.set(i64::from(*s == state));
        }
    }
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled. Other paths answer 404.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;

    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                match metrics.encode() {
                    Ok(text) => (
                        [(
                            header::CONTENT_TYPE,
                            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => {
                        tracing::error!(error = %e, "encoding metrics failed");
                        StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_series_is_exported_with_its_labels() {
        let m = Metrics::new();
        let a = m.node("a");
        a.queue_added(3);
        a.queue_removed(1);
        a.delivery(Outcome::Delivered);
        a.delivery(Outcome::NodeProblem);
        a.delivery(Outcome::Permanent);
        a.dead_lettered();
        a.expired();
        a.set_state(NodeState::Backoff);
        a.set_oldest(Some(now_ms() - 2_000));
        m.round_committed(4, 1);
        m.broadcast_rejected();
        m.observe_ack_latency(0.002);
        let text = m.encode().expect("encodes");
        for line in [
            "push_manager_queue_depth{node=\"a\"} 1",
            "push_manager_broadcasts_total{result=\"accepted\"} 4",
            "push_manager_broadcasts_total{result=\"duplicate\"} 1",
            "push_manager_broadcasts_total{result=\"rejected\"} 1",
            "push_manager_deliveries_total{node=\"a\",result=\"ok\"} 1",
            "push_manager_deliveries_total{node=\"a\",result=\"retry\"} 1",
            "push_manager_deliveries_total{node=\"a\",result=\"permanent\"} 1",
            "push_manager_dead_letters_total{node=\"a\"} 1",
            "push_manager_expired_total{node=\"a\"} 1",
            "push_manager_node_state{node=\"a\",state=\"backoff\"} 1",
            "push_manager_node_state{node=\"a\",state=\"online\"} 0",
            "push_manager_node_state{node=\"a\",state=\"offline\"} 0",
            "push_manager_node_state{node=\"a\",state=\"held\"} 0",
            "push_manager_commit_rounds_total 1",
            "push_manager_commit_batch_size_count 1",
            "push_manager_ack_latency_seconds_count 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        let age = text
            .lines()
            .find_map(|l| l.strip_prefix("push_manager_queue_oldest_age_seconds{node=\"a\"} "))
            .and_then(|v| v.parse::<f64>().ok())
            .expect("oldest age of a");
        assert!((2.0..60.0).contains(&age), "{age}");

        a.set_oldest(None);
        m.forget_node("a");
        let text = m.encode().expect("encodes");
        assert!(!text.contains("node=\"a\""), "{text}");
    }
}
