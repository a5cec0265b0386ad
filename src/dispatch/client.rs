//! The manager's gRPC client toward one connect-node.

use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::channel::{Channel, EndOnLastFrame};
use crate::proto::push_server_client::PushServerClient;
use crate::proto::{BroadCastBatchReq, BroadCastReq};

/// Errors setting up delivery to a node.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The node's address is not a usable `host:port`.
    #[error("node address {addr:?} is not a valid host:port: {reason}")]
    BadAddress {
        /// The address as registered.
        addr: String,
        /// Why it was refused.
        reason: String,
    },
    /// The TLS configuration toward nodes was refused (checked at start, so only a file
    /// changed since could cause it).
    #[error("TLS toward nodes: {reason}")]
    Tls {
        /// tonic's reason.
        reason: String,
    },
}

impl DeliveryError {
    /// Whether the same settings may work later: never; a new registration or reload is
    /// needed.
    pub fn is_retryable(&self) -> bool {
        false
    }

    /// A short code for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            DeliveryError::BadAddress { .. } => "bad_address",
            DeliveryError::Tls { .. } => "tls",
        }
    }
}

/// A lazily connected client for one node; cheap to clone (one shared HTTP/2 connection).
#[derive(Clone)]
pub struct NodeClient {
    inner: PushServerClient<Channel>,
    timeout: Duration,
}

impl NodeClient {
    /// A client for `addr` (`host:port`); connects on first use, reconnects after failures.
    /// With `tls`, over TLS: the node's certificate is verified against its CA for the
    /// address's host, and the client certificate, if any, is presented (mTLS).
    pub fn connect(
        addr: &str,
        timeout: Duration,
        tls: Option<ClientTlsConfig>,
    ) -> Result<NodeClient, DeliveryError> {
        let bad = |reason: String| DeliveryError::BadAddress {
            addr: addr.to_string(),
            reason,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| DeliveryError::Tls {
                reason: crate::discovery::error_chain(&e),
            })?;
        }
        Ok(NodeClient {
            inner: PushServerClient::new(EndOnLastFrame::new(endpoint.connect_lazy())),
            timeout,
        })
    }

    /// One `Broadcast` call with the per-call deadline; the node's answer as a status.
    pub async fn broadcast(self, req: BroadCastReq) -> Result<(), tonic::Status> {
        let request = self.request(req);
        let mut inner = self.inner;
        // The outer timeout also bounds connection setup, which the deadline header does not.
        match tokio::time::timeout(self.timeout, inner.broadcast(request)).await {
            Ok(r) => r.map(drop),
            Err(_) => Err(Self::late()),
        }
    }

    /// One `BroadcastBatch` call with the per-call deadline. `Err` is the call's own failure
    /// (UNIMPLEMENTED from a node without the batch call, a transport error, ...), which
    /// holds for every item; `Ok` has each item's answer, in order. A node that answers a
    /// different number of items than it was sent gets INTERNAL for the items it left out
    /// (retried later) and its extra answers are ignored.
    pub async fn broadcast_batch(
        self,
        reqs: Vec<BroadCastReq>,
    ) -> Result<Vec<Result<(), tonic::Status>>, tonic::Status> {
        let sent = reqs.len();
        let request = self.request(BroadCastBatchReq { messages: reqs });
        let mut inner = self.inner;
        let reply = match tokio::time::timeout(self.timeout, inner.broadcast_batch(request)).await {
            Ok(r) => r?.into_inner(),
            Err(_) => return Err(Self::late()),
        };
        let answered = reply.results.len();
        let mut results: Vec<Result<(), tonic::Status>> = reply
            .results
            .into_iter()
            .take(sent)
            .map(|r| match r.code {
                0 => Ok(()),
                code => Err(tonic::Status::new(tonic::Code::from(code), r.error)),
            })
            .collect();
        results.resize_with(sent, || {
            Err(tonic::Status::internal(format!(
                "the node answered {answered} results for a batch of {sent}"
            )))
        });
        Ok(results)
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
    }

    fn late() -> tonic::Status {
        tonic::Status::deadline_exceeded("delivery deadline passed")
    }
}
