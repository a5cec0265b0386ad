//! The one shutdown mechanism: a [`CancellationToken`] that every long-lived task obeys.
//!
//! Drain order, on SIGTERM or Ctrl-C (see [`crate::server::run`]):
//! 1. health goes NOT_SERVING and new `Broadcast` calls answer UNAVAILABLE;
//! 2. the gRPC server stops accepting and lets in-flight calls finish;
//! 3. the committer commits what it was handed, syncs and stops;
//! 4. delivery workers stop sending, wait for their in-flight calls, write progress back;
//! 5. a final store sync; exit 0.
//!
//! The whole drain is bounded by `--shutdown-timeout`.

pub use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
