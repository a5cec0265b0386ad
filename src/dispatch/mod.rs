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

use crate::store::Store;

/// Delivery settings shared by every worker.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Sent to nodes as `manager_id`.
    pub manager_id: String,
    /// Window of concurrent sends per node (1 = strict order).
    pub max_in_flight: usize,
    /// Offers of a permanently refused entry before it is dead-lettered.
    pub max_attempts: u32,
    /// First backoff delay.
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Per-call deadline.
    pub delivery_timeout: Duration,
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
}

/// Owns the workers: starts one per node, retargets them, stops them all.
pub struct Dispatcher {
    store: Store,
    cfg: Arc<DeliveryConfig>,
    committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    nodes: Mutex<HashMap<String, Handle>>,
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
        }
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
        nodes.insert(
            id.to_string(),
            Handle {
                target: tx,
                status: status_rx,
            },
        );
        let worker = worker::NodeWorker {
            node: id.to_string(),
            store: self.store.clone(),
            cfg: self.cfg.clone(),
            committed: self.committed.clone(),
            target: rx,
            status: status_tx,
            shutdown: self.shutdown.clone(),
        };
        self.tracker.spawn(worker.run());
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
