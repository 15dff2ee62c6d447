//! Child runs: a `spawn_agents` call fans out to child runs, the parent
//! parks in AWAITING_CHILDREN holding no worker, and the last child wakes
//! it with every outcome in task order; cancelling the parent cancels the
//! children still running.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

/// A parent agent (scripted) whose first step spawns `tasks` and whose
/// answer is the fan-in it got.
pub(crate) fn boss(tasks: &Value, agents: &str) -> String {
    boss_with(tasks, agents, "")
}

/// [`boss`] with more keys for its `delegate` tool (`extra`, YAML).
fn boss_with(tasks: &Value, agents: &str, extra: &str) -> String {
    let arguments = json!({ "tasks": tasks });
    format!(
        r#"
name: boss
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{{name: delegate, arguments: {arguments}}}]
    - content: "{{{{tool_result}}}}"
system: You split work.
tools:
  - name: delegate
    builtin: spawn_agents
    agents: [{agents}]
    {extra}
limits: {{max_fan_out: 20}}
"#
    )
}

#[tokio::test]
async fn twenty_children_fan_out_and_fan_in_in_order() {
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        "name: kid\nversion: 1\nmodel: {provider: scripted, model: s, script: [{content: kid done}]}\n",
    )
    .await;
    let tasks: Vec<Value> = (0..20)
        .map(|i| json!({"agent": "kid", "input": format!("part {i}")}))
        .collect();
    register(&http, &server, &boss(&Value::Array(tasks), "kid")).await;

    let id = submit(&http, &server, "boss", "split it").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let results = fan_in(&run);
    let results = results.as_array().expect("an array");
    assert_eq!(results.len(), 20);
    let children = run["children"].as_array().expect("children");
    assert_eq!(children.len(), 20);
    for (i, (result, child)) in results.iter().zip(children).enumerate() {
        assert_eq!(result["agent"], "kid");
        assert_eq!(result["status"], "COMPLETED", "{result}");
        assert_eq!(result["output"], "kid done");
        assert_eq!(result["run_id"], child["run_id"], "task order");
        assert_eq!(child["index"], i);
        assert_eq!(child["status"], "COMPLETED");
    }

    // Each child is a normal run of its agent, pointing back at the parent,
    // with its own input.
    let first = children[0]["run_id"].as_str().expect("child id");
    let child = get_json(&http, &server.url(&format!("/v1/runs/{first}"))).await;
    assert_eq!(child["agent"], "kid");
    assert_eq!(child["input"], "part 0");
    assert_eq!(child["parent"]["run_id"], id.as_str());
    assert_eq!(child["parent"]["depth"], 1);
    let listed = get_json(&http, &server.url("/v1/runs?agent=kid&limit=100")).await;
    assert_eq!(
        listed["runs"].as_array().map(Vec::len),
        Some(20),
        "{listed}"
    );

    // The journal: the spawn, then one result for the call.
    let events = sse(&http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
    let spawned = kinds.iter().position(|k| *k == "children_spawned");
    let completed = kinds.iter().position(|k| *k == "tool_call_completed");
    assert!(spawned.is_some() && spawned < completed, "{kinds:?}");
}

#[tokio::test]
async fn cancelling_the_parent_cancels_its_children() {
    let mock = Mock::start().await.expect("mock");
    // Children hang in their LLM call.
    mock.counters
        .llm_latency_ms
        .store(20_000, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("slow", &mock, "tools:1", "echo", ""),
    )
    .await;
    let tasks: Vec<Value> = (0..3)
        .map(|i| json!({"agent": "slow", "input": format!("part {i}")}))
        .collect();
    register(&http, &server, &boss(&Value::Array(tasks), "slow")).await;
    let id = submit(&http, &server, "boss", "split it").await;
    let run = wait_for(&http, &server, &id, "parking", |r| {
        r["status"] == "AWAITING_CHILDREN"
    })
    .await;
    let children: Vec<String> = run["children"]
        .as_array()
        .expect("children")
        .iter()
        .map(|c| c["run_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(children.len(), 3);

    // Cancelling one child: the parent keeps waiting for the others.
    let r = http
        .post(server.url(&format!("/v1/runs/{}/cancel", children[0])))
        .json(&json!({"reason": "not needed"}))
        .send()
        .await
        .expect("cancel child");
    assert!(r.status().is_success(), "{}", r.status());
    wait_for(&http, &server, &children[0], "cancel", |r| {
        r["status"] == "CANCELLED"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "AWAITING_CHILDREN", "{run}");

    // Cancelling the parent cancels the children still running, at once
    // (they are in a 20 s LLM call).
    let started = Instant::now();
    let r = http
        .post(server.url(&format!("/v1/runs/{id}/cancel")))
        .json(&json!({"reason": "changed my mind"}))
        .send()
        .await
        .expect("cancel parent");
    assert!(r.status().is_success(), "{}", r.status());
    for child in &children[1..] {
        let run = wait_for(&http, &server, child, "cancel by the parent", |r| {
            r["status"] == "CANCELLED"
        })
        .await;
        assert!(
            run["error"].as_str().unwrap_or("").contains(&id),
            "names the parent: {run}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "CANCELLED", "{run}");
    let statuses: Vec<&str> = run["children"]
        .as_array()
        .expect("children")
        .iter()
        .map(|c| c["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses, ["CANCELLED"; 3]);
}

/// The parent of a `sick` child (its LLM endpoint is down; 2 attempts) and
/// a healthy `kid`, with `extra` on its `delegate` tool.
async fn sick_family(http: &reqwest::Client, server: &Server, down: &Mock, extra: &str) -> String {
    let retry = "retry: {max_attempts: 2, backoff: {initial: 20ms, max: 50ms}}";
    register(
        http,
        server,
        &agent_yaml("sick", down, "tools:1", "echo", retry),
    )
    .await;
    register(
        http,
        server,
        "name: kid\nversion: 1\nmodel: {provider: scripted, model: s, script: [{content: kid done}]}\n",
    )
    .await;
    let tasks = json!([{"agent": "kid", "input": "a"}, {"agent": "sick", "input": "b"}]);
    register(http, server, &boss_with(&tasks, "kid, sick", extra)).await;
    submit(http, server, "boss", "split it").await
}

#[tokio::test]
async fn a_dead_lettered_child_fails_into_the_fan_in_or_waits_for_a_retry() {
    let down = Mock::start().await.expect("mock");
    down.counters.llm_down.store(true, Ordering::Relaxed);
    let http = reqwest::Client::new();

    // By default the child fails with its dead letter's error, its parent's
    // model gets that failure, and nothing waits in the dead-letter queue.
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let id = sick_family(&http, &server, &down, "").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let results = fan_in(&run);
    assert_eq!(results[0]["status"], "COMPLETED", "{results}");
    assert_eq!(results[1]["status"], "FAILED", "{results}");
    let error = results[1]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("dead-lettered") && error.contains("after 2 attempts"),
        "{error}"
    );
    let sick = results[1]["run_id"].as_str().expect("child id");
    let child = get_json(&http, &server.url(&format!("/v1/runs/{sick}"))).await;
    assert_eq!(child["status"], "FAILED", "{child}");
    assert_eq!(child["error_code"], "dead_lettered", "{child}");
    let dlq = get_json(&http, &server.url("/v1/dlq")).await;
    assert_eq!(
        dlq["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{dlq}"
    );
    assert_eq!(down.counters.llm_requests.load(Ordering::Relaxed), 2);

    // `on_dead_letter: wait`: the child parks in the dead-letter queue, the
    // parent keeps waiting, and a retry once the endpoint is back finishes both.
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let id = sick_family(&http, &server, &down, "on_dead_letter: wait").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let letter = loop {
        let dlq = get_json(&http, &server.url("/v1/dlq")).await;
        if let Some(id) = dlq["dead_letters"][0]["id"].as_str() {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "no dead letter: {dlq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let run = get_json(&http, &server.url(&format!("/v1/runs/{id}"))).await;
    assert_eq!(run["status"], "AWAITING_CHILDREN", "{run}");
    down.counters.llm_down.store(false, Ordering::Relaxed);
    let r = http
        .post(server.url(&format!("/v1/dlq/{letter}/retry")))
        .send()
        .await
        .expect("retry");
    assert!(r.status().is_success(), "{}", r.status());
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let results = fan_in(&run);
    assert_eq!(results[1]["status"], "COMPLETED", "{results}");
}

#[tokio::test]
async fn a_child_whose_external_call_keeps_losing_its_lease_fails_into_the_fan_in() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    // The child's one call is made by the external workers of `images`;
    // two leases are allowed (retry.max_attempts).
    register(
        &http,
        &server,
        &format!(
            r#"
name: ext
version: 1
model: {{provider: openai, model: "tools:1", base_url: "{llm}", timeout: 10s}}
retry: {{max_attempts: 2, backoff: {{initial: 20ms, max: 50ms}}}}
tools:
  - name: resize
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    worker: images
"#,
            llm = mock.llm_url()
        ),
    )
    .await;
    let tasks = json!([{"agent": "ext", "input": "a"}]);
    register(&http, &server, &boss(&tasks, "ext")).await;
    let id = submit(&http, &server, "boss", "split it").await;

    // Workers lease the call and die (their 1 s leases expire), until the
    // lease after the last attempt finds the call given up.
    let lease = server.url("/v1/worker/tasks/lease");
    let mut leased = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http
            .post(&lease)
            .json(&json!({"queue": "images", "wait": "3s", "lease": "1s"}))
            .send()
            .await
            .expect("lease");
        match r.status().as_u16() {
            200 => leased += 1,
            204 if leased >= 2 => break,
            204 => {}
            other => panic!("lease answered {other}"),
        }
        assert!(Instant::now() < deadline, "leased {leased} times");
    }
    assert_eq!(leased, 2, "as many leases as attempts");

    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let results = fan_in(&run);
    assert_eq!(results[0]["status"], "FAILED", "{results}");
    let error = results[0]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("dead-lettered") && error.contains("2 leases"),
        "{error}"
    );
    let dlq = get_json(&http, &server.url("/v1/dlq")).await;
    assert_eq!(
        dlq["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{dlq}"
    );
}
