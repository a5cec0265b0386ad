//! Retiring a node that stayed absent from etcd for `offline_retention`: its queue is
//! archived to a JSON-lines file under the data dir, in the format of `queue-dump export`
//! ([`ExportRecord`], so `queue-dump import` can queue it again), then removed from the
//! store. Nothing is dropped without being in the archive first; an entry whose message
//! record cannot be read (a damaged store) has nothing to archive and is logged as an error
//! with its sequence number instead.
//!
//! # Order (each step durable before the next)
//!
//! 1. ([`super::membership::Membership::begin_retirement`]) the node leaves the fan-out set,
//!    so its queue stops growing.
//! 2. Its delivery worker is removed ([`Dispatcher::remove_node`]): it writes its progress
//!    back and exits, so no in-memory state of it can touch the queue afterwards.
//! 3. Page by page ([`PAGE_ENTRIES`] entries or [`PAGE_BYTES`] of payload at most, one
//!    message in memory at a time, in a blocking task, with a yield between pages so the
//!    accept path and the other nodes never wait for a whole queue): the lines are
//!    appended to `<data_dir>/archive/<node>.<absent_since_ms>.jsonl`, the file is
//!    fsynced, and only then is the archived part removed from the store
//!    ([`Store::remove_archived`], synced). Live entries first, then dead letters.
//! 4. ([`Store::remove_node`], called by the discovery task) the node's record and absence
//!    mark go, which the store refuses while any entry is left: an entry written by a
//!    commit round that raced step 1 is archived by another pass instead of being lost.
//!
//! A crash or shutdown in the middle leaves the node's record and absence mark in place,
//! so the next start resumes the retirement, appending to the same file (its name depends
//! only on the node and its absence start). A crash between a page's fsync and the store's
//! sync can repeat that page's lines; `(node_id, seq)` identifies a line.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::store::{Store, StoreError};

use super::DiscoveryError;
use crate::report::ExportRecord;
use crate::store::{QueueEntry, QueueKind};

/// Most entries archived per step.
pub const PAGE_ENTRIES: usize = 1000;
/// Most payload bytes archived per step (a step ends after the entry that crosses it).
pub const PAGE_BYTES: u64 = 16 << 20;
/// Ranges read per step; a range holds one commit round's share.
const PAGE_RANGES: usize = 64;

/// What a finished archive pass wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveReport {
    /// The archive file.
    pub path: PathBuf,
    /// Live entries archived in this pass.
    pub live: u64,
    /// Dead letters archived in this pass.
    pub dead_letters: u64,
    /// Entries dropped from the queue without a line because their message record could
    /// not be read (each logged as an error).
    pub unreadable: u64,
}

/// `<archive_dir>/<node>.<absent_since_ms>.jsonl`: the same file when a retirement resumes.
pub fn archive_path(archive_dir: &Path, node: &str, absent_since_ms: u64) -> PathBuf {
    archive_dir.join(format!("{node}.{absent_since_ms}.jsonl"))
}

/// Steps 2 and 3 of the module docs for `node`. Returns `None` when `stop` fired before
/// the queue was empty (the retirement resumes at the next start).
pub async fn archive_queue(
    store: Store,
    dispatcher: Arc<Dispatcher>,
    node: String,
    absent_since_ms: u64,
    archive_dir: PathBuf,
    stop: CancellationToken,
) -> Result<Option<ArchiveReport>, DiscoveryError> {
    dispatcher.remove_node(&node).await;
    let path = archive_path(&archive_dir, &node, absent_since_ms);
    let file = {
        let (dir, path) = (archive_dir.clone(), path.clone());
        blocking(move || open_archive(&dir, &path)).await??
    };
    let file = Arc::new(file);
    let mut report = ArchiveReport {
        path: path.clone(),
        live: 0,
        dead_letters: 0,
        unreadable: 0,
    };
    loop {
        if stop.is_cancelled() {
            return Ok(None);
        }
        let (store, node, file, path) = (store.clone(), node.clone(), file.clone(), path.clone());
        let page = blocking(move || archive_page(&store, &node, &file, &path)).await??;
        if page == Page::default() {
            return Ok(Some(report));
        }
        report.live += page.live;
        report.dead_letters += page.dead_letters;
        report.unreadable += page.unreadable;
        tokio::task::yield_now().await;
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, DiscoveryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DiscoveryError::Internal(format!("a retirement step failed to run: {e}")))
}

fn open_archive(dir: &Path, path: &Path) -> Result<File, DiscoveryError> {
    let err = |source| DiscoveryError::Archive {
        path: path.display().to_string(),
        source,
    };
    let created_dir = !dir.exists();
    std::fs::create_dir_all(dir).map_err(err)?;
    let created = !path.exists();
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    // The file's name must survive a power cut as well as its lines.
    if created {
        sync_dir(dir).map_err(err)?;
    }
    if created_dir {
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(err)?;
        }
    }
    Ok(file)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// What one step archived.
#[derive(Debug, Default, PartialEq, Eq)]
struct Page {
    live: u64,
    dead_letters: u64,
    unreadable: u64,
}

/// Writes `entry` as an export line, or logs why it cannot be (its message is unreadable).
/// Returns whether a line was written.
fn write_entry(
    out: &mut impl Write,
    entry: &QueueEntry,
    path: &Path,
) -> Result<bool, DiscoveryError> {
    let Some(record) = ExportRecord::from_entry(entry) else {
        tracing::error!(node = %entry.node, seq = entry.seq, queue = entry.kind.label(),
                        problem = entry.problem.as_deref().unwrap_or("no message"),
                        "retiring: this entry's message record is unreadable; nothing to archive");
        return Ok(false);
    };
    let archive_err = |source| DiscoveryError::Archive {
        path: path.display().to_string(),
        source,
    };
    let line = serde_json::to_string(&record).map_err(|e| archive_err(e.into()))?;
    writeln!(out, "{line}").map_err(archive_err)?;
    Ok(true)
}

/// One step: archives and removes up to a page of live entries or, once none is left, of
/// dead letters. An empty [`Page`] means the queue is empty.
fn archive_page(
    store: &Store,
    node: &str,
    file: &File,
    path: &Path,
) -> Result<Page, DiscoveryError> {
    let io_err = |source| DiscoveryError::Archive {
        path: path.display().to_string(),
        source,
    };
    let store_err = |what: &str| {
        let what = format!("{what} of retired node {node}");
        move |e| DiscoveryError::store(what, e)
    };
    let mut out = BufWriter::new(file);
    let mut page = Page::default();
    let mut count = 0usize;
    let mut bytes = 0u64;
    let mut last = None;

    'page: for (start, range) in store
        .ranges(node, None, PAGE_RANGES)
        .map_err(store_err("reading the queue"))?
    {
        for off in range.pending() {
            let seq = start + u64::from(off);
            let attempts = range
                .attempts
                .iter()
                .find(|(o, _)| *o == off)
                .map_or(0, |(_, a)| *a);
            let (message, problem) = match store.message(seq) {
                Ok(Some(m)) => (Some(m), None),
                Ok(None) => (None, Some(format!("message record m/{seq} is missing"))),
                Err(e @ StoreError::Corrupt { .. }) => (None, Some(e.to_string())),
                Err(e) => return Err(store_err("reading a message")(e)),
            };
            bytes += message.as_ref().map_or(0, |m| m.payload.len() as u64);
            let entry = QueueEntry {
                node: node.to_string(),
                kind: QueueKind::Live,
                seq,
                attempts,
                message,
                problem,
                dead_reason: None,
                dead_at_ms: None,
            };
            match write_entry(&mut out, &entry, path)? {
                true => page.live += 1,
                false => page.unreadable += 1,
            }
            count += 1;
            last = Some(seq);
            if count >= PAGE_ENTRIES || bytes >= PAGE_BYTES {
                break 'page;
            }
        }
    }
    if let Some(through) = last {
        finish(out, io_err)?;
        store
            .remove_archived(node, Some(through), None, PAGE_RANGES)
            .map_err(store_err("removing the archived queue"))?;
        return Ok(page);
    }

    let dead = store
        .dead_letters_from(node, 0, PAGE_ENTRIES)
        .map_err(store_err("reading dead letters"))?;
    let Some(through) = dead.last().map(|d| d.seq) else {
        // Entries that are all finished but whose range was not deleted yet.
        store
            .remove_archived(node, Some(u64::MAX), None, PAGE_RANGES)
            .map_err(store_err("removing finished ranges"))?;
        return Ok(page);
    };
    for d in dead {
        let entry = QueueEntry {
            node: node.to_string(),
            kind: QueueKind::DeadLetter,
            seq: d.seq,
            attempts: d.attempts,
            problem: d
                .message
                .is_none()
                .then(|| "the message was unreadable when it was dead-lettered".to_string()),
            message: d.message,
            dead_reason: Some(d.reason),
            dead_at_ms: Some(d.dead_at_ms),
        };
        match write_entry(&mut out, &entry, path)? {
            true => page.dead_letters += 1,
            false => page.unreadable += 1,
        }
    }
    finish(out, io_err)?;
    store
        .remove_archived(node, None, Some(through), PAGE_ENTRIES)
        .map_err(store_err("removing archived dead letters"))?;
    Ok(page)
}

/// Flushes and fsyncs the page's lines: the store may drop them only after this.
fn finish(
    out: BufWriter<&File>,
    io_err: impl Fn(std::io::Error) -> DiscoveryError,
) -> Result<(), DiscoveryError> {
    let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_data().map_err(io_err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dispatch::DeliveryConfig;
    use crate::store::commit::CommitOptions;
    use crate::store::{Accept, Committer, Durability};
    use std::time::Duration;
    use tokio::sync::watch;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queue_is_archived_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.upsert_node("gone", "127.0.0.1:1", false).unwrap();
        store.upsert_node("stays", "127.0.0.1:2", false).unwrap();
        let (tx, rx) = watch::channel(0);
        let (commit, thread) = Committer::spawn(
            store.clone(),
            CommitOptions {
                durability: Durability::Fsync,
                dedupe_window: Duration::from_secs(600),
            },
            tx,
        )
        .unwrap();
        let n = PAGE_ENTRIES + 10;
        for i in 0..n {
            commit
                .accept(Accept {
                    msg_id: Some(format!("m-{i}")),
                    topic: "t".into(),
                    headers: vec![],
                    payload: vec![b'x'; 10],
                    ttl_ms: 0,
                })
                .await
                .unwrap();
        }
        let d = Arc::new(Dispatcher::new(
            store.clone(),
            DeliveryConfig {
                manager_id: "m".into(),
                max_in_flight: 1,
                max_attempts: 1,
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_millis(10),
                delivery_timeout: Duration::from_secs(1),
            },
            rx,
            tokio_util::sync::CancellationToken::new(),
        ));
        d.node_seen("gone", "127.0.0.1:1", false);
        d.node_offline("gone");

        store.stop_fan_out("gone");
        let archive = dir.path().join("archive");
        let report = archive_queue(
            store.clone(),
            d.clone(),
            "gone".into(),
            42,
            archive.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(report.live, n as u64);
        assert_eq!(report.path, archive.join("gone.42.jsonl"));
        let text = std::fs::read_to_string(&report.path).unwrap();
        let lines: Vec<ExportRecord> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), n);
        assert_eq!(lines[0].msg_id, "m-0");
        assert_eq!(lines[n - 1].msg_id, format!("m-{}", n - 1));
        assert!(lines
            .iter()
            .all(|l| l.node_id == "gone" && l.queue == "live"));
        let item = ExportRecord::parse(text.lines().next().unwrap()).unwrap();
        assert_eq!(
            item.message.payload,
            vec![b'x'; 10],
            "queue-dump import reads it"
        );

        assert!(store.ranges("gone", None, 1).unwrap().is_empty());
        assert!(store.remove_node("gone").unwrap());
        assert!(!store.nodes().unwrap().contains_key("gone"));
        assert_eq!(&*store.known_nodes(), ["stays"]);
        assert!(
            !store.ranges("stays", None, 1).unwrap().is_empty(),
            "others untouched"
        );
        commit.stop().await.unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn remove_node_refuses_while_entries_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.upsert_node("n", "127.0.0.1:1", false).unwrap();
        store
            .save_range("n", 5, &crate::store::RangeRecord::new(3))
            .unwrap();
        assert!(!store.remove_node("n").unwrap());
        assert!(store.nodes().unwrap().contains_key("n"));
        assert_eq!(store.remove_archived("n", Some(6), None, 8).unwrap(), 1);
        let left = store.ranges("n", None, 8).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].1.pending().collect::<Vec<_>>(),
            [2],
            "only seq 7 is left"
        );
        assert_eq!(store.remove_archived("n", Some(7), None, 8).unwrap(), 1);
        assert!(store.remove_node("n").unwrap());
    }
}
