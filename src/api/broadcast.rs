//! `PushServer.Broadcast` and `BroadcastBatch` on the manager: validate, then hand to the
//! committer and answer once the message is durable.
//!
//! Order of checks (CONTRACT.md section 6): a malformed request is INVALID_ARGUMENT before
//! any other check; then shutting down, then no known nodes; then the commit.
//!
//! A batch is checked whole first (1 to [`MAX_BATCH`] items, at most
//! [`MAX_BATCH_BYTES`]: otherwise INVALID_ARGUMENT for the call), then item by item exactly
//! as `Broadcast` checks a request; the items that pass are committed in one round, under
//! one fsync ([`CommitHandle::accept_batch`]), and each item's result says what became of
//! it. A bad item fails alone.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::status::Rejected;
use crate::metrics::Metrics;
use crate::proto::push_server_server::PushServer;
use crate::proto::{
    BatchItemResult, BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq,
};
use crate::store::commit::MAX_BATCH;
use crate::store::{Accept, Accepted, CommitHandle, Store};

/// Longest `msg_id`, in bytes.
pub const MAX_MSG_ID_BYTES: usize = 128;
/// Largest `BroadcastBatch` request, encoded (CONTRACT.md section 2).
pub const MAX_BATCH_BYTES: usize = 16 << 20;

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
    Ok(Accept {
        msg_id: (!req.msg_id.is_empty()).then_some(req.msg_id),
        topic: req.topic,
        // A BTreeMap (build.rs): stored and delivered sorted by name, in a stable order.
        headers: req.headers.into_iter().collect(),
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

    /// Every check before the commit, in the contract's order.
    fn admit(&self, req: BroadCastReq) -> Result<Accept, Rejected> {
        let accept = validate(req, self.max_payload_bytes)?;
        if self.draining.is_cancelled() {
            return Err(Rejected::ShuttingDown);
        }
        if self.store.known_nodes().is_empty() {
            return Err(Rejected::NoNodes);
        }
        Ok(accept)
    }

    /// Counts and logs one answered item; the reply on success.
    fn answered(
        &self,
        arrived: Instant,
        result: Result<Accepted, Rejected>,
    ) -> Result<BroadCastReply, Rejected> {
        match result {
            Ok(a) => {
                self.metrics
                    .observe_ack_latency(arrived.elapsed().as_secs_f64());
                tracing::debug!(
                    msg_id = %a.msg_id,
                    node_count = a.node_count,
                    duplicate = a.duplicate,
                    "broadcast acked"
                );
                Ok(BroadCastReply {
                    msg_id: a.msg_id,
                    node_count: a.node_count,
                    duplicate: a.duplicate,
                })
            }
            Err(r) => {
                self.metrics.broadcast_rejected();
                tracing::debug!(reason = r.code(), error = %r, "broadcast rejected");
                Err(r)
            }
        }
    }
}

/// The whole-call limits of a `BroadcastBatch` (CONTRACT.md section 2).
fn check_batch(req: &BroadCastBatchReq) -> Result<(), Status> {
    let items = req.messages.len();
    if items == 0 || items > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "BroadcastBatch carries {items} messages; a call carries 1 to {MAX_BATCH}"
        )));
    }
    let bytes = prost::Message::encoded_len(req);
    if bytes > MAX_BATCH_BYTES {
        return Err(Status::invalid_argument(format!(
            "BroadcastBatch is {bytes} bytes; a call carries at most {MAX_BATCH_BYTES} bytes"
        )));
    }
    Ok(())
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
            let result = match self.admit(req) {
                Ok(accept) => self.commit.accept(accept).await.map_err(Rejected::from),
                Err(r) => Err(r),
            };
            let reply = self.answered(arrived, result)?;
            tracing::Span::current().record("msg_id", reply.msg_id.as_str());
            Ok::<_, Rejected>(Response::new(reply))
        }
        .instrument(span)
        .await
        .map_err(Status::from)
    }

    async fn broadcast_batch(
        &self,
        request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        check_batch(&req)?;
        // Per item: `None` = admitted (its accept is the next in `accepts`), or why not.
        let mut accepts = Vec::with_capacity(req.messages.len());
        let refused: Vec<Option<Rejected>> = req
            .messages
            .into_iter()
            .map(|m| match self.admit(m) {
                Ok(a) => {
                    accepts.push(a);
                    None
                }
                Err(r) => Some(r),
            })
            .collect();
        let mut committed = self.commit.accept_batch(accepts).await.into_iter();
        let results = refused
            .into_iter()
            .map(|refused| {
                let result = match refused {
                    None => committed
                        .next()
                        .unwrap_or(Err(crate::store::CommitError::ShuttingDown))
                        .map_err(Rejected::from),
                    Some(r) => Err(r),
                };
                match self.answered(arrived, result) {
                    Ok(reply) => BatchItemResult {
                        reply: Some(reply),
                        code: 0,
                        error: String::new(),
                    },
                    Err(r) => {
                        let status = Status::from(r);
                        BatchItemResult {
                            reply: None,
                            code: status.code() as i32,
                            error: status.message().to_string(),
                        }
                    }
                }
            })
            .collect();
        Ok(Response::new(BroadCastBatchReply { results }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(msg_id: &str, payload: usize) -> BroadCastReq {
        BroadCastReq {
            msg_id: msg_id.into(),
            payload: vec![7; payload].into(),
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
