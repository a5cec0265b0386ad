//! The record codec and the persisted record types.
//!
//! Every value the store writes is framed as
//!
//! ```text
//! [record version: u8][crc32c of version byte + body: u32 LE][bincode 2 body]
//! ```
//!
//! and checked on every read: a bad frame is [`StoreError::Corrupt`] naming the key, never a
//! panic and never a silently skipped message.
//!
//! **Do not reorder, retype or remove fields of the structs below**: bincode encodes them by
//! position. A change of layout is a new record version plus a migration in `migrations/`.

use bincode::{Decode, Encode};
use bytes::Bytes;

use super::StoreError;

/// The version byte written in front of every record.
pub const RECORD_VERSION: u8 = 1;
/// Bytes of the frame in front of every record's body.
pub const HEADER_LEN: usize = 5;
/// Largest body a record may decode to; guards against a garbled length prefix asking bincode
/// for gigabytes.
const DECODE_LIMIT: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Largest body decoded under the small limit: a message chunk plus its framing.
const SMALL_BODY: usize = MESSAGE_CHUNK + 1024;
/// Limit for a body of at most [`SMALL_BODY`] bytes. bincode allocates a `Vec`'s claimed
/// length before reading it, so a garbled length in a 20-byte record could ask for
/// [`DECODE_LIMIT`]; a decoded value takes at most ~24 bytes of memory per body byte (an
/// empty `String` is one byte on disk), so 64× the body is never too tight.
const SMALL_LIMIT: usize = 64 * SMALL_BODY;
/// Largest body decoded under the medium limit.
const MEDIUM_BODY: usize = 1 << 20;
const MEDIUM_LIMIT: usize = 64 * MEDIUM_BODY;

/// Decodes a bincode body with a limit that grows with the body's length, so that memory
/// claimed by a garbled length prefix stays proportional to the bytes actually there.
fn decode_body<T: Decode<()>>(body: &[u8]) -> Result<(T, usize), bincode::error::DecodeError> {
    let base = bincode::config::standard();
    if body.len() <= SMALL_BODY {
        bincode::decode_from_slice(body, base.with_limit::<SMALL_LIMIT>())
    } else if body.len() <= MEDIUM_BODY {
        bincode::decode_from_slice(body, base.with_limit::<MEDIUM_LIMIT>())
    } else {
        bincode::decode_from_slice(body, config())
    }
}

/// Frames `value` as a record.
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut out = vec![RECORD_VERSION, 0, 0, 0, 0];
    bincode::encode_into_std_write(value, &mut out, config()).map_err(|e| StoreError::Encode {
        reason: e.to_string(),
    })?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..1]), &out[HEADER_LEN..]);
    out[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks a record's frame and decodes it; `key` names the record in errors. Never panics,
/// and allocates in proportion to `bytes` (plus a constant), whatever they hold.
pub fn decode<T: Decode<()>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: super::keys::display(key),
        reason,
    };
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!(
            "record is {} bytes, shorter than its header",
            bytes.len()
        )));
    }
    if bytes[0] != RECORD_VERSION {
        return Err(corrupt(format!(
            "record version {} is not supported (this build reads version {RECORD_VERSION})",
            bytes[0]
        )));
    }
    let stored = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&bytes[..1]), &bytes[HEADER_LEN..]);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"
        )));
    }
    let (value, used) =
        decode_body(&bytes[HEADER_LEN..]).map_err(|e| corrupt(format!("undecodable body: {e}")))?;
    if used != bytes.len() - HEADER_LEN {
        return Err(corrupt(format!(
            "{} trailing bytes after the body",
            bytes.len() - HEADER_LEN - used
        )));
    }
    Ok(value)
}

/// One accepted broadcast, written once whatever the number of nodes (key `m/<seq>`).
///
/// Its encoding is what `#[derive(Encode, Decode)]` gives the same fields with a `Vec<u8>`
/// payload (a test holds it to that); the codec is written out only so that the payload is
/// [`Bytes`], which every node's request shares without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// The id it was accepted under (caller's, or assigned by the manager).
    pub msg_id: String,
    /// Opaque label passed through to nodes.
    pub topic: String,
    /// Headers passed through to nodes, sorted by name.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub payload: Bytes,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
    /// Time to live from acceptance; 0 = never expires.
    pub ttl_ms: u64,
}

impl Encode for MessageRecord {
    fn encode<E: bincode::enc::Encoder>(
        &self,
        encoder: &mut E,
    ) -> Result<(), bincode::error::EncodeError> {
        self.msg_id.encode(encoder)?;
        self.topic.encode(encoder)?;
        self.headers.encode(encoder)?;
        // A slice encodes exactly as a Vec (length, then the bytes).
        self.payload.as_ref().encode(encoder)?;
        self.accepted_at_ms.encode(encoder)?;
        self.ttl_ms.encode(encoder)
    }
}

impl<C> Decode<C> for MessageRecord {
    fn decode<D: bincode::de::Decoder<Context = C>>(
        decoder: &mut D,
    ) -> Result<Self, bincode::error::DecodeError> {
        Ok(MessageRecord {
            msg_id: Decode::decode(decoder)?,
            topic: Decode::decode(decoder)?,
            headers: Decode::decode(decoder)?,
            payload: Bytes::from(Vec::<u8>::decode(decoder)?),
            accepted_at_ms: Decode::decode(decoder)?,
            ttl_ms: Decode::decode(decoder)?,
        })
    }
}
bincode::impl_borrow_decode!(MessageRecord);

impl MessageRecord {
    /// When the message stops being deliverable, if it ever does.
    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.ttl_ms > 0).then(|| self.accepted_at_ms.saturating_add(self.ttl_ms))
    }

    /// Heap bytes held, roughly: what a cached copy costs in memory.
    pub fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.msg_id.len() + self.topic.len() + headers + self.payload.len()
    }
}

/// A node's share of one commit round (key `q/<node>\0<start>`): the sequences
/// `start..start + len`, with a bit set for each one that is finished (delivered, expired or
/// dead-lettered) and the offer count of entries that have been offered without success.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RangeRecord {
    /// Number of sequences in the round.
    pub len: u32,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set = sequence `start + i` is finished.
    pub done: Vec<u8>,
    /// `(offset, attempts)` for unfinished entries offered at least once without success.
    pub attempts: Vec<(u32, u32)>,
}

impl RangeRecord {
    /// A round of `len` sequences, none finished.
    pub fn new(len: u32) -> Self {
        Self {
            len,
            done: vec![0; (len as usize).div_ceil(8)],
            attempts: Vec::new(),
        }
    }

    /// Whether the entry at `offset` is finished.
    pub fn is_done(&self, offset: u32) -> bool {
        let i = offset as usize;
        self.done
            .get(i / 8)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Marks the entry at `offset` finished.
    pub fn set_done(&mut self, offset: u32) {
        let i = offset as usize;
        if let Some(b) = self.done.get_mut(i / 8) {
            *b |= 1 << (i % 8);
        }
        self.attempts.retain(|(o, _)| *o != offset);
    }

    /// Offsets not finished yet, in order.
    pub fn pending(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.len).filter(|o| !self.is_done(*o))
    }

    /// Whether every entry is finished, so the record can be deleted. A worker asks after
    /// every delivery, so this compares whole bytes rather than walking the entries.
    pub fn is_complete(&self) -> bool {
        let len = self.len as usize;
        let (full, rest) = (len / 8, len % 8);
        let Some(bytes) = self.done.get(..len.div_ceil(8)) else {
            return false;
        };
        bytes[..full].iter().all(|b| *b == 0xff)
            && (rest == 0 || bytes[full] & ((1u8 << rest) - 1) == (1u8 << rest) - 1)
    }
}

/// How messages are stored: packs. A pack holds the messages of consecutive sequences
/// `first..=last`, as their bincode encodings back to back; those bytes are cut into chunks
/// of at most [`MESSAGE_CHUNK`] bytes, the first at `m/<last>` in a `MessageHead`, the others
/// at `m/<last><index>` as framed `Vec<u8>`. The number of messages, and so `first`, comes
/// from decoding the pack.
///
/// Why packs: a commit round writes a pack per [`PACK_BYTES`] of messages instead of a record
/// per message, and reclamation deletes one; each sled insert or delete costs a leaf-page
/// copy whatever its size, which made the per-message records the accept path's and the
/// drain's main cost. Why the key is the *last* sequence: every key below `m/<lwm>` then
/// belongs to a pack wholly below the low-water mark, so reclamation deletes a key range
/// without decoding anything (invariant 3), and a lookup of `seq` is the first head at or
/// after `m/<seq>`. A format-1 message record is a pack of one.
///
/// Why chunks: sled 0.34.7 writes any page over a quarter of its segment size to a separate
/// blob file that it never fsyncs; with chunks this small and the store's 8 MiB segments, no
/// leaf page (at most 17 items) gets near that.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct MessageHead {
    /// Number of chunks, this one included.
    pub chunks: u32,
    /// Total length of the pack's bytes.
    pub len: u64,
    /// The first chunk.
    pub body: Vec<u8>,
}

/// Largest chunk of a pack.
pub const MESSAGE_CHUNK: usize = 64 * 1024;

/// A pack is closed before a message would take it past this many bytes (a message larger
/// than this is a pack of its own, chunked if over [`MESSAGE_CHUNK`]). Measured with
/// 1,000,000 queued 1 KiB messages: 64 KiB packs left the manager at 451–482 MiB resident
/// right after accepting them (sled keeps the large values of recently written leaves in
/// memory whatever its cache capacity), 16 KiB at 217–222 MiB, 8 KiB at 193–210 MiB; accept
/// rates were the same, drains a little slower with 8 KiB (BENCHMARKS.md).
pub const PACK_BYTES: usize = 16 * 1024;

/// One `(key, value)` write.
pub(crate) type KeyValue = (Vec<u8>, Vec<u8>);

/// A message's encoding inside a pack.
pub(crate) fn encode_message(msg: &MessageRecord) -> Result<Vec<u8>, StoreError> {
    bincode::encode_to_vec(msg, config()).map_err(|e| StoreError::Encode {
        reason: e.to_string(),
    })
}

/// Groups encoded messages of consecutive sequences into packs (see [`MessageHead`]) and
/// turns them into writes. Pushing cannot fail; encoding the packs happens in
/// [`PackWriter::finish`], so a failure there fails the whole batch, never part of it.
#[derive(Default)]
pub(crate) struct PackWriter {
    /// Closed packs: last sequence and the encodings of their messages, back to back.
    closed: Vec<(u64, Vec<u8>)>,
    /// The open pack, same shape.
    open: Option<(u64, Vec<u8>)>,
}

impl PackWriter {
    /// Adds message `seq` (encoded by [`encode_message`]). A sequence that does not follow
    /// the previous one starts a new pack, so a pack always holds consecutive sequences.
    pub(crate) fn push(&mut self, seq: u64, encoded: &[u8]) {
        match &mut self.open {
            Some((last, bytes))
                if last.checked_add(1) == Some(seq)
                    && bytes.len() + encoded.len() <= PACK_BYTES =>
            {
                bytes.extend_from_slice(encoded);
                *last = seq;
            }
            open => {
                self.closed.extend(open.take());
                *open = Some((seq, encoded.to_vec()));
            }
        }
    }

    /// The writes of every pack, heads before their chunks.
    pub(crate) fn finish(mut self) -> Result<Vec<KeyValue>, StoreError> {
        self.closed.extend(self.open.take());
        let mut out = Vec::with_capacity(self.closed.len());
        for (last, bytes) in self.closed {
            let mut chunks = bytes.chunks(MESSAGE_CHUNK);
            let head = MessageHead {
                chunks: bytes.len().div_ceil(MESSAGE_CHUNK).max(1) as u32,
                len: bytes.len() as u64,
                body: chunks.next().unwrap_or_default().to_vec(),
            };
            out.push((super::keys::message(last), encode(&head)?));
            for (i, chunk) in chunks.enumerate() {
                out.push((
                    super::keys::message_chunk(last, i as u32 + 1),
                    encode(&chunk.to_vec())?,
                ));
            }
        }
        Ok(out)
    }
}

/// Reassembles the pack whose head is at `key` (`m/<last>`) from its head and continuation
/// chunks (in key order): its messages, in sequence order, the last one being `last`.
pub fn decode_pack(
    key: &[u8],
    last: u64,
    head: MessageHead,
    rest: impl IntoIterator<Item = Result<Vec<u8>, StoreError>>,
) -> Result<Vec<MessageRecord>, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        key: super::keys::display(key),
        reason,
    };
    let mut bytes = head.body;
    for chunk in rest {
        bytes.extend_from_slice(&chunk?);
    }
    if bytes.len() as u64 != head.len {
        return Err(corrupt(format!(
            "message pack is {} bytes in its chunks, its head says {}",
            bytes.len(),
            head.len
        )));
    }
    let mut messages = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (msg, used) = decode_body::<MessageRecord>(&bytes[at..])
            .map_err(|e| corrupt(format!("undecodable message at byte {at}: {e}")))?;
        messages.push(msg);
        at += used;
    }
    if messages.is_empty() {
        return Err(corrupt("an empty message pack".into()));
    }
    if messages.len() as u64 - 1 > last {
        return Err(corrupt(format!(
            "a pack of {} messages cannot end at sequence {last}",
            messages.len()
        )));
    }
    Ok(messages)
}

/// A message a node will never get, kept whole for inspection and replay
/// (key `l/<node>\0<seq>`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DeadLetterRecord {
    /// The message's sequence number when it was live.
    pub seq: u64,
    /// The message, or `None` when its record was unreadable (see `reason`).
    pub message: Option<MessageRecord>,
    /// Offers made to the node.
    pub attempts: u32,
    /// Why it was dead-lettered (the node's last answer, or the store error).
    pub reason: String,
    /// When, milliseconds since the Unix epoch.
    pub dead_at_ms: u64,
}

/// A known connect-node (key `n/<node>`).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct NodeRecord {
    /// Last known address, `host:port`.
    pub addr: String,
    /// First registration, milliseconds since the Unix epoch.
    pub first_seen_ms: u64,
    /// Last time a membership source reported it, milliseconds since the Unix epoch.
    pub last_seen_ms: u64,
    /// Configured with `--static-node`: never retired.
    pub is_static: bool,
    /// Deliveries paused by an operator (admin `HoldNode`); survives restarts.
    pub held: bool,
}

/// Where a msg_id was accepted: the answer of [`super::Store::dedupe`]. Format 1 stored one
/// per msg_id (key `d/<msg_id>`); migration 0002 folds them into [`DedupeRound`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct DedupeRecord {
    /// Sequence the message was accepted under.
    pub seq: u64,
    /// Nodes it was queued for: a duplicate's reply repeats it.
    pub node_count: u32,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub accepted_at_ms: u64,
}

/// Format 1's msg_ids of a round (key `t/<accepted_at><start>`), next to a [`DedupeRecord`]
/// per msg_id; migration 0002 turns both into a [`DedupeRound`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RoundIndex {
    /// Every msg_id accepted in the round.
    pub msg_ids: Vec<String>,
}

/// The dedupe entries of one commit round (key `r/<accepted_at><start>`): the durable form
/// of the dedupe index (see `store/dedupe.rs`), expired a round at a time in time order.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DedupeRound {
    /// Nodes every message of the round was queued for: a duplicate's reply repeats it.
    pub node_count: u32,
    /// The msg_id of each sequence of the round, `start` first.
    pub msg_ids: Vec<String>,
}

/// How much of a retiring node's archive file is committed (key `a/<node>`): the file's
/// length when the store last removed archived entries, written in the same batch as that
/// removal. A resumed retirement truncates the file to `offset`, so lines of a page whose
/// removal never became durable are written once, not twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ArchiveProgress {
    /// The absence start the archive file is named after; another value = another file.
    pub absent_since_ms: u64,
    /// Committed length of the archive file, in bytes.
    pub offset: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `#[derive(Encode, Decode)]` gives [`MessageRecord`]'s fields: the format every
    /// stored message has, which the hand-written codec must keep.
    #[derive(Encode, Decode, Debug, PartialEq)]
    struct DerivedMessage {
        msg_id: String,
        topic: String,
        headers: Vec<(String, String)>,
        payload: Vec<u8>,
        accepted_at_ms: u64,
        ttl_ms: u64,
    }

    #[test]
    fn message_codec_is_the_derived_one() {
        for payload in [vec![1], vec![0xab; 300], vec![7; 70_000]] {
            let derived = DerivedMessage {
                msg_id: "m-1".into(),
                topic: "t".into(),
                headers: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
                payload: payload.clone(),
                accepted_at_ms: 1_700_000_000_123,
                ttl_ms: 60_000,
            };
            let rec = MessageRecord {
                msg_id: "m-1".into(),
                topic: "t".into(),
                headers: derived.headers.clone(),
                payload: payload.into(),
                accepted_at_ms: derived.accepted_at_ms,
                ttl_ms: derived.ttl_ms,
            };
            let ours = encode_message(&rec).unwrap();
            assert_eq!(ours, bincode::encode_to_vec(&derived, config()).unwrap());
            let (back, used): (MessageRecord, usize) =
                bincode::decode_from_slice(&ours, config()).unwrap();
            assert_eq!((back, used), (rec, ours.len()));
        }
    }

    #[test]
    fn round_trip_and_corruption_is_named() {
        let rec = DedupeRecord {
            seq: 7,
            node_count: 3,
            accepted_at_ms: 99,
        };
        let bytes = encode(&rec).unwrap();
        assert_eq!(decode::<DedupeRecord>(b"d/x", &bytes).unwrap(), rec);

        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let err = decode::<DedupeRecord>(b"d/x", &bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains("d/x"), "{err}");
        }
        let err = decode::<DedupeRecord>(b"d/x", &bytes[..3])
            .unwrap_err()
            .to_string();
        assert!(err.contains("shorter than its header"), "{err}");
    }

    /// Postmortem: bincode allocates a `Vec`'s claimed length before reading it, and the only
    /// limit was 256 MiB, so a 10-byte record with a garbled length (checksum fixed up, as a
    /// fuzz target does) made the decoder allocate 200 MB; the limit now scales with the
    /// record's size.
    #[test]
    fn a_garbled_length_prefix_cannot_claim_more_than_the_record_size_allows() {
        let mut bytes = vec![RECORD_VERSION, 0, 0, 0, 0, 252];
        bytes.extend_from_slice(&200_000_000u32.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..1]), &bytes[HEADER_LEN..]);
        bytes[1..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        let err = decode::<Vec<u8>>(b"m/1", &bytes).unwrap_err().to_string();
        assert!(err.to_lowercase().contains("limit"), "{err}");
        let err = decode::<RoundIndex>(b"t/1", &bytes)
            .unwrap_err()
            .to_string();
        assert!(err.to_lowercase().contains("limit"), "{err}");
    }

    fn msg(id: &str, payload: usize) -> MessageRecord {
        MessageRecord {
            msg_id: id.into(),
            topic: "t".into(),
            headers: vec![("h".into(), "v".into())],
            payload: vec![7; payload].into(),
            accepted_at_ms: 1,
            ttl_ms: 0,
        }
    }

    /// Decodes every pack written by `writes` as the store reads them: heads with their
    /// chunks, in key order. Returns `(first, last, messages)` per pack.
    fn read_packs(writes: Vec<KeyValue>) -> Vec<(u64, u64, Vec<MessageRecord>)> {
        let mut out = Vec::new();
        let mut writes = writes.into_iter().peekable();
        while let Some((key, value)) = writes.next() {
            let (last, true) = crate::store::keys::parse_message(&key).unwrap() else {
                panic!("a chunk before its head");
            };
            let mut rest = Vec::new();
            while let Some((k, _)) = writes.peek() {
                if crate::store::keys::parse_message(k) != Some((last, false)) {
                    break;
                }
                let (k, v) = writes.next().unwrap();
                rest.push(decode::<Vec<u8>>(&k, &v));
            }
            let head = decode::<MessageHead>(&key, &value).unwrap();
            let messages = decode_pack(&key, last, head, rest).unwrap();
            out.push((last + 1 - messages.len() as u64, last, messages));
        }
        out
    }

    #[test]
    fn packs_hold_consecutive_sequences_up_to_pack_bytes() {
        let small: Vec<MessageRecord> = (0..100).map(|i| msg(&format!("s{i}"), 1000)).collect();
        let big = msg("big", 3 * MESSAGE_CHUNK + 5);
        let mut w = PackWriter::default();
        for (i, m) in small.iter().enumerate() {
            w.push(10 + i as u64, &encode_message(m).unwrap());
        }
        w.push(110, &encode_message(&big).unwrap());
        // Not consecutive: a new pack even though the open one has room.
        w.push(200, &encode_message(&small[0]).unwrap());
        w.push(201, &encode_message(&small[1]).unwrap());
        let writes = w.finish().unwrap();
        let chunks = writes
            .iter()
            .filter(|(k, _)| crate::store::keys::parse_message(k).is_some_and(|(_, h)| !h))
            .count();
        assert_eq!(chunks, 3, "only the big message is chunked");
        let packs = read_packs(writes);
        let bounds: Vec<(u64, u64)> = packs.iter().map(|(f, l, _)| (*f, *l)).collect();
        // Each small message encodes to 1,015 or 1,016 bytes: 16 fit in 16 KiB.
        assert!((1015..=1016).contains(&encode_message(&small[50]).unwrap().len()));
        let mut want: Vec<(u64, u64)> = (0..6).map(|i| (10 + 16 * i, 25 + 16 * i)).collect();
        want.extend([(106, 109), (110, 110), (200, 201)]);
        assert_eq!(bounds, want);
        let read: Vec<MessageRecord> = packs.into_iter().flat_map(|(_, _, m)| m).collect();
        let mut want = small.clone();
        want.push(big);
        want.extend_from_slice(&small[..2]);
        assert_eq!(read, want);
    }

    #[test]
    fn a_pack_that_does_not_add_up_is_corrupt_never_a_panic() {
        let mut w = PackWriter::default();
        w.push(1, &encode_message(&msg("a", 10)).unwrap());
        w.push(2, &encode_message(&msg("b", 10)).unwrap());
        let (key, value) = w.finish().unwrap().remove(0);
        let head = decode::<MessageHead>(&key, &value).unwrap();
        // Two messages cannot end at sequence 0.
        let err = decode_pack(&key, 0, head.clone(), [])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot end at sequence 0"), "{err}");
        let empty = MessageHead {
            chunks: 1,
            len: 0,
            body: Vec::new(),
        };
        let err = decode_pack(&key, 5, empty, []).unwrap_err().to_string();
        assert!(err.contains("empty message pack"), "{err}");
        // A cut inside the second message.
        let mut cut = head.clone();
        cut.body.truncate(cut.body.len() - 3);
        cut.len = cut.body.len() as u64;
        let err = decode_pack(&key, 5, cut, []).unwrap_err().to_string();
        assert!(err.contains("undecodable message at byte"), "{err}");
        let mut short = head;
        short.len += 1;
        let err = decode_pack(&key, 5, short, []).unwrap_err().to_string();
        assert!(err.contains("its head says"), "{err}");
    }

    #[test]
    fn range_bitmap() {
        let mut r = RangeRecord::new(10);
        assert_eq!(r.pending().count(), 10);
        r.attempts.push((3, 2));
        r.set_done(3);
        r.set_done(9);
        assert!(r.is_done(3) && r.is_done(9) && !r.is_done(4));
        assert!(r.attempts.is_empty());
        for o in 0..10 {
            r.set_done(o);
        }
        assert!(r.is_complete());
        for len in [0, 1, 7, 8, 9, 16, 4096] {
            let mut r = RangeRecord::new(len);
            for o in 0..len {
                assert!(!r.is_complete(), "{len}");
                r.set_done(len - 1 - o);
            }
            assert!(r.is_complete(), "{len}");
        }
        let short = RangeRecord {
            len: 9,
            done: vec![0xff],
            attempts: Vec::new(),
        };
        assert!(
            !short.is_complete(),
            "a bitmap shorter than len is not complete"
        );
    }
}
