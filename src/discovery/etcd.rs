//! The etcd source: one task that reads the node prefix, watches it from the next
//! revision, resyncs periodically, rides out outages, and retires nodes that stayed away.
//!
//! ```text
//!            ┌──────────────────────────────────────────────────────────┐
//!  connect ─▶│ read prefix (revision R) ─▶ apply snapshot ─▶ watch R+1   │
//!            │   events ─▶ apply (skip revisions already applied)        │
//!            │   every resync_every: read again, apply; retire the due   │
//!            └──────┬───────────────────────────────────────────────────┘
//!                   │ watch or read fails: log once, backoff, start over
//!                   │ watch compacted: start over at once (fresh read)
//! ```
//!
//! The task owns the [`Membership`], so every change to membership happens in order. Until
//! the first read succeeds, the membership loaded from the store is in force (every known
//! node at its last address); [`Discovery::wait_first_read`] lets the server hold back
//! readiness for a bounded time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use etcd_client::{Client, EventType, GetOptions, KeyValue, KvClient, WatchOptions, WatchResponse};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ServeConfig, StaticNode};
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;
use crate::store::{now_ms, Store};

use super::membership::{Membership, Reg};
use super::retire::{self, ArchiveReport};
use super::value::{self, Registered};
use super::{retry_backoff, DiscoveryError, EtcdSettings};

/// Default period of the safety-net resync.
pub const DEFAULT_RESYNC_EVERY: Duration = Duration::from_secs(3);
/// Default longest pause between two attempts to reach etcd.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(5);

/// What the etcd source needs.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// How to reach etcd.
    pub etcd: EtcdSettings,
    /// The prefix connect-nodes register under; ends in `/`.
    pub node_prefix: String,
    /// Static nodes, merged with etcd's (already in the store).
    pub static_nodes: Vec<StaticNode>,
    /// How long a node may be absent before it is retired.
    pub offline_retention: Duration,
    /// Period of the safety-net resync (and of the retirement check).
    pub resync_every: Duration,
    /// Longest pause between two attempts to reach etcd.
    pub retry_max: Duration,
    /// Where retired nodes' queues are archived (`<data_dir>/archive`).
    pub archive_dir: PathBuf,
}

impl DiscoveryOptions {
    /// The options `push-manager serve` runs with.
    pub fn from_config(cfg: &ServeConfig) -> Self {
        let mut etcd = EtcdSettings::new(cfg.etcd.clone()).with_tls(cfg.etcd_tls.clone());
        if let Some(user) = &cfg.etcd_user {
            etcd.user = Some(user.clone());
        }
        if let Some(password) = &cfg.etcd_password {
            etcd.password = Some(password.expose().to_string());
        }
        DiscoveryOptions {
            etcd,
            node_prefix: cfg.node_prefix.clone(),
            static_nodes: cfg.static_nodes.clone(),
            offline_retention: cfg.offline_retention,
            resync_every: DEFAULT_RESYNC_EVERY,
            retry_max: DEFAULT_RETRY_MAX,
            archive_dir: cfg.data_dir.join("archive"),
        }
    }
}

/// Progress of the first read of etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstRead {
    Pending,
    Done,
    /// The first attempt failed in a way retrying cannot fix (bad credentials, bad URL).
    Failed(String),
}

/// Counters of the etcd source, for logs, tests and metrics.
#[derive(Debug, Default)]
pub struct DiscoveryStats {
    /// Complete reads of the prefix applied (the first read and every resync).
    pub reads: AtomicU64,
    /// Watches that fell behind a compaction and were restarted from a fresh read.
    pub compactions: AtomicU64,
    /// Outages: etcd stopped answering (counted once per outage).
    pub outages: AtomicU64,
    /// Nodes retired after `offline_retention`, their queues archived.
    pub retired: AtomicU64,
}

/// The running etcd source; see the module docs.
pub struct Discovery {
    first_read: watch::Receiver<FirstRead>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    stats: Arc<DiscoveryStats>,
}

type Retired = (String, u64, Result<Option<ArchiveReport>, DiscoveryError>);

impl Discovery {
    /// Loads the membership persisted in the store (every known node gets a worker at its
    /// last address, paused if it was absent), then follows etcd in a task on the current
    /// tokio runtime.
    pub fn start(
        opts: DiscoveryOptions,
        store: Store,
        dispatcher: Arc<Dispatcher>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Discovery, DiscoveryError> {
        let membership = Membership::load(store.clone(), dispatcher.clone(), &opts.static_nodes)?;
        let (first_tx, first_read) = watch::channel(FirstRead::Pending);
        let stop = CancellationToken::new();
        let stats = Arc::new(DiscoveryStats::default());
        let (retired_tx, retired_rx) = mpsc::unbounded_channel();
        let follower = Follower {
            opts,
            store,
            dispatcher,
            metrics,
            membership,
            client: None,
            client_tls: Vec::new(),
            applied_rev: 0,
            first_read: first_tx,
            outage_since: None,
            bad: HashSet::new(),
            stop: stop.clone(),
            retirements: TaskTracker::new(),
            retired_tx,
            retired_rx,
            partial: HashMap::new(),
            stats: stats.clone(),
        };
        Ok(Discovery {
            first_read,
            stop,
            task: tokio::spawn(follower.run()),
            stats,
        })
    }

    /// Waits until the first read of etcd has been applied, at most `bound`. `Ok(true)`:
    /// applied; `Ok(false)`: etcd did not answer in time (the stored membership stays in
    /// force and the source keeps trying); `Err`: etcd answered with an error retrying
    /// cannot fix, such as bad credentials.
    pub async fn wait_first_read(&self, bound: Duration) -> Result<bool, DiscoveryError> {
        let mut rx = self.first_read.clone();
        let waited = tokio::time::timeout(bound, rx.wait_for(|s| *s != FirstRead::Pending)).await;
        let state = match waited {
            Ok(Ok(s)) => s.clone(),
            _ => return Ok(false),
        };
        match state {
            FirstRead::Done => Ok(true),
            FirstRead::Failed(why) => Err(DiscoveryError::Config(why)),
            FirstRead::Pending => Ok(false),
        }
    }

    /// The source's counters.
    pub fn stats(&self) -> Arc<DiscoveryStats> {
        self.stats.clone()
    }

    /// Stops following etcd (a retirement in progress stops between two steps and resumes
    /// at the next start), within `timeout`.
    pub async fn stop(self, timeout: Duration) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(?timeout, "etcd discovery did not stop in time");
        }
    }
}

struct Follower {
    opts: DiscoveryOptions,
    store: Store,
    dispatcher: Arc<Dispatcher>,
    metrics: Option<Arc<Metrics>>,
    membership: Membership,
    client: Option<Client>,
    /// The TLS files as they were when `client` was made: a client made before they changed
    /// is replaced at the next (re)connection, so renewed certificates are used.
    client_tls: crate::discovery::TlsStamps,
    /// Revision up to which etcd's state has been applied.
    applied_rev: i64,
    first_read: watch::Sender<FirstRead>,
    /// Set while etcd does not answer: an outage is logged once.
    outage_since: Option<Instant>,
    /// Keys with an unusable value (or id) already logged: each is logged once, until it
    /// gets a usable value or is deleted.
    bad: HashSet<String>,
    stop: CancellationToken,
    retirements: TaskTracker,
    retired_tx: mpsc::UnboundedSender<Retired>,
    retired_rx: mpsc::UnboundedReceiver<Retired>,
    /// Entries archived by earlier passes of a retirement still in progress.
    partial: HashMap<String, (u64, u64, u64)>,
    stats: Arc<DiscoveryStats>,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = retry_backoff(self.opts.retry_max);
        let stop = self.stop.clone();
        'outer: loop {
            let e = tokio::select! {
                _ = stop.cancelled() => break,
                e = self.follow(&mut backoff) => e,
            };
            if let DiscoveryError::Compacted(rev) = e {
                self.stats.compactions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    compact_revision = rev,
                    "etcd watch fell behind a compaction; resyncing from a fresh read"
                );
                continue;
            }
            if !e.is_retryable() && *self.first_read.borrow() == FirstRead::Pending {
                self.first_read.send_replace(FirstRead::Failed(format!(
                    "etcd at {}: {e}",
                    self.opts.etcd.describe()
                )));
            }
            self.outage(&e);
            let until = Instant::now() + backoff.next_backoff().unwrap_or(self.opts.retry_max);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    _ = tokio::time::sleep_until(until) => break,
                    Some(r) = self.retired_rx.recv() => self.on_retired(r).await,
                }
            }
        }
        self.retirements.close();
        self.retirements.wait().await;
    }

    /// Reads, watches and resyncs until something fails; returns what.
    async fn follow(&mut self, backoff: &mut backoff::ExponentialBackoff) -> DiscoveryError {
        match self.follow_inner(backoff).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn follow_inner(
        &mut self,
        backoff: &mut backoff::ExponentialBackoff,
    ) -> Result<std::convert::Infallible, DiscoveryError> {
        let client = {
            let stamps = self.opts.etcd.tls_stamps();
            match &self.client {
                Some(c) if stamps == self.client_tls => c.clone(),
                previous => {
                    if previous.is_some() {
                        tracing::info!("etcd TLS files changed; connecting with them");
                    }
                    let c = self.opts.etcd.connect().await?;
                    self.client = Some(c.clone());
                    self.client_tls = stamps;
                    c
                }
            }
        };
        let mut kv = client.kv_client();
        self.read(&mut kv, true).await?;
        let mut stream = client
            .watch_client()
            .watch(
                self.opts.node_prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(self.applied_rev + 1),
                ),
            )
            .await?;
        self.back_online();
        backoff.reset();
        let every = self.opts.resync_every;
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Right after a (re)connection, so that nodes due during an outage go promptly.
        self.retire_due();
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => self.on_watch(&resp)?,
                    Ok(None) => {
                        return Err(DiscoveryError::StreamEnded {
                            what: "watch",
                            reason: "closed by etcd".into(),
                        })
                    }
                    Err(e) => return Err(e.into()),
                },
                _ = tick.tick() => {
                    self.read(&mut kv, false).await?;
                    self.retire_due();
                }
                Some(r) = self.retired_rx.recv() => self.on_retired(r).await,
            }
        }
    }

    /// Reads the whole prefix and applies it. `fresh`: the first read of a connection,
    /// applied whatever its revision (etcd may have been rebuilt with lower revisions);
    /// otherwise a read older than what was applied is skipped.
    async fn read(&mut self, kv: &mut KvClient, fresh: bool) -> Result<(), DiscoveryError> {
        let resp = kv
            .get(
                self.opts.node_prefix.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        if !fresh && rev < self.applied_rev {
            return Ok(());
        }
        let mut nodes: BTreeMap<String, Reg> = BTreeMap::new();
        let mut unusable = HashSet::new();
        for kv in resp.kvs() {
            match self.parse(kv) {
                Some((id, Ok(Registered::At(addr)))) => {
                    nodes.insert(id, (addr, kv.mod_revision()));
                }
                Some((_, Ok(Registered::Gone))) => {}
                Some((id, Err(()))) => {
                    unusable.insert(id);
                }
                None => {}
            }
        }
        self.membership.apply_snapshot(&nodes, &unusable);
        self.applied_rev = rev;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        if *self.first_read.borrow() != FirstRead::Done {
            tracing::info!(nodes = nodes.len(), revision = rev, prefix = %self.opts.node_prefix,
                           "first etcd read applied");
            self.first_read.send_replace(FirstRead::Done);
        }
        Ok(())
    }

    /// The node id and registration of a key; `None` for a key that is not a node's
    /// (logged once), `Err(())` for a node's key with an unusable value (logged once).
    fn parse(&mut self, kv: &KeyValue) -> Option<(String, Result<Registered, ()>)> {
        let key = value::show_key(kv.key());
        let id = match value::node_id(&self.opts.node_prefix, kv.key()) {
            Ok(id) => id.to_string(),
            Err(reason) => {
                self.warn_once(key, &reason);
                return None;
            }
        };
        match value::parse(kv.value()) {
            Ok(r) => {
                self.bad.remove(&key);
                Some((id, Ok(r)))
            }
            Err(reason) => {
                self.warn_once(key, &reason);
                Some((id, Err(())))
            }
        }
    }

    fn warn_once(&mut self, key: String, reason: &str) {
        if self.bad.contains(&key) {
            return;
        }
        let e = DiscoveryError::BadValue {
            key: key.clone(),
            reason: reason.to_string(),
        };
        tracing::warn!(error = %e, "ignoring an etcd registration");
        self.bad.insert(key);
    }

    fn on_watch(&mut self, resp: &WatchResponse) -> Result<(), DiscoveryError> {
        if resp.compact_revision() > 0 {
            return Err(DiscoveryError::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(DiscoveryError::StreamEnded {
                what: "watch",
                reason: format!("canceled by etcd: {}", resp.cancel_reason()),
            });
        }
        // Events of one revision (a transaction) share it: compare with the start.
        let base = self.applied_rev;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            if rev <= base {
                continue;
            }
            self.applied_rev = self.applied_rev.max(rev);
            match ev.event_type() {
                EventType::Put => match self.parse(kv) {
                    Some((id, Ok(Registered::At(addr)))) => {
                        self.membership.registered_at(&id, (addr, rev))
                    }
                    Some((id, Ok(Registered::Gone))) => self.membership.deregistered(&id),
                    // An unusable value leaves the node as it was.
                    Some((_, Err(()))) | None => {}
                },
                EventType::Delete => {
                    self.bad.remove(&value::show_key(kv.key()));
                    if let Ok(id) = value::node_id(&self.opts.node_prefix, kv.key()) {
                        self.membership.deregistered(id);
                    }
                }
            }
        }
        Ok(())
    }

    fn outage(&mut self, e: &DiscoveryError) {
        if self.outage_since.is_some() {
            tracing::debug!(error = %e, "etcd still unavailable");
            return;
        }
        self.outage_since = Some(Instant::now());
        self.stats.outages.fetch_add(1, Ordering::Relaxed);
        let level_error = !e.is_retryable();
        if level_error {
            tracing::error!(etcd = %self.opts.etcd.describe(), error = %e,
                            "etcd refuses us; keeping the last known membership and retrying with backoff");
        } else {
            tracing::warn!(etcd = %self.opts.etcd.describe(), error = %e,
                           "etcd unavailable; keeping the last known membership, delivering on it, \
                            and retrying with backoff");
        }
    }

    fn back_online(&mut self) {
        if let Some(since) = self.outage_since.take() {
            tracing::info!(etcd = %self.opts.etcd.describe(), down = ?since.elapsed(),
                           "etcd answers again; membership resynced");
        }
    }

    /// Starts retiring every node whose absence reached `offline_retention`.
    fn retire_due(&mut self) {
        let now = now_ms();
        for (id, since) in self
            .membership
            .due_for_retirement(now, self.opts.offline_retention)
        {
            tracing::info!(node = %id,
                           absent_for = ?Duration::from_millis(now.saturating_sub(since)),
                           retention = ?self.opts.offline_retention,
                           "node absent longer than offline_retention: retiring it and archiving its queue");
            self.membership.begin_retirement(&id);
            self.spawn_archive(id, since);
        }
    }

    fn spawn_archive(&mut self, id: String, since: u64) {
        let pass = retire::archive_queue(
            self.store.clone(),
            self.dispatcher.clone(),
            id.clone(),
            since,
            self.opts.archive_dir.clone(),
            self.stop.clone(),
        );
        let tx = self.retired_tx.clone();
        self.retirements.spawn(async move {
            let result = pass.await;
            // The receiver is gone only when discovery stopped: the retirement resumes at
            // the next start.
            let _ = tx.send((id, since, result));
        });
    }

    /// Step 4 of [`retire`]: removes the node once its queue is archived.
    async fn on_retired(&mut self, (id, since, result): Retired) {
        let report = match result {
            Ok(Some(report)) => report,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(node = %id, error = %e,
                                "retiring the node failed; it stays in the store and is tried again later");
                self.partial.remove(&id);
                self.membership.end_retirement(&id, false);
                return;
            }
        };
        let total = {
            let t = self.partial.entry(id.clone()).or_default();
            t.0 += report.live;
            t.1 += report.dead_letters;
            t.2 += report.unreadable;
            *t
        };
        let store = self.store.clone();
        let node = id.clone();
        match tokio::task::spawn_blocking(move || store.remove_node(&node)).await {
            Ok(Ok(true)) => {
                self.partial.remove(&id);
                self.membership.end_retirement(&id, true);
                if let Some(m) = &self.metrics {
                    m.forget_node(&id);
                }
                self.stats.retired.fetch_add(1, Ordering::Relaxed);
                tracing::info!(node = %id, archive = %report.path.display(), live = total.0,
                               dead_letters = total.1, unreadable = total.2,
                               "node retired: its queue is archived and it is removed from the store");
            }
            Ok(Ok(false)) => {
                tracing::debug!(node = %id, "entries arrived during the retirement; archiving them too");
                self.spawn_archive(id, since);
            }
            Ok(Err(e)) => {
                tracing::error!(node = %id, error = %e, "cannot remove the retired node; will try again");
                self.membership.end_retirement(&id, false);
            }
            Err(e) => {
                tracing::error!(node = %id, error = %e, "the node removal task failed; will try again");
                self.membership.end_retirement(&id, false);
            }
        }
    }
}
