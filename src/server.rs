//! `push-manager serve`: wires the store, the committer, delivery and the gRPC services,
//! and runs until the shutdown future resolves (see [`crate::shutdown`] for the drain order).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::ClientTlsConfig;

use crate::api::admin::AdminService;
use crate::api::broadcast::BroadcastService;
use crate::auth::{AdminGuard, BroadcastAuth, Tokens};
use crate::config::ServeConfig;
use crate::discovery::managers::manager_key;
use crate::discovery::{Discovery, DiscoveryOptions, Registration};
use crate::dispatch::{DeliveryConfig, Dispatcher};
use crate::metrics::Metrics;
use crate::proto::admin::admin_server::AdminServer;
use crate::proto::push_server_server::PushServerServer;
use crate::store::commit::{CommitOptions, Limits};
use crate::store::{Committer, Store, StoreError};
use crate::tls::{ClientTlsFiles, ReloadableServerTls};

/// Most of `--shutdown-timeout` kept back from the drain for closing the servers and the
/// final store sync, so even a drain that runs out of time ends with the store flushed.
const CLOSE_RESERVE: Duration = Duration::from_secs(1);

/// With `--etcd`, how long readiness waits for the first read of etcd at start. When etcd
/// answers, health turns SERVING only after its membership is applied; when it does not
/// answer within this bound, the manager serves on the membership stored in the data dir
/// (every known node at its last address) and keeps trying etcd in the background. Short,
/// because a manager that cannot reach etcd must still accept and deliver.
pub const FIRST_ETCD_READ_WAIT: Duration = Duration::from_secs(3);

/// Bound of revoking this manager's etcd lease at shutdown; past it the key expires with
/// its lease (`--lease-ttl`).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store could not be opened or used.
    #[error("data dir {dir}: {source}")]
    Store {
        /// The data directory.
        dir: String,
        /// What went wrong.
        #[source]
        source: StoreError,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A setting this build cannot honour, or one that conflicts with the data dir.
    #[error("{0}")]
    Config(String),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// While the store's writes fail with an I/O error, how often the data dir is probed for
/// free space.
const REOPEN_PROBE_EVERY: Duration = Duration::from_secs(1);
/// Bytes the probe writes (and fsyncs, then removes) in the data dir: one sled segment,
/// what sled may need to go on.
const REOPEN_PROBE_BYTES: usize = 8 * 1024 * 1024;
/// Bound on waiting for the previous store handle to let go of sled's lock at a reopen.
const REOPEN_LOCK_WAIT: Duration = Duration::from_secs(15);

/// How often the certificate and token files are checked for changes (modification time
/// and size), besides SIGHUP: soon enough for a renewal tool that just rewrites the files,
/// cheap enough to be unnoticeable.
const RELOAD_CHECK_EVERY: Duration = Duration::from_secs(2);
/// Largest request header block: room for any token and the usual gRPC headers, far below
/// what would let one request hold much memory before it is even decoded.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// The server's security settings, loaded from the files the config names: TLS toward
/// clients and nodes, and the token sets. Everything here is read again by
/// [`Security::reload`], on SIGHUP or when a file changes; a reload that fails keeps the
/// previous settings, so a bad edit is logged, never fatal.
pub struct Security {
    server_tls: Option<Arc<ReloadableServerTls>>,
    node_tls: Option<(ClientTlsFiles, watch::Sender<ClientTlsConfig>)>,
    broadcast_tokens: Option<Arc<Tokens>>,
    admin_tokens: Option<Arc<Tokens>>,
}

impl Security {
    /// Reads every file the config names (the etcd TLS files too, to fail at start rather
    /// than at the first etcd call); an error names the file and what to do.
    pub fn load(cfg: &ServeConfig) -> Result<Self, ServerError> {
        let err = |e: &dyn std::fmt::Display| ServerError::Config(e.to_string());
        let server_tls = match &cfg.tls {
            Some(files) => Some(Arc::new(
                ReloadableServerTls::load(files.clone()).map_err(|e| err(&e))?,
            )),
            None => None,
        };
        let node_tls = match &cfg.node_tls {
            Some(files) => {
                let config = files.build().map_err(|e| err(&e))?;
                Some((files.clone(), watch::channel(config).0))
            }
            None => None,
        };
        if let Some(files) = &cfg.etcd_tls {
            files.build().map_err(|e| err(&e))?;
        }
        let tokens = |option, path: &Option<std::path::PathBuf>| match path {
            Some(p) => Tokens::load(option, p).map(|t| Some(Arc::new(t))),
            None => Ok(None),
        };
        Ok(Security {
            server_tls,
            node_tls,
            broadcast_tokens: tokens("--token-file", &cfg.token_file).map_err(|e| err(&e))?,
            admin_tokens: tokens("--admin-token-file", &cfg.admin_token_file)
                .map_err(|e| err(&e))?,
        })
    }

    /// Whether clients must present a certificate.
    fn mtls(&self) -> bool {
        self.server_tls
            .as_ref()
            .is_some_and(|t| t.requires_client_cert())
    }

    /// The latest TLS configuration toward nodes, for the delivery workers.
    fn node_tls(&self) -> Option<watch::Receiver<ClientTlsConfig>> {
        self.node_tls.as_ref().map(|(_, tx)| tx.subscribe())
    }

    /// Every file a reload reads.
    fn watched(&self) -> Vec<std::path::PathBuf> {
        let mut paths = Vec::new();
        if let Some(tls) = &self.server_tls {
            paths.extend(tls.files().paths());
        }
        if let Some((files, _)) = &self.node_tls {
            paths.extend(files.paths());
        }
        for tokens in [&self.broadcast_tokens, &self.admin_tokens]
            .into_iter()
            .flatten()
        {
            paths.push(tokens.path().to_owned());
        }
        paths
    }

    /// Reads every file again; each part that fails keeps its previous settings. New
    /// connections (from clients, and toward nodes: every worker reconnects) use the new
    /// certificates; open ones and the queues are untouched.
    pub fn reload(&self, trigger: &str) {
        let mut failed = 0;
        if let Some(tls) = &self.server_tls {
            if let Err(e) = tls.reload() {
                failed += 1;
                tracing::error!(error = %e, "server TLS not reloaded; the previous certificate stays");
            }
        }
        if let Some((files, tx)) = &self.node_tls {
            match files.build() {
                Ok(config) => {
                    tx.send_replace(config);
                }
                Err(e) => {
                    failed += 1;
                    tracing::error!(error = %e, "TLS toward nodes not reloaded; the previous settings stay");
                }
            }
        }
        for tokens in [&self.broadcast_tokens, &self.admin_tokens]
            .into_iter()
            .flatten()
        {
            if let Err(e) = tokens.reload() {
                failed += 1;
                tracing::error!(error = %e, "tokens not reloaded; the previous ones stay");
            }
        }
        match failed {
            0 => tracing::info!(trigger, "certificates and tokens reloaded"),
            n => tracing::warn!(trigger, failed = n, "reload incomplete (see above)"),
        }
    }
}

/// Reloads [`Security`] on SIGHUP and when one of its files changes, until `stop`.
/// SIGHUP is always caught, so `systemctl reload` (or a stray hangup) never stops the
/// manager, even with nothing to reload.
async fn reload_loop(security: Arc<Security>, stop: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot handle SIGHUP; certificates reload on file change only");
            None
        }
    };
    let paths = security.watched();
    let mut stamps = crate::tls::file_stamps(&paths);
    let mut tick = tokio::time::interval(RELOAD_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if paths.is_empty() {
                    tracing::info!("SIGHUP: no certificate or token file configured; nothing to reload");
                    continue;
                }
                security.reload("SIGHUP");
                stamps = crate::tls::file_stamps(&paths);
            }
            _ = tick.tick(), if !paths.is_empty() => {
                let now = crate::tls::file_stamps(&paths);
                if now != stamps {
                    stamps = now;
                    security.reload("file changed");
                }
            }
        }
    }
}

/// Start-up warnings about exposure: plaintext on a non-loopback address, and what guards
/// the admin API.
fn warn_exposure(cfg: &ServeConfig, security: &Security) {
    let loopback = cfg.listen.ip().is_loopback();
    if !loopback && security.server_tls.is_none() {
        tracing::warn!(
            listen = %cfg.listen,
            "serving plaintext gRPC on a non-loopback address: broadcasts (and any bearer \
             tokens) cross the network unencrypted; give --tls-cert and --tls-key"
        );
    }
    if !loopback && cfg.admin && security.admin_tokens.is_none() && !security.mtls() {
        tracing::info!(
            "the admin API answers loopback callers only; set --admin-token-file (or \
             --tls-client-ca) to use it from other hosts, or --no-admin"
        );
    }
}

/// How one run of the server ended.
enum Ended {
    /// `shutdown` resolved (or the gRPC server stopped): the manager is done.
    Shutdown,
    /// The store's writes failed with an I/O error and space is back: drained, to be
    /// opened again.
    Reopen,
}

/// Runs the manager until `shutdown` resolves, then drains and returns.
///
/// **Recovery from a full disk**: sled 0.34.7 refuses every write after its first write
/// or fsync error until the store is reopened (reads keep working). So once a write fails
/// with an I/O error ([`Store::write_failed`]), the data dir is probed every
/// [`REOPEN_PROBE_EVERY`] by writing and fsyncing [`REOPEN_PROBE_BYTES`]; when that
/// succeeds the server drains as for a shutdown (nothing acked is lost; unacked callers got
/// UNAVAILABLE; deliveries resume from the store), opens the store again and serves again
/// on the same addresses, within this call: the port is closed for a moment in between.
pub async fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    // Loaded before the store is opened: a bad certificate or token file stops the start
    // without touching the data dir. Kept across store reopens, like the reload task.
    let security = Arc::new(Security::load(&cfg)?);
    warn_exposure(&cfg, &security);
    let reload_stop = CancellationToken::new();
    let _stop_reloads = reload_stop.clone().drop_guard();
    tokio::spawn(reload_loop(security.clone(), reload_stop));
    let mut reopening = false;
    loop {
        match run_once(cfg.clone(), reopening, shutdown.as_mut(), &security).await? {
            Ended::Shutdown => return Ok(()),
            Ended::Reopen => {
                tracing::warn!("space is back: opening the store again");
                reopening = true;
            }
        }
    }
}

/// Writes, fsyncs and removes a probe file of [`REOPEN_PROBE_BYTES`] in `dir`: whether
/// there is room again for the store to write.
fn space_is_back(dir: &std::path::Path) -> bool {
    use std::io::Write;
    let path = dir.join(".space-probe");
    let ok = std::fs::File::create(&path)
        .and_then(|mut f| {
            f.write_all(&vec![0u8; REOPEN_PROBE_BYTES])?;
            f.sync_all()
        })
        .is_ok();
    let _ = std::fs::remove_file(&path);
    ok
}

/// One run of the server: from opening the store to the end of the drain.
///
/// `reopening`: the previous run of this process closed the store a moment ago; its handle
/// may take a moment to let go of sled's lock ([`Store::reopen`]).
async fn run_once<F: Future<Output = ()>>(
    cfg: ServeConfig,
    reopening: bool,
    shutdown: std::pin::Pin<&mut F>,
    security: &Security,
) -> Result<Ended, ServerError> {
    let dir = cfg.data_dir.display().to_string();
    let store_err = |source| ServerError::Store {
        dir: dir.clone(),
        source,
    };
    let store = {
        let data_dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            if reopening {
                Store::reopen(&data_dir, REOPEN_LOCK_WAIT)
            } else {
                Store::open(&data_dir)
            }
        })
        .await
        .map_err(|e| ServerError::Config(format!("store open task failed: {e}")))?
        .map_err(store_err)?
    };
    let manager_id = resolve_manager_id(&cfg, &store)?;

    for node in &cfg.static_nodes {
        store
            .upsert_node(&node.id, &node.addr, true)
            .map_err(store_err)?;
    }

    let listener = bind(cfg.listen).await?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    // Counted before the committer and the workers start: the queue depth invariant in
    // crate::metrics.
    let metrics = Arc::new(Metrics::new());
    {
        let store = store.clone();
        let metrics = metrics.clone();
        tokio::task::spawn_blocking(move || metrics.count_queues(&store))
            .await
            .map_err(|e| ServerError::Config(format!("queue count task failed: {e}")))?
            .map_err(store_err)?;
    }
    // Only now: recovery and the queue count read the whole store (see `crate::malloc`).
    crate::malloc::fix_mmap_threshold();

    let (committed_tx, committed_rx) = watch::channel(0);
    let (commit, committer_thread) = Committer::spawn_with_limits(
        store.clone(),
        CommitOptions {
            durability: cfg.durability,
            dedupe_window: cfg.dedupe_window,
        },
        Limits {
            disk_quota: cfg.disk_quota,
            max_pending_per_node: cfg.max_pending_per_node,
        },
        committed_tx,
        metrics.clone(),
    )
    .map_err(store_err)?;

    let workers_stop = CancellationToken::new();
    let dispatcher = Dispatcher::new(
        store.clone(),
        DeliveryConfig {
            manager_id: manager_id.clone(),
            max_in_flight: cfg.max_in_flight,
            delivery_batch: cfg.delivery_batch,
            max_attempts: cfg.max_attempts,
            backoff_initial: cfg.backoff_initial,
            backoff_max: cfg.backoff_max,
            delivery_timeout: cfg.delivery_timeout,
            node_tls: security.node_tls(),
        },
        committed_rx,
        workers_stop,
    )
    .with_metrics(metrics.clone());
    // Shared with the admin API, which reads statuses and pauses workers.
    let dispatcher = Arc::new(dispatcher);
    // Membership: every known node resumes at its last address. With etcd, nodes recorded
    // as absent start paused, and etcd is followed from here on (crate::discovery).
    let discovery_opts = DiscoveryOptions::from_config(&cfg);
    let discovery = if cfg.etcd.is_empty() {
        for (id, rec) in store.nodes().map_err(store_err)? {
            dispatcher.node_seen(&id, &rec.addr, rec.held);
        }
        None
    } else {
        let started = Discovery::start(
            discovery_opts.clone(),
            store.clone(),
            dispatcher.clone(),
            Some(metrics.clone()),
        );
        Some(started.map_err(|e| ServerError::Config(format!("etcd membership: {e}")))?)
    };

    let draining = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    let service = BroadcastService::new(
        commit.clone(),
        store.clone(),
        cfg.max_payload_bytes,
        draining.clone(),
    )
    .with_metrics(metrics.clone());
    // The operator API shares the port (and the drain token: its Drain stops accepting).
    // Guarded by AdminGuard: tokens, mTLS, or loopback callers only (crate::auth).
    let admin = cfg.admin.then(|| {
        InterceptedService::new(
            AdminServer::new(AdminService::new(
                store.clone(),
                commit.clone(),
                dispatcher.clone(),
                metrics.clone(),
                draining.clone(),
                health.clone(),
            )),
            AdminGuard::new(security.admin_tokens.clone(), security.mtls()),
        )
    });
    // Reflection lets grpcurl-style tools call every service without the proto files; v1alpha
    // too, for tools that only speak that.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e| ServerError::Config(format!("gRPC reflection: {e}"));
    let reflection_v1 = reflection().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(reflection_err)?;
    // Room for the largest allowed request (one payload of max_payload_bytes, or a batch of
    // MAX_BATCH_BYTES) plus its other fields. A bigger body is cut by the transport before it
    // is decoded (OUT_OF_RANGE); one within the slack over the batch limit gets the
    // contract's INVALID_ARGUMENT.
    let max_message = (cfg.max_payload_bytes as usize)
        .max(crate::api::broadcast::MAX_BATCH_BYTES)
        .saturating_add(1 << 20);
    if let Some(d) = &discovery {
        match d.wait_first_read(FIRST_ETCD_READ_WAIT).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                etcd = %discovery_opts.etcd.describe(),
                waited = ?FIRST_ETCD_READ_WAIT,
                "etcd did not answer at start; serving the membership stored in the data dir \
                 and retrying etcd in the background"
            ),
            Err(e) => {
                let _ = commit.stop().await;
                dispatcher.stop(Duration::from_secs(1)).await;
                return Err(ServerError::Config(format!(
                    "etcd membership: {e}; fix --etcd / --etcd-user / --etcd-password"
                )));
            }
        }
    }
    health
        .set_serving::<PushServerServer<BroadcastService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(
        listen = %cfg.listen,
        metrics_listen = ?cfg.metrics_listen,
        %manager_id,
        nodes = store.known_nodes().len(),
        durability = ?cfg.durability,
        tls = security.server_tls.is_some(),
        mtls = security.mtls(),
        broadcast_auth = security.broadcast_tokens.is_some(),
        "push-manager serving"
    );

    let metrics_stop = CancellationToken::new();
    let mut metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            metrics_stop.clone(),
        ))
    });
    let server_stop = CancellationToken::new();
    // Limits per connection: HTTP/2 streams, requests in the handlers (more wait in the
    // connection), header size; the body limit (max_message) is checked by tonic against
    // the gRPC length prefix, before a large body is buffered or decoded.
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .concurrency_limit_per_connection(cfg.concurrency_per_connection)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(admin)
        .add_service(InterceptedService::new(
            PushServerServer::new(service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            BroadcastAuth::new(security.broadcast_tokens.clone()),
        ));
    let stopped = server_stop.clone().cancelled_owned();
    let mut server = match &security.server_tls {
        // TLS accepted by our own loop, with the certificate current at each accept
        // (crate::tls): a reload never restarts the server.
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(
            crate::tls::tls_incoming(listener, tls.clone()),
            stopped,
        )),
        // TCP_NODELAY, as crate::tls sets it: a custom incoming stream skips the builder's
        // socket options, and Nagle's algorithm held small replies back behind unacked ones.
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped,
        )),
    };

    // Registered once serving: clients resolving managers from etcd find only ready ones.
    let registration = discovery.as_ref().map(|_| {
        let advertise = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| cfg.listen.to_string());
        Registration::start(
            discovery_opts.etcd.clone(),
            manager_key(&manager_id),
            advertise,
            cfg.lease_ttl,
        )
    });

    // Watches for the store's writes failing (a full disk), then for space to come back.
    let reopen = CancellationToken::new();
    let mut watcher = {
        let store = store.clone();
        let reopen = reopen.clone();
        let dir = cfg.data_dir.clone();
        tokio::spawn(async move {
            let mut logged = false;
            loop {
                tokio::time::sleep(REOPEN_PROBE_EVERY).await;
                if !store.write_failed() {
                    continue;
                }
                if !logged {
                    tracing::error!(
                        "store writes fail (see above); broadcasts get UNAVAILABLE until \
                         space is back, then the store is reopened"
                    );
                    logged = true;
                }
                let dir = dir.clone();
                let back = tokio::task::spawn_blocking(move || space_is_back(&dir))
                    .await
                    .unwrap_or(false);
                if back {
                    reopen.cancel();
                    return;
                }
            }
        })
    };

    let mut result = Ok(());
    let mut server_done = false;
    let mut reopening = false;
    tokio::select! {
        () = shutdown => {}
        r = &mut server => {
            tracing::error!("gRPC server stopped on its own; draining");
            result = served(r);
            server_done = true;
        }
        () = reopen.cancelled() => {
            tracing::warn!("space is back; draining to reopen the store");
            reopening = true;
        }
    }
    watcher.abort();
    let _ = (&mut watcher).await;

    // The drain, in the order crate::shutdown documents; the gRPC server keeps answering
    // (health NOT_SERVING, Broadcast UNAVAILABLE) until step 5.
    tracing::info!(timeout = ?cfg.shutdown_timeout, "shutting down: draining");
    let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
    let drain_deadline = deadline - CLOSE_RESERVE.min(cfg.shutdown_timeout / 5);
    // 1. Stop accepting.
    draining.cancel();
    health
        .set_not_serving::<PushServerServer<BroadcastService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let mut committer_stopped = false;
    let drained = tokio::time::timeout_at(drain_deadline, async {
        // 2. In-flight Broadcasts: everything handed to the committer is committed and
        //    answered; what comes later is answered UNAVAILABLE.
        match commit.stop().await {
            Ok(()) => committer_stopped = true,
            Err(e) => tracing::error!(error = %e, "final commit sync failed"),
        }
        // 3. Deliveries: in-flight sends complete, the rest stays queued.
        let left = drain_deadline.saturating_duration_since(tokio::time::Instant::now());
        if !dispatcher.stop(left).await {
            tracing::warn!(
                "delivery workers did not stop in time; undelivered entries stay queued"
            );
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            timeout = ?cfg.shutdown_timeout,
            "shutdown timeout reached; undelivered entries stay queued"
        );
    }
    // 4. Deregistration: revoking the etcd lease deletes this manager's key, after the last
    //    ack and before the ports close; then etcd discovery stops (a retirement in progress
    //    resumes at the next start). Each is bounded by DEREGISTER_TIMEOUT; past it the key
    //    expires with its lease.
    if let Some(r) = registration {
        let _ = tokio::time::timeout_at(deadline, r.stop(DEREGISTER_TIMEOUT)).await;
    }
    if let Some(d) = discovery {
        let _ = tokio::time::timeout_at(deadline, d.stop(DEREGISTER_TIMEOUT)).await;
    }
    // 5. Close the ports, then a final sync of the workers' progress. Every Broadcast is
    //    answered by now; what may still be open is a health Watch stream, which never ends
    //    by itself, so the close gets a short grace, not the rest of the timeout.
    server_stop.cancel();
    metrics_stop.cancel();
    let close_by = deadline.min(tokio::time::Instant::now() + CLOSE_RESERVE / 2);
    if !server_done {
        match tokio::time::timeout_at(close_by, &mut server).await {
            Ok(r) => result = served(r),
            Err(_) => server.abort(),
        }
    }
    if let Some(task) = metrics_task.as_mut() {
        match tokio::time::timeout_at(close_by, &mut *task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "metrics server failed"),
            Ok(_) => {}
            Err(_) => task.abort(),
        }
    }
    // Without a stopped committer the sync would race its flush (see store::commit), and a
    // stuck disk would hang it: its acked rounds are durable already. A plain thread, not
    // spawn_blocking: the runtime's exit waits for blocking tasks, never for this thread.
    if committer_stopped {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("final-sync".into())
            .spawn(move || {
                let _ = committer_thread.join();
                // Also records the sequence counter, so that a store damaged while stopped
                // is refused at the next start (crate::store::StoreError::Damaged).
                let _ = tx.send(store.mark_clean_stop());
            });
        match spawned {
            Err(e) => tracing::error!(error = %e, "cannot start the final store sync"),
            Ok(_) => match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "final store sync failed"),
                Ok(Err(_)) => tracing::error!("final store sync thread failed"),
                Err(_) => tracing::warn!("final store sync did not finish in time"),
            },
        }
    }
    tracing::info!("push-manager stopped");
    result.map(|()| match reopening {
        true => Ended::Reopen,
        false => Ended::Shutdown,
    })
}

/// Binds a listen address, naming it in the error.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// The gRPC server task's outcome.
fn served(
    r: Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>,
) -> Result<(), ServerError> {
    match r {
        Ok(r) => r.map_err(ServerError::from),
        Err(e) => Err(ServerError::Config(format!("gRPC server task failed: {e}"))),
    }
}

/// The data dir keeps the id it was first started with; `--manager-id` may repeat it but
/// not change it.
fn resolve_manager_id(cfg: &ServeConfig, store: &Store) -> Result<String, ServerError> {
    let store_err = |source| ServerError::Store {
        dir: cfg.data_dir.display().to_string(),
        source,
    };
    match (store.manager_id().map_err(store_err)?, &cfg.manager_id) {
        (Some(s), Some(flag)) if &s != flag => Err(ServerError::Config(format!(
            "data dir {} belongs to manager {s:?}, but --manager-id is {flag:?}; \
             use the data dir's id or another data dir",
            cfg.data_dir.display()
        ))),
        (Some(s), _) => Ok(s),
        (None, flag) => {
            let id = flag
                .clone()
                .unwrap_or_else(|| default_manager_id(cfg.listen));
            store.set_manager_id(&id).map_err(store_err)?;
            Ok(id)
        }
    }
}

/// Host name plus listen port, made safe for a node-id-like string.
fn default_manager_id(listen: SocketAddr) -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "push-manager".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '/' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}-{}", listen.port())
}
