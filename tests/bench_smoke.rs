//! push-bench works end to end: a tiny run of real processes (manager, sims, the bench
//! itself) whose JSON report must be sane. No timing is asserted: CI machines vary, and the
//! figures belong in BENCHMARKS.md, not in a test.

use std::process::Command;

use serde_json::Value;

/// Runs push-bench with `args` (plus `--json --no-progress`), expects exit 0, and returns
/// its report.
fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_push-bench"))
        .args(args)
        .args(["--json", "--no-progress"])
        .output()
        .expect("push-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "push-bench {args:?} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("push-bench printed no JSON object ({e}):\n{stdout}"))
}

fn num(report: &Value, path: &str) -> f64 {
    report
        .pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in {report}"))
}

/// What every run must show: everything acked once and delivered to every node, and the
/// throughput and latency figures present and positive.
fn assert_complete(r: &Value, messages: u64, nodes: u64) {
    let online = r["mode"] == "online";
    assert_eq!(r["messages"], messages, "{r}");
    assert_eq!(r["nodes"], nodes, "{r}");
    assert_eq!(r["acked"], messages, "every broadcast acked: {r}");
    assert_eq!(
        r["duplicates_acked"], 0,
        "a fresh data dir has no duplicates: {r}"
    );
    assert_eq!(r["node_count_mismatches"], 0, "{r}");
    assert_eq!(
        r["delivered"],
        messages * nodes,
        "every message to every node: {r}"
    );
    assert_eq!(r["all_delivered"], true, "{r}");
    for path in [
        "/acked_per_s",
        "/send_seconds",
        "/ack_latency_ms/p50",
        "/ack_latency_ms/p99",
        "/ack_latency_ms/p999",
        "/manager/peak_rss_kib",
    ] {
        assert!(num(r, path) > 0.0, "{path} should be positive: {r}");
    }
    if online {
        assert!(num(r, "/deliveries_per_s") > 0.0, "{r}");
        assert!(num(r, "/deliver_seconds") > 0.0, "{r}");
    } else {
        // Nodes offline on purpose: the profile's own section has the drain rate.
        assert!(r["deliveries_per_s"].is_null(), "{r}");
    }
    assert_eq!(num(r, "/ack_latency_ms/count"), messages as f64, "{r}");
    assert!(
        num(r, "/ack_latency_ms/p50") <= num(r, "/ack_latency_ms/p99"),
        "{r}"
    );
    assert!(num(r, "/manager/cpu_seconds") >= 0.0, "{r}");
    assert!(num(r, "/manager/disk_bytes_per_broadcast") >= 0.0, "{r}");
}

#[test]
fn unary_run_with_floors_reports_every_figure() {
    let r = bench(&[
        "--profile",
        "ack",
        "--nodes",
        "2",
        "--messages",
        "300",
        "--size",
        "256",
        "--concurrency",
        "16",
        "--floors",
        "--floor-messages",
        "300",
    ]);
    assert_complete(&r, 300, 2);
    assert_eq!(r["profile"], "ack");
    assert_eq!(r["batch"], 1);
    assert_eq!(num(&r, "/accept_to_node_ms/count"), 600.0, "{r}");
    for path in [
        "/floors/sled_commit_per_s",
        "/floors/sled_packed_per_s",
        "/floors/echo_per_s",
        "/floors/acked_vs_sled",
        "/floors/acked_vs_sled_packed",
        "/floors/acked_vs_echo",
        "/floors/deliveries_vs_echo",
        "/floors/echo_batch_per_s",
    ] {
        assert!(num(&r, path) > 0.0, "{path} should be positive: {r}");
    }
    // CPU is counted in 10 ms ticks: a run this short may see none.
    for path in [
        "/floors/sled_cpu_us_per_record",
        "/floors/sled_packed_cpu_us_per_record",
        "/floors/echo_cpu_us_per_call",
        "/floors/echo_batch_cpu_us_per_message",
    ] {
        assert!(num(&r, path) >= 0.0, "{path} should be a CPU time: {r}");
    }
    assert!(
        r["floors"]["ceiling_acked_per_s"].is_null()
            || num(&r, "/floors/ceiling_acked_per_s") > 0.0,
        "{r}"
    );
}

#[test]
fn fixed_rate_run_completes() {
    let r = bench(&[
        "--nodes",
        "1",
        "--messages",
        "200",
        "--rate",
        "1000",
        "--concurrency",
        "8",
    ]);
    assert_complete(&r, 200, 1);
    assert_eq!(num(&r, "/rate"), 1000.0, "{r}");
}

#[test]
fn restart_profile_kills_and_restarts_the_manager() {
    let r = bench(&[
        "--profile",
        "restart",
        "--messages",
        "300",
        "--concurrency",
        "16",
    ]);
    assert_complete(&r, 300, 1);
    assert_eq!(r["mode"], "restart");
    assert!(num(&r, "/restart/drain_per_s") > 0.0, "{r}");
    assert!(num(&r, "/restart/serving_s") > 0.0, "{r}");
    assert!(num(&r, "/restart/first_delivery_s") >= 0.0, "{r}");
    assert!(num(&r, "/restart/rss_queued_kib") > 0.0, "{r}");
    assert_eq!(r["restart"]["queued"], 300, "{r}");
}

#[test]
fn backlog_profile_drains_to_a_returning_node() {
    let r = bench(&[
        "--profile",
        "backlog",
        "--messages",
        "300",
        "--concurrency",
        "16",
    ]);
    assert_complete(&r, 300, 1);
    assert_eq!(r["mode"], "backlog");
    assert!(num(&r, "/backlog/drain_per_s") > 0.0, "{r}");
    assert!(num(&r, "/backlog/rss_queued_kib") > 0.0, "{r}");
}

/// BroadcastBatch on the manager and toward batch-capable sims: every delivery came in a
/// batch.
#[test]
fn batched_run_to_batch_capable_nodes() {
    let r = bench(&[
        "--profile",
        "ack-batch",
        "--messages",
        "640",
        "--concurrency",
        "4",
    ]);
    assert_complete(&r, 640, 3);
    assert_eq!(r["batch"], 64);
    assert_eq!(r["delivered_via_batch"], 640 * 3, "{r}");
}

/// Unary-only sims make the manager fall back to unary delivery: every delivery came as a
/// unary call.
#[test]
fn batched_run_to_unary_only_nodes() {
    let r = bench(&[
        "--profile",
        "fanout10",
        "--nodes",
        "2",
        "--messages",
        "640",
        "--concurrency",
        "4",
        "--unary-only",
    ]);
    assert_complete(&r, 640, 2);
    assert_eq!(r["unary_only_nodes"], true);
    assert_eq!(r["delivered_via_unary"], 640 * 2, "{r}");
}
