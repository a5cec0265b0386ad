//! Format 2: messages in packs, dedupe entries in one record per round.
//!
//! - **Message packs** (see `src/store/record.rs`, `MessageHead`): one record holds the
//!   messages of consecutive sequences, keyed by the last one. Nothing to rewrite: a format-1
//!   message record (`m/<seq>`, one message's encoding cut into chunks) is exactly a pack of
//!   one message ending at `seq`. The version still goes up, because a format-1 build would
//!   take a pack of several messages for a corrupt record; the bump makes it refuse the
//!   store instead.
//! - **Dedupe rounds** (see `src/store/dedupe.rs`): format 1 kept a `d/<msg_id>` record per
//!   msg_id and a `t/<accepted_at><start>` list of a round's msg_ids; format 2 keeps only
//!   `r/<accepted_at><start>` with the round's node count and msg_ids. Each `t/` round
//!   becomes an `r/` round (its node count read from its msg_ids' `d/` records), and the
//!   `t/` and `d/` records go.
//!
//! Rounds are converted a step at a time, each step one atomic batch that converts whole
//! rounds, so memory stays bounded on a large store and a crash mid-way leaves rounds that
//! are either old (`t/`, converted when the migration runs again) or new (`r/`), never half;
//! the format number moves only after the last step.

use crate::store::record::{self, DedupeRecord, DedupeRound, RoundIndex};
use crate::store::{keys, StoreError};

/// Rounds converted per step.
const STEP: usize = 256;

/// Converts every format-1 dedupe round, then adds the removal of any `d/` record left
/// without a round to `batch`.
pub fn apply(tree: &sled::Tree, batch: &mut sled::Batch) -> Result<(), StoreError> {
    loop {
        let mut step = sled::Batch::default();
        let mut converted = 0;
        for item in tree.scan_prefix(keys::ROUNDS).take(STEP) {
            let (k, v) = item.map_err(|e| StoreError::sled("reading format-1 rounds", e))?;
            let Some((accepted_at, start)) = keys::parse_round(&k) else {
                return Err(StoreError::Corrupt {
                    key: keys::display(&k),
                    reason: "a round key of unexpected length".into(),
                });
            };
            let round: RoundIndex = record::decode(&k, &v)?;
            let mut node_count = None;
            for (seq, id) in (start..).zip(&round.msg_ids) {
                let dk = keys::dedupe(id);
                let Some(d) = tree
                    .get(&dk)
                    .map_err(|e| StoreError::sled("reading format-1 dedupe entries", e))?
                else {
                    continue;
                };
                let d: DedupeRecord = record::decode(&dk, &d)?;
                // An id accepted again later has a newer entry, converted with its round.
                if d.seq == seq {
                    node_count.get_or_insert(d.node_count);
                    step.remove(dk);
                }
            }
            let new = DedupeRound {
                // Every message of a round was queued for the same nodes; a round whose
                // entries are all gone answers a duplicate with 0 nodes, and still refuses it.
                node_count: node_count.unwrap_or(0),
                msg_ids: round.msg_ids,
            };
            step.insert(
                keys::dedupe_round(accepted_at, start),
                record::encode(&new)?,
            );
            step.remove(k);
            converted += 1;
        }
        if converted == 0 {
            break;
        }
        tree.apply_batch(step)
            .map_err(|e| StoreError::sled("converting format-1 rounds", e))?;
    }
    for item in tree.scan_prefix(keys::DEDUPE).keys() {
        batch.remove(item.map_err(|e| StoreError::sled("reading format-1 dedupe entries", e))?);
    }
    Ok(())
}
