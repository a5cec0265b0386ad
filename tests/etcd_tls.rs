//! etcd over TLS with authentication: a real etcd started with `--cert-file`/`--key-file`
//! (a certificate the test makes) and auth enabled; the manager discovers a node through it
//! (`--etcd https://...`, `--etcd-tls-ca`, `--etcd-user`, the password from the env var),
//! delivers to it, and registers itself there. Then etcd's certificate is renewed under a
//! new CA and etcd restarted: the manager reconnects with the CA file as it is now.
//!
//! Needs `etcd` (Debian package etcd-server, or ETCD_BIN); fails with that hint without it.

mod common;

use std::time::Duration;

use common::certs::{arg, Ca, CertDir};
use common::etcd::{wait_for_node_count, wait_until_async, Etcd};
use common::{has_all, wait_until, Manager, Sim};
use push_manager::harness::EtcdTls;

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn manager_uses_etcd_over_tls_with_user_and_password() {
    let ca = Ca::new("etcd-ca");
    let certs = CertDir::new();
    let ca_pem = certs.write("ca.pem", &ca.pem());
    let (cert, key) = certs.write_pair("etcd", &ca.issue("etcd"));
    let mut etcd = Etcd::start_tls(EtcdTls {
        cert,
        key,
        ca: ca_pem.clone(),
    })
    .await;
    assert!(etcd.url().starts_with("https://"), "{}", etcd.url());
    etcd.enable_auth("root-pw").await;

    // Node a is put by the test; node b registers itself (connect-node-sim over TLS, with
    // the same user).
    let sim = Sim::start("a", &[]);
    etcd.client_as("root", "root-pw")
        .await
        .put("/services/connect-node/a", sim.addr(), None)
        .await
        .expect("register node a");
    let url = etcd.url();
    let ca_arg = arg(&ca_pem);
    let sim_b = Sim::start(
        "b",
        &[
            "--etcd",
            &url,
            "--etcd-tls-ca",
            &ca_arg,
            "--etcd-user",
            "root",
            "--etcd-password",
            "root-pw",
        ],
    );

    let data = tempfile::tempdir().expect("data dir");
    let mut manager = Manager::start_with_env(
        data.path(),
        &[],
        &[
            "--etcd",
            &etcd.url(),
            "--etcd-tls-ca",
            &arg(&ca_pem),
            "--etcd-user",
            "root",
            "--manager-id",
            "pm-tls",
        ],
        &[("PUSH_MANAGER_ETCD_PASSWORD", "root-pw")],
    );
    manager.wait_ready().await;

    // Both nodes are known only through etcd: a node_count of 2 shows discovery worked.
    let probes = wait_for_node_count(&manager, 2, "ab", DEADLINE).await;
    let last = &probes[probes.len() - 1..];
    wait_until("nodes a and b have the broadcast", DEADLINE, || {
        has_all(&sim, last) && has_all(&sim_b, last)
    })
    .await;

    // The manager registered itself, authenticated, over TLS.
    wait_until_async("the manager is registered in etcd", DEADLINE, || async {
        etcd.client_as("root", "root-pw")
            .await
            .get("/services/push-manager/pm-tls", None)
            .await
            .is_ok_and(|r| !r.kvs().is_empty())
    })
    .await;

    // etcd's certificate is renewed under a new CA and etcd restarted; the manager's CA file
    // is replaced in place. Its watch breaks, and its reconnection reads the new CA: a node
    // registered afterwards is discovered.
    let ca2 = Ca::new("etcd-ca-2");
    certs.write_pair("etcd", &ca2.issue("etcd"));
    certs.write("ca.pem", &ca2.pem());
    etcd.restart().await;
    let sim_c = Sim::start("c", &[]);
    etcd.client_as("root", "root-pw")
        .await
        .put("/services/connect-node/c", sim_c.addr(), None)
        .await
        .expect("register node c");
    // Node c, registered after etcd's certificate changed, is discovered.
    let probes = wait_for_node_count(&manager, 3, "c", Duration::from_secs(30)).await;
    let last = &probes[probes.len() - 1..];
    wait_until("node c has the broadcast", DEADLINE, || {
        has_all(&sim_c, last)
    })
    .await;
    assert!(
        !manager.log().contains("root-pw"),
        "the log shows the password"
    );
}
