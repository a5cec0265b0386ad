//! `push-chaos`: tries hard to make push-manager lose an acked message.
//!
//! One run, repeatable with `--seed`: a manager (`push-manager serve`, the binary next to
//! this one) on a fresh data dir, N `connect-node-sim`s recording what they accept, and with
//! `--etcd` a real etcd (nodes then register there). Concurrent senders broadcast unique
//! msg_ids (some with `ttl_ms`, some in `BroadcastBatch` calls) and remember which were acked
//! OK. Meanwhile a schedule of faults drawn from the seed runs: SIGKILL of the manager and a
//! restart on the same data dir (while commit rounds and deliveries are in progress, which
//! the report counts), SIGSTOP / SIGCONT of nodes, node restarts (static: same port; etcd:
//! a new port under the same node id), etcd restarts, and error bursts (a sim restarted with
//! `--fail-rate` for a while).
//!
//! Then every fault is undone and the run drains: it waits until every node has every acked
//! message. The verdict, per node: every acked msg_id delivered (`lost` must be 0); nothing
//! delivered that was never sent (`unexpected`); nothing delivered after its TTL
//! (`stale`); duplicates counted. A message whose call failed may still have been committed:
//! if delivered it counts as `unacked_delivered`, which is allowed. Exit status 0 only on
//! PASS (which implies zero lost), 1 on FAIL, 2 when the run could not be set up.
//!
//! The fault *schedule* is a pure function of the seed and the flags; the interleaving with
//! the processes is not, so a failing seed usually, not always, fails again.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use nix::sys::signal::Signal;
use push_manager::config::parse_duration;
use push_manager::harness::{
    free_port, health_serving, start_sim, EtcdProcess, ManagerProcess, Proc, RecordTail,
};
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::{BroadCastBatchReq, BroadCastReq};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Profile {
    /// About a minute: a few manager kills, static nodes (CI).
    Short,
    /// On demand: `--duration` and `--kills` (default 20m and 1000).
    Long,
}

/// Chaos run against push-manager on loopback: faults from a seed, then a drain and a
/// per-node check that nothing acked was lost.
#[derive(Parser, Debug)]
#[command(
    name = "push-chaos",
    version,
    after_help = "Prints one verdict line (PASS/FAIL and counts) on stderr and a JSON report \
                  (--json: stdout; --report FILE). Exit status: 0 PASS (zero lost, nothing \
                  unexpected or stale), 1 FAIL, 2 setup error. Build every binary first: \
                  cargo build --release --bins. A failing run keeps its work dir (logs, \
                  record files, data dir) and prints its path."
)]
struct Args {
    /// Seed of the fault schedule and of the senders [default: from the clock; printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Preset for the flags below.
    #[arg(long, value_enum, default_value_t = Profile::Short)]
    profile: Profile,
    /// How long senders and faults run [default: short 40s, long 20m].
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Manager SIGKILLs spread over the duration [default: short 4, long 1000].
    #[arg(long)]
    kills: Option<usize>,
    /// Node / etcd faults spread over the duration [default: short 8, long = --kills].
    #[arg(long)]
    node_faults: Option<usize>,
    /// connect-node-sims.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent senders.
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Pause of each sender between calls.
    #[arg(long, value_parser = parse_duration, default_value = "5ms")]
    send_interval: Duration,
    /// Fraction of messages sent with a ttl_ms.
    #[arg(long, default_value_t = 0.2)]
    ttl_fraction: f64,
    /// Run nodes registered in a real etcd (ETCD_BIN or `etcd` on PATH) instead of static.
    #[arg(long)]
    etcd: bool,
    /// Bound on the final drain.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    drain_timeout: Duration,
    /// Slack allowed between a TTL's end and a delivery's arrival before it counts as stale.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    ttl_tolerance: Duration,
    /// Where to put data dir, logs and record files [default: a temp dir, removed on PASS].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Write the JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,
}

/// Every parameter of a run, after the profile's defaults.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    seed: u64,
    profile: Profile,
    etcd: bool,
    duration_s: f64,
    kills: usize,
    node_faults: usize,
    nodes: usize,
    senders: usize,
    send_interval_ms: u64,
    ttl_fraction: f64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Fault {
    ManagerKill {
        down_ms: u64,
    },
    NodePause {
        node: usize,
        for_ms: u64,
    },
    NodeRestart {
        node: usize,
        down_ms: u64,
    },
    SimErrorBurst {
        node: usize,
        for_ms: u64,
        fail_rate: f64,
    },
    EtcdRestart {
        down_ms: u64,
    },
}

#[derive(Debug, Clone, Serialize)]
struct Scheduled {
    at_ms: u64,
    #[serde(flatten)]
    fault: Fault,
}

/// The fault schedule: a pure function of the plan.
fn schedule(plan: &Plan) -> Vec<Scheduled> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let span = (plan.duration_s * 1000.0) as u64;
    let at = |rng: &mut StdRng| rng.gen_range(0..span.max(1));
    let mut out = Vec::new();
    // Restarts on the long profile come quickly, so kills can pile up during recovery.
    let max_down = if plan.profile == Profile::Short {
        500
    } else {
        200
    };
    for _ in 0..plan.kills {
        let at_ms = at(&mut rng);
        let down_ms = rng.gen_range(0..=max_down);
        out.push(Scheduled {
            at_ms,
            fault: Fault::ManagerKill { down_ms },
        });
    }
    for _ in 0..plan.node_faults {
        let at_ms = at(&mut rng);
        let node = rng.gen_range(0..plan.nodes.max(1));
        let roll = rng.gen_range(0..100);
        let fault = if plan.etcd && roll < 15 {
            Fault::EtcdRestart {
                down_ms: rng.gen_range(0..=2000),
            }
        } else if roll < 50 {
            Fault::NodePause {
                node,
                for_ms: rng.gen_range(100..=3000),
            }
        } else if roll < 80 {
            Fault::NodeRestart {
                node,
                down_ms: rng.gen_range(0..=1000),
            }
        } else {
            Fault::SimErrorBurst {
                node,
                for_ms: rng.gen_range(500..=4000),
                fail_rate: rng.gen_range(3..=9) as f64 / 10.0,
            }
        };
        out.push(Scheduled { at_ms, fault });
    }
    out.sort_by_key(|s| s.at_ms);
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A std mutex whose poisoning (a panicked holder) is not a reason to stop the run.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the senders know about one msg_id.
#[derive(Debug, Clone, Default)]
struct Sent {
    ttl_ms: u64,
    /// When the last call carrying it ended: the manager accepted it before that, if at all.
    last_try_end_ms: u64,
    acked: bool,
    errored: bool,
    /// Acked for fewer nodes than the run has (etcd warm-up): not expected everywhere.
    partial: bool,
}

/// One node's deliveries, read from its record file.
#[derive(Debug, Default)]
struct Received {
    /// msg_id -> (arrival Unix ms, ttl_ms the manager sent) per delivery.
    by_id: HashMap<String, Vec<(u64, u64)>>,
    lines: u64,
}

struct NodeState {
    id: String,
    record: PathBuf,
    port: u16,
    proc: Option<Proc>,
    /// (SIGSTOP, SIGCONT) Unix ms: arrivals right after a SIGCONT may be old sends.
    stopped: Vec<(u64, u64)>,
}

struct Shared {
    plan: Plan,
    manager_addr: String,
    etcd_url: Option<String>,
    sent: Mutex<HashMap<String, Sent>>,
    in_flight: AtomicUsize,
    stop_senders: AtomicBool,
    /// The manager answered BroadcastBatch with UNIMPLEMENTED: senders use unary calls.
    no_batch: AtomicBool,
    send_errors: Mutex<BTreeMap<String, u64>>,
    duplicate_replies: AtomicUsize,
    node_count_mismatch: AtomicUsize,
    received: Vec<Mutex<(RecordTail, Received)>>,
    last_delivery_seen: Mutex<Instant>,
    nodes: Vec<tokio::sync::Mutex<NodeState>>,
    faults_done: Mutex<BTreeMap<String, u64>>,
    fatal: Mutex<Option<String>>,
}

impl Shared {
    fn count_fault(&self, name: &str) {
        *lock(&self.faults_done).entry(name.to_string()).or_default() += 1;
    }

    fn set_fatal(&self, why: String) {
        lock(&self.fatal).get_or_insert(why);
    }

    /// Reads every record file's new lines; true if any node got something.
    fn poll_records(&self) -> Result<bool> {
        let mut any = false;
        for slot in &self.received {
            let mut guard = lock(slot);
            let (tail, recv) = &mut *guard;
            for line in tail.read_new()? {
                any = true;
                recv.lines += 1;
                recv.by_id
                    .entry(line.msg_id)
                    .or_default()
                    .push((line.arrival_unix_ms.unwrap_or(0), line.ttl_ms.unwrap_or(0)));
            }
        }
        if any {
            *lock(&self.last_delivery_seen) = Instant::now();
        }
        Ok(any)
    }

    fn sim_args(&self, fail_rate: Option<f64>) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(url) = &self.etcd_url {
            args.extend(["--etcd".to_string(), url.clone()]);
            // Short, so a paused or killed node really leaves etcd and comes back.
            args.extend(["--lease-ttl".to_string(), "2s".to_string()]);
        }
        if let Some(rate) = fail_rate {
            args.extend(["--fail-rate".to_string(), rate.to_string()]);
        }
        args
    }

    /// (Re)starts node `n`'s sim: static mode on its port, etcd mode on a new one.
    fn start_node(&self, node: &mut NodeState, fail_rate: Option<f64>) -> Result<()> {
        if let Some(mut p) = node.proc.take() {
            p.kill();
        }
        // Starting a sim blocks until it prints its address: keep the runtime's other
        // tasks (the senders) running meanwhile.
        tokio::task::block_in_place(|| self.start_node_blocking(node, fail_rate))
    }

    fn start_node_blocking(&self, node: &mut NodeState, fail_rate: Option<f64>) -> Result<()> {
        let port = if self.etcd_url.is_some() {
            0
        } else {
            node.port
        };
        let args = self.sim_args(fail_rate);
        let mut last = None;
        // The port was ours a moment ago; a few tries cover a slow release of it.
        for _ in 0..20 {
            match start_sim(&node.id, port, &node.record, &args) {
                Ok((proc, bound)) => {
                    node.proc = Some(proc);
                    node.port = bound;
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match last {
            Some(e) => Err(e).with_context(|| format!("cannot restart node {}", node.id)),
            None => bail!("cannot restart node {}", node.id),
        }
    }
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("push-chaos: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = runtime.block_on(async {
        tokio::select! {
            r = run(args) => match r {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("push-chaos: {e:#}");
                    2
                }
            },
            _ = tokio::signal::ctrl_c() => {
                eprintln!("push-chaos: interrupted; killing every process it started");
                130
            }
        }
    });
    // Child processes are killed when their handles drop. Some live in tasks still running
    // after an error or an interrupt: shutting the runtime down drops those tasks, and so
    // kills their processes, before the exit (which would run no destructors).
    runtime.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(code);
}

fn plan_from(args: &Args) -> Plan {
    let seed = args
        .seed
        .unwrap_or_else(|| now_ms() ^ u64::from(std::process::id()));
    let (duration, kills) = match args.profile {
        Profile::Short => (Duration::from_secs(40), 4),
        Profile::Long => (Duration::from_secs(20 * 60), 1000),
    };
    let duration = args.duration.unwrap_or(duration);
    let kills = args.kills.unwrap_or(kills);
    let node_faults = args.node_faults.unwrap_or(match args.profile {
        Profile::Short => 8,
        Profile::Long => kills,
    });
    Plan {
        seed,
        profile: args.profile,
        etcd: args.etcd,
        duration_s: duration.as_secs_f64(),
        kills,
        node_faults,
        nodes: args.nodes.max(1),
        senders: args.senders.max(1),
        send_interval_ms: args.send_interval.as_millis() as u64,
        ttl_fraction: args.ttl_fraction.clamp(0.0, 1.0),
    }
}

/// Runs the whole thing; Ok(pass).
async fn run(args: Args) -> Result<bool> {
    let plan = plan_from(&args);
    let (work, temp) = match &args.work_dir {
        Some(dir) => (dir.clone(), false),
        None => (
            std::env::temp_dir().join(format!("push-chaos-{}-{}", plan.seed, std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    eprintln!(
        "push-chaos: seed {} profile {:?} {} nodes={} kills={} node_faults={} duration={}s; \
         work dir {}",
        plan.seed,
        plan.profile,
        if plan.etcd { "etcd" } else { "static" },
        plan.nodes,
        plan.kills,
        plan.node_faults,
        plan.duration_s,
        work.display()
    );
    let report = execute(&plan, &args, &work).await?;
    let pass = report.verdict == "PASS";
    let json = serde_json::to_string_pretty(&report).context("cannot encode the report")?;
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("{}", report.line);
    if args.json {
        let mut out = std::io::stdout().lock();
        match writeln!(out, "{json}") {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(e).context("cannot print the report")
            }
            _ => {}
        }
    }
    if pass && temp {
        let _ = std::fs::remove_dir_all(&work);
    } else if !pass {
        eprintln!(
            "push-chaos: kept {} (manager.log, node records, data)",
            work.display()
        );
    }
    Ok(pass)
}

#[derive(Debug, Default, Serialize)]
struct NodeReport {
    node: String,
    deliveries: u64,
    distinct: usize,
    lost: usize,
    lost_sample: Vec<String>,
    duplicates: u64,
    unacked_delivered: usize,
    unexpected: usize,
    unexpected_sample: Vec<String>,
    stale: usize,
    stale_sample: Vec<String>,
    ttl_missing: usize,
    expired_undelivered: usize,
}

#[derive(Debug, Serialize)]
struct Report {
    verdict: String,
    line: String,
    command: String,
    plan: Plan,
    elapsed_s: f64,
    drain_s: f64,
    drained: bool,
    fatal: Option<String>,
    faults: BTreeMap<String, u64>,
    messages_attempted: usize,
    messages_acked: usize,
    acked_with_ttl: usize,
    unacked: usize,
    duplicate_replies: usize,
    node_count_mismatch: usize,
    /// The manager does not implement BroadcastBatch (senders fell back to unary).
    batch_unimplemented: bool,
    send_errors: BTreeMap<String, u64>,
    lost: usize,
    duplicates: u64,
    unexpected: usize,
    stale: usize,
    unacked_delivered: usize,
    nodes: Vec<NodeReport>,
    schedule_len: usize,
}

async fn execute(plan: &Plan, args: &Args, work: &Path) -> Result<Report> {
    let started = Instant::now();
    let mut etcd = None;
    if plan.etcd {
        let dir = work.join("etcd");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut e = EtcdProcess::new(&dir)?;
        e.start().await?;
        etcd = Some(e);
    }
    let etcd_url = etcd.as_ref().map(|e| e.url());

    let manager_addr = format!("127.0.0.1:{}", free_port()?);
    let mut received = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..plan.nodes {
        let id = format!("node-{i}");
        let record = work.join(format!("{id}.records"));
        received.push(Mutex::new((RecordTail::new(&record), Received::default())));
        nodes.push(tokio::sync::Mutex::new(NodeState {
            id,
            record,
            // Static mode restarts the node on this port: one the kernel does not hand out.
            port: free_port()?,
            proc: None,
            stopped: Vec::new(),
        }));
    }
    let shared = Arc::new(Shared {
        plan: plan.clone(),
        manager_addr: manager_addr.clone(),
        etcd_url: etcd_url.clone(),
        sent: Mutex::new(HashMap::new()),
        in_flight: AtomicUsize::new(0),
        stop_senders: AtomicBool::new(false),
        no_batch: AtomicBool::new(false),
        send_errors: Mutex::new(BTreeMap::new()),
        duplicate_replies: AtomicUsize::new(0),
        node_count_mismatch: AtomicUsize::new(0),
        received,
        last_delivery_seen: Mutex::new(Instant::now()),
        nodes,
        faults_done: Mutex::new(BTreeMap::new()),
        fatal: Mutex::new(None),
    });
    let mut margs = vec![
        "--listen".to_string(),
        manager_addr.clone(),
        "--data-dir".into(),
        work.join("data").display().to_string(),
        // Quick retries, so the drain after the last fault does not wait out long backoffs.
        "--backoff-max".into(),
        "1s".into(),
    ];
    for node in &shared.nodes {
        let mut n = node.lock().await;
        shared.start_node(&mut n, None)?;
        if plan.etcd {
            continue;
        }
        margs.push("--static-node".into());
        margs.push(format!("{}=127.0.0.1:{}", n.id, n.port));
    }
    if let Some(url) = &etcd_url {
        margs.extend(["--etcd".to_string(), url.clone()]);
    }
    let mut manager = ManagerProcess::new(&manager_addr, margs, work.join("manager.log"));
    manager.start().await?;
    warm_up(&shared).await?;

    // Background: follow the record files, so kills can tell whether deliveries are going on.
    let poller = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            loop {
                if let Err(e) = shared.poll_records() {
                    shared.set_fatal(format!("{e:#}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let senders: Vec<_> = (0..plan.senders)
        .map(|i| tokio::spawn(sender(Arc::clone(&shared), i)))
        .collect();

    let sched = schedule(plan);
    let schedule_len = sched.len();
    let t0 = Instant::now();
    let mut etcd_slot = etcd;
    let mut tasks = Vec::new();
    let end = t0 + Duration::from_secs_f64(plan.duration_s);
    for ev in &sched {
        if lock(&shared.fatal).is_some() {
            break;
        }
        // Faults that take longer than planned push the rest back; the run still ends on
        // time, and the report counts what was left out.
        if Instant::now() >= end {
            shared.count_fault("not_run_out_of_time");
            continue;
        }
        let at = t0 + Duration::from_millis(ev.at_ms);
        tokio::time::sleep_until(at.into()).await;
        match &ev.fault {
            Fault::ManagerKill { down_ms } => {
                let _ = shared.poll_records();
                if shared.in_flight.load(Ordering::Relaxed) > 0 {
                    shared.count_fault("manager_kill_during_commit");
                }
                if lock(&shared.last_delivery_seen).elapsed() < Duration::from_millis(250) {
                    shared.count_fault("manager_kill_during_delivery");
                }
                if let Some(p) = manager.proc() {
                    p.kill();
                }
                shared.count_fault("manager_kill");
                tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                if let Err(e) = manager.start().await {
                    shared.set_fatal(format!("manager restart failed: {e}"));
                }
            }
            Fault::EtcdRestart { down_ms } => {
                if let Some(e) = etcd_slot.as_mut() {
                    e.kill();
                    shared.count_fault("etcd_restart");
                    tokio::time::sleep(Duration::from_millis(*down_ms)).await;
                    if let Err(err) = e.restart().await {
                        shared.set_fatal(format!("etcd restart failed: {err}"));
                    }
                }
            }
            node_fault => {
                let shared = Arc::clone(&shared);
                let fault = node_fault.clone();
                tasks.push(tokio::spawn(
                    async move { node_fault_task(shared, fault).await },
                ));
            }
        }
    }
    tokio::time::sleep_until(end.into()).await;

    // Undo everything: senders stop, faults end, every process is up.
    shared.stop_senders.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    for t in tasks {
        let _ = t.await;
    }
    if let Some(e) = etcd_slot.as_mut() {
        if let Err(err) = e.start_if_stopped().await {
            shared.set_fatal(format!("etcd did not come back: {err}"));
        }
    }
    for node in &shared.nodes {
        let mut n = node.lock().await;
        let alive = n.proc.as_mut().is_some_and(|p| p.is_running());
        if !alive {
            shared.start_node(&mut n, None)?;
        }
    }
    if !manager.proc().is_some_and(|p| p.is_running())
        || !health_serving(&shared.manager_addr).await
    {
        if let Some(p) = manager.proc() {
            p.kill();
        }
        if let Err(e) = manager.start().await {
            shared.set_fatal(format!("manager restart before the drain failed: {e}"));
        }
    }

    let drain_start = Instant::now();
    let tolerance = args.ttl_tolerance.as_millis() as u64;
    let mut drained = false;
    while drain_start.elapsed() < args.drain_timeout {
        shared.poll_records()?;
        if missing_count(&shared, tolerance) == 0 {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Late duplicates of the last deliveries still count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    shared.poll_records()?;
    let drain_s = drain_start.elapsed().as_secs_f64();
    poller.abort();

    if let Some(p) = manager.proc() {
        p.terminate();
    }
    let mut stopped = Vec::new();
    for node in &shared.nodes {
        let mut n = node.lock().await;
        if let Some(mut p) = n.proc.take() {
            p.kill();
        }
        stopped.push(n.stopped.clone());
    }
    drop(etcd_slot);

    Ok(verdict(
        &shared,
        plan,
        tolerance,
        &stopped,
        started.elapsed().as_secs_f64(),
        drain_s,
        drained,
        schedule_len,
    ))
}

/// In etcd mode nodes register on their own: probe until the manager knows all of them.
async fn warm_up(shared: &Shared) -> Result<()> {
    let mut client = client(&shared.manager_addr)?;
    let want = shared.plan.nodes as u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0.. {
        let msg_id = format!("warmup-{i}");
        let req = BroadCastReq {
            msg_id: msg_id.clone(),
            payload: b"warm-up".to_vec().into(),
            ..Default::default()
        };
        let result = client.broadcast(req).await;
        let end = now_ms();
        let mut sent = Sent {
            last_try_end_ms: end,
            ..Default::default()
        };
        let done = match &result {
            Ok(r) => {
                sent.acked = true;
                sent.partial = r.get_ref().node_count != want;
                !sent.partial
            }
            Err(_) => {
                sent.errored = true;
                false
            }
        };
        lock(&shared.sent).insert(msg_id, sent);
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the manager did not come to know all {want} nodes within 60s: {result:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn client(addr: &str) -> Result<PushServerClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .context("bad manager address")?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(PushServerClient::new(channel))
}

const TTL_CHOICES_MS: [u64; 5] = [300, 1_000, 3_000, 10_000, 30_000];
const MAX_TRIES: u32 = 4;

/// One sender: unique msg_ids `s<i>-<n>`, unary or batched, each retried with the same id
/// (so retries after a crash meet the dedupe entries) up to [`MAX_TRIES`] times.
async fn sender(shared: Arc<Shared>, index: usize) {
    let Ok(mut client) = client(&shared.manager_addr) else {
        shared.set_fatal("bad manager address".to_string());
        return;
    };
    let mut rng = StdRng::seed_from_u64(shared.plan.seed.wrapping_add(1 + index as u64));
    let want = shared.plan.nodes as u32;
    let mut n = 0u64;
    while !shared.stop_senders.load(Ordering::Relaxed) {
        let batch = if rng.gen_bool(0.2) {
            rng.gen_range(2..=20)
        } else {
            1
        };
        let mut pending: Vec<BroadCastReq> = (0..batch)
            .map(|_| {
                n += 1;
                let ttl_ms = if rng.gen_bool(shared.plan.ttl_fraction) {
                    TTL_CHOICES_MS[rng.gen_range(0..TTL_CHOICES_MS.len())]
                } else {
                    0
                };
                BroadCastReq {
                    msg_id: format!("s{index}-{n}"),
                    payload: format!("chaos {index} {n}").into_bytes().into(),
                    topic: "chaos".into(),
                    ttl_ms,
                    ..Default::default()
                }
            })
            .collect();
        {
            let mut sent = lock(&shared.sent);
            for r in &pending {
                sent.insert(
                    r.msg_id.clone(),
                    Sent {
                        ttl_ms: r.ttl_ms,
                        ..Default::default()
                    },
                );
            }
        }
        for attempt in 1..=MAX_TRIES {
            shared.in_flight.fetch_add(1, Ordering::Relaxed);
            let unary = pending.len() == 1 || shared.no_batch.load(Ordering::Relaxed);
            let results: Vec<Result<(u32, bool), String>> = if unary {
                let mut results = Vec::new();
                for req in &pending {
                    let r = client.broadcast(req.clone()).await;
                    results.push(
                        r.map(|r| (r.get_ref().node_count, r.get_ref().duplicate))
                            .map_err(|s| format!("{:?}", s.code())),
                    );
                }
                results
            } else {
                let req = BroadCastBatchReq {
                    messages: pending.clone(),
                };
                match client.broadcast_batch(req).await {
                    Ok(r) => {
                        let mut items: Vec<Result<(u32, bool), String>> = r
                            .into_inner()
                            .results
                            .into_iter()
                            .map(|item| match (item.code, item.reply) {
                                (0, Some(reply)) => Ok((reply.node_count, reply.duplicate)),
                                (code, _) => Err(format!("{:?}", tonic::Code::from_i32(code))),
                            })
                            .collect();
                        items.resize(pending.len(), Err("MissingItem".to_string()));
                        items
                    }
                    Err(s) if s.code() == tonic::Code::Unimplemented => {
                        // A manager without the optional batch call: unary from now on,
                        // and this try is made again that way.
                        shared.no_batch.store(true, Ordering::Relaxed);
                        shared.in_flight.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(s) => vec![Err(format!("{:?}", s.code())); pending.len()],
                }
            };
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
            let end = now_ms();
            let mut retry = Vec::new();
            {
                let mut sent = lock(&shared.sent);
                let mut errors = lock(&shared.send_errors);
                for (req, result) in pending.into_iter().zip(results) {
                    let Some(entry) = sent.get_mut(&req.msg_id) else {
                        continue;
                    };
                    entry.last_try_end_ms = end;
                    match result {
                        Ok((node_count, duplicate)) => {
                            entry.acked = true;
                            if duplicate {
                                shared.duplicate_replies.fetch_add(1, Ordering::Relaxed);
                            }
                            if node_count != want {
                                entry.partial = true;
                                shared.node_count_mismatch.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(code) => {
                            entry.errored = true;
                            *errors.entry(code).or_default() += 1;
                            retry.push(req);
                        }
                    }
                }
            }
            pending = retry;
            if pending.is_empty() || shared.stop_senders.load(Ordering::Relaxed) {
                break;
            }
            let backoff = 50 * u64::from(attempt) + rng.gen_range(0..100);
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        tokio::time::sleep(Duration::from_millis(shared.plan.send_interval_ms)).await;
    }
}

async fn node_fault_task(shared: Arc<Shared>, fault: Fault) {
    let index = match &fault {
        Fault::NodePause { node, .. }
        | Fault::NodeRestart { node, .. }
        | Fault::SimErrorBurst { node, .. } => *node,
        _ => return,
    };
    let Some(slot) = shared.nodes.get(index) else {
        return;
    };
    // A node already in a fault is left alone: the schedule stays a plan, not a queue.
    let Ok(mut node) = slot.try_lock() else {
        shared.count_fault("skipped_node_busy");
        return;
    };
    let result = match fault {
        Fault::NodePause { for_ms, .. } => {
            let from = now_ms();
            let stopped = node
                .proc
                .as_ref()
                .is_some_and(|p| p.signal(Signal::SIGSTOP));
            tokio::time::sleep(Duration::from_millis(for_ms)).await;
            if stopped {
                if let Some(p) = node.proc.as_ref() {
                    p.signal(Signal::SIGCONT);
                }
                node.stopped.push((from, now_ms()));
                shared.count_fault("node_pause");
            }
            Ok(())
        }
        Fault::NodeRestart { down_ms, .. } => {
            if let Some(p) = node.proc.as_mut() {
                p.kill();
            }
            tokio::time::sleep(Duration::from_millis(down_ms)).await;
            shared.count_fault("node_restart");
            shared.start_node(&mut node, None)
        }
        Fault::SimErrorBurst {
            for_ms, fail_rate, ..
        } => {
            shared.count_fault("sim_error_burst");
            let r = shared.start_node(&mut node, Some(fail_rate));
            tokio::time::sleep(Duration::from_millis(for_ms)).await;
            r.and_then(|()| shared.start_node(&mut node, None))
        }
        _ => Ok(()),
    };
    if let Err(e) = result {
        shared.set_fatal(format!("{e:#}"));
    }
}

/// Acked messages some node still lacks and may still get (a TTL past its end may be
/// dropped legitimately).
fn missing_count(shared: &Shared, tolerance: u64) -> usize {
    let now = now_ms();
    let sent = lock(&shared.sent);
    let mut missing = 0;
    for slot in &shared.received {
        let guard = lock(slot);
        for (id, s) in sent.iter() {
            if !s.acked || s.partial || guard.1.by_id.contains_key(id) {
                continue;
            }
            if s.ttl_ms > 0 && now > s.last_try_end_ms + s.ttl_ms + tolerance {
                continue;
            }
            missing += 1;
        }
    }
    missing
}

const SAMPLE: usize = 10;

#[allow(clippy::too_many_arguments)]
fn verdict(
    shared: &Shared,
    plan: &Plan,
    tolerance: u64,
    stopped: &[Vec<(u64, u64)>],
    elapsed_s: f64,
    drain_s: f64,
    drained: bool,
    schedule_len: usize,
) -> Report {
    let sent = lock(&shared.sent);
    let mut nodes = Vec::new();
    for (i, slot) in shared.received.iter().enumerate() {
        let guard = lock(slot);
        let recv = &guard.1;
        let mut r = NodeReport {
            node: format!("node-{i}"),
            deliveries: recv.lines,
            distinct: recv.by_id.len(),
            ..Default::default()
        };
        let pauses = stopped.get(i).map(Vec::as_slice).unwrap_or(&[]);
        for (id, arrivals) in &recv.by_id {
            r.duplicates += arrivals.len() as u64 - 1;
            let Some(s) = sent.get(id) else {
                r.unexpected += 1;
                if r.unexpected_sample.len() < SAMPLE {
                    r.unexpected_sample.push(id.clone());
                }
                continue;
            };
            if !s.acked {
                r.unacked_delivered += 1;
            }
            if s.ttl_ms == 0 {
                continue;
            }
            let deadline = s.last_try_end_ms + s.ttl_ms + tolerance;
            for &(arrival, ttl_sent) in arrivals {
                if ttl_sent == 0 {
                    r.ttl_missing += 1;
                }
                // A send that was on the wire when the node was stopped arrives at SIGCONT.
                let excused = pauses
                    .iter()
                    .any(|&(from, to)| from <= deadline && arrival <= to + tolerance);
                if arrival > deadline && !excused {
                    r.stale += 1;
                    if r.stale_sample.len() < SAMPLE {
                        r.stale_sample.push(format!(
                            "{id}: ttl {} ms, late by {} ms",
                            s.ttl_ms,
                            arrival - deadline + tolerance
                        ));
                    }
                }
            }
        }
        for (id, s) in sent.iter() {
            if !s.acked || s.partial || recv.by_id.contains_key(id) {
                continue;
            }
            if s.ttl_ms > 0 {
                r.expired_undelivered += 1;
                continue;
            }
            r.lost += 1;
            if r.lost_sample.len() < SAMPLE {
                r.lost_sample.push(id.clone());
            }
        }
        nodes.push(r);
    }
    // A TTL message acked and undelivered whose TTL had not run out by the drain's end is
    // lost too: the drain waited for it.
    let now = now_ms();
    for (i, slot) in shared.received.iter().enumerate() {
        let guard = lock(slot);
        for (id, s) in sent.iter() {
            if s.acked
                && !s.partial
                && s.ttl_ms > 0
                && !guard.1.by_id.contains_key(id)
                && now <= s.last_try_end_ms + s.ttl_ms + tolerance
            {
                nodes[i].expired_undelivered -= 1;
                nodes[i].lost += 1;
                if nodes[i].lost_sample.len() < SAMPLE {
                    nodes[i].lost_sample.push(id.clone());
                }
            }
        }
    }
    let lost: usize = nodes.iter().map(|n| n.lost).sum();
    let duplicates: u64 = nodes.iter().map(|n| n.duplicates).sum();
    let unexpected: usize = nodes.iter().map(|n| n.unexpected).sum();
    let stale: usize = nodes.iter().map(|n| n.stale).sum();
    let ttl_missing: usize = nodes.iter().map(|n| n.ttl_missing).sum();
    let unacked_delivered: usize = nodes.iter().map(|n| n.unacked_delivered).sum();
    let acked = sent.values().filter(|s| s.acked).count();
    let acked_with_ttl = sent.values().filter(|s| s.acked && s.ttl_ms > 0).count();
    let fatal = lock(&shared.fatal).clone();
    let node_count_mismatch = shared.node_count_mismatch.load(Ordering::Relaxed);
    let pass = lost == 0
        && unexpected == 0
        && stale == 0
        && ttl_missing == 0
        && node_count_mismatch == 0
        && fatal.is_none()
        && drained;
    let faults = lock(&shared.faults_done).clone();
    let fault_text: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let verdict = if pass { "PASS" } else { "FAIL" };
    let line = format!(
        "{verdict} seed={} acked={acked} lost={lost} duplicates={duplicates} \
         unexpected={unexpected} stale={stale} unacked_delivered={unacked_delivered} \
         drained={drained} faults: {}{}",
        plan.seed,
        fault_text.join(" "),
        fatal
            .as_ref()
            .map(|f| format!(" fatal: {f}"))
            .unwrap_or_default()
    );
    let command: Vec<String> = std::env::args().collect();
    Report {
        verdict: verdict.to_string(),
        line,
        command: command.join(" "),
        plan: plan.clone(),
        elapsed_s,
        drain_s,
        drained,
        fatal,
        faults,
        messages_attempted: sent.len(),
        messages_acked: acked,
        acked_with_ttl,
        unacked: sent.values().filter(|s| !s.acked).count(),
        duplicate_replies: shared.duplicate_replies.load(Ordering::Relaxed),
        node_count_mismatch,
        batch_unimplemented: shared.no_batch.load(Ordering::Relaxed),
        send_errors: lock(&shared.send_errors).clone(),
        lost,
        duplicates,
        unexpected,
        stale,
        unacked_delivered,
        nodes,
        schedule_len,
    }
}
