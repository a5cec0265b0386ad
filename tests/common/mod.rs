//! The processes integration tests run against: connect-node sims ([`Sim`]) and push-manager
//! servers ([`Manager`]), each started from the crate's own binaries, and a real etcd
//! ([`etcd::Etcd`]).
//!
//! Everything here is bounded in time and cleaned up on drop: a child process still running
//! when its handle drops is SIGKILLed and reaped, and its temp dir removed. When a test panics,
//! the drops print the tail of each process's log, so the failure shows what the processes
//! were doing.
//!
//! Tests wait for conditions with [`wait_until`], never with fixed sleeps.

// Every integration test file does `mod common;` and each uses a subset of these helpers.
#![allow(dead_code)]

pub mod certs;
pub mod etcd;
pub mod metrics;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::store::Store;
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SIM_BIN: &str = env!("CARGO_BIN_EXE_connect-node-sim");
const MANAGER_BIN: &str = env!("CARGO_BIN_EXE_push-manager");

const SIM_START_DEADLINE: Duration = Duration::from_secs(10);
const MANAGER_READY_DEADLINE: Duration = Duration::from_secs(20);
/// Longer than the manager's default `--shutdown-timeout`, so a slow but correct drain passes.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);
/// Bounds every call made through a client from this module, so a hung call fails the test
/// instead of hanging it.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Log lines printed when a test panics with a process still around.
const TAIL_ON_PANIC: usize = 40;

/// Manager flags for tests that watch retries and dead letters happen quickly: two
/// attempts, backoff from 10 ms capped at 200 ms.
pub const FAST_RETRY: &[&str] = &[
    "--max-attempts",
    "2",
    "--backoff-initial",
    "10ms",
    "--backoff-max",
    "200ms",
];

/// Opens a stopped manager's store in this process, runs `f` on it, and closes it again
/// before returning, so that a manager started next (or sled opened directly) finds it
/// unlocked ([`Store::wait_unlocked`]).
pub fn with_store<T>(data_dir: &Path, f: impl FnOnce(&Store) -> T) -> T {
    let got = f(&Store::open(data_dir).expect("open the stopped store"));
    Store::wait_unlocked(data_dir, Duration::from_secs(10)).expect("store released");
    got
}

/// A loopback port that is free now and that no other process takes by chance
/// ([`push_manager::harness::free_port`]).
pub fn free_port() -> u16 {
    push_manager::harness::free_port()
        .unwrap_or_else(|e| panic!("expected a free port on 127.0.0.1: {e}"))
}

/// A deterministic payload of `size` bytes for message `i` (empty when `size` is 0): the text
/// `payload-<i>:` repeated.
pub fn payload(i: usize, size: usize) -> Vec<u8> {
    format!("payload-{i}:")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(size)
        .collect()
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `deadline`.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, deadline: Duration, mut f: F) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// `<prefix>-0` .. `<prefix>-<n-1>`.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Whether `sim` has answered OK for every one of `ids`.
pub fn has_all(sim: &Sim, ids: &[String]) -> bool {
    let got = sim.received_ids();
    ids.iter().all(|id| got.contains_key(id))
}

/// Broadcasts `ids` (256-byte payloads) through `manager` with 32 concurrent callers; every
/// one must be acked for `node_count` nodes.
pub async fn send_all(manager: &Manager, ids: &[String], node_count: u32) {
    use futures::stream::{self, StreamExt};
    let client = manager.client().await;
    let replies: Vec<_> = stream::iter(ids.iter().enumerate())
        .map(|(i, id)| {
            let mut client = client.clone();
            let req = push_manager::proto::BroadCastReq {
                msg_id: id.clone(),
                payload: payload(i, 256).into(),
                ..Default::default()
            };
            async move { (req.msg_id.clone(), client.broadcast(req).await) }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for (id, r) in replies {
        let reply = r.unwrap_or_else(|s| panic!("expected {id} to be acked, got {s:?}"));
        assert_eq!(reply.into_inner().node_count, node_count, "{id}");
    }
}

/// One line of a sim's record file.
pub use push_manager::harness::RecordLine as Record;

/// Parses a record file.
///
/// A last line without its `\n` is still being written and is left out. A line that does not
/// parse can only be one torn by a SIGKILL mid-write (the sim writes nothing else, and ends a
/// torn line when it restarts); it is left out too, since the sim never answered OK for it.
pub fn parse_records(text: &str) -> Vec<Record> {
    text.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .filter_map(push_manager::harness::parse_record_line)
        .collect()
}

/// A running `connect-node-sim`, recording what it accepts to `<tempdir>/<node_id>.log`.
///
/// The record file and the sim's stderr log (`<tempdir>/<node_id>.stderr.log`) are kept across
/// [`Sim::restart`], so a node that comes back keeps its history.
pub struct Sim {
    node_id: String,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    record_path: PathBuf,
    log_path: PathBuf,
    /// A panic message already carried the log tail: don't print it again on drop.
    log_shown: bool,
    // Last, so the directory outlives everything that refers to it.
    dir: TempDir,
}

impl Sim {
    /// Starts a sim on a free port ([`free_port`], so that a restart finds it still free),
    /// with `args` after the harness's own flags.
    pub fn start(node_id: &str, args: &[&str]) -> Sim {
        Sim::start_on(node_id, free_port(), args)
    }

    /// Starts a sim on a fixed port, e.g. for a node that comes back at a known address.
    pub fn start_on(node_id: &str, port: u16, args: &[&str]) -> Sim {
        let dir = tempfile::Builder::new()
            .prefix(&format!("sim-{node_id}-"))
            .tempdir()
            .unwrap_or_else(|e| panic!("expected to create a temp dir for sim {node_id}: {e}"));
        let mut sim = Sim {
            node_id: node_id.to_string(),
            port,
            args: args.iter().map(|arg| arg.to_string()).collect(),
            child: None,
            record_path: dir.path().join(format!("{node_id}.log")),
            log_path: dir.path().join(format!("{node_id}.stderr.log")),
            log_shown: false,
            dir,
        };
        sim.spawn();
        sim
    }

    /// Kills the sim if it is still running (SIGKILL), then starts it again on the same port
    /// with the same arguments and record file.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap_killed(&mut child);
        }
        self.spawn();
    }

    /// `127.0.0.1:PORT`, as a manager's `--static-node ID=ADDR` wants it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn record_path(&self) -> &Path {
        &self.record_path
    }

    /// Every broadcast this node answered OK, across restarts, in the order answered.
    pub fn received(&self) -> Vec<Record> {
        match std::fs::read(&self.record_path) {
            Ok(bytes) => parse_records(&String::from_utf8_lossy(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!(
                "expected to read record file {}: {e}",
                self.record_path.display()
            ),
        }
    }

    /// How many times each msg_id was answered OK (more than once means redelivered).
    pub fn received_ids(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for record in self.received() {
            *counts.entry(record.msg_id).or_insert(0) += 1;
        }
        counts
    }

    /// A client of this sim's `PushServer`, every call bounded in time.
    pub async fn client(&self) -> PushServerClient<Channel> {
        PushServerClient::new(connect(&self.addr()).await)
    }

    /// Whether the process is still running (false once it exited or was killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let mut child = self.running_child("kill");
        reap_killed(&mut child);
    }

    /// SIGTERM, and wait (bounded) for the graceful exit; returns its status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let child = self.running_child("terminate");
        let what = format!("sim {}", self.node_id);
        match terminate(child, &what).await {
            Ok(status) => status,
            Err(why) => self.fail(&why),
        }
    }

    /// The last `n` lines of the sim's stderr, across restarts.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    fn running_child(&mut self, action: &str) -> Child {
        self.child.take().unwrap_or_else(|| {
            panic!(
                "expected sim {} to be running to {action} it; it was stopped",
                self.node_id
            )
        })
    }

    /// Panics with `why` and the tail of the sim's stderr.
    fn fail(&mut self, why: &str) -> ! {
        self.log_shown = true;
        panic!(
            "{why}\n--- sim {} stderr (last {TAIL_ON_PANIC} lines):\n{}",
            self.node_id,
            self.log_tail(TAIL_ON_PANIC)
        );
    }

    fn spawn(&mut self) {
        let mut log = open_log(&self.log_path);
        // Best effort: the marker only helps reading the log.
        let _ = writeln!(
            log,
            "--- harness: starting sim {} on port {}",
            self.node_id, self.port
        );
        let mut child = Command::new(SIM_BIN)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--record")
            .arg(&self.record_path)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("expected to spawn {SIM_BIN}: {e}"));

        let first_line = read_first_line(&mut child, SIM_START_DEADLINE);
        let addr = match first_line {
            Ok(line) => line,
            Err(why) => {
                reap_killed(&mut child);
                self.fail(&format!(
                    "expected sim {} to print `listening on 127.0.0.1:PORT` within {:?}, but {why}",
                    self.node_id, SIM_START_DEADLINE,
                ));
            }
        };
        let bound = addr
            .strip_prefix("listening on ")
            .and_then(|addr| addr.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| {
                reap_killed(&mut child);
                self.fail(&format!(
                    "expected sim {} to print `listening on ADDR`, got {addr:?}",
                    self.node_id
                ))
            });
        if bound.port() != self.port {
            reap_killed(&mut child);
            self.fail(&format!(
                "expected sim {} to listen on port {}, it said {bound}",
                self.node_id, self.port
            ));
        }
        self.child = Some(child);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap_killed(&mut child);
        }
        if std::thread::panicking() && !self.log_shown {
            eprintln!(
                "--- sim {} stderr (last {TAIL_ON_PANIC} lines):\n{}",
                self.node_id,
                self.log_tail(TAIL_ON_PANIC)
            );
        }
    }
}

/// A running `push-manager serve` on a fixed port of 127.0.0.1, with stdout and stderr going
/// to a log file in its own temp dir (also its working directory).
///
/// The environment's `PUSH_MANAGER_*` variables are not passed on, so tests see only the flags
/// they give.
pub struct Manager {
    port: u16,
    data_dir: PathBuf,
    args: Vec<String>,
    /// Extra environment variables (set after the `PUSH_MANAGER_*` ones are removed).
    env: Vec<(String, String)>,
    child: Option<Child>,
    log_path: PathBuf,
    starts: u32,
    /// A panic message already carried the log tail: don't print it again on drop.
    log_shown: bool,
    /// How the harness's own health checks reach a manager serving TLS.
    client_tls: Option<tonic::transport::ClientTlsConfig>,
    dir: TempDir,
}

impl Manager {
    /// Runs `push-manager serve --listen 127.0.0.1:<free port> --data-dir <data_dir>
    /// --static-node ID=ADDR ... <extra>`. Does not wait: call [`Manager::wait_ready`].
    pub fn start(data_dir: &Path, static_nodes: &[(&str, String)], extra: &[&str]) -> Manager {
        Manager::start_with_env(data_dir, static_nodes, extra, &[])
    }

    /// [`Manager::start`] with environment variables for the process (kept across
    /// restarts), e.g. a documented tuning knob that has no flag.
    pub fn start_with_env(
        data_dir: &Path,
        static_nodes: &[(&str, String)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Manager {
        let port = free_port();
        let mut args = vec![
            "serve".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        for (id, addr) in static_nodes {
            args.push("--static-node".to_string());
            args.push(format!("{id}={addr}"));
        }
        args.extend(extra.iter().map(|arg| arg.to_string()));

        let dir = tempfile::Builder::new()
            .prefix("manager-")
            .tempdir()
            .unwrap_or_else(|e| panic!("expected to create a temp dir for the manager: {e}"));
        let mut manager = Manager {
            port,
            data_dir: data_dir.to_path_buf(),
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            log_path: dir.path().join("manager.log"),
            starts: 0,
            log_shown: false,
            client_tls: None,
            dir,
        };
        manager.spawn();
        manager
    }

    /// Kills the manager if it is still running (SIGKILL), then starts it again with the same
    /// arguments, data dir and port. Does not wait: call [`Manager::wait_ready`].
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap_killed(&mut child);
        }
        self.spawn();
    }

    /// Waits until `grpc.health.v1` reports SERVING for service `""`. Panics with the log tail
    /// if that takes longer than 20 s or the process exits first.
    pub async fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let child = self.child.as_mut().unwrap_or_else(|| {
                panic!(
                    "expected the manager on {} to be running to wait for it",
                    self.port
                )
            });
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.fail(&format!(
                    "expected the manager on {} to become ready, but it exited with {status}",
                    self.addr()
                ));
            }
            let last = match health_status(&self.addr(), self.client_tls.as_ref()).await {
                Ok(ServingStatus::Serving) => return,
                Ok(status) => format!("status {}", status.as_str_name()),
                Err(e) => e,
            };
            if start.elapsed() >= MANAGER_READY_DEADLINE {
                self.fail(&format!(
                    "expected the manager on {} to report SERVING within \
                     {MANAGER_READY_DEADLINE:?}; last health check: {last}",
                    self.addr()
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// For a manager serving TLS: how the harness's health checks ([`Manager::wait_ready`],
    /// [`Manager::health`]) connect to it.
    pub fn set_client_tls(&mut self, tls: tonic::transport::ClientTlsConfig) {
        self.client_tls = Some(tls);
    }

    /// The process id, to check a reload did not restart it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// A client of the manager's `PushServer`, every call bounded in time.
    pub async fn client(&self) -> PushServerClient<Channel> {
        PushServerClient::new(connect(&self.addr()).await)
    }

    /// Whether the process is still running (false once it exited or was killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// SIGKILL, and wait for the process to be gone: a crash.
    pub fn kill9(&mut self) {
        let mut child = self.running_child("kill");
        reap_killed(&mut child);
    }

    /// SIGTERM, and wait (bounded) for the graceful exit; returns its status.
    pub async fn terminate(&mut self) -> ExitStatus {
        let child = self.running_child("terminate");
        let what = format!("the manager on {}", self.addr());
        match terminate(child, &what).await {
            Ok(status) => status,
            Err(why) => self.fail(&why),
        }
    }

    /// The last `n` lines of the manager's output, across restarts.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_path, n)
    }

    /// The manager's whole output so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// One health check of service `""` now; an error text if it cannot be had.
    pub async fn health(&self) -> Result<ServingStatus, String> {
        health_status(&self.addr(), self.client_tls.as_ref()).await
    }

    /// Sends `signal` to the running manager and returns at once (see
    /// [`Manager::wait_exit`]).
    pub fn signal(&mut self, signal: Signal) {
        let Some(child) = self.child.as_ref() else {
            panic!(
                "expected the manager on {} to be running to signal it",
                self.port
            );
        };
        let pid = i32::try_from(child.id()).unwrap_or_else(|_| panic!("pid {}", child.id()));
        if let Err(e) = kill(Pid::from_raw(pid), signal) {
            self.fail(&format!("expected to send {signal} to the manager: {e}"));
        }
    }

    /// Waits up to `deadline` for the manager to exit (after [`Manager::signal`]); panics with
    /// the log tail if it is still running then.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            let Some(child) = self.child.as_mut() else {
                panic!("expected the manager on {} to be running", self.port);
            };
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return status;
                }
                Ok(None) if start.elapsed() < deadline => {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
                Ok(None) => self.fail(&format!(
                    "expected the manager on {} to exit within {deadline:?}",
                    self.addr()
                )),
                Err(e) => self.fail(&format!("expected to wait for the manager: {e}")),
            }
        }
    }

    fn running_child(&mut self, action: &str) -> Child {
        self.child.take().unwrap_or_else(|| {
            panic!(
                "expected the manager on {} to be running to {action} it",
                self.port
            )
        })
    }

    /// Panics with `why` and the tail of the manager's log.
    fn fail(&mut self, why: &str) -> ! {
        self.log_shown = true;
        panic!(
            "{why}\n--- push-manager on {} log (last {TAIL_ON_PANIC} lines):\n{}",
            self.addr(),
            self.log_tail(TAIL_ON_PANIC)
        );
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut log = open_log(&self.log_path);
        // Best effort: the marker only helps reading the log.
        let _ = writeln!(
            log,
            "--- harness: start #{} of push-manager {:?}",
            self.starts, self.args
        );
        let stdout = log
            .try_clone()
            .unwrap_or_else(|e| panic!("expected to share {}: {e}", self.log_path.display()));
        let mut command = Command::new(MANAGER_BIN);
        command
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PUSH_MANAGER_") {
                command.env_remove(name);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("expected to spawn {MANAGER_BIN}: {e}"));
        self.child = Some(child);
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            reap_killed(&mut child);
        }
        if std::thread::panicking() && !self.log_shown {
            eprintln!(
                "--- push-manager on {} log (last {TAIL_ON_PANIC} lines):\n{}",
                self.addr(),
                self.log_tail(TAIL_ON_PANIC)
            );
        }
    }
}

/// A channel to `addr`, panicking if it cannot connect within the call deadline.
async fn connect(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|e| panic!("expected {addr} to make a valid URI: {e}"))
        .connect_timeout(CALL_DEADLINE)
        .timeout(CALL_DEADLINE)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("expected to connect to {addr}: {e}"))
}

/// One health check of service `""`, each step bounded so polling keeps its pace.
async fn health_status(
    addr: &str,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<ServingStatus, String> {
    let step = Duration::from_secs(1);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint =
        Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| e.to_string())?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| e.to_string())?;
    }
    let channel = endpoint
        .connect_timeout(step)
        .timeout(step)
        .connect()
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map_err(|status| format!("Check answered {:?}: {}", status.code(), status.message()))?;
    let code = reply.into_inner().status;
    ServingStatus::try_from(code).map_err(|_| format!("unknown serving status {code}"))
}

/// SIGKILL (harmless if the process already exited) and reap.
fn reap_killed(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM, then wait up to [`EXIT_DEADLINE`] for the exit without blocking the runtime, so
/// in-process clients keep running while the process drains. A process that does not exit in
/// time is killed and reported as an error.
async fn terminate(mut child: Child, what: &str) -> Result<ExitStatus, String> {
    let pid = i32::try_from(child.id()).map_err(|_| format!("{what} has pid {}", child.id()))?;
    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGTERM) {
        reap_killed(&mut child);
        return Err(format!("expected to send SIGTERM to {what}: {e}"));
    }
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if start.elapsed() < EXIT_DEADLINE => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Ok(None) => {
                reap_killed(&mut child);
                return Err(format!(
                    "expected {what} to exit within {EXIT_DEADLINE:?} of SIGTERM; killed it"
                ));
            }
            Err(e) => {
                reap_killed(&mut child);
                return Err(format!("expected to wait for {what}: {e}"));
            }
        }
    }
}

/// Reads the first stdout line of `child` within `deadline`, then keeps draining stdout in the
/// background so a later write by the child never meets a closed pipe.
fn read_first_line(child: &mut Child, deadline: Duration) -> Result<String, String> {
    let stdout = child.stdout.take().ok_or("its stdout was not piped")?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let first = reader.read_line(&mut line).map(|_| line);
        // The receiver may have given up already: nothing to do about it.
        let _ = sender.send(first);
        let _ = io::copy(&mut reader, &mut io::sink());
    });
    match receiver.recv_timeout(deadline) {
        Ok(Ok(line)) if line.is_empty() => {
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            Err(format!("it closed stdout and exited ({status})"))
        }
        Ok(Ok(line)) => Ok(line.trim_end().to_string()),
        Ok(Err(e)) => Err(format!("reading its stdout failed: {e}")),
        Err(_) => Err("it printed nothing in time".to_string()),
    }
}

fn open_log(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("expected to open log file {}: {e}", path.display()))
}

/// The last `n` lines of a log file (a note instead if it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
