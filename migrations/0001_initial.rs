//! Format 1: the initial layout (see `src/store/mod.rs`). From an empty store it writes the
//! first sequence number; the runner records the format version in the same batch.

/// Adds format 1's initial records to `batch`.
pub fn apply(_tree: &sled::Tree, batch: &mut sled::Batch) -> Result<(), crate::store::StoreError> {
    batch.insert(
        crate::store::keys::META_NEXT_SEQ,
        crate::store::record::encode(&1u64)?,
    );
    Ok(())
}
