//! TLS, mTLS and bearer tokens end to end, with certificates the test makes (rcgen):
//! Broadcast over mTLS with a token and delivery to a node over mTLS; callers without the
//! right certificate or token refused; certificates reloaded (SIGHUP, then a file change)
//! while messages wait in the queue, none lost; the admin API's token on loopback.
//!
//! Only loopback traffic is used, so the admin API's refusal of a non-loopback caller is
//! tested on its decision (`auth::tests`), and here that loopback callers are served without
//! a token unless one is configured.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::{arg, client_tls, Ca, CertDir};
use common::etcd::wait_until_async;
use common::{has_all, ids, wait_until, Manager, Sim, FAST_RETRY};
use nix::sys::signal::Signal;
use push_manager::proto::admin::admin_client::AdminClient;
use push_manager::proto::admin::ListNodesRequest;
use push_manager::proto::push_server_client::PushServerClient;
use push_manager::proto::{BroadCastReply, BroadCastReq};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

const MANAGER_BIN: &str = env!("CARGO_BIN_EXE_push-manager");
const DEADLINE: Duration = Duration::from_secs(20);

/// A channel to `addr`, over TLS when `tls` is given; the error says why it failed.
async fn channel(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// One Broadcast; `Err((code, message))`, with no code when the connection itself failed.
async fn broadcast(
    addr: &str,
    tls: Option<ClientTlsConfig>,
    token: Option<&str>,
    msg_id: &str,
) -> Result<BroadCastReply, (Option<tonic::Code>, String)> {
    let channel = channel(addr, tls).await.map_err(|e| (None, e))?;
    let mut request = tonic::Request::new(BroadCastReq {
        msg_id: msg_id.to_string(),
        payload: b"secret payload".to_vec().into(),
        ..Default::default()
    });
    if let Some(t) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    PushServerClient::new(channel)
        .broadcast(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| (Some(s.code()), s.message().to_string()))
}

/// Runs `push-manager <args>`, bounded in time; (exit success, stdout, stderr).
async fn cli(args: &[String]) -> (bool, String, String) {
    let run = tokio::process::Command::new(MANAGER_BIN)
        .args(args)
        .env_remove("PUSH_MANAGER_TOKEN")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the CLI finished in time")
        .expect("the CLI ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A sim serving TLS with `cert`/`key` and requiring client certificates from `ca` (mTLS).
fn mtls_node(id: &str, cert: &Path, key: &Path, ca: &Path) -> Sim {
    Sim::start(
        id,
        &[
            "--tls-cert",
            &arg(cert),
            "--tls-key",
            &arg(key),
            "--tls-client-ca",
            &arg(ca),
        ],
    )
}

#[tokio::test]
async fn broadcast_over_mtls_with_token_reaches_a_node_over_mtls_and_others_are_refused() {
    let ca = Ca::new("test-ca");
    let certs = CertDir::new();
    let ca_pem = certs.write("ca.pem", &ca.pem());
    let (server_cert, server_key) = certs.write_pair("manager", &ca.issue("manager"));
    let caller = ca.issue("business-service");
    let (caller_cert, caller_key) = certs.write_pair("caller", &caller);
    let (to_nodes_cert, to_nodes_key) = certs.write_pair("to-nodes", &ca.issue("manager"));
    let (node_cert, node_key) = certs.write_pair("node", &ca.issue("node-a"));
    let tokens = certs.write("tokens", "# callers\nalpha-token\nbeta-token\n");

    // The node requires a client certificate from the CA: only mTLS delivery reaches it.
    let sim = mtls_node("a", &node_cert, &node_key, &ca_pem);
    let data = tempfile::tempdir().expect("data dir");
    let mut manager = Manager::start(
        data.path(),
        &[("a", sim.addr())],
        &[
            "--tls-cert",
            &arg(&server_cert),
            "--tls-key",
            &arg(&server_key),
            "--tls-client-ca",
            &arg(&ca_pem),
            "--node-tls-ca",
            &arg(&ca_pem),
            "--node-tls-cert",
            &arg(&to_nodes_cert),
            "--node-tls-key",
            &arg(&to_nodes_key),
            "--token-file",
            &arg(&tokens),
        ],
    );
    let good = || Some(client_tls(&ca, Some(&caller)));
    manager.set_client_tls(client_tls(&ca, Some(&caller)));
    manager.wait_ready().await;
    let addr = manager.addr();

    // The right certificate and a listed token: accepted, and delivered over mTLS.
    let reply = broadcast(&addr, good(), Some("beta-token"), "tls-1")
        .await
        .expect("accepted over mTLS with a token");
    assert_eq!(reply.node_count, 1);
    wait_until("node a has tls-1 over mTLS", DEADLINE, || {
        has_all(&sim, &["tls-1".to_string()])
    })
    .await;

    // The right certificate, no or a wrong token: UNAUTHENTICATED, the token never echoed.
    let (code, message) = broadcast(&addr, good(), None, "no-token")
        .await
        .expect_err("no token");
    assert_eq!(code, Some(tonic::Code::Unauthenticated), "{message}");
    assert!(message.contains("bearer token"), "{message}");
    let (code, message) = broadcast(&addr, good(), Some("gamma-token"), "bad-token")
        .await
        .expect_err("wrong token");
    assert_eq!(code, Some(tonic::Code::Unauthenticated), "{message}");
    assert!(
        !message.contains("gamma") && !message.contains("alpha"),
        "{message}"
    );

    // A token but no client certificate, or one from another CA, or plaintext, or a client
    // that does not trust the manager's CA: refused before any call is served.
    let other = Ca::new("other-ca");
    let stranger = other.issue("stranger");
    for (what, tls) in [
        ("no client certificate", Some(client_tls(&ca, None))),
        (
            "a certificate from another CA",
            Some(client_tls(&ca, Some(&stranger))),
        ),
        ("plaintext", None),
        (
            "a client that does not trust the manager's CA",
            Some(client_tls(&other, Some(&caller))),
        ),
    ] {
        let r = broadcast(&addr, tls, Some("alpha-token"), "refused").await;
        assert!(r.is_err(), "{what}: expected a refusal, got {r:?}");
    }

    // The CLI client with the matching options.
    let (ok, out, err) = cli(&[
        "send".into(),
        "--server".into(),
        addr.clone(),
        "--tls-ca".into(),
        arg(&ca_pem),
        "--tls-cert".into(),
        arg(&caller_cert),
        "--tls-key".into(),
        arg(&caller_key),
        "--token-file".into(),
        arg(&tokens),
        "--msg-id".into(),
        "cli-1".into(),
        "hello over TLS".into(),
    ])
    .await;
    assert!(ok, "send over mTLS failed: {err}");
    assert!(out.contains("msg_id=cli-1 node_count=1"), "{out}");
    wait_until("node a has cli-1", DEADLINE, || {
        has_all(&sim, &["cli-1".to_string()])
    })
    .await;
    assert!(
        !sim.received_ids().contains_key("refused") && !sim.received_ids().contains_key("no-token"),
        "a refused broadcast was delivered"
    );
    let log = manager.log();
    for token in ["alpha-token", "beta-token", "gamma-token"] {
        assert!(!log.contains(token), "the log shows a token");
    }
}

#[tokio::test]
async fn certificates_reload_on_sighup_and_file_change_without_losing_queued_messages() {
    let certs = CertDir::new();
    let ca1 = Ca::new("ca-1");
    let ca_pem = certs.write("ca.pem", &ca1.pem());
    let (server_cert, server_key) = certs.write_pair("manager", &ca1.issue("manager"));
    let (to_nodes_cert, to_nodes_key) = certs.write_pair("to-nodes", &ca1.issue("manager"));

    // The node is down while messages queue; its address is fixed so it can come back.
    let node_port = common::free_port();
    let node_addr = format!("127.0.0.1:{node_port}");
    let data = tempfile::tempdir().expect("data dir");
    let mut args = vec![
        "--tls-cert".to_string(),
        arg(&server_cert),
        "--tls-key".into(),
        arg(&server_key),
        "--node-tls-ca".into(),
        arg(&ca_pem),
        "--node-tls-cert".into(),
        arg(&to_nodes_cert),
        "--node-tls-key".into(),
        arg(&to_nodes_key),
    ];
    args.extend(FAST_RETRY.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut manager = Manager::start(data.path(), &[("a", node_addr.clone())], &args);
    manager.set_client_tls(client_tls(&ca1, None));
    manager.wait_ready().await;
    let pid = manager.pid();
    let addr = manager.addr();

    let before = ids("before", 20);
    for id in &before {
        let reply = broadcast(&addr, Some(client_tls(&ca1, None)), None, id)
            .await
            .expect("accepted over TLS");
        assert_eq!(reply.node_count, 1);
    }

    // Rotation 1, announced by SIGHUP: a new CA for everything, the manager's server
    // certificate, its client certificate toward nodes and the CA it trusts nodes with.
    let ca2 = Ca::new("ca-2");
    certs.write_pair("manager", &ca2.issue("manager"));
    certs.write_pair("to-nodes", &ca2.issue("manager"));
    certs.write("ca.pem", &ca2.pem());
    manager.signal(Signal::SIGHUP);
    wait_until_async(
        "the manager serves the CA-2 certificate",
        DEADLINE,
        || async {
            broadcast(&addr, Some(client_tls(&ca2, None)), None, "after-sighup")
                .await
                .is_ok()
        },
    )
    .await;
    assert!(
        broadcast(&addr, Some(client_tls(&ca1, None)), None, "old-ca")
            .await
            .is_err(),
        "a client trusting only the old CA still connected after the reload"
    );

    // Rotation 2, by file change alone (no signal): a third CA for the server certificate.
    let ca3 = Ca::new("ca-3");
    certs.write_pair("manager", &ca3.issue("manager"));
    wait_until_async(
        "the manager notices the changed files and serves the CA-3 certificate",
        DEADLINE,
        || async {
            broadcast(
                &addr,
                Some(client_tls(&ca3, None)),
                None,
                "after-file-change",
            )
            .await
            .is_ok()
        },
    )
    .await;
    assert_eq!(manager.pid(), pid, "the reloads restarted the manager");
    assert!(manager.is_running());

    // The node comes up with a CA-2 certificate and requires CA-2 client certificates: only
    // the reloaded client side reaches it. Everything queued before the reloads arrives.
    let node = ca2.issue("node-a");
    let (node_cert, node_key) = certs.write_pair("node", &node);
    let node_ca = certs.write("node-ca.pem", &ca2.pem());
    let sim = Sim::start_on(
        "a",
        node_port,
        &[
            "--tls-cert",
            &arg(&node_cert),
            "--tls-key",
            &arg(&node_key),
            "--tls-client-ca",
            &arg(&node_ca),
        ],
    );
    let mut all = before.clone();
    all.push("after-sighup".into());
    all.push("after-file-change".into());
    wait_until(
        "node a has every message queued before and after the reloads",
        Duration::from_secs(30),
        || has_all(&sim, &all),
    )
    .await;
    assert!(!sim.received_ids().contains_key("old-ca"));
}

#[tokio::test]
async fn admin_api_serves_loopback_callers_and_requires_its_token_when_set() {
    async fn list_nodes(addr: &str, token: Option<&str>) -> Result<usize, tonic::Code> {
        let channel = channel(addr, None).await.expect("connect");
        let mut request = tonic::Request::new(ListNodesRequest::default());
        if let Some(t) = token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}").parse().expect("header"),
            );
        }
        AdminClient::new(channel)
            .list_nodes(request)
            .await
            .map(|r| r.into_inner().nodes.len())
            .map_err(|s| s.code())
    }

    // No admin token configured: a loopback caller is served without one.
    let data = tempfile::tempdir().expect("data dir");
    let node = ("a", "127.0.0.1:1".to_string());
    let mut open = Manager::start(data.path(), std::slice::from_ref(&node), &[]);
    open.wait_ready().await;
    assert_eq!(list_nodes(&open.addr(), None).await, Ok(1));
    open.terminate().await;

    // With --admin-token-file, loopback callers need it too; Broadcast stays open (it has
    // its own --token-file).
    let certs = CertDir::new();
    let admin_tokens = certs.write("admin-tokens", "admin-secret\n");
    let data = tempfile::tempdir().expect("data dir");
    let mut guarded = Manager::start(
        data.path(),
        std::slice::from_ref(&node),
        &["--admin-token-file", &arg(&admin_tokens)],
    );
    guarded.wait_ready().await;
    let addr = guarded.addr();
    assert_eq!(
        list_nodes(&addr, None).await,
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        list_nodes(&addr, Some("guess")).await,
        Err(tonic::Code::Unauthenticated)
    );
    assert_eq!(list_nodes(&addr, Some("admin-secret")).await, Ok(1));
    broadcast(&addr, None, None, "open-broadcast")
        .await
        .expect("Broadcast needs no token without --token-file");

    let (ok, _, err) = cli(&[
        "admin".into(),
        "--server".into(),
        addr.clone(),
        "nodes".into(),
    ])
    .await;
    assert!(!ok && err.contains("bearer token"), "{err}");
    let (ok, out, err) = cli(&[
        "admin".into(),
        "--server".into(),
        addr.clone(),
        "--token-file".into(),
        arg(&admin_tokens),
        "nodes".into(),
    ])
    .await;
    assert!(ok, "admin with its token failed: {err}");
    assert!(out.contains('a'), "{out}");
    assert!(
        !guarded.log().contains("admin-secret"),
        "the log shows the token"
    );
}

#[tokio::test]
async fn bad_security_files_stop_the_start_with_a_clear_error() {
    let certs = CertDir::new();
    let empty = certs.write("empty-tokens", "# nothing yet\n");
    let ca = Ca::new("ca");
    let (cert, _) = certs.write_pair("manager", &ca.issue("manager"));
    let (_, other_key) = certs.write_pair("other", &ca.issue("other"));
    let missing = certs.path("missing.pem");
    for (args, expect) in [
        (
            vec!["--token-file".to_string(), arg(&empty)],
            "holds no token",
        ),
        (
            vec![
                "--tls-cert".to_string(),
                arg(&missing),
                "--tls-key".into(),
                arg(&other_key),
            ],
            "missing.pem",
        ),
        (
            vec![
                "--tls-cert".to_string(),
                arg(&cert),
                "--tls-key".into(),
                arg(&other_key),
            ],
            "--tls-key",
        ),
    ] {
        let data = tempfile::tempdir().expect("data dir");
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut m = Manager::start(data.path(), &[("a", "127.0.0.1:1".to_string())], &args);
        let status = m.wait_exit(DEADLINE).await;
        assert!(!status.success(), "{args:?} started");
        assert!(m.log().contains(expect), "{args:?}: {}", m.log());
    }
}

#[tokio::test]
async fn a_node_requiring_mtls_refuses_a_manager_without_a_client_certificate() {
    let ca = Ca::new("test-ca");
    let certs = CertDir::new();
    let ca_pem = certs.write("ca.pem", &ca.pem());
    let (node_cert, node_key) = certs.write_pair("node", &ca.issue("node-a"));
    let sim = mtls_node("a", &node_cert, &node_key, &ca_pem);
    // TLS toward the node (it verifies the node) but no client certificate to present.
    let data = tempfile::tempdir().expect("data dir");
    let mut manager = Manager::start(
        data.path(),
        &[("a", sim.addr())],
        &["--node-tls-ca", &arg(&ca_pem)],
    );
    manager.wait_ready().await;
    let reply = broadcast(&manager.addr(), None, None, "needs-mtls")
        .await
        .expect("accepted and queued");
    assert_eq!(reply.node_count, 1);

    // The delivery fails at the node's handshake and stays queued; the node's last error
    // (admin ListNodes, from loopback) says so.
    let addr = manager.addr();
    wait_until_async("node a shows a failed delivery", DEADLINE, || async {
        let channel = channel(&addr, None).await.expect("connect");
        let nodes = AdminClient::new(channel)
            .list_nodes(ListNodesRequest::default())
            .await
            .expect("admin from loopback")
            .into_inner()
            .nodes;
        nodes
            .iter()
            .any(|n| n.node_id == "a" && n.pending == 1 && !n.last_error.is_empty())
    })
    .await;
    assert!(
        sim.received_ids().is_empty(),
        "delivered without a client certificate"
    );
}
