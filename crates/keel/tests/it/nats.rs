//! Event export to and run ingestion from a real NATS JetStream server,
//! across SIGKILLs of `keel serve`. Each test uses its own subject prefix
//! (so its own streams) and deletes its streams when it passes.
//!
//! NATS is expected at `KEEL_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`). With `CI=true` an unreachable server fails the
//! test; elsewhere the test is skipped with a notice.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use keel::mock::Mock;
use keel::nats::Names;
use keel_store::{RunFilter, Store};
use serde_json::{Value, json};

use crate::support::*;

/// A JetStream context on the test server, or `None` (test skipped) when it
/// is unreachable outside CI.
pub(crate) async fn jetstream(test: &str) -> Option<(String, jetstream::Context)> {
    let url =
        std::env::var("KEEL_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string());
    let connected = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    let client = match connected {
        Ok(client) => client,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "NATS at {url} is unreachable with CI=true: {e}"
            );
            eprintln!("SKIPPED {test}: NATS at {url} is unreachable ({e})");
            return None;
        }
    };
    Some((url, jetstream::new(client)))
}

/// A prefix no other test (or earlier run) uses.
pub(crate) fn unique_names() -> Names {
    Names::new(&format!("t{}", uuid::Uuid::now_v7().simple())).expect("prefix")
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of a stream, in stream order.
pub(crate) async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<jetstream::Message> {
    let expected = stream_messages(js, stream).await as usize;
    let consumer = js
        .get_stream(stream)
        .await
        .expect("stream")
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < expected {
        assert!(
            Instant::now() < deadline,
            "read {} of {expected}",
            out.len()
        );
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        while let Some(message) = batch.next().await {
            out.push(message.expect("message"));
        }
    }
    out
}

fn header<'a>(message: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
}

/// Registers `agent` (4 tool steps on the mock) and submits 100 runs of it.
async fn start_exported_runs(
    http: &reqwest::Client,
    server: &Server,
    mock: &Mock,
    agent: &str,
) -> Vec<String> {
    register(
        http,
        server,
        &agent_yaml(agent, mock, "tools:4", "echo", ""),
    )
    .await;
    let inputs: Vec<String> = (0..100).map(|i| format!("job {i}")).collect();
    futures_util::future::join_all(
        inputs
            .iter()
            .map(|input| submit(http, server, agent, input)),
    )
    .await
}

/// Waits for every run to complete; their journal lengths by run id. The
/// kill (at `at_kill` exported events) must have come before the end.
async fn completed_journals(
    http: &reqwest::Client,
    server: &Server,
    ids: &[String],
    at_kill: u64,
) -> HashMap<String, i64> {
    let mut journal: HashMap<String, i64> = HashMap::new();
    for id in ids {
        let run = wait_terminal(http, server, id, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
        journal.insert(id.clone(), run["last_seq"].as_i64().expect("last_seq"));
    }
    let total: i64 = journal.values().sum();
    assert!(
        (at_kill as i64) < total,
        "the kill came after everything was exported ({at_kill} of {total})"
    );
    journal
}

/// Waits until the events stream holds at least `count` messages.
async fn wait_exported(js: &jetstream::Context, names: &Names, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while stream_messages(js, &names.events_stream()).await < count {
        assert!(Instant::now() < deadline, "no events exported");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn delete_streams(js: &jetstream::Context, names: &Names) {
    for stream in [
        names.events_stream(),
        names.ingest_stream(),
        names.dead_stream(),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
}

#[tokio::test]
async fn every_event_is_exported_once_in_order_across_a_sigkill() {
    let Some((url, js)) = jetstream("export").await else {
        return;
    };
    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(50, Ordering::Relaxed);
    let dir = TempDir::new();
    let args = [
        "--workers",
        "32",
        "--events",
        url.as_str(),
        "--nats-prefix",
        names.prefix(),
    ];
    let mut server = Server::start(&dir.db(), &args).await;
    let http = reqwest::Client::new();
    let ids = start_exported_runs(&http, &server, &mock, "exporter").await;

    // Kill the process while runs are mid-flight and events are being exported.
    wait_exported(&js, &names, 150).await;
    server.kill();
    let at_kill = stream_messages(&js, &names.events_stream()).await;
    eprintln!("killed with {at_kill} events exported");

    let server = Server::start(&dir.db(), &args).await;
    let journal = completed_journals(&http, &server, &ids, at_kill).await;
    let total: i64 = journal.values().sum();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (stream_messages(&js, &names.events_stream()).await as i64) < total {
        assert!(Instant::now() < deadline, "not every event was exported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let a relay that would publish too much show it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let messages = read_stream(&js, &names.events_stream()).await;
    check_exported(&messages, &journal, &names, "exporter");
    delete_streams(&js, &names).await;
}

/// Checks the exported stream against the journals (run id -> last seq):
/// every event exactly once, in order per run, with the documented
/// envelope, subject and message id.
fn check_exported(
    messages: &[jetstream::Message],
    journal: &HashMap<String, i64>,
    names: &Names,
    agent: &str,
) {
    assert_eq!(
        messages.len() as i64,
        journal.values().sum::<i64>(),
        "JetStream holds each event exactly once"
    );
    let mut seen_ids = HashSet::new();
    let mut next_seq: HashMap<String, i64> = HashMap::new();
    for message in messages {
        let event: Value = serde_json::from_slice(&message.payload).expect("event json");
        let run_id = event["run_id"].as_str().expect("run_id").to_string();
        let seq = event["seq"].as_i64().expect("seq");
        let id = format!("{run_id}:{seq}");
        assert_eq!(event["schema"], "keel.event/v1");
        assert_eq!(event["id"], id.as_str());
        assert_eq!(header(message, "Nats-Msg-Id"), Some(id.as_str()));
        assert_eq!(header(message, "Keel-Event-Type"), event["type"].as_str());
        assert_eq!(event["tenant"], "default");
        assert_eq!(event["agent"], agent);
        assert_eq!(event["version"], "1");
        assert!(event["at"].as_i64().is_some_and(|at| at > 0));
        assert!(event["data"].is_object() && event["data"].get("type").is_none());
        assert_eq!(
            message.subject.as_str(),
            format!("{}.events.default.{agent}.{run_id}", names.prefix())
        );
        assert!(seen_ids.insert(id.clone()), "{id} exported twice");
        // In order per run: each run's events arrive as 1, 2, 3, ...
        let expected = next_seq.entry(run_id.clone()).or_insert(1);
        assert_eq!(seq, *expected, "run {run_id} out of order");
        *expected += 1;
        match seq {
            1 => assert_eq!(event["type"], "run_submitted"),
            _ if seq == journal[&run_id] => assert_eq!(event["type"], "run_completed"),
            _ => {}
        }
    }
    for (id, last_seq) in journal {
        assert_eq!(
            next_seq.get(id),
            Some(&(last_seq + 1)),
            "run {id} incomplete"
        );
    }
}

#[tokio::test]
async fn ingested_messages_become_runs_once_and_poison_is_dead_lettered_across_a_sigkill() {
    let Some((url, js)) = jetstream("ingest").await else {
        return;
    };
    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let args = [
        "--ingest",
        url.as_str(),
        "--nats-prefix",
        names.prefix(),
        "--ingest-ack-wait",
        "2s",
    ];
    let mut server = Server::start(&dir.db(), &args).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("ingested", &mock, "tools:1", "echo", ""),
    )
    .await;

    // Keel creates the ingest stream; shrink its duplicate window so that
    // re-published messages reach Keel and its idempotency is what is tested.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(stream) = js.get_stream(names.ingest_stream()).await
            && stream
                .get_consumer::<consumer::pull::Config>("keel-ingest")
                .await
                .is_ok()
        {
            break stream;
        }
        assert!(Instant::now() < deadline, "keel did not set up ingestion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut config = stream.info().await.expect("info").config.clone();
    config.duplicate_window = Duration::from_millis(100);
    js.update_stream(config).await.expect("update stream");

    // 200 messages: 180 distinct runs, then 20 re-publications of their
    // message ids (past the duplicate window): 15 identical copies and 5
    // poison ones.
    let valid = |i: usize| {
        (
            names.ingest_subject("ingested"),
            format!("msg-{i}"),
            json!({"input": {"n": i}}).to_string().into_bytes(),
        )
    };
    let originals: Vec<(String, String, Vec<u8>)> = (0..180).map(valid).collect();
    let mut repeats: Vec<(String, String, Vec<u8>)> = (0..15).map(|i| valid(i * 11)).collect();
    let poison = [
        (names.ingest_subject("ingested"), b"{not json".to_vec()),
        (
            names.ingest_subject("ingested"),
            br#"{"input": null}"#.to_vec(),
        ),
        (
            names.ingest_subject("ingested"),
            br#"{"prompt": "hi"}"#.to_vec(),
        ),
        (
            names.ingest_subject("nobody"),
            br#"{"input": "hi"}"#.to_vec(),
        ),
        (
            names.ingest_subject("ingested.v2"),
            br#"{"input": "hi"}"#.to_vec(),
        ),
    ];
    let mut poison_ids = HashSet::new();
    for (k, (subject, body)) in poison.into_iter().enumerate() {
        // 5, 42, 79, 116, 153: none of them is also repeated identically.
        let id = format!("msg-{}", 5 + k * 37);
        poison_ids.insert(id.clone());
        repeats.push((subject, id, body));
    }
    let messages: Vec<_> = originals.iter().chain(&repeats).cloned().collect();
    let publisher = tokio::spawn({
        let js = js.clone();
        async move {
            let stored = publish(&js, &originals).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            stored + publish(&js, &repeats).await
        }
    });

    // SIGKILL while Keel is consuming.
    let count = |server_url: String| {
        let http = http.clone();
        async move {
            let body = get_json(
                &http,
                &format!("{server_url}/v1/runs?agent=ingested&limit=500"),
            )
            .await;
            body["runs"].as_array().map_or(0, |r| r.len())
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(server.url.clone()).await < 20 {
        assert!(Instant::now() < deadline, "nothing ingested");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    server.kill();
    let at_kill = count_runs(&dir).await;
    eprintln!("killed with {at_kill} runs ingested");
    assert!(at_kill < 180, "the kill came after all was ingested");
    let stored = publisher.await.expect("publisher");
    assert_eq!(
        stored, 200,
        "every message reached the stream, repeats included"
    );

    let server = Server::start(&dir.db(), &args).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (runs, dead, left) = (
            count(server.url.clone()).await,
            stream_messages(&js, &names.dead_stream()).await,
            stream_messages(&js, &names.ingest_stream()).await,
        );
        if runs == 180 && dead == 5 && left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "runs {runs}, dead letters {dead}, unacknowledged {left}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more arrives once every redelivery window has passed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = count(server.url.clone()).await;
    let dead = stream_messages(&js, &names.dead_stream()).await;
    assert_eq!((runs, dead), (180, 5));

    let letters = read_stream(&js, &names.dead_stream()).await;
    let mut dead_ids = HashSet::new();
    for letter in &letters {
        assert_eq!(letter.subject.as_str(), names.dead_ingest_subject());
        let id = header(letter, "Keel-Original-Msg-Id").expect("msg id");
        let reason = header(letter, "Keel-Dead-Reason").expect("reason");
        let subject = header(letter, "Keel-Original-Subject").expect("subject");
        assert!(header(letter, "Keel-Original-Sequence").is_some());
        let (_, _, body) = messages
            .iter()
            .find(|(s, i, b)| i == id && s == subject && !poison_body_is_valid(b, s, &names))
            .expect("a poison message");
        assert_eq!(&letter.payload[..], &body[..], "the original body is kept");
        let expected = if subject.ends_with(".nobody") || subject.ends_with(".ingested.v2") {
            "is not registered"
        } else if body.starts_with(b"{not") {
            "not valid JSON"
        } else if body.starts_with(br#"{"input""#) {
            "not null"
        } else {
            "unknown field"
        };
        assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
        dead_ids.insert(id.to_string());
    }
    assert_eq!(dead_ids, poison_ids);

    // One run per distinct message, with its input.
    drop(server);
    let store = keel_store::sqlite::SqliteStore::open(&dir.db())
        .await
        .expect("open");
    let runs = store
        .list_runs(RunFilter {
            tenant: "default".into(),
            agent: Some("ingested".into()),
            limit: 500,
            ..Default::default()
        })
        .await
        .expect("runs");
    let mut inputs: Vec<i64> = runs
        .iter()
        .map(|r| r.input["n"].as_i64().expect("n"))
        .collect();
    inputs.sort_unstable();
    assert_eq!(inputs, (0..180).collect::<Vec<_>>());
    delete_streams(&js, &names).await;
}

/// Publishes `messages` (subject, message id, body); returns how many
/// JetStream stored (did not drop as duplicates).
async fn publish(js: &jetstream::Context, messages: &[(String, String, Vec<u8>)]) -> usize {
    let mut acks = Vec::new();
    for (subject, id, body) in messages {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        acks.push(
            js.publish_with_headers(subject.clone(), headers, body.clone().into())
                .await
                .expect("publish"),
        );
    }
    let mut stored = 0;
    for ack in acks {
        if !ack.await.expect("publish ack").duplicate {
            stored += 1;
        }
    }
    stored
}

#[tokio::test]
async fn ingestion_holds_messages_while_the_database_is_away() {
    let Some((url, js)) = jetstream("ingest outage").await else {
        return;
    };
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mut admin = db.admin().await;
    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let args = [
        "--database-url",
        db.url.as_str(),
        "--ingest",
        url.as_str(),
        "--nats-prefix",
        names.prefix(),
    ];
    let server = Server::start(&dir.db(), &args).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("patient", &mock, "tools:1", "echo", ""),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.get_stream(names.ingest_stream()).await.is_err() {
        assert!(Instant::now() < deadline, "keel did not set up ingestion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Messages arrive while the database refuses connections: they are
    // held, not dead-lettered, and become runs once it is back.
    db.allow_connections(&mut admin, false).await;
    db.terminate_sessions(&mut admin).await;
    let messages: Vec<(String, String, Vec<u8>)> = (0..5)
        .map(|i| {
            (
                names.ingest_subject("patient"),
                format!("job-{i}"),
                json!({"input": {"n": i}}).to_string().into_bytes(),
            )
        })
        .collect();
    assert_eq!(publish(&js, &messages).await, 5);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        if log.contains("ingest submit failed") {
            break;
        }
        assert!(Instant::now() < deadline, "no submit met the outage: {log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.allow_connections(&mut admin, true).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = get_json(&http, &server.url("/v1/runs?agent=patient&limit=100")).await;
        let runs = listed["runs"].as_array().cloned().unwrap_or_default();
        if runs.len() == 5 && runs.iter().all(|r| r["status"] == "COMPLETED") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the held messages did not run: {listed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stream_messages(&js, &names.dead_stream()).await, 0);
    delete_streams(&js, &names).await;
}

/// Whether a message is one of the valid ones (not poison).
fn poison_body_is_valid(body: &[u8], subject: &str, names: &Names) -> bool {
    subject == names.ingest_subject("ingested")
        && serde_json::from_slice::<Value>(body).is_ok_and(|v| v["input"].is_object())
}

/// Runs in the (killed) server's database.
async fn count_runs(dir: &TempDir) -> usize {
    let store = keel_store::sqlite::SqliteStore::open(&dir.db())
        .await
        .expect("open");
    store
        .list_runs(RunFilter {
            tenant: "default".into(),
            agent: Some("ingested".into()),
            limit: 500,
            ..Default::default()
        })
        .await
        .expect("runs")
        .len()
}

/// What Keel's ingest consumer has in hand: (`num_pending`: not delivered
/// yet, `num_ack_pending`: delivered and not acknowledged), or `None`
/// before Keel created it.
async fn ingest_consumer(js: &jetstream::Context, names: &Names) -> Option<(u64, usize)> {
    let stream = js.get_stream(names.ingest_stream()).await.ok()?;
    let info = stream
        .consumer_info(keel::nats::ingest::CONSUMER)
        .await
        .ok()?;
    Some((info.num_pending, info.num_ack_pending))
}

/// More messages than one fetch batch (64) arrive while the ceiling of
/// pending runs is 4: Keel pulls no more than it can submit, so the rest
/// wait in the stream (JetStream's `num_pending`), never delivered and
/// held unacknowledged in Keel (`num_ack_pending` stays within the
/// ceiling); once the runs finish, every message becomes a run.
#[tokio::test]
async fn ingestion_stops_pulling_at_the_pending_ceiling_and_loses_nothing() {
    let Some((url, js)) = jetstream("ingest backpressure").await else {
        return;
    };
    const CEILING: usize = 4;
    const MESSAGES: usize = 80;
    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    // Each run takes two model answers of 100 ms: runs stay pending a while.
    mock.counters.llm_latency_ms.store(100, Ordering::Relaxed);
    let dir = TempDir::new();
    let ceiling = CEILING.to_string();
    let args = [
        "--ingest",
        url.as_str(),
        "--nats-prefix",
        names.prefix(),
        "--max-pending",
        ceiling.as_str(),
        "--retry-after",
        "100ms",
    ];
    let server = Server::start(&dir.db(), &args).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("throttled", &mock, "tools:1", "echo", ""),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ingest_consumer(&js, &names).await.is_none() {
        assert!(Instant::now() < deadline, "keel did not set up ingestion");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let messages: Vec<(String, String, Vec<u8>)> = (0..MESSAGES)
        .map(|i| {
            (
                names.ingest_subject("throttled"),
                format!("job-{i}"),
                json!({"input": {"n": i}}).to_string().into_bytes(),
            )
        })
        .collect();
    assert_eq!(publish(&js, &messages).await, MESSAGES);

    // While they drain: never more than the ceiling pending, never more
    // than the ceiling delivered and unacknowledged, and (while at the
    // ceiling) the rest undelivered in the stream.
    let mut peak_pending = 0;
    let mut peak_unacked = 0;
    let mut waited_at_ceiling = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (undelivered, unacked) = ingest_consumer(&js, &names)
            .await
            .expect("the ingest consumer");
        peak_unacked = peak_unacked.max(unacked);
        let listed = get_json(&http, &server.url("/v1/runs?limit=500")).await;
        let runs = listed["runs"].as_array().cloned().unwrap_or_default();
        let pending = runs
            .iter()
            .filter(|r| {
                !matches!(
                    r["status"].as_str(),
                    Some("COMPLETED" | "FAILED" | "CANCELLED")
                )
            })
            .count();
        peak_pending = peak_pending.max(pending);
        if pending == CEILING && undelivered > 0 {
            waited_at_ceiling += 1;
        }
        if runs.len() == MESSAGES && pending == 0 {
            for r in &runs {
                assert_eq!(r["status"], "COMPLETED", "{r}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingestion stalled ({undelivered} undelivered, {unacked} unacked): {listed}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        peak_pending <= CEILING,
        "{peak_pending} runs pending over a ceiling of {CEILING}"
    );
    assert!(
        peak_unacked <= CEILING,
        "keel held {peak_unacked} unacknowledged messages at a ceiling of {CEILING}: it pulled more than it could submit"
    );
    assert!(
        waited_at_ceiling >= 3,
        "messages hardly waited in the stream at the ceiling ({waited_at_ceiling} samples): nothing was tested"
    );
    assert_eq!(ingest_consumer(&js, &names).await, Some((0, 0)));
    assert_eq!(stream_messages(&js, &names.ingest_stream()).await, 0);
    assert_eq!(stream_messages(&js, &names.dead_stream()).await, 0);
    delete_streams(&js, &names).await;
}

/// Two worker processes on PostgreSQL both run a relay; one holds the
/// lease and publishes. SIGKILLed mid-export, it cannot hand the lease
/// back: the other process takes it once it expires and exports the rest,
/// each event still exactly once and in order per run.
#[tokio::test]
async fn the_relay_lease_moves_to_another_process_after_a_sigkill() {
    let Some((url, js)) = jetstream("relay handover").await else {
        return;
    };
    let Some(db) = PgDb::create().await else {
        return;
    };
    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(50, Ordering::Relaxed);
    let dir = TempDir::new();
    let api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    let relay_args = [
        "--database-url",
        db.url.as_str(),
        "--role",
        "worker",
        "--workers",
        "16",
        "--events",
        url.as_str(),
        "--nats-prefix",
        names.prefix(),
    ];
    let mut relays = [
        Server::start(&dir.db(), &relay_args).await,
        Server::start(&dir.db(), &relay_args).await,
    ];
    let http = reqwest::Client::new();
    let ids = start_exported_runs(&http, &api, &mock, "handover").await;

    wait_exported(&js, &names, 150).await;
    let holder = relay_holder(&db.url).await;
    let pid = |server: &Server| server.child.id().to_string();
    let killed = relays
        .iter()
        .position(|r| holder.contains(&format!("-{}-", pid(r))))
        .unwrap_or_else(|| panic!("the lease holder {holder} is none of the relays"));
    relays[killed].kill();
    let at_kill = stream_messages(&js, &names.events_stream()).await;
    eprintln!("killed the relay holding the lease ({holder}) with {at_kill} events exported");

    let journal = completed_journals(&http, &api, &ids, at_kill).await;
    let total: i64 = journal.values().sum();
    // The lease lasts 15 s: the survivor takes it over within that and a renewal.
    let deadline = Instant::now() + Duration::from_secs(40);
    while (stream_messages(&js, &names.events_stream()).await as i64) < total {
        assert!(
            Instant::now() < deadline,
            "not every event was exported after the handover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let survivor = relay_holder(&db.url).await;
    assert!(
        survivor.contains(&format!("-{}-", pid(&relays[1 - killed]))),
        "the lease is held by {survivor}, not by the surviving relay"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let messages = read_stream(&js, &names.events_stream()).await;
    check_exported(&messages, &journal, &names, "handover");
    delete_streams(&js, &names).await;
}

/// The owner of the relay lease on a PostgreSQL database.
async fn relay_holder(url: &str) -> String {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let owner: String = sqlx::query_scalar("SELECT owner FROM relay_leases")
        .fetch_one(&mut conn)
        .await
        .expect("a relay holds the lease");
    let _ = conn.close().await;
    owner
}
