//! TLS (rustls, ring provider) for the manager's gRPC server, its connections to
//! connect-nodes, etcd and the command-line clients, with certificates read from PEM files.
//!
//! **Reloading without dropping the queue.** tonic's own `ServerTlsConfig` is fixed when the
//! server starts, so the manager runs its own accept loop instead ([`tls_incoming`]): every
//! accepted TCP connection is handed to a task that does the TLS handshake with the
//! [`ReloadableServerTls`]'s *current* `rustls::ServerConfig`, and only finished handshakes are
//! passed to tonic (`serve_with_incoming_shutdown`). A reload (SIGHUP, or a changed file; see
//! `crate::server`) builds a whole new `ServerConfig` from the files (certificate, key and
//! client CA alike) and swaps it in: connections opened after that use it, open ones go on with
//! the certificate they were opened with, and the store, the queues and the workers never
//! notice. A reload that fails (a half-written file, a key that does not match) keeps the
//! previous configuration and is logged, so a bad edit never takes the manager down.
//!
//! Toward connect-nodes the same files are read again into a new `ClientTlsConfig`, which is
//! published to every delivery worker; each worker then opens a new channel (in-flight calls
//! finish on the old one). Toward etcd, the files are read when a client is made
//! ([`crate::discovery::EtcdSettings::connect`]): at start, and when discovery or the
//! registration reconnects after a failed call and the files changed since (an etcd
//! connection that keeps working keeps its certificate).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// Bound of one TLS handshake on the server side: a client that connects and stays silent
/// holds a task and a socket, not the accept loop, and not for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; past it the accept loop waits, so a flood of silent
/// connections cannot grow tasks without bound.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Why TLS could not be set up; each names the file and the option it came from, and says
/// what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {option} file {}: {source}; check the path and its permissions", path.display())]
    Read {
        /// The option naming the file, e.g. `--tls-cert`.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A file was read but holds no usable PEM item of the kind expected.
    #[error("{option} file {} {reason}", path.display())]
    Pem {
        /// The option naming the file.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, and what was expected.
        reason: String,
    },
    /// The files were read but rustls refused them together (a key that does not match the
    /// certificate, a CA that is not a valid certificate).
    #[error("{what}: {reason}")]
    Config {
        /// Which files, by option.
        what: String,
        /// rustls's or tonic's reason.
        reason: String,
    },
}

/// Reads a file named by `option`.
fn read(option: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        option,
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file; at least one.
pub fn load_certs(
    option: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(option, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            option,
            path: path.to_owned(),
            reason: format!("is not valid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            option,
            path: path.to_owned(),
            reason: "holds no certificate; expected PEM `-----BEGIN CERTIFICATE-----` blocks"
                .into(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(option: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(option, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Pem {
        option,
        path: path.to_owned(),
        reason: format!(
            "holds no usable private key ({e}); expected a PEM `PRIVATE KEY` block \
             (PKCS#8, PKCS#1 or SEC1)"
        ),
    })
}

/// The one crypto provider of this crate's rustls configurations (ring, as tonic's
/// `tls-ring` and etcd-client's `tls` features use), passed explicitly so nothing depends on
/// a process-wide default being installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side's files: `--tls-cert`, `--tls-key`, and `--tls-client-ca` (mTLS: every
/// client must present a certificate signed by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// Certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// Private key of the leaf (PEM).
    pub key: PathBuf,
    /// CA certificates client certificates must chain to; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
}

impl ServerTlsFiles {
    /// Reads the files and builds a rustls server configuration (HTTP/2 by ALPN, which gRPC
    /// clients require).
    pub fn build(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let certs = load_certs("--tls-cert", &self.cert)?;
        let key = load_key("--tls-key", &self.key)?;
        let config_err = |what: &str, e: rustls::Error| TlsError::Config {
            what: what.to_owned(),
            reason: e.to_string(),
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_err("TLS protocol versions", e))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in load_certs("--tls-client-ca", ca)? {
                    roots.add(cert).map_err(|e| TlsError::Pem {
                        option: "--tls-client-ca",
                        path: ca.clone(),
                        reason: format!("holds a certificate rustls refuses as a CA: {e}"),
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Config {
                    what: format!("--tls-client-ca {}", ca.display()),
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            config_err(
                &format!(
                    "--tls-cert {} with --tls-key {} (is the key the certificate's?)",
                    self.cert.display(),
                    self.key.display()
                ),
                e,
            )
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

/// The server's TLS configuration, swapped whole by [`ReloadableServerTls::reload`]; see the
/// module docs.
pub struct ReloadableServerTls {
    files: ServerTlsFiles,
    // A std lock: held only to clone or replace an Arc, never across an await.
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl ReloadableServerTls {
    /// Reads the files; an error names the file and what to do.
    pub fn load(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(files.build()?);
        Ok(ReloadableServerTls { files, current })
    }

    /// Reads the files again and swaps the new configuration in for connections accepted
    /// from now on. On error the previous configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = self.files.build()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// Whether clients must present a certificate (mTLS).
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The files it is built from.
    pub fn files(&self) -> &ServerTlsFiles {
        &self.files
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake (with the
/// configuration current at accept time) succeeded, for tonic's
/// `serve_with_incoming_shutdown`. Handshakes run in their own tasks, bounded by
/// [`HANDSHAKE_TIMEOUT`], so one slow client never holds up the others; a failed handshake
/// is logged at debug (a port scan or a client without the right certificate is not the
/// server's error) and never reaches tonic. The loop ends when tonic drops the stream.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadableServerTls>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                () = tx.closed() => return,
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                () = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: passes, so back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_handshake_failure(peer, &e.to_string()),
                    Err(_) => log_handshake_failure(peer, "timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn log_handshake_failure(peer: SocketAddr, reason: &str) {
    tracing::debug!(%peer, reason, "TLS handshake failed");
}

/// The client side's files: a CA to verify the server with, and optionally a certificate
/// and key to present (mTLS). Used toward connect-nodes (`--node-tls-*`), etcd
/// (`--etcd-tls-*`) and by the command-line clients (`--tls-ca`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates the server's certificate must chain to (PEM).
    pub ca: PathBuf,
    /// Client certificate chain to present, with `key`.
    pub cert: Option<PathBuf>,
    /// Private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name to verify the server's certificate against instead of the host of its address.
    pub domain: Option<String>,
    /// Option names for messages: (ca, cert, key), e.g. `("--node-tls-ca", ...)`.
    pub options: (&'static str, &'static str, &'static str),
}

impl ClientTlsFiles {
    /// Reads the files (checking each parses) and builds tonic's client configuration.
    pub fn build(&self) -> Result<ClientTlsConfig, TlsError> {
        let (ca_opt, cert_opt, key_opt) = self.options;
        load_certs(ca_opt, &self.ca)?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca_opt, &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                load_certs(cert_opt, cert)?;
                load_key(key_opt, key)?;
                config = config.identity(Identity::from_pem(
                    read(cert_opt, cert)?,
                    read(key_opt, key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(TlsError::Config {
                    what: format!("{cert_opt} / {key_opt}"),
                    reason: "a client certificate needs its key and a key its certificate; \
                             give both or neither"
                        .into(),
                })
            }
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        // tonic builds the rustls configuration (and so finds a bad key or CA) only when it
        // is given to an endpoint: do that once here, so the error comes at start.
        Endpoint::from_static("https://127.0.0.1:1")
            .tls_config(config.clone())
            .map_err(|e| TlsError::Config {
                what: format!("{ca_opt} {}", self.ca.display()),
                reason: crate::discovery::error_chain(&e),
            })?;
        Ok(config)
    }

    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.ca.clone()];
        paths.extend(self.cert.clone());
        paths.extend(self.key.clone());
        paths
    }
}

/// Modification time and length of each file (`None` when unreadable), to notice a changed
/// certificate without a signal.
pub fn file_stamps(paths: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}
