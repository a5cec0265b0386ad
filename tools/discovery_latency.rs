//! `discovery-latency`: how long from a connect-node's registration in etcd to the manager
//! delivering to it. Not a test: a measurement, printed as a summary line.
//!
//! It runs a real etcd (`--etcd URL`, or one it starts from `etcd` in PATH on free loopback
//! ports), a real `push-manager serve --etcd` child process with one static anchor node (so
//! broadcasts are accepted throughout), and a sender broadcasting every `--interval-ms`.
//! Then, `--nodes` times: it starts a fresh in-process node, puts its registration
//! (`/services/connect-node/<id>` = its address) and times the put until the node receives
//! its first broadcast. That span covers the watch event, the membership update, the wait
//! for the next broadcast (at most `--interval-ms`), its commit (fsync) and the delivery.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use push_manager::discovery::DEFAULT_NODE_PREFIX;
use push_manager::harness::{free_port, ManagerProcess};
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::push_server_server::{PushServer, PushServerServer};
use push_manager::proto::{BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq};
use tokio::sync::oneshot;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(Parser, Debug)]
#[command(
    name = "discovery-latency",
    about = "Measure the time from a connect-node's put in etcd to its first delivery from a \
             push-manager (median, p90, max)."
)]
struct Args {
    /// etcd to use; without it, one is started from `etcd` in PATH (apt-get install
    /// etcd-server).
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// Registrations to time.
    #[arg(long, default_value_t = 21)]
    nodes: usize,
    /// Pause between two broadcasts of the sender, in milliseconds.
    #[arg(long, default_value_t = 2)]
    interval_ms: u64,
}

/// A node that answers OK and reports when its first broadcast arrived.
struct Node {
    first: Mutex<Option<oneshot::Sender<Instant>>>,
}

#[tonic::async_trait]
impl PushServer for Node {
    async fn broadcast(
        &self,
        request: Request<BroadCastReq>,
    ) -> Result<Response<BroadCastReply>, Status> {
        let now = Instant::now();
        if let Some(tx) = self.first.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(now);
        }
        Ok(Response::new(BroadCastReply {
            msg_id: request.into_inner().msg_id,
            node_count: 0,
            duplicate: false,
        }))
    }

    async fn broadcast_batch(
        &self,
        _request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        Err(Status::unimplemented("send unary Broadcast calls"))
    }
}

/// Serves a [`Node`] on a free port; returns its address and the first-arrival receiver.
async fn start_node() -> Result<(String, oneshot::Receiver<Instant>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (tx, rx) = oneshot::channel();
    let node = Node {
        first: Mutex::new(Some(tx)),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PushServerServer::new(node))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Ok((addr, rx))
}

/// The run's scratch directory, removed on drop.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> Result<WorkDir> {
        let dir = std::env::temp_dir().join(format!("discovery-latency-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(WorkDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An etcd started for the run, killed on drop.
struct OwnEtcd {
    child: Child,
    url: String,
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_etcd(dir: &Path) -> Result<OwnEtcd> {
    let (client, peer) = (free_port()?, free_port()?);
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .arg("--name=latency")
        .arg(format!("--data-dir={}", dir.join("etcd").display()))
        .arg(format!("--listen-client-urls={url}"))
        .arg(format!("--advertise-client-urls={url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=latency={peer_url}"))
        .arg("--heartbeat-interval=50")
        .arg("--election-timeout=500")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start etcd from PATH; install it (apt-get install etcd-server) or give --etcd URL")?;
    Ok(OwnEtcd { child, url })
}

async fn etcd_client(url: &str) -> Result<etcd_client::Client> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let options = etcd_client::ConnectOptions::new().with_timeout(Duration::from_secs(2));
        if let Ok(mut c) = etcd_client::Client::connect([url], Some(options)).await {
            if c.get("/", None).await.is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            bail!("etcd at {url} did not answer within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let work = WorkDir::create()?;
    let own_etcd = match &args.etcd {
        Some(_) => None,
        None => Some(start_etcd(work.path())?),
    };
    let url = args
        .etcd
        .clone()
        .or_else(|| own_etcd.as_ref().map(|e| e.url.clone()))
        .unwrap_or_default();
    let mut etcd = etcd_client(&url).await?;

    let (anchor, _anchor_first) = start_node().await?;
    let addr = format!("127.0.0.1:{}", free_port()?);
    let data: PathBuf = work.path().join("data");
    let mut manager = ManagerProcess::new(
        &addr,
        vec![
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--etcd".into(),
            url.clone(),
            "--static-node".into(),
            format!("anchor={anchor}"),
        ],
        work.path().join("manager.log"),
    );
    if let Err(e) = manager.start().await {
        let log = std::fs::read_to_string(work.path().join("manager.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        return Err(e.into());
    }

    let interval = Duration::from_millis(args.interval_ms.max(1));
    let sender = {
        let mut client = PushServerClient::connect(format!("http://{addr}")).await?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            for i in 0u64.. {
                tick.tick().await;
                let req = BroadCastReq {
                    msg_id: format!("lat-{i}"),
                    payload: b"latency".to_vec().into(),
                    ..Default::default()
                };
                let _ = client.broadcast(req).await;
            }
        })
    };

    let run = format!("{:x}", std::process::id());
    let mut samples = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        let (node_addr, first) = start_node().await?;
        let key = format!("{DEFAULT_NODE_PREFIX}lat-{run}-{i}");
        let put_at = Instant::now();
        etcd.put(key.clone(), node_addr, None).await?;
        let got = tokio::time::timeout(Duration::from_secs(30), first)
            .await
            .with_context(|| format!("node {key} got nothing within 30s"))?
            .context("node dropped")?;
        let latency = got.saturating_duration_since(put_at);
        eprintln!("{key}: {latency:?}");
        samples.push(latency);
    }
    sender.abort();
    if let Some(p) = manager.proc() {
        p.terminate();
    }
    for i in 0..args.nodes {
        let _ = etcd
            .delete(format!("{DEFAULT_NODE_PREFIX}lat-{run}-{i}"), None)
            .await;
    }

    samples.sort();
    println!(
        "discovery latency (put -> first delivery), {} nodes, sender every {:?}: median {:?}, \
         p90 {:?}, min {:?}, max {:?}",
        samples.len(),
        interval,
        percentile(&samples, 0.5),
        percentile(&samples, 0.9),
        samples[0],
        samples[samples.len() - 1],
    );
    Ok(())
}
