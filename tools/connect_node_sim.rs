//! `connect-node-sim`: a reference connect-node for demos and tests.
//!
//! It serves `broadcast.PushServer` on one address and answers the `Broadcast` calls a
//! push-manager delivers, the way a real connect-node would, except that it can misbehave on
//! purpose: answer UNAVAILABLE at random (`--fail-rate`, retryable), answer INVALID_ARGUMENT
//! for chosen ids (`--reject`, permanent), or answer slowly (`--latency-ms`).
//! It implements `BroadcastBatch` (each item answered as `Broadcast` would answer it, in
//! order), unless `--unary-only`, which answers UNIMPLEMENTED so a manager falls back to
//! unary calls, as a node that predates the batch call would.
//!
//! What tests rely on:
//!
//! - Once bound, the sim prints exactly one line to stdout, `listening on HOST:PORT`, and
//!   nothing else; logs and the final count go to stderr.
//! - With `--record FILE`, every broadcast answered OK (alone or as a batch item) appends
//!   one line to FILE (see [`Recorder`]), written before the answer is sent. A line in the
//!   file therefore means "this node accepted it", even if the sim was SIGKILLed right
//!   after.
//! - SIGTERM or Ctrl-C: stop accepting, finish the calls in flight, exit 0.
//! - With `--tls-cert`/`--tls-key` it serves over TLS, and with `--tls-client-ca` it
//!   requires a client certificate (mTLS), so a manager's `--node-tls-*` can be tested.
//! - With `--etcd URL`, once bound it registers `<etcd-prefix><node-id>` (a plain
//!   `host:port`, or etcd naming JSON with `--etcd-format naming`) on a lease of
//!   `--lease-ttl`, keeps it alive, and on SIGTERM / Ctrl-C revokes it before it stops
//!   serving. After a SIGKILL the key goes when the lease expires.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use push_manager::config::{parse_duration, validate_host_port, validate_node_id};
use push_manager::discovery::{
    value, EtcdSettings, Registration, ValueFormat, DEFAULT_NODE_PREFIX,
};
use push_manager::proto::push_server_server::{PushServer, PushServerServer};
use push_manager::proto::{
    BatchItemResult, BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq,
};
use push_manager::tls::{tls_incoming, ClientTlsFiles, ReloadableServerTls, ServerTlsFiles};
use rand::Rng;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};
use tracing_subscriber::EnvFilter;

/// tonic's default limit (4 MiB) is below what a manager may be configured to send; a test
/// node should never be the reason a large payload fails.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The longest `msg_id` the contract allows; the sim checks what the manager sends.
const MAX_MSG_ID_BYTES: usize = 128;

#[derive(Parser, Debug)]
#[command(
    name = "connect-node-sim",
    version,
    about = "A reference connect-node: serves broadcast.PushServer, can inject failures and \
             latency, and can record every message it accepts.",
    after_help = "Once bound, prints exactly one line to stdout: `listening on HOST:PORT`. \
                  Logs go to stderr (RUST_LOG sets the level, default info). SIGTERM or Ctrl-C \
                  stops it gracefully (exit 0) and prints the number of messages received."
)]
struct Args {
    /// Address to serve on. With port 0 the OS picks a free port; the `listening on` line
    /// says which.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Name of this node, used in logs.
    #[arg(long, value_name = "ID", default_value = "sim")]
    node_id: String,

    /// Append one line per broadcast answered OK to FILE:
    /// `msg_id<TAB>seq<TAB>attempt<TAB>manager_id<TAB>arrival_unix_ms<TAB>ttl_ms<TAB>call`,
    /// where call is `batch` or `unary` (readers should accept further trailing fields). The
    /// lines of one call are written with a single write(2) in append mode, so lines stay
    /// whole even if the sim is killed. An existing file is appended to, never truncated.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,

    /// Probability, from 0.0 to 1.0, of answering a broadcast with UNAVAILABLE (which a
    /// manager retries).
    #[arg(long, value_name = "F", default_value_t = 0.0, value_parser = parse_probability)]
    fail_rate: f64,

    /// Wait this many milliseconds before answering each call (a batch waits once).
    #[arg(long, value_name = "N", default_value_t = 0)]
    latency_ms: u64,

    /// Answer `BroadcastBatch` with UNIMPLEMENTED, as a node without the batch call does: a
    /// manager then delivers with unary `Broadcast` calls only.
    #[arg(long)]
    unary_only: bool,

    /// Answer INVALID_ARGUMENT (a permanent error) for this msg_id. Repeat the flag to reject
    /// several ids.
    #[arg(long, value_name = "MSG_ID")]
    reject: Vec<String>,

    /// Register in etcd at these endpoints (comma-separated, or repeat the flag), as
    /// `<etcd-prefix><node-id>` on a lease kept alive while the sim runs and revoked when it
    /// stops (SIGTERM, Ctrl-C). Without it the sim runs static.
    #[arg(long, value_name = "URL[,URL]", value_delimiter = ',')]
    etcd: Vec<String>,

    /// etcd key prefix to register under.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_NODE_PREFIX)]
    etcd_prefix: String,

    /// Registration value: `plain` (host:port) or `naming` (etcd naming JSON,
    /// {"Op":0,"Addr":"host:port","Metadata":null}, as Go services write it).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = ValueFormat::Plain)]
    etcd_format: ValueFormat,

    /// TTL of the registration lease (etcd counts whole seconds; at least 1s). After a
    /// SIGKILL the registration disappears this long after the last keep-alive.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    lease_ttl: Duration,

    /// host:port to register [default: the bound address]
    #[arg(long, value_name = "HOST:PORT")]
    advertise: Option<String>,

    /// etcd user, with --etcd-password.
    #[arg(long, value_name = "USER", env = "CONNECT_NODE_SIM_ETCD_USER")]
    etcd_user: Option<String>,

    /// Password of --etcd-user (the env var keeps it out of the process list).
    #[arg(long, value_name = "PASSWORD", env = "CONNECT_NODE_SIM_ETCD_PASSWORD")]
    etcd_password: Option<String>,

    /// CAs (PEM) to verify etcd's certificate with, for https:// --etcd endpoints.
    #[arg(long, value_name = "FILE")]
    etcd_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to etcd, with --etcd-tls-key and --etcd-tls-ca.
    #[arg(
        long,
        value_name = "FILE",
        requires = "etcd_tls_key",
        requires = "etcd_tls_ca"
    )]
    etcd_tls_cert: Option<PathBuf>,

    /// Private key of --etcd-tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_tls_cert")]
    etcd_tls_key: Option<PathBuf>,

    /// Serve over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require callers (the manager) to present a certificate signed by these CAs (PEM):
    /// mutual TLS. Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// What `--etcd` asks for, checked before anything starts.
struct EtcdPlan {
    settings: EtcdSettings,
    key: String,
    format: ValueFormat,
    ttl: Duration,
    advertise: Option<String>,
}

impl EtcdPlan {
    fn from_args(args: &Args) -> Result<Option<EtcdPlan>> {
        if args.etcd.is_empty() {
            return Ok(None);
        }
        validate_node_id(&args.node_id).map_err(|e| {
            anyhow::anyhow!(
                "--node-id {:?} cannot be an etcd key suffix: {e}",
                args.node_id
            )
        })?;
        if !args.etcd_prefix.ends_with('/') {
            anyhow::bail!("--etcd-prefix {:?} must end in '/'", args.etcd_prefix);
        }
        if args.lease_ttl < Duration::from_secs(1) {
            anyhow::bail!("--lease-ttl must be at least 1s (etcd leases count whole seconds)");
        }
        if let Some(a) = &args.advertise {
            validate_host_port(a).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
        }
        let tls = args.etcd_tls_ca.clone().map(|ca| ClientTlsFiles {
            ca,
            cert: args.etcd_tls_cert.clone(),
            key: args.etcd_tls_key.clone(),
            domain: None,
            options: ("--etcd-tls-ca", "--etcd-tls-cert", "--etcd-tls-key"),
        });
        if let Some(tls) = &tls {
            tls.build()?;
        }
        let mut settings = EtcdSettings::new(args.etcd.clone()).with_tls(tls);
        match (&args.etcd_user, &args.etcd_password) {
            (Some(u), Some(p)) => settings = settings.with_user(u.clone(), p.clone()),
            (None, None) => {}
            _ => anyhow::bail!("--etcd-user and --etcd-password go together"),
        }
        Ok(Some(EtcdPlan {
            settings,
            key: format!("{}{}", args.etcd_prefix, args.node_id),
            format: args.etcd_format,
            ttl: args.lease_ttl,
            advertise: args.advertise.clone(),
        }))
    }

    /// Starts the registration of the sim bound at `local`.
    fn start(self, local: SocketAddr) -> Registration {
        let addr = self.advertise.unwrap_or_else(|| local.to_string());
        let value = value::encode(self.format, &addr);
        info!(key = %self.key, %value, "registering in etcd");
        Registration::start(self.settings, self.key, value, self.ttl)
    }
}

fn parse_probability(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number; give a probability such as 0.25"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!(
            "{value} is out of range; give a probability from 0.0 to 1.0"
        ))
    }
}

/// The record file: one line per message answered OK.
///
/// The file is opened with O_APPEND and each line goes out in one write(2), so concurrent
/// handlers never interleave within a line and a reader sees whole lines, plus at most one
/// line still being written (without its `\n`). There is no fsync: the file has to survive
/// the sim being killed, not the machine losing power, and the page cache already does that.
struct Recorder {
    file: File,
    path: PathBuf,
}

impl Recorder {
    fn open(path: &Path) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("cannot open record file {}", path.display()))?;
        end_torn_line(&mut file)
            .with_context(|| format!("cannot check the end of record file {}", path.display()))?;
        Ok(Recorder {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends one line per request of a call (`batch` or `unary`), all in one write(2).
    fn append<'a>(
        &self,
        call: &str,
        reqs: impl IntoIterator<Item = &'a BroadCastReq>,
    ) -> io::Result<()> {
        // Arrival time and the remaining TTL the manager sent let a checker tell a stale
        // delivery from a timely one.
        let arrival_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut lines = String::new();
        for req in reqs {
            // msg_id was checked to be visible ASCII; manager_id is free text, so keep it
            // from breaking the line format.
            let manager_id: String = req
                .manager_id
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            lines.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\t{}\t{call}\n",
                req.msg_id, req.seq, req.attempt, manager_id, arrival_ms, req.ttl_ms
            ));
        }
        if lines.is_empty() {
            return Ok(());
        }
        // `&File` is `Write`, so handlers share the file without a lock; O_APPEND makes each
        // write land at the end. A short write would leave a line cut: report it, never retry
        // the rest, which would no longer be one write.
        let written = (&self.file).write(lines.as_bytes())?;
        if written == lines.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {} bytes", lines.len()),
            ))
        }
    }
}

/// A SIGKILL can, rarely, cut a write short. End such a torn last line so the lines of this
/// run start on a fresh line; readers skip the torn one.
fn end_torn_line(file: &mut File) -> io::Result<()> {
    if file.metadata()?.len() == 0 {
        return Ok(());
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1))?;
    file.read_exact(&mut last)?;
    if last[0] != b'\n' {
        file.write_all(b"\n")?;
    }
    Ok(())
}

/// The sim's state, shared by all calls.
struct Sim {
    node_id: String,
    record: Option<Recorder>,
    fail_rate: f64,
    latency: Duration,
    reject: HashSet<String>,
    unary_only: bool,
    /// Broadcasts received (batch items counted one by one), whatever the answer.
    received: AtomicU64,
    /// Broadcasts answered OK (and recorded).
    answered_ok: AtomicU64,
}

impl Sim {
    /// Decides one broadcast's answer, as a node would; nothing is recorded yet.
    fn judge(&self, req: &BroadCastReq) -> Result<(), Status> {
        self.received.fetch_add(1, Ordering::Relaxed);
        let id_ok = (1..=MAX_MSG_ID_BYTES).contains(&req.msg_id.len())
            && req.msg_id.bytes().all(|b| b.is_ascii_graphic());
        if !id_ok {
            warn!(node = %self.node_id, msg_id = ?req.msg_id, "rejecting a malformed msg_id");
            return Err(Status::invalid_argument(format!(
                "msg_id {:?} is not 1 to {MAX_MSG_ID_BYTES} bytes of visible ASCII; \
                 a push-manager always sets a valid one",
                req.msg_id
            )));
        }
        if self.reject.contains(&req.msg_id) {
            debug!(node = %self.node_id, msg_id = %req.msg_id, "rejecting (--reject)");
            return Err(Status::invalid_argument(format!(
                "msg_id {} is on this sim's --reject list",
                req.msg_id
            )));
        }
        if self.fail_rate > 0.0 && rand::thread_rng().gen_bool(self.fail_rate) {
            debug!(node = %self.node_id, msg_id = %req.msg_id, "injected failure (--fail-rate)");
            return Err(Status::unavailable(format!(
                "injected failure (--fail-rate {})",
                self.fail_rate
            )));
        }
        Ok(())
    }

    /// Records the accepted broadcasts of one call (one write for all) before they are
    /// answered OK.
    fn accept<'a>(
        &self,
        call: &str,
        reqs: impl IntoIterator<Item = &'a BroadCastReq> + Clone,
    ) -> Result<(), Status> {
        if let Some(record) = &self.record {
            // A small append to the page cache: not worth moving off the runtime thread.
            record.append(call, reqs.clone()).map_err(|e| {
                warn!(node = %self.node_id, path = %record.path.display(), error = %e,
                      "cannot write record file");
                Status::internal(format!(
                    "cannot write record file {}: {e}",
                    record.path.display()
                ))
            })?;
        }
        for req in reqs {
            self.answered_ok.fetch_add(1, Ordering::Relaxed);
            debug!(node = %self.node_id, msg_id = %req.msg_id, seq = req.seq,
                   attempt = req.attempt, manager = %req.manager_id, "accepted");
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl PushServer for Sim {
    async fn broadcast(
        &self,
        request: Request<BroadCastReq>,
    ) -> Result<Response<BroadCastReply>, Status> {
        let req = request.into_inner();
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        self.judge(&req)?;
        self.accept("unary", [&req])?;
        Ok(Response::new(BroadCastReply {
            msg_id: req.msg_id,
            node_count: 0,
            duplicate: false,
        }))
    }

    async fn broadcast_batch(
        &self,
        request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        if self.unary_only {
            return Err(Status::unimplemented(
                "this connect-node-sim runs with --unary-only; send unary Broadcast calls",
            ));
        }
        let reqs = request.into_inner().messages;
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let verdicts: Vec<Result<(), Status>> = reqs.iter().map(|r| self.judge(r)).collect();
        let accepted = reqs
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.is_ok())
            .map(|(r, _)| r);
        // A failed record write fails every item it would have recorded: none of them is
        // answered OK without its line.
        let recorded = self.accept("batch", accepted);
        let results = reqs
            .into_iter()
            .zip(verdicts)
            .map(|(req, verdict)| match verdict.and(recorded.clone()) {
                Ok(()) => BatchItemResult {
                    reply: Some(BroadCastReply {
                        msg_id: req.msg_id,
                        node_count: 0,
                        duplicate: false,
                    }),
                    code: 0,
                    error: String::new(),
                },
                Err(status) => BatchItemResult {
                    reply: None,
                    code: status.code() as i32,
                    error: status.message().to_string(),
                },
            })
            .collect();
        Ok(Response::new(BroadCastBatchReply { results }))
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();

    let etcd = EtcdPlan::from_args(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(ReloadableServerTls::load(ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        })?)),
        _ => None,
    };
    let record = args.record.as_deref().map(Recorder::open).transpose()?;
    let sim = Arc::new(Sim {
        node_id: args.node_id,
        record,
        fail_rate: args.fail_rate,
        latency: Duration::from_millis(args.latency_ms),
        reject: args.reject.into_iter().collect(),
        unary_only: args.unary_only,
        received: AtomicU64::new(0),
        answered_ok: AtomicU64::new(0),
    });

    // Install the handlers before announcing the address, so a signal sent as soon as the
    // line is read is already a graceful stop.
    let shutdown = shutdown_signal()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener
        .local_addr()
        .context("cannot read the bound address")?;
    announce(local)?;
    info!(node = %sim.node_id, addr = %local, "serving broadcast.PushServer");
    // Deregistered first on a stop, so managers stop sending before the server closes.
    let registration = etcd.map(|plan| plan.start(local));
    let shutdown = async move {
        shutdown.await;
        if let Some(r) = registration {
            r.stop(Duration::from_secs(2)).await;
        }
    };

    let service =
        PushServerServer::from_arc(Arc::clone(&sim)).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let router = tonic::transport::Server::builder().add_service(service);
    match tls {
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls_incoming(listener, tls), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    // Without TCP_NODELAY (which a custom incoming stream does not get from
                    // the builder) Nagle's algorithm holds small answers back.
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await
        }
    }
    .context("the gRPC server failed")?;

    eprintln!(
        "connect-node-sim {}: received {} broadcasts, answered {} OK",
        sim.node_id,
        sim.received.load(Ordering::Relaxed),
        sim.answered_ok.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Prints the one stdout line tests wait for. A closed stdout is not an error: nobody is
/// waiting for the line then.
fn announce(local: SocketAddr) -> Result<()> {
    let mut out = io::stdout().lock();
    match writeln!(out, "listening on {local}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot print the listening address on stdout")
        }
        _ => Ok(()),
    }
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled.
#[cfg(unix)]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = sigint.recv() => info!("Ctrl-C: shutting down"),
        }
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => info!("Ctrl-C: shutting down"),
            // Without a handler, keep serving until killed rather than stop at once.
            Err(e) => {
                warn!(error = %e, "cannot handle Ctrl-C");
                std::future::pending::<()>().await
            }
        }
    })
}
