//! Applies what the membership sources say to the store and the dispatcher.
//!
//! [`Membership`] holds the merged view: the static nodes, what etcd says now (address and
//! key revision per node), and which nodes are absent since when. It is driven by one task
//! (the etcd follower, [`super::etcd`]), so every change of the fan-out set happens in
//! order: registrations ([`crate::store::Store::upsert_node`]), the start of a retirement
//! ([`crate::store::Store::stop_fan_out`]) and its end ([`crate::store::Store::remove_node`]).
//!
//! Transitions, per node:
//!
//! ```text
//! registered (put) ──▶ store record, absence mark cleared ──▶ worker online (backoff reset)
//! absent (delete)  ──▶ absence mark written ─────────────────▶ worker paused, queue kept
//! absent for offline_retention ──▶ retiring: out of the fan-out set, worker removed,
//!                                  queue archived (super::retire), node removed
//! registered while retiring ──▶ waits; applied as a new node once the retirement ends
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::config::StaticNode;
use crate::dispatch::Dispatcher;
use crate::store::{now_ms, Store};

use super::DiscoveryError;

/// A registration as etcd holds it: address and the mod revision of the key.
pub type Reg = (String, i64);

/// The merged membership; see the module docs.
pub struct Membership {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    /// Static nodes: id → configured address.
    static_nodes: BTreeMap<String, String>,
    /// What etcd says now, as applied.
    registered: HashMap<String, Reg>,
    /// Non-static nodes absent from etcd → since when (ms since the Unix epoch), as
    /// persisted.
    absent: BTreeMap<String, u64>,
    /// Nodes being retired.
    retiring: HashSet<String>,
    /// Registrations that arrived for a node while it was being retired.
    deferred: HashMap<String, Reg>,
    /// Failed retirements are not tried again before this (ms since the Unix epoch).
    retry_after: HashMap<String, u64>,
}

/// How long a failed retirement waits before it is tried again.
const RETIRE_RETRY: Duration = Duration::from_secs(60);

impl Membership {
    /// Loads the membership persisted in the store and starts a worker for every known
    /// node: at its last address, online, unless its absence from etcd was recorded, in
    /// which case it is paused. Static nodes must already be in the store.
    pub fn load(
        store: Store,
        dispatcher: Arc<Dispatcher>,
        static_nodes: &[StaticNode],
    ) -> Result<Membership, DiscoveryError> {
        let nodes = store
            .nodes()
            .map_err(|e| DiscoveryError::store("loading known nodes", e))?;
        let mut absent = store
            .node_absences()
            .map_err(|e| DiscoveryError::store("loading node absences", e))?;
        let static_nodes: BTreeMap<String, String> = static_nodes
            .iter()
            .map(|n| (n.id.clone(), n.addr.clone()))
            .collect();
        // Marks of nodes that are gone, or static now, mean nothing.
        let stale: Vec<String> = absent
            .keys()
            .filter(|id| !nodes.contains_key(*id) || static_nodes.contains_key(*id))
            .cloned()
            .collect();
        for id in stale {
            absent.remove(&id);
            if let Err(e) = store.set_node_absent(&id, None) {
                tracing::warn!(node = %id, error = %e, "cannot clear a stale absence mark");
            }
        }
        for (id, rec) in &nodes {
            let addr = static_nodes.get(id).unwrap_or(&rec.addr);
            dispatcher.node_seen(id, addr, rec.held);
            if absent.contains_key(id) {
                // Before the worker's first poll: it starts paused.
                dispatcher.node_offline(id);
            }
        }
        tracing::info!(
            nodes = nodes.len(),
            absent = absent.len(),
            "membership loaded from the store"
        );
        Ok(Membership {
            store,
            dispatcher,
            static_nodes,
            registered: HashMap::new(),
            absent,
            retiring: HashSet::new(),
            deferred: HashMap::new(),
            retry_after: HashMap::new(),
        })
    }

    /// Applies a complete read of the prefix: every node in `nodes` is registered; every
    /// other non-static known node is absent. `also_present` lists ids whose key exists
    /// but whose value could not be used: they keep their current state.
    pub fn apply_snapshot(
        &mut self,
        nodes: &BTreeMap<String, Reg>,
        also_present: &HashSet<String>,
    ) {
        for (id, reg) in nodes {
            self.registered_at(id, reg.clone());
        }
        let gone: Vec<String> = self
            .store
            .known_nodes()
            .iter()
            .chain(self.registered.keys())
            .filter(|id| !nodes.contains_key(*id) && !also_present.contains(*id))
            .cloned()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for id in gone {
            self.deregistered(&id);
        }
        self.deferred
            .retain(|id, _| nodes.contains_key(id) || also_present.contains(id));
    }

    /// A put of `id`'s key: the node is (again) at `reg`'s address.
    pub fn registered_at(&mut self, id: &str, reg: Reg) {
        if self.retiring.contains(id) {
            self.deferred.insert(id.to_string(), reg);
            return;
        }
        if self.registered.get(id) == Some(&reg) {
            return;
        }
        let addr = reg.0.clone();
        let is_static = self.static_nodes.contains_key(id);
        if let Err(e) = self.store.upsert_node(id, &addr, is_static) {
            // Not applied: the next resync tries again.
            tracing::error!(node = %id, %addr, error = %e, "cannot record a registration");
            return;
        }
        if self.absent.remove(id).is_some() {
            if let Err(e) = self.store.set_node_absent(id, None) {
                tracing::warn!(node = %id, error = %e, "cannot clear the absence mark");
            }
            tracing::info!(node = %id, %addr, "node registered again: delivering its queue");
        } else if !self.registered.contains_key(id) {
            tracing::info!(node = %id, %addr, "node registered");
        } else {
            tracing::info!(node = %id, %addr, "node re-registered");
        }
        self.retry_after.remove(id);
        self.dispatcher.node_seen(id, &addr, false);
        self.registered.insert(id.to_string(), reg);
    }

    /// A delete of `id`'s key (or a naming `Delete` update): the node is absent.
    pub fn deregistered(&mut self, id: &str) {
        self.deferred.remove(id);
        let was = self.registered.remove(id);
        if let Some(static_addr) = self.static_nodes.get(id).cloned() {
            if was.is_some_and(|(addr, _)| addr != static_addr) {
                if let Err(e) = self.store.upsert_node(id, &static_addr, true) {
                    tracing::error!(node = %id, error = %e, "cannot record a static address");
                    return;
                }
                tracing::info!(node = %id, addr = %static_addr,
                               "static node left etcd: back to its static address");
                self.dispatcher.node_seen(id, &static_addr, false);
            }
            return;
        }
        if self.absent.contains_key(id)
            || self.retiring.contains(id)
            || !self.store.known_nodes().iter().any(|k| k == id)
        {
            return;
        }
        let since = now_ms();
        if let Err(e) = self.store.set_node_absent(id, Some(since)) {
            // The worker is paused anyway: only the retention clock is at stake.
            tracing::error!(node = %id, error = %e, "cannot record the node's absence");
        }
        self.absent.insert(id.to_string(), since);
        self.dispatcher.node_offline(id);
        tracing::info!(node = %id, "node left etcd: deliveries paused, queue kept");
    }

    /// Absent nodes whose absence reached `retention` at `now_ms`, with the absence start,
    /// that are not being retired already (nor waiting after a failed attempt).
    pub fn due_for_retirement(&self, now_ms: u64, retention: Duration) -> Vec<(String, u64)> {
        let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
        self.absent
            .iter()
            .filter(|(id, since)| {
                now_ms.saturating_sub(**since) >= retention_ms
                    && !self.retiring.contains(*id)
                    && !self.static_nodes.contains_key(*id)
                    && !self.registered.contains_key(*id)
                    && self.retry_after.get(*id).is_none_or(|t| now_ms >= *t)
            })
            .map(|(id, since)| (id.clone(), *since))
            .collect()
    }

    /// Starts retiring `id`: it leaves the fan-out set, so its queue stops growing.
    pub fn begin_retirement(&mut self, id: &str) {
        self.retiring.insert(id.to_string());
        self.store.stop_fan_out(id);
    }

    /// Whether `id` is being retired.
    pub fn is_retiring(&self, id: &str) -> bool {
        self.retiring.contains(id)
    }

    /// Ends a retirement. `removed`: the node is gone from the store. Otherwise it stays
    /// out of the fan-out set, absent, and is tried again after a pause. A registration that
    /// arrived meanwhile is applied now.
    pub fn end_retirement(&mut self, id: &str, removed: bool) {
        self.retiring.remove(id);
        if removed {
            self.absent.remove(id);
            self.retry_after.remove(id);
        } else {
            let pause = u64::try_from(RETIRE_RETRY.as_millis()).unwrap_or(u64::MAX);
            self.retry_after
                .insert(id.to_string(), now_ms().saturating_add(pause));
        }
        if let Some(reg) = self.deferred.remove(id) {
            self.registered_at(id, reg);
        }
    }

    /// Nodes currently absent, with the absence start.
    pub fn absent(&self) -> &BTreeMap<String, u64> {
        &self.absent
    }

    /// What etcd says now, as applied.
    pub fn registered(&self) -> &HashMap<String, Reg> {
        &self.registered
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::sync::watch;

    fn setup(dir: &std::path::Path) -> (Store, Arc<Dispatcher>, watch::Sender<u64>) {
        // A reopen in the same process.
        let store = Store::reopen(dir, Duration::from_secs(10)).unwrap();
        let (tx, rx) = watch::channel(0);
        let d = crate::dispatch::test_dispatcher(&store, rx);
        (store, d, tx)
    }

    fn snap(nodes: &[(&str, &str, i64)]) -> BTreeMap<String, Reg> {
        nodes
            .iter()
            .map(|(id, a, r)| (id.to_string(), (a.to_string(), *r)))
            .collect()
    }

    #[tokio::test]
    async fn lifecycle_persists_absence_and_merges_static_nodes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, d, _tx) = setup(dir.path());
        let statics = [StaticNode {
            id: "s".into(),
            addr: "127.0.0.1:9".into(),
        }];
        store.upsert_node("s", "127.0.0.1:9", true).unwrap();
        let mut m = Membership::load(store.clone(), d.clone(), &statics).unwrap();

        m.apply_snapshot(
            &snap(&[("a", "127.0.0.1:1", 5), ("s", "127.0.0.1:2", 6)]),
            &HashSet::new(),
        );
        assert_eq!(&*store.known_nodes(), ["a", "s"]);
        assert_eq!(store.nodes().unwrap()["s"].addr, "127.0.0.1:2", "etcd wins");

        // Both leave etcd: the static one falls back to its address, the other is absent.
        m.apply_snapshot(&BTreeMap::new(), &HashSet::new());
        assert_eq!(store.nodes().unwrap()["s"].addr, "127.0.0.1:9");
        assert!(m.absent().contains_key("a") && !m.absent().contains_key("s"));
        assert!(store.node_absences().unwrap().contains_key("a"));
        assert_eq!(
            &*store.known_nodes(),
            ["a", "s"],
            "an absent node stays known"
        );

        // Not due before the retention, due after; static nodes never.
        assert!(m
            .due_for_retirement(now_ms(), Duration::from_secs(60))
            .is_empty());
        let due = m.due_for_retirement(now_ms() + 61_000, Duration::from_secs(60));
        assert_eq!(
            due.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
            ["a"]
        );

        // A registration during the retirement waits for its end.
        m.begin_retirement("a");
        assert_eq!(&*store.known_nodes(), ["s"]);
        m.registered_at("a", ("127.0.0.1:3".into(), 9));
        assert!(m.registered().get("a").is_none());
        m.end_retirement("a", false);
        assert_eq!(
            m.registered().get("a").map(|r| r.0.as_str()),
            Some("127.0.0.1:3")
        );
        assert!(store.node_absences().unwrap().is_empty());
        assert_eq!(&*store.known_nodes(), ["a", "s"]);
    }

    #[tokio::test]
    async fn a_restart_resumes_absent_nodes_paused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, d, _tx) = setup(dir.path());
            let mut m = Membership::load(store.clone(), d.clone(), &[]).unwrap();
            m.apply_snapshot(
                &snap(&[("a", "127.0.0.1:1", 1), ("b", "127.0.0.1:2", 1)]),
                &HashSet::new(),
            );
            m.deregistered("b");
            store.sync().unwrap();
            d.stop(Duration::from_secs(5)).await;
        }
        let (store, d, _tx) = setup(dir.path());
        let m = Membership::load(store, d.clone(), &[]).unwrap();
        assert_eq!(m.absent().keys().collect::<Vec<_>>(), ["b"]);
        let statuses = d.statuses();
        let a = statuses.iter().find(|(n, _)| n == "a").unwrap();
        assert_eq!(a.1.addr, "127.0.0.1:1", "resumed at its last address");
    }
}
