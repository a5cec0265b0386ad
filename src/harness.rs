//! Child processes for the demo, the benchmark, the chaos harness and the etcd tests: a
//! `push-manager serve`, `connect-node-sim`s and a real `etcd` on loopback, started from the
//! binaries next to the running one (etcd from `$ETCD_BIN` or PATH), killed on drop.
//! Also readers of the sims' record files.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a process could not be started or did not come up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);

/// How long a manager may take to report SERVING.
const READY_DEADLINE: Duration = Duration::from_secs(20);

/// A child process, SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Child,
}

impl Proc {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, wait up to 15 s for the exit, SIGKILL after that.
    pub fn terminate(&mut self) {
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

impl Proc {
    /// Sends `signal` (e.g. SIGSTOP / SIGCONT); false if the process is gone.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).is_ok()
    }

    /// Whether the process is still running (false once it exited, or could not be asked).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary `name` next to the running executable.
pub fn sibling(name: &str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe()
        .map_err(|e| HarnessError(format!("cannot locate this executable: {e}")))?;
    let path = exe.with_file_name(name);
    if path.exists() {
        Ok(path)
    } else {
        Err(HarnessError(format!(
            "{name} not found next to {}; build every binary first: cargo build --release --bins",
            exe.display()
        )))
    }
}

/// A loopback port that is free now and that the kernel does not hand out by itself.
///
/// A port from `bind(127.0.0.1:0)` lies in the kernel's ephemeral range, the range the local
/// ends of outgoing connections come from too: between picking it and a child process binding
/// it, any connection on the machine may take it (CI saw a manager fail to listen with
/// EADDRINUSE that way, and push-bench a returning node). So the port is picked below that
/// range, where only a process asking for a port by number can take it. Each process walks
/// the range from a random start and never hands out the same port twice, so that concurrent
/// tests neither race each other nor take a port a restarted child expects to bind again.
pub fn free_port() -> Result<u16, HarnessError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    /// How many ports this process has handed out (or skipped as busy) so far.
    static WALKED: AtomicU32 = AtomicU32::new(0);
    static START: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

    let first_ephemeral = first_ephemeral_port();
    let low = 10_000u16.min(first_ephemeral / 2);
    let span = u32::from(first_ephemeral.saturating_sub(low).max(1));
    let start = *START.get_or_init(|| rand::random::<u32>() % span);
    for _ in 0..span {
        let step = WALKED.fetch_add(1, Ordering::Relaxed);
        let offset = u16::try_from((start + step) % span).unwrap_or(0);
        let port = low + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(HarnessError(format!(
        "no free port on 127.0.0.1 below the ephemeral range (first ephemeral port {first_ephemeral})"
    )))
}

/// The lowest port of the kernel's ephemeral range (Linux's default when it cannot be read).
fn first_ephemeral_port() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// Starts `connect-node-sim` on `port` (0 = any) recording to `record`; returns the process
/// and the port it bound.
pub fn start_sim(
    id: &str,
    port: u16,
    record: &Path,
    extra: &[String],
) -> Result<(Proc, u16), HarnessError> {
    let bin = sibling("connect-node-sim")?;
    let mut child = Command::new(&bin)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", id])
        .arg("--record")
        .arg(record)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| HarnessError(format!("cannot start {}: {e}", bin.display())))?;
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
        .ok_or_else(|| HarnessError(format!("{id} did not report its port ({line:?})")))?;
    Ok((proc, port))
}

/// msg_id -> times received, from a sim's record file.
pub fn received(record: &Path) -> HashMap<String, usize> {
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

/// One line of a sim's record file: a delivery the sim answered OK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLine {
    /// The delivered msg_id.
    pub msg_id: String,
    /// The manager's per-node sequence number.
    pub seq: u64,
    /// The manager's attempt count for this entry.
    pub attempt: u32,
    /// Which manager delivered it.
    pub manager_id: String,
    /// When the sim received it (Unix ms); absent in lines of older sims.
    pub arrival_unix_ms: Option<u64>,
    /// The remaining `ttl_ms` the manager sent (0 = never expires); absent in older lines.
    pub ttl_ms: Option<u64>,
    /// How it came: `batch` (an item of a `BroadcastBatch` call) or `unary`; absent in
    /// older lines.
    pub call: Option<String>,
}

/// Parses one record line (without its `\n`): `msg_id seq attempt manager_id` then the
/// optional `arrival_unix_ms ttl_ms call`, tab-separated; further trailing fields are
/// ignored.
/// `None` for a line that does not parse (torn by a SIGKILL mid-write).
pub fn parse_record_line(line: &str) -> Option<RecordLine> {
    let mut fields = line.split('\t');
    let msg_id = fields.next().filter(|s| !s.is_empty())?.to_string();
    let seq = fields.next()?.parse().ok()?;
    let attempt = fields.next()?.parse().ok()?;
    let manager_id = fields.next()?.to_string();
    let arrival_unix_ms = fields.next().and_then(|f| f.parse().ok());
    let ttl_ms = fields.next().and_then(|f| f.parse().ok());
    let call = fields.next().map(str::to_string);
    Some(RecordLine {
        msg_id,
        seq,
        attempt,
        manager_id,
        arrival_unix_ms,
        ttl_ms,
        call,
    })
}

/// Reads a record file incrementally: each call returns the whole lines appended since the
/// previous one. A last line still being written (no `\n` yet) is left for the next call.
#[derive(Debug)]
pub struct RecordTail {
    path: PathBuf,
    offset: u64,
}

impl RecordTail {
    /// A reader of `path` from its beginning (a missing file reads as empty).
    pub fn new(path: &Path) -> Self {
        RecordTail {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    /// The lines completed since the last call, torn lines skipped.
    pub fn read_new(&mut self) -> Result<Vec<RecordLine>, HarnessError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(HarnessError(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            }
        };
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(self.offset))
            .and_then(|_| file.read_to_end(&mut bytes))
            .map_err(|e| HarnessError(format!("cannot read {}: {e}", self.path.display())))?;
        let Some(end) = bytes.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        self.offset += end as u64 + 1;
        Ok(String::from_utf8_lossy(&bytes[..end])
            .split('\n')
            .filter_map(parse_record_line)
            .collect())
    }
}

/// A `push-manager serve` child process; its stderr goes to a log file.
pub struct ManagerProcess {
    args: Vec<String>,
    log: PathBuf,
    addr: String,
    proc: Option<Proc>,
}

impl ManagerProcess {
    /// A manager that will serve on `addr` with `args` after `serve`.
    pub fn new(addr: &str, args: Vec<String>, log: PathBuf) -> Self {
        ManagerProcess {
            args,
            log,
            addr: addr.to_string(),
            proc: None,
        }
    }

    /// The running process, if any.
    pub fn proc(&mut self) -> Option<&mut Proc> {
        self.proc.as_mut()
    }

    /// Starts it (this executable, `serve`) and waits until health reports SERVING.
    pub async fn start(&mut self) -> Result<(), HarnessError> {
        let exe = std::env::current_exe()
            .map_err(|e| HarnessError(format!("cannot locate this executable: {e}")))?;
        let bin = if exe.file_name().is_some_and(|n| n == "push-manager") {
            exe
        } else {
            sibling("push-manager")?
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| HarnessError(format!("cannot open {}: {e}", self.log.display())))?;
        let child = Command::new(bin)
            .arg("serve")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| HarnessError(format!("cannot start the manager: {e}")))?;
        self.proc = Some(Proc { child });
        let deadline = Instant::now() + READY_DEADLINE;
        while Instant::now() < deadline {
            if health_serving(&self.addr).await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(HarnessError(format!(
            "the manager did not become ready within {READY_DEADLINE:?}; see {}",
            self.log.display()
        )))
    }
}

/// Whether `grpc.health.v1` at `addr` reports SERVING for service `""`.
pub async fn health_serving(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let req = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    matches!(health.check(req).await, Ok(r)
        if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// How long etcd may take to answer after a (cold) start.
const ETCD_START_DEADLINE: Duration = Duration::from_secs(30);

/// The etcd binary: `$ETCD_BIN`, else `etcd` from PATH; an error saying how to install it
/// when there is none.
pub fn etcd_bin() -> Result<PathBuf, HarnessError> {
    let bin = std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"));
    match Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(bin),
        Ok(s) => Err(HarnessError(format!(
            "`{} --version` failed ({s}); a working etcd v3 is needed",
            bin.display()
        ))),
        Err(e) => Err(HarnessError(format!(
            "a real etcd is needed, and `{}` cannot be run ({e}). Install it with \
             `apt-get install etcd-server` (Debian/Ubuntu), or set ETCD_BIN to an etcd v3 \
             binary.",
            bin.display()
        ))),
    }
}

/// A single-member etcd on free loopback ports, its data and log under a directory the
/// caller owns; kept across [`EtcdProcess::kill`] and [`EtcdProcess::restart`] (same ports,
/// same keys). SIGKILLed when dropped.
pub struct EtcdProcess {
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    tls: Option<EtcdTls>,
}

/// TLS for an [`EtcdProcess`]: its certificate and key (PEM), and the CA that signed them,
/// which clients (and the readiness check) verify it with.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// etcd's certificate (`--cert-file`), valid for 127.0.0.1.
    pub cert: PathBuf,
    /// Its key (`--key-file`).
    pub key: PathBuf,
    /// The CA that signed `cert`.
    pub ca: PathBuf,
}

impl EtcdProcess {
    /// An etcd that will keep its data in `dir/data` and log to `dir/etcd.log`; not started.
    pub fn new(dir: &Path) -> Result<Self, HarnessError> {
        Ok(EtcdProcess {
            client_port: free_port()?,
            peer_port: free_port()?,
            dir: dir.to_path_buf(),
            proc: None,
            tls: None,
        })
    }

    /// The same etcd, serving clients over TLS (`--cert-file`, `--key-file`).
    pub fn with_tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), for `--etcd`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        match std::fs::read(self.log_path()) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(cannot read {}: {e})", self.log_path().display()),
        }
    }

    /// Starts it and waits until it answers a read.
    pub async fn start(&mut self) -> Result<(), HarnessError> {
        self.spawn()?;
        self.wait_ready().await
    }

    /// SIGKILL and reap; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Kills it if running, starts it again on the same ports and data dir, and waits until
    /// it answers.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.start().await
    }

    /// Starts it unless it is running (e.g. after a failed restart).
    pub async fn start_if_stopped(&mut self) -> Result<(), HarnessError> {
        if self.proc.as_mut().is_some_and(|p| p.is_running()) {
            return Ok(());
        }
        self.restart().await
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let bin = etcd_bin()?;
        let log_path = self.log_path();
        let open_err =
            |e: std::io::Error| HarnessError(format!("cannot open {}: {e}", log_path.display()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(open_err)?;
        let log_err = log.try_clone().map_err(open_err)?;
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&bin);
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()));
        }
        let child = command
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
            .map_err(|e| HarnessError(format!("cannot start {}: {e}", bin.display())))?;
        self.proc = Some(Proc { child });
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let start = Instant::now();
        let mut options = etcd_client::ConnectOptions::new()
            .with_timeout(Duration::from_secs(1))
            .with_connect_timeout(Duration::from_secs(1));
        if let Some(tls) = &self.tls {
            let ca = std::fs::read(&tls.ca).map_err(|e| {
                HarnessError(format!("cannot read etcd's CA {}: {e}", tls.ca.display()))
            })?;
            options = options.with_tls(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            );
        }
        let mut last = String::new();
        while start.elapsed() < ETCD_START_DEADLINE {
            if let Some(p) = self.proc.as_mut() {
                if let Ok(Some(status)) = p.child.try_wait() {
                    return Err(HarnessError(format!(
                        "etcd exited with {status} while starting; its log:\n{}",
                        self.log_tail(40)
                    )));
                }
            }
            match etcd_client::Client::connect([self.url()], Some(options.clone())).await {
                Ok(mut c) => match c.get("/", None).await {
                    Ok(_) => return Ok(()),
                    // With auth enabled (a restart of an etcd a test secured), an anonymous
                    // read is refused, which means etcd is up and answering.
                    Err(e) if e.to_string().contains("user name is empty") => return Ok(()),
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(HarnessError(format!(
            "etcd did not answer within {ETCD_START_DEADLINE:?} (last error: {last}); its \
             log:\n{}",
            self.log_tail(40)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let first_ephemeral = first_ephemeral_port();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(
            distinct.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        assert!(
            ports.iter().all(|&port| port < first_ephemeral),
            "every port is below {first_ephemeral}: {ports:?}"
        );
    }
}
