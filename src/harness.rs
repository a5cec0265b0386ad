//! Child processes for the demo and the benchmark: a `push-manager serve` and
//! `connect-node-sim`s on loopback, started from the binaries next to the running one,
//! killed on drop.

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

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, HarnessError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| HarnessError(format!("no free port on 127.0.0.1: {e}")))
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
