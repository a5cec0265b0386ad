//! `push-bench`: end-to-end load generator. Starts a manager (`push-manager serve`, the
//! binary next to this one) on a temporary data dir and N `connect-node-sim`s on loopback,
//! sends B broadcasts of S bytes with C concurrent callers, waits until every node has every
//! message, and prints acked/s, ack latency percentiles, deliveries/s and the manager's
//! resource use. Build with `cargo build --release --bins` and run `target/release/push-bench`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures::stream::{self, StreamExt};
use push_manager::harness::{free_port, start_sim, ManagerProcess, Proc};
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::BroadCastReq;

/// End-to-end benchmark of push-manager on this machine (loopback only).
#[derive(Parser, Debug)]
#[command(name = "push-bench", version)]
struct Args {
    /// Connect-node-sims to deliver to.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Broadcasts to send.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Concurrent callers.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// gRPC connections the callers are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Durability mode of the manager (fsync or buffered).
    #[arg(long, default_value = "fsync")]
    durability: String,
    /// Where to put the manager's data dir (its disk is what gets measured); default: a
    /// temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Manager process figures from /proc.
#[derive(Debug, Default)]
struct ProcStats {
    cpu_seconds: f64,
    peak_rss_kib: u64,
    write_bytes: u64,
}

fn proc_stats(pid: u32) -> ProcStats {
    let mut s = ProcStats::default();
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Fields after the command name (which may contain spaces) start after ") ".
        if let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
            s.cpu_seconds = (ticks(11) + ticks(12)) / 100.0;
        }
    }
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
        for line in status.lines() {
            if let Some(v) = line.strip_prefix("VmHWM:") {
                s.peak_rss_kib = v.trim().trim_end_matches(" kB").parse().unwrap_or(0);
            }
        }
    }
    if let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) {
        for line in io.lines() {
            if let Some(v) = line.strip_prefix("write_bytes:") {
                s.write_bytes = v.trim().parse().unwrap_or(0);
            }
        }
    }
    s
}

fn count_lines(path: &Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tmp = std::env::temp_dir().join(format!("push-bench-{}", std::process::id()));
    let work = args.dir.clone().unwrap_or_else(|| tmp.clone());
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let result = run(&args, &work).await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

async fn run(args: &Args, work: &Path) -> Result<()> {
    let mut sims: Vec<(Proc, PathBuf)> = Vec::new();
    let mut node_args = Vec::new();
    for i in 0..args.nodes {
        let id = format!("node-{i}");
        let record = work.join(format!("{id}.log"));
        let (proc, port) = start_sim(&id, 0, &record, &[])?;
        node_args.push("--static-node".to_string());
        node_args.push(format!("{id}=127.0.0.1:{port}"));
        sims.push((proc, record));
    }
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut margs = vec![
        "--listen".to_string(),
        addr.clone(),
        "--data-dir".into(),
        work.join("data").display().to_string(),
        "--durability".into(),
        args.durability.clone(),
    ];
    margs.extend(node_args);
    let mut manager = ManagerProcess::new(&addr, margs, work.join("manager.log"));
    manager.start().await?;
    let pid = manager
        .proc()
        .map(|p| p.pid())
        .context("manager not running")?;
    let before = proc_stats(pid);

    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(PushServerClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        ));
    }
    let payload = vec![b'x'; args.size];
    let started = Instant::now();
    let results: Vec<Result<u64, tonic::Status>> = stream::iter(0..args.messages)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let req = BroadCastReq {
                msg_id: format!("bench-{i}"),
                payload: payload.clone(),
                ..Default::default()
            };
            async move {
                let t = Instant::now();
                client.broadcast(req).await?;
                Ok(t.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let send_secs = started.elapsed().as_secs_f64();
    let mut lat = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(us) => lat.push(us),
            Err(s) => bail!("a broadcast failed: {s:?}"),
        }
    }
    lat.sort_unstable();

    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if sims.iter().all(|(_, r)| count_lines(r) >= args.messages) {
            break;
        }
        if Instant::now() > deadline {
            bail!("delivery did not complete within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliver_secs = started.elapsed().as_secs_f64();
    let after = proc_stats(pid);
    if let Some(p) = manager.proc() {
        p.terminate();
    }
    for (p, _) in &mut sims {
        p.terminate();
    }

    let acked_per_s = args.messages as f64 / send_secs;
    let deliveries_per_s = (args.messages * args.nodes) as f64 / deliver_secs;
    let cpu = after.cpu_seconds - before.cpu_seconds;
    let disk_per_msg =
        after.write_bytes.saturating_sub(before.write_bytes) as f64 / args.messages as f64;
    let (p50, p99, p999) = (
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
    );
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        writeln!(
            out,
            "{{\"nodes\":{},\"messages\":{},\"size\":{},\"concurrency\":{},\"durability\":\"{}\",\
             \"acked_per_s\":{acked_per_s:.0},\"ack_p50_ms\":{p50:.3},\"ack_p99_ms\":{p99:.3},\
             \"ack_p999_ms\":{p999:.3},\"deliveries_per_s\":{deliveries_per_s:.0},\
             \"manager_cpu_s\":{cpu:.2},\"manager_peak_rss_kib\":{},\"disk_bytes_per_msg\":{disk_per_msg:.0}}}",
            args.nodes, args.messages, args.size, args.concurrency, args.durability, after.peak_rss_kib
        )
    } else {
        writeln!(
            out,
            "{} x {} B to {} nodes, {} callers, {}:\n  acked      {acked_per_s:>10.0} /s   ack p50 {p50:.2} ms  p99 {p99:.2} ms  p99.9 {p999:.2} ms\n  delivered  {deliveries_per_s:>10.0} /s   (messages x nodes, until every node had all)\n  manager    {cpu:.2} CPU s, peak RSS {} KiB, {disk_per_msg:.0} disk bytes written per broadcast",
            args.messages, args.size, args.nodes, args.concurrency, args.durability, after.peak_rss_kib
        )
    };
    match written {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
