//! Sagas: a failed or cancelled run undoes its compensable calls, last
//! first, durably (SIGKILL during a compensation, and exactly between two).

use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

/// A trip booking: flight, hotel, then a car whose tool always fails; the
/// model keeps trying until `limits.max_steps` fails the run. The flight
/// is cancelled by `cancel_flight` (the mock's `hang`: the first call with
/// a key never answers), the hotel by `cancel_hotel` (`echo`).
fn trip(mock: &Mock, name: &str, script: &str, max_steps: u32) -> String {
    format!(
        r#"
name: {name}
version: 1
model:
  provider: scripted
  model: s
  script:
{script}
limits: {{max_steps: {max_steps}}}
tools:
  - name: book_flight
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
    compensate:
      tool: cancel_flight
      arguments: {{booking: "{{{{result.echo.ref}}}}", why: "undo {{{{call.arguments.ref}}}}"}}
  - name: book_hotel
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
    compensate:
      tool: cancel_hotel
      arguments: {{booking: "{{{{result.echo.ref}}}}"}}
  - name: book_car
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{fail}", method: POST, retry: {{max_attempts: 2, backoff: {{initial: 10ms, max: 20ms}}}}}}
    idempotent: true
    compensate: {{tool: cancel_hotel, arguments: {{booking: "{{{{result.echo.ref}}}}"}}}}
  - name: book_spa
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
    compensate: {{tool: cancel_hotel, arguments: {{booking: "{{{{result.receipt}}}}"}}}}
  - name: pay
    parameters: {{type: object}}
    http: {{url: "{echo}", method: POST}}
    requires_approval: true
  - name: cancel_flight
    parameters: {{type: object, properties: {{booking: {{type: string}}, why: {{type: string}}}}, required: [booking]}}
    http: {{url: "{hang}", method: POST, timeout: 60s}}
  - name: cancel_hotel
    parameters: {{type: object, properties: {{booking: {{type: string}}}}, required: [booking]}}
    http: {{url: "{echo}", method: POST}}
"#,
        echo = mock.tool_url("echo"),
        fail = mock.tool_url("fail"),
        hang = mock.tool_url("hang"),
    )
}

const BOOKING: &str = r#"    - tool_calls: [{name: book_flight, arguments: {ref: F1}}]
    - tool_calls: [{name: book_hotel, arguments: {ref: H1}}]
    - tool_calls: [{name: book_car, arguments: {ref: C1}}]
    - tool_calls: [{name: book_car, arguments: {ref: C1}}]"#;

/// The saga's part of a journal: each event's type and compensation index,
/// from `run_compensating` on.
fn saga_events(events: &[Value]) -> Vec<(String, Option<u64>)> {
    events
        .iter()
        .skip_while(|e| e["type"] != "run_compensating")
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["index"].as_u64(),
            )
        })
        .collect()
}

/// The run's journal events (their JSON), in order.
async fn journal(http: &reqwest::Client, server: &Server, id: &str) -> Vec<Value> {
    sse(http, &server.url(&format!("/v1/runs/{id}/events")), None)
        .await
        .into_iter()
        .map(|(_, _, data)| data["event"].clone())
        .collect()
}

#[tokio::test]
async fn a_failed_booking_is_compensated_in_reverse_order_once_each_across_a_sigkill() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(&http, &server, &trip(&mock, "trip", BOOKING, 4)).await;
    let id = submit(&http, &server, "trip", "book my trip").await;
    let count = |key: String| mock.counters.key_counts().get(&key).copied().unwrap_or(0);

    // The hotel is undone first; the flight's compensation hangs: the
    // worker is killed between the two (the second started, no outcome).
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(format!("{id}:compensate:1:0")) == 0 {
        assert!(
            Instant::now() < deadline,
            "the flight's compensation never started: {}",
            get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "COMPENSATING", "{run}");
    assert_eq!(run["compensation"]["status"], "running");
    assert_eq!(
        run["compensation"]["compensations"][0]["status"],
        "completed"
    );
    assert_eq!(run["compensation"]["compensations"][1]["status"], "started");
    server.kill();

    let server = Server::start(&dir.db(), &[]).await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED", "{run}");
    assert_eq!(run["error_code"], "max_steps");
    let saga = &run["compensation"];
    assert_eq!(saga["status"], "done");
    assert_eq!(saga["outcome"], "FAILED");
    assert_eq!(
        (saga["completed"].as_u64(), saga["failed"].as_u64()),
        (Some(2), Some(0))
    );
    let undone = saga["compensations"].as_array().expect("compensations");
    assert_eq!(
        undone.len(),
        2,
        "the failed car booking has nothing to undo: {saga}"
    );
    assert_eq!(undone[0]["call_tool"], "book_hotel");
    assert_eq!(undone[0]["tool"], "cancel_hotel");
    assert_eq!(undone[0]["arguments"], json!({"booking": "H1"}));
    assert_eq!(undone[0]["attempts"], 1);
    assert_eq!(undone[1]["call_tool"], "book_flight");
    assert_eq!(
        undone[1]["arguments"],
        json!({"booking": "F1", "why": "undo F1"})
    );
    assert_eq!(undone[1]["attempts"], 2, "repeated after the kill");
    assert!(
        undone[1]["result"]
            .as_str()
            .unwrap_or("")
            .contains("repeated"),
        "{saga}"
    );

    // Exactly once each in effect: the hotel's compensation was made once,
    // the flight's twice with the same key (the only key ever repeated);
    // the bookings themselves once each.
    assert_eq!(count(format!("{id}:compensate:2:0")), 1);
    assert_eq!(count(format!("{id}:compensate:1:0")), 2);
    assert_eq!(count(format!("{id}:1:0")), 1);
    assert_eq!(count(format!("{id}:2:0")), 1);
    assert_eq!(count(format!("{id}:3:0")), 2, "the car's tool retried once");

    // The journal: compensating, then each compensation started before its
    // outcome, hotel before flight, then the outcome and the run's end.
    let events = journal(&http, &server, &id).await;
    let expected: Vec<(String, Option<u64>)> = [
        ("run_compensating", None),
        ("compensation_started", Some(0)),
        ("compensation_completed", Some(0)),
        ("compensation_started", Some(1)),
        ("compensation_started", Some(1)),
        ("compensation_completed", Some(1)),
        ("run_compensated", None),
        ("run_failed", None),
    ]
    .into_iter()
    .map(|(t, i)| (t.to_string(), i))
    .collect();
    assert_eq!(saga_events(&events), expected);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "compensation_started")
        .collect();
    assert_eq!(
        starts[1]["idempotency_key"], starts[2]["idempotency_key"],
        "a repeat carries the same key"
    );
    assert_eq!(starts[2]["attempt"], 2);
    let compensated = &events[events.len() - 2];
    assert_eq!(compensated["completed"], 2);
    assert_eq!(compensated["failed"], 0);
}

#[tokio::test]
async fn a_sigkill_between_two_compensations_makes_each_exactly_once() {
    use std::os::unix::process::ExitStatusExt;

    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    // The server SIGKILLs itself right after the first compensation's
    // outcome is committed: the second is queued, not started.
    let mut server =
        Server::start_with_env(&dir.db(), &[], &[("KEEL_FAILPOINTS", "compensation_done")]).await;
    let http = reqwest::Client::new();
    let yaml =
        trip(&mock, "trip", BOOKING, 4).replace(&mock.tool_url("hang"), &mock.tool_url("echo"));
    register(&http, &server, &yaml).await;
    let id = submit(&http, &server, "trip", "book my trip").await;
    let status = server.exited(Duration::from_secs(60)).await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let count = |key: String| mock.counters.key_counts().get(&key).copied().unwrap_or(0);
    assert_eq!(count(format!("{id}:compensate:2:0")), 1, "the hotel undone");
    assert_eq!(
        count(format!("{id}:compensate:1:0")),
        0,
        "the flight not yet"
    );

    let server = Server::start(&dir.db(), &[]).await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED", "{run}");
    let saga = &run["compensation"];
    assert_eq!(
        (saga["completed"].as_u64(), saga["failed"].as_u64()),
        (Some(2), Some(0)),
        "{saga}"
    );
    let undone = saga["compensations"].as_array().expect("compensations");
    assert_eq!(undone[0]["call_tool"], "book_hotel");
    assert_eq!(undone[0]["attempts"], 1, "not repeated: {saga}");
    assert_eq!(undone[1]["call_tool"], "book_flight");
    assert_eq!(
        undone[1]["attempts"], 1,
        "made once, after the restart: {saga}"
    );
    assert_eq!(count(format!("{id}:compensate:2:0")), 1);
    assert_eq!(count(format!("{id}:compensate:1:0")), 1);

    let events = journal(&http, &server, &id).await;
    let expected: Vec<(String, Option<u64>)> = [
        ("run_compensating", None),
        ("compensation_started", Some(0)),
        ("compensation_completed", Some(0)),
        ("compensation_started", Some(1)),
        ("compensation_completed", Some(1)),
        ("run_compensated", None),
        ("run_failed", None),
    ]
    .into_iter()
    .map(|(t, i)| (t.to_string(), i))
    .collect();
    assert_eq!(saga_events(&events), expected);
}

#[tokio::test]
async fn a_cancel_compensates_and_a_failed_compensation_does_not_stop_the_others() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // A hotel, a spa (whose compensation template needs a `receipt` its
    // result lacks), then a payment that waits for a human: the run is
    // cancelled while it waits.
    let script = r#"    - tool_calls: [{name: book_hotel, arguments: {ref: H1}}]
    - tool_calls: [{name: book_spa, arguments: {ref: S1}}]
    - tool_calls: [{name: pay, arguments: {amount: 5}}]"#;
    register(&http, &server, &trip(&mock, "parked-trip", script, 5)).await;
    let id = submit(&http, &server, "parked-trip", "book").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
        if run["status"] == "AWAITING_APPROVAL" {
            break;
        }
        assert!(Instant::now() < deadline, "never parked: {run}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http
        .post(server.url(&format!("/v1/runs/{id}/cancel")))
        .json(&json!({"reason": "trip called off"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "CANCELLED", "{run}");
    assert_eq!(run["error"], "cancelled: trip called off");
    let saga = &run["compensation"];
    assert_eq!(saga["outcome"], "CANCELLED");
    assert_eq!(
        (saga["completed"].as_u64(), saga["failed"].as_u64()),
        (Some(1), Some(1)),
        "{saga}"
    );
    let undone = saga["compensations"].as_array().expect("compensations");
    // Last call first: the spa's fails without a call, the hotel's still runs.
    assert_eq!(undone[0]["call_tool"], "book_spa");
    assert_eq!(undone[0]["status"], "failed");
    assert_eq!(undone[0]["attempts"], 0);
    assert!(
        undone[0]["result"]
            .as_str()
            .unwrap_or("")
            .contains("has no `receipt`"),
        "{saga}"
    );
    assert_eq!(undone[1]["call_tool"], "book_hotel");
    assert_eq!(undone[1]["status"], "completed");
    let count = |key: String| mock.counters.key_counts().get(&key).copied().unwrap_or(0);
    assert_eq!(count(format!("{id}:compensate:2:0")), 0);
    assert_eq!(count(format!("{id}:compensate:1:0")), 1);
    // The payment was never made.
    assert_eq!(count(format!("{id}:3:0")), 0);
    let events = journal(&http, &server, &id).await;
    let kinds: Vec<&str> = events
        .iter()
        .rev()
        .take(2)
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["run_cancelled", "run_compensated"]);

    // A cancel of a finished run is refused as before.
    let r = http
        .post(server.url(&format!("/v1/runs/{id}/cancel")))
        .json(&json!({}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 409);
}
