//! Approvals: runs park in AWAITING_APPROVAL holding no worker, survive a
//! SIGKILL while they wait, and resume on a decision (API or CLI); a
//! rejection's reason reaches the model; the timeout applies its policy;
//! the webhook is signed and retried.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

fn parked(run: &Value) -> bool {
    run["status"] == "AWAITING_APPROVAL"
}

/// An echo agent (`tools:1`) whose tool needs approval, with `approvals`.
fn gated(name: &str, mock: &Mock, approvals: &str) -> String {
    agent_yaml(
        name,
        mock,
        "tools:1",
        "echo",
        &format!("    requires_approval: true\napprovals: {approvals}"),
    )
}

#[tokio::test]
async fn a_parked_run_survives_sigkill_and_the_approval_resumes_it() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(&http, &server, &gated("gate", &mock, "{}")).await;
    let id = submit(&http, &server, "gate", "pay the bill").await;
    let run = wait_for(&http, &server, &id, "parking", parked).await;
    assert_eq!(run["approvals"][0]["id"], "1.0.1");
    assert_eq!(run["approvals"][0]["status"], "pending");
    assert_eq!(run["approvals"][0]["arguments"], json!({"n": 1}));

    // The inbox lists it; the run holds no worker and no claimable task.
    let inbox = get_json(&http, &server.url("/v1/approvals?status=pending")).await;
    let mine: Vec<&Value> = inbox["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .filter(|a| a["run_id"] == id.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{inbox}");
    assert_eq!(mine[0]["tool"], "echo");

    server.kill();
    {
        use keel_store::Store;
        let store = keel_store::sqlite::SqliteStore::open(&dir.db())
            .await
            .expect("open");
        let now = keel_engine::now();
        let claimed = store
            .claim("probe", 10, Duration::from_secs(30), now)
            .await
            .expect("claim");
        assert!(
            claimed.is_empty(),
            "a parked run has nothing to claim but its timer (due at the run's deadline): {claimed:?}"
        );
        let due = store.next_due(now).await.expect("next due");
        assert!(due.is_some_and(|d| d > now + 3_000_000), "timer at {due:?}");
    }
    let server = Server::start(&dir.db(), &[]).await;
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert!(parked(&run), "{run}");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 0);

    // Bad decisions: named fields, unknown ids, and nothing changes.
    let (status, body) = decide(&http, &server, &id, "1.0.1", json!({"decision": "reject"})).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["fields"][0]["field"], "reason");
    let (status, body) = decide(
        &http,
        &server,
        &id,
        "1.0.1",
        json!({"decision": "approve", "arguments": {"n": "many"}}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["fields"][0]["field"], "arguments");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("schema"),
        "{body}"
    );
    let (status, _) = decide(&http, &server, &id, "9.9.9", json!({"decision": "approve"})).await;
    assert_eq!(status, 404);
    let (status, _) = decide(&http, &server, &id, "1.0.1", json!({"decision": "maybe"})).await;
    assert_eq!(status, 400);

    // Approved with edited arguments: the call is made with them, once.
    let (status, body) = decide(
        &http,
        &server,
        &id,
        "1.0.1",
        json!({"decision": "approve", "arguments": {"n": 42}, "by": "alice"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["by"], "alice");
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert!(
        run["output"].as_str().unwrap_or("").contains(r#""n":42"#),
        "{run}"
    );
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 1);
    let approval = &run["approvals"][0];
    assert_eq!(approval["status"], "approved");
    assert_eq!(approval["decided_by"], "alice");
    assert_eq!(approval["edited_arguments"], json!({"n": 42}));

    // A second decision conflicts (the step moved on: it is no longer waiting).
    let (status, body) = decide(&http, &server, &id, "1.0.1", json!({"decision": "approve"})).await;
    assert!(status == 409 || status == 404, "{status} {body}");

    // The journal shows who decided, in order.
    let events = sse(&http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let requested = kinds.iter().position(|k| *k == "approval_requested");
    let decided = kinds.iter().position(|k| *k == "approval_decided");
    let started = kinds.iter().position(|k| *k == "tool_call_started");
    assert!(requested < decided && decided < started, "{kinds:?}");
    let decided = &events[decided.unwrap_or(0)].2["event"];
    assert_eq!(decided["by"], "alice");
}

#[tokio::test]
async fn a_rejection_reaches_the_model_and_a_decided_approval_conflicts() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // Two calls in one step (`plan:2:0`): the step waits for both decisions.
    let yaml = agent_yaml(
        "twice",
        &mock,
        "plan:2:0",
        "echo",
        "    requires_approval: {when: {path: /n, gte: 1}}",
    );
    register(&http, &server, &yaml).await;
    let id = submit(&http, &server, "twice", "go").await;
    wait_for(&http, &server, &id, "parking", parked).await;

    // Through the CLI: the inbox, then a rejection with a reason.
    let (ok, out, err) = keel(&["approvals", "--server", &server.url]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&id) && out.contains("1.0.1") && out.contains("1.1.1"),
        "{out}"
    );
    let (ok, out, err) = keel(&[
        "reject",
        &id,
        "1.0.1",
        "--reason",
        "not today",
        "--by",
        "bob",
        "--server",
        &server.url,
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("rejected") && out.contains("AWAITING_APPROVAL"),
        "{out}"
    );
    let (status, body) = decide(
        &http,
        &server,
        &id,
        "1.0.1",
        json!({"decision": "approve", "by": "carol"}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("rejected by bob"),
        "{body}"
    );
    let (ok, _, err) = keel(&[
        "approve",
        &id,
        "1.1.1",
        "--by",
        "bob",
        "--server",
        &server.url,
    ]);
    assert!(ok, "{err}");

    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    // Only the approved call was made; the rejected one's result is the reason.
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 1);
    let calls = &run["steps"][0]["tool_calls"];
    let rejected = calls[0]["result"].as_str().unwrap_or("");
    assert!(rejected.contains("rejected by bob: not today"), "{run}");
    assert!(
        calls[1]["result"].as_str().unwrap_or("").contains("echo"),
        "{run}"
    );
}

#[tokio::test]
async fn the_timeout_rejects_or_escalates_and_the_webhook_is_signed_and_retried() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let secret = "s3cret";
    let server = Server::start(&dir.db(), &["--webhook-secret", secret]).await;
    let http = reqwest::Client::new();

    // on_timeout: reject (the default): nobody decides, the model is told.
    register(&http, &server, &gated("lapse", &mock, "{timeout: 1s}")).await;
    let id = submit(&http, &server, "lapse", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert!(
        run["output"]
            .as_str()
            .unwrap_or("")
            .contains("rejected by keel:timeout"),
        "{run}"
    );
    assert_eq!(run["approvals"][0]["decided_by"], "keel:timeout");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 0);

    // on_timeout: escalate: the first webhook is down for a while (retried),
    // then the escalation goes to the second one; the run keeps waiting.
    mock.counters.hooks_down.store(true, Ordering::Relaxed);
    let approvals = format!(
        r#"{{timeout: 2s, on_timeout: escalate, notify: "{}", escalate_to: "{}"}}"#,
        mock.hook_url("inbox"),
        mock.hook_url("oncall")
    );
    register(&http, &server, &gated("escalating", &mock, &approvals)).await;
    let id = submit(&http, &server, "escalating", "go").await;
    wait_for(&http, &server, &id, "parking", parked).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while mock.counters.hooks_refused.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no notification attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mock.counters.hooks_down.store(false, Ordering::Relaxed);
    let escalated = wait_for(&http, &server, &id, "escalation", |run| {
        run["approvals"][0]["escalated"] == true
    })
    .await;
    assert!(parked(&escalated), "{escalated}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let hooks = loop {
        let hooks = mock.counters.hooks();
        if hooks.iter().any(|h| h.name == "inbox") && hooks.iter().any(|h| h.name == "oncall") {
            break hooks;
        }
        assert!(Instant::now() < deadline, "notifications: {hooks:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for hook in &hooks {
        let body: Value = serde_json::from_str(&hook.body).expect("hook json");
        assert_eq!(body["run_id"], id.as_str());
        assert_eq!(body["approvals"][0]["id"], "1.0.1");
        assert_eq!(
            body["approvals"][0]["decide"],
            format!("/v1/runs/{id}/approvals/1.0.1").as_str()
        );
        let expected = if hook.name == "inbox" {
            "approval.requested"
        } else {
            "approval.escalated"
        };
        assert_eq!(hook.event.as_deref(), Some(expected));
        assert_eq!(body["type"], expected);
        // The signature is HMAC-SHA256 of "<t>.<body>" with the server's secret.
        let signature = hook.signature.clone().expect("signed");
        let t: i64 = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split(',').next())
            .and_then(|t| t.parse().ok())
            .expect("timestamp");
        assert_eq!(
            signature,
            keel_engine::webhook::signature(secret.as_bytes(), t, hook.body.as_bytes())
        );
        assert!(hook.delivery.is_some());
    }

    // A human still decides after the escalation.
    let (status, body) = decide(
        &http,
        &server,
        &id,
        "1.0.1",
        json!({"decision": "approve", "by": "oncall"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(mock.counters.tool_requests.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn uncertain_calls_after_sigkill_retry_fail_or_ask() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // The `hang` tool never answers a key's first call: the server is
    // killed between ToolCallStarted and the result.
    let policies = [
        ("retrying", ""),
        ("failing", "    on_uncertain: fail"),
        ("asking", "    on_uncertain: ask"),
    ];
    let mut ids = Vec::new();
    for (name, extra) in policies {
        register(
            &http,
            &server,
            &agent_yaml(name, &mock, "tools:1", "hang", extra),
        )
        .await;
        ids.push(submit(&http, &server, name, "go").await);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while mock.counters.tool_requests.load(Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "the calls never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    let server = Server::start(&dir.db(), &[]).await;
    let keys = |id: &str| {
        mock.counters
            .key_counts()
            .get(&format!("{id}:1:0"))
            .copied()
            .unwrap_or(0)
    };

    // retry (idempotent: true): made again with the same key.
    let run = wait_terminal(&http, &server, &ids[0], Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["steps"][0]["tool_calls"][0]["attempts"], 2);
    assert!(
        run["output"].as_str().unwrap_or("").contains("repeated"),
        "{run}"
    );
    assert_eq!(keys(&ids[0]), 2);

    // fail: the run fails, naming the call's key; it is not made again.
    let run = wait_terminal(&http, &server, &ids[1], Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED", "{run}");
    assert_eq!(run["error_code"], "uncertain_tool_call");
    let key = format!("{}:1:0", ids[1]);
    assert!(run["error"].as_str().unwrap_or("").contains(&key), "{run}");
    assert_eq!(keys(&ids[1]), 1);

    // ask: the run parks for a human; approving repeats it with the same key.
    let run = wait_for(&http, &server, &ids[2], "parking", parked).await;
    let approval = &run["approvals"][0];
    assert_eq!(approval["id"], "1.0.2");
    assert_eq!(approval["reason"], "uncertain");
    assert_eq!(keys(&ids[2]), 1);
    let (status, body) = decide(
        &http,
        &server,
        &ids[2],
        "1.0.2",
        json!({"decision": "approve", "arguments": {"n": 7}}),
    )
    .await;
    assert_eq!(
        status, 422,
        "an uncertain call is repeated as it was: {body}"
    );
    let (status, body) = decide(
        &http,
        &server,
        &ids[2],
        "1.0.2",
        json!({"decision": "approve", "by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let run = wait_terminal(&http, &server, &ids[2], Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["steps"][0]["tool_calls"][0]["attempts"], 2);
    assert_eq!(keys(&ids[2]), 2);
}

#[tokio::test]
async fn the_inbox_pages_by_cursor_in_a_stable_order() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // `pair` asks for two gated calls in one step, `single` for one.
    let gate = "    requires_approval: true\n";
    register(
        &http,
        &server,
        &agent_yaml("pair", &mock, "plan:2:0", "echo", gate),
    )
    .await;
    register(
        &http,
        &server,
        &agent_yaml("single", &mock, "tools:1", "echo", gate),
    )
    .await;
    let mut runs = Vec::new();
    for agent in ["pair", "pair", "pair", "single"] {
        let id = submit(&http, &server, agent, "go").await;
        wait_for(&http, &server, &id, "parking", parked).await;
        runs.push(id);
    }
    let single = runs[3].clone();
    // Newest run first (ids grow with time), each run's approvals in
    // request order: 7 in all.
    runs.sort_by(|a, b| b.cmp(a));
    let mut expected = Vec::new();
    for id in &runs {
        let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
        for a in run["approvals"].as_array().expect("approvals") {
            expected.push((id.clone(), a["id"].as_str().unwrap_or("").to_string()));
        }
    }
    assert_eq!(expected.len(), 7, "{expected:?}");

    // Pages of 3: 3, 3, then the last 1 without a cursor; a page boundary
    // falls inside a run.
    let pages = inbox_pages(&http, &server, "status=pending&limit=3").await;
    let sizes: Vec<(usize, bool)> = pages.iter().map(|(p, more)| (p.len(), *more)).collect();
    assert_eq!(sizes, [(3, true), (3, true), (1, false)]);
    let all: Vec<(String, String)> = pages.into_iter().flat_map(|(p, _)| p).collect();
    assert_eq!(all, expected);
    // One agent's: a full last page has a cursor, whose page is empty.
    let pages = inbox_pages(&http, &server, "agent=pair&limit=3").await;
    let sizes: Vec<(usize, bool)> = pages.iter().map(|(p, more)| (p.len(), *more)).collect();
    assert_eq!(sizes, [(3, true), (3, true), (0, false)]);
    let pairs: Vec<(String, String)> = pages.into_iter().flat_map(|(p, _)| p).collect();
    let of_pair: Vec<(String, String)> = expected
        .iter()
        .filter(|(run, _)| *run != single)
        .cloned()
        .collect();
    assert_eq!(pairs, of_pair);

    // A decision between two pages shifts nothing: the next page starts
    // after the previous one's last approval, not at an offset.
    let first = get_json(&http, &server.url("/v1/approvals?limit=3")).await;
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
    let (decided_run, decided) = &expected[3];
    let (status, body) = decide(
        &http,
        &server,
        decided_run,
        decided,
        json!({"decision": "approve"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let second = get_json(
        &http,
        &server.url(&format!("/v1/approvals?limit=3&cursor={cursor}")),
    )
    .await;
    let second: Vec<(String, String)> = second["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .map(|a| {
            (
                a["run_id"].as_str().unwrap_or("").to_string(),
                a["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(second, expected[4..]);

    // Bad paging parameters are 400s naming the parameter.
    for (query, name) in [
        ("cursor=nope", "cursor"),
        ("cursor=0190b6c4-1f2e-7000-8000-000000000000:1.0", "cursor"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=many", "limit"),
    ] {
        let r = http
            .get(server.url(&format!("/v1/approvals?{query}")))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 400, "{query}");
        let body: Value = r.json().await.expect("json");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(name), "{query}: {body}");
    }

    // The CLI follows the cursor: the whole inbox (6 left).
    let (ok, out, err) = keel(&["approvals", "--server", &server.url]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 6, "{out}");
    for (run, approval) in expected.iter().filter(|e| *e != &expected[3]) {
        assert!(
            out.lines()
                .any(|l| l.contains(run.as_str()) && l.contains(approval.as_str())),
            "{run} {approval} missing: {out}"
        );
    }
}
