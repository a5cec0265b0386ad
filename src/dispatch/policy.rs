//! Delivery policy as pure functions: how a node's answer is classified, how long to back
//! off, and whether a message is still deliverable. No I/O and no clocks of their own, so
//! they are tested directly.

use std::time::Duration;

use backoff::ExponentialBackoff;
use tonic::Code;

use crate::store::MessageRecord;

/// What the manager does with a node's answer (CONTRACT.md section 2 and 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The node has it (OK, or ALREADY_EXISTS): the entry is finished.
    Delivered,
    /// A transient failure of the node or the network: retry with node-level backoff.
    Retry,
    /// The node refuses this message: count the attempt; dead-letter after `max_attempts`.
    Permanent,
    /// The node is misconfigured or refuses us as a whole (auth, unimplemented, ...):
    /// retried with node-level backoff and logged at warn, never dead-lettered.
    NodeProblem,
}

impl Outcome {
    /// The label used for `push_manager_deliveries_total{result}`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "ok",
            Outcome::Retry | Outcome::NodeProblem => "retry",
            Outcome::Permanent => "permanent",
        }
    }
}

/// Classifies a node's answer to `Broadcast`. Transport errors reach us as UNAVAILABLE or
/// UNKNOWN, and a timed-out call as DEADLINE_EXCEEDED or CANCELLED.
pub fn classify(code: Code) -> Outcome {
    match code {
        Code::Ok | Code::AlreadyExists => Outcome::Delivered,
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown => Outcome::Retry,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => Outcome::Permanent,
        Code::Unimplemented
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::NotFound
        | Code::Cancelled
        | Code::DataLoss => Outcome::NodeProblem,
    }
}

/// Exponential backoff: `initial`, ×2 per step, ±50% jitter, capped at `max`, never giving up.
pub fn backoff(initial: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBackoff {
        current_interval: initial,
        initial_interval: initial,
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_interval: max,
        max_elapsed_time: None,
        ..ExponentialBackoff::default()
    }
}

/// What a message's TTL allows at `now_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ttl {
    /// Never expires: nodes receive `ttl_ms = 0`.
    Forever,
    /// Still deliverable, with this many milliseconds left.
    Remaining(u64),
    /// Too late: drop it for this node.
    Expired,
}

/// The TTL a node should receive for `msg` at `now_ms` (TTL counts from acceptance).
pub fn ttl_at(msg: &MessageRecord, now_ms: u64) -> Ttl {
    match msg.expires_at_ms() {
        None => Ttl::Forever,
        Some(at) if at > now_ms => Ttl::Remaining(at - now_ms),
        Some(_) => Ttl::Expired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backoff::backoff::Backoff;

    #[test]
    fn contract_table() {
        for c in [Code::Ok, Code::AlreadyExists] {
            assert_eq!(classify(c), Outcome::Delivered);
        }
        for c in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
        ] {
            assert_eq!(classify(c), Outcome::Retry, "{c:?}");
        }
        for c in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
        ] {
            assert_eq!(classify(c), Outcome::Permanent, "{c:?}");
        }
        for c in [
            Code::Unimplemented,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::NotFound,
            Code::Cancelled,
            Code::DataLoss,
        ] {
            assert_eq!(classify(c), Outcome::NodeProblem, "{c:?}");
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(30);
        let mut b = backoff(initial, max);
        let mut nominal = initial.as_secs_f64();
        for _ in 0..20 {
            let d = b.next_backoff().expect("never gives up").as_secs_f64();
            let cap = nominal.min(max.as_secs_f64());
            assert!(
                d >= cap * 0.5 - 1e-9 && d <= cap * 1.5 + 1e-9,
                "{d} vs {cap}"
            );
            nominal *= 2.0;
        }
        b.reset();
        let d = b.next_backoff().expect("never gives up");
        assert!(d <= initial.mul_f64(1.5));
    }

    #[test]
    fn ttl_counts_from_acceptance() {
        let mut m = MessageRecord {
            msg_id: "a".into(),
            topic: String::new(),
            headers: vec![],
            payload: vec![1].into(),
            accepted_at_ms: 1_000,
            ttl_ms: 0,
        };
        assert_eq!(ttl_at(&m, 5_000_000), Ttl::Forever);
        m.ttl_ms = 500;
        assert_eq!(ttl_at(&m, 1_200), Ttl::Remaining(300));
        assert_eq!(ttl_at(&m, 1_500), Ttl::Expired);
    }
}
