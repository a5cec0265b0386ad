//! The one place internal errors become gRPC statuses (CONTRACT.md section 2).

use tonic::Status;

use crate::store::CommitError;

/// A request rejected before anything was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// Malformed request; the message names the field and the limit.
    #[error("{0}")]
    Invalid(String),
    /// No connect-node is known yet.
    #[error("no connect-nodes known")]
    NoNodes,
    /// The manager is draining or stopping.
    #[error("shutting down")]
    ShuttingDown,
    /// The store could not make the message durable; it was not acked.
    #[error("store unavailable: {0}")]
    Store(String),
    /// `--disk-quota` or `--max-pending-per-node` would be passed; nothing was queued.
    #[error("{0}")]
    Exhausted(String),
    /// A required bearer token is missing or not accepted, or the admin API refuses the
    /// caller ([`crate::auth`]); the message says what to send.
    #[error("{0}")]
    Unauthenticated(String),
}

impl Rejected {
    /// A short code for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            Rejected::Invalid(_) => "invalid",
            Rejected::NoNodes => "no_nodes",
            Rejected::ShuttingDown => "shutting_down",
            Rejected::Store(_) => "store",
            Rejected::Exhausted(_) => "exhausted",
            Rejected::Unauthenticated(_) => "unauthenticated",
        }
    }
}

impl From<CommitError> for Rejected {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::NoNodes => Rejected::NoNodes,
            CommitError::ShuttingDown => Rejected::ShuttingDown,
            CommitError::Store(m) => Rejected::Store(m),
            CommitError::Exhausted(m) => Rejected::Exhausted(m),
        }
    }
}

impl From<Rejected> for Status {
    fn from(r: Rejected) -> Status {
        match r {
            Rejected::Invalid(m) => Status::invalid_argument(m),
            // CONTRACT: "disk quota reached: RESOURCE_EXHAUSTED, and nothing was queued".
            Rejected::Exhausted(m) => Status::resource_exhausted(m),
            Rejected::Unauthenticated(m) => Status::unauthenticated(m),
            other @ (Rejected::NoNodes | Rejected::ShuttingDown | Rejected::Store(_)) => {
                Status::unavailable(other.to_string())
            }
        }
    }
}
