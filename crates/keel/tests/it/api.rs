//! End to end over real HTTP: a 5-step agent on a `keel serve` process.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn five_step_agent_over_http_with_sse_and_idempotent_submit() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("five", &mock, "tools:5", "echo", ""),
    )
    .await;

    // Submit twice with one Idempotency-Key: one run.
    let submit = || {
        http.post(server.url("/v1/runs"))
            .header("idempotency-key", "order-42")
            .json(&json!({"agent": "five", "input": {"order": 42}}))
            .send()
    };
    let first = submit().await.expect("submit");
    assert_eq!(first.status(), 202);
    let location = first
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let first: Value = first.json().await.expect("json");
    let id = first["id"].as_str().expect("id").to_string();
    assert_eq!(location.as_deref(), Some(format!("/v1/runs/{id}").as_str()));
    let again: Value = submit().await.expect("submit").json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["created"], false);
    // The same key with another request is a conflict, not a silent reuse.
    let other = http
        .post(server.url("/v1/runs"))
        .header("idempotency-key", "order-42")
        .json(&json!({"agent": "five", "input": "something else"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(other.status(), 409);

    // The SSE stream delivers every event in order, then ends after the terminal one.
    let events = sse(&http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
    let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
    for (seq, name, data) in &events {
        assert_eq!(data["seq"], *seq);
        assert_eq!(data["event"]["type"], name.as_str());
    }
    let names: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(names.first(), Some(&"run_submitted"));
    assert_eq!(names.last(), Some(&"run_completed"));
    // Retried after the run ended, the submit answers with the run as it is.
    let late = submit().await.expect("submit");
    assert_eq!(late.status(), 202);
    let late: Value = late.json().await.expect("json");
    assert_eq!(late["id"], first["id"]);
    assert_eq!(late["created"], false);
    assert_eq!(late["status"], "COMPLETED", "{late}");
    assert_eq!(first["status"], "PENDING");
    assert_eq!(names.iter().filter(|n| **n == "llm_completed").count(), 6);
    assert_eq!(
        names.iter().filter(|n| **n == "tool_call_started").count(),
        5
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "tool_call_completed")
            .count(),
        5
    );
    // Every tool start is journaled before its result.
    for step in 1..=5 {
        let started = events
            .iter()
            .position(|e| e.1 == "tool_call_started" && e.2["event"]["step"] == step);
        let done = events
            .iter()
            .position(|e| e.1 == "tool_call_completed" && e.2["event"]["step"] == step);
        assert!(started.is_some() && started < done, "step {step}");
    }

    // Resuming with Last-Event-ID sends exactly what follows.
    let resumed = sse(
        &http,
        &server.url(&format!("/v1/runs/{id}/events")),
        Some(3),
    )
    .await;
    assert_eq!(resumed.first().map(|e| e.0), Some(4));
    assert_eq!(resumed.len(), events.len() - 3);

    // The run view: status, steps, output, usage, and the tool calls with their keys.
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "COMPLETED");
    assert_eq!(run["step_count"], 6);
    assert!(
        run["output"]
            .as_str()
            .unwrap_or("")
            .contains("done after 5 tool calls"),
        "{run}"
    );
    assert!(run["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0);
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 6);
    let keys = mock.counters.key_counts();
    assert_eq!(keys.len(), 5);
    for (i, step) in steps.iter().take(5).enumerate() {
        let call = &step["tool_calls"][0];
        let key = format!("{id}:{}:0", i + 1);
        assert_eq!(call["idempotency_key"], key.as_str());
        assert_eq!(call["attempts"], 1);
        assert_eq!(keys.get(&key), Some(&1), "tool server saw {key} once");
        assert!(call["result"].as_str().unwrap_or("").contains("echo"));
    }
    assert_eq!(mock.counters.bad_traceparents.load(Ordering::Relaxed), 0);

    // Listing and filtering.
    let list = get_json(&http, &server.url("/v1/runs?status=completed&agent=five")).await;
    assert_eq!(list["runs"].as_array().map(Vec::len), Some(1));
    let none = get_json(&http, &server.url("/v1/runs?status=FAILED")).await;
    assert_eq!(none["runs"].as_array().map(Vec::len), Some(0));

    // Cancelling a finished run is a conflict.
    let cancel = http
        .post(server.url(&format!("/v1/runs/{id}/cancel")))
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancel.status(), 409);
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_never_breaks_the_server() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();

    let post = |path: &'static str, body: Vec<u8>| {
        http.post(server.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let error = |v: &Value| v["error"]["message"].as_str().unwrap_or("").to_string();

    let r = post("/v1/runs", b"{not json".to_vec()).await.expect("post");
    assert_eq!(r.status(), 400);
    assert!(error(&r.json().await.expect("json")).contains("invalid JSON"));

    let r = post("/v1/runs", br#"{"agent": 7, "input": "x"}"#.to_vec())
        .await
        .expect("post");
    assert_eq!(r.status(), 400);
    assert!(error(&r.json().await.expect("json")).contains("agent"));

    let r = post("/v1/runs", br#"{"agent": "ghost", "input": "x"}"#.to_vec())
        .await
        .expect("post");
    assert_eq!(r.status(), 422);
    assert!(error(&r.json().await.expect("json")).contains("ghost"));

    // (Its own client: the server closes a connection whose body it refused.)
    let r = reqwest::Client::new()
        .post(server.url("/v1/runs"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 413);

    let r = http
        .get(server.url(&format!("/v1/runs/{}", uuid::Uuid::now_v7())))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let r = http
        .get(server.url("/v1/runs/not-a-uuid"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let r = http
        .get(server.url("/v1/runs/not-a-uuid/events"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 404);
    let r = http
        .post(server.url("/v1/dlq/nope/retry"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let r = http
        .get(server.url("/v1/runs?status=SLEEPY"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 400);

    // An invalid spec is refused with the field at fault.
    let bad = agent_yaml("bad", &mock, "tools:1", "echo", "limits: {max_steps: 0}")
        .replace("method: POST", "method: FETCH");
    let r = http
        .post(server.url("/v1/agents"))
        .body(bad)
        .send()
        .await
        .expect("post");
    let status = r.status();
    let body: Value = r.json().await.expect("json");
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["fields"][0]["field"]
            .as_str()
            .unwrap_or("")
            .contains("tools[0].http.method"),
        "{body}"
    );
    let spec = agent_yaml(
        "bad2",
        &mock,
        "tools:1",
        "echo",
        "limits: {max_steps: 0}\nretry: {max_attempts: 0}",
    );
    let r = http
        .post(server.url("/v1/agents"))
        .body(spec)
        .send()
        .await
        .expect("post");
    let body: Value = r.json().await.expect("json");
    let fields: Vec<&str> = body["error"]["fields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["field"].as_str())
        .collect();
    assert!(
        fields.contains(&"limits.max_steps") && fields.contains(&"retry.max_attempts"),
        "{body}"
    );

    // Versions: same content is idempotent, other content under the same version conflicts.
    let spec = agent_yaml("v", &mock, "tools:1", "echo", "");
    let r = http
        .post(server.url("/v1/agents"))
        .body(spec.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let r = http
        .post(server.url("/v1/agents"))
        .body(spec.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 200);
    let r = http
        .post(server.url("/v1/agents"))
        .body(spec.replace("tools:1", "tools:2"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 409);

    // Still healthy.
    let r = http.get(server.url("/readyz")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

#[tokio::test]
async fn runs_stay_pinned_to_the_version_they_started_with() {
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(200, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    let v1 = agent_yaml("pinned", &mock, "tools:3", "echo", "");
    register(&http, &server, &v1).await;
    let first = submit(&http, &server, "pinned", "one").await;
    // A new version lands while the first run is in flight.
    let v2 = v1
        .replace("version: 1", "version: 2")
        .replace("tools:3", "tools:1");
    register(&http, &server, &v2).await;
    let second = submit(&http, &server, "pinned", "two").await;
    let explicit = http
        .post(server.url("/v1/runs"))
        .json(&json!({"agent": "pinned", "version": 1, "input": "three"}))
        .send()
        .await
        .expect("submit");
    let explicit: Value = explicit.json().await.expect("json");

    let first = wait_terminal(&http, &server, &first, Duration::from_secs(30)).await;
    let second = wait_terminal(&http, &server, &second, Duration::from_secs(30)).await;
    let third = wait_terminal(
        &http,
        &server,
        explicit["id"].as_str().expect("id"),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        (first["version"].as_str(), first["step_count"].as_u64()),
        (Some("1"), Some(4))
    );
    assert_eq!(
        (second["version"].as_str(), second["step_count"].as_u64()),
        (Some("2"), Some(2))
    );
    assert_eq!(
        (third["version"].as_str(), third["step_count"].as_u64()),
        (Some("1"), Some(4))
    );
    let agents = get_json(&http, &server.url("/v1/agents")).await;
    assert_eq!(agents["agents"].as_array().map(Vec::len), Some(2));
}

/// Walks `GET /v1/runs?{query}` page by page along `next_cursor`: the ids
/// in the order served, and the pages' sizes.
async fn run_pages(http: &reqwest::Client, server: &Server, query: &str) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => server.url(&format!("/v1/runs?{query}&cursor={c}")),
            None => server.url(&format!("/v1/runs?{query}")),
        };
        let page = get_json(http, &url).await;
        let runs = page["runs"]
            .as_array()
            .unwrap_or_else(|| panic!("no runs: {page}"));
        ids.extend(
            runs.iter()
                .map(|r| r["id"].as_str().expect("id").to_string()),
        );
        pages += 1;
        assert!(pages < 100, "the cursor never ends: {page}");
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => return (ids, pages),
        }
    }
}

/// Runs listed newest first (their ids descending), and each exactly once:
/// `listed` is `expected` in that order.
fn same_runs_newest_first(listed: &[String], expected: &[String], what: &str) {
    let mut want = expected.to_vec();
    want.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(
        listed,
        want.as_slice(),
        "{what}: missed, repeated or out of order"
    );
}

/// `GET /v1/runs` and `keel runs` page with a cursor through more runs than
/// one page, filtered by agent and status: every run once, newest first.
#[tokio::test]
async fn runs_are_listed_page_by_page_with_a_cursor_over_http_and_the_cli() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // No external worker serves `images`: these runs wait in AWAITING_TOOL.
    register(&http, &server, &worker_agent("paged", &mock, "")).await;
    register(&http, &server, &worker_agent("other", &mock, "")).await;
    let mut paged = Vec::new();
    let mut other = Vec::new();
    for i in 0..32 {
        match i % 4 {
            3 => other.push(submit(&http, &server, "other", &format!("o{i}")).await),
            _ => paged.push(submit(&http, &server, "paged", &format!("p{i}")).await),
        }
    }
    for id in paged.iter().chain(&other) {
        wait_for(&http, &server, id, "waiting for its tool", |r| {
            r["status"] == "AWAITING_TOOL"
        })
        .await;
    }
    // Every third run of `paged` is cancelled.
    let mut cancelled = Vec::new();
    let mut waiting = Vec::new();
    for (i, id) in paged.iter().enumerate() {
        match i % 3 {
            0 => cancelled.push(id.clone()),
            _ => waiting.push(id.clone()),
        }
    }
    for id in &cancelled {
        let r = http
            .post(server.url(&format!("/v1/runs/{id}/cancel")))
            .send()
            .await
            .expect("cancel");
        assert!(r.status().is_success(), "cancel {id}: {}", r.status());
        wait_for(&http, &server, id, "cancelled", |r| {
            r["status"] == "CANCELLED"
        })
        .await;
    }
    assert_eq!((paged.len(), cancelled.len(), waiting.len()), (24, 8, 16));

    let (listed, pages) =
        run_pages(&http, &server, "agent=paged&status=AWAITING_TOOL&limit=5").await;
    same_runs_newest_first(&listed, &waiting, "paged, AWAITING_TOOL");
    assert_eq!(pages, 4, "16 runs in pages of 5");
    let (listed, pages) = run_pages(&http, &server, "status=CANCELLED&limit=4").await;
    same_runs_newest_first(&listed, &cancelled, "CANCELLED");
    // 8 runs in pages of 4: a full last page has a cursor, to an empty page.
    assert_eq!(pages, 3);
    let (listed, _) = run_pages(&http, &server, "agent=paged&limit=7").await;
    same_runs_newest_first(&listed, &paged, "paged");
    let (listed, _) = run_pages(&http, &server, "agent=other&status=AWAITING_TOOL&limit=3").await;
    same_runs_newest_first(&listed, &other, "other");
    let bad = http
        .get(server.url("/v1/runs?cursor=not-a-run"))
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status(), 400);

    // `keel runs` prints the next cursor; `--cursor` lists the next page.
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let mut args = vec![
            "runs",
            "--server",
            server.url.as_str(),
            "--agent",
            "paged",
            "--status",
            "AWAITING_TOOL",
            "--limit",
            "6",
        ];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let args: Vec<String> = args.into_iter().map(str::to_string).collect();
        let (ok, out, err) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            keel(&args)
        })
        .await
        .expect("join");
        assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
        cursor = None;
        for line in out.lines() {
            match line.strip_prefix("next cursor: ") {
                Some(rest) => {
                    let next = rest.split_whitespace().next().expect("a cursor");
                    cursor = Some(next.to_string());
                }
                None => {
                    assert!(line.contains("AWAITING_TOOL"), "{line}");
                    listed.push(line.split_whitespace().next().expect("id").to_string());
                }
            }
        }
        if cursor.is_none() {
            break;
        }
    }
    same_runs_newest_first(&listed, &waiting, "keel runs");
}
