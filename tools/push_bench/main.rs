//! `push-bench`: end-to-end benchmark of push-manager on one machine, loopback only.
//!
//! It starts a manager (`push-manager serve`, the binary next to this one) on a fresh data
//! dir and M `connect-node-sim`s (batch-capable, or `--unary-only`), sends B broadcasts of S
//! bytes with C concurrent callers (unary, or `BroadcastBatch` of k items; or open-loop at a
//! fixed rate for latency runs), waits until every node has every message, and prints acked/s,
//! ack latency percentiles (HDR histogram), deliveries/s, accept-to-node latency, and the
//! manager's CPU, peak RSS and disk bytes written per broadcast. `--floors` measures the
//! machine's sled group-commit and unary gRPC echo rates in the same run and prints the
//! product's figures as ratios to them. Named profiles (`--profile`) set the figures of
//! BENCHMARKS.md; explicit flags override them.
//!
//! Build with `cargo build --release --bins` and run `target/release/push-bench --help`.

mod deliveries;
mod floors;
mod load;
mod procstats;
mod report;

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use push_manager::harness::{free_port, start_sim, ManagerProcess, Proc};

use deliveries::Tracker;
use load::{LoadSpec, Progress, Stamps};
use report::{Backlog, Floors, ManagerFigures, Percentiles, Report, Restart};

/// The named workloads of BENCHMARKS.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// Unary accept: 3 nodes, 1 KiB, 256 callers.
    #[value(name = "ack")]
    Ack,
    /// Batched accept: 3 nodes, 1 KiB, BroadcastBatch of 64, 32 calls in flight.
    #[value(name = "ack-batch")]
    AckBatch,
    /// Fan-out to 10 nodes (batched accept); add --unary-only for unary-only nodes.
    #[value(name = "fanout10")]
    Fanout10,
    /// Fan-out to 100 nodes (batched accept), to compare with ack-batch's acked/s.
    #[value(name = "fanout100")]
    Fanout100,
    /// 64 KiB payloads, 3 nodes, unary, 64 callers.
    #[value(name = "large")]
    Large,
    /// 1,000,000 queued (batched) for one offline node, then it comes back: drain rate and
    /// RSS with everything queued.
    #[value(name = "backlog")]
    Backlog,
    /// 1,000,000 queued for one offline node, manager SIGKILLed and restarted on the same
    /// data dir: time until SERVING and until the first delivery.
    #[value(name = "restart")]
    Restart,
}

/// How the nodes behave during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nodes up from the start.
    Online,
    /// Nodes offline while the messages are queued, then started.
    Backlog,
    /// Nodes offline while the messages are queued; the manager is SIGKILLed, the nodes
    /// started, the manager restarted.
    Restart,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::Backlog => "backlog",
            Mode::Restart => "restart",
        }
    }
}

/// A profile's defaults.
struct Defaults {
    nodes: usize,
    messages: usize,
    size: usize,
    concurrency: usize,
    batch: usize,
    mode: Mode,
}

impl Profile {
    fn defaults(self) -> Defaults {
        let d = |nodes, messages, size, concurrency, batch, mode| Defaults {
            nodes,
            messages,
            size,
            concurrency,
            batch,
            mode,
        };
        match self {
            Profile::Ack => d(3, 100_000, 1024, 256, 1, Mode::Online),
            Profile::AckBatch => d(3, 300_000, 1024, 32, 64, Mode::Online),
            Profile::Fanout10 => d(10, 100_000, 1024, 32, 64, Mode::Online),
            Profile::Fanout100 => d(100, 20_000, 1024, 32, 64, Mode::Online),
            Profile::Large => d(3, 5_000, 64 * 1024, 64, 1, Mode::Online),
            Profile::Backlog => d(1, 1_000_000, 1024, 32, 64, Mode::Backlog),
            Profile::Restart => d(1, 1_000_000, 1024, 32, 64, Mode::Restart),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Profile::Ack => "ack",
            Profile::AckBatch => "ack-batch",
            Profile::Fanout10 => "fanout10",
            Profile::Fanout100 => "fanout100",
            Profile::Large => "large",
            Profile::Backlog => "backlog",
            Profile::Restart => "restart",
        }
    }
}

/// End-to-end benchmark of push-manager on this machine (loopback only).
#[derive(Parser, Debug)]
#[command(
    name = "push-bench",
    version,
    about = "End-to-end benchmark of push-manager on this machine (loopback only): starts a \
             manager and connect-node-sims, sends broadcasts, waits until every node has \
             every message, and prints throughput, latency and the manager's resource use.",
    after_help = "Profiles (explicit flags override their defaults):\n  \
        ack        3 nodes, 100000 x 1 KiB, unary, 256 callers\n  \
        ack-batch  3 nodes, 300000 x 1 KiB, batches of 64, 32 calls in flight\n  \
        fanout10   10 nodes, 100000 x 1 KiB, batches of 64, 32 in flight (add --unary-only)\n  \
        fanout100  100 nodes, 20000 x 1 KiB, batches of 64, 32 in flight\n  \
        large      3 nodes, 5000 x 64 KiB, unary, 64 callers\n  \
        backlog    1 node offline, 1000000 x 1 KiB queued (batches of 64), then it returns\n  \
        restart    1 node offline, 1000000 queued, manager SIGKILLed and restarted\n\
        Without --profile the defaults are ack's.\n\n\
        Exit status: 0 when every message was acked and delivered to every node; 1 otherwise \
        (the message says what failed); 2 for bad arguments; 130 when interrupted (Ctrl-C).\n\
        Build first: cargo build --release --bins (push-bench starts the push-manager and \
        connect-node-sim binaries next to it)."
)]
struct Args {
    /// A named workload: ack, ack-batch, fanout10, fanout100, large, backlog, restart.
    #[arg(long, value_enum, value_name = "NAME")]
    profile: Option<Profile>,
    /// Connect-node-sims to deliver to.
    #[arg(long, value_name = "M")]
    nodes: Option<usize>,
    /// Broadcasts to send.
    #[arg(long, value_name = "B")]
    messages: Option<usize>,
    /// Payload size in bytes.
    #[arg(long, value_name = "S")]
    size: Option<usize>,
    /// Concurrent callers (closed loop), or the most calls in flight (with --rate).
    #[arg(long, value_name = "C")]
    concurrency: Option<usize>,
    /// Items per call: 1 sends unary Broadcast calls, more sends BroadcastBatch (at most
    /// 1000, the contract's limit).
    #[arg(long, value_name = "K")]
    batch: Option<usize>,
    /// Send at this many messages per second (open loop) instead of as fast as answers
    /// come; ack latency then counts from when each call was due.
    #[arg(long, value_name = "R")]
    rate: Option<f64>,
    /// gRPC connections the callers are spread over.
    #[arg(long, value_name = "N", default_value_t = 4)]
    connections: usize,
    /// Start the sims with --unary-only (they answer BroadcastBatch with UNIMPLEMENTED, so
    /// the manager delivers with unary calls).
    #[arg(long)]
    unary_only: bool,
    /// Durability mode of the manager: fsync or buffered.
    #[arg(long, value_name = "MODE", default_value = "fsync")]
    durability: String,
    /// Pass ARG to `push-manager serve` (repeatable; e.g. --manager-arg=--max-in-flight=32).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    manager_arg: Vec<String>,
    /// Measure the floors first, in the same run and on the same disk: the raw sled
    /// group-commit rate for the same records and the unary gRPC echo rate; print the
    /// product's figures as ratios to them.
    #[arg(long)]
    floors: bool,
    /// Records (sled floor) and calls (echo floor) each floor sends [default: --messages,
    /// at most 100000].
    #[arg(long, value_name = "N")]
    floor_messages: Option<usize>,
    /// Send to a running manager at HOST:PORT instead of starting one (no sims: only the
    /// accept side is measured).
    #[arg(long, value_name = "HOST:PORT")]
    connect: Option<String>,
    /// With --connect: the manager's pid, to report its CPU, RSS and disk writes.
    #[arg(long, value_name = "PID", requires = "connect")]
    manager_pid: Option<u32>,
    /// Work directory (manager data dir, logs, record files, the sled floor's db); its disk
    /// is the one measured. Kept afterwards. Default: a new directory under $TMPDIR,
    /// removed afterwards.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Keep the default work directory instead of removing it.
    #[arg(long)]
    keep: bool,
    /// Give up when delivery has not completed after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    timeout: u64,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// No live progress line (it is shown only when stderr is a terminal anyway).
    #[arg(long)]
    no_progress: bool,
}

/// Everything a run needs, profile defaults and flags merged and checked.
#[derive(Debug, Clone)]
struct Settings {
    profile: Option<Profile>,
    nodes: usize,
    messages: usize,
    size: usize,
    concurrency: usize,
    connections: usize,
    batch: usize,
    rate: Option<f64>,
    unary_only: bool,
    durability: String,
    mode: Mode,
    floors: bool,
    floor_messages: usize,
    manager_args: Vec<String>,
    connect: Option<String>,
    manager_pid: Option<u32>,
    timeout: Duration,
    json: bool,
    progress: bool,
}

/// The contract's largest batch.
const MAX_BATCH: usize = 1000;

impl Settings {
    fn resolve(a: &Args) -> Result<Settings> {
        let d = a.profile.unwrap_or(Profile::Ack).defaults();
        let s = Settings {
            profile: a.profile,
            nodes: a.nodes.unwrap_or(d.nodes),
            messages: a.messages.unwrap_or(d.messages),
            size: a.size.unwrap_or(d.size),
            concurrency: a.concurrency.unwrap_or(d.concurrency),
            connections: a.connections,
            batch: a.batch.unwrap_or(d.batch),
            rate: a.rate,
            unary_only: a.unary_only,
            durability: a.durability.clone(),
            mode: d.mode,
            floors: a.floors,
            floor_messages: a
                .floor_messages
                .unwrap_or_else(|| a.messages.unwrap_or(d.messages).min(100_000)),
            manager_args: a.manager_arg.clone(),
            connect: a.connect.clone(),
            manager_pid: a.manager_pid,
            timeout: Duration::from_secs(a.timeout),
            json: a.json,
            progress: !a.no_progress && std::io::stderr().is_terminal(),
        };
        if s.nodes == 0 && s.connect.is_none() {
            bail!("--nodes must be at least 1: a manager with no node refuses every broadcast");
        }
        if s.messages == 0 || s.size == 0 || s.concurrency == 0 || s.connections == 0 {
            bail!("--messages, --size, --concurrency and --connections must be at least 1");
        }
        if !(1..=MAX_BATCH).contains(&s.batch) {
            bail!("--batch must be 1 to {MAX_BATCH} (the contract's largest BroadcastBatch)");
        }
        if s.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            bail!("--rate must be a positive number of messages per second");
        }
        if s.connect.is_some() && s.mode != Mode::Online {
            bail!("--connect cannot run the backlog or restart profiles: they restart nodes and the manager");
        }
        if s.floors && s.floor_messages == 0 {
            bail!("--floor-messages must be at least 1");
        }
        Ok(s)
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let settings = match Settings::resolve(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("push-bench: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let (work, remove) = match &args.dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let dir =
                std::env::temp_dir().join(format!("push-bench-{}-{nanos}", std::process::id()));
            (dir, !args.keep)
        }
    };
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run_or_interrupt(&settings, &work)));
    let code = match result {
        Ok(report) => match report.print(settings.json) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("push-bench: cannot print the report: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) if e.downcast_ref::<Interrupted>().is_some() => {
            if settings.progress {
                eprint!("\r\x1b[K");
            }
            eprintln!("push-bench: interrupted; the manager and the sims were stopped");
            std::process::ExitCode::from(130)
        }
        Err(e) => {
            if settings.progress {
                eprint!("\r\x1b[K");
            }
            eprintln!("push-bench: {e:#}");
            let log = work.join("manager.log");
            if let Ok(text) = std::fs::read_to_string(&log) {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("last lines of the manager's log ({}):", log.display());
                for l in &lines[lines.len().saturating_sub(15)..] {
                    eprintln!("  {l}");
                }
            }
            std::process::ExitCode::FAILURE
        }
    };
    if remove {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        eprintln!("push-bench: work directory kept: {}", work.display());
    }
    code
}

/// Runs the benchmark; Ctrl-C drops the run, which kills every child (their `Proc`s kill
/// on drop), and returns an error so the work dir is still cleaned up.
async fn run_or_interrupt(s: &Settings, work: &Path) -> Result<Report> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    tokio::select! {
        r = run(s, work) => r,
        _ = tokio::signal::ctrl_c() => Err(Interrupted.into()),
    }
}

/// Ctrl-C: the run was dropped (children killed); exit 130 like a shell would.
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
struct Interrupted;

/// The sims, started now or later (backlog, restart), and their record files.
struct Nodes {
    ids: Vec<String>,
    ports: Vec<u16>,
    records: Vec<PathBuf>,
    procs: Vec<Proc>,
    extra: Vec<String>,
}

impl Nodes {
    fn plan(s: &Settings, work: &Path) -> Result<Nodes> {
        let mut nodes = Nodes {
            ids: Vec::new(),
            ports: Vec::new(),
            records: Vec::new(),
            procs: Vec::new(),
            extra: if s.unary_only {
                vec!["--unary-only".to_string()]
            } else {
                Vec::new()
            },
        };
        for i in 0..s.nodes {
            nodes.ids.push(format!("node-{i}"));
            nodes.records.push(work.join(format!("node-{i}.log")));
            // Offline nodes need their port now: the manager is told it at start.
            nodes.ports.push(if s.mode == Mode::Online {
                0
            } else {
                free_port()?
            });
        }
        Ok(nodes)
    }

    /// Starts every sim (on its planned port, or any port when 0).
    fn start(&mut self) -> Result<()> {
        for i in 0..self.ids.len() {
            let (proc, port) =
                start_sim(&self.ids[i], self.ports[i], &self.records[i], &self.extra)
                    .with_context(|| format!("starting sim {}", self.ids[i]))?;
            self.ports[i] = port;
            self.procs.push(proc);
        }
        Ok(())
    }

    fn static_node_args(&self) -> Vec<String> {
        self.ids
            .iter()
            .zip(&self.ports)
            .flat_map(|(id, port)| {
                [
                    "--static-node".to_string(),
                    format!("{id}=127.0.0.1:{port}"),
                ]
            })
            .collect()
    }

    fn stop(&mut self) {
        for p in &mut self.procs {
            p.terminate();
        }
    }
}

/// Prints `acked a/B  delivered d/D` on stderr every half second until aborted.
fn spawn_progress(
    progress: Arc<Progress>,
    messages: u64,
    deliveries: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t = started.elapsed().as_secs_f64();
            let a = progress.acked.load(Ordering::Relaxed);
            let d = progress.delivered.load(Ordering::Relaxed);
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r\x1b[K  {t:6.1} s  acked {a}/{messages} ({:.0}/s)  delivered {d}/{deliveries} ({:.0}/s)",
                a as f64 / t,
                d as f64 / t
            );
            let _ = err.flush();
        }
    })
}

/// The whole run: floors, processes, load, delivery, figures.
async fn run(s: &Settings, work: &Path) -> Result<Report> {
    let floors = if s.floors {
        Some(measure_floors(s, work).await?)
    } else {
        None
    };

    let mut nodes = Nodes::plan(s, work)?;
    let mut manager = None;
    let addr = match &s.connect {
        Some(addr) => addr.clone(),
        None => {
            if s.mode == Mode::Online {
                nodes.start()?;
            }
            let addr = format!("127.0.0.1:{}", free_port()?);
            let mut args = vec![
                "--listen".to_string(),
                addr.clone(),
                "--data-dir".to_string(),
                work.join("data").display().to_string(),
                "--durability".to_string(),
                s.durability.clone(),
            ];
            args.extend(nodes.static_node_args());
            let own_cap = s
                .manager_args
                .iter()
                .any(|a| a.starts_with("--backoff-max"));
            if matches!(s.mode, Mode::Backlog | Mode::Restart) && !own_cap {
                // The node is offline while its queue fills, so the manager's backoff toward
                // it grows to its cap (30 s by default) and the node, static here, is found
                // again by the next probe. With etcd its re-registration ends the backoff at
                // once; a 1 s cap stands in for that, so the drain is what gets measured.
                args.extend(["--backoff-max".to_string(), "1s".to_string()]);
            }
            args.extend(s.manager_args.iter().cloned());
            let mut m = ManagerProcess::new(&addr, args, work.join("manager.log"));
            m.start().await.context("starting the manager")?;
            manager = Some(m);
            addr
        }
    };
    let mut pid = match &mut manager {
        Some(m) => Some(
            m.proc()
                .map(|p| p.pid())
                .context("the manager is not running")?,
        ),
        None => s.manager_pid,
    };
    let before = pid.map(procstats::sample);

    let clients = load::connect(&addr, s.connections).await?;
    // A run-specific prefix, so a rerun against the same --connect manager is not a
    // duplicate of the last one.
    let prefix = format!("pb{}-", load::unix_us() % 1_000_000_000);
    let spec = LoadSpec {
        messages: s.messages,
        size: s.size,
        concurrency: s.concurrency,
        batch: s.batch,
        rate: s.rate,
        prefix: prefix.clone(),
    };
    let stamps = Arc::new(Stamps::new(s.messages));
    let progress = Arc::new(Progress::default());
    let tracked = s.connect.is_none();
    let mut tracker = Tracker::new(
        nodes.records.clone(),
        &prefix,
        s.messages,
        Arc::clone(&stamps),
        Arc::clone(&progress),
    )?;
    let printer = s.progress.then(|| {
        spawn_progress(
            Arc::clone(&progress),
            s.messages as u64,
            if tracked {
                (s.messages * s.nodes) as u64
            } else {
                0
            },
        )
    });

    let start_unix_us = load::unix_us();
    let expected_nodes = if tracked { Some(s.nodes as u32) } else { None };
    let sending = load::run(
        &clients,
        &spec,
        stamps,
        Arc::clone(&progress),
        expected_nodes,
    );
    let sent = if s.progress && tracked {
        // Follow the deliveries while sending only for the progress line: reading the
        // records takes CPU from the callers, and the figures come from the records'
        // timestamps either way.
        tokio::pin!(sending);
        loop {
            tokio::select! {
                r = &mut sending => break r,
                _ = tokio::time::sleep(Duration::from_millis(250)) => tracker.poll()?,
            }
        }
    } else {
        sending.await
    };
    let sent = match sent {
        Ok(r) => r,
        Err(e) => {
            if let Some(p) = printer {
                p.abort();
            }
            return Err(e);
        }
    };

    let mut backlog = None;
    let mut restart = None;
    let mut cpu_before_kill = 0.0;
    let mut disk_before_kill = None;
    let delivered = if !tracked {
        Ok(())
    } else {
        match s.mode {
            Mode::Online => tracker.wait_complete(s.timeout, stall_limit(s)).await,
            Mode::Backlog => {
                let queued = pid.map(procstats::sample).unwrap_or_default();
                let back_unix_ms = load::unix_us() / 1000;
                nodes.start()?;
                let r = tracker.wait_complete(s.timeout, stall_limit(s)).await;
                let first = tracker.first_arrival_ms().unwrap_or(back_unix_ms);
                let last = tracker.last_arrival_ms().unwrap_or(first);
                let drain_secs = (last.saturating_sub(first) as f64 / 1000.0).max(0.001);
                backlog = Some(Backlog {
                    queued: sent.acked,
                    rss_queued_kib: queued.rss_kib,
                    first_delivery_s: first.saturating_sub(back_unix_ms) as f64 / 1000.0,
                    drain_seconds: drain_secs,
                    drain_per_s: tracker.delivered() as f64 / drain_secs,
                });
                r
            }
            Mode::Restart => {
                let m = manager.as_mut().context("no manager to restart")?;
                let queued = pid.map(procstats::sample).unwrap_or_default();
                cpu_before_kill = queued.cpu_seconds - before.unwrap_or_default().cpu_seconds;
                disk_before_kill = Some(
                    queued
                        .write_bytes
                        .saturating_sub(before.unwrap_or_default().write_bytes),
                );
                if let Some(p) = m.proc() {
                    p.kill();
                }
                nodes.start()?;
                let restart_unix_ms = load::unix_us() / 1000;
                let restarted = Instant::now();
                m.start().await.context("restarting the manager")?;
                let serving = restarted.elapsed().as_secs_f64();
                pid = Some(
                    m.proc()
                        .map(|p| p.pid())
                        .context("the manager is not running")?,
                );
                let after_start = pid.map(procstats::sample).unwrap_or_default();
                tracker.wait_any(Duration::from_secs(60)).await?;
                let first = tracker.first_arrival_ms().unwrap_or(restart_unix_ms);
                let r = tracker.wait_complete(s.timeout, stall_limit(s)).await;
                let last = tracker.last_arrival_ms().unwrap_or(first);
                let drain_secs = (last.saturating_sub(first) as f64 / 1000.0).max(0.001);
                restart = Some(Restart {
                    queued: sent.acked,
                    rss_queued_kib: queued.rss_kib,
                    serving_s: serving,
                    first_delivery_s: first.saturating_sub(restart_unix_ms) as f64 / 1000.0,
                    rss_after_restart_kib: after_start.rss_kib,
                    drain_per_s: tracker.delivered() as f64 / drain_secs,
                });
                r
            }
        }
    };
    if let Some(p) = printer {
        p.abort();
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
    let after = pid.map(procstats::sample);
    if let Some(m) = &mut manager {
        if let Some(p) = m.proc() {
            p.terminate();
        }
    }
    nodes.stop();
    delivered?;

    let acked_per_s = sent.acked as f64 / sent.elapsed.as_secs_f64();
    // With nodes offline on purpose the span is mostly the outage: the backlog and restart
    // figures carry the drain rate instead.
    let (deliveries_per_s, deliver_seconds) = if tracked && s.mode == Mode::Online {
        let end_us = tracker
            .last_arrival_ms()
            .map_or_else(load::unix_us, |ms| ms * 1000);
        let secs = (end_us.saturating_sub(start_unix_us) as f64 / 1e6).max(0.001);
        (Some(tracker.delivered() as f64 / secs), Some(secs))
    } else {
        (None, None)
    };
    let manager_figures = match (before, after) {
        (Some(b), Some(a)) => {
            // After a restart the counters are the new process's: add the killed one's.
            let (cpu, disk) = match disk_before_kill {
                Some(d) => (cpu_before_kill + a.cpu_seconds, d + a.write_bytes),
                None => (
                    a.cpu_seconds - b.cpu_seconds,
                    a.write_bytes.saturating_sub(b.write_bytes),
                ),
            };
            Some(ManagerFigures {
                cpu_seconds: cpu,
                peak_rss_kib: a.peak_rss_kib,
                disk_write_bytes: disk,
                disk_bytes_per_broadcast: disk as f64 / s.messages as f64,
            })
        }
        _ => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floors = floors.map(|(sled, packed, echo, echo_batch, n)| Floors {
        messages: n,
        sled_commit_per_s: sled.per_s,
        sled_disk_bytes_per_record: sled.disk_bytes_per_record,
        sled_packed_per_s: packed.per_s,
        sled_packed_disk_bytes_per_record: packed.disk_bytes_per_record,
        echo_per_s: echo.per_s,
        echo_batch_per_s: echo_batch.per_s,
        sled_cpu_us_per_record: sled.cpu_per_record_s * 1e6,
        sled_packed_cpu_us_per_record: packed.cpu_per_record_s * 1e6,
        echo_cpu_us_per_call: echo.cpu_per_message_s * 1e6,
        echo_batch_cpu_us_per_message: echo_batch.cpu_per_message_s * 1e6,
        ceiling_acked_per_s: {
            let call = |unary: bool| {
                if unary {
                    echo.cpu_per_message_s
                } else {
                    echo_batch.cpu_per_message_s
                }
            };
            let per_message =
                call(s.batch <= 1) + packed.cpu_per_record_s + s.nodes as f64 * call(s.unary_only);
            // Too short a run to see a 10 ms CPU tick: no ceiling.
            (per_message > 0.0).then(|| cores / per_message)
        },
        acked_vs_sled: acked_per_s / sled.per_s,
        acked_vs_sled_packed: acked_per_s / packed.per_s,
        acked_vs_echo: acked_per_s / echo.per_s,
        deliveries_vs_echo: deliveries_per_s.map(|d| d / echo.per_s),
    });
    Ok(Report {
        profile: s.profile.map(|p| p.name().to_string()),
        mode: s.mode.name().to_string(),
        connect: s.connect.clone(),
        nodes: s.nodes,
        unary_only_nodes: s.unary_only,
        messages: s.messages,
        size: s.size,
        concurrency: s.concurrency,
        connections: s.connections,
        batch: s.batch,
        rate: s.rate,
        durability: s.durability.clone(),
        acked: sent.acked,
        duplicates_acked: sent.duplicates,
        node_count_mismatches: sent.node_count_mismatches,
        send_seconds: sent.elapsed.as_secs_f64(),
        acked_per_s,
        ack_latency_ms: Percentiles::of(&sent.latency_us),
        delivered: tracked.then(|| tracker.delivered()),
        all_delivered: tracked.then(|| tracker.complete()),
        delivered_via_batch: tracked.then_some(tracker.via_batch),
        delivered_via_unary: tracked.then_some(tracker.via_unary),
        redeliveries: tracked.then_some(tracker.duplicates),
        deliver_seconds,
        deliveries_per_s,
        // Offline nodes make the latency the length of the outage: not a latency figure.
        accept_to_node_ms: (tracked && s.mode == Mode::Online)
            .then(|| Percentiles::of(&tracker.latency_us)),
        manager: manager_figures,
        floors,
        backlog,
        restart,
    })
}

/// How long delivery may make no progress before the run fails: nodes that are offline
/// on purpose make no progress until they return, so only the online phase is limited.
fn stall_limit(s: &Settings) -> Duration {
    s.timeout.min(Duration::from_secs(120))
}

/// Echo-floor callers for a batched run: the ack profile's.
const ECHO_CALLERS_BATCHED: usize = 256;

/// What the floors measured: sled per message, sled packed, unary echo, batched echo,
/// records each.
type Measured = (
    floors::SledFloor,
    floors::SledFloor,
    floors::EchoFloor,
    floors::EchoFloor,
    usize,
);

/// Messages per call of the batched echo floor: the most a delivery call carries by default
/// (`--delivery-batch`), so its CPU per message is the least a batched message costs.
const ECHO_BATCH: usize = 256;
/// Callers of the batched echo floor.
const ECHO_BATCH_CALLERS: usize = 8;

/// Runs every floor.
async fn measure_floors(s: &Settings, work: &Path) -> Result<Measured> {
    if s.progress {
        let _ = write!(std::io::stderr(), "\r\x1b[K  measuring floors...");
    }
    // The sled floor gets as many callers as the product run has records in flight (a
    // batch call waits for k records); the unary echo floor gets the same callers for a
    // unary run, and for a batched one as many as the ack profile has, so it is the figure
    // the unary targets compare with.
    let records_in_flight = s.concurrency * s.batch;
    let sled =
        |layout| floors::sled_commit(work, s.floor_messages, s.size, records_in_flight, layout);
    let per_message = sled(floors::Layout::PerMessage)
        .await
        .context("measuring the sled commit floor")?;
    let packed = sled(floors::Layout::Packed(
        push_manager::store::record::PACK_BYTES,
    ))
    .await
    .context("measuring the packed sled commit floor")?;
    let echo_callers = records_in_flight.min(ECHO_CALLERS_BATCHED);
    let echo = floors::echo(s.floor_messages, s.size, 1, echo_callers, s.connections)
        .await
        .context("measuring the unary echo floor")?;
    let echo_batch = floors::echo(
        s.floor_messages,
        s.size,
        ECHO_BATCH,
        ECHO_BATCH_CALLERS,
        s.connections,
    )
    .await
    .context("measuring the batched echo floor")?;
    if s.progress {
        let _ = write!(std::io::stderr(), "\r\x1b[K");
    }
    Ok((per_message, packed, echo, echo_batch, s.floor_messages))
}
