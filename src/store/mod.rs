//! The durable queue: an embedded sled database holding every accepted message until each
//! node it was queued for has it.
//!
//! # Durability contract
//!
//! 1. **Nothing is acked before the fsync that covers all of its writes.** Only the
//!    [`commit`] committer writes new messages (operator replays included; offline,
//!    [`inspect`]'s import and replay write one batch and sync it), and in [`Durability::Fsync`] mode it answers
//!    a round's callers only after [`Store::sync`] returned: sled's `flush()` (which ends in
//!    `sync_file_range`, enough against a process crash but not a power cut), then
//!    `fdatasync` of sled's log file. sled writes any page over a quarter of its segment
//!    size to a file under `blobs/` that it never fsyncs; message records are therefore
//!    chunked ([`record::MESSAGE_CHUNK`]) and segments are 8 MiB, so no page gets near
//!    that, and `sync` still fsyncs any blob file that appears, and its directory.
//! 2. **After any crash a message is fully enqueued for all its nodes, or not visible at
//!    all, and its dedupe entry never exists without it.** A commit round is one sled `Batch`
//!    on one tree (sled recovers a batch atomically): the message packs, one range record
//!    per node, the round's dedupe record and the next sequence number.
//! 3. **A payload is deleted only when no node queue and no dead letter refers to it.** Dead
//!    letters hold a full copy. A message pack is deleted only when its last sequence is
//!    below the low-water mark (the lowest unfinished sequence over every node's queue),
//!    computed from the store and made durable by a sync *before* the deletion is written;
//!    packs are keyed by their last sequence, so that is every key below `m/<lwm>`.
//! 4. **Opening a store of an older format migrates it; a newer or corrupt one is a clear
//!    error, never silent loss** ([`migrate`]). Every record carries a version byte and a
//!    CRC32C checked on read ([`record`]). Files sled cannot read, a store that comes up
//!    empty, or one with a lower sequence counter than the `clean-stop` file written at the
//!    last graceful stop ([`Store::mark_clean_stop`]) are refused at open
//!    ([`StoreError::Damaged`]); a record that fails its check when a worker reads it is
//!    moved to quarantine ([`Store::quarantine_message`]), never dropped.
//!
//! # Layout
//!
//! One sled tree, keyspaces by prefix (see [`keys`]); `<seq>` and times are big-endian u64.
//!
//! ```text
//! meta/format              u32            store format version
//! meta/manager_id          String         the manager this data dir belongs to
//! meta/next_seq            u64            next sequence number (written in every round)
//! m/<last>                 MessageHead    a pack of messages first..=last: its first chunk
//! m/<last><index>          Vec<u8>        its further chunks (messages over 64 KiB)
//! q/<node>\0<start>        RangeRecord    a node's share of one commit round
//! l/<node>\0<seq>          DeadLetterRecord
//! n/<node>                 NodeRecord     known nodes
//! r/<accepted_at><start>   DedupeRound    msg_ids of a round: the dedupe index (dedupe.rs)
//! o/<node>                 u64            since when a node is absent from etcd (ms)
//! a/<node>                 ArchiveProgress committed length of a retiring node's archive
//! x/<original key>         raw bytes      quarantined by `queue-dump verify --repair`
//! ```
//!
//! Fan-out costs one range record per node per commit round, not per message; payloads
//! cost one pack record per 16 KiB of messages ([`record::MessageHead`]), not one each.

mod cache;
pub mod commit;
mod dedupe;
pub mod inspect;
pub mod keys;
pub mod migrate;
#[cfg(test)]
mod model_tests;
mod reclaim;
pub mod record;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

pub use commit::{Accept, Accepted, CommitError, CommitHandle, Committer};
pub use inspect::{
    Filter, ImportItem, ImportOutcome, NodeSummary, Problem, QueueEntry, QueueKind, ReplayOutcome,
    VerifyReport,
};
pub use record::{
    ArchiveProgress, DeadLetterRecord, DedupeRecord, DedupeRound, MessageRecord, NodeRecord,
    RangeRecord,
};

/// Errors of the store. Each says which record or file is involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error from the disk or from sled.
    #[error("store I/O error while {what}: {source}")]
    Io {
        /// What the store was doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A record failed its checksum or could not be decoded.
    #[error("corrupt record {key}: {reason}")]
    Corrupt {
        /// The record's key, readable.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// sled itself reported corruption or an internal failure.
    #[error("store engine error while {what}: {reason}")]
    Engine {
        /// What the store was doing.
        what: String,
        /// sled's message.
        reason: String,
    },
    /// The store was written by a newer push-manager.
    #[error(
        "store format {found} is newer than this push-manager supports ({supported}); \
         run the newer version, or restore a backup made before the upgrade"
    )]
    NewerFormat {
        /// Format version found on disk.
        found: u32,
        /// Newest format this build reads.
        supported: u32,
    },
    /// Another process holds the store open.
    #[error(
        "the store in {dir} is locked by another process (a running manager?); \
         stop it, or inspect it through the running manager's admin API"
    )]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// The store's files are truncated or garbled beyond what sled recovers from on its
    /// own: refused at open, so that a damaged store is never served (or silently replaced
    /// by an empty one).
    #[error(
        "the store in {dir} is damaged: {reason}; the manager will not start on it. Restore \
         the data dir from a backup; if `queue-dump --data-dir {dir} verify` can open it, it \
         lists what is still readable (and `verify --repair` quarantines bad records); or \
         move the data dir aside to start empty (its messages are then not delivered)",
        dir = dir.display()
    )]
    Damaged {
        /// The data directory.
        dir: PathBuf,
        /// What is wrong, as far as the store can tell.
        reason: String,
    },
    /// A record could not be encoded (a bug, or a value over the codec's limits).
    #[error("cannot encode record: {reason}")]
    Encode {
        /// bincode's message.
        reason: String,
    },
}

impl StoreError {
    /// Whether trying the same operation later may succeed (I/O trouble such as a full
    /// disk), as opposed to corruption or a format problem that needs an operator.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Io { .. })
    }

    /// A short code for logs and metric labels.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::Io { .. } => "io",
            StoreError::Corrupt { .. } => "corrupt",
            StoreError::Engine { .. } => "engine",
            StoreError::NewerFormat { .. } => "newer_format",
            StoreError::Locked { .. } => "locked",
            StoreError::Damaged { .. } => "damaged",
            StoreError::Encode { .. } => "encode",
        }
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }

    fn sled(what: impl Into<String>, e: sled::Error) -> Self {
        match e {
            sled::Error::Io(source) => StoreError::io(what, source),
            other => StoreError::Engine {
                what: what.into(),
                reason: other.to_string(),
            },
        }
    }
}

/// When a commit round answers its callers relative to the fsync; see [`commit`].
pub use crate::config::Durability;

/// sled's segment size. sled writes a page larger than a quarter of it to a blob file of its
/// own, which it never fsyncs; message records are chunked ([`record::MESSAGE_CHUNK`]) so
/// that no page comes near a quarter of this.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;

/// sled's page cache, in bytes (its default is 1 GiB). Measured: with its default a manager
/// holding 300,000 queued 1 KiB messages had 453 MiB resident; the workers read a queue in
/// order, once, so a large cache buys little, and the OS page cache still holds the log.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// Messages a [`Store::shared_message`] miss reads ahead, about (whole packs are read).
const READ_AHEAD: u64 = 64;
/// A pack's head as found in the tree: `(last sequence, key, value)`.
type PackHead = (u64, sled::IVec, sled::IVec);

/// Bytes of records a read-ahead stops after.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// Messages a forward reader read ahead of its position ([`Store::next_message`]): at most
/// one read-ahead's worth (about [`READ_AHEAD`] messages and [`READ_AHEAD_BYTES`]).
#[derive(Default)]
pub struct ReadAhead(BTreeMap<u64, Arc<MessageRecord>>);

/// Handle to an open store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: sled::Db,
    /// sled's log file, kept open for `fdatasync`.
    log_file: File,
    /// Blob files already fsynced, by name; pruned to what still exists.
    synced_blobs: Mutex<BTreeSet<String>>,
    /// Known node ids, the set a commit round fans out to.
    known: RwLock<Arc<[String]>>,
    /// Opened with [`Store::open_read_only`]: the [`inspect`] writers refuse to run.
    read_only: bool,
    /// A [`Committer`] owns the sequence counter: offline writers ([`inspect`]) refuse.
    committer_running: AtomicBool,
    /// A write or sync failed with an I/O error: see [`Store::write_failed`].
    write_failed: AtomicBool,
    /// Held by a commit round (or replay) from reading the fan-out set until its batch is
    /// applied, and by [`Store::stop_fan_out`] and [`Store::remove_node`]: once a node has
    /// left the set, no round that read the old set can still write to its queue.
    fan_out_barrier: Mutex<()>,
    /// Decoded message records shared by the delivery workers ([`Store::shared_message`]).
    messages: cache::MessageCache,
    /// The dedupe index, loaded from the dedupe rounds at first use ([`Store::dedupe`]).
    dedupe: Mutex<Option<dedupe::DedupeIndex>>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the store under `data_dir/store`, migrating an older format.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_mode(data_dir, false)
    }

    /// Opens a store that this process closed a moment ago: [`Store::wait_unlocked`], then
    /// [`Store::open`].
    pub fn reopen(data_dir: &Path, wait: std::time::Duration) -> Result<Store, StoreError> {
        Self::wait_unlocked(data_dir, wait)?;
        Self::open(data_dir)
    }

    /// Waits up to `wait` until no handle holds the store's file lock, then returns; a store
    /// still locked then is [`StoreError::Locked`]. Blocks the calling thread.
    ///
    /// Why: sled's background threads keep the lock (an `flock` on `store/db`) for a short
    /// while after the last [`Store`] handle is dropped, so a process that closes a store and
    /// at once opens it again, or hands it to another process, must wait for this first.
    pub fn wait_unlocked(data_dir: &Path, wait: std::time::Duration) -> Result<(), StoreError> {
        let path = data_dir.join("store").join("db");
        let deadline = std::time::Instant::now() + wait;
        loop {
            let file = match std::fs::File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                other => {
                    other.map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?
                }
            };
            match file.try_lock() {
                // Dropping `file` releases the probe's own lock.
                Ok(()) => return Ok(()),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Locked {
                        dir: data_dir.to_path_buf(),
                    })
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::io(format!("locking {}", path.display()), e))
                }
            }
        }
    }

    /// Opens an existing store for reading only (`queue-dump`'s read-only commands): no
    /// directory is created, nothing is migrated or synced, and the [`inspect`] writers
    /// refuse. A store of an older format is refused: it needs a migration, which writes.
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_mode(data_dir, true)
    }

    fn open_mode(data_dir: &Path, read_only: bool) -> Result<Store, StoreError> {
        let dir = data_dir.join("store");
        if read_only && !dir.join("conf").exists() {
            return Err(StoreError::io(
                format!("opening {}", dir.display()),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "there is no push-manager store here; check --data-dir (it is the \
                     manager's data dir, the one holding store/)",
                ),
            ));
        }
        // sled's config file exists once a store was created here. Such a store must still
        // hold records after the open: sled takes a log truncated to nothing for a new store.
        let existed = dir.join("conf").exists();
        let clean_stop = read_clean_stop(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
        let damaged = |reason: String| StoreError::Damaged {
            dir: data_dir.to_path_buf(),
            reason,
        };
        let config = sled::Config::new()
            .path(&dir)
            .segment_size(SEGMENT_SIZE)
            .cache_capacity(CACHE_CAPACITY);
        // sled 0.34 may panic on a garbled file instead of returning an error; its recovery
        // runs on this thread, so the panic is caught here and refused like any damage.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("no message");
                damaged(format!("the storage engine failed reading it ({what})"))
            })?;
        let db = opened.map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked {
                    dir: data_dir.to_path_buf(),
                }
            }
            sled::Error::Io(ref io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
                ) =>
            {
                damaged(format!("the storage engine cannot read it: {io}"))
            }
            sled::Error::Corruption { .. } | sled::Error::ReportableBug(_) => {
                damaged(format!("the storage engine cannot read it: {e}"))
            }
            other => StoreError::sled(format!("opening {}", dir.display()), other),
        })?;
        if existed && db.is_empty() {
            return Err(damaged(
                "its files exist but hold no records (truncated, or replaced)".into(),
            ));
        }
        // sled takes a log cut short (truncated, or garbled part-way) for a torn write and
        // recovers the part before it, silently. After a clean stop nothing was torn: a
        // sequence counter below the one recorded then means records were lost.
        if let Some(recorded) = clean_stop {
            let found = match db.get(keys::META_NEXT_SEQ) {
                Ok(Some(v)) => record::decode::<u64>(keys::META_NEXT_SEQ, &v).ok(),
                _ => None,
            };
            if found.is_none_or(|n| n < recorded) {
                let found = found.map_or_else(|| "missing".to_string(), |n| n.to_string());
                return Err(damaged(format!(
                    "its sequence counter is {found} but was {recorded} when the manager last \
                     stopped cleanly: the log was truncated or garbled, and records are lost"
                )));
            }
        }
        // A format record that does not decode, or data without one, is damage too.
        let damaged_format = |e: StoreError| match e {
            StoreError::Corrupt { key, reason } => damaged(format!("record {key}: {reason}")),
            other => other,
        };
        if read_only {
            let found = migrate::format_version(&db).map_err(damaged_format)?;
            if found != migrate::CURRENT_FORMAT {
                return Err(StoreError::Engine {
                    what: format!("opening {} read-only", dir.display()),
                    reason: format!(
                        "its format is {found}, this build reads {}; run a command that \
                         writes (or start the manager once) to migrate it first",
                        migrate::CURRENT_FORMAT
                    ),
                });
            }
        } else {
            migrate::run(&db).map_err(damaged_format)?;
        }
        let log_path = dir.join("db");
        let log_file = File::open(&log_path)
            .map_err(|e| StoreError::io(format!("opening {}", log_path.display()), e))?;
        let store = Store {
            inner: Arc::new(Inner {
                dir,
                db,
                log_file,
                synced_blobs: Mutex::new(BTreeSet::new()),
                known: RwLock::new(Arc::from(Vec::new())),
                read_only,
                committer_running: AtomicBool::new(false),
                write_failed: AtomicBool::new(false),
                fan_out_barrier: Mutex::new(()),
                messages: cache::MessageCache::default(),
                dedupe: Mutex::new(None),
            }),
        };
        let known: Vec<String> = store.nodes()?.into_keys().collect();
        store.set_known(known);
        if read_only {
            return Ok(store);
        }
        // From here on the store changes: the clean-stop record no longer describes it.
        if clean_stop.is_some() {
            let marker = store.inner.dir.join(CLEAN_STOP_FILE);
            std::fs::remove_file(&marker)
                .map_err(|e| StoreError::io(format!("removing {}", marker.display()), e))?;
            sync_dir(&store.inner.dir)?;
        }
        // Everything sled created at open (its conf file, the log, the blobs dir) must
        // survive a power cut before the first ack relies on it.
        store.sync()?;
        sync_dir(&store.inner.dir)?;
        sync_dir(data_dir)?;
        Ok(store)
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn tree(&self) -> &sled::Db {
        &self.inner.db
    }

    fn get<T: bincode::Decode<()>>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tree().get(key) {
            Ok(Some(v)) => record::decode(key, &v).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(StoreError::sled(
                format!("reading {}", keys::display(key)),
                e,
            )),
        }
    }

    fn put<T: bincode::Encode>(&self, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = record::encode(value)?;
        self.tree()
            .insert(key, bytes)
            .map(drop)
            .map_err(|e| StoreError::sled(format!("writing {}", keys::display(key)), e))
    }

    fn apply(&self, batch: sled::Batch, what: &str) -> Result<(), StoreError> {
        self.tree()
            .apply_batch(batch)
            .map_err(|e| self.note_failure(StoreError::sled(what, e)))
    }

    /// Makes every write so far durable: sled flush, fsync of new blob files and the blobs
    /// directory, fdatasync of the log. See invariant 1.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.tree()
            .flush()
            .map_err(|e| self.note_failure(StoreError::sled("flushing the store", e)))?;
        self.sync_new_blobs().map_err(|e| self.note_failure(e))?;
        self.inner
            .log_file
            .sync_data()
            .map_err(|e| self.note_failure(StoreError::io("fdatasync of the store log", e)))
    }

    /// Remembers an I/O failure (see [`Store::write_failed`]) and passes the error on.
    fn note_failure(&self, e: StoreError) -> StoreError {
        if matches!(e, StoreError::Io { .. }) {
            self.inner
                .write_failed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        e
    }

    /// Whether a write or sync of this handle's store failed with an I/O error (a full
    /// disk, say). sled 0.34.7 then refuses every later write until the store is reopened,
    /// so the server reopens it once space is back (see `crate::server`).
    pub fn write_failed(&self) -> bool {
        self.inner
            .write_failed
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    fn sync_new_blobs(&self) -> Result<(), StoreError> {
        let blobs = self.inner.dir.join("blobs");
        let entries = match std::fs::read_dir(&blobs) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(StoreError::io(format!("listing {}", blobs.display()), e)),
        };
        let mut synced = self
            .inner
            .synced_blobs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut present = BTreeSet::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io("listing blobs", e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !synced.contains(&name) {
                match File::open(entry.path()) {
                    Ok(f) => f
                        .sync_all()
                        .map_err(|e| StoreError::io(format!("fsync of blob {name}"), e))?,
                    // sled removed a superseded blob in the meantime: nothing to make durable.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(format!("opening blob {name}"), e)),
                }
                any_new = true;
            }
            present.insert(name);
        }
        if any_new {
            sync_dir(&blobs)?;
        }
        *synced = present;
        Ok(())
    }

    // ----- meta -----

    /// The manager id stored in this data dir, if any.
    pub fn manager_id(&self) -> Result<Option<String>, StoreError> {
        self.get(keys::META_MANAGER_ID)
    }

    /// Stores the manager id (first start of a data dir) durably.
    pub fn set_manager_id(&self, id: &str) -> Result<(), StoreError> {
        self.put(keys::META_MANAGER_ID, &id.to_string())?;
        self.sync()
    }

    pub(crate) fn next_seq(&self) -> Result<u64, StoreError> {
        Ok(self.get::<u64>(keys::META_NEXT_SEQ)?.unwrap_or(1))
    }

    // ----- nodes -----

    /// Every known node, with its record. A node that has a queue but lost its record
    /// (which invariant 2 rules out, but a damaged store might show) is reported with an
    /// empty address rather than hidden, so its messages are not orphaned.
    pub fn nodes(&self) -> Result<BTreeMap<String, NodeRecord>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.tree().scan_prefix(keys::NODES) {
            let (k, v) = item.map_err(|e| StoreError::sled("scanning nodes", e))?;
            let id = String::from_utf8_lossy(&k[keys::NODES.len()..]).into_owned();
            out.insert(id, record::decode(&k, &v)?);
        }
        let mut key = keys::QUEUES.to_vec();
        while let Some((k, _)) = self
            .tree()
            .get_gt(&key)
            .map_err(|e| StoreError::sled("scanning queues", e))?
        {
            let Some(id) = keys::node_of_range(&k) else {
                break;
            };
            let id = id.to_string();
            key = keys::range(&id, u64::MAX);
            out.entry(id).or_insert_with(|| NodeRecord {
                addr: String::new(),
                first_seen_ms: 0,
                last_seen_ms: 0,
                is_static: false,
                held: false,
            });
        }
        Ok(out)
    }

    /// The node ids a commit round fans out to right now.
    pub fn known_nodes(&self) -> Arc<[String]> {
        self.inner
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_known(&self, ids: Vec<String>) {
        *self.inner.known.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(ids);
    }

    /// Records a node (new, or seen again at `addr`) and makes it part of the fan-out set.
    /// Its record is written before it can receive any message, so a queue never exists
    /// without its node (invariant 2).
    pub fn upsert_node(&self, id: &str, addr: &str, is_static: bool) -> Result<(), StoreError> {
        let now = now_ms();
        let rec = match self.get::<NodeRecord>(&keys::node(id))? {
            Some(mut r) => {
                r.addr = addr.to_string();
                r.last_seen_ms = now;
                r.is_static |= is_static;
                r
            }
            None => NodeRecord {
                addr: addr.to_string(),
                first_seen_ms: now,
                last_seen_ms: now,
                is_static,
                held: false,
            },
        };
        self.put(&keys::node(id), &rec)?;
        let mut known = self.known_nodes().to_vec();
        if !known.iter().any(|k| k == id) {
            known.push(id.to_string());
            known.sort();
            self.set_known(known);
        }
        Ok(())
    }

    /// Pauses or resumes deliveries to a known node, durably. Returns false if the node
    /// is unknown.
    pub fn set_held(&self, id: &str, held: bool) -> Result<bool, StoreError> {
        let key = keys::node(id);
        let Some(mut rec) = self.get::<NodeRecord>(&key)? else {
            return Ok(false);
        };
        rec.held = held;
        self.put(&key, &rec)?;
        self.sync()?;
        Ok(true)
    }

    // ----- dedupe -----

    /// Runs `f` on the dedupe index, loading it from the dedupe rounds first if this is the
    /// first use.
    fn with_dedupe<T>(
        &self,
        f: impl FnOnce(&mut dedupe::DedupeIndex) -> T,
    ) -> Result<T, StoreError> {
        let mut slot = self.inner.dedupe.lock().unwrap_or_else(|p| p.into_inner());
        let index = match &mut *slot {
            Some(index) => index,
            empty => empty.insert(self.read_dedupe_index()?),
        };
        Ok(f(index))
    }

    /// Builds the dedupe index from the dedupe rounds in the store.
    fn read_dedupe_index(&self) -> Result<dedupe::DedupeIndex, StoreError> {
        let started = std::time::Instant::now();
        let mut index = dedupe::DedupeIndex::new();
        for item in self.tree().scan_prefix(keys::DEDUPE_ROUNDS) {
            let (k, v) = item.map_err(|e| StoreError::sled("loading the dedupe index", e))?;
            match decode_round(&k, &v) {
                Ok((at, start, round)) => index.add_round(start, at, &round),
                // Its msg_ids are not deduplicated (at worst a retry is delivered twice);
                // expiry moves it to quarantine, and `queue-dump verify` reports it.
                Err(e) => {
                    tracing::error!(error = %e, "unreadable dedupe round left out of the index")
                }
            }
        }
        tracing::debug!(
            msg_ids = index.len(),
            elapsed = ?started.elapsed(),
            "dedupe index loaded"
        );
        Ok(index)
    }

    /// Loads the dedupe index now rather than at the first accept (the committer calls it
    /// before the manager reports SERVING).
    pub(crate) fn load_dedupe(&self) -> Result<(), StoreError> {
        self.with_dedupe(|_| ())
    }

    /// Where `msg_id` was last accepted, if its round's dedupe record is still in the store
    /// (expired or not: the caller compares `accepted_at_ms` with its window).
    pub fn dedupe(&self, msg_id: &str) -> Result<Option<DedupeRecord>, StoreError> {
        let mut candidates = self.with_dedupe(|ix| ix.candidates(msg_id))?;
        candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
        for (seq, start, round) in candidates {
            let key = keys::dedupe_round(round.accepted_at_ms, start);
            // Removed since the lookup: expired, so not a duplicate any more.
            let Some(rec) = self.get::<DedupeRound>(&key)? else {
                continue;
            };
            let at = usize::try_from(seq - start).unwrap_or(usize::MAX);
            if rec.msg_ids.get(at).is_some_and(|id| id == msg_id) {
                return Ok(Some(DedupeRecord {
                    seq,
                    node_count: rec.node_count,
                    accepted_at_ms: round.accepted_at_ms,
                }));
            }
        }
        Ok(None)
    }

    /// Adds a round the committer just applied (its dedupe record written at
    /// `r/<accepted_at_ms><start>`) to the dedupe index.
    pub(crate) fn index_round(
        &self,
        start: u64,
        accepted_at_ms: u64,
        round: &DedupeRound,
    ) -> Result<(), StoreError> {
        self.with_dedupe(|ix| ix.add_round(start, accepted_at_ms, round))
    }

    /// Removes dedupe rounds accepted at or before `cutoff_ms`, oldest first, a round at a
    /// time, stopping once `limit` msg_ids are gone (so one call passes it by less than one
    /// round, at most [`commit::MAX_ROUND`] msg_ids): the committer, which runs it, is never
    /// stalled for long. Returns the msg_ids removed.
    pub(crate) fn expire_dedupe(&self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let end = keys::dedupe_round(cutoff_ms, u64::MAX);
        let mut batch = sled::Batch::default();
        let mut gone = Vec::new();
        let mut removed = 0;
        for item in self.tree().range(keys::DEDUPE_ROUNDS.to_vec()..=end) {
            if removed >= limit {
                break;
            }
            let (k, v) = item.map_err(|e| StoreError::sled("scanning dedupe rounds", e))?;
            match decode_round(&k, &v) {
                Ok((_, start, round)) => {
                    removed += round.msg_ids.len().max(1);
                    batch.remove(k);
                    gone.push((start, round));
                }
                // Never in the index (see `read_dedupe_index`): kept for an operator.
                Err(e) => {
                    tracing::error!(error = %e, "unreadable dedupe round moved to quarantine");
                    inspect::quarantine(&mut batch, &k, &v);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            self.apply(batch, "expiring dedupe rounds")?;
            self.with_dedupe(|ix| {
                for (start, round) in &gone {
                    ix.remove_round(*start, round);
                }
            })?;
        }
        Ok(removed)
    }

    // ----- queues -----

    /// Up to `limit` ranges of `node` with a start above `after` (all when `None`).
    pub fn ranges(
        &self,
        node: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, RangeRecord)>, StoreError> {
        let from = match after {
            Some(s) if s < u64::MAX => keys::range(node, s + 1),
            Some(_) => return Ok(Vec::new()),
            None => keys::range_prefix(node),
        };
        let to = keys::range(node, u64::MAX);
        let mut out = Vec::new();
        for item in self.tree().range(from..=to).take(limit) {
            let (k, v) = item.map_err(|e| StoreError::sled("scanning a queue", e))?;
            let start = keys::trailing_u64(&k).ok_or_else(|| StoreError::Corrupt {
                key: keys::display(&k),
                reason: "queue key without a sequence number".into(),
            })?;
            let rec = match record::decode(&k, &v) {
                Ok(rec) => rec,
                Err(e @ StoreError::Corrupt { .. }) if !self.inner.read_only => {
                    self.rebuild_range(node, start, &k, &v, &e)?
                }
                Err(e) => return Err(e),
            };
            out.push((start, rec));
        }
        Ok(out)
    }

    /// Replaces an undecodable range record, met while reading `node`'s queue, so that it
    /// never blocks the queue: the raw bytes go to quarantine and the range is rebuilt with
    /// every entry pending, from `start` up to the node's next range (or the next sequence
    /// number). Nothing is lost; entries already delivered may be delivered again, and
    /// entries whose payload was already reclaimed are dead-lettered as missing.
    fn rebuild_range(
        &self,
        node: &str,
        start: u64,
        key: &[u8],
        value: &[u8],
        error: &StoreError,
    ) -> Result<RangeRecord, StoreError> {
        let next_range = self
            .tree()
            .range(keys::range(node, start.saturating_add(1))..=keys::range(node, u64::MAX))
            .keys()
            .next()
            .transpose()
            .map_err(|e| StoreError::sled("scanning a queue", e))?
            .and_then(|k| keys::trailing_u64(&k));
        let end = next_range.unwrap_or(self.next_seq()?);
        let len = end.saturating_sub(start).clamp(1, commit::MAX_ROUND as u64) as u32;
        let rebuilt = RangeRecord::new(len);
        let mut batch = sled::Batch::default();
        inspect::quarantine(&mut batch, key, value);
        batch.insert(key.to_vec(), record::encode(&rebuilt)?);
        self.apply(batch, "rebuilding a corrupt queue range")?;
        tracing::error!(
            node,
            key = %keys::display(key),
            %error,
            len,
            "corrupt queue range moved to quarantine and rebuilt with every entry pending"
        );
        Ok(rebuilt)
    }

    /// The message with sequence `seq`; `Ok(None)` if it does not exist. Read through the
    /// shared cache ([`Store::shared_message`]), so that reading a pack's messages one by one
    /// decodes the pack once.
    pub fn message(&self, seq: u64) -> Result<Option<MessageRecord>, StoreError> {
        Ok(self.shared_message(seq)?.map(|m| MessageRecord::clone(&m)))
    }

    /// The pack whose head record `head` is at `key` = `m/<last>` (see
    /// [`record::MessageHead`]), reading its further chunks: its first sequence and its
    /// messages.
    fn pack(
        &self,
        key: &[u8],
        last: u64,
        head: &[u8],
    ) -> Result<(u64, Vec<MessageRecord>), StoreError> {
        let head = record::decode::<record::MessageHead>(key, head)?;
        let chunks = head.chunks;
        let rest = (1..chunks).map(|i| {
            let k = keys::message_chunk(last, i);
            self.get::<Vec<u8>>(&k)?.ok_or_else(|| StoreError::Corrupt {
                key: keys::display(key),
                reason: format!("chunk {i} of {chunks} is missing"),
            })
        });
        let messages = record::decode_pack(key, last, head, rest)?;
        // decode_pack checked that the pack fits below `last`.
        Ok((last + 1 - messages.len() as u64, messages))
    }

    /// The first message pack head at or after `m/<seq>`, as `(last, key, value)`: the pack
    /// that holds `seq` if any does (packs never overlap and are keyed by their last
    /// sequence). Continuation chunks met first (their head is missing) are skipped.
    fn pack_head_from(&self, prefix: &[u8], seq: u64) -> Result<Option<PackHead>, StoreError> {
        let mut from = prefix.to_vec();
        from.extend_from_slice(&keys::message(seq));
        for item in self.tree().range(from..) {
            let (k, v) = item.map_err(|e| StoreError::sled("reading messages", e))?;
            let Some(key) = k.strip_prefix(prefix) else {
                break;
            };
            match keys::parse_message(key) {
                Some((last, true)) => return Ok(Some((last, k, v))),
                Some((_, false)) => continue,
                None => break,
            }
        }
        Ok(None)
    }

    /// [`Store::message`] through the cache the delivery workers share (see
    /// `store/cache.rs`): one read and decode per message, whatever the number of nodes. A
    /// miss decodes the whole pack holding `seq` and reads ahead: the packs after it (up to
    /// about [`READ_AHEAD`] messages and [`READ_AHEAD_BYTES`]) come in the same range scan,
    /// which costs far less than a lookup each, and workers read their queues in sequence
    /// order.
    pub fn shared_message(&self, seq: u64) -> Result<Option<Arc<MessageRecord>>, StoreError> {
        self.next_message(seq, &mut ReadAhead::default())
    }

    /// [`Store::shared_message`] for a reader going forward in sequence order (a delivery
    /// worker): what a miss reads ahead is also kept in `ahead`, the reader's own, and served
    /// from there first.
    ///
    /// Why: the shared cache evicts the lowest sequences first. With many nodes far apart in
    /// their queues (more than the cache holds between the first and the last), the slowest
    /// readers' read-ahead was evicted by the others' before they reached it, so every
    /// message cost them a pack decode: measured with 100 nodes draining 60,000 messages,
    /// one run in three drained at 14,900 instead of ~150,000 deliveries/s with the manager
    /// on both cores throughout.
    pub fn next_message(
        &self,
        seq: u64,
        kept: &mut ReadAhead,
    ) -> Result<Option<Arc<MessageRecord>>, StoreError> {
        while let Some(first) = kept.0.first_entry() {
            if *first.key() > seq {
                break;
            }
            if *first.key() == seq {
                return Ok(Some(first.remove()));
            }
            first.remove();
        }
        if let Some(m) = self.inner.messages.get(seq) {
            return Ok(Some(m));
        }
        // Whatever is left is ahead of a sequence this reader skipped to: stale.
        kept.0.clear();
        let mut found = None;
        let (mut ahead, mut bytes) = (0u64, 0usize);
        for item in self.tree().range(keys::message(seq)..) {
            let (k, v) = item.map_err(|e| StoreError::sled("reading messages", e))?;
            // Continuation chunks are read with their head; a chunk met before any head has
            // lost its head, and the pack holding `seq` (if any) comes later.
            let (last, is_head) = match keys::parse_message(&k) {
                Some(parsed) => parsed,
                None => break,
            };
            if !is_head {
                continue;
            }
            let (first, messages) = match self.pack(&k, last, &v) {
                Ok(p) => p,
                // The first head at or after `seq` is the pack that holds it: its error is
                // `seq`'s. (A sequence held by no pack, deleted or never written, is not
                // asked for by any reader but a dead one.)
                Err(e) if ahead == 0 && found.is_none() => return Err(e),
                // A bad pack further on is reported when its own turn comes.
                Err(_) => break,
            };
            if first > seq && found.is_none() {
                // No pack holds `seq`.
                return Ok(None);
            }
            for (at, m) in (first..).zip(messages) {
                let m = Arc::new(m);
                bytes += m.size();
                if at == seq {
                    found = Some(m.clone());
                }
                if at > seq {
                    ahead += 1;
                    kept.0.insert(at, m.clone());
                }
                self.inner.messages.insert(at, m);
            }
            if ahead >= READ_AHEAD || bytes >= READ_AHEAD_BYTES {
                break;
            }
        }
        Ok(found)
    }

    /// Every readable message with its sequence, in sequence order; a pack that cannot be
    /// read is skipped (reporting it is `queue-dump verify`'s business).
    pub(crate) fn readable_messages(&self) -> Result<Vec<(u64, MessageRecord)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree().scan_prefix(keys::MESSAGES) {
            let (k, v) = item.map_err(|e| StoreError::sled("scanning messages", e))?;
            let Some((last, true)) = keys::parse_message(&k) else {
                continue;
            };
            if let Ok((first, messages)) = self.pack(&k, last, &v) {
                out.extend((first..).zip(messages));
            }
        }
        Ok(out)
    }

    /// Adds the writes of message `seq`, a pack of its own, to `batch`.
    fn put_message(
        batch: &mut sled::Batch,
        seq: u64,
        msg: &MessageRecord,
    ) -> Result<(), StoreError> {
        let mut packs = record::PackWriter::default();
        packs.push(seq, &record::encode_message(msg)?);
        for (k, v) in packs.finish()? {
            batch.insert(k, v);
        }
        Ok(())
    }

    /// Saves a node's progress on one range, deleting the range once it is complete.
    pub fn save_range(&self, node: &str, start: u64, rec: &RangeRecord) -> Result<(), StoreError> {
        let key = keys::range(node, start);
        if rec.is_complete() {
            self.tree()
                .remove(&key)
                .map(drop)
                .map_err(|e| StoreError::sled(format!("removing {}", keys::display(&key)), e))
        } else {
            self.put(&key, rec)
        }
    }

    /// Moves one entry to `node`'s dead letters: the dead letter (a full copy) and the
    /// range's progress are written in one batch, so the entry is in exactly one place.
    pub fn dead_letter(
        &self,
        node: &str,
        start: u64,
        range: &RangeRecord,
        dead: &DeadLetterRecord,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(keys::dead(node, dead.seq), record::encode(dead)?);
        let key = keys::range(node, start);
        if range.is_complete() {
            batch.remove(key);
        } else {
            batch.insert(key, record::encode(range)?);
        }
        self.apply(batch, "writing a dead letter")
    }

    /// `node`'s dead letters in sequence order.
    pub fn dead_letters(&self, node: &str) -> Result<Vec<DeadLetterRecord>, StoreError> {
        self.tree()
            .scan_prefix(keys::dead_prefix(node))
            .map(|item| {
                let (k, v) = item.map_err(|e| StoreError::sled("scanning dead letters", e))?;
                record::decode(&k, &v)
            })
            .collect()
    }

    /// Lowest sequence some node still needs: the first unfinished entry of each node's
    /// first range, or `next_seq` when every queue is empty.
    pub(crate) fn low_water_mark(&self, next_seq: u64) -> Result<u64, StoreError> {
        let mut lwm = next_seq;
        for node in self.nodes()?.keys() {
            if let Some((start, rec)) = self.ranges(node, None, 1)?.into_iter().next() {
                let first = rec
                    .pending()
                    .next()
                    .map_or(start + u64::from(rec.len), |o| start + u64::from(o));
                lwm = lwm.min(first);
            }
        }
        Ok(lwm)
    }

    /// Deletes message records with a sequence below `lwm`, at most `limit` per call.
    /// Callers must have synced the state `lwm` was computed from (invariant 3). One remove
    /// per record, not a batch: a batch holds the tree's write lock while it applies, and
    /// the reclaimer runs this beside commit rounds ([`reclaim`]). Nothing needs the
    /// removes to be atomic: a record left over is removed by the next call.
    pub(crate) fn delete_messages_below(
        &self,
        lwm: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let gone = self
            .tree()
            .range(keys::MESSAGES.to_vec()..keys::message(lwm))
            .keys()
            .take(limit)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::sled("scanning messages", e))?;
        for key in &gone {
            self.tree().remove(key).map_err(|e| {
                self.note_failure(StoreError::sled("deleting delivered messages", e))
            })?;
        }
        self.inner.messages.forget_below(lwm);
        Ok(gone.len())
    }

    /// Number of readable messages stored (for tests and tools; decodes every pack).
    pub fn message_count(&self) -> usize {
        self.readable_messages().map_or(0, |m| m.len())
    }

    // ----- membership lifecycle (src/discovery) -----
    //
    // A node absent from etcd keeps its queue and keeps receiving broadcasts; its absence
    // is recorded (`o/<node>`) so that `offline_retention` counts across restarts. Once
    // the retention is over, discovery archives the queue page by page ([`Store::entries`]
    // to read, [`Store::remove_archived`] to drop what was archived) and then removes the
    // node ([`Store::remove_node`]). See `crate::discovery::retire` for the order.

    /// Every node recorded as absent from etcd, with the time (ms since the Unix epoch)
    /// its absence was first seen.
    pub fn node_absences(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.tree().scan_prefix(keys::ABSENT) {
            let (k, v) = item.map_err(|e| StoreError::sled("scanning node absences", e))?;
            let id = String::from_utf8_lossy(&k[keys::ABSENT.len()..]).into_owned();
            out.insert(id, record::decode::<u64>(&k, &v)?);
        }
        Ok(out)
    }

    /// Records that `node` is absent from etcd since `since_ms`, or (`None`) that it is
    /// registered again. Not synced on its own: the next commit round or sync covers it,
    /// and a lost mark only restarts the retention clock later, never earlier.
    pub fn set_node_absent(&self, node: &str, since_ms: Option<u64>) -> Result<(), StoreError> {
        let key = keys::absent(node);
        match since_ms {
            Some(ms) => self.put(&key, &ms),
            None => self
                .tree()
                .remove(&key)
                .map(drop)
                .map_err(|e| StoreError::sled(format!("removing {}", keys::display(&key)), e)),
        }
    }

    /// Takes `node` out of the set commit rounds fan out to (in memory only): the first
    /// step of retiring it, so that its queue stops growing. Its record stays until
    /// [`Store::remove_node`]; a restart before that makes it known again.
    ///
    /// Waits for a commit round that read the set before the change to apply its batch
    /// (the fan-out barrier), so that when this returns every entry the node will ever get
    /// is in the store.
    pub fn stop_fan_out(&self, node: &str) {
        let _barrier = self.fan_out_barrier();
        self.stop_fan_out_locked(node);
    }

    /// The fan-out barrier: see [`Inner::fan_out_barrier`]. Never held across an await or
    /// while taking the `known` lock for writing elsewhere than in `stop_fan_out_locked`.
    pub(crate) fn fan_out_barrier(&self) -> MutexGuard<'_, ()> {
        self.inner
            .fan_out_barrier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn stop_fan_out_locked(&self, node: &str) {
        let mut known = self.inner.known.write().unwrap_or_else(|p| p.into_inner());
        let rest: Vec<String> = known
            .iter()
            .filter(|k| k.as_str() != node)
            .cloned()
            .collect();
        *known = Arc::from(rest);
    }

    /// Drops the part of `node`'s queues that was archived: every live entry with a
    /// sequence up to `live_through` (a range reaching past it keeps its later entries) and
    /// every dead letter up to `dead_through`, in one batch, then syncs. Message records are
    /// left to the usual low-water-mark reclamation (invariant 3). At most `limit` ranges
    /// and `limit` dead letters are touched per call; returns how many keys changed, so a
    /// caller loops until 0.
    ///
    /// `progress`, when given, is written in the same batch: the archive's committed length
    /// moves exactly when the entries it covers leave the store, so a crash on either side
    /// of this call neither loses nor repeats a line (see `crate::discovery::retire`).
    pub fn remove_archived(
        &self,
        node: &str,
        live_through: Option<u64>,
        dead_through: Option<u64>,
        limit: usize,
        progress: Option<&ArchiveProgress>,
    ) -> Result<usize, StoreError> {
        let mut batch = sled::Batch::default();
        let mut changed = 0;
        if let Some(through) = live_through {
            for (start, mut rec) in self.ranges(node, None, limit)? {
                if start > through {
                    break;
                }
                let last = start + u64::from(rec.len.max(1)) - 1;
                let key = keys::range(node, start);
                if last <= through {
                    batch.remove(key);
                } else {
                    for off in 0..=u32::try_from(through - start).unwrap_or(u32::MAX) {
                        rec.set_done(off);
                    }
                    batch.insert(key, record::encode(&rec)?);
                }
                changed += 1;
            }
        }
        if let Some(through) = dead_through {
            let from = keys::dead(node, 0);
            let to = keys::dead(node, through);
            for item in self.tree().range(from..=to).keys().take(limit) {
                batch.remove(item.map_err(|e| StoreError::sled("scanning dead letters", e))?);
                changed += 1;
            }
        }
        if let Some(p) = progress {
            batch.insert(keys::archive_progress(node), record::encode(p)?);
        }
        if changed > 0 || progress.is_some() {
            self.apply(batch, "removing an archived queue")?;
            self.sync()?;
        }
        Ok(changed)
    }

    /// The committed length of `node`'s archive, if a retirement of it has started.
    pub fn archive_progress(&self, node: &str) -> Result<Option<ArchiveProgress>, StoreError> {
        self.get(&keys::archive_progress(node))
    }

    /// Records (and syncs) the committed length of `node`'s archive before a retirement
    /// writes its first line.
    pub fn set_archive_progress(
        &self,
        node: &str,
        progress: &ArchiveProgress,
    ) -> Result<(), StoreError> {
        self.put(&keys::archive_progress(node), progress)?;
        self.sync()
    }

    /// Up to `limit` of `node`'s dead letters with a sequence at or above `from_seq`, in
    /// sequence order (a bounded [`Store::dead_letters`]).
    pub fn dead_letters_from(
        &self,
        node: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<DeadLetterRecord>, StoreError> {
        self.tree()
            .range(keys::dead(node, from_seq)..=keys::dead(node, u64::MAX))
            .take(limit)
            .map(|item| {
                let (k, v) = item.map_err(|e| StoreError::sled("scanning dead letters", e))?;
                record::decode(&k, &v)
            })
            .collect()
    }

    /// Removes a retired node: its record and absence mark, and it leaves the fan-out set.
    /// Refuses (returns false, changes nothing) while the node still has live entries or
    /// dead letters: those must be archived first, so a queue is never dropped silently.
    ///
    /// The check and the removal hold the fan-out barrier, so no commit round can add an
    /// entry in between.
    pub fn remove_node(&self, node: &str) -> Result<bool, StoreError> {
        let barrier = self.fan_out_barrier();
        let has_live = !self.ranges(node, None, 1)?.is_empty();
        let has_dead = self
            .tree()
            .scan_prefix(keys::dead_prefix(node))
            .next()
            .transpose()
            .map_err(|e| StoreError::sled("scanning dead letters", e))?
            .is_some();
        if has_live || has_dead {
            return Ok(false);
        }
        self.stop_fan_out_locked(node);
        let mut batch = sled::Batch::default();
        batch.remove(keys::node(node));
        batch.remove(keys::absent(node));
        batch.remove(keys::archive_progress(node));
        self.apply(batch, "removing a retired node")?;
        drop(barrier);
        self.sync()?;
        Ok(true)
    }
}

/// A dedupe round record read from the tree: `(accepted_at_ms, start, round)`.
fn decode_round(key: &[u8], value: &[u8]) -> Result<(u64, u64, DedupeRound), StoreError> {
    let (at, start) = keys::parse_round(key).ok_or_else(|| StoreError::Corrupt {
        key: keys::display(key),
        reason: "a dedupe round key of unexpected length".into(),
    })?;
    Ok((at, start, record::decode(key, value)?))
}

/// File in the store directory written at a clean stop ([`Store::mark_clean_stop`]) and
/// removed by the next open for writing: `next_seq <n>`.
const CLEAN_STOP_FILE: &str = "clean-stop";

/// The sequence counter recorded at the last clean stop, if the store was stopped cleanly
/// and not opened for writing since. An unreadable record is ignored (it only enables a
/// check).
fn read_clean_stop(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(CLEAN_STOP_FILE)).ok()?;
    text.trim().strip_prefix("next_seq ")?.parse().ok()
}

impl Store {
    /// Syncs the store and records, durably, its sequence counter in the store directory:
    /// the next open then refuses the store (as [`StoreError::Damaged`]) if its files lost
    /// records since, which sled alone would take for a torn write and hide. Call it once
    /// every writer has stopped (the end of a graceful shutdown).
    pub fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.sync()?;
        let next = self.next_seq()?;
        let path = self.inner.dir.join(CLEAN_STOP_FILE);
        let written = File::create(&path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, format!("next_seq {next}\n").as_bytes())?;
            f.sync_all()
        });
        written.map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        sync_dir(&self.inner.dir)
    }
}

/// fsync of a directory, so that files created or removed in it survive a power cut.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("fsync of directory {}", dir.display()), e))
}
