//! The JSON-lines format a retired node's queue is archived in: one JSON object per line,
//! one line per entry, payload in base64, times as RFC 3339 UTC strings (with the exact
//! milliseconds alongside, so an import restores them exactly). It is meant to be the
//! format of `queue-dump export` as well, so that an archive can be inspected and imported
//! with the same tools.
//!
//! ```text
//! {"node_id":"a","queue":"live","seq":42,"msg_id":"order-1","attempts":0,
//!  "accepted_at":"2026-01-01T00:00:00.000Z","accepted_at_ms":1767225600000,"ttl_ms":0,
//!  "expires_at":null,"topic":"orders","headers":{},"payload_base64":"aGk=",
//!  "payload_bytes":2,"dead_reason":null,"dead_at":null,"dead_at_ms":null,"problem":null}
//! ```
//!
//! (shown wrapped; each object is one line). `queue` is `live` or `dead_letter`. When an
//! entry's message record could not be read, its message fields are empty and `problem`
//! says why: the entry is still listed, never silently left out.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::store::{DeadLetterRecord, MessageRecord};

/// `queue` of a live entry.
pub const LIVE: &str = "live";
/// `queue` of a dead letter.
pub const DEAD_LETTER: &str = "dead_letter";

/// One archived or exported queue entry. **Field names are a file format**: add fields,
/// never rename or remove them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportLine {
    /// The node whose queue held the entry.
    pub node_id: String,
    /// [`LIVE`] or [`DEAD_LETTER`].
    pub queue: String,
    /// The entry's sequence number on the manager that held it.
    pub seq: u64,
    /// The message's id (empty when the message could not be read).
    pub msg_id: String,
    /// Offers made to the node.
    pub attempts: u32,
    /// Acceptance time, RFC 3339 UTC.
    pub accepted_at: Option<String>,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub accepted_at_ms: Option<u64>,
    /// Time to live from acceptance; 0 = never expires.
    pub ttl_ms: u64,
    /// When the message stops being deliverable, RFC 3339 UTC; `None`: never.
    pub expires_at: Option<String>,
    /// The message's topic.
    pub topic: String,
    /// The message's headers.
    pub headers: BTreeMap<String, String>,
    /// The payload, standard base64 with padding.
    pub payload_base64: String,
    /// Payload size in bytes.
    pub payload_bytes: u64,
    /// Dead letters: the node's last answer (or the store error) that dead-lettered it.
    pub dead_reason: Option<String>,
    /// Dead letters: when, RFC 3339 UTC.
    pub dead_at: Option<String>,
    /// Dead letters: when, milliseconds since the Unix epoch.
    pub dead_at_ms: Option<u64>,
    /// Why the message fields are empty, when they are.
    pub problem: Option<String>,
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl ExportLine {
    fn base(node: &str, queue: &str, seq: u64, attempts: u32) -> Self {
        ExportLine {
            node_id: node.to_string(),
            queue: queue.to_string(),
            seq,
            msg_id: String::new(),
            attempts,
            accepted_at: None,
            accepted_at_ms: None,
            ttl_ms: 0,
            expires_at: None,
            topic: String::new(),
            headers: BTreeMap::new(),
            payload_base64: String::new(),
            payload_bytes: 0,
            dead_reason: None,
            dead_at: None,
            dead_at_ms: None,
            problem: None,
        }
    }

    fn with_message(mut self, msg: &MessageRecord) -> Self {
        self.msg_id = msg.msg_id.clone();
        self.accepted_at = Some(rfc3339_ms(msg.accepted_at_ms));
        self.accepted_at_ms = Some(msg.accepted_at_ms);
        self.ttl_ms = msg.ttl_ms;
        self.expires_at = msg.expires_at_ms().map(rfc3339_ms);
        self.topic = msg.topic.clone();
        self.headers = msg.headers.iter().cloned().collect();
        self.payload_base64 = base64::engine::general_purpose::STANDARD.encode(&msg.payload);
        self.payload_bytes = msg.payload.len() as u64;
        self
    }

    /// A live entry: its message, or (`Err`) why it could not be read.
    pub fn live(node: &str, seq: u64, attempts: u32, msg: Result<&MessageRecord, String>) -> Self {
        let line = Self::base(node, LIVE, seq, attempts);
        match msg {
            Ok(m) => line.with_message(m),
            Err(problem) => ExportLine {
                problem: Some(problem),
                ..line
            },
        }
    }

    /// A dead letter.
    pub fn dead_letter(node: &str, dead: &DeadLetterRecord) -> Self {
        let line = Self::base(node, DEAD_LETTER, dead.seq, dead.attempts);
        let line = match &dead.message {
            Some(m) => line.with_message(m),
            None => ExportLine {
                problem: Some("the message record was unreadable when it was dead-lettered".into()),
                ..line
            },
        };
        ExportLine {
            dead_reason: Some(dead.reason.clone()),
            dead_at: Some(rfc3339_ms(dead.dead_at_ms)),
            dead_at_ms: Some(dead.dead_at_ms),
            ..line
        }
    }

    /// The message back, for an import; `None` when the line has none (see `problem`) or
    /// its payload is not valid base64.
    pub fn message(&self) -> Option<MessageRecord> {
        if self.problem.is_some() {
            return None;
        }
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&self.payload_base64)
            .ok()?;
        Some(MessageRecord {
            msg_id: self.msg_id.clone(),
            topic: self.topic.clone(),
            headers: self.headers.clone().into_iter().collect(),
            payload,
            accepted_at_ms: self.accepted_at_ms?,
            ttl_ms: self.ttl_ms,
        })
    }

    /// The line as JSON, without the trailing newline.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings, numbers and a string map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> MessageRecord {
        MessageRecord {
            msg_id: "m-1".into(),
            topic: "t".into(),
            headers: vec![("a".into(), "1".into())],
            payload: b"hello".to_vec(),
            accepted_at_ms: 1_767_225_600_123,
            ttl_ms: 1000,
        }
    }

    #[test]
    fn live_lines_round_trip() {
        let line = ExportLine::live("n1", 7, 2, Ok(&msg()));
        let json = line.to_json();
        assert!(!json.contains('\n'));
        assert!(
            json.contains(r#""accepted_at":"2026-01-01T00:00:00.123Z""#),
            "{json}"
        );
        assert!(json.contains(r#""payload_base64":"aGVsbG8=""#), "{json}");
        assert!(
            json.contains(r#""expires_at":"2026-01-01T00:00:01.123Z""#),
            "{json}"
        );
        let back: ExportLine = serde_json::from_str(&json).unwrap();
        assert_eq!(back, line);
        assert_eq!(back.message(), Some(msg()));
    }

    #[test]
    fn dead_letters_and_problems_are_kept() {
        let dead = DeadLetterRecord {
            seq: 9,
            message: Some(msg()),
            attempts: 5,
            reason: "InvalidArgument: no".into(),
            dead_at_ms: 1_767_225_600_000,
        };
        let line = ExportLine::dead_letter("n1", &dead);
        assert_eq!(line.queue, DEAD_LETTER);
        assert_eq!(line.dead_reason.as_deref(), Some("InvalidArgument: no"));
        assert_eq!(line.message(), Some(msg()));

        let broken = ExportLine::live("n1", 3, 0, Err("m/3 is missing".into()));
        assert_eq!(broken.problem.as_deref(), Some("m/3 is missing"));
        assert_eq!(broken.message(), None);
    }
}
