//! `push-manager serve`: wires the store, the committer, delivery and the gRPC services,
//! and runs until the shutdown future resolves (see [`crate::shutdown`] for the drain order).

use std::future::Future;
use std::net::SocketAddr;

use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

use crate::api::broadcast::BroadcastService;
use crate::config::ServeConfig;
use crate::dispatch::{DeliveryConfig, Dispatcher};
use crate::proto::push_server_server::PushServerServer;
use crate::store::commit::CommitOptions;
use crate::store::{Committer, Store, StoreError};

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

/// Runs the manager until `shutdown` resolves, then drains and returns.
pub async fn run(cfg: ServeConfig, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    for (set, what) in [
        (!cfg.etcd.is_empty(), "--etcd (etcd membership)"),
        (
            cfg.metrics_listen.is_some(),
            "--metrics-listen (Prometheus metrics)",
        ),
        (cfg.disk_quota.is_some(), "--disk-quota"),
    ] {
        if set {
            return Err(ServerError::Config(format!(
                "{what} is not implemented in this build yet; run without it \
                 (static nodes: --static-node ID=ADDR)"
            )));
        }
    }
    let dir = cfg.data_dir.display().to_string();
    let store_err = |source| ServerError::Store {
        dir: dir.clone(),
        source,
    };
    let store = {
        let data_dir = cfg.data_dir.clone();
        tokio::task::spawn_blocking(move || Store::open(&data_dir))
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

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;

    let (committed_tx, committed_rx) = watch::channel(0);
    let (commit, committer_thread) = Committer::spawn(
        store.clone(),
        CommitOptions {
            durability: cfg.durability,
            dedupe_window: cfg.dedupe_window,
        },
        committed_tx,
    )
    .map_err(store_err)?;

    let workers_stop = CancellationToken::new();
    let dispatcher = Dispatcher::new(
        store.clone(),
        DeliveryConfig {
            manager_id: manager_id.clone(),
            max_in_flight: cfg.max_in_flight,
            max_attempts: cfg.max_attempts,
            backoff_initial: cfg.backoff_initial,
            backoff_max: cfg.backoff_max,
            delivery_timeout: cfg.delivery_timeout,
        },
        committed_rx,
        workers_stop,
    );
    for (id, rec) in store.nodes().map_err(store_err)? {
        dispatcher.node_seen(&id, &rec.addr, rec.held);
    }

    let draining = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    let service = BroadcastService::new(
        commit.clone(),
        store.clone(),
        cfg.max_payload_bytes,
        draining.clone(),
    );
    // Room for the largest allowed payload plus the request's other fields.
    let max_message = (cfg.max_payload_bytes as usize).saturating_add(1 << 20);
    health
        .set_serving::<PushServerServer<BroadcastService>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tracing::info!(
        listen = %cfg.listen,
        %manager_id,
        nodes = store.known_nodes().len(),
        durability = ?cfg.durability,
        "push-manager serving"
    );

    let drain_signal = {
        let draining = draining.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: draining");
            draining.cancel();
            health
                .set_not_serving::<PushServerServer<BroadcastService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let served = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(
            PushServerServer::new(service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain_signal);

    let result = served.await;
    let drained = tokio::time::timeout(cfg.shutdown_timeout, async {
        if let Err(e) = commit.stop().await {
            tracing::error!(error = %e, "final commit sync failed");
        }
        if !dispatcher.stop(cfg.shutdown_timeout).await {
            tracing::warn!(
                "delivery workers did not stop in time; undelivered entries stay queued"
            );
        }
        let _ = tokio::task::spawn_blocking(move || {
            let _ = committer_thread.join();
            store.sync()
        })
        .await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?cfg.shutdown_timeout, "shutdown timeout reached");
    }
    tracing::info!("push-manager stopped");
    result.map_err(ServerError::from)
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
