//! The chaos harness's short profile, through the built `push-chaos` binary: a manager
//! SIGKILLed a few times under load, nodes paused, restarted and failing in bursts, then a
//! drain. Every acked message must reach every node.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The short profile runs about 40 s plus set-up and drain; generous for a slow debug build.
const DEADLINE: Duration = Duration::from_secs(240);

#[test]
fn short_profile_loses_nothing() {
    let work = tempfile::tempdir().expect("a temp dir");
    let report = work.path().join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_push-chaos"))
        .args(["--profile", "short", "--seed", "20261128"])
        .arg("--work-dir")
        .arg(work.path().join("run"))
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("push-chaos starts");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for push-chaos") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            // push-chaos kills its children when it is interrupted; SIGKILL would orphan them.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            std::thread::sleep(Duration::from_secs(2));
            let _ = child.kill();
            let _ = child.wait();
            panic!("push-chaos --profile short did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    };
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no report ({e}); push-chaos said:\n{stderr}"));
    let json: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    assert_eq!(json["lost"], 0, "{stderr}\n{text}");
    assert_eq!(json["verdict"], "PASS", "{stderr}\n{text}");
    assert!(status.success(), "exit {status}; {stderr}");
    assert!(json["faults"]["manager_kill"].as_u64() >= Some(1), "{text}");
    assert!(json["messages_acked"].as_u64() > Some(100), "{text}");
    assert!(stderr.contains("PASS seed=20261128"), "{stderr}");
}
