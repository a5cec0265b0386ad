//! A real etcd for the tests: the `etcd` binary (Debian package `etcd-server`, or `ETCD_BIN`)
//! on free loopback ports with its own temp data dir, stopped and cleaned up on drop.
//!
//! A missing binary fails the test with the command that installs it: the etcd tests are
//! never skipped silently.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, GetOptions, PutOptions};
use tempfile::TempDir;

use push_manager::proto::BroadCastReq;

use super::{free_port, tail, Manager};

/// Longer than a cold start of etcd on a slow CI machine.
const START_DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Every call this helper makes is bounded by this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd binary: `$ETCD_BIN`, else `etcd` from PATH. Panics, saying how to install it,
/// when there is none.
pub fn etcd_bin() -> PathBuf {
    let bin = std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"));
    match Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => bin,
        Ok(s) => panic!(
            "`{} --version` failed ({s}); these tests need a working etcd",
            bin.display()
        ),
        Err(e) => panic!(
            "these tests need a real etcd, and `{}` cannot be run ({e}). Install it with \
             `apt-get install etcd-server` (Debian/Ubuntu), or set ETCD_BIN to an etcd v3 \
             binary. The tests are not skipped without it.",
            bin.display()
        ),
    }
}

/// A running etcd; see the module docs.
pub struct Etcd {
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    log_path: PathBuf,
    dir: TempDir,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    pub async fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("expected to create a temp dir for etcd: {e}"));
        let mut etcd = Etcd {
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            log_path: dir.path().join("etcd.log"),
            dir,
        };
        etcd.spawn();
        etcd.wait_ready().await;
        etcd
    }

    /// `http://127.0.0.1:PORT`, for `--etcd`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data dir (kept across [`Etcd::kill`] / [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// SIGKILL and reap; the data dir stays, so a restart has the same keys.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same ports and data dir, and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// A client of this etcd, every call bounded.
    pub async fn client(&self) -> Client {
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(CALL_TIMEOUT)
            .with_connect_timeout(CALL_TIMEOUT);
        Client::connect([self.url()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("expected to connect to etcd at {}: {e}", self.url()))
    }

    /// A client authenticating as `user`.
    pub async fn client_as(&self, user: &str, password: &str) -> Client {
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(CALL_TIMEOUT)
            .with_user(user, password);
        Client::connect([self.url()], Some(options))
            .await
            .unwrap_or_else(|e| panic!("expected to log in to etcd as {user}: {e}"))
    }

    /// Puts `key = value` without a lease; returns the revision.
    pub async fn put(&self, key: &str, value: &str) -> i64 {
        let resp = self
            .client()
            .await
            .put(key, value, None)
            .await
            .unwrap_or_else(|e| panic!("expected to put {key}: {e}"));
        resp.header().map_or(0, |h| h.revision())
    }

    /// Puts `key = value` on a new lease of `ttl_secs`; returns the lease id.
    pub async fn put_with_lease(&self, key: &str, value: &str, ttl_secs: i64) -> i64 {
        let mut client = self.client().await;
        let lease = client
            .lease_grant(ttl_secs, None)
            .await
            .unwrap_or_else(|e| panic!("expected a lease: {e}"))
            .id();
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
            .unwrap_or_else(|e| panic!("expected to put {key}: {e}"));
        lease
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) {
        self.client()
            .await
            .delete(key, None)
            .await
            .unwrap_or_else(|e| panic!("expected to delete {key}: {e}"));
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Option<String> {
        let resp = self
            .client()
            .await
            .get(key, None)
            .await
            .unwrap_or_else(|e| panic!("expected to get {key}: {e}"));
        resp.kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
    }

    /// Every key under `prefix`, with its value.
    pub async fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let resp = self
            .client()
            .await
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("expected to read {prefix}: {e}"));
        resp.kvs()
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect()
    }

    /// Compacts the history up to the current revision (physically); returns it.
    pub async fn compact_all(&self) -> i64 {
        let mut client = self.client().await;
        let rev = client
            .get("/", None)
            .await
            .unwrap_or_else(|e| panic!("expected to read the revision: {e}"))
            .header()
            .map_or(0, |h| h.revision());
        client
            .compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap_or_else(|e| panic!("expected to compact at {rev}: {e}"));
        rev
    }

    /// Turns authentication on with user `root` / `password` (the root role).
    pub async fn enable_auth(&self, password: &str) {
        let mut client = self.client().await;
        client
            .user_add("root", password, None)
            .await
            .unwrap_or_else(|e| panic!("expected to add user root: {e}"));
        client
            .user_grant_role("root", "root")
            .await
            .unwrap_or_else(|e| panic!("expected to grant the root role: {e}"));
        client
            .auth_enable()
            .await
            .unwrap_or_else(|e| panic!("expected to enable auth: {e}"));
    }

    /// The last `n` lines of etcd's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    fn spawn(&mut self) {
        let bin = etcd_bin();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap_or_else(|e| panic!("expected to open {}: {e}", self.log_path.display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("expected to share {}: {e}", self.log_path.display()));
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&bin)
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            // A single member elects itself after one election timeout: keep it short.
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("expected to start {}: {e}", bin.display()));
        self.child = Some(child);
    }

    async fn wait_ready(&mut self) {
        let start = Instant::now();
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(1))
            .with_connect_timeout(Duration::from_secs(1));
        let mut last = String::new();
        while start.elapsed() < START_DEADLINE {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "etcd exited with {status} while starting; its log:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            match Client::connect([self.url()], Some(options.clone())).await {
                Ok(mut c) => match c.get("/", None).await {
                    Ok(_) => return,
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "etcd did not answer within {START_DEADLINE:?} (last error: {last}); its log:\n{}",
            self.log_tail(40)
        );
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- etcd log (last 20 lines):\n{}", self.log_tail(20));
        }
    }
}

/// Polls the async condition `f` every 50 ms until it holds; panics naming `what` after
/// `deadline`.
pub async fn wait_until_async<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Sends probe broadcasts (msg_ids `probe-<tag>-<i>`) until one is queued for exactly
/// `nodes` nodes, i.e. until the manager's membership has converged to that many known
/// nodes; returns the probes' msg_ids. Panics with the manager's log tail after `deadline`.
pub async fn wait_for_node_count(
    manager: &Manager,
    nodes: u32,
    tag: &str,
    deadline: Duration,
) -> Vec<String> {
    let mut client = manager.client().await;
    let start = Instant::now();
    let mut sent = Vec::new();
    loop {
        let msg_id = format!("probe-{tag}-{}", sent.len());
        let req = BroadCastReq {
            msg_id: msg_id.clone(),
            payload: b"probe".to_vec(),
            ..Default::default()
        };
        sent.push(msg_id);
        let last = match client.broadcast(req).await {
            Ok(r) if r.get_ref().node_count == nodes => return sent,
            Ok(r) => format!("node_count {}", r.get_ref().node_count),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        if start.elapsed() >= deadline {
            panic!(
                "timed out after {deadline:?} waiting for the manager to know {nodes} node(s); \
                 last probe: {last}\n--- manager log (last 40 lines):\n{}",
                manager.log_tail(40)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
