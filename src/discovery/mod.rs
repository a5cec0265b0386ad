//! Membership: which connect-nodes exist and where to reach them, from etcd (read, then
//! watch, with a periodic resync as the safety net) merged with the static list; and this
//! manager's own registration in etcd.
//!
//! # Invariants
//!
//! 1. **What etcd says, or fails to say, never loses a queue.** A node that leaves etcd
//!    (deleted key, expired lease) is paused, not forgotten: its queue stays and keeps
//!    receiving broadcasts. Only after `offline_retention` without coming back is it
//!    retired, and then its queue is written to an archive file, fsynced, before any of it
//!    leaves the store ([`retire`]).
//! 2. **The store first, then the dispatcher.** A registration is persisted
//!    ([`crate::store::Store::upsert_node`]) before the node's worker is told; an absence
//!    is persisted (`o/<node>`) before the worker is paused. So a restart with etcd down
//!    resumes every known node at its last address, and the retention clock counts across
//!    restarts.
//! 3. **The watch is the mechanism, the resync the safety net.** The prefix is read once,
//!    then watched from the next revision; a new node is picked up as soon as its put
//!    arrives. Every [`DiscoveryOptions::resync_every`] the prefix is read again and applied as
//!    a whole, which repairs anything a watch could have missed. A snapshot or event
//!    older than what was already applied is ignored (revisions only move forward).
//! 4. **Static nodes are always known and never retired.** With etcd as well, the two
//!    sources are merged: a static node registered in etcd is delivered to at the
//!    registered address; when the registration goes away it falls back to its static
//!    address and stays online.
//! 5. **An outage is logged once.** When etcd stops answering, the manager logs one warning,
//!    keeps the last known membership (and keeps delivering), retries with exponential
//!    backoff, and logs once more when etcd answers again, resyncing from a fresh read.
//!    No node is retired while etcd is not answering: absence cannot be observed then.
//!
//! # Layout
//!
//! - [`value`]: registration values: a plain `host:port`, or etcd's naming JSON.
//! - [`membership`]: applies what the sources say to the store and the dispatcher.
//! - [`etcd`]: the etcd source: read, watch, resync, backoff; drives [`membership`].
//! - [`retire`]: archiving and removing a node after `offline_retention`.
//! - [`register`]: keeping one key on a lease (the manager, `connect-node-sim`).
//! - [`managers`]: resolving push-managers from etcd, for clients.

pub mod etcd;
pub mod managers;
pub mod membership;
pub mod register;
pub mod retire;
pub mod value;

use std::fmt;
use std::time::Duration;

pub use etcd::{Discovery, DiscoveryOptions};
pub use managers::{resolve_managers, ManagerEndpoint, MANAGER_PREFIX};
pub use register::Registration;
pub use value::ValueFormat;

use crate::store::StoreError;

/// The default etcd prefix connect-nodes register under (CONTRACT.md section 3).
pub const DEFAULT_NODE_PREFIX: &str = "/services/connect-node/";

/// Errors of discovery and registration. Each variant says when it happens.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The etcd settings cannot work: an empty endpoint list, a malformed URL, an
    /// `https://` endpoint (TLS to etcd is not built in yet). Needs an operator.
    #[error("invalid etcd settings: {0}")]
    Config(String),
    /// etcd did not answer: connection refused or reset, timeout, no leader. Retried.
    #[error("etcd is unreachable: {0}")]
    Unavailable(String),
    /// etcd refused the credentials or the user lacks a permission. Needs an operator.
    #[error("etcd refused access: {0}; check --etcd-user / --etcd-password and the user's role")]
    Auth(String),
    /// A watch started at a revision etcd has compacted away; resync from a fresh read.
    #[error("the etcd watch fell behind a compaction (compacted up to revision {0})")]
    Compacted(i64),
    /// A watch or lease keep-alive stream ended or was canceled by etcd. Retried.
    #[error("the etcd {what} stream ended: {reason}")]
    StreamEnded {
        /// `watch` or `keep-alive`.
        what: &'static str,
        /// What etcd or the transport said.
        reason: String,
    },
    /// A registration's lease is gone (it expired, or someone revoked it); re-register.
    #[error("etcd lease {0:#x} is gone (expired or revoked)")]
    LeaseLost(i64),
    /// A registration value that is neither `host:port` nor etcd naming JSON. Logged once
    /// per key and value, and ignored.
    #[error("registration {key} has an unusable value: {reason}")]
    BadValue {
        /// The etcd key.
        key: String,
        /// What is wrong with the value.
        reason: String,
    },
    /// etcd answered with an error not covered above.
    #[error("etcd error: {0}")]
    Etcd(String),
    /// The store failed while recording membership or retiring a node.
    #[error("store error while {what}: {source}")]
    Store {
        /// What discovery was doing.
        what: String,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// Writing a retired node's archive file failed (disk full, permissions).
    #[error("cannot write archive {path}: {source}")]
    Archive {
        /// The archive file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A background step panicked or was cancelled: a bug. The step is tried again later.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DiscoveryError {
    /// Whether trying again later may succeed without an operator changing anything.
    pub fn is_retryable(&self) -> bool {
        match self {
            DiscoveryError::Unavailable(_)
            | DiscoveryError::Compacted(_)
            | DiscoveryError::StreamEnded { .. }
            | DiscoveryError::LeaseLost(_)
            | DiscoveryError::Etcd(_)
            | DiscoveryError::Archive { .. }
            | DiscoveryError::Internal(_) => true,
            DiscoveryError::Store { source, .. } => source.is_retryable(),
            DiscoveryError::Config(_)
            | DiscoveryError::Auth(_)
            | DiscoveryError::BadValue { .. } => false,
        }
    }

    /// A short code for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            DiscoveryError::Config(_) => "config",
            DiscoveryError::Unavailable(_) => "unavailable",
            DiscoveryError::Auth(_) => "auth",
            DiscoveryError::Compacted(_) => "compacted",
            DiscoveryError::StreamEnded { .. } => "stream_ended",
            DiscoveryError::LeaseLost(_) => "lease_lost",
            DiscoveryError::BadValue { .. } => "bad_value",
            DiscoveryError::Etcd(_) => "etcd",
            DiscoveryError::Store { .. } => "store",
            DiscoveryError::Archive { .. } => "archive",
            DiscoveryError::Internal(_) => "internal",
        }
    }

    pub(crate) fn store(what: impl Into<String>, source: StoreError) -> Self {
        DiscoveryError::Store {
            what: what.into(),
            source,
        }
    }
}

impl From<etcd_client::Error> for DiscoveryError {
    fn from(e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match e {
            E::InvalidArgs(m) | E::EndpointError(m) => DiscoveryError::Config(m),
            E::InvalidUri(u) => DiscoveryError::Config(format!("invalid endpoint URL: {u}")),
            E::IoError(io) => DiscoveryError::Unavailable(io.to_string()),
            E::TransportError(t) => DiscoveryError::Unavailable(transport_reason(&t)),
            E::GRpcStatus(s) => from_status(&s),
            E::WatchError(m) => DiscoveryError::StreamEnded {
                what: "watch",
                reason: m,
            },
            E::LeaseKeepAliveError(m) => DiscoveryError::StreamEnded {
                what: "keep-alive",
                reason: m,
            },
            other => DiscoveryError::Etcd(other.to_string()),
        }
    }
}

/// An error with its causes, joined by `: `; for errors whose useful part is in a source.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    transport_reason(e)
}

/// A transport error with its causes, which is where tonic puts the useful part
/// ("connection refused").
fn transport_reason(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn from_status(s: &tonic::Status) -> DiscoveryError {
    use tonic::Code;
    let what = format!("{:?}: {}", s.code(), s.message());
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => DiscoveryError::Auth(what),
        // etcd's auth errors come as FAILED_PRECONDITION or INVALID_ARGUMENT with these
        // messages (rpctypes.ErrGRPCAuthFailed, ErrGRPCUserEmpty, ErrGRPCInvalidAuthToken).
        _ if s.message().contains("authentication failed")
            || s.message().contains("user name is empty")
            || s.message().contains("invalid auth token")
            || s.message().contains("permission denied") =>
        {
            DiscoveryError::Auth(what)
        }
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal
        | Code::ResourceExhausted
        | Code::Aborted => DiscoveryError::Unavailable(what),
        _ => DiscoveryError::Etcd(what),
    }
}

/// Modification time and size of each TLS file of an [`EtcdSettings`] (see
/// [`EtcdSettings::tls_stamps`]).
pub type TlsStamps = Vec<Option<(std::time::SystemTime, u64)>>;

/// How to reach etcd: endpoints, credentials and TLS. With `tls`, endpoints are `https://`
/// (or bare `host:port`) and the TLS files are read each time a client is made. Discovery
/// and registration keep their client while it works (its channel reconnects by itself,
/// with the files it was made with); when a call fails and they reconnect, they make a new
/// client if the files changed since ([`EtcdSettings::tls_stamps`]), so renewed
/// certificates are used from the next reconnection on.
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Endpoints, `http://host:port` or `host:port`; calls are balanced over them.
    pub endpoints: Vec<String>,
    /// User for etcd's authentication, with `password`; `None`: no authentication.
    pub user: Option<String>,
    /// Password of `user`.
    pub password: Option<String>,
    /// Bound of every unary call (reads, puts, lease grants) and of opening a stream.
    pub request_timeout: Duration,
    /// Bound of establishing a connection to one endpoint.
    pub connect_timeout: Duration,
    /// TLS toward etcd (a CA, and a client certificate for mTLS); `None`: plaintext.
    pub tls: Option<crate::tls::ClientTlsFiles>,
}

impl fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .finish()
    }
}

impl EtcdSettings {
    /// Settings for `endpoints`, without authentication, with 5 s call and 3 s connect
    /// bounds.
    pub fn new(endpoints: Vec<String>) -> Self {
        EtcdSettings {
            endpoints,
            user: None,
            password: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            tls: None,
        }
    }

    /// The TLS files' modification times and sizes (empty without TLS), to tell whether a
    /// client made earlier used the current files.
    pub fn tls_stamps(&self) -> TlsStamps {
        self.tls
            .as_ref()
            .map(|t| crate::tls::file_stamps(&t.paths()))
            .unwrap_or_default()
    }

    /// The same settings, over TLS.
    pub fn with_tls(mut self, tls: Option<crate::tls::ClientTlsFiles>) -> Self {
        self.tls = tls;
        self
    }

    /// The same settings, authenticating as `user` with `password`.
    pub fn with_user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self.password = Some(password.into());
        self
    }

    /// The endpoints joined for messages.
    pub fn describe(&self) -> String {
        self.endpoints.join(",")
    }

    /// A client. Without authentication this does not contact etcd (connections are made
    /// on first use, and remade after failures); with it, it fetches a token, so an
    /// unreachable etcd is [`DiscoveryError::Unavailable`] and bad credentials
    /// [`DiscoveryError::Auth`].
    pub async fn connect(&self) -> Result<etcd_client::Client, DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::Config("no etcd endpoint given".into()));
        }
        if self.tls.is_none() {
            if let Some(e) = self.endpoints.iter().find(|e| e.starts_with("https://")) {
                return Err(DiscoveryError::Config(format!(
                    "{e}: an https:// etcd endpoint needs TLS settings: give --etcd-tls-ca"
                )));
            }
        }
        let mut options = etcd_client::ConnectOptions::new()
            .with_timeout(self.request_timeout)
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings notice a dead connection under a long-lived watch.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                options = options
                    .with_user(user.clone(), password.clone())
                    .with_auto_token_refresh(true);
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(DiscoveryError::Config(
                    "an etcd user needs a password and a password needs a user".into(),
                ))
            }
            (None, None) => {}
        }
        if let Some(tls) = &self.tls {
            let config = tls
                .build()
                .map_err(|e| DiscoveryError::Config(e.to_string()))?;
            options = options.with_tls(config);
        }
        let connect = etcd_client::Client::connect(&self.endpoints, Some(options));
        // Bounded: with credentials, connect() makes a call, which must not hang on an
        // etcd that accepts connections but does not answer.
        match tokio::time::timeout(self.request_timeout + self.connect_timeout, connect).await {
            Ok(r) => r.map_err(DiscoveryError::from),
            Err(_) => Err(DiscoveryError::Unavailable(format!(
                "no answer from {} within {:?}",
                self.describe(),
                self.request_timeout + self.connect_timeout
            ))),
        }
    }
}

/// The exponential backoff of etcd retries: 100 ms, doubling, ±50% jitter, capped at
/// `max`, never giving up.
pub(crate) fn retry_backoff(max: Duration) -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        current_interval: Duration::from_millis(100),
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_interval: max,
        max_elapsed_time: None,
        ..backoff::ExponentialBackoff::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_classify_themselves() {
        let unavailable = DiscoveryError::from(etcd_client::Error::GRpcStatus(
            tonic::Status::unavailable("etcdserver: no leader"),
        ));
        assert_eq!(unavailable.code(), "unavailable");
        assert!(unavailable.is_retryable());

        let auth = DiscoveryError::from(etcd_client::Error::GRpcStatus(
            tonic::Status::invalid_argument(
                "etcdserver: authentication failed, invalid user ID or password",
            ),
        ));
        assert_eq!(auth.code(), "auth");
        assert!(!auth.is_retryable());
        assert!(auth.to_string().contains("--etcd-password"), "{auth}");

        let config = DiscoveryError::from(etcd_client::Error::InvalidArgs("x".into()));
        assert!(!config.is_retryable());
        assert!(DiscoveryError::Compacted(7).is_retryable());
        assert!(DiscoveryError::LeaseLost(1).is_retryable());
    }

    #[test]
    fn settings_hide_the_password() {
        let s = EtcdSettings::new(vec!["http://127.0.0.1:2379".into()]).with_user("u", "secret");
        let shown = format!("{s:?}");
        assert!(
            !shown.contains("secret") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn bad_settings_are_config_errors() {
        let e = EtcdSettings::new(vec![]).connect().await.err();
        assert!(matches!(e, Some(DiscoveryError::Config(_))), "{e:?}");
        let e = EtcdSettings::new(vec!["https://127.0.0.1:2379".into()])
            .connect()
            .await
            .err();
        assert!(matches!(e, Some(DiscoveryError::Config(m)) if m.contains("--etcd-tls-ca")));
        let mut s = EtcdSettings::new(vec!["http://127.0.0.1:1".into()]);
        s.user = Some("u".into());
        let e = s.connect().await.err();
        assert!(matches!(e, Some(DiscoveryError::Config(_))), "{e:?}");
    }
}
