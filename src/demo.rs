//! `push-manager demo`: the whole flow on one machine in under a minute, nothing to
//! install. It runs real processes: a manager (this executable, `serve`) on a temporary
//! data dir and three `connect-node-sim`s on loopback; takes a node down, kills the manager
//! with SIGKILL mid-traffic and restarts it, brings the node back, and reports per node what
//! was acked, delivered, duplicated and lost.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};

use crate::harness::{free_port, received, start_sim, HarnessError, ManagerProcess, Proc};
use crate::proto::BroadCastReq;

/// Errors that stop the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A process could not be started or did not come up.
    #[error(transparent)]
    Process(#[from] HarnessError),
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

struct Sim {
    port: u16,
    record: PathBuf,
    proc: Option<Proc>,
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
                    payload: format!("demo payload for {id}").into_bytes().into(),
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
    let mut sims = Vec::new();
    for id in NODES {
        let record = work.join(format!("{id}.log"));
        // A port below the ephemeral range: the node is restarted on it after its outage.
        let (proc, port) = start_sim(id, free_port()?, &record, &[])?;
        sims.push(Sim {
            port,
            record,
            proc: Some(proc),
        });
    }
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut args = vec![
        "--listen".to_string(),
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
    let mut manager = ManagerProcess::new(&addr, args, work.join("manager.log"));
    manager.start().await?;
    say(&format!("manager up on {addr}; nodes {}", NODES.join(", ")));

    let mut acked = send_all(&addr, ids("a", 100)).await;
    say(&format!(
        "phase 1: {} broadcasts acked, all nodes up",
        acked.len()
    ));

    if let Some(p) = sims[2].proc.as_mut() {
        p.kill();
    }
    say("node-3 killed (SIGKILL)");
    let phase2 = send_all(&addr, ids("b", 100)).await;
    say(&format!(
        "phase 2: {} broadcasts acked while node-3 is down",
        phase2.len()
    ));
    acked.extend(phase2);

    // Kill the manager while a sender is in full flight: calls not yet acked may fail,
    // every call that was acked must still arrive everywhere.
    let sender = {
        let addr = addr.clone();
        tokio::spawn(async move { send_all(&addr, ids("c", 300)).await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    if let Some(p) = manager.proc() {
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
    say(&format!(
        "phase 4: {} broadcasts acked after the restart",
        phase4.len()
    ));
    acked.extend(phase4);

    let (proc, _) = start_sim(NODES[2], sims[2].port, &sims[2].record, &[])?;
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
    if let Some(p) = manager.proc() {
        p.terminate();
    }
    for sim in &mut sims {
        if let Some(p) = sim.proc.as_mut() {
            p.terminate();
        }
    }
    say(&format!(
        "\n{:<8} {:>9} {:>10} {:>11} {:>5}",
        "node", "accepted", "delivered", "duplicates", "lost"
    ));
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
