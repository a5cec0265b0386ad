//! Format 2: messages are stored in packs (see `src/store/record.rs`, `MessageHead`): one
//! record holds the messages of consecutive sequences, keyed by the last one.
//!
//! Nothing to rewrite: a format-1 message record (`m/<seq>`, one message's encoding cut into
//! chunks) is exactly a pack of one message ending at `seq`. The version number still goes
//! up, because a format-1 build reading a pack of several messages would take it for a
//! corrupt record and quarantine it; the bump makes such a build refuse the store instead.

/// Adds format 2's changes to `batch`: none besides the version the runner writes.
pub fn apply(_tree: &sled::Tree, _batch: &mut sled::Batch) -> Result<(), crate::store::StoreError> {
    Ok(())
}
