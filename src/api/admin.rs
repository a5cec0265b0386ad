//! The operator API (`proto/admin.proto`, package `broadcast.admin`), served next to
//! `PushServer` on the listen address unless `--no-admin`.
//!
//! Everything goes through the same typed store API as `queue-dump`
//! ([`crate::store::inspect`]) and is shaped by the same conversions ([`crate::report`]), so
//! the two tools report the same numbers for the same state. What a running manager adds:
//!
//! - node states, backoff and last errors come from the delivery workers
//!   ([`Dispatcher::statuses`]);
//! - a replay runs on the committer thread, which owns the sequence counter
//!   ([`CommitHandle::replay`]), and wakes the workers like a commit round;
//! - a live-queue purge runs with that node's worker paused
//!   ([`Dispatcher::with_worker_paused`]), since the worker owns the queue's range records
//!   while it runs; dead letters are only ever added by workers, so purging them needs no
//!   pause;
//! - queue-depth metrics are kept exact (the invariant in [`crate::metrics`]).
//!
//! Store calls block on disk, so they run on the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;

use crate::dispatch::{Dispatcher, NodeState};
use crate::metrics::Metrics;
use crate::proto::admin::admin_server::Admin;
use crate::proto::admin::*;
use crate::proto::push_server_server::PushServerServer;
use crate::report;
use crate::store::{now_ms, CommitError, CommitHandle, Filter, QueueKind, Store, StoreError};

use super::broadcast::BroadcastService;

/// Default and largest `PeekQueue` limit.
const PEEK_DEFAULT: usize = 100;
/// How often `Drain` looks at the queues while it waits.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long `HoldNode` / `ReleaseNode` wait for the worker to report its new state.
const STATE_WAIT: Duration = Duration::from_secs(1);

/// The manager's `Admin` service.
pub struct AdminService {
    store: Store,
    commit: CommitHandle,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    draining: CancellationToken,
    health: HealthReporter,
}

impl AdminService {
    /// A service over the manager's store, committer and workers. `Drain` cancels
    /// `draining` (the token `PushServer` checks) and reports NOT_SERVING through `health`.
    pub fn new(
        store: Store,
        commit: CommitHandle,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        draining: CancellationToken,
        health: HealthReporter,
    ) -> Self {
        AdminService {
            store,
            commit,
            dispatcher,
            metrics,
            draining,
            health,
        }
    }

    /// Runs a store call on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store))
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?
            .map_err(store_status)
    }

    /// Every node with counts and worker status.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, Status> {
        let now = now_ms();
        let summaries = self.blocking(move |s| s.summaries(false, now)).await?;
        let statuses: std::collections::HashMap<_, _> =
            self.dispatcher.statuses().into_iter().collect();
        Ok(summaries
            .iter()
            .map(|(id, rec, s)| report::node_info(id, rec, s, statuses.get(id), now))
            .collect())
    }

    async fn node(&self, id: &str) -> Result<NodeInfo, Status> {
        self.nodes()
            .await?
            .into_iter()
            .find(|n| n.node_id == id)
            .ok_or_else(|| unknown_node(id))
    }

    /// Checks that `id` names a node this store knows.
    async fn known(&self, id: &str) -> Result<(), Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "node_id is empty; ListNodes shows the known nodes",
            ));
        }
        let key = id.to_string();
        let known = self
            .blocking(move |s| {
                let dead = Filter::default();
                Ok(s.nodes()?.contains_key(&key)
                    || !s
                        .entries(&key, QueueKind::DeadLetter, &dead, 1, 0)?
                        .is_empty())
            })
            .await?;
        if known {
            Ok(())
        } else {
            Err(unknown_node(id))
        }
    }

    /// Sets the hold flag durably and on the worker, then reports the node once its worker
    /// shows the new state (or after [`STATE_WAIT`]).
    async fn set_held(&self, id: String, held: bool) -> Result<NodeInfo, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "node_id is empty; ListNodes shows the known nodes",
            ));
        }
        let key = id.clone();
        if !self.blocking(move |s| s.set_held(&key, held)).await? {
            return Err(unknown_node(&id));
        }
        self.dispatcher.set_held(&id, held);
        tracing::info!(node = %id, held, "operator changed the node's hold");
        let deadline = tokio::time::Instant::now() + STATE_WAIT;
        loop {
            let settled = self
                .dispatcher
                .statuses()
                .into_iter()
                .find(|(n, _)| *n == id)
                .is_none_or(|(_, st)| (st.state == NodeState::Held) == held);
            if settled || tokio::time::Instant::now() >= deadline {
                return self.node(&id).await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn unknown_node(id: &str) -> Status {
    Status::not_found(format!(
        "node {id:?} is not known to this manager; ListNodes shows the known nodes"
    ))
}

/// Store errors as statuses: retryable I/O trouble is UNAVAILABLE, the rest INTERNAL, with
/// the store's own message (which names the record or file).
fn store_status(e: StoreError) -> Status {
    if e.is_retryable() {
        Status::unavailable(format!("store: {e}; try again"))
    } else {
        Status::internal(format!("store: {e}"))
    }
}

fn commit_status(e: CommitError) -> Status {
    match e {
        CommitError::ShuttingDown => Status::unavailable("the manager is shutting down"),
        CommitError::NoNodes => Status::unavailable("no connect-nodes known"),
        CommitError::Store(m) => Status::internal(format!("store: {m}")),
        CommitError::Exhausted(m) => Status::resource_exhausted(m),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesReply>, Status> {
        Ok(Response::new(ListNodesReply {
            nodes: self.nodes().await?,
            draining: self.draining.is_cancelled(),
        }))
    }

    async fn peek_queue(
        &self,
        request: Request<PeekQueueRequest>,
    ) -> Result<Response<PeekQueueReply>, Status> {
        let req = request.into_inner();
        self.known(&req.node_id).await?;
        let kind = if req.dead_letter {
            QueueKind::DeadLetter
        } else {
            QueueKind::Live
        };
        let limit = match req.limit as usize {
            0 => PEEK_DEFAULT,
            n => n.min(report::MAX_LISTED),
        };
        let filter = report::filter_from_proto(req.filter);
        let node = req.node_id;
        let entries = self
            .blocking(move |s| s.entries(&node, kind, &filter, limit, now_ms()))
            .await?;
        Ok(Response::new(PeekQueueReply {
            entries: entries.iter().map(report::entry).collect(),
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<ReplayDeadLettersRequest>,
    ) -> Result<Response<ReplayDeadLettersReply>, Status> {
        let req = request.into_inner();
        self.known(&req.node_id).await?;
        let filter = report::filter_from_proto(req.filter);
        if !req.all && filter.msg_id.is_none() {
            return Err(Status::invalid_argument(
                "say which dead letters to replay: set all = true (with any filter), or \
                 filter.msg_id",
            ));
        }
        let out = self
            .commit
            .replay(&req.node_id, filter, req.dry_run)
            .await
            .map_err(commit_status)?;
        if !req.dry_run {
            tracing::info!(
                node = %req.node_id,
                replayed = out.replayed.len(),
                skipped = out.skipped.len(),
                "operator replayed dead letters"
            );
        }
        Ok(Response::new(report::replay_reply(&out, req.dry_run)))
    }

    async fn purge_queue(
        &self,
        request: Request<PurgeQueueRequest>,
    ) -> Result<Response<PurgeQueueReply>, Status> {
        let req = request.into_inner();
        if !req.confirm && !req.dry_run {
            return Err(Status::failed_precondition(
                "PurgeQueue drops entries for good: set confirm = true (or dry_run = true to \
                 see what would go)",
            ));
        }
        self.known(&req.node_id).await?;
        let kind = if req.dead_letter {
            QueueKind::DeadLetter
        } else {
            QueueKind::Live
        };
        let filter = report::filter_from_proto(req.filter);
        let (node, dry_run) = (req.node_id.clone(), req.dry_run);
        let purge = move |s: Store| s.purge(&node, kind, &filter, dry_run, now_ms());
        let purged = if kind == QueueKind::Live && !dry_run {
            let paused = self
                .dispatcher
                .with_worker_paused(&req.node_id, || self.blocking(purge.clone()))
                .await;
            let purged = match paused {
                Some(r) => r?,
                None => self.blocking(purge).await?,
            };
            self.metrics
                .node(&req.node_id)
                .queue_removed(purged.len() as u32);
            purged
        } else {
            self.blocking(purge).await?
        };
        if !dry_run {
            tracing::info!(
                node = %req.node_id,
                queue = kind.label(),
                purged = purged.len(),
                "operator purged entries"
            );
        }
        Ok(Response::new(report::purge_reply(&purged, dry_run)))
    }

    async fn hold_node(&self, request: Request<NodeRequest>) -> Result<Response<NodeInfo>, Status> {
        self.set_held(request.into_inner().node_id, true)
            .await
            .map(Response::new)
    }

    async fn release_node(
        &self,
        request: Request<NodeRequest>,
    ) -> Result<Response<NodeInfo>, Status> {
        self.set_held(request.into_inner().node_id, false)
            .await
            .map(Response::new)
    }

    async fn drain(&self, request: Request<DrainRequest>) -> Result<Response<DrainReply>, Status> {
        let wait = Duration::from_millis(request.into_inner().wait_ms);
        if !self.draining.is_cancelled() {
            tracing::info!("operator drain: refusing new broadcasts, delivering what is queued");
            self.draining.cancel();
            self.health
                .set_not_serving::<PushServerServer<BroadcastService>>()
                .await;
            self.health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let nodes = self.nodes().await?;
            let empty = nodes.iter().all(|n| n.pending == 0);
            if empty || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(DrainReply { empty, nodes }));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}
