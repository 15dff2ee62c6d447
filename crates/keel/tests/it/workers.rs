//! External workers and callbacks: a `worker:` tool's call is leased over
//! HTTP; a worker that dies loses its lease and another one (the Python
//! example, run for real) makes the call; the run's callback_url gets its
//! parks and its result, signed, retried while the receiver is down.

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::{Hook, Mock};
use serde_json::{Value, json};

use crate::support::*;

const SECRET: &str = "cb-s3cret";

/// The external workers' agent, with quick LLM retries.
fn ext_agent(mock: &Mock) -> String {
    worker_agent(
        "ext",
        mock,
        "retry: {max_attempts: 3, backoff: {initial: 100ms, max: 1s}}",
    )
}

async fn submit_with_callback(
    http: &reqwest::Client,
    server: &Server,
    agent: &str,
    hook: &str,
) -> String {
    let body = json!({"agent": agent, "input": "go", "callback_url": hook});
    submit_to(http, server.url("/v1/runs"), &body).await
}

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.expect("post");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Waits for the callback of `kind` POSTed to `name`, checks its signature.
async fn callback(mock: &Mock, name: &str, kind: &str) -> (Hook, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hooks = mock.counters.hooks();
        if let Some(hook) = hooks
            .iter()
            .find(|h| h.name == name && h.event.as_deref() == Some(kind))
        {
            let body: Value = serde_json::from_str(&hook.body).expect("callback json");
            let signature = hook.signature.clone().expect("signed");
            let t: i64 = signature
                .strip_prefix("t=")
                .and_then(|rest| rest.split(',').next())
                .and_then(|t| t.parse().ok())
                .expect("timestamp");
            assert_eq!(
                signature,
                keel_engine::webhook::signature(SECRET.as_bytes(), t, hook.body.as_bytes())
            );
            return (hook.clone(), body);
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} callback to {name}: {hooks:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_dead_workers_call_is_rerun_by_the_python_example_and_the_result_called_back() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--webhook-secret", SECRET]).await;
    let http = reqwest::Client::new();
    register(&http, &server, &ext_agent(&mock)).await;
    let id = submit_with_callback(&http, &server, "ext", &mock.hook_url("done")).await;

    // Nothing to lease on another queue.
    let lease = server.url("/v1/worker/tasks/lease");
    let (status, _) = post(&http, &lease, json!({"queue": "videos", "wait": "200ms"})).await;
    assert_eq!(status, 204);
    // Worker A leases the call for 1 s, heartbeats once, then dies.
    let (status, task) = post(
        &http,
        &lease,
        json!({"queue": "images", "worker": "a", "wait": "10s", "lease": "1s"}),
    )
    .await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["run_id"], id.as_str());
    assert_eq!(task["tool"], "resize");
    assert_eq!(task["arguments"], json!({"n": 1}));
    assert_eq!(task["idempotency_key"], format!("{id}:1:0").as_str());
    assert_eq!(task["attempt"], 1);
    assert!(
        task["traceparent"]
            .as_str()
            .is_some_and(|t| t.starts_with("00-"))
    );
    let base = server.url(&format!(
        "/v1/worker/tasks/{}",
        task["task_id"].as_str().unwrap_or("")
    ));
    let token = task["lease_token"].clone();
    let (status, body) = post(
        &http,
        &format!("{base}/heartbeat"),
        json!({"lease_token": token, "lease": "1s"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = post(
        &http,
        &format!("{base}/heartbeat"),
        json!({"lease_token": "1"}),
    )
    .await;
    assert_eq!(status, 409, "a wrong token is refused");
    // The engine never takes the call itself: the run waits for a worker.
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "AWAITING_TOOL", "{run}");

    // The Python example, run as documented, gets the call once A's lease expired.
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workers/python_worker.py"
    );
    let out = Command::new("python3")
        .args([script, &server.url, "images", "--once"])
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python worker: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A comes back: its token is stale.
    let (status, body) = post(
        &http,
        &format!("{base}/complete"),
        json!({"lease_token": token, "output": "late"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");

    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let text = run.to_string();
    assert!(
        text.contains("python"),
        "the python worker's result reached the model: {run}"
    );
    assert!(!text.contains("late"), "{run}");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 0);

    // The result is called back, signed.
    let (_, body) = callback(&mock, "done", "run.completed").await;
    assert_eq!(body["run_id"], id.as_str());
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(body["output"], run["output"]);
}

#[tokio::test]
async fn parks_and_results_are_called_back_and_retried_while_the_receiver_is_down() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--webhook-secret", SECRET]).await;
    let http = reqwest::Client::new();
    let yaml = agent_yaml(
        "gated",
        &mock,
        "tools:1",
        "echo",
        "    requires_approval: true\n",
    );
    register(&http, &server, &yaml).await;

    mock.counters.hooks_down.store(true, Ordering::Relaxed);
    let id = submit_with_callback(&http, &server, "gated", &mock.hook_url("cb")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while mock.counters.hooks_refused.load(Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the callback was not retried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mock.counters.hooks_down.store(false, Ordering::Relaxed);
    let (parked, body) = callback(&mock, "cb", "run.awaiting_approval").await;
    assert_eq!(body["run_id"], id.as_str());
    assert_eq!(body["status"], "AWAITING_APPROVAL");
    assert_eq!(body["approvals"][0]["id"], "1.0.1");
    assert_eq!(body["approvals"][0]["tool"], "echo");

    // A cancel (an API-side append) is called back too, as another delivery.
    let (status, body) = post(
        &http,
        &server.url(&format!("/v1/runs/{id}/cancel")),
        json!({"reason": "enough"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (cancelled, body) = callback(&mock, "cb", "run.cancelled").await;
    assert_eq!(body["status"], "CANCELLED");
    assert_eq!(body["error"], "cancelled: enough");
    assert_ne!(parked.delivery, cancelled.delivery);

    // A bad callback_url is refused, naming the field.
    let (status, body) = post(
        &http,
        &server.url("/v1/runs"),
        json!({"agent": "gated", "input": "go", "callback_url": "ftp://x"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.to_string().contains("callback_url"), "{body}");
}

#[tokio::test]
async fn the_run_timeout_ends_a_run_whose_call_no_worker_finishes() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // Long enough for the worker below to lease a call on a loaded machine.
    let yaml = format!("{}limits: {{timeout: 3s}}\n", ext_agent(&mock));
    register(&http, &server, &yaml).await;
    let submitted = Instant::now();
    let ids = [
        submit(&http, &server, "ext", "go").await,
        submit(&http, &server, "ext", "go").await,
    ];

    // One call is leased by a worker that then hangs; nobody leases the other.
    let lease = server.url("/v1/worker/tasks/lease");
    let (status, task) = post(
        &http,
        &lease,
        json!({"queue": "images", "worker": "slow", "wait": "10s", "lease": "60s"}),
    )
    .await;
    assert_eq!(status, 200, "{task}");
    let leased_run = task["run_id"].as_str().expect("run id").to_string();
    assert!(ids.contains(&leased_run), "{task}");

    // Both fail with `timeout` shortly after their 3 s deadline, whether the
    // call was leased or not.
    for id in &ids {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "FAILED", "{run}");
        assert_eq!(run["error_code"], "timeout", "{run}");
        assert!(
            run["error"]
                .as_str()
                .unwrap_or("")
                .contains("limits.timeout"),
            "{run}"
        );
    }
    let took = submitted.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "ended before the deadline: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the timeout took {took:?} to apply"
    );

    // The unleased call left its queue with its run: nothing to lease.
    let (status, body) = post(&http, &lease, json!({"queue": "images", "wait": "1s"})).await;
    assert_eq!(status, 204, "{body}");
    // The hanging worker's late result is refused, saying why.
    let (status, body) = post(
        &http,
        &server.url(&format!(
            "/v1/worker/tasks/{}/complete",
            task["task_id"].as_str().unwrap_or("")
        )),
        json!({"lease_token": task["lease_token"], "output": "too late"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("timed out"), "{body}");
    let run = get_json(&http, &server.url(&format!("/v1/runs/{leased_run}"))).await;
    assert!(!run.to_string().contains("too late"), "{run}");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 0);
}

/// Leases the next `images` call (waiting up to 10 s): the task.
async fn lease_image(http: &reqwest::Client, server: &Server, worker: &str) -> Value {
    let (status, task) = post(
        http,
        &server.url("/v1/worker/tasks/lease"),
        json!({"queue": "images", "worker": worker, "wait": "10s", "lease": "30s"}),
    )
    .await;
    assert_eq!(status, 200, "{task}");
    task
}

/// Reports `task` failed: the endpoint's status and answer.
async fn fail_task(
    http: &reqwest::Client,
    server: &Server,
    task: &Value,
    error: &str,
    retryable: bool,
) -> (u16, Value) {
    let url = server.url(&format!(
        "/v1/worker/tasks/{}/fail",
        task["task_id"].as_str().unwrap_or("")
    ));
    post(
        http,
        &url,
        json!({"lease_token": task["lease_token"], "error": error, "retryable": retryable}),
    )
    .await
}

/// The run's one external call ended with `error` as its result (an
/// error), and the model's answer read it.
fn returned_to_the_model(run: &Value, error: &str) {
    let call = &run["steps"][0]["tool_calls"][0];
    assert_eq!(call["result"], error, "{run}");
    assert_eq!(call["is_error"], true, "{run}");
    let answer = run["output"].as_str().unwrap_or_default();
    assert!(
        answer.starts_with("done after 1 tool calls") && answer.ends_with(error),
        "{run}"
    );
}

/// Epoch milliseconds now (the server runs on this machine's clock).
fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[tokio::test]
async fn a_failed_external_call_is_retried_then_its_error_goes_back_to_the_model() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // Three attempts, retried after 100 ms to 1 s.
    register(&http, &server, &ext_agent(&mock)).await;
    let id = submit(&http, &server, "ext", "go").await;

    // Attempts 1 and 2 fail retryably: the call is queued again, after the
    // agent's backoff, and leased again with its attempt counted.
    let mut task = lease_image(&http, &server, "a").await;
    assert_eq!(
        (task["run_id"].as_str(), task["attempt"].as_i64()),
        (Some(id.as_str()), Some(1))
    );
    assert_eq!(task["max_attempts"], 3, "{task}");
    let task_id = task["task_id"].clone();
    for attempt in 1..=2 {
        let failed_at = epoch_ms();
        let (status, body) = fail_task(&http, &server, &task, "disk busy", true).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "retrying", "{body}");
        let retry_at = body["retry_at"].as_i64().expect("retry_at");
        assert!(retry_at >= failed_at, "{retry_at} < {failed_at}");
        let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
        assert_eq!(run["status"], "AWAITING_TOOL", "{run}");
        // The failed attempt's lease is gone: its token is refused.
        let (status, _) = fail_task(&http, &server, &task, "again", true).await;
        assert_eq!(status, 409, "a stale lease cannot fail the call twice");

        let next = lease_image(&http, &server, "b").await;
        assert!(
            epoch_ms() >= retry_at,
            "leased again before the backoff ended at {retry_at}"
        );
        assert_eq!(next["task_id"], task_id, "the same call, retried");
        assert_eq!(next["attempt"], attempt + 1, "{next}");
        assert_ne!(next["lease_token"], task["lease_token"]);
        task = next;
    }
    // The last attempt fails too: no retry is left, so the error is the
    // call's result, the model reads it and the run goes on.
    let (status, body) = fail_task(&http, &server, &task, "disk full", true).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "returned", "{body}");
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    returned_to_the_model(&run, "error: disk full");

    // A failure that is not retryable goes back at once, on attempt 1.
    let id = submit(&http, &server, "ext", "again").await;
    let task = lease_image(&http, &server, "a").await;
    assert_eq!(
        (task["run_id"].as_str(), task["attempt"].as_i64()),
        (Some(id.as_str()), Some(1))
    );
    let (status, body) = fail_task(&http, &server, &task, "no such image", false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "returned", "{body}");
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    returned_to_the_model(&run, "error: no such image");
    // Nothing is left to lease, and no call reached a tool server.
    let (status, body) = post(
        &http,
        &server.url("/v1/worker/tasks/lease"),
        json!({"queue": "images", "wait": "200ms"}),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 0);
}

/// Two parks and ends nobody watches are called back, signed: a task
/// dead-lettered (`run.dead_lettered`, with the letter to re-drive) and a
/// run failed for its token budget (`run.failed`, code `budget_exceeded`).
#[tokio::test]
async fn a_dead_letter_and_a_budget_failure_are_called_back_signed() {
    let down = Mock::start().await.expect("down");
    let hooks = Mock::start().await.expect("hooks");
    down.counters.llm_down.store(true, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--webhook-secret", SECRET]).await;
    let http = reqwest::Client::new();
    let retry = "retry: {max_attempts: 2, backoff: {initial: 50ms, max: 100ms}}";
    register(
        &http,
        &server,
        &agent_yaml("sinking", &down, "tools:1", "echo", retry),
    )
    .await;
    // About 100 tokens a step: the second step goes over 150.
    register(
        &http,
        &server,
        &agent_yaml(
            "thrifty",
            &hooks,
            "tools:10",
            "echo",
            "limits: {max_steps: 20, max_tokens_total: 150}",
        ),
    )
    .await;
    let sinking = submit_with_callback(&http, &server, "sinking", &hooks.hook_url("dead")).await;
    let thrifty = submit_with_callback(&http, &server, "thrifty", &hooks.hook_url("budget")).await;

    // The model call's last attempt failed: the run waits in the DLQ and
    // its callback_url is told which letter to re-drive.
    let (dead_hook, body) = callback(&hooks, "dead", "run.dead_lettered").await;
    assert_eq!(body["type"], "run.dead_lettered", "{body}");
    assert_eq!(body["run_id"], sinking.as_str());
    assert_eq!(body["agent"], "sinking");
    assert_eq!(body["event"]["type"], "task_dead_lettered", "{body}");
    assert_eq!(body["event"]["kind"], "llm", "{body}");
    let dlq = get_json(&http, &server.url("/v1/dlq")).await;
    let letter = dlq["dead_letters"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["run_id"] == sinking.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("no dead letter of {sinking}: {dlq}"));
    assert_eq!(letter["attempts"], 2, "{letter}");
    let run = get_json(&http, &server.url(&format!("/v1/runs/{sinking}"))).await;
    assert_eq!(body["status"], run["status"], "{body} vs {run}");
    assert_eq!(
        body["seq"], run["last_seq"],
        "the park is the run's last event"
    );
    assert!(dead_hook.delivery.is_some(), "{dead_hook:?}");
    assert_eq!(down.counters.llm_requests.load(Ordering::Relaxed), 2);

    // The budget run fails at its limit, and says so with its code.
    let run = wait_terminal(&http, &server, &thrifty, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED", "{run}");
    assert_eq!(run["error_code"], "budget_exceeded", "{run}");
    let (budget_hook, body) = callback(&hooks, "budget", "run.failed").await;
    assert_eq!(body["run_id"], thrifty.as_str());
    assert_eq!(body["status"], "FAILED", "{body}");
    assert_eq!(body["code"], "budget_exceeded", "{body}");
    assert_eq!(body["error"], run["error"], "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("budget_exceeded: limits.max_tokens_total")),
        "{body}"
    );
    assert_eq!(body["usage"], run["usage"], "{body}");
    assert_ne!(budget_hook.delivery, dead_hook.delivery);
    // No other callback about either run (a delivery may come again,
    // with its Keel-Delivery id: at least once).
    let received = hooks.counters.hooks();
    let mut deliveries: Vec<&str> = received
        .iter()
        .filter_map(|h| h.delivery.as_deref())
        .collect();
    deliveries.sort_unstable();
    deliveries.dedup();
    assert_eq!(deliveries.len(), 2, "{received:?}");
}
