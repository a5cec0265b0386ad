//! Floors: what this machine can do at best for the two costs every ack pays, measured in
//! the same run so the product's figures can be read as ratios that hold from one machine
//! to another.
//!
//! - **sled commit floor**: a fresh sled 0.34 database next to the manager's data dir (same
//!   filesystem, same disk) and one committer thread doing what a group commit must do at
//!   least: insert every waiting caller's record, `flush()`, `fdatasync` the log, answer
//!   them. Nothing else (no dedupe, no index, no gRPC). Measured twice: one sled record per
//!   message (what any design with a record per message pays), and packed as the store packs
//!   them (a round's records concatenated into values of up to `PACK_BYTES`, 16 KiB, one
//!   insert each).
//! - **unary echo floor**: an in-process gRPC server whose `Broadcast` answers OK at once,
//!   driven by the same callers, connections and payload as the product run; and the
//!   **batched echo floor**, the same server's `BroadcastBatch` with 256 messages a call.
//! - **CPU of each**: the sled floors count their committer thread and sled's own threads
//!   (not their callers), the echo floors this whole process (callers and server). Every
//!   accepted message costs at least its accept call, its packed record and one echo message
//!   per node, so the cores divided by that sum bound what any product can ack here.
//!
//! This is the one place outside `src/store` that opens sled: on purpose, since the floor
//! must not go through the product's store.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use push_manager::proto::push_server_server::{PushServer, PushServerServer};
use push_manager::proto::{
    BatchItemResult, BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq,
};
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::load::{self, LoadSpec, Progress, Stamps, MAX_MESSAGE_BYTES};
use crate::procstats;

/// Same as the product's store: records up to 2 MiB stay inline in the log instead of going
/// to separate blob files, so both write the same way.
const SEGMENT_SIZE: usize = 8 * 1024 * 1024;

/// One caller's record, and where to say it is durable.
type Submission = (u64, Vec<u8>, oneshot::Sender<()>);

/// How the sled floor writes a round's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One sled record per message.
    PerMessage,
    /// Consecutive records concatenated into values of up to this many bytes, as the store's
    /// packs are.
    Packed(usize),
}

/// What the sled floor measured.
#[derive(Debug, Clone, Copy)]
pub struct SledFloor {
    /// Records committed per second.
    pub per_s: f64,
    /// Bytes this process caused to be written to disk, per record: the write amplification
    /// of small fsynced rounds on this filesystem, to read the manager's figure against.
    pub disk_bytes_per_record: f64,
    /// CPU seconds per record of the committer thread and of sled's own threads (its I/O
    /// pool and log flusher), the callers excluded: what any store built on sled must spend
    /// per record at least. An understatement if a sled thread ended during the run.
    pub cpu_per_record_s: f64,
}

/// What an echo floor measured.
#[derive(Debug, Clone, Copy)]
pub struct EchoFloor {
    /// Messages answered per second.
    pub per_s: f64,
    /// CPU seconds per message of this whole process: the callers and the echo server, i.e.
    /// what carrying one message in such calls costs both ends at least.
    pub cpu_per_message_s: f64,
}

/// Measures the sled group-commit floor: `records` records of `size` bytes from `callers`
/// concurrent callers, written as `layout` says, in a fresh database under `dir` (removed
/// afterwards).
pub async fn sled_commit(
    dir: &Path,
    records: usize,
    size: usize,
    callers: usize,
    layout: Layout,
) -> Result<SledFloor> {
    let db_dir = dir.join("floor-sled");
    let _ = std::fs::remove_dir_all(&db_dir);
    // Nothing else in this process writes to disk while the floor runs, so the process's
    // own write counter is the floor's.
    let before = procstats::sample(std::process::id());
    let result = sled_commit_in(&db_dir, records, size, callers, layout).await;
    let after = procstats::sample(std::process::id());
    let _ = std::fs::remove_dir_all(&db_dir);
    let (per_s, cpu_seconds) = result?;
    let records = records.max(1) as f64;
    Ok(SledFloor {
        per_s,
        disk_bytes_per_record: after.write_bytes.saturating_sub(before.write_bytes) as f64
            / records,
        cpu_per_record_s: cpu_seconds / records,
    })
}

async fn sled_commit_in(
    db_dir: &Path,
    records: usize,
    size: usize,
    callers: usize,
    layout: Layout,
) -> Result<(f64, f64)> {
    let db = sled::Config::new()
        .path(db_dir)
        .segment_size(SEGMENT_SIZE)
        .open()
        .with_context(|| format!("opening the floor's sled db in {}", db_dir.display()))?;
    let log_path = db_dir.join("db");
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(&log_path)
        .with_context(|| format!("opening sled's log {}", log_path.display()))?;
    let (tx, rx) = mpsc::channel::<Submission>();
    // The committer: a plain thread, like a dedicated committer task, so the callers' runtime
    // never blocks on fsync. It returns the CPU seconds it and sled's threads used.
    let committer = std::thread::spawn(move || -> Result<f64> {
        let sled_threads = || {
            procstats::threads_cpu_seconds("sled-io")
                + procstats::threads_cpu_seconds("log flusher")
        };
        let (own_before, sled_before) = (procstats::thread_cpu_seconds(), sled_threads());
        while let Ok(first) = rx.recv() {
            let mut round = vec![first];
            while let Ok(more) = rx.try_recv() {
                round.push(more);
            }
            match layout {
                Layout::PerMessage => {
                    for (key, value, _) in &round {
                        db.insert(key.to_be_bytes(), value.as_slice())
                            .context("sled insert (floor)")?;
                    }
                }
                Layout::Packed(limit) => {
                    let mut pack: Vec<u8> = Vec::with_capacity(limit);
                    for (i, (key, value, _)) in round.iter().enumerate() {
                        pack.extend_from_slice(value);
                        let next = round.get(i + 1).map_or(0, |(_, v, _)| v.len());
                        if next == 0 || pack.len() + next > limit {
                            db.insert(key.to_be_bytes(), std::mem::take(&mut pack))
                                .context("sled insert (floor)")?;
                        }
                    }
                }
            }
            db.flush().context("sled flush (floor)")?;
            log.sync_data().context("fdatasync of sled's log (floor)")?;
            for (_, _, done) in round {
                let _ = done.send(());
            }
        }
        // A sled thread that ended took its CPU time with it: never below zero.
        let sled = (sled_threads() - sled_before).max(0.0);
        Ok(procstats::thread_cpu_seconds() - own_before + sled)
    });
    let next = Arc::new(AtomicUsize::new(0));
    let payload = vec![b'x'; size];
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers.max(1) {
        let tx = tx.clone();
        let next = Arc::clone(&next);
        let payload = payload.clone();
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= records {
                    return Ok(());
                }
                let (done_tx, done_rx) = oneshot::channel();
                tx.send((n as u64, payload.clone(), done_tx))
                    .map_err(|_| anyhow!("the floor's committer stopped"))?;
                done_rx
                    .await
                    .map_err(|_| anyhow!("the floor's committer stopped"))?;
            }
        });
    }
    drop(tx);
    let mut caller_error = None;
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.context("a floor caller panicked").and_then(|r| r) {
            caller_error.get_or_insert(e);
        }
    }
    let elapsed = started.elapsed();
    // Every sender is gone now, so the committer's loop ends.
    let cpu_seconds = committer
        .join()
        .map_err(|_| anyhow!("the floor's committer panicked"))??;
    if let Some(e) = caller_error {
        return Err(e);
    }
    Ok((records as f64 / elapsed.as_secs_f64(), cpu_seconds))
}

/// A `PushServer` that does nothing: every call is answered OK at once.
struct Echo;

#[tonic::async_trait]
impl PushServer for Echo {
    async fn broadcast(
        &self,
        request: Request<BroadCastReq>,
    ) -> Result<Response<BroadCastReply>, Status> {
        Ok(Response::new(BroadCastReply {
            msg_id: request.into_inner().msg_id,
            node_count: 1,
            duplicate: false,
        }))
    }

    async fn broadcast_batch(
        &self,
        request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        let results = request
            .into_inner()
            .messages
            .into_iter()
            .map(|m| BatchItemResult {
                reply: Some(BroadCastReply {
                    msg_id: m.msg_id,
                    node_count: 1,
                    duplicate: false,
                }),
                code: 0,
                error: String::new(),
            })
            .collect();
        Ok(Response::new(BroadCastBatchReply { results }))
    }
}

/// Measures an echo floor: `messages` messages of `size` bytes, `batch` per call (1: unary
/// `Broadcast`, more: `BroadcastBatch`), from `callers` callers over `connections`
/// connections to an echo server on 127.0.0.1.
///
/// The server runs on its own two-thread runtime, as a separate server process would, so it
/// does not share the callers' worker threads (it does share the machine's cores, as the
/// manager does in the product run).
pub async fn echo(
    messages: usize,
    size: usize,
    batch: usize,
    callers: usize,
    connections: usize,
) -> Result<EchoFloor> {
    let cpu_before = procstats::sample(std::process::id()).cpu_seconds;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the echo server's runtime")?;
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind the echo server")?;
    listener
        .set_nonblocking(true)
        .context("cannot configure the echo server's socket")?;
    let addr = listener
        .local_addr()
        .context("cannot read the echo server's address")?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tonic::transport::Server::builder()
            .add_service(PushServerServer::new(Echo).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stop_rx.await;
                },
            )
            .await
            .map_err(anyhow::Error::from)
    });
    let result = async {
        let clients = load::connect(&addr.to_string(), connections).await?;
        let spec = LoadSpec {
            messages,
            size,
            concurrency: callers,
            batch,
            rate: None,
            prefix: "echo-".to_string(),
        };
        let run = load::run(
            &clients,
            &spec,
            Arc::new(Stamps::new(messages)),
            Arc::new(Progress::default()),
            None,
        )
        .await?;
        let cpu = procstats::sample(std::process::id()).cpu_seconds - cpu_before;
        Ok::<EchoFloor, anyhow::Error>(EchoFloor {
            per_s: run.acked as f64 / run.elapsed.as_secs_f64(),
            cpu_per_message_s: cpu / run.acked.max(1) as f64,
        })
    }
    .await;
    let _ = stop_tx.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(5), server).await;
    // Dropping a runtime blocks, which is not allowed on an async thread: let it go.
    runtime.shutdown_background();
    let rate = result?;
    match stopped {
        Ok(Ok(Ok(()))) | Err(_) => Ok(rate),
        Ok(Ok(Err(e))) => Err(e.context("the echo server failed")),
        Ok(Err(e)) => bail!("the echo server panicked: {e}"),
    }
}
