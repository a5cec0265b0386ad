//! What operators see: one set of tables and JSON shared by `queue-dump` (a stopped
//! manager's store) and `push-manager admin` (a running manager, through the admin API).
//!
//! Both tools turn what they read into the admin API's messages ([`NodeInfo`], [`Entry`],
//! the replay and purge replies) with the conversions here, and print those with the
//! renderers here, so a node or an entry looks the same whichever way it was read.
//!
//! Output rules: human tables by default; with `--json`, one JSON object (or one object
//! per line for entry listings), times as RFC 3339 UTC strings, absent values `null`.
//! A closed stdout (`queue-dump ... | head`) is not an error: see [`is_broken_pipe`].
//!
//! Also here: the command-line arguments both tools share ([`ListArgs`], [`ReplayArgs`],
//! [`PurgeArgs`], [`FilterArgs`]) and the export format ([`ExportRecord`], JSON lines with
//! the payload in base64).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::dispatch::NodeStatus;
use crate::proto::admin::{self as pb, Entry, NodeInfo};
use crate::store::inspect::AGE_BUCKETS;
use crate::store::{
    Filter, ImportItem, MessageRecord, NodeRecord, NodeSummary, QueueEntry, QueueKind,
    ReplayOutcome,
};

/// Bytes of payload carried in an [`Entry`] for its preview.
pub const PAYLOAD_HEAD: usize = 64;
/// Most entries a reply lists; the count says how many there were in all.
pub const MAX_LISTED: usize = 1000;
/// Characters of payload shown in a table's preview column.
const PREVIEW_CHARS: usize = 32;

/// Whether an output error only means the reader went away (`| head`): not an error.
pub fn is_broken_pipe(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::BrokenPipe
}

// ----- shared arguments -----

/// The filters of `list` and the bulk commands, honoured exactly: every one given must
/// hold, and an entry whose message cannot be read matches none of them.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only entries accepted at least this long ago, like 90s, 10m or 2h
    #[arg(long, value_name = "DURATION", value_parser = crate::config::parse_duration)]
    pub older_than: Option<Duration>,
    /// Only entries whose topic is exactly TOPIC
    #[arg(long, value_name = "TOPIC")]
    pub topic: Option<String>,
    /// Only entries whose msg_id is exactly MSG_ID
    #[arg(long = "msg", value_name = "MSG_ID")]
    pub msg: Option<String>,
}

impl FilterArgs {
    /// The store filter, starting at `from_seq`.
    pub fn filter(&self, from_seq: Option<u64>) -> Filter {
        Filter {
            from_seq,
            older_than: self.older_than,
            topic: self.topic.clone(),
            msg_id: self.msg.clone(),
        }
    }
}

/// `list` (queue-dump) and `peek` (admin): one node's entries in queue order.
#[derive(clap::Args, Debug, Clone)]
pub struct ListArgs {
    /// The node whose queue to show
    #[arg(long, value_name = "ID")]
    pub node: String,
    /// Show the dead letters instead of the live queue
    #[arg(long)]
    pub dead_letter: bool,
    /// Show at most N entries
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub limit: usize,
    /// Start at sequence SEQ
    #[arg(long, value_name = "SEQ")]
    pub from: Option<u64>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `replay`: move dead letters back into the live queue.
#[derive(clap::Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["msg", "all"])))]
pub struct ReplayArgs {
    /// The node whose dead letters to replay
    #[arg(long, value_name = "ID")]
    pub node: String,
    /// Replay every dead letter of the node that matches the other filters
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Print what would be replayed, change nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// `purge`: drop entries, printing what was dropped.
#[derive(clap::Args, Debug, Clone)]
pub struct PurgeArgs {
    /// The node whose entries to drop
    #[arg(long, value_name = "ID")]
    pub node: String,
    /// Drop dead letters instead of live entries
    #[arg(long)]
    pub dead_letter: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Confirm: the entries are gone for good (required unless --dry-run)
    #[arg(long, required_unless_present = "dry_run")]
    pub yes: bool,
    /// Print what would be dropped, change nothing
    #[arg(long)]
    pub dry_run: bool,
}

// ----- conversions to the admin API's messages -----

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// The admin API's filter for a store filter.
pub fn filter_to_proto(f: &Filter) -> pb::Filter {
    pb::Filter {
        from_seq: f.from_seq.unwrap_or(0),
        older_than_ms: f.older_than.map_or(0, |d| d.as_millis() as u64),
        topic: f.topic.clone(),
        msg_id: f.msg_id.clone(),
    }
}

/// The store filter for the admin API's (absent = everything).
pub fn filter_from_proto(f: Option<pb::Filter>) -> Filter {
    let f = f.unwrap_or_default();
    Filter {
        from_seq: (f.from_seq > 0).then_some(f.from_seq),
        older_than: (f.older_than_ms > 0).then(|| Duration::from_millis(f.older_than_ms)),
        topic: f.topic,
        msg_id: f.msg_id,
    }
}

/// A node as the admin API reports it. `status` is the running worker's (absent for a
/// stopped store, where the state is `held` or empty).
pub fn node_info(
    id: &str,
    rec: &NodeRecord,
    s: &NodeSummary,
    status: Option<&NodeStatus>,
    now_ms: u64,
) -> NodeInfo {
    let state = match status {
        Some(st) => st.state.label(),
        None if rec.held => "held",
        None => "",
    };
    let address = status
        .map(|st| st.addr.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| rec.addr.clone());
    NodeInfo {
        node_id: id.to_string(),
        state: state.to_string(),
        address,
        pending: s.pending,
        dead_letter: s.dead_letter,
        oldest_age_ms: s
            .oldest_accepted_at_ms
            .map_or(0, |t| now_ms.saturating_sub(t)),
        oldest_accepted_at: s.oldest_accepted_at_ms.map(rfc3339).unwrap_or_default(),
        backoff_until: status
            .and_then(|st| st.backoff_until)
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_default(),
        last_error: status
            .and_then(|st| st.last_error.clone())
            .unwrap_or_default(),
        held: rec.held,
        is_static: rec.is_static,
        bytes: s.bytes,
        ages: s.ages.map(|a| a.to_vec()).unwrap_or_default(),
    }
}

/// An entry as the admin API reports it.
pub fn entry(e: &QueueEntry) -> Entry {
    let m = e.message.as_ref();
    Entry {
        node_id: e.node.clone(),
        queue: e.kind.label().to_string(),
        seq: e.seq,
        msg_id: m.map(|m| m.msg_id.clone()).unwrap_or_default(),
        topic: m.map(|m| m.topic.clone()).unwrap_or_default(),
        attempts: e.attempts,
        accepted_at: m.map(|m| rfc3339(m.accepted_at_ms)).unwrap_or_default(),
        expires_at: m
            .and_then(MessageRecord::expires_at_ms)
            .map(rfc3339)
            .unwrap_or_default(),
        payload_bytes: m.map_or(0, |m| m.payload.len() as u64),
        payload_head: m
            .map(|m| m.payload[..m.payload.len().min(PAYLOAD_HEAD)].to_vec())
            .unwrap_or_default(),
        headers: m
            .map(|m| m.headers.iter().cloned().collect())
            .unwrap_or_default(),
        problem: e.problem.clone().unwrap_or_default(),
        dead_reason: e.dead_reason.clone().unwrap_or_default(),
        dead_at: e.dead_at_ms.map(rfc3339).unwrap_or_default(),
    }
}

/// The admin API's replay reply for a store outcome.
pub fn replay_reply(out: &ReplayOutcome, dry_run: bool) -> pb::ReplayDeadLettersReply {
    pb::ReplayDeadLettersReply {
        replayed: out
            .replayed
            .iter()
            .take(MAX_LISTED)
            .map(|(e, new_seq)| pb::Replayed {
                entry: Some(entry(e)),
                new_seq: if dry_run { 0 } else { *new_seq },
            })
            .collect(),
        skipped: out
            .skipped
            .iter()
            .take(MAX_LISTED)
            .map(|(e, reason)| pb::Skipped {
                entry: Some(entry(e)),
                reason: reason.clone(),
            })
            .collect(),
        replayed_count: out.replayed.len() as u64,
        dry_run,
    }
}

/// The admin API's purge reply for the entries purged.
pub fn purge_reply(purged: &[QueueEntry], dry_run: bool) -> pb::PurgeQueueReply {
    pb::PurgeQueueReply {
        purged: purged.iter().take(MAX_LISTED).map(entry).collect(),
        purged_count: purged.len() as u64,
        dry_run,
    }
}

// ----- formatting helpers -----

/// `ms` as a short age: `42s`, `12m05s`, `3h07m`, `2d04h`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A short, one-line view of a payload: printable text quoted, anything else as hex.
pub fn preview(head: &[u8], total: u64) -> String {
    let more = total > head.len() as u64;
    let text = std::str::from_utf8(head)
        .ok()
        .filter(|t| t.chars().all(|c| c == ' ' || c.is_ascii_graphic()));
    match text {
        Some(t) => {
            let shown: String = t.chars().take(PREVIEW_CHARS).collect();
            let cut = more || shown.len() < t.len();
            format!("\"{shown}\"{}", if cut { "..." } else { "" })
        }
        None => {
            let hex: String = head.iter().take(12).map(|b| format!("{b:02x}")).collect();
            let cut = more || head.len() > 12;
            format!("hex:{hex}{}", if cut { "..." } else { "" })
        }
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// Writes `rows` under `headers`, columns padded to their widest cell; columns whose
/// header is in `right` are right-aligned; the last column is never padded.
pub fn table(
    w: &mut dyn Write,
    headers: &[&str],
    right: &[&str],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(wd) = widths.get_mut(i) {
                *wd = (*wd).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            let is_right = right.contains(&headers[i]);
            if i > 0 {
                out.push_str("  ");
            }
            if is_right {
                out.push_str(&" ".repeat(pad));
            }
            out.push_str(cell);
            if !is_right && i < last {
                out.push_str(&" ".repeat(pad));
            }
        }
        out
    };
    writeln!(w, "{}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(w, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// One JSON value on one line.
pub fn write_json(w: &mut dyn Write, v: &Value) -> io::Result<()> {
    serde_json::to_writer(&mut *w, v).map_err(io::Error::other)?;
    writeln!(w)
}

// ----- nodes -----

/// A node as JSON: at least `node_id`, `pending`, `dead_letter` (CONTRACT.md section 4).
pub fn node_json(n: &NodeInfo) -> Value {
    let mut v = json!({
        "node_id": n.node_id,
        "state": opt_str(&n.state),
        "address": opt_str(&n.address),
        "held": n.held,
        "static": n.is_static,
        "pending": n.pending,
        "dead_letter": n.dead_letter,
        "oldest_age_seconds": if n.oldest_accepted_at.is_empty() {
            Value::Null
        } else {
            json!(n.oldest_age_ms as f64 / 1000.0)
        },
        "oldest_accepted_at": opt_str(&n.oldest_accepted_at),
        "backoff_until": opt_str(&n.backoff_until),
        "last_error": opt_str(&n.last_error),
    });
    if let Some(b) = n.bytes {
        v["bytes"] = json!(b);
    }
    if !n.ages.is_empty() {
        let ages: serde_json::Map<String, Value> = AGE_BUCKETS
            .iter()
            .zip(&n.ages)
            .map(|((label, _), count)| (label.to_string(), json!(count)))
            .collect();
        v["ages"] = Value::Object(ages);
    }
    v
}

/// The nodes as a table; with `ages`, the node × age-bucket matrix follows.
pub fn nodes_table(w: &mut dyn Write, nodes: &[NodeInfo], ages: bool) -> io::Result<()> {
    let with_bytes = nodes.iter().any(|n| n.bytes.is_some());
    let mut headers = vec!["NODE", "STATE", "ADDRESS", "PENDING", "DEAD", "OLDEST"];
    if with_bytes {
        headers.push("BYTES");
    }
    headers.extend(["BACKOFF_UNTIL", "LAST_ERROR"]);
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let mut row = vec![
                n.node_id.clone(),
                or_dash(&n.state),
                or_dash(&n.address),
                n.pending.to_string(),
                n.dead_letter.to_string(),
                if n.oldest_accepted_at.is_empty() {
                    "-".to_string()
                } else {
                    age(n.oldest_age_ms)
                },
            ];
            if with_bytes {
                row.push(n.bytes.map_or("-".to_string(), |b| b.to_string()));
            }
            row.push(or_dash(&n.backoff_until));
            row.push(or_dash(&n.last_error));
            row
        })
        .collect();
    table(w, &headers, &["PENDING", "DEAD", "OLDEST", "BYTES"], &rows)?;
    if ages {
        writeln!(w)?;
        writeln!(w, "live entries by age:")?;
        let mut headers = vec!["NODE"];
        headers.extend(AGE_BUCKETS.iter().map(|(label, _)| match *label {
            "older" => ">1d",
            l => l,
        }));
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                let mut row = vec![n.node_id.clone()];
                row.extend(
                    (0..AGE_BUCKETS.len())
                        .map(|i| n.ages.get(i).map_or("-".to_string(), |c| c.to_string())),
                );
                row
            })
            .collect();
        let right: Vec<&str> = headers[1..].to_vec();
        table(w, &headers, &right, &rows)?;
    }
    Ok(())
}

// ----- entries -----

/// An entry as one JSON object: at least `msg_id`, `attempts`, `accepted_at`
/// (CONTRACT.md section 4).
pub fn entry_json(e: &Entry) -> Value {
    let mut v = json!({
        "node_id": e.node_id,
        "queue": e.queue,
        "seq": e.seq,
        "msg_id": opt_str(&e.msg_id),
        "topic": e.topic,
        "attempts": e.attempts,
        "accepted_at": opt_str(&e.accepted_at),
        "expires_at": opt_str(&e.expires_at),
        "payload_bytes": e.payload_bytes,
        "preview": preview(&e.payload_head, e.payload_bytes),
        "headers": e.headers.iter().collect::<BTreeMap<_, _>>(),
    });
    if !e.problem.is_empty() {
        v["problem"] = json!(e.problem);
    }
    if e.queue == QueueKind::DeadLetter.label() {
        v["dead_reason"] = opt_str(&e.dead_reason);
        v["dead_at"] = opt_str(&e.dead_at);
    }
    v
}

/// Entries as a table (dead letters get their reason).
pub fn entries_table(w: &mut dyn Write, entries: &[Entry]) -> io::Result<()> {
    let dead = entries
        .iter()
        .any(|e| e.queue == QueueKind::DeadLetter.label());
    let mut headers = vec![
        "SEQ",
        "MSG_ID",
        "ATTEMPTS",
        "ACCEPTED_AT",
        "EXPIRES_AT",
        "SIZE",
        "PREVIEW",
    ];
    if dead {
        headers.push("DEAD_REASON");
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let mut row = vec![
                e.seq.to_string(),
                or_dash(&e.msg_id),
                e.attempts.to_string(),
                or_dash(&e.accepted_at),
                if e.accepted_at.is_empty() {
                    "-".to_string()
                } else if e.expires_at.is_empty() {
                    "never".to_string()
                } else {
                    e.expires_at.clone()
                },
                e.payload_bytes.to_string(),
                if e.problem.is_empty() {
                    preview(&e.payload_head, e.payload_bytes)
                } else {
                    format!("UNREADABLE: {}", e.problem)
                },
            ];
            if dead {
                row.push(or_dash(&e.dead_reason));
            }
            row
        })
        .collect();
    table(w, &headers, &["SEQ", "ATTEMPTS", "SIZE"], &rows)
}

/// Entries: a table, or with `json` one object per line.
pub fn entries(w: &mut dyn Write, entries: &[Entry], json: bool) -> io::Result<()> {
    if json {
        for e in entries {
            write_json(w, &entry_json(e))?;
        }
        Ok(())
    } else if entries.is_empty() {
        writeln!(w, "(no entries)")
    } else {
        entries_table(w, entries)
    }
}

// ----- bulk operations -----

/// A replay's result: a summary line and the entries, or one JSON object.
pub fn replay(
    w: &mut dyn Write,
    node: &str,
    r: &pb::ReplayDeadLettersReply,
    json: bool,
) -> io::Result<()> {
    if json {
        let v = json!({
            "node_id": node,
            "dry_run": r.dry_run,
            "replayed_count": r.replayed_count,
            "replayed": r.replayed.iter().map(|x| {
                let mut v = x.entry.as_ref().map(entry_json).unwrap_or(Value::Null);
                if !r.dry_run && v.is_object() {
                    v["new_seq"] = json!(x.new_seq);
                }
                v
            }).collect::<Vec<_>>(),
            "skipped": r.skipped.iter().map(|x| {
                let mut v = x.entry.as_ref().map(entry_json).unwrap_or(Value::Null);
                if v.is_object() {
                    v["skip_reason"] = json!(x.reason);
                }
                v
            }).collect::<Vec<_>>(),
        });
        return write_json(w, &v);
    }
    let verb = if r.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    writeln!(
        w,
        "{verb} {} dead letter{} of node {node} into its live queue",
        r.replayed_count,
        if r.replayed_count == 1 { "" } else { "s" }
    )?;
    if !r.replayed.is_empty() {
        let rows: Vec<Vec<String>> = r
            .replayed
            .iter()
            .filter_map(|x| {
                let e = x.entry.as_ref()?;
                Some(vec![
                    e.seq.to_string(),
                    if r.dry_run {
                        "-".to_string()
                    } else {
                        x.new_seq.to_string()
                    },
                    or_dash(&e.msg_id),
                    e.attempts.to_string(),
                    or_dash(&e.dead_reason),
                ])
            })
            .collect();
        table(
            w,
            &["OLD_SEQ", "NEW_SEQ", "MSG_ID", "ATTEMPTS", "DEAD_REASON"],
            &["OLD_SEQ", "NEW_SEQ", "ATTEMPTS"],
            &rows,
        )?;
        listed_note(w, r.replayed.len(), r.replayed_count)?;
    }
    if !r.skipped.is_empty() {
        writeln!(w, "skipped {} (left in the dead letters):", r.skipped.len())?;
        let rows: Vec<Vec<String>> = r
            .skipped
            .iter()
            .filter_map(|x| {
                let e = x.entry.as_ref()?;
                Some(vec![
                    e.seq.to_string(),
                    or_dash(&e.msg_id),
                    x.reason.clone(),
                ])
            })
            .collect();
        table(w, &["SEQ", "MSG_ID", "WHY"], &["SEQ"], &rows)?;
    }
    Ok(())
}

/// A purge's result: a summary line and the entries, or one JSON object.
pub fn purge(
    w: &mut dyn Write,
    node: &str,
    dead_letter: bool,
    r: &pb::PurgeQueueReply,
    json: bool,
) -> io::Result<()> {
    if json {
        let v = json!({
            "node_id": node,
            "queue": if dead_letter { "dead_letter" } else { "live" },
            "dry_run": r.dry_run,
            "purged_count": r.purged_count,
            "purged": r.purged.iter().map(entry_json).collect::<Vec<_>>(),
        });
        return write_json(w, &v);
    }
    let verb = if r.dry_run { "would purge" } else { "purged" };
    let what = match (dead_letter, r.purged_count == 1) {
        (true, true) => "dead letter",
        (true, false) => "dead letters",
        (false, true) => "live entry",
        (false, false) => "live entries",
    };
    writeln!(w, "{verb} {} {what} of node {node}", r.purged_count)?;
    if !r.purged.is_empty() {
        entries_table(w, &r.purged)?;
        listed_note(w, r.purged.len(), r.purged_count)?;
    }
    Ok(())
}

fn listed_note(w: &mut dyn Write, listed: usize, total: u64) -> io::Result<()> {
    if (listed as u64) < total {
        writeln!(w, "(first {listed} of {total} listed)")?;
    }
    Ok(())
}

// ----- export / import -----

/// One line of an export file (`queue-dump export`), read back by `queue-dump import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The node whose queue held it.
    pub node_id: String,
    /// `live` or `dead_letter`.
    pub queue: String,
    /// Its sequence in the exporting store (informative: import assigns new ones).
    pub seq: u64,
    /// The message's id.
    pub msg_id: String,
    /// Its topic.
    pub topic: String,
    /// Its headers.
    pub headers: BTreeMap<String, String>,
    /// The payload, base64 (standard alphabet, padded).
    pub payload: String,
    /// Acceptance time, RFC 3339 UTC (for people; `accepted_at_ms` is what import reads).
    pub accepted_at: String,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Time to live from acceptance; 0 = never expires.
    pub ttl_ms: u64,
    /// Offers made to the node so far.
    pub attempts: u32,
    /// Dead letters: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    /// Dead letters: when, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at_ms: Option<u64>,
}

impl ExportRecord {
    /// The record of an entry; `None` when its message is unreadable (nothing to export).
    pub fn from_entry(e: &QueueEntry) -> Option<ExportRecord> {
        let m = e.message.as_ref()?;
        Some(ExportRecord {
            node_id: e.node.clone(),
            queue: e.kind.label().to_string(),
            seq: e.seq,
            msg_id: m.msg_id.clone(),
            topic: m.topic.clone(),
            headers: m.headers.iter().cloned().collect(),
            payload: base64::engine::general_purpose::STANDARD.encode(&m.payload),
            accepted_at: rfc3339(m.accepted_at_ms),
            accepted_at_ms: m.accepted_at_ms,
            ttl_ms: m.ttl_ms,
            attempts: e.attempts,
            dead_reason: e.dead_reason.clone(),
            dead_at_ms: e.dead_at_ms,
        })
    }

    /// Parses and checks one line; the error says what is wrong with it.
    pub fn parse(line: &str) -> Result<ImportItem, String> {
        let r: ExportRecord = serde_json::from_str(line).map_err(|e| e.to_string())?;
        crate::config::validate_node_id(&r.node_id).map_err(|e| format!("node_id: {e}"))?;
        let kind = QueueKind::from_label(&r.queue)
            .ok_or_else(|| format!("queue is {:?}; expected live or dead_letter", r.queue))?;
        if r.msg_id.is_empty()
            || r.msg_id.len() > crate::api::broadcast::MAX_MSG_ID_BYTES
            || !r.msg_id.bytes().all(|b| (0x21..=0x7e).contains(&b))
        {
            return Err(format!(
                "msg_id {:?} is not 1 to {} bytes of visible ASCII",
                r.msg_id,
                crate::api::broadcast::MAX_MSG_ID_BYTES
            ));
        }
        let payload = base64::engine::general_purpose::STANDARD
            .decode(r.payload.as_bytes())
            .map_err(|e| format!("payload is not base64: {e}"))?;
        if payload.is_empty() {
            return Err("payload is empty".into());
        }
        Ok(ImportItem {
            node: r.node_id,
            kind,
            message: MessageRecord {
                msg_id: r.msg_id,
                topic: r.topic,
                headers: r.headers.into_iter().collect(),
                payload: payload.into(),
                accepted_at_ms: r.accepted_at_ms,
                ttl_ms: r.ttl_ms,
            },
            attempts: r.attempts,
            dead_reason: r.dead_reason.unwrap_or_default(),
            dead_at_ms: r.dead_at_ms.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_show_text_or_hex() {
        assert_eq!(preview(b"hello", 5), "\"hello\"");
        assert_eq!(preview(b"hello", 500), "\"hello\"...");
        assert_eq!(preview(&[0, 1, 2], 3), "hex:000102");
        assert_eq!(
            preview(&[0xff; 20], 20),
            format!("hex:{}...", "ff".repeat(12))
        );
    }

    #[test]
    fn ages_and_times() {
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(125_000), "2m05s");
        assert_eq!(age(3 * 3_600_000 + 7 * 60_000), "3h07m");
        assert_eq!(age(2 * 86_400_000 + 4 * 3_600_000), "2d04h");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn export_round_trips_and_checks_input() {
        let e = QueueEntry {
            node: "n1".into(),
            kind: QueueKind::DeadLetter,
            seq: 7,
            attempts: 5,
            message: Some(MessageRecord {
                msg_id: "m-1".into(),
                topic: "t".into(),
                headers: vec![("a".into(), "b".into())],
                payload: vec![0, 1, 2, 255].into(),
                accepted_at_ms: 1_000,
                ttl_ms: 0,
            }),
            problem: None,
            dead_reason: Some("InvalidArgument: no".into()),
            dead_at_ms: Some(2_000),
        };
        let line = serde_json::to_string(&ExportRecord::from_entry(&e).unwrap()).unwrap();
        let item = ExportRecord::parse(&line).unwrap();
        assert_eq!(item.node, "n1");
        assert_eq!(item.kind, QueueKind::DeadLetter);
        assert_eq!(Some(item.message), e.message);
        assert_eq!((item.attempts, item.dead_at_ms), (5, 2_000));
        let bad = line.replace("\"n1\"", "\"a b\"");
        assert!(ExportRecord::parse(&bad).unwrap_err().contains("node_id"));
        let bad = line.replace("\"dead_letter\"", "\"other\"");
        assert!(ExportRecord::parse(&bad).unwrap_err().contains("queue"));
        assert!(ExportRecord::parse("{").is_err());
    }

    #[test]
    fn tables_align() {
        let mut out = Vec::new();
        table(
            &mut out,
            &["A", "NUM", "LAST"],
            &["NUM"],
            &[vec!["xx".into(), "1".into(), "z".into()]],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A   NUM  LAST\nxx    1  z\n"
        );
    }
}
