//! The managers' own registration against a real etcd: the key is there while a manager
//! runs and gone right after SIGTERM; `push-manager send --etcd` finds the managers and
//! spreads its calls over them; etcd user/password authentication.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::etcd::{wait_for_node_count, wait_until_async, Etcd};
use common::{wait_until, Manager, Sim};
use push_manager::discovery::{resolve_managers, EtcdSettings, ManagerEndpoint};

const MANAGER_BIN: &str = env!("CARGO_BIN_EXE_push-manager");
const MANAGERS: &str = "/services/push-manager/";
const REGISTER: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_key_is_there_while_it_runs_and_gone_after_sigterm() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let sim = Sim::start("n", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[("n", sim.addr())],
        &["--etcd", &url, "--manager-id", "pm-1", "--lease-ttl", "30s"],
    );
    m.wait_ready().await;
    let key = format!("{MANAGERS}pm-1");
    wait_until_async("the manager registers itself", REGISTER, || async {
        etcd.get(&key).await.as_deref() == Some(m.addr().as_str())
    })
    .await;

    assert!(m.terminate().await.success());
    // Revoked on the way out, not left to the 30 s lease.
    assert_eq!(etcd.get(&key).await, None, "{}", m.log_tail(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_with_etcd_spreads_broadcasts_over_the_managers() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    let sim = Sim::start("n", &[]);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut m1 = Manager::start(
        d1.path(),
        &[("n", sim.addr())],
        &["--etcd", &url, "--manager-id", "pm-a"],
    );
    let mut m2 = Manager::start(
        d2.path(),
        &[("n", sim.addr())],
        &["--etcd", &url, "--manager-id", "pm-b"],
    );
    m1.wait_ready().await;
    m2.wait_ready().await;
    let settings = EtcdSettings::new(vec![url.clone()]);
    wait_until_async("both managers are registered", REGISTER, || async {
        resolve_managers(&settings).await.unwrap().len() == 2
    })
    .await;
    assert_eq!(
        resolve_managers(&settings).await.unwrap(),
        [
            ManagerEndpoint {
                manager_id: "pm-a".into(),
                addr: m1.addr()
            },
            ManagerEndpoint {
                manager_id: "pm-b".into(),
                addr: m2.addr()
            },
        ]
    );

    let out = Command::new(MANAGER_BIN)
        .args(["send", "--etcd", &url, "--count", "6", "--msg-id", "spread"])
        .arg("hello")
        .env_remove("PUSH_MANAGER_SERVER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut per_manager: HashMap<String, usize> = HashMap::new();
    for line in stdout.lines() {
        assert!(line.contains("node_count=1 duplicate=false"), "{line}");
        let manager = line.rsplit_once("manager=").unwrap().1;
        *per_manager.entry(manager.to_string()).or_default() += 1;
    }
    assert_eq!(per_manager.get("pm-a"), Some(&3), "{stdout}");
    assert_eq!(per_manager.get("pm-b"), Some(&3), "{stdout}");
    let sent: Vec<String> = (1..=6).map(|i| format!("spread-{i}")).collect();
    wait_until(
        "the node gets all six, from both managers",
        CONVERGE,
        || {
            let got = sim.received();
            sent.iter().all(|id| got.iter().any(|r| &r.msg_id == id))
                && ["pm-a", "pm-b"]
                    .iter()
                    .all(|m| got.iter().any(|r| r.manager_id == *m))
        },
    )
    .await;

    // One manager gone: its key is revoked, and send uses the other.
    assert!(m1.terminate().await.success());
    let out = Command::new(MANAGER_BIN)
        .args(["send", "--etcd", &url, "--msg-id", "after", "x"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("manager=pm-b"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_user_and_password_are_used_and_a_bad_password_is_refused() {
    let etcd = Etcd::start().await;
    let url = etcd.url();
    etcd.enable_auth("rootpw").await;
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(
        data.path(),
        &[],
        &[
            "--etcd",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password",
            "rootpw",
            "--manager-id",
            "pm-auth",
        ],
    );
    m.wait_ready().await;
    let node = Sim::start(
        "secure",
        &[
            "--etcd",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password",
            "rootpw",
        ],
    );
    wait_for_node_count(&m, 1, "auth", REGISTER).await;
    wait_until("the node gets a probe", CONVERGE, || {
        !node.received().is_empty()
    })
    .await;
    let mut client = etcd.client_as("root", "rootpw").await;
    let key = client
        .get(format!("{MANAGERS}pm-auth"), None)
        .await
        .unwrap();
    assert_eq!(
        key.kvs().len(),
        1,
        "the manager registered with its credentials"
    );
    let logged = m.log();
    assert!(
        logged
            .lines()
            .filter(|l| !l.starts_with("--- harness"))
            .all(|l| !l.contains("rootpw")),
        "the manager never logs the password"
    );

    let bad_dir = tempfile::tempdir().unwrap();
    let mut bad = Manager::start(
        bad_dir.path(),
        &[],
        &[
            "--etcd",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password",
            "wrong",
        ],
    );
    let status = bad.wait_exit(REGISTER).await;
    assert!(!status.success());
    let log = bad.log();
    assert!(
        log.contains("etcd refused access") && log.contains("--etcd-password"),
        "{log}"
    );
}
