//! Key encoding. All keys live in one sled tree so that one `Batch` is one atomic unit; a
//! short prefix names the keyspace. Sequence numbers and times are big-endian so that byte
//! order is numeric order. Node ids are visible ASCII (validated at the edges), so the `\0`
//! separator sorts below every id byte and `q/a\0` never overlaps `q/ab\0`.

/// Format version of the store (`u32` record).
pub const META_FORMAT: &[u8] = b"meta/format";
/// The manager id this data dir belongs to (`String` record).
pub const META_MANAGER_ID: &[u8] = b"meta/manager_id";
/// The next sequence number to assign (`u64` record).
pub const META_NEXT_SEQ: &[u8] = b"meta/next_seq";

/// Prefix of message records.
pub const MESSAGES: &[u8] = b"m/";
/// Prefix of node records.
pub const NODES: &[u8] = b"n/";
/// Prefix of format 1's round indexes (read by migration 0002 only).
pub const ROUNDS: &[u8] = b"t/";
/// Prefix of dedupe rounds (the dedupe index, in expiry order).
pub const DEDUPE_ROUNDS: &[u8] = b"r/";
/// Prefix of every node's queue ranges.
pub const QUEUES: &[u8] = b"q/";
/// Prefix of every node's dead letters.
pub const DEAD: &[u8] = b"l/";
/// Prefix of format 1's dedupe entries (read by migration 0002 only).
pub const DEDUPE: &[u8] = b"d/";
/// Prefix of the meta records.
pub const META: &[u8] = b"meta/";
/// Prefix of node absence marks (since when a node is missing from etcd).
pub const ABSENT: &[u8] = b"o/";
/// Prefix of archive progress records (how much of a retiring node's archive is committed).
pub const ARCHIVE_PROGRESS: &[u8] = b"a/";
/// Prefix of records moved aside by `verify --repair`.
pub const QUARANTINE: &[u8] = b"x/";

fn with(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>());
    k.extend_from_slice(prefix);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

/// `m/<seq>`
pub fn message(seq: u64) -> Vec<u8> {
    with(MESSAGES, &[&seq.to_be_bytes()])
}

/// `m/<seq><index>`: continuation chunk `index` (from 1) of a message record.
pub fn message_chunk(seq: u64, index: u32) -> Vec<u8> {
    with(MESSAGES, &[&seq.to_be_bytes(), &index.to_be_bytes()])
}

/// Tells the pieces of a message record key apart: `m/<seq>` (head: `(seq, true)`) and
/// `m/<seq><index>` (continuation chunk: `(seq, false)`).
pub fn parse_message(key: &[u8]) -> Option<(u64, bool)> {
    let rest = key.strip_prefix(MESSAGES)?;
    let seq = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    match rest.len() {
        8 => Some((seq, true)),
        12 => Some((seq, false)),
        _ => None,
    }
}

/// `q/<node>\0`: every range of one node.
pub fn range_prefix(node: &str) -> Vec<u8> {
    with(QUEUES, &[node.as_bytes(), b"\0"])
}

/// `q/<node>\0<start>`
pub fn range(node: &str, start: u64) -> Vec<u8> {
    with(QUEUES, &[node.as_bytes(), b"\0", &start.to_be_bytes()])
}

/// `l/<node>\0`: every dead letter of one node.
pub fn dead_prefix(node: &str) -> Vec<u8> {
    with(DEAD, &[node.as_bytes(), b"\0"])
}

/// `l/<node>\0<seq>`
pub fn dead(node: &str, seq: u64) -> Vec<u8> {
    with(DEAD, &[node.as_bytes(), b"\0", &seq.to_be_bytes()])
}

/// `o/<node>`
pub fn absent(node: &str) -> Vec<u8> {
    with(ABSENT, &[node.as_bytes()])
}

/// `a/<node>`
pub fn archive_progress(node: &str) -> Vec<u8> {
    with(ARCHIVE_PROGRESS, &[node.as_bytes()])
}

/// `n/<node>`
pub fn node(node: &str) -> Vec<u8> {
    with(NODES, &[node.as_bytes()])
}

/// `d/<msg_id>`
pub fn dedupe(msg_id: &str) -> Vec<u8> {
    with(DEDUPE, &[msg_id.as_bytes()])
}

/// `t/<accepted_at_ms><start>` (format 1)
pub fn round_index(accepted_at_ms: u64, start: u64) -> Vec<u8> {
    with(
        ROUNDS,
        &[&accepted_at_ms.to_be_bytes(), &start.to_be_bytes()],
    )
}

/// `r/<accepted_at_ms><start>`
pub fn dedupe_round(accepted_at_ms: u64, start: u64) -> Vec<u8> {
    with(
        DEDUPE_ROUNDS,
        &[&accepted_at_ms.to_be_bytes(), &start.to_be_bytes()],
    )
}

/// `(accepted_at_ms, start)` of an `r/` or `t/` key.
pub fn parse_round(key: &[u8]) -> Option<(u64, u64)> {
    let rest = key.get(2..)?;
    if rest.len() != 16 {
        return None;
    }
    let at = u64::from_be_bytes(rest[..8].try_into().ok()?);
    Some((at, u64::from_be_bytes(rest[8..].try_into().ok()?)))
}

/// The trailing big-endian `u64` of a key (a sequence number), if it has one.
pub fn trailing_u64(key: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// The node id of a `q/<node>\0<start>` key.
pub fn node_of_range(key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(QUEUES)?;
    let end = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

/// A key made readable for error messages: printable bytes as text, a trailing sequence
/// number as a decimal.
pub fn display(key: &[u8]) -> String {
    let numbered = [MESSAGES, QUEUES, DEAD].iter().any(|p| key.starts_with(p));
    let (text, seq) = if numbered && key.len() >= 10 {
        (&key[..key.len() - 8], trailing_u64(key))
    } else {
        (key, None)
    };
    let mut s: String = text
        .iter()
        .map(|b| match b {
            0 => '/',
            0x20..=0x7e => *b as char,
            _ => '?',
        })
        .collect();
    if let Some(seq) = seq {
        s.push_str(&seq.to_string());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_display() {
        assert!(message(255) < message(256));
        assert!(range("a", 9) < range("a", 10));
        assert!(range("a", u64::MAX) < range("ab", 0));
        assert_eq!(display(&message(42)), "m/42");
        assert_eq!(display(&range("node-1", 7)), "q/node-1/7");
        assert_eq!(display(&dedupe("x")), "d/x");
        assert_eq!(node_of_range(&range("n1", 3)), Some("n1"));
        assert_eq!(trailing_u64(&range("n1", 3)), Some(3));
    }
}
