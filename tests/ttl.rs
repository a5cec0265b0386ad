//! TTL end to end: messages with a short `ttl_ms` accepted while a node is down are never
//! delivered to it once it is back after the TTL (counted in `push_manager_expired_total`),
//! while everything else still arrives; the admin listing shows expiry times; a node
//! receives the *remaining* `ttl_ms`.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{free_port, has_all, ids, wait_until, Manager, Sim};
use push_manager::proto::push_server_server::{PushServer, PushServerServer};
use push_manager::proto::{BroadCastBatchReply, BroadCastBatchReq, BroadCastReply, BroadCastReq};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status};

const CONVERGE: Duration = Duration::from_secs(60);
const FAST_BACKOFF: [&str; 4] = ["--backoff-initial", "20ms", "--backoff-max", "300ms"];
const PUSH_MANAGER: &str = env!("CARGO_BIN_EXE_push-manager");

async fn scrape(addr: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn broadcast(m: &Manager, id: &str, ttl_ms: u64) -> u32 {
    m.client()
        .await
        .broadcast(BroadCastReq {
            msg_id: id.to_string(),
            payload: id.as_bytes().to_vec().into(),
            ttl_ms,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .node_count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dropped_for_a_node_that_was_down() {
    const TTL_MS: u64 = 1_500;
    let up = Sim::start("up", &[]);
    let mut down = Sim::start("down", &[]);
    let data = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["--metrics-listen", metrics.as_str()];
    args.extend(FAST_BACKOFF);
    let mut m = Manager::start(
        data.path(),
        &[("up", up.addr()), ("down", down.addr())],
        &args,
    );
    m.wait_ready().await;
    down.kill();

    let short = ids("short", 10);
    let forever = ids("forever", 10);
    let accepted_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for (s, f) in short.iter().zip(&forever) {
        assert_eq!(broadcast(&m, s, TTL_MS).await, 2);
        assert_eq!(broadcast(&m, f, 0).await, 2);
    }
    // After the last acceptance: every short one expires by TTL_MS from here.
    let accepted_at = Instant::now();

    // While it waits, the queue shows when each entry expires (and that the others never do).
    let out = std::process::Command::new(PUSH_MANAGER)
        .args([
            "admin",
            "--server",
            &m.addr(),
            "--json",
            "peek",
            "--node",
            "down",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 20, "{listed:?}");
    for e in &listed {
        let id = e["msg_id"].as_str().unwrap();
        let expires = e["expires_at"].as_str();
        if id.starts_with("short-") {
            let at = humantime::parse_rfc3339(expires.unwrap()).unwrap();
            let at_ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            let accepted = humantime::parse_rfc3339(e["accepted_at"].as_str().unwrap()).unwrap();
            let accepted = accepted.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            assert_eq!(at_ms, accepted + TTL_MS, "{e}");
            assert!(at_ms >= accepted_ms + TTL_MS, "{e}");
        } else {
            assert!(expires.is_none_or(str::is_empty), "{e}");
        }
    }

    // The healthy node got everything while it was fresh.
    wait_until("the up node has everything", CONVERGE, || {
        has_all(&up, &short) && has_all(&up, &forever)
    })
    .await;

    // The node comes back once the TTL is over (a time condition, not a convergence).
    wait_until("the TTL is over", CONVERGE, || {
        accepted_at.elapsed() > Duration::from_millis(TTL_MS + 200)
    })
    .await;
    down.restart();
    wait_until(
        "the returning node has the non-expiring ones",
        CONVERGE,
        || has_all(&down, &forever),
    )
    .await;
    let later = ids("later", 5);
    for id in &later {
        assert_eq!(broadcast(&m, id, 60_000).await, 2);
    }
    wait_until("and what comes later", CONVERGE, || has_all(&down, &later)).await;
    let got = down.received_ids();
    let stale: Vec<_> = short.iter().filter(|id| got.contains_key(*id)).collect();
    assert!(stale.is_empty(), "delivered stale: {stale:?}");

    let series = "push_manager_expired_total{node=\"down\"}";
    let start = Instant::now();
    while metric(&scrape(&metrics).await, series) < 10.0 {
        assert!(start.elapsed() < CONVERGE, "the expiries are never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = scrape(&metrics).await;
    assert_eq!(metric(&text, series), 10.0, "{text}");
    assert_eq!(
        metric(&text, "push_manager_expired_total{node=\"up\"}"),
        0.0,
        "{text}"
    );
    assert!(m.is_running());
}

/// A node that records the `ttl_ms` it is sent, and refuses (UNAVAILABLE) until told not to.
#[derive(Default, Clone)]
struct Recorder {
    accept: Arc<std::sync::atomic::AtomicBool>,
    got: Arc<Mutex<Vec<(BroadCastReq, Instant)>>>,
}

#[tonic::async_trait]
impl PushServer for Recorder {
    async fn broadcast(
        &self,
        request: Request<BroadCastReq>,
    ) -> Result<Response<BroadCastReply>, Status> {
        if !self.accept.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::unavailable("not yet"));
        }
        let req = request.into_inner();
        let msg_id = req.msg_id.clone();
        self.got.lock().unwrap().push((req, Instant::now()));
        Ok(Response::new(BroadCastReply {
            msg_id,
            node_count: 1,
            duplicate: false,
        }))
    }

    async fn broadcast_batch(
        &self,
        _request: Request<BroadCastBatchReq>,
    ) -> Result<Response<BroadCastBatchReply>, Status> {
        Err(Status::unimplemented("unary only"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_receives_the_remaining_ttl() {
    const TTL_MS: u64 = 60_000;
    const HELD_MS: u64 = 1_000;
    let node = Recorder::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PushServerServer::new(node.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("rec", addr.to_string())], &FAST_BACKOFF);
    m.wait_ready().await;

    let sent = Instant::now();
    assert_eq!(broadcast(&m, "with-ttl", TTL_MS).await, 1);
    assert_eq!(broadcast(&m, "no-ttl", 0).await, 1);
    // Refused for a while (a time condition), then accepted.
    wait_until("the node has refused for a while", CONVERGE, || {
        sent.elapsed() >= Duration::from_millis(HELD_MS)
    })
    .await;
    node.accept.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_until("both are delivered", CONVERGE, || {
        node.got.lock().unwrap().len() >= 2
    })
    .await;

    let got = node.got.lock().unwrap().clone();
    let (with, at) = got.iter().find(|(r, _)| r.msg_id == "with-ttl").unwrap();
    let waited = at.duration_since(sent).as_millis() as u64;
    assert!(with.attempt > 1, "it was refused first: {with:?}");
    assert!(
        with.ttl_ms <= TTL_MS - HELD_MS && with.ttl_ms + waited + 1_000 >= TTL_MS,
        "remaining ttl {} after {waited} ms",
        with.ttl_ms
    );
    let (without, _) = got.iter().find(|(r, _)| r.msg_id == "no-ttl").unwrap();
    assert_eq!(without.ttl_ms, 0, "0 = never expires");
    assert!(m.is_running());
    server.abort();
}
