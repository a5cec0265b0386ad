//! The client side: connecting to a manager, spreading broadcasts over the managers
//! registered in etcd ([`ManagerPool`]), and `push-manager send`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{ClientTlsConfig, Endpoint};

use crate::discovery::{resolve_managers, DiscoveryError, EtcdSettings, ManagerEndpoint};
use crate::proto::push_server_client::PushServerClient;
use crate::proto::{BroadCastReply, BroadCastReq};

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
    /// The managers could not be looked up in etcd.
    #[error("cannot look up push-managers in etcd: {0}")]
    Discovery(#[from] DiscoveryError),
    /// A TLS or token file of the client could not be used.
    #[error("{0}")]
    Security(String),
    /// etcd answered, but no push-manager is registered there.
    #[error(
        "no push-manager is registered in etcd at {etcd} (under /services/push-manager/); \
         is one running with --etcd?"
    )]
    NoManagers {
        /// The etcd endpoints asked.
        etcd: String,
    },
}

/// How the command-line clients (`send`, `admin`) reach a manager: TLS and a bearer
/// token. The env vars are `PUSH_MANAGER_CLIENT_*`, apart from the server's own
/// `PUSH_MANAGER_TLS_*`, so a shell set up for `serve` does not hand the server's
/// certificate to a client.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClientSecurity {
    /// Connect over TLS, verifying the manager's certificate against these CAs (PEM)
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_CLIENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for a manager that requires one (mTLS); needs --tls-key
    #[arg(
        long,
        value_name = "FILE",
        env = "PUSH_MANAGER_CLIENT_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM)
    #[arg(
        long,
        value_name = "FILE",
        env = "PUSH_MANAGER_CLIENT_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Name the manager's certificate is checked against, when it is not the host of the
    /// address (e.g. connecting by IP to a certificate issued for a DNS name)
    #[arg(long, value_name = "NAME", env = "PUSH_MANAGER_CLIENT_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// File whose first token (one per line, # comments) is sent as `authorization: Bearer`;
    /// without it the env var PUSH_MANAGER_TOKEN is sent, if set
    #[arg(long, value_name = "FILE", env = "PUSH_MANAGER_CLIENT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

/// [`ClientSecurity`] loaded: the TLS configuration and the header to send.
#[derive(Clone, Default)]
pub struct ClientAuth {
    tls: Option<ClientTlsConfig>,
    token: BearerToken,
}

impl ClientSecurity {
    /// Reads the files (and `PUSH_MANAGER_TOKEN`); an error names the file.
    pub fn load(&self) -> Result<ClientAuth, ClientError> {
        let tls = match &self.tls_ca {
            Some(ca) => Some(
                crate::tls::ClientTlsFiles {
                    ca: ca.clone(),
                    cert: self.tls_cert.clone(),
                    key: self.tls_key.clone(),
                    domain: self.tls_domain.clone(),
                    options: ("--tls-ca", "--tls-cert", "--tls-key"),
                }
                .build()
                .map_err(|e| ClientError::Security(e.to_string()))?,
            ),
            None if self.tls_cert.is_some() => {
                return Err(ClientError::Security(
                    "--tls-cert needs --tls-ca (the CA that signed the manager's certificate)"
                        .into(),
                ))
            }
            None => None,
        };
        let token = match &self.token_file {
            Some(path) => {
                let set = std::fs::read_to_string(path).map_err(|e| {
                    ClientError::Security(format!(
                        "cannot read --token-file {}: {e}",
                        path.display()
                    ))
                })?;
                let first = set
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty() && !l.starts_with('#'))
                    .ok_or_else(|| {
                        ClientError::Security(format!(
                            "--token-file {} holds no token; write the token on a line",
                            path.display()
                        ))
                    })?;
                Some(first.to_owned())
            }
            None => std::env::var("PUSH_MANAGER_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
        };
        let token = match token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                ClientError::Security(
                    "the token is not a valid header value (visible ASCII only)".into(),
                )
            })?),
            None => None,
        };
        Ok(ClientAuth {
            tls,
            token: BearerToken(token),
        })
    }
}

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

/// A channel to a manager that sends the client's token on every call.
pub type ManagerChannel = InterceptedService<crate::channel::Channel, BearerToken>;

/// A channel to a manager at `addr` (`host:port`), connected (over TLS when `auth` says
/// so), each call bounded by `timeout`; the error is the reason it failed.
pub async fn channel(
    addr: &str,
    timeout: Duration,
    auth: &ClientAuth,
) -> Result<ManagerChannel, String> {
    let scheme = if auth.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(tls) = &auth.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|e| crate::discovery::error_chain(&e))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| crate::discovery::error_chain(&e))?;
    Ok(InterceptedService::new(
        crate::channel::EndOnLastFrame::new(channel),
        auth.token.clone(),
    ))
}

/// Connects to a manager at `addr` (`host:port`) in plaintext without a token, failing
/// after `timeout`.
pub async fn connect(
    addr: &str,
    timeout: Duration,
) -> Result<PushServerClient<ManagerChannel>, ClientError> {
    connect_with(addr, timeout, &ClientAuth::default()).await
}

/// Connects to a manager at `addr` with `auth`'s TLS and token, failing after `timeout`.
pub async fn connect_with(
    addr: &str,
    timeout: Duration,
    auth: &ClientAuth,
) -> Result<PushServerClient<ManagerChannel>, ClientError> {
    let channel = channel(addr, timeout, auth)
        .await
        .map_err(|reason| ClientError::Connect {
            addr: addr.to_string(),
            reason,
        })?;
    Ok(PushServerClient::new(channel))
}

/// Broadcasts spread over several push-managers, for Rust callers and `push-manager send
/// --etcd`: calls go round robin; a manager that cannot be reached, or answers UNAVAILABLE
/// (shutting down, no node known, store trouble), is passed over for the next one. Each
/// accepted message lives on the one manager that acked it. A call that failed in flight
/// and is retried on another manager may be delivered twice (nodes dedupe by `msg_id`).
pub struct ManagerPool {
    managers: Vec<ManagerEndpoint>,
    clients: Vec<Option<PushServerClient<ManagerChannel>>>,
    next: usize,
    timeout: Duration,
    auth: ClientAuth,
}

impl ManagerPool {
    /// A pool over `managers`, connecting lazily, each call bounded by `timeout`.
    pub fn new(managers: Vec<ManagerEndpoint>, timeout: Duration) -> Self {
        let clients = managers.iter().map(|_| None).collect();
        ManagerPool {
            managers,
            clients,
            next: 0,
            timeout,
            auth: ClientAuth::default(),
        }
    }

    /// The same pool, connecting with `auth`'s TLS and token.
    pub fn with_auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// A pool over the managers registered in etcd now
    /// ([`crate::discovery::resolve_managers`]); none registered is
    /// [`ClientError::NoManagers`].
    pub async fn from_etcd(
        settings: &EtcdSettings,
        timeout: Duration,
    ) -> Result<Self, ClientError> {
        let managers = resolve_managers(settings).await?;
        if managers.is_empty() {
            return Err(ClientError::NoManagers {
                etcd: settings.describe(),
            });
        }
        Ok(Self::new(managers, timeout))
    }

    /// The managers, in the order calls rotate over them.
    pub fn managers(&self) -> &[ManagerEndpoint] {
        &self.managers
    }

    /// Sends one broadcast to the next manager in turn (see the type's docs); returns the
    /// reply and the manager that gave it.
    pub async fn broadcast(
        &mut self,
        req: BroadCastReq,
    ) -> Result<(BroadCastReply, &ManagerEndpoint), ClientError> {
        let n = self.managers.len();
        let mut last = None;
        for attempt in 0..n {
            let i = (self.next + attempt) % n;
            let mut client = match &self.clients[i] {
                Some(c) => c.clone(),
                None => {
                    match connect_with(&self.managers[i].addr, self.timeout, &self.auth).await {
                        Ok(c) => {
                            self.clients[i] = Some(c.clone());
                            c
                        }
                        Err(e) => {
                            last = Some(e);
                            continue;
                        }
                    }
                }
            };
            match client.broadcast(req.clone()).await {
                Ok(reply) => {
                    self.next = (i + 1) % n;
                    return Ok((reply.into_inner(), &self.managers[i]));
                }
                Err(s) if s.code() == tonic::Code::Unavailable && attempt + 1 < n => {
                    tracing::debug!(manager = %self.managers[i].manager_id, status = %s,
                                    "manager unavailable; trying the next");
                    self.clients[i] = None;
                    last = Some(ClientError::Refused {
                        code: s.code(),
                        message: s.message().to_string(),
                    });
                }
                Err(s) => {
                    self.next = (i + 1) % n;
                    return Err(ClientError::Refused {
                        code: s.code(),
                        message: s.message().to_string(),
                    });
                }
            }
        }
        Err(last.unwrap_or(ClientError::NoManagers {
            etcd: "(empty manager list)".into(),
        }))
    }
}

/// `push-manager send`: broadcast one or more messages and print each reply.
#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// The manager's address (ignored with --etcd).
    #[arg(long, env = "PUSH_MANAGER_SERVER", default_value = "127.0.0.1:50051")]
    pub server: String,
    /// Find the managers in etcd instead (keys under /services/push-manager/) and spread the
    /// broadcasts over them; each reply line then names the manager that acked it.
    #[arg(long, value_name = "URL[,URL]", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// etcd user, with --etcd-password.
    #[arg(long, value_name = "USER", env = "PUSH_MANAGER_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// Password of --etcd-user (prefer the env var: a flag shows in the process list).
    #[arg(long, value_name = "PASSWORD", env = "PUSH_MANAGER_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,
    /// CAs (PEM) to verify etcd's certificate with, for https:// --etcd endpoints.
    #[arg(long, value_name = "FILE")]
    pub etcd_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to etcd, with --etcd-tls-key.
    #[arg(long, value_name = "FILE", requires = "etcd_tls_key")]
    pub etcd_tls_cert: Option<PathBuf>,
    /// Private key of --etcd-tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_tls_cert")]
    pub etcd_tls_key: Option<PathBuf>,
    /// TLS and token toward the manager.
    #[command(flatten)]
    pub security: ClientSecurity,
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

/// Runs `send`: one line per reply on stdout, `msg_id=.. node_count=.. duplicate=..`
/// (with `--etcd`, followed by `manager=<manager_id>`).
pub async fn send(args: SendArgs) -> Result<(), ClientError> {
    let payload = args.read_payload()?;
    let auth = args.security.load()?;
    let with_etcd = !args.etcd.is_empty();
    let mut pool = if with_etcd {
        let etcd_tls = args
            .etcd_tls_ca
            .clone()
            .map(|ca| crate::tls::ClientTlsFiles {
                ca,
                cert: args.etcd_tls_cert.clone(),
                key: args.etcd_tls_key.clone(),
                domain: None,
                options: ("--etcd-tls-ca", "--etcd-tls-cert", "--etcd-tls-key"),
            });
        let mut settings = EtcdSettings::new(args.etcd.clone()).with_tls(etcd_tls);
        settings.user = args.etcd_user.clone();
        settings.password = args.etcd_password.clone();
        ManagerPool::from_etcd(&settings, args.timeout)
            .await?
            .with_auth(auth)
    } else {
        let server = ManagerEndpoint {
            manager_id: String::new(),
            addr: args.server.clone(),
        };
        let mut pool = ManagerPool::new(vec![server], args.timeout).with_auth(auth.clone());
        // Connect now, so an unreachable server is reported as such before any send.
        pool.clients[0] = Some(connect_with(&args.server, args.timeout, &auth).await?);
        pool
    };
    let mut out = std::io::stdout().lock();
    for i in 1..=args.count {
        let msg_id = match &args.msg_id {
            Some(id) if args.count > 1 => format!("{id}-{i}"),
            Some(id) => id.clone(),
            None => String::new(),
        };
        let req = BroadCastReq {
            msg_id,
            payload: payload.clone().into(),
            topic: args.topic.clone(),
            ttl_ms: args.ttl_ms,
            headers: args.headers.iter().cloned().collect(),
            ..Default::default()
        };
        let (reply, manager) = pool.broadcast(req).await?;
        let line = if with_etcd {
            writeln!(
                out,
                "msg_id={} node_count={} duplicate={} manager={}",
                reply.msg_id, reply.node_count, reply.duplicate, manager.manager_id
            )
        } else {
            writeln!(
                out,
                "msg_id={} node_count={} duplicate={}",
                reply.msg_id, reply.node_count, reply.duplicate
            )
        };
        match line {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            other => other.map_err(ClientError::Output)?,
        }
    }
    Ok(())
}
