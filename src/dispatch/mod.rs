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
    /// False while the node is offline: the worker pauses, its queue keeps growing.
    pub active: bool,
    /// Bumped on every (re-)registration: resets the node's backoff.
    pub generation: u64,
}

/// Owns the workers: starts one per node, retargets them, stops them all.
pub struct Dispatcher {
    store: Store,
    cfg: Arc<DeliveryConfig>,
    committed: watch::Receiver<u64>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    targets: Mutex<HashMap<String, watch::Sender<NodeTarget>>>,
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
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// Reports a node at `addr` (`active` = online): starts its worker, or retargets it
    /// and resets its backoff. Must be called only after the node is in the store.
    pub fn node_seen(&self, id: &str, addr: &str, active: bool) {
        let mut targets = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = targets.get(id) {
            tx.send_modify(|t| {
                t.addr = addr.to_string();
                t.active = active;
                t.generation += 1;
            });
            return;
        }
        let (tx, rx) = watch::channel(NodeTarget {
            addr: addr.to_string(),
            active,
            generation: 0,
        });
        targets.insert(id.to_string(), tx);
        let worker = worker::NodeWorker {
            node: id.to_string(),
            store: self.store.clone(),
            cfg: self.cfg.clone(),
            committed: self.committed.clone(),
            target: rx,
            shutdown: self.shutdown.clone(),
        };
        self.tracker.spawn(worker.run());
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
