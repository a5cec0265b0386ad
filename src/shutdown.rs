//! The one shutdown mechanism: a [`CancellationToken`] that every long-lived task obeys.
//!
//! Drain order, on SIGTERM or Ctrl-C (see [`crate::server::run`]):
//! 1. health goes NOT_SERVING and new `Broadcast` calls answer UNAVAILABLE. The gRPC server
//!    keeps running through the drain, so load balancers and callers see exactly that
//!    rather than a closed port;
//! 2. in-flight `Broadcast` calls finish: the committer commits what it was handed, syncs
//!    and stops, so each of them is answered OK only if durable, UNAVAILABLE otherwise;
//! 3. delivery workers stop sending, wait for their in-flight calls (each bounded by the
//!    delivery deadline) and write their progress back; what was not delivered stays queued;
//! 4. **hook: deregistration.** The etcd lease is revoked here, after the last ack and
//!    before the ports close, so nothing is registered that no longer answers;
//! 5. the gRPC and metrics servers close, a final store sync, exit 0.
//!
//! The whole drain is bounded by `--shutdown-timeout`: what has not finished by then stays
//! queued (at-least-once, never lost), and the process still exits 0.
//!
//! **A second signal exits at once** ([`exit_on_second_signal`]), with status
//! [`FORCED_EXIT_CODE`]. That loses nothing acked, because an ack only ever follows the
//! fsync that made the message durable (in the default `fsync` durability; `buffered` has
//! the same exposure as a crash): an exit at any instant is no worse than a SIGKILL, which
//! the store is built to survive. What an immediate exit costs is only repeated work:
//! deliveries in flight and progress not yet written back are delivered again after the
//! restart (nodes dedupe by msg_id), and an etcd lease not revoked expires by its TTL.

pub use tokio_util::sync::CancellationToken;

/// Exit status after a second signal cut the drain short.
pub const FORCED_EXIT_CODE: i32 = 1;

/// SIGTERM and Ctrl-C (SIGINT), listened for from creation on, however often they come.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening; must run inside a tokio runtime. A signal that cannot be listened
    /// for is logged and keeps its default action (the process ends).
    pub fn new() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for {name}; it ends the process at once");
                    None
                }
            };
            Signals {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            Signals {}
        }
    }

    /// Resolves on the next SIGTERM or SIGINT received since creation or the last call.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        if s.recv().await.is_none() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.term) => {}
                _ = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves on the first SIGTERM or Ctrl-C; from then on, a second one exits the process
/// at once with [`FORCED_EXIT_CODE`] (see the module docs for why that loses nothing acked).
/// For binaries: it ends the process, so library code and in-process tests use a plain
/// future as the shutdown of [`crate::server::run`] instead.
pub async fn exit_on_second_signal(mut signals: Signals) {
    signals.recv().await;
    tokio::spawn(async move {
        signals.recv().await;
        tracing::warn!(
            "second signal: exiting now without finishing the drain; every acked message \
             is already on disk, undelivered ones are delivered after the restart"
        );
        std::process::exit(FORCED_EXIT_CODE);
    });
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT) received from the first poll on.
pub async fn signal() {
    Signals::new().recv().await;
}
