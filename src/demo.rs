//! `push-manager demo`: the whole flow on one machine in under a minute, nothing to
//! install. It runs real processes: a manager (this executable, `serve`) on a temporary
//! data dir and three `connect-node-sim`s on loopback; takes a node down, kills the manager
//! with SIGKILL mid-traffic and restarts it, brings the node back, and reports per node what
//! was acked, delivered, duplicated and lost.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::proto::BroadCastReq;

/// Errors that stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A process could not be started or did not come up.
    #[error("{0}")]
    Process(String),
    /// Delivery did not converge in time: the report says what is missing.
    #[error("delivery did not converge within {0:?}")]
    Timeout(Duration),
}

/// Per-node figures of a demo run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Node id.
    pub node: String,
    /// Broadcasts acked OK by the manager (all nodes were known for all of them).
    pub accepted: usize,
    /// Distinct acked msg_ids the node received.
    pub delivered: usize,
    /// Receipts beyond the first of a msg_id (at-least-once retries after the crash).
    pub duplicates: usize,
    /// Acked msg_ids the node never received.
    pub lost: usize,
}

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
const CONVERGE: Duration = Duration::from_secs(30);

struct Proc {
    child: Child,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Sim {
    port: u16,
    record: PathBuf,
    proc: Option<Proc>,
}

fn sibling(name: &str) -> Result<PathBuf, DemoError> {
    let exe = std::env::current_exe()
        .map_err(|e| DemoError::Process(format!("cannot locate this executable: {e}")))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(DemoError::Process(format!(
            "{} not found next to {}; build every binary first: cargo build --release --bins",
            name,
            exe.display()
        )))
    }
}

fn start_sim(bin: &Path, id: &str, port: u16, record: &Path) -> Result<(Proc, u16), DemoError> {
    let mut child = Command::new(bin)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", id])
        .arg("--record")
        .arg(record)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| DemoError::Process(format!("cannot start {}: {e}", bin.display())))?;
    let stdout = child.stdout.take();
    let proc = Proc { child };
    let mut line = String::new();
    if let Some(out) = stdout {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    let port = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| DemoError::Process(format!("{id} did not report its port ({line:?})")))?;
    Ok((proc, port))
}

/// Received msg_id -> times, read from a sim's record file.
fn received(record: &Path) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    if let Ok(text) = std::fs::read_to_string(record) {
        for line in text.lines() {
            if let Some(id) = line.split('\t').next().filter(|s| !s.is_empty()) {
                *out.entry(id.to_string()).or_default() += 1;
            }
        }
    }
    out
}

struct Manager {
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    addr: String,
    proc: Option<Proc>,
}

impl Manager {
    async fn start(&mut self) -> Result<(), DemoError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| DemoError::Process(format!("cannot open {}: {e}", self.log.display())))?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| DemoError::Process(format!("cannot start the manager: {e}")))?;
        self.proc = Some(Proc { child });
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if crate::client::connect(&self.addr, Duration::from_secs(1)).await.is_ok()
                && health_serving(&self.addr).await
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(DemoError::Process(format!(
            "the manager did not become ready; see {}",
            self.log.display()
        )))
    }
}

async fn health_serving(addr: &str) -> bool {
    let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = channel.connect().await else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    matches!(health.check(req).await, Ok(r) if r.get_ref().status == 1)
}

/// Sends `ids` with 8 concurrent callers; returns the ids acked OK.
async fn send_all(addr: &str, ids: Vec<String>) -> Vec<String> {
    let Ok(client) = crate::client::connect(addr, Duration::from_secs(2)).await else {
        return Vec::new();
    };
    stream::iter(ids)
        .map(|id| {
            let mut client = client.clone();
            async move {
                let req = BroadCastReq {
                    msg_id: id.clone(),
                    payload: format!("demo payload for {id}").into_bytes(),
                    topic: "demo".into(),
                    ..Default::default()
                };
                client.broadcast(req).await.ok().map(|_| id)
            }
        })
        .buffer_unordered(8)
        .filter_map(|r| async move { r })
        .collect()
        .await
}

fn ids(phase: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{phase}-{i:04}")).collect()
}

fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
}

/// Runs the demo in `work` (a fresh directory); returns the per-node report.
pub async fn run(work: &Path) -> Result<Vec<NodeReport>, DemoError> {
    let sim_bin = sibling("connect-node-sim")?;
    let manager_bin = std::env::current_exe()
        .map_err(|e| DemoError::Process(format!("cannot locate this executable: {e}")))?;

    let mut sims = Vec::new();
    for id in NODES {
        let record = work.join(format!("{id}.log"));
        let (proc, port) = start_sim(&sim_bin, id, 0, &record)?;
        sims.push(Sim {
            port,
            record,
            proc: Some(proc),
        });
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| DemoError::Process(format!("no free port: {e}")))?;
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "serve".to_string(),
        "--listen".into(),
        addr.clone(),
        "--data-dir".into(),
        work.join("data").display().to_string(),
        "--backoff-max".into(),
        "1s".into(),
    ];
    for (id, sim) in NODES.iter().zip(&sims) {
        args.push("--static-node".into());
        args.push(format!("{id}=127.0.0.1:{}", sim.port));
    }
    let mut manager = Manager {
        bin: manager_bin,
        args,
        log: work.join("manager.log"),
        addr: addr.clone(),
        proc: None,
    };
    manager.start().await?;
    say(&format!("manager up on {addr}; nodes {}", NODES.join(", ")));

    let mut acked = send_all(&addr, ids("a", 100)).await;
    say(&format!("phase 1: {} broadcasts acked, all nodes up", acked.len()));

    if let Some(p) = sims[2].proc.as_mut() {
        p.kill();
    }
    say("node-3 killed (SIGKILL)");
    let phase2 = send_all(&addr, ids("b", 100)).await;
    say(&format!("phase 2: {} broadcasts acked while node-3 is down", phase2.len()));
    acked.extend(phase2);

    // Kill the manager while a sender is in full flight: calls not yet acked may fail,
    // every call that was acked must still arrive everywhere.
    let sender = {
        let addr = addr.clone();
        tokio::spawn(async move { send_all(&addr, ids("c", 300)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Some(p) = manager.proc.as_mut() {
        p.kill();
    }
    let phase3 = sender.await.unwrap_or_default();
    say(&format!(
        "manager killed (SIGKILL) mid-traffic: {} of 300 acked before the kill",
        phase3.len()
    ));
    acked.extend(phase3);
    manager.start().await?;
    say("manager restarted on the same data dir");
    let phase4 = send_all(&addr, ids("d", 100)).await;
    say(&format!("phase 4: {} broadcasts acked after the restart", phase4.len()));
    acked.extend(phase4);

    let (proc, _) = start_sim(&sim_bin, NODES[2], sims[2].port, &sims[2].record)?;
    sims[2].proc = Some(proc);
    say("node-3 back on its address");

    let acked_set: HashSet<&String> = acked.iter().collect();
    let started = Instant::now();
    let reports = loop {
        let reports: Vec<NodeReport> = NODES
            .iter()
            .zip(&sims)
            .map(|(id, sim)| {
                let got = received(&sim.record);
                let delivered = acked_set.iter().filter(|m| got.contains_key(**m)).count();
                NodeReport {
                    node: id.to_string(),
                    accepted: acked_set.len(),
                    delivered,
                    duplicates: got.values().map(|n| n - 1).sum(),
                    lost: acked_set.len() - delivered,
                }
            })
            .collect();
        if reports.iter().all(|r| r.lost == 0) || started.elapsed() > CONVERGE {
            break reports;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(p) = manager.proc.as_mut() {
        p.terminate();
    }
    for sim in &mut sims {
        if let Some(p) = sim.proc.as_mut() {
            p.terminate();
        }
    }
    say(&format!("\n{:<8} {:>9} {:>10} {:>11} {:>5}", "node", "accepted", "delivered", "duplicates", "lost"));
    for r in &reports {
        say(&format!(
            "{:<8} {:>9} {:>10} {:>11} {:>5}",
            r.node, r.accepted, r.delivered, r.duplicates, r.lost
        ));
    }
    if reports.iter().any(|r| r.lost > 0) {
        return Err(DemoError::Timeout(CONVERGE));
    }
    say(&format!(
        "\nevery acked broadcast reached every node ({:.1}s to converge after node-3 returned)",
        started.elapsed().as_secs_f64()
    ));
    Ok(reports)
}
