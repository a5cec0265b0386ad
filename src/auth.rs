//! Bearer tokens on `Broadcast` (`--token-file`) and on the admin API
//! (`--admin-token-file`), and the admin API's loopback guard.
//!
//! A caller sends `authorization: Bearer <token>`; the token must be one of the file's lines.
//! Tokens are compared in constant time over their bytes (a wrong guess of the right length
//! takes as long as any other), every configured token is compared on every call (no early
//! exit reveals which one matched), and no token is ever logged or put in an error message.
//! The files are read again on reload (SIGHUP or a changed file, with the certificates), so a
//! token can be rotated without a restart: add the new one, move the callers, remove the old.
//!
//! Authentication is checked before the request is looked at, so an unauthenticated caller
//! learns nothing about validation; health and reflection stay open (they carry no data).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::api::status::Rejected;

/// Why a token file could not be used; names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read {option} file {}: {source}; check the path and its permissions", path.display())]
    Read {
        /// `--token-file` or `--admin-token-file`.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file has no token, or a line that cannot be a token.
    #[error("{option} file {}: {reason}", path.display())]
    Content {
        /// `--token-file` or `--admin-token-file`.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the token itself).
        reason: String,
    },
}

/// The tokens of one file: one per line, surrounding whitespace ignored, empty lines and
/// lines starting with `#` skipped.
#[derive(Clone)]
pub struct TokenSet {
    tokens: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenSet({} tokens, redacted)", self.tokens.len())
    }
}

impl TokenSet {
    /// Parses a token file's text; `option` and `path` are for messages.
    pub fn parse(option: &'static str, path: &Path, text: &str) -> Result<Self, AuthError> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            // A token travels in an HTTP/2 header: only visible ASCII can be sent.
            if !token.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
                return Err(AuthError::Content {
                    option,
                    path: path.to_owned(),
                    reason: format!(
                        "line {} is not a valid token: only visible ASCII without spaces \
                         (0x21-0x7E) can be sent in a header",
                        n + 1
                    ),
                });
            }
            tokens.push(token.as_bytes().to_vec());
        }
        if tokens.is_empty() {
            return Err(AuthError::Content {
                option,
                path: path.to_owned(),
                reason: "holds no token; write one token per line (lines starting with # are \
                         comments), or leave the option out to turn authentication off"
                    .into(),
            });
        }
        Ok(TokenSet { tokens })
    }

    /// Reads and parses a token file.
    pub fn load(option: &'static str, path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            option,
            path: path.to_owned(),
            source,
        })?;
        Self::parse(option, path, &text)
    }

    /// Whether `presented` is one of the tokens, compared in constant time per token, every
    /// token compared.
    pub fn contains(&self, presented: &[u8]) -> bool {
        let mut found = false;
        for token in &self.tokens {
            found |= constant_time_eq(token, presented);
        }
        found
    }
}

/// Byte equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token file, read again by [`Tokens::reload`].
pub struct Tokens {
    option: &'static str,
    path: PathBuf,
    // A std lock: held only to clone or replace an Arc.
    current: RwLock<Arc<TokenSet>>,
}

impl Tokens {
    /// Reads the file named by `option`.
    pub fn load(option: &'static str, path: &Path) -> Result<Self, AuthError> {
        Ok(Tokens {
            option,
            path: path.to_owned(),
            current: RwLock::new(Arc::new(TokenSet::load(option, path)?)),
        })
    }

    /// Reads the file again; on error the previous tokens stay.
    pub fn reload(&self) -> Result<(), AuthError> {
        let set = Arc::new(TokenSet::load(self.option, &self.path)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = set;
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the request's bearer token; `what` names the API in the refusal.
    fn check<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        let set = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match bearer(request) {
            None => Err(refuse(format!(
                "{what} needs a bearer token: send the header `authorization: Bearer <token>` \
                 (push-manager send/admin: --token-file FILE or PUSH_MANAGER_TOKEN)"
            ))),
            Some(token) if set.contains(token) => Ok(()),
            Some(_) => Err(refuse(format!(
                "{what}: the bearer token is not accepted (not in the server's {})",
                self.option
            ))),
        }
    }
}

/// A refusal, as the one mapping of errors to statuses (`crate::api::status`) words it.
fn refuse(message: String) -> Status {
    Rejected::Unauthenticated(message).into()
}

/// The token of an `authorization: Bearer <token>` header, if any.
fn bearer<T>(request: &Request<T>) -> Option<&[u8]> {
    let value = request.metadata().get("authorization")?.as_bytes();
    let scheme = b"bearer ";
    if value.len() > scheme.len() && value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        Some(value[scheme.len()..].trim_ascii())
    } else {
        None
    }
}

/// Guards `Broadcast` / `BroadcastBatch`: with `--token-file`, a listed token is required.
#[derive(Clone)]
pub struct BroadcastAuth {
    tokens: Option<Arc<Tokens>>,
}

impl BroadcastAuth {
    /// Requires one of `tokens`, or nothing when `None`.
    pub fn new(tokens: Option<Arc<Tokens>>) -> Self {
        BroadcastAuth { tokens }
    }
}

impl Interceptor for BroadcastAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(tokens) = &self.tokens {
            tokens.check(&request, "Broadcast")?;
        }
        Ok(request)
    }
}

/// Guards the admin API (it can purge queues and stop intake, so it is never open to the
/// network by default):
///
/// - with `--admin-token-file`, every caller needs a listed token, loopback ones too;
/// - else, with `--tls-client-ca` (mTLS), the TLS layer has already verified the caller's
///   certificate, which is the protection;
/// - else only loopback callers are served. Plain server TLS does not count: it encrypts,
///   but any client may connect, so it authenticates nobody.
///
/// A caller whose address is unknown counts as non-loopback (fail closed). The address is
/// the TCP peer tonic puts in the request's extensions, with or without TLS.
#[derive(Clone)]
pub struct AdminGuard {
    tokens: Option<Arc<Tokens>>,
    mtls: bool,
}

impl AdminGuard {
    /// See the type's docs.
    pub fn new(tokens: Option<Arc<Tokens>>, mtls: bool) -> Self {
        AdminGuard { tokens, mtls }
    }

    /// The decision for one request.
    pub fn check<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if let Some(tokens) = &self.tokens {
            return tokens.check(request, "the admin API");
        }
        if self.mtls {
            return Ok(());
        }
        match request.remote_addr() {
            Some(addr) if is_loopback(addr) => Ok(()),
            peer => Err(refuse(format!(
                "the admin API serves only loopback callers unless it is protected, and this \
                 caller is {}; set --admin-token-file (and call with --token-file) or \
                 --tls-client-ca on the manager, or call from the manager's host",
                peer.map_or_else(|| "of unknown address".to_owned(), |a| a.ip().to_string())
            ))),
        }
    }
}

impl Interceptor for AdminGuard {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(&request)?;
        Ok(request)
    }
}

/// Loopback, IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`, what a dual-stack listener
/// reports) included.
fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::server::TcpConnectInfo;

    fn token_file(text: &str) -> (tempfile::NamedTempFile, Arc<Tokens>) {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        let tokens = Arc::new(Tokens::load("--admin-token-file", f.path()).expect("tokens"));
        (f, tokens)
    }

    /// A request as tonic's server hands it to an interceptor: the TCP peer in the
    /// extensions (`TcpConnectInfo`), which `Request::remote_addr` reads.
    fn request_from(peer: &str, token: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        request.extensions_mut().insert(TcpConnectInfo {
            local_addr: "127.0.0.1:50051".parse().ok(),
            remote_addr: Some(peer.parse().expect("peer address")),
        });
        if let Some(t) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header value"),
            );
        }
        request
    }

    // Tests only send loopback traffic, so a non-loopback caller cannot be made end to end
    // (tests/security.rs covers loopback callers over the wire); the guard's decision is on
    // the request's remote address, which is what these requests carry.
    #[test]
    fn admin_guard_refuses_an_unauthenticated_non_loopback_caller() {
        let open = AdminGuard::new(None, false);
        for peer in ["10.1.2.3:4000", "[2001:db8::1]:4000", "192.168.0.7:1"] {
            let e = open.check(&request_from(peer, None)).expect_err(peer);
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{peer}");
            assert!(
                e.message().contains("--admin-token-file"),
                "{}",
                e.message()
            );
        }
        for peer in ["127.0.0.1:4000", "[::1]:4000", "[::ffff:127.0.0.1]:4000"] {
            open.check(&request_from(peer, None)).expect(peer);
        }
        // No address known: refused.
        assert!(open.check(&Request::new(())).is_err());

        // mTLS protects it: the TLS layer checked the certificate.
        AdminGuard::new(None, true)
            .check(&request_from("10.1.2.3:4000", None))
            .expect("mTLS caller");

        // With a token, everyone needs it, loopback callers too.
        let (_f, tokens) = token_file("s3cret-admin\n");
        let guarded = AdminGuard::new(Some(tokens), false);
        for peer in ["10.1.2.3:4000", "127.0.0.1:4000"] {
            let e = guarded.check(&request_from(peer, None)).expect_err(peer);
            assert_eq!(e.code(), tonic::Code::Unauthenticated);
            let e = guarded
                .check(&request_from(peer, Some("wrong")))
                .expect_err(peer);
            assert!(!e.message().contains("wrong") && !e.message().contains("s3cret"));
            guarded
                .check(&request_from(peer, Some("s3cret-admin")))
                .expect(peer);
        }
    }

    #[test]
    fn token_files() {
        let p = Path::new("tokens.txt");
        let set = TokenSet::parse("--token-file", p, "# comment\n\n  alpha  \nbeta\n").expect("ok");
        assert!(set.contains(b"alpha") && set.contains(b"beta"));
        assert!(!set.contains(b"alph") && !set.contains(b"") && !set.contains(b"# comment"));
        assert!(!format!("{set:?}").contains("alpha"));

        let e = TokenSet::parse("--token-file", p, "\n# only a comment\n").expect_err("empty");
        assert!(e.to_string().contains("tokens.txt") && e.to_string().contains("no token"));
        let e = TokenSet::parse("--token-file", p, "good\nwith space\n").expect_err("space");
        assert!(e.to_string().contains("line 2") && !e.to_string().contains("with space"));
        let e = TokenSet::load("--token-file", Path::new("/nonexistent/tokens")).expect_err("gone");
        assert!(e.to_string().contains("/nonexistent/tokens"), "{e}");
    }

    #[test]
    fn bearer_header_parsing() {
        let (_f, tokens) = token_file("tok\n");
        let mut auth = BroadcastAuth::new(Some(tokens));
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", v.parse().expect("value"));
            r
        };
        assert!(auth.call(with("Bearer tok")).is_ok());
        assert!(auth.call(with("bearer tok")).is_ok());
        assert!(auth.call(with("Basic tok")).is_err());
        assert!(auth.call(with("Bearer tok2")).is_err());
        assert!(auth.call(Request::new(())).is_err());
        assert!(BroadcastAuth::new(None).call(Request::new(())).is_ok());
    }
}
