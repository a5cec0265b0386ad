//! push-manager: a durable, queue-backed broadcast dispatcher.
//!
//! # The path of one message
//!
//! 1. **Accept** ([`api::broadcast`]): a business service calls `Broadcast`; the request is
//!    validated (INVALID_ARGUMENT before any other check).
//! 2. **Persist** ([`store::commit`]): the committer checks the msg_id against the dedupe
//!    entries, assigns a sequence number and writes one payload record plus one range
//!    record per known node for the whole commit round, in one atomic batch.
//! 3. **Commit**: the round is fsynced ([`store::Store::sync`]); only then is the caller
//!    answered OK, and the delivery workers are woken.
//! 4. **Deliver** ([`dispatch`]): one worker per node reads its queue in order and calls
//!    `Broadcast` on the node, with a window of sends in flight and exponential backoff.
//! 5. **Delete**: an entry is finished when the node answers OK (or is dead-lettered after
//!    `max_attempts` permanent refusals); a payload is reclaimed once no queue needs it,
//!    by the store's reclaimer thread, below a low-water mark the committer synced first.
//!
//! Membership comes from etcd ([`discovery`]: watch plus resync) merged with static
//! configuration ([`config`]); known nodes are persisted so a restart resumes every queue
//! at once, with or without etcd. [`shutdown`] describes the drain order; [`metrics`]
//! counts each step (queue depths exactly, per commit round and per finished entry).
//!
//! Operators see the queues through [`store::inspect`] (typed listing, replay, purge,
//! import, verify): offline with the `queue-dump` tool, on a running manager through the
//! admin API ([`api::admin`]) and its client ([`admin_client`]), both printed by [`report`].
//!
//! Security sits at the edges: [`tls`] (server, node, etcd and client TLS, certificates
//! reloaded in place) and [`auth`] (bearer tokens on Broadcast and the admin API, and the
//! admin API's loopback guard).

pub mod admin_client;
pub mod api;
pub mod auth;
pub mod channel;
pub mod client;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod dispatch;
pub mod harness;
pub mod malloc;
pub mod metrics;
pub mod report;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod tls;

/// Generated code for `proto/broadcast.proto` (package `broadcast`).
#[allow(clippy::unwrap_used)]
pub mod proto {
    tonic::include_proto!("broadcast");

    /// Generated code for `proto/admin.proto` (package `broadcast.admin`): the operator API.
    #[allow(clippy::unwrap_used)]
    pub mod admin {
        tonic::include_proto!("broadcast.admin");
    }

    /// Descriptors of every proto the build compiles, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("push_manager_descriptor");
}
