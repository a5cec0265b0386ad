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
//! 3. Page by page ([`PAGE_ENTRIES`] entries (or [`PAGE_ENTRIES_ENV`]) or [`PAGE_BYTES`] of
//!    payload at most, one message in memory at a time, in a blocking task, with a yield
//!    between pages so the accept path and the other nodes never wait for a whole queue):
//!    the lines are appended to `<data_dir>/archive/<node>.<absent_since_ms>.jsonl`, the
//!    file is fsynced, and only then is the archived part removed from the store
//!    ([`Store::remove_archived`], synced) **in the same batch as the file's new committed
//!    length** ([`ArchiveProgress`], key `a/<node>`). Live entries first, then dead letters.
//! 4. ([`Store::remove_node`], called by the discovery task) the node's record and absence
//!    mark go, which the store refuses while any entry is left: an entry written by a
//!    commit round that raced step 1 is archived by another pass instead of being lost.
//!
//! A crash or shutdown in the middle leaves the node's record and absence mark in place,
//! so the next start resumes the retirement, appending to the same file (its name depends
//! only on the node and its absence start). **Exactly once**: before its first line a
//! retirement records the file's length as committed; a resumed one first truncates the
//! file to the committed length. Lines past it belong to a page whose removal from the
//! store never became durable (a crash between the page's fsync and the store's), so
//! those entries are still queued and are written again, once. The committed length and
//! the removal move in one atomic batch, so no crash point loses or repeats a line.
//!
//! Step 1 is a barrier with the committer ([`Store::stop_fan_out`]): a commit round that
//! read the fan-out set before the node left it has applied its batch when step 1 returns,
//! so step 3 sees its entries; [`Store::remove_node`] checks and removes under the same
//! barrier.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::store::{ArchiveProgress, Store, StoreError};

use super::DiscoveryError;
use crate::report::ExportRecord;
use crate::store::{QueueEntry, QueueKind};

/// Most entries archived per step.
pub const PAGE_ENTRIES: usize = 1000;
/// Environment variable overriding [`PAGE_ENTRIES`] (a positive integer): a tuning and
/// testing knob, read once per retirement pass; the crash test uses small pages to stop a
/// manager in the middle of a long retirement.
pub const PAGE_ENTRIES_ENV: &str = "PUSH_MANAGER_RETIRE_PAGE_ENTRIES";
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
    let page_entries = page_entries();
    let (file, mut offset) = {
        let (dir, path, store, node) = (
            archive_dir.clone(),
            path.clone(),
            store.clone(),
            node.clone(),
        );
        blocking(move || {
            let file = open_archive(&dir, &path)?;
            let offset = resume_at(&store, &node, absent_since_ms, &file, &path)?;
            Ok::<_, DiscoveryError>((file, offset))
        })
        .await??
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
        let at = Progress {
            absent_since_ms,
            offset,
            page_entries,
        };
        let (page, next) =
            blocking(move || archive_page(&store, &node, &file, &path, at)).await??;
        offset = next;
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

/// The page size: [`PAGE_ENTRIES_ENV`] if set to a positive integer, else [`PAGE_ENTRIES`].
fn page_entries() -> usize {
    match std::env::var(PAGE_ENTRIES_ENV) {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::warn!(value = %v, default = PAGE_ENTRIES,
                               "{PAGE_ENTRIES_ENV} is not a positive integer; using the default");
                PAGE_ENTRIES
            }
        },
        Err(_) => PAGE_ENTRIES,
    }
}

/// The committed length of the archive, after making the file agree with it: lines past
/// it are a page whose removal from the store was not committed (cut off, written again);
/// a retirement that has not recorded one yet records the file's current length first.
fn resume_at(
    store: &Store,
    node: &str,
    absent_since_ms: u64,
    file: &File,
    path: &Path,
) -> Result<u64, DiscoveryError> {
    let io_err = |source| DiscoveryError::Archive {
        path: path.display().to_string(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let recorded = store
        .archive_progress(node)
        .map_err(|e| DiscoveryError::store(format!("reading archive progress of {node}"), e))?
        .filter(|p| p.absent_since_ms == absent_since_ms);
    match recorded {
        Some(p) if len > p.offset => {
            tracing::info!(node, archive = %path.display(), committed = p.offset, bytes = len - p.offset,
                           "resuming a retirement: cutting off the last page's lines, whose entries are still queued");
            file.set_len(p.offset).map_err(io_err)?;
            file.sync_all().map_err(io_err)?;
            Ok(p.offset)
        }
        Some(p) if len < p.offset => {
            // Cannot happen while fsync keeps its promise: each page is fsynced before the
            // store records it. Nothing to recover (those entries left the store).
            tracing::error!(node, archive = %path.display(), committed = p.offset, len,
                            "the archive is shorter than its committed length; lines are missing");
            set_progress(store, node, absent_since_ms, len)?;
            Ok(len)
        }
        Some(p) => Ok(p.offset),
        None => {
            set_progress(store, node, absent_since_ms, len)?;
            Ok(len)
        }
    }
}

fn set_progress(
    store: &Store,
    node: &str,
    absent_since_ms: u64,
    offset: u64,
) -> Result<(), DiscoveryError> {
    store
        .set_archive_progress(
            node,
            &ArchiveProgress {
                absent_since_ms,
                offset,
            },
        )
        .map_err(|e| DiscoveryError::store(format!("recording archive progress of {node}"), e))
}

/// Where a page starts: the archive's committed length, and the page size.
#[derive(Debug, Clone, Copy)]
struct Progress {
    absent_since_ms: u64,
    offset: u64,
    page_entries: usize,
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
/// dead letters. An empty [`Page`] means the queue is empty. Returns the archive's new
/// committed length with the page.
fn archive_page(
    store: &Store,
    node: &str,
    file: &File,
    path: &Path,
    at: Progress,
) -> Result<(Page, u64), DiscoveryError> {
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
                Ok(None) => (None, Some(format!("message {seq}'s record is missing"))),
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
            if count >= at.page_entries || bytes >= PAGE_BYTES {
                break 'page;
            }
        }
    }
    let committed = |offset| ArchiveProgress {
        absent_since_ms: at.absent_since_ms,
        offset,
    };
    if let Some(through) = last {
        let offset = finish(out, io_err)?;
        store
            .remove_archived(
                node,
                Some(through),
                None,
                PAGE_RANGES,
                Some(&committed(offset)),
            )
            .map_err(store_err("removing the archived queue"))?;
        return Ok((page, offset));
    }

    let dead = store
        .dead_letters_from(node, 0, at.page_entries)
        .map_err(store_err("reading dead letters"))?;
    let Some(through) = dead.last().map(|d| d.seq) else {
        // Entries that are all finished but whose range was not deleted yet.
        store
            .remove_archived(node, Some(u64::MAX), None, PAGE_RANGES, None)
            .map_err(store_err("removing finished ranges"))?;
        return Ok((page, at.offset));
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
    let offset = finish(out, io_err)?;
    store
        .remove_archived(
            node,
            None,
            Some(through),
            at.page_entries,
            Some(&committed(offset)),
        )
        .map_err(store_err("removing archived dead letters"))?;
    Ok((page, offset))
}

/// Flushes and fsyncs the page's lines (the store may drop them only after this); returns
/// the file's length, the page's committed length once the store records it.
fn finish(
    out: BufWriter<&File>,
    io_err: impl Fn(std::io::Error) -> DiscoveryError,
) -> Result<u64, DiscoveryError> {
    let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    file.sync_data().map_err(&io_err)?;
    Ok(file.metadata().map_err(&io_err)?.len())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
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
                    payload: vec![b'x'; 10].into(),
                    ttl_ms: 0,
                })
                .await
                .unwrap();
        }
        let d = crate::dispatch::test_dispatcher(&store, rx);
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
        assert_eq!(
            store.remove_archived("n", Some(6), None, 8, None).unwrap(),
            1
        );
        let left = store.ranges("n", None, 8).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].1.pending().collect::<Vec<_>>(),
            [2],
            "only seq 7 is left"
        );
        assert_eq!(
            store.remove_archived("n", Some(7), None, 8, None).unwrap(),
            1
        );
        assert!(store.remove_node("n").unwrap());
    }

    fn accept(id: String) -> Accept {
        Accept {
            msg_id: Some(id),
            topic: "t".into(),
            headers: vec![],
            payload: vec![b'y'; 8].into(),
            ttl_ms: 0,
        }
    }

    fn committer(store: &Store) -> (crate::store::CommitHandle, std::thread::JoinHandle<()>) {
        let (tx, _rx) = watch::channel(0);
        Committer::spawn(
            store.clone(),
            CommitOptions {
                durability: Durability::Fsync,
                dedupe_window: Duration::from_secs(600),
            },
            tx,
        )
        .unwrap()
    }

    fn archived_ids(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<ExportRecord>(l).unwrap().msg_id)
            .collect()
    }

    /// A crash after a page's lines were fsynced but before the store recorded their
    /// removal: the resumed retirement cuts them off and writes them once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resumed_retirement_writes_each_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.upsert_node("gone", "127.0.0.1:1", false).unwrap();
        let (commit, thread) = committer(&store);
        for i in 0..50 {
            commit.accept(accept(format!("r-{i}"))).await.unwrap();
        }
        commit.stop().await.unwrap();
        thread.join().unwrap();
        store.stop_fan_out("gone");

        let archive = dir.path().join("archive");
        let path = archive_path(&archive, "gone", 7);
        let file = open_archive(&archive, &path).unwrap();
        let offset = resume_at(&store, "gone", 7, &file, &path).unwrap();
        assert_eq!(offset, 0);
        let at = Progress {
            absent_since_ms: 7,
            offset,
            page_entries: 10,
        };
        let (page, offset) = archive_page(&store, "gone", &file, &path, at).unwrap();
        assert_eq!(page.live, 10);
        // The next page reaches the disk, then the process dies before the store's batch;
        // plus a torn line.
        let before = std::fs::read_to_string(&path).unwrap();
        let again: String = before.lines().take(10).map(|l| format!("{l}\n")).collect();
        {
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            write!(f, "{again}{{\"msg_id\":\"torn").unwrap();
        }
        assert_eq!(
            store.archive_progress("gone").unwrap().unwrap().offset,
            offset
        );
        drop(file);

        let report = archive_queue(
            store.clone(),
            crate::dispatch::test_dispatcher(&store, watch::channel(0).1),
            "gone".into(),
            7,
            archive.clone(),
            CancellationToken::new(),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(report.live, 40);
        let ids = archived_ids(&path);
        let want: Vec<String> = (0..50).map(|i| format!("r-{i}")).collect();
        assert_eq!(ids, want, "every entry once, in order");
        assert!(store.remove_node("gone").unwrap());
        assert!(
            store.archive_progress("gone").unwrap().is_none(),
            "the progress record goes with the node"
        );
    }

    /// The fan-out barrier: with broadcasts committed concurrently, every message a round
    /// queued for the retiring node (node_count 2) is in its archive and none is left in
    /// the store after the node is removed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_round_writes_to_a_node_after_it_left_the_fan_out_set() {
        for attempt in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            store.upsert_node("gone", "127.0.0.1:1", false).unwrap();
            store.upsert_node("stays", "127.0.0.1:2", false).unwrap();
            let (commit, thread) = committer(&store);
            let senders: Vec<_> = (0..8)
                .map(|t| {
                    let commit = commit.clone();
                    tokio::spawn(async move {
                        let mut got = Vec::new();
                        for i in 0..150 {
                            let id = format!("b-{t}-{i}");
                            let r = commit.accept(accept(id.clone())).await.unwrap();
                            got.push((id, r.node_count));
                        }
                        got
                    })
                })
                .collect();
            tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
            let st = store.clone();
            tokio::task::spawn_blocking(move || st.stop_fan_out("gone"))
                .await
                .unwrap();
            let archive = dir.path().join("archive");
            let path = archive_path(&archive, "gone", 1);
            let file = open_archive(&archive, &path).unwrap();
            let mut offset = resume_at(&store, "gone", 1, &file, &path).unwrap();
            loop {
                let at = Progress {
                    absent_since_ms: 1,
                    offset,
                    page_entries: 100,
                };
                let (page, next) = archive_page(&store, "gone", &file, &path, at).unwrap();
                offset = next;
                if page == Page::default() {
                    break;
                }
            }
            assert!(store.remove_node("gone").unwrap(), "nothing left behind");
            let mut queued_for_gone = Vec::new();
            for s in senders {
                for (id, count) in s.await.unwrap() {
                    if count == 2 {
                        queued_for_gone.push(id);
                    }
                }
            }
            commit.stop().await.unwrap();
            thread.join().unwrap();
            assert!(store.ranges("gone", None, 1).unwrap().is_empty());
            let mut ids = archived_ids(&path);
            ids.sort();
            queued_for_gone.sort();
            assert_eq!(ids, queued_for_gone, "attempt {attempt}");
        }
    }
}
