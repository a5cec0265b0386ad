//! `push-manager serve` configuration: flags, `PUSH_MANAGER_*` environment
//! variables and a TOML file, merged and validated in one place.
//!
//! Every option exists in three spellings:
//!
//! ```text
//! flag                    env var                             TOML key (top level)
//! --data-dir DIR          PUSH_MANAGER_DATA_DIR=DIR           data_dir = "DIR"
//! --static-node ID=ADDR   PUSH_MANAGER_STATIC_NODE=a=h:1,b=h:2  static_node = ["a=h:1"]
//! ```
//!
//! Precedence is flag > env > file > default. clap handles the first two (an
//! env var is only read when the flag is absent), so [`ServeArgs`] holds
//! "given by flag or env" as `Some` / a non-empty `Vec`; [`ServeArgs::resolve`]
//! fills the gaps from the file, then from the defaults, and validates the
//! result once, so every check runs whatever the value's source was.
//!
//! List options (`--etcd`, `--static-node`) are not merged element-wise: a
//! list given by flag or env replaces the file's list. An empty list can
//! therefore not be forced from the command line over a non-empty file list;
//! remove the key from the file instead.
//!
//! Relative paths (`--config`, `--data-dir`, also inside the file) are relative
//! to the working directory, not to the config file.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 50051);
const DEFAULT_DATA_DIR: &str = "./data";
const DEFAULT_NODE_PREFIX: &str = "/services/connect-node/";
const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 1024 * 1024;
const DEFAULT_DEDUPE_WINDOW: Duration = Duration::from_secs(10 * 60);
const DEFAULT_OFFLINE_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_MAX_ATTEMPTS: u32 = 5;
const DEFAULT_MAX_IN_FLIGHT: usize = 10;
/// Measured (push-bench backlog, 300,000 × 1 KiB to one returning node): 64 drained 31,000
/// msgs/s, 256 drained 46,000, 1000 drained 38,500 with more memory.
const DEFAULT_DELIVERY_BATCH: usize = 256;
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
const DEFAULT_DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// HTTP/2 streams per client connection: enough for a busy caller's concurrency (push-bench
/// runs 256 callers over one connection) while bounding what one connection can hold open.
const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Requests of one connection in the handlers at once; more queue in the connection.
const DEFAULT_CONCURRENCY_PER_CONNECTION: usize = 256;

/// Upper bound of `--max-payload-bytes`: one message must fit comfortably in
/// a gRPC frame and in memory once per in-flight delivery.
const MAX_PAYLOAD_LIMIT: u64 = 64 * 1024 * 1024;
/// Upper bound of `--max-in-flight`: each in-flight delivery holds a payload
/// in memory, per node.
const MAX_IN_FLIGHT_LIMIT: usize = 10_000;
/// Upper bound of `--delivery-batch`: what a `BroadcastBatch` call may carry (CONTRACT.md).
const DELIVERY_BATCH_LIMIT: usize = crate::store::commit::MAX_BATCH;
/// Upper bound of every duration option. humantime accepts up to `u64::MAX`
/// seconds, which would overflow `Instant + d` (a panic in std and tokio);
/// a century keeps all deadline arithmetic far from that edge.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
/// Longest node or manager id, in bytes (the same limit as `msg_id`).
const MAX_NODE_ID_BYTES: usize = 128;

/// `push-manager serve` options, as clap parses them (flag or env var).
///
/// Every field is an `Option` or a `Vec` so that "not given" is
/// distinguishable: [`ServeArgs::resolve`] fills it from the TOML file, then
/// from the defaults. The defaults live there, not in clap, which is why the
/// help text states them in words.
#[derive(clap::Args, Debug, Default, Clone)]
#[command(
    about = "Run the push-manager: accept broadcasts, persist them, deliver them to every \
             connect-node",
    long_about = "Run the push-manager: accept broadcasts, persist them, deliver them to every \
                  connect-node.\n\n\
                  Every option is also an environment variable PUSH_MANAGER_<FLAG> (--data-dir: \
                  PUSH_MANAGER_DATA_DIR; lists comma-separated) and a top-level key of the \
                  --config TOML file (data_dir = \"...\"). Precedence: flag > env > file > \
                  default. A list given by flag or env (--etcd, --static-node) replaces the \
                  file's list."
)]
pub struct ServeArgs {
    /// TOML file with more options; flags and env vars override it [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to serve gRPC on [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR", env = "PUSH_MANAGER_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory of the durable queue store [default: ./data]
    #[arg(long, value_name = "DIR", env = "PUSH_MANAGER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// etcd endpoint to discover connect-nodes and register in, repeatable;
    /// replaces the file's list [default: none]
    #[arg(
        long,
        value_name = "URL[,URL]",
        env = "PUSH_MANAGER_ETCD",
        value_delimiter = ','
    )]
    pub etcd: Vec<String>,

    /// User for etcd authentication; needs --etcd-password [default: none, no auth]
    #[arg(long, value_name = "USER", env = "PUSH_MANAGER_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// Password of --etcd-user; prefer the env var or the config file, since a flag shows
    /// in the process list [default: none]
    #[arg(long, value_name = "PASSWORD", env = "PUSH_MANAGER_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,

    /// etcd key prefix under which connect-nodes register [default: /services/connect-node/]
    #[arg(long, value_name = "PREFIX", env = "PUSH_MANAGER_NODE_PREFIX")]
    pub node_prefix: Option<String>,

    /// Fixed connect-node as ID=ADDR, repeatable; replaces the file's list [default: none]
    #[arg(
        long,
        value_name = "ID=ADDR",
        env = "PUSH_MANAGER_STATIC_NODE",
        value_delimiter = ','
    )]
    pub static_node: Vec<StaticNode>,

    /// This manager's id, kept in the data dir from its first start
    /// [default: host name + listen port]
    #[arg(long, value_name = "ID", env = "PUSH_MANAGER_MANAGER_ID")]
    pub manager_id: Option<String>,

    /// host:port registered in etcd for reaching this manager [default: the listen address]
    #[arg(long, value_name = "HOST:PORT", env = "PUSH_MANAGER_ADVERTISE")]
    pub advertise: Option<String>,

    /// Address to serve Prometheus metrics on at /metrics [default: none, metrics off]
    #[arg(long, value_name = "ADDR", env = "PUSH_MANAGER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Largest accepted payload, like 1048576 or 1MiB, at most 64MiB [default: 1048576]
    #[arg(
        long,
        value_name = "SIZE",
        env = "PUSH_MANAGER_MAX_PAYLOAD_BYTES",
        value_parser = parse_size,
    )]
    pub max_payload_bytes: Option<u64>,

    /// How long an accepted msg_id is remembered to detect duplicates; the manager keeps 20 to 40 bytes of memory per msg_id accepted within it [default: 10m]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_DEDUPE_WINDOW",
        value_parser = parse_duration,
    )]
    pub dedupe_window: Option<Duration>,

    /// How long a node may be absent from etcd before it is retired and its queue archived [default: 24h]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_OFFLINE_RETENTION",
        value_parser = parse_duration,
    )]
    pub offline_retention: Option<Duration>,

    /// Offers of a failing message to one node before it is dead-lettered [default: 5]
    #[arg(long, value_name = "N", env = "PUSH_MANAGER_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,

    /// Deliveries in flight to one node at once, 1 to 10000 [default: 10]
    #[arg(long, value_name = "N", env = "PUSH_MANAGER_MAX_IN_FLIGHT")]
    pub max_in_flight: Option<usize>,

    /// Messages per BroadcastBatch call to a node that implements it, 1 to 1000 (1 = unary
    /// calls only); a node answering UNIMPLEMENTED gets unary calls [default: 256]
    #[arg(long, value_name = "N", env = "PUSH_MANAGER_DELIVERY_BATCH")]
    pub delivery_batch: Option<usize>,

    /// Retry delay after a node's first failure, doubling after each next one [default: 100ms]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_BACKOFF_INITIAL",
        value_parser = parse_duration,
    )]
    pub backoff_initial: Option<Duration>,

    /// Cap of the retry delay [default: 30s]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_BACKOFF_MAX",
        value_parser = parse_duration,
    )]
    pub backoff_max: Option<Duration>,

    /// Deadline of one delivery call to a node [default: 5s]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_DELIVERY_TIMEOUT",
        value_parser = parse_duration,
    )]
    pub delivery_timeout: Option<Duration>,

    /// When to ack: fsync acks after fdatasync; buffered acks before it, so a power loss
    /// or kernel crash may lose the last acked messages [default: fsync]
    #[arg(long, value_name = "MODE", env = "PUSH_MANAGER_DURABILITY")]
    pub durability: Option<Durability>,

    /// Store size above which new broadcasts are refused, like 10GiB [default: none, no limit]
    #[arg(long, value_name = "SIZE", env = "PUSH_MANAGER_DISK_QUOTA", value_parser = parse_size)]
    pub disk_quota: Option<u64>,

    /// Most pending entries one node's queue may hold; a broadcast that would pass it on any
    /// node is refused with RESOURCE_EXHAUSTED [default: none, no limit]
    #[arg(long, value_name = "N", env = "PUSH_MANAGER_MAX_PENDING_PER_NODE")]
    pub max_pending_per_node: Option<u64>,

    /// Time allowed on SIGTERM / Ctrl-C to finish in-flight work [default: 10s]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_SHUTDOWN_TIMEOUT",
        value_parser = parse_duration,
    )]
    pub shutdown_timeout: Option<Duration>,

    /// TTL of this manager's etcd registration lease, at least 1s [default: 10s]
    #[arg(
        long,
        value_name = "DURATION",
        env = "PUSH_MANAGER_LEASE_TTL",
        value_parser = parse_duration,
    )]
    pub lease_ttl: Option<Duration>,

    /// Log format on stderr: text (readable lines) or json (one object per line); RUST_LOG
    /// filters either, e.g. RUST_LOG=push_manager=debug [default: text]
    #[arg(long, value_name = "FORMAT", env = "PUSH_MANAGER_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Do not serve the admin API (proto/admin.proto: ListNodes, PeekQueue, ReplayDeadLetters,
    /// PurgeQueue, HoldNode, ReleaseNode, Drain) on the listen address; `--no-admin` alone
    /// means true [default: false, the admin API is served]
    #[arg(
        long,
        value_name = "BOOL",
        env = "PUSH_MANAGER_NO_ADMIN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    pub no_admin: Option<bool>,

    /// Serve gRPC over TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    /// Reloaded on SIGHUP or when the file changes [default: none, plaintext]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// Private key of --tls-cert (PEM) [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by these CAs (PEM): mutual TLS; needs --tls-cert
    /// [default: none, no client certificates]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Deliver to connect-nodes over TLS, verifying their certificates against these CAs
    /// (PEM) [default: none, plaintext to nodes]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_NODE_TLS_CA")]
    pub node_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to connect-nodes (mTLS); needs --node-tls-key and
    /// --node-tls-ca [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_NODE_TLS_CERT")]
    pub node_tls_cert: Option<PathBuf>,

    /// Private key of --node-tls-cert (PEM) [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_NODE_TLS_KEY")]
    pub node_tls_key: Option<PathBuf>,

    /// CAs (PEM) to verify etcd's certificate with; needs https:// --etcd endpoints
    /// [default: none, plaintext to etcd]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_ETCD_TLS_CA")]
    pub etcd_tls_ca: Option<PathBuf>,

    /// Client certificate (PEM) presented to etcd; needs --etcd-tls-key and --etcd-tls-ca
    /// [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_ETCD_TLS_CERT")]
    pub etcd_tls_cert: Option<PathBuf>,

    /// Private key of --etcd-tls-cert (PEM) [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_ETCD_TLS_KEY")]
    pub etcd_tls_key: Option<PathBuf>,

    /// File of bearer tokens, one per line, one of which Broadcast callers must send
    /// (`authorization: Bearer <token>`); reloaded like the certificates
    /// [default: none, Broadcast is open]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// File of bearer tokens for the admin API, one per line. Without it (and without
    /// --tls-client-ca) the admin API serves loopback callers only [default: none]
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Most concurrent HTTP/2 streams (calls) one client connection may open, 1 to 65536
    /// [default: 256]
    #[arg(long, value_name = "N", env = "PUSH_MANAGER_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,

    /// Most requests of one connection handled at once; more wait their turn, 1 to 65536
    /// [default: 256]
    #[arg(
        long,
        value_name = "N",
        env = "PUSH_MANAGER_CONCURRENCY_PER_CONNECTION"
    )]
    pub concurrency_per_connection: Option<usize>,
}

/// The validated `serve` configuration: every option has its final value.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Directory of the store.
    pub data_dir: PathBuf,
    /// etcd endpoints; empty means no etcd (static nodes only).
    pub etcd: Vec<String>,
    /// etcd user; set together with `etcd_password`.
    pub etcd_user: Option<String>,
    /// Password of `etcd_user`; redacted when the config is printed.
    pub etcd_password: Option<Secret>,
    /// etcd key prefix of connect-node registrations; ends in `/`.
    pub node_prefix: String,
    /// Fixed connect-nodes, with unique ids.
    pub static_nodes: Vec<StaticNode>,
    /// `None`: derive it later (host name + listen port), or reuse the one in the data dir.
    pub manager_id: Option<String>,
    /// `None`: advertise the listen address.
    pub advertise: Option<String>,
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Largest accepted payload; a payload of exactly this size is accepted.
    pub max_payload_bytes: u64,
    /// How long a `msg_id` is remembered for duplicate detection.
    pub dedupe_window: Duration,
    /// How long a node may be absent from etcd before it is retired (its queue archived).
    pub offline_retention: Duration,
    /// Offers of one entry to one node before it is dead-lettered; at least 1.
    pub max_attempts: u32,
    /// In-flight deliveries per node; at least 1.
    pub max_in_flight: usize,
    /// Most messages per `BroadcastBatch` call to a node; 1 = unary only.
    pub delivery_batch: usize,
    /// First backoff delay; more than zero and at most `backoff_max`.
    pub backoff_initial: Duration,
    /// Backoff cap.
    pub backoff_max: Duration,
    /// Per-call deadline of a delivery; more than zero.
    pub delivery_timeout: Duration,
    /// When an accepted broadcast is acked.
    pub durability: Durability,
    /// Store size limit in bytes; `None`: no limit.
    pub disk_quota: Option<u64>,
    /// Most pending entries per node; `None`: no limit. At least 1.
    pub max_pending_per_node: Option<u64>,
    /// Time allowed for a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// TTL of the manager's etcd lease; at least one second (etcd leases count whole seconds).
    pub lease_ttl: Duration,
    /// How log lines are written to stderr.
    pub log_format: LogFormat,
    /// Serve the admin API on the listen address (false with `--no-admin`).
    pub admin: bool,
    /// TLS on the gRPC server; `None`: plaintext.
    pub tls: Option<crate::tls::ServerTlsFiles>,
    /// TLS toward connect-nodes; `None`: plaintext.
    pub node_tls: Option<crate::tls::ClientTlsFiles>,
    /// TLS toward etcd; `None`: plaintext (`http://` endpoints).
    pub etcd_tls: Option<crate::tls::ClientTlsFiles>,
    /// Bearer tokens required on Broadcast; `None`: open.
    pub token_file: Option<PathBuf>,
    /// Bearer tokens required on the admin API; `None`: loopback (or mTLS) callers only.
    pub admin_token_file: Option<PathBuf>,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Requests of one connection handled at once.
    pub concurrency_per_connection: usize,
}

/// A fixed connect-node, written `ID=ADDR` (`node-a=127.0.0.1:7001`).
///
/// The id is everything before the first `=`; it follows the node id rules of
/// [`validate_node_id`]. The address is `host:port` with a numeric port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNode {
    /// The node id, as a connect-node would register it in etcd.
    pub id: String,
    /// `host:port` to deliver to.
    pub addr: String,
}

impl FromStr for StaticNode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((id, addr)) = s.split_once('=') else {
            return Err(format!(
                "{s:?} has no '='; expected ID=ADDR, e.g. node-a=127.0.0.1:7001"
            ));
        };
        let node = StaticNode {
            id: id.to_owned(),
            addr: addr.to_owned(),
        };
        node.validate()?;
        Ok(node)
    }
}

impl StaticNode {
    /// Checked both by `FromStr` and by `resolve`, since the fields are public
    /// and a `ServeArgs` may be built without parsing.
    fn validate(&self) -> Result<(), String> {
        validate_node_id(&self.id).map_err(|e| format!("bad node id: {e}"))?;
        validate_host_port(&self.addr)
            .map_err(|e| format!("bad address of node {:?}: {e}", self.id))
    }
}

/// A secret (the etcd password): compared and cloned like a string, but printed as
/// `<redacted>`, so that logging a config never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// When the manager acks an accepted broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Ack only after an fdatasync covers the write (the default).
    Fsync,
    /// Ack once written to the store's memory and the OS, before fsync: a power loss or
    /// kernel crash may lose the last moments of acked messages (a process crash loses
    /// nothing).
    Buffered,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines (the default); colored when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Why the `serve` configuration could not be built. Each message names the
/// option (by its flag), the bad value, what is expected and, when the value
/// came from the config file, the file and key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` / `PUSH_MANAGER_CONFIG` could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    ReadFile {
        /// The file, as given.
        path: PathBuf,
        /// Why reading failed.
        error: std::io::Error,
    },

    /// The config file is not valid TOML, has a key that is not an option, or a
    /// value of the wrong type or format (toml's message shows the line).
    #[error("invalid config file {}: {error}", path.display())]
    ParseFile {
        /// The file, as given.
        path: PathBuf,
        /// toml's error, with line, column and the offending key.
        error: toml::de::Error,
    },

    /// A number or duration is outside the range the option accepts
    /// (`--max-attempts 0`, `--delivery-timeout 0s`, a payload limit over 64 MiB).
    #[error("invalid {option} value {value}{origin}: expected {expected}")]
    OutOfRange {
        /// The flag, e.g. `--max-attempts`.
        option: &'static str,
        /// The value as given, formatted.
        value: String,
        /// Empty for a flag or env var, else where the value came from.
        origin: String,
        /// The accepted range, in words.
        expected: String,
    },

    /// A string option has the wrong form (`--static-node`, `--manager-id`,
    /// `--advertise`, `--etcd`, `--node-prefix`, `--data-dir`).
    #[error("invalid {option} value {value:?}{origin}: {reason}")]
    InvalidValue {
        /// The flag, e.g. `--static-node`.
        option: &'static str,
        /// The value as given.
        value: String,
        /// Empty for a flag or env var, else where the value came from.
        origin: String,
        /// What is wrong and what is expected.
        reason: String,
    },

    /// `--backoff-initial` is greater than `--backoff-max`.
    #[error(
        "--backoff-initial {initial} is greater than --backoff-max {max}; \
         lower --backoff-initial or raise --backoff-max"
    )]
    BackoffOrder {
        /// The initial delay and where it came from.
        initial: String,
        /// The cap and where it came from.
        max: String,
    },

    /// Two static nodes have the same id.
    #[error(
        "--static-node id {id:?} is given more than once{origin}; each static node needs its own id"
    )]
    DuplicateStaticNode {
        /// The repeated id.
        id: String,
        /// Empty for flags or env var, else the file.
        origin: String,
    },
}

/// Parses a duration written like `100ms`, `30s`, `10m`, `24h` (humantime
/// syntax, so `1h 30m` works too). A bare number has no unit and is rejected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?}: {e}; write it like 100ms, 30s, 10m or 24h"))
}

/// Parses a size in bytes: a whole number, optionally followed by a unit:
/// `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024) or `KB`, `MB`, `GB`, `TB`
/// (powers of 1000). Units are case-insensitive and may follow a space.
pub fn parse_size(s: &str) -> Result<u64, String> {
    const UNITS: &str = "B, KiB, MiB, GiB, TiB (1024-based) or KB, MB, GB, TB (1000-based)";
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    if number.is_empty() {
        return Err(format!(
            "invalid size {s:?}: expected a whole number of bytes, optionally with a unit, \
             like 1048576 or 512KiB"
        ));
    }
    let unit = unit.trim_start();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ if unit.starts_with('.') => {
            return Err(format!(
                "invalid size {s:?}: fractions are not supported; use a smaller unit, \
                 e.g. 1536MiB instead of 1.5GiB"
            ))
        }
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?}; use {UNITS}"
            ))
        }
    };
    let overflow = || format!("invalid size {s:?}: more than {} bytes", u64::MAX);
    // `number` is all ASCII digits, so overflow is the only way parsing fails.
    let n: u64 = number.parse().map_err(|_| overflow())?;
    n.checked_mul(multiplier).ok_or_else(overflow)
}

/// Checks a node or manager id: 1 to 128 bytes of visible ASCII (0x21–0x7E),
/// no `/` (it would split the id's etcd key).
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!(
            "id is empty; expected 1 to {MAX_NODE_ID_BYTES} bytes of visible ASCII"
        ));
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return Err(format!(
            "id is {} bytes; the limit is {MAX_NODE_ID_BYTES} bytes",
            id.len()
        ));
    }
    if let Some((i, b)) = id
        .bytes()
        .enumerate()
        .find(|&(_, b)| !(0x21..=0x7e).contains(&b))
    {
        return Err(format!(
            "id has byte 0x{b:02x} at offset {i}; only visible ASCII (0x21-0x7E) is allowed"
        ));
    }
    if id.contains('/') {
        return Err("id contains '/', which is not allowed (it separates etcd key parts)".into());
    }
    Ok(())
}

/// Checks `host:port` as a delivery or advertised address: an IP socket
/// address (IPv6 in brackets) or a host name, and a port from 1 to 65535.
pub fn validate_host_port(s: &str) -> Result<(), String> {
    const EXAMPLE: &str = "expected host:port, e.g. 127.0.0.1:7001";
    if s.is_empty() {
        return Err(format!("address is empty; {EXAMPLE}"));
    }
    if let Some((scheme, _)) = s.split_once("://") {
        return Err(format!(
            "{s:?} has a scheme; {EXAMPLE}, without {scheme}://"
        ));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return match addr.port() {
            0 => Err(format!("{s:?} has port 0; expected a port from 1 to 65535")),
            _ => Ok(()),
        };
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("{s:?} has no port; {EXAMPLE}"));
    };
    if host.is_empty() {
        return Err(format!("{s:?} has no host; {EXAMPLE}"));
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(format!(
            "{s:?} is not a valid IPv6 socket address; write IPv6 in brackets, e.g. [::1]:7001"
        ));
    }
    if let Some(c) = host
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "-._".contains(c)))
    {
        return Err(format!(
            "host {host:?} contains {c:?}; expected a host name or IP address"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!(
            "port {port:?} of {s:?} is not a number from 1 to 65535"
        )),
    }
}

impl ServeArgs {
    /// Merges flag/env (`self`) > TOML file (`--config`, or
    /// `PUSH_MANAGER_CONFIG`) > defaults, and validates the result once.
    pub fn resolve(self) -> Result<ServeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let m = Merge {
            file: self.config.as_deref(),
        };

        let listen = pick(self.listen, file.listen, DEFAULT_LISTEN).0;

        let (data_dir, o) = pick(
            self.data_dir,
            file.data_dir,
            PathBuf::from(DEFAULT_DATA_DIR),
        );
        if data_dir.as_os_str().is_empty() {
            return Err(m.invalid("--data-dir", "", o, "expected a directory path".into()));
        }

        let (etcd, etcd_origin) = pick_list(self.etcd, file.etcd);
        let o = etcd_origin;
        let etcd = etcd
            .into_iter()
            .map(|url| {
                let trimmed = url.trim();
                match trimmed.is_empty() {
                    true => Err(m.invalid(
                        "--etcd",
                        &url,
                        o,
                        "endpoint is empty; expected a URL like http://127.0.0.1:2379 \
                         (check for a stray comma)"
                            .into(),
                    )),
                    false => Ok(trimmed.to_owned()),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;

        let (etcd_user, o_user) = pick_opt(self.etcd_user, file.etcd_user);
        let (etcd_password, o_pass) = pick_opt(self.etcd_password, file.etcd_password);
        match (&etcd_user, &etcd_password) {
            (Some(user), None) => {
                return Err(m.invalid(
                    "--etcd-user",
                    user,
                    o_user,
                    "has no password; give --etcd-password (or PUSH_MANAGER_ETCD_PASSWORD)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(m.invalid(
                    "--etcd-password",
                    "<redacted>",
                    o_pass,
                    "is given without --etcd-user".into(),
                ))
            }
            (Some(user), Some(_)) if user.is_empty() => {
                return Err(m.invalid("--etcd-user", user, o_user, "is empty".into()))
            }
            _ => {}
        }
        let etcd_password = etcd_password.map(Secret);

        let (node_prefix, o) = pick(
            self.node_prefix,
            file.node_prefix,
            DEFAULT_NODE_PREFIX.to_owned(),
        );
        // Node ids are the key's suffix after the prefix, and may not contain
        // '/': without the trailing '/' every id would start with one.
        if !node_prefix.ends_with('/') {
            return Err(m.invalid(
                "--node-prefix",
                &node_prefix,
                o,
                "expected an etcd key prefix ending in '/', e.g. /services/connect-node/".into(),
            ));
        }

        let file_nodes = file
            .static_node
            .map(|nodes| nodes.into_iter().map(|FileStaticNode(n)| n).collect());
        let (static_nodes, o) = pick_list(self.static_node, file_nodes);
        let mut seen = std::collections::HashSet::new();
        for node in &static_nodes {
            if let Err(reason) = node.validate() {
                let value = format!("{}={}", node.id, node.addr);
                return Err(m.invalid("--static-node", &value, o, reason));
            }
            if !seen.insert(node.id.as_str()) {
                return Err(ConfigError::DuplicateStaticNode {
                    id: node.id.clone(),
                    origin: m.origin(o, "--static-node"),
                });
            }
        }

        let (manager_id, o) = pick_opt(self.manager_id, file.manager_id);
        if let Some(id) = &manager_id {
            validate_node_id(id).map_err(|reason| m.invalid("--manager-id", id, o, reason))?;
        }

        let (advertise, o) = pick_opt(self.advertise, file.advertise);
        if let Some(addr) = &advertise {
            validate_host_port(addr).map_err(|reason| m.invalid("--advertise", addr, o, reason))?;
        }

        let metrics_listen = pick_opt(self.metrics_listen, file.metrics_listen).0;

        let (max_payload_bytes, o) = pick(
            self.max_payload_bytes,
            file.max_payload_bytes.map(|FileSize(n)| n),
            DEFAULT_MAX_PAYLOAD_BYTES,
        );
        m.check(
            (1..=MAX_PAYLOAD_LIMIT).contains(&max_payload_bytes),
            "--max-payload-bytes",
            max_payload_bytes,
            o,
            format!("1 to {MAX_PAYLOAD_LIMIT} bytes (64MiB)"),
        )?;

        let (max_attempts, o) = pick(self.max_attempts, file.max_attempts, DEFAULT_MAX_ATTEMPTS);
        m.check(
            max_attempts >= 1,
            "--max-attempts",
            max_attempts,
            o,
            "at least 1".into(),
        )?;

        let (max_in_flight, o) = pick(
            self.max_in_flight,
            file.max_in_flight,
            DEFAULT_MAX_IN_FLIGHT,
        );
        m.check(
            (1..=MAX_IN_FLIGHT_LIMIT).contains(&max_in_flight),
            "--max-in-flight",
            max_in_flight,
            o,
            format!("1 to {MAX_IN_FLIGHT_LIMIT}"),
        )?;

        let (delivery_batch, o) = pick(
            self.delivery_batch,
            file.delivery_batch,
            DEFAULT_DELIVERY_BATCH,
        );
        m.check(
            (1..=DELIVERY_BATCH_LIMIT).contains(&delivery_batch),
            "--delivery-batch",
            delivery_batch,
            o,
            format!("1 to {DELIVERY_BATCH_LIMIT}"),
        )?;

        let dedupe_window = m.duration(
            "--dedupe-window",
            self.dedupe_window,
            file.dedupe_window,
            DEFAULT_DEDUPE_WINDOW,
            Duration::from_nanos(1),
        )?;
        let offline_retention = m.duration(
            "--offline-retention",
            self.offline_retention,
            file.offline_retention,
            DEFAULT_OFFLINE_RETENTION,
            Duration::from_nanos(1),
        )?;
        let backoff_initial = m.duration(
            "--backoff-initial",
            self.backoff_initial,
            file.backoff_initial,
            DEFAULT_BACKOFF_INITIAL,
            Duration::from_nanos(1),
        )?;
        let backoff_max = m.duration(
            "--backoff-max",
            self.backoff_max,
            file.backoff_max,
            DEFAULT_BACKOFF_MAX,
            Duration::from_nanos(1),
        )?;
        if backoff_initial.0 > backoff_max.0 {
            return Err(ConfigError::BackoffOrder {
                initial: m.describe(backoff_initial, "--backoff-initial"),
                max: m.describe(backoff_max, "--backoff-max"),
            });
        }
        let delivery_timeout = m.duration(
            "--delivery-timeout",
            self.delivery_timeout,
            file.delivery_timeout,
            DEFAULT_DELIVERY_TIMEOUT,
            Duration::from_nanos(1),
        )?;
        let shutdown_timeout = m.duration(
            "--shutdown-timeout",
            self.shutdown_timeout,
            file.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
            Duration::from_nanos(1),
        )?;
        let lease_ttl = m.duration(
            "--lease-ttl",
            self.lease_ttl,
            file.lease_ttl,
            DEFAULT_LEASE_TTL,
            Duration::from_secs(1),
        )?;

        let durability = pick(self.durability, file.durability, Durability::Fsync).0;
        let log_format = pick(self.log_format, file.log_format, LogFormat::Text).0;
        let admin = !pick(self.no_admin, file.no_admin, false).0;

        let (disk_quota, o) = pick_opt(self.disk_quota, file.disk_quota.map(|FileSize(n)| n));
        if let Some(quota) = disk_quota {
            m.check(
                quota >= 1,
                "--disk-quota",
                quota,
                o,
                "at least 1 byte".into(),
            )?;
        }
        let (max_pending_per_node, o) =
            pick_opt(self.max_pending_per_node, file.max_pending_per_node);
        if let Some(n) = max_pending_per_node {
            m.check(n >= 1, "--max-pending-per-node", n, o, "at least 1".into())?;
        }

        let tls =
            {
                let cert = pick_opt(self.tls_cert, file.tls_cert);
                let key = pick_opt(self.tls_key, file.tls_key);
                let client_ca = pick_opt(self.tls_client_ca, file.tls_client_ca);
                match (cert, key) {
                    ((Some(cert), _), (Some(key), _)) => Some(crate::tls::ServerTlsFiles {
                        cert,
                        key,
                        client_ca: client_ca.0,
                    }),
                    ((None, _), (None, _)) => match client_ca {
                        (Some(ca), o) => return Err(m.invalid(
                            "--tls-client-ca",
                            &ca.display().to_string(),
                            o,
                            "client certificates need server TLS: give --tls-cert and --tls-key"
                                .into(),
                        )),
                        (None, _) => None,
                    },
                    ((Some(cert), o), (None, _)) => {
                        return Err(m.invalid(
                            "--tls-cert",
                            &cert.display().to_string(),
                            o,
                            "has no key: give --tls-key too".into(),
                        ))
                    }
                    ((None, _), (Some(key), o)) => {
                        return Err(m.invalid(
                            "--tls-key",
                            &key.display().to_string(),
                            o,
                            "has no certificate: give --tls-cert too".into(),
                        ))
                    }
                }
            };
        let node_tls = m.client_tls(
            ("--node-tls-ca", "--node-tls-cert", "--node-tls-key"),
            pick_opt(self.node_tls_ca, file.node_tls_ca),
            pick_opt(self.node_tls_cert, file.node_tls_cert),
            pick_opt(self.node_tls_key, file.node_tls_key),
        )?;
        let etcd_tls = m.client_tls(
            ("--etcd-tls-ca", "--etcd-tls-cert", "--etcd-tls-key"),
            pick_opt(self.etcd_tls_ca, file.etcd_tls_ca),
            pick_opt(self.etcd_tls_cert, file.etcd_tls_cert),
            pick_opt(self.etcd_tls_key, file.etcd_tls_key),
        )?;
        // etcd-client picks TLS by the endpoint's scheme: a mismatch would fail at the first
        // call with a vaguer message.
        for url in &etcd {
            let https = url.starts_with("https://");
            if https && etcd_tls.is_none() {
                return Err(m.invalid(
                    "--etcd",
                    url,
                    etcd_origin,
                    "an https:// endpoint needs --etcd-tls-ca (the CA that signed etcd's \
                     certificate)"
                        .into(),
                ));
            }
            if url.starts_with("http://") && etcd_tls.is_some() {
                return Err(m.invalid(
                    "--etcd",
                    url,
                    etcd_origin,
                    "--etcd-tls-ca is given, so every endpoint must be https:// (or host:port)"
                        .into(),
                ));
            }
        }
        let token_file = pick_opt(self.token_file, file.token_file).0;
        let admin_token_file = pick_opt(self.admin_token_file, file.admin_token_file).0;
        let (max_concurrent_streams, o) = pick(
            self.max_concurrent_streams,
            file.max_concurrent_streams,
            DEFAULT_MAX_CONCURRENT_STREAMS,
        );
        m.check(
            (1..=65_536).contains(&max_concurrent_streams),
            "--max-concurrent-streams",
            max_concurrent_streams,
            o,
            "1 to 65536".into(),
        )?;
        let (concurrency_per_connection, o) = pick(
            self.concurrency_per_connection,
            file.concurrency_per_connection,
            DEFAULT_CONCURRENCY_PER_CONNECTION,
        );
        m.check(
            (1..=65_536).contains(&concurrency_per_connection),
            "--concurrency-per-connection",
            concurrency_per_connection,
            o,
            "1 to 65536".into(),
        )?;

        Ok(ServeConfig {
            listen,
            data_dir,
            etcd,
            etcd_user,
            etcd_password,
            node_prefix,
            static_nodes,
            manager_id,
            advertise,
            metrics_listen,
            max_payload_bytes,
            dedupe_window: dedupe_window.0,
            offline_retention: offline_retention.0,
            max_attempts,
            max_in_flight,
            delivery_batch,
            backoff_initial: backoff_initial.0,
            backoff_max: backoff_max.0,
            delivery_timeout: delivery_timeout.0,
            durability,
            disk_quota,
            max_pending_per_node,
            shutdown_timeout: shutdown_timeout.0,
            lease_ttl: lease_ttl.0,
            log_format,
            admin,
            tls,
            node_tls,
            etcd_tls,
            token_file,
            admin_token_file,
            max_concurrent_streams,
            concurrency_per_connection,
        })
    }
}

/// Where a merged value came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// A flag or its env var (clap does not tell them apart).
    Cli,
    File,
    Default,
}

fn pick<T>(cli: Option<T>, file: Option<T>, default: T) -> (T, Origin) {
    match (cli, file) {
        (Some(v), _) => (v, Origin::Cli),
        (None, Some(v)) => (v, Origin::File),
        (None, None) => (default, Origin::Default),
    }
}

fn pick_opt<T>(cli: Option<T>, file: Option<T>) -> (Option<T>, Origin) {
    match (cli, file) {
        (Some(v), _) => (Some(v), Origin::Cli),
        (None, Some(v)) => (Some(v), Origin::File),
        (None, None) => (None, Origin::Default),
    }
}

/// A non-empty list from flags or env replaces the file's list whole.
fn pick_list<T>(cli: Vec<T>, file: Option<Vec<T>>) -> (Vec<T>, Origin) {
    match (cli.is_empty(), file) {
        (false, _) => (cli, Origin::Cli),
        (true, Some(v)) => (v, Origin::File),
        (true, None) => (Vec::new(), Origin::Default),
    }
}

/// Builds error messages that say where a bad value came from.
struct Merge<'a> {
    file: Option<&'a Path>,
}

impl Merge<'_> {
    /// `""` for flag/env, `" (from `key` in FILE)"`, or `" (the default)"`.
    fn origin(&self, origin: Origin, option: &str) -> String {
        match (origin, self.file) {
            (Origin::File, Some(path)) => {
                let key = option.trim_start_matches("--").replace('-', "_");
                format!(" (from `{key}` in {})", path.display())
            }
            (Origin::Default, _) => " (the default)".to_owned(),
            _ => String::new(),
        }
    }

    fn describe(&self, (d, origin): (Duration, Origin), option: &str) -> String {
        format!(
            "{}{}",
            humantime::format_duration(d),
            self.origin(origin, option)
        )
    }

    fn invalid(&self, option: &'static str, value: &str, o: Origin, reason: String) -> ConfigError {
        ConfigError::InvalidValue {
            option,
            value: value.to_owned(),
            origin: self.origin(o, option),
            reason,
        }
    }

    fn check(
        &self,
        ok: bool,
        option: &'static str,
        value: impl fmt::Display,
        o: Origin,
        expected: String,
    ) -> Result<(), ConfigError> {
        match ok {
            true => Ok(()),
            false => Err(ConfigError::OutOfRange {
                option,
                value: value.to_string(),
                origin: self.origin(o, option),
                expected,
            }),
        }
    }

    /// A client side's TLS files (CA, and a certificate with its key for mTLS): a
    /// certificate or key without a CA, or one without the other, is an error.
    fn client_tls(
        &self,
        options: (&'static str, &'static str, &'static str),
        ca: (Option<PathBuf>, Origin),
        cert: (Option<PathBuf>, Origin),
        key: (Option<PathBuf>, Origin),
    ) -> Result<Option<crate::tls::ClientTlsFiles>, ConfigError> {
        let (ca_opt, cert_opt, key_opt) = options;
        let shown = |p: &Path| p.display().to_string();
        match (&cert, &key) {
            ((Some(c), o), (None, _)) => {
                return Err(self.invalid(cert_opt, &shown(c), *o, format!("needs {key_opt}")))
            }
            ((None, _), (Some(k), o)) => {
                return Err(self.invalid(key_opt, &shown(k), *o, format!("needs {cert_opt}")))
            }
            _ => {}
        }
        match ca.0 {
            Some(ca) => Ok(Some(crate::tls::ClientTlsFiles {
                ca,
                cert: cert.0,
                key: key.0,
                domain: None,
                options,
            })),
            None => match cert {
                (Some(c), o) => Err(self.invalid(
                    cert_opt,
                    &shown(&c),
                    o,
                    format!("a client certificate needs TLS: give {ca_opt} too"),
                )),
                (None, _) => Ok(None),
            },
        }
    }

    /// Merges one duration option and checks it is within `min..=MAX_DURATION`.
    fn duration(
        &self,
        option: &'static str,
        cli: Option<Duration>,
        file: Option<FileDuration>,
        default: Duration,
        min: Duration,
    ) -> Result<(Duration, Origin), ConfigError> {
        let (d, o) = pick(cli, file.map(|FileDuration(d)| d), default);
        let expected = match min {
            Duration::ZERO => "at most 100 years".to_owned(),
            m if m == Duration::from_nanos(1) => "more than zero and at most 100 years".to_owned(),
            m => format!(
                "at least {} and at most 100 years",
                humantime::format_duration(m)
            ),
        };
        let value = humantime::format_duration(d);
        self.check(d >= min && d <= MAX_DURATION, option, value, o, expected)?;
        Ok((d, o))
    }
}

/// The TOML file: top-level keys are the flag names with `_` for `-`.
/// Unknown keys are an error, so a typo cannot silently leave a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    etcd: Option<Vec<String>>,
    etcd_user: Option<String>,
    etcd_password: Option<String>,
    node_prefix: Option<String>,
    static_node: Option<Vec<FileStaticNode>>,
    manager_id: Option<String>,
    advertise: Option<String>,
    metrics_listen: Option<SocketAddr>,
    max_payload_bytes: Option<FileSize>,
    dedupe_window: Option<FileDuration>,
    offline_retention: Option<FileDuration>,
    max_attempts: Option<u32>,
    max_in_flight: Option<usize>,
    delivery_batch: Option<usize>,
    backoff_initial: Option<FileDuration>,
    backoff_max: Option<FileDuration>,
    delivery_timeout: Option<FileDuration>,
    durability: Option<Durability>,
    disk_quota: Option<FileSize>,
    max_pending_per_node: Option<u64>,
    shutdown_timeout: Option<FileDuration>,
    lease_ttl: Option<FileDuration>,
    log_format: Option<LogFormat>,
    no_admin: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    node_tls_ca: Option<PathBuf>,
    node_tls_cert: Option<PathBuf>,
    node_tls_key: Option<PathBuf>,
    etcd_tls_ca: Option<PathBuf>,
    etcd_tls_cert: Option<PathBuf>,
    etcd_tls_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    admin_token_file: Option<PathBuf>,
    max_concurrent_streams: Option<u32>,
    concurrency_per_connection: Option<usize>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
            path: path.to_owned(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::ParseFile {
            path: path.to_owned(),
            error,
        })
    }
}

/// A duration string in the file (`"30s"`); parsed during deserialization so
/// that toml's error points at the line.
#[derive(Debug)]
struct FileDuration(Duration);

impl<'de> Deserialize<'de> for FileDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration string like \"100ms\", \"30s\", \"10m\" or \"24h\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                parse_duration(s).map_err(E::custom)
            }
        }
        d.deserialize_str(V).map(FileDuration)
    }
}

/// A size in the file: an integer number of bytes or a string like `"512KiB"`.
#[derive(Debug)]
struct FileSize(u64);

impl<'de> Deserialize<'de> for FileSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of bytes or a size string like \"512KiB\"")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
                Ok(n)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
                u64::try_from(n).map_err(|_| E::custom(format!("size {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
                parse_size(s).map_err(E::custom)
            }
        }
        d.deserialize_any(V).map(FileSize)
    }
}

/// A `"ID=ADDR"` string in the file's `static_node` list.
#[derive(Debug)]
struct FileStaticNode(StaticNode);

impl<'de> Deserialize<'de> for FileStaticNode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = StaticNode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string ID=ADDR like \"node-a=127.0.0.1:7001\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StaticNode, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V).map(FileStaticNode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser, ValueEnum};
    use std::io::Write;

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        T::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|t| t.a)
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("create temp file");
        f.write_all(text.as_bytes()).expect("write temp file");
        f
    }

    fn with_file(args: ServeArgs, text: &str) -> Result<ServeConfig, ConfigError> {
        let f = toml_file(text);
        ServeArgs {
            config: Some(f.path().to_owned()),
            ..args
        }
        .resolve()
    }

    fn err(r: Result<ServeConfig, ConfigError>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn node(id: &str, addr: &str) -> StaticNode {
        StaticNode {
            id: id.into(),
            addr: addr.into(),
        }
    }

    fn defaults() -> ServeConfig {
        ServeConfig {
            listen: "127.0.0.1:50051".parse().expect("addr"),
            data_dir: PathBuf::from("./data"),
            etcd: vec![],
            etcd_user: None,
            etcd_password: None,
            node_prefix: "/services/connect-node/".into(),
            static_nodes: vec![],
            manager_id: None,
            advertise: None,
            metrics_listen: None,
            max_payload_bytes: 1_048_576,
            dedupe_window: Duration::from_secs(600),
            offline_retention: Duration::from_secs(86_400),
            max_attempts: 5,
            max_in_flight: 10,
            delivery_batch: 256,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            delivery_timeout: Duration::from_secs(5),
            durability: Durability::Fsync,
            disk_quota: None,
            max_pending_per_node: None,
            shutdown_timeout: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(10),
            log_format: LogFormat::Text,
            admin: true,
            tls: None,
            node_tls: None,
            etcd_tls: None,
            token_file: None,
            admin_token_file: None,
            max_concurrent_streams: 256,
            concurrency_per_connection: 256,
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        assert_eq!(
            ServeArgs::default().resolve().expect("defaults"),
            defaults()
        );
        assert_eq!(
            parse(&[]).expect("no flags").resolve().expect("defaults"),
            defaults()
        );
    }

    #[test]
    fn every_flag_has_its_env_var_help_and_default() {
        let cmd = T::command();
        let mut n = 0;
        for arg in cmd.get_arguments().filter(|a| a.get_id() != "help") {
            n += 1;
            let long = arg.get_long().expect("every option is a long flag");
            let env = format!("PUSH_MANAGER_{}", long.to_uppercase().replace('-', "_"));
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(&env)), "--{long}");
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(
                help.contains("[default: "),
                "--{long} help names its default: {help}"
            );
            assert!(
                arg.get_default_values().is_empty(),
                "--{long}: defaults live in resolve"
            );
        }
        assert_eq!(n, 40);
        let durability = cmd
            .get_arguments()
            .find(|a| a.get_id() == "durability")
            .and_then(|a| a.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        assert!(durability.contains("buffered") && durability.contains("power loss"));
    }

    #[test]
    fn every_flag_but_config_is_a_file_key() {
        let text = r#"
            listen = "0.0.0.0:6000"
            data_dir = "/var/lib/pm"
            etcd = ["https://e1:2379", "e2:2379"]
            etcd_user = "pm"
            etcd_password = "s3cret"
            node_prefix = "/nodes/"
            static_node = ["a=127.0.0.1:7001", "b=node-b.local:7002"]
            manager_id = "pm-1"
            advertise = "pm.local:6000"
            metrics_listen = "127.0.0.1:9100"
            max_payload_bytes = "2MiB"
            dedupe_window = "1h"
            offline_retention = "2d"
            max_attempts = 7
            max_in_flight = 32
            delivery_batch = 16
            backoff_initial = "50ms"
            backoff_max = "1m"
            delivery_timeout = "2s"
            durability = "buffered"
            disk_quota = 1000
            max_pending_per_node = 500
            shutdown_timeout = "3s"
            lease_ttl = "15s"
            log_format = "json"
            no_admin = true
            tls_cert = "/etc/pm/server.pem"
            tls_key = "/etc/pm/server.key"
            tls_client_ca = "/etc/pm/clients-ca.pem"
            node_tls_ca = "/etc/pm/nodes-ca.pem"
            node_tls_cert = "/etc/pm/to-nodes.pem"
            node_tls_key = "/etc/pm/to-nodes.key"
            etcd_tls_ca = "/etc/pm/etcd-ca.pem"
            etcd_tls_cert = "/etc/pm/etcd-client.pem"
            etcd_tls_key = "/etc/pm/etcd-client.key"
            token_file = "/etc/pm/tokens"
            admin_token_file = "/etc/pm/admin-tokens"
            max_concurrent_streams = 100
            concurrency_per_connection = 50
        "#;
        let keys: std::collections::BTreeSet<String> = toml::from_str::<toml::Table>(text)
            .expect("toml")
            .keys()
            .cloned()
            .collect();
        let flags: std::collections::BTreeSet<String> = T::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config" && *l != "help")
            .map(|l| l.replace('-', "_"))
            .collect();
        assert_eq!(keys, flags);

        let c = with_file(ServeArgs::default(), text).expect("valid file");
        assert_eq!(
            c,
            ServeConfig {
                listen: "0.0.0.0:6000".parse().expect("addr"),
                data_dir: "/var/lib/pm".into(),
                etcd: vec!["https://e1:2379".into(), "e2:2379".into()],
                etcd_user: Some("pm".into()),
                etcd_password: Some(Secret("s3cret".into())),
                node_prefix: "/nodes/".into(),
                static_nodes: vec![node("a", "127.0.0.1:7001"), node("b", "node-b.local:7002")],
                manager_id: Some("pm-1".into()),
                advertise: Some("pm.local:6000".into()),
                metrics_listen: Some("127.0.0.1:9100".parse().expect("addr")),
                max_payload_bytes: 2 << 20,
                dedupe_window: Duration::from_secs(3600),
                offline_retention: Duration::from_secs(2 * 86_400),
                max_attempts: 7,
                max_in_flight: 32,
                delivery_batch: 16,
                backoff_initial: Duration::from_millis(50),
                backoff_max: Duration::from_secs(60),
                delivery_timeout: Duration::from_secs(2),
                durability: Durability::Buffered,
                disk_quota: Some(1000),
                max_pending_per_node: Some(500),
                shutdown_timeout: Duration::from_secs(3),
                lease_ttl: Duration::from_secs(15),
                log_format: LogFormat::Json,
                admin: false,
                tls: Some(crate::tls::ServerTlsFiles {
                    cert: "/etc/pm/server.pem".into(),
                    key: "/etc/pm/server.key".into(),
                    client_ca: Some("/etc/pm/clients-ca.pem".into()),
                }),
                node_tls: Some(crate::tls::ClientTlsFiles {
                    ca: "/etc/pm/nodes-ca.pem".into(),
                    cert: Some("/etc/pm/to-nodes.pem".into()),
                    key: Some("/etc/pm/to-nodes.key".into()),
                    domain: None,
                    options: ("--node-tls-ca", "--node-tls-cert", "--node-tls-key"),
                }),
                etcd_tls: Some(crate::tls::ClientTlsFiles {
                    ca: "/etc/pm/etcd-ca.pem".into(),
                    cert: Some("/etc/pm/etcd-client.pem".into()),
                    key: Some("/etc/pm/etcd-client.key".into()),
                    domain: None,
                    options: ("--etcd-tls-ca", "--etcd-tls-cert", "--etcd-tls-key"),
                }),
                token_file: Some("/etc/pm/tokens".into()),
                admin_token_file: Some("/etc/pm/admin-tokens".into()),
                max_concurrent_streams: 100,
                concurrency_per_connection: 50,
            }
        );
    }

    #[test]
    fn no_admin_is_a_switch_with_an_optional_value() {
        let admin = |args: &[&str]| parse(args).expect("flags").resolve().expect("ok").admin;
        assert!(admin(&[]));
        assert!(!admin(&["--no-admin"]));
        assert!(!admin(&["--no-admin=true"]));
        assert!(admin(&["--no-admin=false"]));
        let c = with_file(
            parse(&["--no-admin=false"]).expect("flags"),
            "no_admin = true",
        );
        assert!(c.expect("valid").admin, "flag beats file");
        assert!(
            !with_file(ServeArgs::default(), "no_admin = true")
                .expect("valid")
                .admin
        );
    }

    /// The documented example file (`tools/push-manager.toml`, which the README points to)
    /// lists every option as a commented `# key = value` line, and those values, all
    /// uncommented, make a valid configuration.
    #[test]
    fn the_example_file_documents_every_option() {
        let text = include_str!("../tools/push-manager.toml");
        let mut keys = std::collections::BTreeSet::new();
        let mut uncommented = String::new();
        for line in text.lines() {
            let Some((key, _)) = line.strip_prefix("# ").and_then(|l| l.split_once(" = ")) else {
                continue;
            };
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                assert!(keys.insert(key.to_string()), "{key} listed twice");
                uncommented.push_str(&line[2..]);
                uncommented.push('\n');
            }
        }
        let flags: std::collections::BTreeSet<String> = T::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| *l != "config" && *l != "help")
            .map(|l| l.replace('-', "_"))
            .collect();
        assert_eq!(keys, flags, "tools/push-manager.toml vs the flags");
        with_file(ServeArgs::default(), &uncommented).expect("the example values are valid");
        // The lines that show defaults resolve to the defaults.
        let c = with_file(ServeArgs::default(), &uncommented).expect("valid");
        let d = defaults();
        assert_eq!(
            (
                c.listen,
                c.max_payload_bytes,
                c.dedupe_window,
                c.max_attempts,
                c.max_in_flight
            ),
            (
                d.listen,
                d.max_payload_bytes,
                d.dedupe_window,
                d.max_attempts,
                d.max_in_flight
            )
        );
        assert_eq!(
            (
                c.max_concurrent_streams,
                c.concurrency_per_connection,
                c.delivery_batch
            ),
            (
                d.max_concurrent_streams,
                d.concurrency_per_connection,
                d.delivery_batch
            )
        );
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let e = err(parse(&["--tls-cert", "c.pem"]).expect("clap").resolve());
        assert!(e.contains("--tls-cert") && e.contains("--tls-key"), "{e}");
        let e = err(parse(&["--tls-client-ca", "ca.pem"])
            .expect("clap")
            .resolve());
        assert!(
            e.contains("--tls-client-ca") && e.contains("--tls-cert"),
            "{e}"
        );
        let e = err(
            parse(&["--node-tls-cert", "c.pem", "--node-tls-key", "k.pem"])
                .expect("clap")
                .resolve(),
        );
        assert!(e.contains("--node-tls-ca"), "{e}");
        let e = err(
            parse(&["--etcd-tls-ca", "ca.pem", "--etcd-tls-key", "k.pem"])
                .expect("clap")
                .resolve(),
        );
        assert!(e.contains("--etcd-tls-cert"), "{e}");
        let e = err(parse(&["--etcd", "https://127.0.0.1:2379"])
            .expect("clap")
            .resolve());
        assert!(e.contains("--etcd-tls-ca"), "{e}");
        let e = err(
            parse(&["--etcd", "http://127.0.0.1:2379", "--etcd-tls-ca", "ca.pem"])
                .expect("clap")
                .resolve(),
        );
        assert!(e.contains("https://"), "{e}");
        let c = parse(&["--tls-cert", "c.pem", "--tls-key", "k.pem"])
            .expect("clap")
            .resolve()
            .expect("valid");
        assert_eq!(c.tls.map(|t| t.client_ca), Some(None));
    }

    #[test]
    fn etcd_credentials_come_in_pairs_and_stay_hidden() {
        let e = err(parse(&["--etcd-user", "pm"]).expect("clap").resolve());
        assert!(
            e.contains("--etcd-user") && e.contains("no password"),
            "{e}"
        );
        let e = err(parse(&["--etcd-password", "hunter2"])
            .expect("clap")
            .resolve());
        assert!(
            e.contains("without --etcd-user") && !e.contains("hunter2"),
            "{e}"
        );
        let c = parse(&["--etcd-user", "pm", "--etcd-password", "hunter2"])
            .expect("clap")
            .resolve()
            .expect("valid");
        assert_eq!(
            c.etcd_password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert!(!format!("{c:?}").contains("hunter2"), "redacted in Debug");
    }

    #[test]
    fn flags_parse() {
        let a = parse(&[
            "--listen=0.0.0.0:1",
            "--etcd",
            "http://a:2379,http://b:2379",
            "--etcd=http://c:2379",
            "--static-node",
            "a=127.0.0.1:7001",
            "--static-node",
            "b=h:2,c=[::1]:3",
            "--max-payload-bytes",
            "2MiB",
            "--backoff-max",
            "1m",
            "--durability",
            "buffered",
            "--disk-quota",
            "10GiB",
        ])
        .expect("valid flags");
        assert_eq!(a.etcd, ["http://a:2379", "http://b:2379", "http://c:2379"]);
        assert_eq!(
            a.static_node,
            [
                node("a", "127.0.0.1:7001"),
                node("b", "h:2"),
                node("c", "[::1]:3")
            ]
        );
        let c = a.resolve().expect("valid");
        assert_eq!(c.listen, "0.0.0.0:1".parse().expect("addr"));
        assert_eq!(c.max_payload_bytes, 2 << 20);
        assert_eq!(c.backoff_max, Duration::from_secs(60));
        assert_eq!(c.durability, Durability::Buffered);
        assert_eq!(c.disk_quota, Some(10 << 30));
    }

    #[test]
    fn bad_flags_are_rejected_by_clap() {
        for args in [
            &["--backoff-max", "3x"][..],
            &["--backoff-max", "30"],
            &["--max-payload-bytes", "1.5MiB"],
            &["--durability", "fast"],
            &["--static-node", "nope"],
            &["--static-node", "a=b"],
            &["--listen", "localhost"],
            &["--max-attempts", "-1"],
            &["--unknown-flag", "x"],
        ] {
            assert!(parse(args).is_err(), "{args:?} should be rejected");
        }
    }

    #[test]
    fn precedence_is_flag_then_file_then_default() {
        let file = r#"
            listen = "127.0.0.1:6000"
            max_attempts = 9
            backoff_max = "1m"
            static_node = ["f=127.0.0.1:7001"]
            etcd = ["http://file:2379"]
        "#;
        let flags = parse(&[
            "--listen",
            "127.0.0.1:7000",
            "--static-node",
            "x=127.0.0.1:7002",
        ])
        .expect("flags");
        let c = with_file(flags, file).expect("valid");
        assert_eq!(
            c.listen,
            "127.0.0.1:7000".parse().expect("addr"),
            "flag wins"
        );
        assert_eq!(c.max_attempts, 9, "file beats default");
        assert_eq!(c.backoff_max, Duration::from_secs(60), "file beats default");
        assert_eq!(c.max_in_flight, 10, "default fills the rest");
        assert_eq!(
            c.static_nodes,
            [node("x", "127.0.0.1:7002")],
            "flag list replaces file's"
        );
        assert_eq!(c.etcd, ["http://file:2379"], "no flag: file list kept");

        let c = with_file(ServeArgs::default(), file).expect("valid");
        assert_eq!(c.static_nodes, [node("f", "127.0.0.1:7001")]);
    }

    #[test]
    fn file_errors_name_the_file_and_key() {
        let e = err(with_file(ServeArgs::default(), "max_attempt = 3\n"));
        assert!(
            e.contains("max_attempt") && e.contains("unknown field"),
            "{e}"
        );
        assert!(e.contains("invalid config file"), "{e}");

        let e = err(with_file(ServeArgs::default(), "backoff_max = 30\n"));
        assert!(e.contains("backoff_max") && e.contains("duration"), "{e}");
        let e = err(with_file(ServeArgs::default(), "backoff_max = \"3x\"\n"));
        assert!(e.contains("backoff_max") && e.contains("\"3x\""), "{e}");
        let e = err(with_file(ServeArgs::default(), "max_payload_bytes = -1\n"));
        assert!(e.contains("negative"), "{e}");
        let e = err(with_file(ServeArgs::default(), "static_node = [\"a\"]\n"));
        assert!(e.contains("static_node") && e.contains("ID=ADDR"), "{e}");
        let e = err(with_file(ServeArgs::default(), "durability = \"fast\"\n"));
        assert!(e.contains("fsync") && e.contains("buffered"), "{e}");
        let e = err(with_file(ServeArgs::default(), "not toml at all"));
        assert!(e.contains("invalid config file"), "{e}");

        let missing = ServeArgs {
            config: Some("/nonexistent/pm.toml".into()),
            ..ServeArgs::default()
        };
        let e = err(missing.resolve());
        assert!(
            e.contains("cannot read config file /nonexistent/pm.toml"),
            "{e}"
        );
    }

    #[test]
    fn file_sizes_accept_integers_and_strings() {
        let c = with_file(
            ServeArgs::default(),
            "max_payload_bytes = 1000\ndisk_quota = \"1GB\"",
        )
        .expect("valid");
        assert_eq!(
            (c.max_payload_bytes, c.disk_quota),
            (1000, Some(1_000_000_000))
        );
    }

    #[test]
    fn ranges_are_checked_whatever_the_source() {
        let cases: &[(&[&str], &str)] = &[
            (&["--max-attempts", "0"], "--max-attempts value 0"),
            (&["--max-in-flight", "0"], "--max-in-flight value 0"),
            (&["--max-in-flight", "10001"], "1 to 10000"),
            (&["--max-payload-bytes", "0"], "--max-payload-bytes value 0"),
            (&["--max-payload-bytes", "67108865"], "64MiB"),
            (&["--backoff-initial", "0s"], "--backoff-initial value 0s"),
            (&["--delivery-timeout", "0ms"], "--delivery-timeout"),
            (&["--lease-ttl", "500ms"], "at least 1s"),
            (&["--dedupe-window", "200years"], "at most 100 years"),
            (&["--disk-quota", "0"], "--disk-quota"),
            (
                &["--max-pending-per-node", "0"],
                "--max-pending-per-node value 0",
            ),
            (
                &["--backoff-initial", "1m"],
                "--backoff-initial 1m is greater than --backoff-max 30s (the default)",
            ),
            (
                &["--static-node", "a=h:1", "--static-node", "a=h:2"],
                "\"a\" is given more than once",
            ),
            (&["--manager-id", "has space"], "--manager-id"),
            (&["--manager-id", "a/b"], "'/'"),
            (&["--advertise", "nohost"], "no port"),
            (&["--advertise", "http://h:1"], "scheme"),
            (&["--etcd", "http://a:2379,"], "stray comma"),
            (&["--node-prefix", "/nodes"], "ending in '/'"),
        ];
        for (args, want) in cases {
            let e = err(parse(args).expect("clap accepts it").resolve());
            assert!(e.contains(want), "{args:?}: {e:?} lacks {want:?}");
        }
        assert_eq!(
            parse(&["--max-payload-bytes", "64MiB"])
                .expect("clap")
                .resolve()
                .expect("ok")
                .max_payload_bytes,
            64 << 20
        );
        let e = err(with_file(ServeArgs::default(), "max_attempts = 0"));
        assert!(e.contains("(from `max_attempts` in "), "{e}");
        let e = err(with_file(
            ServeArgs::default(),
            "backoff_initial = \"2m\"\nbackoff_max = \"1m\"",
        ));
        assert!(e.contains("(from `backoff_max` in "), "{e}");
    }

    #[test]
    fn static_nodes_built_without_parsing_are_still_checked() {
        let args = ServeArgs {
            static_node: vec![node("", "127.0.0.1:1")],
            ..ServeArgs::default()
        };
        assert!(err(args.resolve()).contains("--static-node"));
        let args = ServeArgs {
            static_node: vec![node("a", "")],
            ..ServeArgs::default()
        };
        assert!(err(args.resolve()).contains("address is empty"));
    }

    #[test]
    fn static_node_parsing() {
        assert_eq!("a=127.0.0.1:7001".parse(), Ok(node("a", "127.0.0.1:7001")));
        assert_eq!(
            "a=host-1.example:80".parse(),
            Ok(node("a", "host-1.example:80"))
        );
        assert_eq!("a=[::1]:80".parse(), Ok(node("a", "[::1]:80")));
        // The id ends at the first '='.
        let e = "a=b=h:1".parse::<StaticNode>().expect_err("'=' in host");
        assert!(
            e.starts_with("bad address of node \"a\": host \"b=h\""),
            "{e}"
        );
        for bad in [
            "",
            "a",
            "=h:1",
            "a=",
            "a=h",
            "a=h:",
            "a=:1",
            "a=h:0",
            "a=h:65536",
            "a=h:x",
            "a=::1:80",
            "a=[::1:80",
            "a=http://h:1",
            "a=h/p:1",
            "a b=h:1",
            "x/y=h:1",
        ] {
            assert!(
                bad.parse::<StaticNode>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn durations() {
        for (s, d) in [
            ("100ms", Duration::from_millis(100)),
            ("30s", Duration::from_secs(30)),
            ("10m", Duration::from_secs(600)),
            ("24h", Duration::from_secs(86_400)),
            (" 1h 30m ", Duration::from_secs(5400)),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse_duration(s), Ok(d), "{s}");
        }
        for bad in ["", "30", "3x", "-1s", "s", "1.5.2s"] {
            let e = parse_duration(bad).expect_err(bad);
            assert!(e.contains("invalid duration") && e.contains("30s"), "{e}");
        }
    }

    #[test]
    fn sizes() {
        for (s, n) in [
            ("0", 0),
            ("1048576", 1_048_576),
            ("512KiB", 512 << 10),
            ("10GiB", 10 << 30),
            ("1 MiB", 1 << 20),
            ("2mib", 2 << 20),
            ("7B", 7),
            ("1TiB", 1 << 40),
            ("3KB", 3_000),
            ("4MB", 4_000_000),
            ("5GB", 5_000_000_000),
            ("6TB", 6_000_000_000_000),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(n), "{s}");
        }
        for (bad, why) in [
            ("", "whole number"),
            ("KiB", "whole number"),
            ("-1", "whole number"),
            ("1.5GiB", "fractions"),
            ("10K", "unknown unit \"K\""),
            ("10 bytes", "unknown unit"),
            ("18446744073709551616", "more than"),
            ("16777216TiB", "more than"),
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn node_ids() {
        let max = "x".repeat(128);
        for ok in ["a", "node-1", "~!@#$%^&*()=", max.as_str()] {
            assert_eq!(validate_node_id(ok), Ok(()), "{ok}");
        }
        let e = validate_node_id(&"x".repeat(129)).expect_err("too long");
        assert!(e.contains("129 bytes") && e.contains("128 bytes"), "{e}");
        for bad in ["", "a b", "a/b", "tab\t", "é", "\x7f"] {
            assert!(validate_node_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durability_values() {
        assert_eq!(Durability::from_str("fsync", false), Ok(Durability::Fsync));
        assert_eq!(
            Durability::from_str("buffered", false),
            Ok(Durability::Buffered)
        );
        assert!(Durability::from_str("Fsync", false).is_err());
        let names: Vec<_> = Durability::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_owned())
            .collect();
        assert_eq!(names, ["fsync", "buffered"]);
        let c = with_file(ServeArgs::default(), "durability = \"buffered\"").expect("valid");
        assert_eq!(c.durability, Durability::Buffered);
    }
}
