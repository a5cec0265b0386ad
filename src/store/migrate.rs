//! The migration runner: reads the store's format version at open and brings it up to
//! [`CURRENT_FORMAT`] one step at a time.
//!
//! Each step lives in its own file under `migrations/` (`NNNN_name.rs`) and adds its writes
//! to a batch; the runner adds the new version number to the same batch and applies it, so
//! a crash mid-migration leaves the store at the old or the new version, never between. A
//! step too large for one batch may apply batches of its own first, each atomic and each
//! leaving a store the step, run again, finishes (see 0002).
//! A store of a newer format than this build knows is refused ([`StoreError::NewerFormat`]).

use super::{keys, record, StoreError};

#[path = "../../migrations/0001_initial.rs"]
mod m0001_initial;
#[path = "../../migrations/0002_message_packs.rs"]
mod m0002_message_packs;

/// The format this build writes.
pub const CURRENT_FORMAT: u32 = 2;

/// One step: from `to - 1` to `to`.
struct Migration {
    to: u32,
    name: &'static str,
    apply: fn(&sled::Tree, &mut sled::Batch) -> Result<(), StoreError>,
}

/// In order; `MIGRATIONS[i].to == i + 1`.
const MIGRATIONS: &[Migration] = &[
    Migration {
        to: 1,
        name: "initial",
        apply: m0001_initial::apply,
    },
    Migration {
        to: 2,
        name: "message packs",
        apply: m0002_message_packs::apply,
    },
];

/// The format version on disk; 0 for a new, empty store.
pub fn format_version(tree: &sled::Tree) -> Result<u32, StoreError> {
    match tree.get(keys::META_FORMAT) {
        Ok(Some(v)) => record::decode(keys::META_FORMAT, &v),
        Ok(None) if tree.is_empty() => Ok(0),
        Ok(None) => Err(StoreError::Corrupt {
            key: "meta/format".into(),
            reason: "the store holds data but no format version".into(),
        }),
        Err(e) => Err(StoreError::sled("reading the format version", e)),
    }
}

/// Migrates `tree` to [`CURRENT_FORMAT`]; returns the version it was found at.
pub fn run(tree: &sled::Tree) -> Result<u32, StoreError> {
    let found = format_version(tree)?;
    if found > CURRENT_FORMAT {
        return Err(StoreError::NewerFormat {
            found,
            supported: CURRENT_FORMAT,
        });
    }
    for m in MIGRATIONS.iter().filter(|m| m.to > found) {
        tracing::info!(to = m.to, name = m.name, "migrating store format");
        let mut batch = sled::Batch::default();
        (m.apply)(tree, &mut batch)?;
        batch.insert(keys::META_FORMAT, record::encode(&m.to)?);
        tree.apply_batch(batch)
            .map_err(|e| StoreError::sled(format!("applying migration {}", m.name), e))?;
        tree.flush()
            .map_err(|e| StoreError::sled(format!("flushing migration {}", m.name), e))?;
    }
    Ok(found)
}

/// Overwrites the stored format version (tests of the refusal path).
#[cfg(test)]
pub(crate) fn force_format(tree: &sled::Tree, version: u32) -> Result<(), StoreError> {
    tree.insert(keys::META_FORMAT, record::encode(&version)?)
        .map_err(|e| StoreError::sled("writing the format version", e))?;
    tree.flush()
        .map_err(|e| StoreError::sled("flushing", e))
        .map(drop)
}
