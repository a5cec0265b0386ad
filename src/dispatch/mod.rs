//! Delivery: one [`worker`] task per known node, reading that node's queue in order and
//! sending with a window of in-flight calls, node-level exponential backoff, and dead
//! letters for entries the node refuses permanently. A slow or dead node only ever delays
//! its own worker.

pub mod client;
pub mod policy;
mod worker;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::store::Store;

/// Delivery settings shared by every worker.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Sent to nodes as `manager_id`.
    pub manager_id: String,
    /// Window of concurrent sends per node (1 = strict order).
    pub max_in_flight: usize,
    /// Most messages per `BroadcastBatch` call (1 = unary calls only).
    pub delivery_batch: usize,
    /// Offers of a permanently refused entry before it is dead-lettered.
    pub max_attempts: u32,
    /// First backoff delay.
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Per-call deadline.
    pub delivery_timeout: Duration,
    /// TLS toward nodes, the latest configuration (republished when certificates are
    /// reloaded: each worker then reconnects); `None`: plaintext.
    pub node_tls: Option<tokio::sync::watch::Receiver<tonic::transport::ClientTlsConfig>>,
}

/// Where and whether a worker delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTarget {
    /// `host:port`; empty = unknown (the worker waits).
    pub addr: String,
    /// False while the node is absent from membership: the worker pauses, its queue keeps
    /// growing.
    pub online: bool,
    /// An operator paused deliveries (admin `HoldNode`); persisted in the node's record.
    pub held: bool,
    /// Bumped on every (re-)registration: resets the node's backoff.
    pub generation: u64,
}

impl NodeTarget {
    /// Whether the worker may send.
    pub fn delivers(&self) -> bool {
        self.online && !self.held && !self.addr.is_empty()
    }
}

/// A node's delivery state, as `push_manager_node_state` and the admin API report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Registered and delivering.
    Online,
    /// Absent from membership; its queue waits.
    Offline,
    /// Failing: only a probe is sent until the backoff ends.
    Backoff,
    /// Paused by an operator.
    Held,
}

impl NodeState {
    /// Every state, for exporting one gauge per state.
    pub const ALL: [NodeState; 4] = [
        NodeState::Online,
        NodeState::Offline,
        NodeState::Backoff,
        NodeState::Held,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Offline => "offline",
            NodeState::Backoff => "backoff",
            NodeState::Held => "held",
        }
    }
}

/// What a worker publishes about its node, updated as things change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Current state.
    pub state: NodeState,
    /// Address delivered to.
    pub addr: String,
    /// When the current backoff ends (wall clock), while backing off.
    pub backoff_until: Option<std::time::SystemTime>,
    /// The node's last failure, as `Code: message`.
    pub last_error: Option<String>,
}

struct Handle {
    target: watch::Sender<NodeTarget>,
    status: watch::Receiver<NodeStatus>,
    /// The worker task; taken while [`Dispatcher::with_worker_paused`] replaces it.
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Owns the workers: starts one per node, retargets them, stops them all.
pub struct Dispatcher {
    store: Store,
    cfg: Arc<DeliveryConfig>,
    committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    nodes: Mutex<HashMap<String, Handle>>,
    metrics: Arc<Metrics>,
    /// Serializes [`Dispatcher::with_worker_paused`] calls.
    pausing: tokio::sync::Mutex<()>,
}

impl Dispatcher {
    /// A dispatcher whose workers wake on `committed` and stop on `shutdown`.
    pub fn new(
        store: Store,
        cfg: DeliveryConfig,
        committed: watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) -> Self {
        Dispatcher {
            store,
            cfg: Arc::new(cfg),
            committed,
            shutdown,
            tracker: TaskTracker::new(),
            nodes: Mutex::new(HashMap::new()),
            metrics: Arc::new(Metrics::new()),
            pausing: tokio::sync::Mutex::new(()),
        }
    }

    /// Reports deliveries, queue depths and node states to `metrics` (by default, to a
    /// registry of the dispatcher's own). Call before the first node is seen.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Reports a node registered at `addr`: starts its worker, or retargets it, marks it
    /// online and resets its backoff. Must be called only after the node is in the store.
    /// `held` is the persisted hold flag (used when the worker is first started).
    pub fn node_seen(&self, id: &str, addr: &str, held: bool) {
        self.update(id, held, |t| {
            t.addr = addr.to_string();
            t.online = true;
            t.generation += 1;
        });
    }

    /// Reports a node absent from membership: its worker pauses, its queue stays.
    pub fn node_offline(&self, id: &str) {
        self.update(id, false, |t| t.online = false);
    }

    /// Pauses or resumes deliveries to a node (the caller persists the flag).
    pub fn set_held(&self, id: &str, held: bool) {
        self.update(id, held, |t| t.held = held);
    }

    fn update(&self, id: &str, held: bool, change: impl FnOnce(&mut NodeTarget)) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = nodes.get(id) {
            h.target.send_modify(change);
            return;
        }
        let mut target = NodeTarget {
            addr: String::new(),
            online: false,
            held,
            generation: 0,
        };
        change(&mut target);
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            state: NodeState::Offline,
            addr: target.addr.clone(),
            backoff_until: None,
            last_error: None,
        });
        let (tx, rx) = watch::channel(target);
        let task = self.spawn_worker(id, rx, status_tx);
        nodes.insert(
            id.to_string(),
            Handle {
                target: tx,
                status: status_rx,
                task: Some(task),
            },
        );
    }

    fn spawn_worker(
        &self,
        id: &str,
        target: watch::Receiver<NodeTarget>,
        status: watch::Sender<NodeStatus>,
    ) -> tokio::task::JoinHandle<()> {
        let worker = worker::NodeWorker {
            node: id.to_string(),
            store: self.store.clone(),
            cfg: self.cfg.clone(),
            committed: self.committed.clone(),
            target,
            status,
            shutdown: self.shutdown.clone(),
            metrics: self.metrics.node(id),
        };
        self.tracker.spawn(worker.run())
    }

    /// Runs `f` while node `id`'s worker is stopped, then starts a fresh worker that loads
    /// the node's queue from the store again. For operator changes to a live queue, which
    /// its worker owns while it runs (admin `PurgeQueue`): the old worker finishes its
    /// in-flight sends and writes its progress back before `f` runs, so `f` sees the queue
    /// as it is and no stale in-memory state overwrites what `f` writes. Target changes made
    /// meanwhile (hold, address) reach the new worker. Returns `None`, without running `f`,
    /// when the node has no worker.
    pub async fn with_worker_paused<T, Fut>(&self, id: &str, f: impl FnOnce() -> Fut) -> Option<T>
    where
        Fut: std::future::Future<Output = T>,
    {
        let _one_at_a_time = self.pausing.lock().await;
        let (task, target, status) = {
            let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
            let h = nodes.get_mut(id)?;
            let task = h.task.take()?;
            let (tx, rx) = watch::channel(h.target.borrow().clone());
            let (status_tx, status_rx) = watch::channel(h.status.borrow().clone());
            h.status = status_rx;
            // Dropping the old sender is what stops the old worker.
            drop(std::mem::replace(&mut h.target, tx));
            (task, rx, status_tx)
        };
        if let Err(e) = task.await {
            tracing::error!(node = %id, error = %e, "delivery worker ended abnormally");
        }
        let out = f().await;
        let task = self.spawn_worker(id, target, status);
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = nodes.get_mut(id) {
            h.task = Some(task);
        }
        Some(out)
    }

    /// Stops node `id`'s worker for good and forgets it (the node is being retired, see
    /// `crate::discovery::retire`). The worker finishes its in-flight sends and writes its
    /// progress back before this returns, so nothing it holds in memory can touch the
    /// node's queue afterwards. A later [`Dispatcher::node_seen`] for the same id starts a
    /// fresh worker. Returns false when the node had no worker.
    pub async fn remove_node(&self, id: &str) -> bool {
        let _one_at_a_time = self.pausing.lock().await;
        let handle = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let Some(Handle { target, task, .. }) = handle else {
            return false;
        };
        // Dropping the sender is what stops the worker.
        drop(target);
        if let Some(task) = task {
            if let Err(e) = task.await {
                tracing::error!(node = %id, error = %e, "delivery worker ended abnormally");
            }
        }
        true
    }

    /// Every node's current status, by node id.
    pub fn statuses(&self) -> Vec<(String, NodeStatus)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = nodes
            .iter()
            .map(|(id, h)| (id.clone(), h.status.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Signals every worker to stop and waits (at most `timeout`) for their in-flight
    /// sends to finish and their progress to be written. Returns false on timeout.
    pub async fn stop(&self, timeout: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }
}

/// A dispatcher for unit tests elsewhere in the crate: fast backoff, one attempt, woken by
/// `committed`.
#[cfg(test)]
pub(crate) fn test_dispatcher(
    store: &Store,
    committed: watch::Receiver<u64>,
) -> std::sync::Arc<Dispatcher> {
    std::sync::Arc::new(Dispatcher::new(
        store.clone(),
        DeliveryConfig {
            manager_id: "m".into(),
            max_in_flight: 1,
            delivery_batch: 1,
            max_attempts: 1,
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
            delivery_timeout: Duration::from_secs(1),
            node_tls: None,
        },
        committed,
        CancellationToken::new(),
    ))
}
