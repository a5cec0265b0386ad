//! Disk full: on a small tmpfs made for the test, a write or fsync failure is never acked;
//! Broadcast answers UNAVAILABLE with the cause, and once space returns the manager reopens
//! its store by itself (sled 0.34.7 refuses writes after an I/O error until then), accepts
//! again without a restart, and every acked message is delivered.
//!
//! Needs root (to mount the tmpfs); otherwise it prints why it is skipped. CI runs as root.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{has_all, payload, wait_until, Manager, Sim};
use push_manager::proto::BroadCastReq;
use tonic::Code;

const CONVERGE: Duration = Duration::from_secs(60);
/// Room for sled's first log segments (8 MiB each) and a little more, so the disk fills
/// after a few MiB of messages.
const TMPFS_SIZE: &str = "size=24m";

/// A size-limited tmpfs, unmounted (and its mount point removed) on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("fs");
        std::fs::create_dir(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process not reaped yet): detach it, it goes once unused.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Whether this process runs as root (effective uid 0, from /proc).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
            .unwrap_or(false)
    })
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 64 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_is_unavailable_never_ok_and_acked_messages_survive() {
    if !is_root() {
        eprintln!(
            "SKIPPED disk_full: mounting a size-limited tmpfs needs root (CI runs as root); \
             run `cargo test --test disk_full` as root to exercise it"
        );
        return;
    }
    // Declared first, dropped last: the manager is gone before the unmount.
    let fs = Tmpfs::mount();
    let data = fs.path().join("data");
    let mut node = Sim::start("node-1", &[]);
    let mut m = Manager::start(
        &data,
        &[("node-1", node.addr())],
        &["--backoff-initial", "20ms", "--backoff-max", "200ms"],
    );
    m.wait_ready().await;
    // The node is down while the disk fills: nothing is delivered or reclaimed.
    node.kill();
    let mut client = m.client().await;
    // Acked before the disk fills: these must survive everything below.
    let mut acked = Vec::new();
    for i in 0..50 {
        let req = BroadCastReq {
            msg_id: format!("before-{i}"),
            payload: payload(i, 16 * 1024).into(),
            ..Default::default()
        };
        client.broadcast(req).await.unwrap();
        acked.push(format!("before-{i}"));
    }
    let filler = fs.path().join("filler");
    fill(&filler);

    let mut refused = None;
    for i in 0..4000 {
        let id = format!("full-{i}");
        let req = BroadCastReq {
            msg_id: id.clone(),
            payload: payload(i, 16 * 1024).into(),
            ..Default::default()
        };
        match client.broadcast(req).await {
            Ok(_) => acked.push(id),
            Err(s) => {
                refused = Some(s);
                break;
            }
        }
    }
    let refused = refused.expect("the disk filled up before 4000 x 16 KiB were acked");
    eprintln!(
        "disk full after {} acked broadcasts: {:?}: {}",
        acked.len(),
        refused.code(),
        refused.message()
    );
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("No space left") || refused.message().contains("space"),
        "the cause is named: {}",
        refused.message()
    );
    assert!(
        m.log().contains("commit round failed"),
        "the cause is logged"
    );

    // Still refused while the disk is full: never an OK.
    let again = BroadCastReq {
        msg_id: "still-full".into(),
        payload: payload(0, 64).into(),
        ..Default::default()
    };
    let s = client.broadcast(again).await.unwrap_err();
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    assert!(m.is_running(), "the manager keeps running on a full disk");

    // Space returns: the manager reopens the store by itself (sled 0.34.7 refuses writes
    // after an I/O error until then) and accepts again, without a restart.
    std::fs::remove_file(&filler).unwrap();
    let start = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        attempt += 1;
        let id = format!("after-free-{attempt}");
        let req = BroadCastReq {
            msg_id: id.clone(),
            payload: payload(attempt, 64).into(),
            ..Default::default()
        };
        // The port closes for a moment while the store is reopened: reconnect each time.
        let reply = match tokio::time::timeout(Duration::from_secs(5), async {
            let mut c = push_manager::proto::push_server_client::PushServerClient::connect(
                format!("http://{}", m.addr()),
            )
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            c.broadcast(req).await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(tonic::Status::deadline_exceeded("call timed out")),
        };
        match reply {
            Ok(_) => {
                acked.push(id);
                break;
            }
            Err(s) => {
                assert_ne!(s.code(), Code::Ok);
                assert!(
                    start.elapsed() < CONVERGE,
                    "the manager did not accept again within {CONVERGE:?} of space coming \
                     back; last answer {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    eprintln!(
        "accepting again {:?} after the filler was removed",
        start.elapsed()
    );
    assert!(
        m.log().contains("opening the store again"),
        "it reopened in place"
    );
    node.restart();
    wait_until("the node has every acked message", CONVERGE, || {
        has_all(&node, &acked)
    })
    .await;
    m.kill9();
}
