//! `PushServer.Broadcast` on the manager: validate, then hand to the committer and answer
//! once the message is durable.
//!
//! Order of checks (CONTRACT.md section 6): a malformed request is INVALID_ARGUMENT before
//! any other check; then shutting down, then no known nodes; then the commit.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::status::Rejected;
use crate::metrics::Metrics;
use crate::proto::push_server_server::PushServer;
use crate::proto::{BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq};
use crate::store::{Accept, CommitHandle, Store};

/// Longest `msg_id`, in bytes.
pub const MAX_MSG_ID_BYTES: usize = 128;

/// Checks a request against the contract's limits and turns it into an [`Accept`].
/// The fields a manager fills in on delivery (`manager_id`, `seq`, `attempt`) are ignored.
pub fn validate(req: BroadCastReq, max_payload_bytes: u64) -> Result<Accept, Rejected> {
    let len = req.msg_id.len();
    if len > MAX_MSG_ID_BYTES {
        return Err(Rejected::Invalid(format!(
            "msg_id is {len} bytes; max is {MAX_MSG_ID_BYTES} bytes"
        )));
    }
    if let Some((at, b)) = req
        .msg_id
        .bytes()
        .enumerate()
        .find(|(_, b)| !(0x21..=0x7e).contains(b))
    {
        return Err(Rejected::Invalid(format!(
            "msg_id has byte {b:#04x} at offset {at}; msg_id must be 1 to \
             {MAX_MSG_ID_BYTES} bytes of visible ASCII (0x21-0x7E)"
        )));
    }
    let size = req.payload.len() as u64;
    if size == 0 {
        return Err(Rejected::Invalid(format!(
            "payload is empty; it must be 1 to {max_payload_bytes} bytes (max_payload_bytes)"
        )));
    }
    if size > max_payload_bytes {
        return Err(Rejected::Invalid(format!(
            "payload is {size} bytes; max_payload_bytes is {max_payload_bytes}"
        )));
    }
    // Sorted, so a message's headers are stored and delivered in a stable order.
    let headers: BTreeMap<String, String> = req.headers.into_iter().collect();
    Ok(Accept {
        msg_id: (!req.msg_id.is_empty()).then_some(req.msg_id),
        topic: req.topic,
        headers: headers.into_iter().collect(),
        payload: req.payload,
        ttl_ms: req.ttl_ms,
    })
}

/// The manager's `PushServer` service.
pub struct BroadcastService {
    commit: CommitHandle,
    store: Store,
    max_payload_bytes: u64,
    draining: CancellationToken,
    metrics: Arc<Metrics>,
}

impl BroadcastService {
    /// A service committing through `commit`; answers UNAVAILABLE once `draining` fires.
    pub fn new(
        commit: CommitHandle,
        store: Store,
        max_payload_bytes: u64,
        draining: CancellationToken,
    ) -> Self {
        BroadcastService {
            commit,
            store,
            max_payload_bytes,
            draining,
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Reports rejections and ack latency to `metrics` (by default, to a registry of the
    /// service's own). Accepted and duplicate counts come from the committer, which alone
    /// knows them even when a caller goes away before its answer.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    async fn accept(&self, req: BroadCastReq) -> Result<BroadCastReply, Rejected> {
        let accept = validate(req, self.max_payload_bytes)?;
        if self.draining.is_cancelled() {
            return Err(Rejected::ShuttingDown);
        }
        if self.store.known_nodes().is_empty() {
            return Err(Rejected::NoNodes);
        }
        let a = self.commit.accept(accept).await?;
        Ok(BroadCastReply {
            msg_id: a.msg_id,
            node_count: a.node_count,
            duplicate: a.duplicate,
        })
    }
}

#[tonic::async_trait]
impl PushServer for BroadcastService {
    async fn broadcast(
        &self,
        request: Request<BroadCastReq>,
    ) -> Result<Response<BroadCastReply>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        // The span carries the caller's msg_id (only a well-formed one: logs get no control
        // bytes or megabytes from a bad request), or the assigned one once it is known.
        let span = tracing::info_span!("broadcast", msg_id = tracing::field::Empty);
        let id = req.msg_id.as_bytes();
        if !id.is_empty()
            && id.len() <= MAX_MSG_ID_BYTES
            && id.iter().all(|b| (0x21..=0x7e).contains(b))
        {
            span.record("msg_id", req.msg_id.as_str());
        }
        async {
            match self.accept(req).await {
                Ok(reply) => {
                    self.metrics
                        .observe_ack_latency(arrived.elapsed().as_secs_f64());
                    tracing::Span::current().record("msg_id", reply.msg_id.as_str());
                    tracing::debug!(
                        node_count = reply.node_count,
                        duplicate = reply.duplicate,
                        "broadcast acked"
                    );
                    Ok(Response::new(reply))
                }
                Err(r) => {
                    self.metrics.broadcast_rejected();
                    tracing::debug!(reason = r.code(), error = %r, "broadcast rejected");
                    Err(r.into())
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn broadcast_batch(
        &self,
        _request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        Err(Status::unimplemented(
            "BroadcastBatch is not available yet on this manager; use Broadcast",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(msg_id: &str, payload: usize) -> BroadCastReq {
        BroadCastReq {
            msg_id: msg_id.into(),
            payload: vec![7; payload],
            ..Default::default()
        }
    }

    fn invalid(r: Result<Accept, Rejected>) -> String {
        match r {
            Err(Rejected::Invalid(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn limits_are_inclusive_and_named() {
        let max = 1_048_576;
        assert!(validate(req("", max as usize), max).is_ok());
        assert_eq!(
            invalid(validate(req("", max as usize + 1), max)),
            "payload is 1048577 bytes; max_payload_bytes is 1048576"
        );
        assert!(invalid(validate(req("a", 0), max)).contains("payload is empty"));
        assert!(validate(req(&"x".repeat(128), 1), max).is_ok());
        assert!(invalid(validate(req(&"x".repeat(129), 1), max)).contains("msg_id is 129 bytes"));
        assert!(invalid(validate(req("a b", 1), max)).contains("msg_id has byte 0x20"));
        assert!(invalid(validate(req("é", 1), max)).contains("msg_id"));
        assert!(validate(req("!~", 1), max).is_ok());
        assert_eq!(validate(req("", 1), max).map(|a| a.msg_id), Ok(None));
    }
}
