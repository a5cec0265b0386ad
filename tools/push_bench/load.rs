//! The callers: send B broadcasts as unary `Broadcast` calls or `BroadcastBatch` calls of k
//! items, either closed-loop (C callers, each sending its next call as soon as the previous
//! one is answered: the maximum rate) or open-loop at a fixed rate R (for latency at a given
//! load). Every message's send time is stamped so the delivery tracker can compute
//! accept-to-node latency from the sims' records.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::{BroadCastBatchReq, BroadCastReq};
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Largest gRPC message the bench sends or accepts: above the contract's 16 MiB batch limit,
/// so the manager, not tonic's default 4 MiB limit on this side, decides what is too large.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Broadcasts in all.
    pub messages: usize,
    /// Payload bytes of each.
    pub size: usize,
    /// Closed loop: callers. Open loop (`rate`): most calls in flight at once.
    pub concurrency: usize,
    /// Items per call: 1 sends unary `Broadcast`, more sends `BroadcastBatch`.
    pub batch: usize,
    /// Messages per second, open loop; `None` sends as fast as the callers are answered.
    pub rate: Option<f64>,
    /// msg_id prefix: message n is `<prefix><n>`.
    pub prefix: String,
}

impl LoadSpec {
    /// The msg_id of message `n`.
    pub fn msg_id(&self, n: usize) -> String {
        format!("{}{n}", self.prefix)
    }

    fn calls(&self) -> usize {
        self.messages.div_ceil(self.batch.max(1))
    }
}

/// When each message's call was sent (Unix µs, 0 = not yet), shared with the tracker.
#[derive(Debug)]
pub struct Stamps {
    sent_us: Vec<AtomicU64>,
}

impl Stamps {
    /// Room for `messages` stamps, all unset.
    pub fn new(messages: usize) -> Self {
        Stamps {
            sent_us: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Message `n`'s send time in Unix µs, if it was sent.
    pub fn get(&self, n: usize) -> Option<u64> {
        self.sent_us
            .get(n)
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|v| *v > 0)
    }

    fn set(&self, n: usize, unix_us: u64) {
        if let Some(s) = self.sent_us.get(n) {
            s.store(unix_us, Ordering::Relaxed);
        }
    }
}

/// Wall-clock now in Unix µs: the sims stamp arrivals in wall-clock time, so send times must
/// be in the same clock, not `Instant`.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Counters the progress line reads while a run goes on.
#[derive(Debug, Default)]
pub struct Progress {
    /// Messages acked so far.
    pub acked: AtomicU64,
    /// Distinct (message, node) deliveries seen so far.
    pub delivered: AtomicU64,
}

/// What the callers measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Messages answered OK (duplicates included).
    pub acked: u64,
    /// Messages the manager answered as duplicates (a fresh data dir should have none).
    pub duplicates: u64,
    /// Replies whose `node_count` differed from the expected node count.
    pub node_count_mismatches: u64,
    /// From the first call sent to the last answer.
    pub elapsed: Duration,
    /// Per-message ack latency in µs (a batch call's latency counts once per item). Open
    /// loop: from the moment the call was due, so a stalled server is not hidden by calls
    /// that were never sent (coordinated omission).
    pub latency_us: Histogram<u64>,
}

/// A histogram of µs from 1 µs to one hour, 3 significant digits.
pub fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).context("cannot create a histogram")
}

/// Opens `connections` HTTP/2 connections to `addr` (host:port).
pub async fn connect(addr: &str, connections: usize) -> Result<Vec<PushServerClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..connections.max(1) {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .with_context(|| format!("{addr:?} is not a host:port"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        clients.push(
            PushServerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    }
    Ok(clients)
}

/// State shared by the caller tasks.
struct Shared {
    spec: LoadSpec,
    payload: bytes::Bytes,
    stamps: Arc<Stamps>,
    progress: Arc<Progress>,
    expected_nodes: Option<u32>,
    histogram: Mutex<Histogram<u64>>,
    duplicates: AtomicU64,
    mismatches: AtomicU64,
    /// Set by the first failing call so the others stop sending.
    failed: AtomicBool,
}

impl Shared {
    fn record(&self, latency: Duration, items: u64) {
        let us = (latency.as_micros() as u64).max(1);
        // A poisoned lock only means another caller panicked; the histogram is still whole.
        let mut h = self.histogram.lock().unwrap_or_else(|p| p.into_inner());
        h.saturating_record_n(us, items);
    }

    /// Sends call `j`; `due` is when it should have been sent (open loop) or now.
    async fn call(
        &self,
        client: &mut PushServerClient<Channel>,
        j: usize,
        due: Instant,
    ) -> Result<()> {
        let k = self.spec.batch.max(1);
        let first = j * k;
        let last = (first + k).min(self.spec.messages);
        let reqs: Vec<BroadCastReq> = (first..last)
            .map(|n| BroadCastReq {
                msg_id: self.spec.msg_id(n),
                payload: self.payload.clone(),
                ..Default::default()
            })
            .collect();
        let now = unix_us();
        for n in first..last {
            self.stamps.set(n, now);
        }
        let items = (last - first) as u64;
        let mut replies = Vec::with_capacity(reqs.len());
        if self.spec.batch <= 1 {
            for req in reqs {
                let msg_id = req.msg_id.clone();
                let reply = client.broadcast(req).await.map_err(|s| {
                    anyhow!(
                        "Broadcast of {msg_id} failed: {:?}: {}",
                        s.code(),
                        s.message()
                    )
                })?;
                replies.push(reply.into_inner());
            }
        } else {
            let ids: Vec<String> = reqs.iter().map(|r| r.msg_id.clone()).collect();
            let reply = client
                .broadcast_batch(BroadCastBatchReq { messages: reqs })
                .await
                .map_err(|s| {
                    let hint = if s.code() == tonic::Code::Unimplemented {
                        " (this manager does not implement BroadcastBatch: use --batch 1)"
                    } else {
                        ""
                    };
                    anyhow!(
                        "BroadcastBatch of {} items failed: {:?}: {}{hint}",
                        ids.len(),
                        s.code(),
                        s.message()
                    )
                })?
                .into_inner();
            if reply.results.len() != ids.len() {
                bail!(
                    "BroadcastBatch of {} items answered {} results; the contract says one per \
                     item, in order",
                    ids.len(),
                    reply.results.len()
                );
            }
            for (id, item) in ids.iter().zip(reply.results) {
                match item.reply {
                    Some(r) if item.code == 0 => replies.push(r),
                    _ => bail!(
                        "BroadcastBatch item {id} failed: code {} ({:?}): {}",
                        item.code,
                        tonic::Code::from_i32(item.code),
                        item.error
                    ),
                }
            }
        }
        self.record(due.elapsed(), items);
        for r in &replies {
            if r.duplicate {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
            }
            if self.expected_nodes.is_some_and(|n| n != r.node_count) {
                self.mismatches.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.progress.acked.fetch_add(items, Ordering::Relaxed);
        Ok(())
    }
}

/// Sends everything `spec` asks for over `clients` and waits for every answer. The first
/// failed call ends the run with its error. `expected_nodes`: the `node_count` every reply
/// should carry (`None`: not checked).
pub async fn run(
    clients: &[PushServerClient<Channel>],
    spec: &LoadSpec,
    stamps: Arc<Stamps>,
    progress: Arc<Progress>,
    expected_nodes: Option<u32>,
) -> Result<LoadResult> {
    if clients.is_empty() {
        bail!("no connection to send over");
    }
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        payload: vec![b'x'; spec.size].into(),
        stamps,
        progress,
        expected_nodes,
        histogram: Mutex::new(new_histogram()?),
        duplicates: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    });
    let calls = spec.calls();
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    match spec.rate {
        None => {
            // Closed loop: each caller takes the next call number when its previous call is
            // answered, so exactly `concurrency` calls are in flight until the end.
            let next = Arc::new(AtomicUsize::new(0));
            for c in 0..spec.concurrency.max(1) {
                let shared = Arc::clone(&shared);
                let next = Arc::clone(&next);
                let mut client = clients[c % clients.len()].clone();
                tasks.spawn(async move {
                    loop {
                        let j = next.fetch_add(1, Ordering::Relaxed);
                        if j >= calls || shared.failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        if let Err(e) = shared.call(&mut client, j, Instant::now()).await {
                            shared.failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                });
            }
        }
        Some(rate) => {
            if !(rate > 0.0 && rate.is_finite()) {
                bail!("--rate must be a positive number of messages per second");
            }
            // Open loop: call j is due at j·k/R seconds whatever happened before; at most
            // `concurrency` are in flight, and a call that waits for a slot counts that wait
            // in its latency.
            let slots = Arc::new(tokio::sync::Semaphore::new(spec.concurrency.max(1)));
            let per_call = Duration::from_secs_f64(spec.batch.max(1) as f64 / rate);
            for j in 0..calls {
                let due = started + per_call.mul_f64(j as f64);
                tokio::time::sleep_until(due.into()).await;
                if shared.failed.load(Ordering::Relaxed) {
                    break;
                }
                let permit = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .context("the in-flight limit closed")?;
                let shared = Arc::clone(&shared);
                let mut client = clients[j % clients.len()].clone();
                tasks.spawn(async move {
                    let r = shared.call(&mut client, j, due).await;
                    drop(permit);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Relaxed);
                    }
                    r
                });
                // Finished tasks are reaped as we go so a long run does not keep them all.
                while let Some(done) = tasks.try_join_next() {
                    done.context("a caller task panicked")??;
                }
            }
        }
    }
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done.context("a caller task panicked").and_then(|r| r) {
            Ok(()) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let elapsed = started.elapsed();
    let shared = Arc::try_unwrap(shared).map_err(|_| anyhow!("a caller task outlived the run"))?;
    let latency_us = shared
        .histogram
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    Ok(LoadResult {
        acked: latency_us.len(),
        duplicates: shared.duplicates.into_inner(),
        node_count_mismatches: shared.mismatches.into_inner(),
        elapsed,
        latency_us,
    })
}
