//! Streamed answers on a run's event stream: `llm_delta` events between the
//! journal's, resumable with `Last-Event-ID`, compacted into the final
//! message once the step is journaled, and `llm_retry` after a crash.

use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use keel::mock::Mock;
use keel_store::Store;
use keel_store::sqlite::SqliteStore;
use serde_json::Value;

use crate::support::*;

/// An agent streaming the mock's slow `long:N:MS` model.
fn streaming_agent(name: &str, mock: &Mock, model: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
model:
  provider: openai
  model: "{model}"
  base_url: "{llm}"
  timeout: 30s
  stream: true
system: You are a test agent.
"#,
        llm = mock.llm_url(),
    )
}

/// One SSE event: id (empty when it has none), name, data.
#[derive(Debug, Clone)]
struct Seen {
    id: String,
    name: String,
    data: Value,
}

type Events = Pin<Box<dyn Stream<Item = Seen> + Send>>;

/// Opens a run's event stream, resuming after `last_event_id`.
async fn open(http: &reqwest::Client, url: &str, last_event_id: Option<&str>) -> Events {
    let mut request = http.get(url).header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("sse");
    assert_eq!(response.status(), 200);
    let source = Box::pin(response.bytes_stream().eventsource());
    let events = futures_util::stream::unfold(
        (source, String::new()),
        |(mut source, mut last_id)| async move {
            let event = source.next().await?.ok()?;
            // Only events that carry an id change it (ids persist in SSE).
            let id = if event.id == last_id {
                String::new()
            } else {
                last_id = event.id.clone();
                event.id
            };
            let data = serde_json::from_str(&event.data).expect("event json");
            let seen = Seen {
                id,
                name: event.event,
                data,
            };
            Some((seen, (source, last_id)))
        },
    );
    Box::pin(events)
}

/// Reads until `deltas` more `llm_delta` events came (or the stream ended).
async fn read_deltas(events: &mut Events, deltas: usize, out: &mut Vec<Seen>) {
    let mut got = 0;
    let read = async {
        while got < deltas {
            let Some(event) = events.next().await else {
                return;
            };
            got += usize::from(event.name == "llm_delta");
            out.push(event);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("deltas in time");
}

/// Reads to the end of the stream.
async fn read_to_end(events: &mut Events, out: &mut Vec<Seen>) {
    let read = async {
        while let Some(event) = events.next().await {
            out.push(event);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("the stream ended");
}

/// The last id a client saw: what it reconnects with.
fn last_id(events: &[Seen]) -> String {
    events
        .iter()
        .rev()
        .find(|e| !e.id.is_empty())
        .map(|e| e.id.clone())
        .expect("an event with an id")
}

/// (step, attempt, idx) of an `llm_delta`, checked against its id.
fn position(event: &Seen) -> (u64, u64, u64) {
    let field = |name: &str| event.data[name].as_u64().expect("a position field");
    let pos = (field("step"), field("attempt"), field("idx"));
    let suffix = format!(".{}.{}.{}", pos.0, pos.1, pos.2);
    assert!(event.id.ends_with(&suffix), "id {} of {pos:?}", event.id);
    pos
}

/// The text of the run's one `llm_completed` event.
fn final_message(events: &[Seen]) -> String {
    let completed: Vec<&Seen> = events
        .iter()
        .filter(|e| e.name == "llm_completed")
        .collect();
    assert_eq!(completed.len(), 1, "one llm_completed");
    completed[0].data["event"]["message"]["content"]
        .as_str()
        .expect("text")
        .to_string()
}

/// Opens the server's database once the server is gone.
async fn deltas_left(dir: &TempDir, run_id: &str) -> usize {
    let store = SqliteStore::open(&dir.db())
        .await
        .expect("open the database");
    let run_id = run_id.parse().expect("run id");
    let page = store.deltas(run_id, None, 1000).await.expect("deltas");
    page.deltas.len()
}

#[tokio::test]
async fn deltas_stream_in_order_and_resume_after_a_reconnect() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // 200 words, one every 10 ms: about 2 s of streaming, some 40 batches.
    register(
        &http,
        &server,
        &streaming_agent("talker", &mock, "long:200:10"),
    )
    .await;
    let id = submit(&http, &server, "talker", "talk").await;
    let url = server.url(&format!("/v1/runs/{id}/events"));

    // A client reads a few deltas, then drops the connection.
    let mut first = Vec::new();
    let mut events = open(&http, &url, None).await;
    read_deltas(&mut events, 3, &mut first).await;
    drop(events);
    let resume = last_id(&first);
    assert_eq!(resume.split('.').count(), 4, "a delta id: {resume}");

    // It reconnects with the last id it saw and reads to the end.
    let mut second = Vec::new();
    let mut events = open(&http, &url, Some(&resume)).await;
    read_to_end(&mut events, &mut second).await;

    let all: Vec<&Seen> = first.iter().chain(&second).collect();
    let deltas: Vec<&&Seen> = all.iter().filter(|e| e.name == "llm_delta").collect();
    assert!(
        second.iter().any(|e| e.name == "llm_delta"),
        "the reconnected client got the rest of the text"
    );
    assert!(deltas.len() > 5, "many batches: {}", deltas.len());
    assert!(all.iter().all(|e| e.name != "llm_retry"));
    // Every batch exactly once, in order, without a gap.
    let positions: Vec<(u64, u64, u64)> = deltas.iter().map(|e| position(e)).collect();
    let expected: Vec<(u64, u64, u64)> = (0..positions.len() as u64).map(|i| (1, 1, i)).collect();
    assert_eq!(positions, expected);
    let text: String = deltas
        .iter()
        .map(|e| e.data["text"].as_str().expect("text"))
        .collect();
    // Persisted in batches, not a token at a time: a word comes every 10 ms
    // and a batch is written 50 ms after its first piece (`FLUSH_AFTER`),
    // so about 5 words a batch (measured: 200 words in 40 batches; one
    // write per token would be 200 in 200). Each event is one stored batch
    // (its id holds the batch's index, checked above).
    let words = text.split_whitespace().count();
    assert!(
        words >= 3 * deltas.len(),
        "{words} words in {} batches: not batched",
        deltas.len()
    );
    let message = final_message(&second);
    // The deltas are the message's text from its start, without a gap; the
    // last batches may only reach a client inside `llm_completed` (the
    // commit that journals the step deletes its deltas, possibly before a
    // follower read them).
    assert!(
        message.starts_with(&text) && text.len() > message.len() / 2,
        "deltas {text:?} are not a beginning of the message {message:?}"
    );
    assert!(message.starts_with("w1 w2 ") && message.ends_with(" w200"));
    // Journal events and deltas keep the journal's order: the text comes
    // after the submit and before the answer.
    let names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names.first(), Some(&"run_submitted"));
    let answer = names
        .iter()
        .position(|n| *n == "llm_completed")
        .expect("answer");
    assert!(names[..answer].iter().skip(1).all(|n| *n == "llm_delta"));
    assert_eq!(&names[answer..], ["llm_completed", "run_completed"]);

    // Read again from the start, the stream holds only the journal: the
    // deltas were compacted into the final message.
    let mut history = Vec::new();
    let mut events = open(&http, &url, None).await;
    read_to_end(&mut events, &mut history).await;
    let names: Vec<&str> = history.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["run_submitted", "llm_completed", "run_completed"]);
    assert_eq!(final_message(&history), message);

    // A malformed Last-Event-ID is refused, naming the format.
    let r = http
        .get(&url)
        .header("last-event-id", "3.1.x")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);
    let body = r.text().await.expect("body");
    assert!(body.contains("<seq>.<step>.<attempt>.<idx>"), "{body}");

    server.kill();
    assert_eq!(deltas_left(&dir, &id).await, 0, "no delta rows remain");
}

#[tokio::test]
async fn a_crash_mid_stream_makes_the_client_discard_the_partial_text() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // About 4 s of streaming: the restarted server's attempt is still
    // streaming when the client is back.
    register(
        &http,
        &server,
        &streaming_agent("talker", &mock, "long:200:20"),
    )
    .await;
    let id = submit(&http, &server, "talker", "talk").await;
    let path = format!("/v1/runs/{id}/events");

    let mut before = Vec::new();
    let mut events = open(&http, &server.url(&path), None).await;
    read_deltas(&mut events, 3, &mut before).await;
    server.kill();
    // The connection dies with the server.
    read_to_end(&mut events, &mut before).await;
    let resume = last_id(&before);

    let server = Server::start(&dir.db(), &[]).await;
    let mut after = Vec::new();
    let mut events = open(&http, &server.url(&path), Some(&resume)).await;
    read_to_end(&mut events, &mut after).await;

    // The text of attempt 1 is declared void, then attempt 2 streams whole.
    let retry = after
        .iter()
        .position(|e| e.name == "llm_retry")
        .unwrap_or_else(|| panic!("an llm_retry: {after:?}"));
    assert_eq!(after[retry].data["step"], 1);
    assert_eq!(after[retry].data["attempt"], 2);
    let earlier: Vec<&Seen> = before
        .iter()
        .chain(&after[..retry])
        .filter(|e| e.name == "llm_delta")
        .collect();
    assert!(earlier.len() >= 3);
    assert!(earlier.iter().all(|e| position(e).1 == 1));
    let retried: Vec<&Seen> = after[retry..]
        .iter()
        .filter(|e| e.name == "llm_delta")
        .collect();
    let positions: Vec<(u64, u64, u64)> = retried.iter().map(|e| position(e)).collect();
    let expected: Vec<(u64, u64, u64)> = (0..positions.len() as u64).map(|i| (1, 2, i)).collect();
    assert_eq!(positions, expected);
    let text: String = retried
        .iter()
        .map(|e| e.data["text"].as_str().expect("text"))
        .collect();
    let message = final_message(&after);
    // As above: the new attempt's deltas are the message from its start.
    assert!(
        !text.is_empty() && message.starts_with(&text),
        "deltas {text:?} are not a beginning of the message {message:?}"
    );
    assert!(message.ends_with(" w200"));
    assert_eq!(after.last().map(|e| e.name.as_str()), Some("run_completed"));
    drop(server);
    assert_eq!(deltas_left(&dir, &id).await, 0, "no delta rows remain");
}

/// An agent streaming the mock's `plan:2:MS` model (text, then two calls of
/// its `echo` tool built piece by piece) over `provider`'s wire protocol.
fn planning_agent(name: &str, mock: &Mock, provider: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
model:
  provider: {provider}
  model: "plan:2:15"
  base_url: "{llm}"
  timeout: 30s
  stream: true
system: You are a test agent.
tools:
  - name: echo
    description: A test tool.
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    http: {{url: "{tool}", method: POST}}
"#,
        llm = mock.llm_url(),
        tool = mock.tool_url("echo"),
    )
}

/// A tool call as a client rebuilds it from `llm_delta` events.
#[derive(Debug, Default, PartialEq)]
struct Built {
    id: Option<String>,
    name: Option<String>,
    arguments: String,
}

/// Rebuilds step `step`'s text and tool calls (by index) from the
/// `llm_delta` events among `events`, checking that a call's id and name
/// come once, in its first piece, and never after its arguments began.
fn rebuild(events: &[&Seen], step: u64) -> (String, Vec<Built>, usize) {
    let mut text = String::new();
    let mut calls: Vec<Built> = Vec::new();
    let mut with_calls = 0;
    for event in events.iter().filter(|e| e.name == "llm_delta") {
        if position(event).0 != step {
            continue;
        }
        text.push_str(event.data["text"].as_str().expect("text"));
        let Some(pieces) = event.data["tool_calls"].as_array() else {
            continue;
        };
        with_calls += 1;
        for piece in pieces {
            let index = piece["index"].as_u64().expect("index") as usize;
            if calls.len() <= index {
                calls.resize_with(index + 1, Built::default);
            }
            let call = &mut calls[index];
            if let Some(name) = piece["name"].as_str() {
                assert!(
                    call.name.is_none() && call.arguments.is_empty(),
                    "call {index} started twice or late: {piece}"
                );
                call.name = Some(name.to_string());
                call.id = piece["id"].as_str().map(str::to_string);
            }
            assert!(
                call.name.is_some(),
                "arguments before the call started: {piece}"
            );
            call.arguments
                .push_str(piece["arguments"].as_str().expect("arguments"));
        }
    }
    (text, calls, with_calls)
}

/// Tool calls stream as they are built, on both wire protocols: the call's
/// id and name when it starts, then its argument fragments in order, per
/// call; a client that reconnects with the last id misses no piece, and the
/// pieces are compacted into the journaled answer.
#[tokio::test]
async fn tool_calls_stream_as_they_are_built_and_resume_after_a_reconnect() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    for provider in ["openai", "anthropic"] {
        let agent = format!("planner-{provider}");
        register(&http, &server, &planning_agent(&agent, &mock, provider)).await;
        let id = submit(&http, &server, &agent, "plan").await;
        let url = server.url(&format!("/v1/runs/{id}/events"));

        // A few deltas, a dropped connection, a reconnect with the last id.
        let mut first = Vec::new();
        let mut events = open(&http, &url, None).await;
        read_deltas(&mut events, 4, &mut first).await;
        drop(events);
        let resume = last_id(&first);
        let mut second = Vec::new();
        let mut events = open(&http, &url, Some(&resume)).await;
        read_to_end(&mut events, &mut second).await;
        let all: Vec<&Seen> = first.iter().chain(&second).collect();

        // Every batch of each step once, in order, without a gap.
        for step in [1, 2] {
            let positions: Vec<(u64, u64, u64)> = all
                .iter()
                .filter(|e| e.name == "llm_delta")
                .map(|e| position(e))
                .filter(|p| p.0 == step)
                .collect();
            let expected: Vec<(u64, u64, u64)> =
                (0..positions.len() as u64).map(|i| (step, 1, i)).collect();
            assert_eq!(positions, expected, "{provider} step {step}");
        }
        let (text, calls, with_calls) = rebuild(&all, 1);
        let answer = all
            .iter()
            .find(|e| e.name == "llm_completed" && e.data["event"]["step"] == 1)
            .unwrap_or_else(|| panic!("{provider}: no llm_completed of step 1"));
        let message = &answer.data["event"]["message"];
        let journaled = message["tool_calls"].as_array().expect("tool calls");
        assert_eq!(journaled.len(), 2, "{provider}: {message}");
        // The pieces are the answer from its start, without a gap (the
        // last batches may reach a client only inside llm_completed).
        let content = message["content"].as_str().unwrap_or("");
        assert!(
            content.starts_with(&text),
            "{provider}: {text:?} / {content:?}"
        );
        assert!(
            with_calls >= 3,
            "{provider}: the calls came in {with_calls} batches"
        );
        assert!(
            !calls.is_empty() && calls.len() <= 2,
            "{provider}: {calls:?}"
        );
        for (call, whole) in calls.iter().zip(journaled) {
            assert_eq!(call.id.as_deref(), whole["id"].as_str(), "{provider}");
            assert_eq!(call.name.as_deref(), Some("echo"), "{provider}");
            let arguments = whole["arguments"].as_str().expect("arguments");
            assert!(
                arguments.starts_with(&call.arguments),
                "{provider}: {:?} is not a beginning of {arguments:?}",
                call.arguments
            );
        }
        // The first call is whole before the second starts: its arguments
        // arrived in full, in order.
        if calls.len() == 2 {
            assert_eq!(
                calls[0].arguments,
                journaled[0]["arguments"].as_str().unwrap_or("")
            );
        }
        // The deltas of step 1 come before its answer, those of step 2 after.
        let names: Vec<(&str, Option<u64>)> = all
            .iter()
            .map(|e| {
                let step = (e.name == "llm_delta").then(|| position(e).0);
                (e.name.as_str(), step)
            })
            .collect();
        let answered = names
            .iter()
            .position(|n| n.0 == "llm_completed")
            .expect("an answer");
        assert!(names[..answered].iter().all(|n| n.1 != Some(2)));
        assert!(names[answered..].iter().all(|n| n.1 != Some(1)));
        assert_eq!(
            second.last().map(|e| e.name.as_str()),
            Some("run_completed")
        );

        // From the start again: only the journal, the pieces compacted.
        let mut history = Vec::new();
        let mut events = open(&http, &url, None).await;
        read_to_end(&mut events, &mut history).await;
        assert!(history.iter().all(|e| e.name != "llm_delta"), "{provider}");
    }
    server.kill();
}

/// Two `keel serve` processes on one PostgreSQL database: the worker
/// process streams the answers, a client of the API process (which runs no
/// step) gets their deltas live, in order, and a reconnect with
/// `Last-Event-ID` misses nothing.
#[tokio::test]
async fn deltas_reach_a_client_of_another_process_on_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    let _worker = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "worker"]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &api,
        &streaming_agent("talker", &mock, "long:150:10"),
    )
    .await;
    register(&http, &api, &planning_agent("planner", &mock, "openai")).await;

    for agent in ["talker", "planner"] {
        let id = submit(&http, &api, agent, "go").await;
        let url = api.url(&format!("/v1/runs/{id}/events"));
        let mut first = Vec::new();
        let mut events = open(&http, &url, None).await;
        read_deltas(&mut events, 4, &mut first).await;
        drop(events);
        // Live: the deltas came while the step was still streaming.
        assert!(
            first.iter().all(|e| e.name != "llm_completed"),
            "{agent}: {first:?}"
        );
        let resume = last_id(&first);
        let mut second = Vec::new();
        let mut events = open(&http, &url, Some(&resume)).await;
        read_to_end(&mut events, &mut second).await;
        let all: Vec<&Seen> = first.iter().chain(&second).collect();

        let deltas: Vec<(u64, u64, u64)> = all
            .iter()
            .filter(|e| e.name == "llm_delta")
            .map(|e| position(e))
            .filter(|p| p.0 == 1)
            .collect();
        let expected: Vec<(u64, u64, u64)> = (0..deltas.len() as u64).map(|i| (1, 1, i)).collect();
        assert_eq!(deltas, expected, "{agent}: every batch once, in order");
        assert!(deltas.len() > 4, "{agent}: {} batches", deltas.len());
        let (text, calls, _) = rebuild(&all, 1);
        let answer = all
            .iter()
            .find(|e| e.name == "llm_completed")
            .expect("an answer");
        let message = &answer.data["event"]["message"];
        let content = message["content"].as_str().unwrap_or("");
        assert!(
            content.starts_with(&text),
            "{agent}: {text:?} / {content:?}"
        );
        if agent == "talker" {
            assert!(text.len() > content.len() / 2, "{agent}: {text:?}");
        } else {
            assert!(!calls.is_empty(), "{agent}: no tool call streamed");
            let whole = message["tool_calls"][0]["arguments"].as_str().unwrap_or("");
            assert!(whole.starts_with(&calls[0].arguments), "{agent}");
        }
        assert_eq!(
            second.last().map(|e| e.name.as_str()),
            Some("run_completed")
        );
    }
}
