//! A real etcd for the tests: the `etcd` binary (Debian package `etcd-server`, or `ETCD_BIN`)
//! on free loopback ports with its own temp data dir, stopped and cleaned up on drop. The
//! process itself is the library's [`EtcdProcess`] (shared with `push-chaos`); this wraps it
//! with a temp dir, panicking helpers and clients.
//!
//! A missing binary fails the test with the command that installs it: the etcd tests are
//! never skipped silently.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, GetOptions, PutOptions};
use tempfile::TempDir;

use push_manager::harness::EtcdProcess;
use push_manager::proto::BroadCastReq;

use super::Manager;

const POLL: Duration = Duration::from_millis(50);
/// Every call this helper makes is bounded by this.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The etcd binary: `$ETCD_BIN`, else `etcd` from PATH. Panics, saying how to install it,
/// when there is none.
pub fn etcd_bin() -> PathBuf {
    push_manager::harness::etcd_bin()
        .unwrap_or_else(|e| panic!("{e} The tests are not skipped without it."))
}

/// A running etcd; see the module docs.
pub struct Etcd {
    inner: EtcdProcess,
    /// With TLS: the CA its certificate is verified with.
    tls_ca: Option<PathBuf>,
    // Last, so the directory outlives the process that uses it.
    dir: TempDir,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    pub async fn start() -> Etcd {
        Etcd::start_with(None).await
    }

    /// Starts an etcd serving clients over TLS with `tls`'s certificate.
    pub async fn start_tls(tls: push_manager::harness::EtcdTls) -> Etcd {
        Etcd::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<push_manager::harness::EtcdTls>) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("expected to create a temp dir for etcd: {e}"));
        // Fails early, with the install hint, when there is no etcd.
        etcd_bin();
        let mut inner = EtcdProcess::new(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let tls_ca = tls.as_ref().map(|t| t.ca.clone());
        if let Some(tls) = tls {
            inner = inner.with_tls(tls);
        }
        inner.start().await.unwrap_or_else(|e| panic!("{e}"));
        Etcd { inner, tls_ca, dir }
    }

    /// Connect options for this etcd: bounded calls, TLS when it serves TLS.
    fn options(&self) -> etcd_client::ConnectOptions {
        let options = etcd_client::ConnectOptions::new()
            .with_timeout(CALL_TIMEOUT)
            .with_connect_timeout(CALL_TIMEOUT);
        match &self.tls_ca {
            Some(ca) => {
                let pem =
                    std::fs::read(ca).unwrap_or_else(|e| panic!("read {}: {e}", ca.display()));
                options.with_tls(
                    etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(pem)),
                )
            }
            None => options,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), for `--etcd`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The data dir (kept across [`Etcd::kill`] / [`Etcd::restart`]).
    pub fn data_dir(&self) -> PathBuf {
        self.inner.data_dir()
    }

    /// SIGKILL and reap; the data dir stays, so a restart has the same keys.
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Starts it again on the same ports and data dir, and waits until it answers.
    pub async fn restart(&mut self) {
        self.inner.restart().await.unwrap_or_else(|e| panic!("{e}"));
    }

    /// A client of this etcd, every call bounded.
    pub async fn client(&self) -> Client {
        Client::connect([self.url()], Some(self.options()))
            .await
            .unwrap_or_else(|e| panic!("expected to connect to etcd at {}: {e}", self.url()))
    }

    /// A client authenticating as `user`.
    pub async fn client_as(&self, user: &str, password: &str) -> Client {
        let options = self.options().with_user(user, password);
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
        self.inner.log_tail(n)
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
            payload: b"probe".to_vec().into(),
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
