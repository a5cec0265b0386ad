//! Observability with real processes: `/metrics` scraped over HTTP after a known workload
//! matches the true counts (what the sims recorded, what the client was answered), JSON
//! logs, and gRPC reflection.

// Test code: a panic is a failed test with its message (see clippy.toml).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::metrics::{must, scrape, Metrics};
use common::{free_port, payload, wait_until, Manager, Sim};
use push_manager::proto::BroadCastReq;

const CONVERGE: Duration = Duration::from_secs(60);
async fn send(
    client: &mut push_manager::proto::push_server_client::PushServerClient<
        tonic::transport::Channel,
    >,
    id: &str,
    size: usize,
) -> Result<push_manager::proto::BroadCastReply, tonic::Status> {
    client
        .broadcast(BroadCastReq {
            msg_id: id.to_string(),
            payload: payload(0, size).into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn ok_count(sim: &Sim) -> f64 {
    sim.received().len() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_a_known_workload() {
    let a = Sim::start("a", &[]);
    let b = Sim::start("b", &["--reject", "poison-1", "--reject", "poison-2"]);
    let mut c = Sim::start("c", &[]);
    let data = tempfile::tempdir().unwrap();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut m = Manager::start(
        data.path(),
        &[("a", a.addr()), ("b", b.addr()), ("c", c.addr())],
        &[
            "--metrics-listen",
            &metrics_addr,
            "--max-attempts",
            "2",
            "--backoff-initial",
            "20ms",
            // Long enough that a dead node is seen backing off, not between probes.
            "--backoff-max",
            "2s",
        ],
    );
    m.wait_ready().await;
    let metrics = Metrics {
        addr: metrics_addr.clone(),
    };
    let mut client = m.client().await;

    // 50 accepted, 2 poison accepted (b refuses them), 10 duplicates, 5 rejected.
    let ok_ids: Vec<String> = (0..50).map(|i| format!("ok-{i}")).collect();
    for id in &ok_ids {
        let reply = send(&mut client, id, 100).await.unwrap();
        assert!(!reply.duplicate);
    }
    for id in ["poison-1", "poison-2"] {
        send(&mut client, id, 100).await.unwrap();
    }
    for id in &ok_ids[..10] {
        assert!(send(&mut client, id, 100).await.unwrap().duplicate);
    }
    for i in 0..5 {
        let e = send(&mut client, &format!("empty-{i}"), 0)
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    // Every node has what it will get; b dead-letters both poison messages.
    metrics
        .wait_for("push_manager_dead_letters_total{node=\"b\"}", 2.0)
        .await;
    for (sim, want) in [(&a, 52), (&b, 50), (&c, 52)] {
        wait_until(&format!("{} has {want}", sim.node_id()), CONVERGE, || {
            sim.received().len() == want
        })
        .await;
    }
    for node in ["a", "b", "c"] {
        metrics
            .wait_for(&format!("push_manager_queue_depth{{node=\"{node}\"}}"), 0.0)
            .await;
    }
    let text = scrape(&metrics_addr).await;
    assert_eq!(
        must(&text, "push_manager_broadcasts_total{result=\"accepted\"}"),
        52.0
    );
    assert_eq!(
        must(&text, "push_manager_broadcasts_total{result=\"duplicate\"}"),
        10.0
    );
    assert_eq!(
        must(&text, "push_manager_broadcasts_total{result=\"rejected\"}"),
        5.0
    );
    for sim in [&a, &b, &c] {
        let node = sim.node_id();
        assert_eq!(
            must(
                &text,
                &format!("push_manager_deliveries_total{{node=\"{node}\",result=\"ok\"}}")
            ),
            ok_count(sim),
            "{node}: ok deliveries = what the sim recorded"
        );
        assert_eq!(
            must(
                &text,
                &format!("push_manager_queue_oldest_age_seconds{{node=\"{node}\"}}")
            ),
            0.0
        );
        assert_eq!(
            must(
                &text,
                &format!("push_manager_node_state{{node=\"{node}\",state=\"online\"}}")
            ),
            1.0
        );
        for state in ["offline", "backoff", "held"] {
            assert_eq!(
                must(
                    &text,
                    &format!("push_manager_node_state{{node=\"{node}\",state=\"{state}\"}}")
                ),
                0.0
            );
        }
    }
    // max_attempts offers of each poison message, each refused permanently.
    assert_eq!(
        must(
            &text,
            "push_manager_deliveries_total{node=\"b\",result=\"permanent\"}"
        ),
        4.0
    );
    assert_eq!(
        must(&text, "push_manager_dead_letters_total{node=\"a\"}"),
        0.0
    );
    assert_eq!(must(&text, "push_manager_expired_total{node=\"a\"}"), 0.0);
    // Every OK reply was timed, duplicates included; every new message was in one round.
    assert_eq!(must(&text, "push_manager_ack_latency_seconds_count"), 62.0);
    assert_eq!(must(&text, "push_manager_commit_batch_size_sum"), 52.0);
    let rounds = must(&text, "push_manager_commit_rounds_total");
    assert!((1.0..=52.0).contains(&rounds), "{rounds}");
    assert_eq!(must(&text, "push_manager_commit_batch_size_count"), rounds);

    // Node c goes down: what is accepted meanwhile waits in its queue, counted exactly.
    c.kill();
    let down: Vec<String> = (0..20).map(|i| format!("down-{i}")).collect();
    for id in &down {
        assert_eq!(send(&mut client, id, 100).await.unwrap().node_count, 3);
    }
    metrics
        .wait_for("push_manager_node_state{node=\"c\",state=\"backoff\"}", 1.0)
        .await;
    metrics
        .wait_for("push_manager_queue_depth{node=\"a\"}", 0.0)
        .await;
    metrics
        .wait_for("push_manager_queue_depth{node=\"b\"}", 0.0)
        .await;
    let text = scrape(&metrics_addr).await;
    assert_eq!(must(&text, "push_manager_queue_depth{node=\"c\"}"), 20.0);
    assert!(must(&text, "push_manager_queue_oldest_age_seconds{node=\"c\"}") >= 0.0);
    assert!(
        must(
            &text,
            "push_manager_deliveries_total{node=\"c\",result=\"retry\"}"
        ) >= 1.0
    );
    // The age grows while the queue waits (computed at scrape time, not sampled).
    let first_age = must(&text, "push_manager_queue_oldest_age_seconds{node=\"c\"}");
    let start = std::time::Instant::now();
    loop {
        let age = metrics
            .get("push_manager_queue_oldest_age_seconds{node=\"c\"}")
            .await;
        if age >= first_age + 0.5 {
            break;
        }
        assert!(start.elapsed() < CONVERGE, "age stuck at {age}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A restart counts the waiting queue from the store, and finds its oldest entry.
    let status = m.terminate().await;
    assert!(status.success(), "{status}");
    m.restart();
    m.wait_ready().await;
    let text = scrape(&metrics_addr).await;
    assert_eq!(must(&text, "push_manager_queue_depth{node=\"c\"}"), 20.0);
    assert_eq!(must(&text, "push_manager_queue_depth{node=\"a\"}"), 0.0);
    let mut client = m.client().await;
    for id in ["late-1", "late-2"] {
        send(&mut client, id, 100).await.unwrap();
    }
    metrics
        .wait_for("push_manager_queue_depth{node=\"c\"}", 22.0)
        .await;
    let age = metrics
        .get("push_manager_queue_oldest_age_seconds{node=\"c\"}")
        .await;
    assert!(age >= first_age + 0.5, "age after restart {age}");

    // c comes back: its queue drains to zero, and what it got is what was counted.
    c.restart();
    metrics
        .wait_for("push_manager_queue_depth{node=\"c\"}", 0.0)
        .await;
    metrics
        .wait_for("push_manager_queue_oldest_age_seconds{node=\"c\"}", 0.0)
        .await;
    metrics
        .wait_for("push_manager_node_state{node=\"c\",state=\"online\"}", 1.0)
        .await;
    let ids = c.received_ids();
    assert!(down.iter().all(|id| ids.contains_key(id)));
    assert!(ids.contains_key("late-1") && ids.contains_key("late-2"));
    // Counters restart with the process: this run delivered c's 22 waiting entries.
    let text = scrape(&metrics_addr).await;
    assert_eq!(
        must(
            &text,
            "push_manager_deliveries_total{node=\"c\",result=\"ok\"}"
        ),
        ok_count(&c) - 52.0
    );
    assert_eq!(
        must(&text, "push_manager_broadcasts_total{result=\"accepted\"}"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_and_reflection() {
    let a = Sim::start("a", &[]);
    let data = tempfile::tempdir().unwrap();
    let mut m = Manager::start(data.path(), &[("a", a.addr())], &["--log-format", "json"]);
    m.wait_ready().await;
    let mut client = m.client().await;
    send(&mut client, "json-1", 10).await.unwrap();

    // Every line the manager writes is one JSON object (the harness adds its own markers).
    let log = m.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.starts_with("--- harness"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "push-manager serving"),
        "{log}"
    );

    // Reflection lists the services, so tools need no proto files.
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", m.addr()))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap();
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["broadcast.PushServer", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let status = m.terminate().await;
    assert!(status.success(), "{status}");
}
