//! The client side: connecting to a manager and `push-manager send`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::push_server_client::PushServerClient;
use crate::proto::BroadCastReq;

/// Errors of the client commands.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The manager could not be reached.
    #[error("cannot connect to push-manager at {addr}: {reason} (is `push-manager serve` running there?)")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        reason: String,
    },
    /// The manager refused the broadcast.
    #[error("broadcast refused: {code:?}: {message}")]
    Refused {
        /// gRPC status code.
        code: tonic::Code,
        /// The manager's explanation.
        message: String,
    },
    /// The payload could not be read.
    #[error("cannot read the payload from {from}: {source}")]
    Input {
        /// Where it was read from.
        from: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the replies failed (other than a closed pipe, which is not an error).
    #[error("cannot write output: {0}")]
    Output(#[source] std::io::Error),
}

/// Connects to a manager at `addr` (`host:port`), failing after `timeout`.
pub async fn connect(
    addr: &str,
    timeout: Duration,
) -> Result<PushServerClient<Channel>, ClientError> {
    let err = |reason: String| ClientError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| err(e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(PushServerClient::new(channel))
}

/// `push-manager send`: broadcast one or more messages and print each reply.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// The manager's address.
    #[arg(long, env = "PUSH_MANAGER_SERVER", default_value = "127.0.0.1:50051")]
    pub server: String,
    /// Idempotency key; with --count N > 1, `-1` .. `-N` is appended. Default: the manager
    /// assigns one.
    #[arg(long)]
    pub msg_id: Option<String>,
    /// Label passed through to nodes.
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Time to live in milliseconds; 0 = never expires.
    #[arg(long, default_value_t = 0)]
    pub ttl_ms: u64,
    /// A header passed through to nodes, as NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// How many broadcasts to send (the same payload each time).
    #[arg(long, default_value_t = 1)]
    pub count: u64,
    /// Read the payload from this file.
    #[arg(long, conflicts_with = "payload")]
    pub file: Option<PathBuf>,
    /// Per-call timeout, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
    /// The payload as text; `-` reads standard input.
    pub payload: Option<String>,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("header {s:?} is not NAME=VALUE"))
}

impl SendArgs {
    fn read_payload(&self) -> Result<Vec<u8>, ClientError> {
        match (&self.file, self.payload.as_deref()) {
            (Some(path), _) => std::fs::read(path).map_err(|source| ClientError::Input {
                from: path.display().to_string(),
                source,
            }),
            (None, Some("-") | None) => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .map_err(|source| ClientError::Input {
                        from: "standard input".into(),
                        source,
                    })?;
                Ok(buf)
            }
            (None, Some(text)) => Ok(text.as_bytes().to_vec()),
        }
    }
}

/// Runs `send`: one line per reply on stdout, `msg_id=.. node_count=.. duplicate=..`.
pub async fn send(args: SendArgs) -> Result<(), ClientError> {
    let payload = args.read_payload()?;
    let mut client = connect(&args.server, args.timeout).await?;
    let mut out = std::io::stdout().lock();
    for i in 1..=args.count {
        let msg_id = match &args.msg_id {
            Some(id) if args.count > 1 => format!("{id}-{i}"),
            Some(id) => id.clone(),
            None => String::new(),
        };
        let req = BroadCastReq {
            msg_id,
            payload: payload.clone(),
            topic: args.topic.clone(),
            ttl_ms: args.ttl_ms,
            headers: args.headers.iter().cloned().collect(),
            ..Default::default()
        };
        let reply = client
            .broadcast(req)
            .await
            .map_err(|s| ClientError::Refused {
                code: s.code(),
                message: s.message().to_string(),
            })?
            .into_inner();
        let line = writeln!(
            out,
            "msg_id={} node_count={} duplicate={}",
            reply.msg_id, reply.node_count, reply.duplicate
        );
        match line {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(ClientError::Output)?,
        }
    }
    Ok(())
}
