//! Scale-out on PostgreSQL: one API process and several worker processes
//! on one database, with workers SIGKILLed and SIGTERMed mid-flight; child
//! runs fanned out over two processes, one SIGKILLed; approvals decided
//! through another process than the one the run parked on.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

fn worker_args<'a>(url: &'a str, lease: &'a str) -> Vec<&'a str> {
    vec![
        "--database-url",
        url,
        "--role",
        "worker",
        "--lease",
        lease,
        "--workers",
        "64",
    ]
}

#[tokio::test]
async fn five_hundred_runs_on_three_workers_survive_two_sigkills() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(5, Ordering::Relaxed);
    let dir = TempDir::new();
    let api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    let mut workers = Vec::new();
    for _ in 0..3 {
        workers.push(Server::start(&dir.db(), &worker_args(&db.url, "2s")).await);
    }
    let http = reqwest::Client::new();
    register(
        &http,
        &api,
        &agent_yaml("fleet", &mock, "tools:10", "echo", ""),
    )
    .await;
    let ids = submit_many(&http, &api, "fleet", 500).await;

    // Kill the same worker twice while the others go on, restarting it each time.
    for threshold in [1_000, 2_500] {
        wait_tool_calls(&mock, threshold, Duration::from_secs(120)).await;
        workers[0].kill();
        let at_kill = mock.counters.tool_requests.load(Ordering::Relaxed);
        assert!(
            at_kill < 4_500,
            "the kill came too late to test anything ({at_kill} tool calls)"
        );
        workers[0] = Server::start(&dir.db(), &worker_args(&db.url, "2s")).await;
    }

    let mut views = Vec::new();
    for id in &ids {
        views.push(wait_terminal(&http, &api, id, Duration::from_secs(180)).await);
    }
    let keys = mock.counters.key_counts();
    let mut repeated_calls = 0;
    for (id, run) in ids.iter().zip(&views) {
        repeated_calls += check_tool_steps(id, run, 10, &keys);
    }
    assert_eq!(
        keys.len(),
        5_000,
        "every call of every run reached the tool server"
    );
    // Two kills of a worker holding at most 64 tasks: at most 128 uncertain calls.
    assert!(repeated_calls <= 128, "{repeated_calls} repeated calls");

    // Each run's journal, read over SSE from the API process, is contiguous and ordered.
    type Journal = Vec<(i64, String, Value)>;
    let journals: Vec<(String, Journal)> = futures_util::stream::iter(&ids)
        .map(|id| {
            let http = http.clone();
            let url = api.url(&format!("/v1/runs/{id}/events"));
            async move { (id.clone(), sse(&http, &url, None).await) }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut kinds: HashMap<String, usize> = HashMap::new();
    for (id, events) in &journals {
        let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
        assert_eq!(
            seqs,
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "journal of {id}"
        );
        assert_eq!(events.first().map(|e| e.1.as_str()), Some("run_submitted"));
        assert_eq!(events.last().map(|e| e.1.as_str()), Some("run_completed"));
        for e in events {
            *kinds.entry(e.1.clone()).or_default() += 1;
        }
    }
    assert_eq!(kinds.get("run_completed"), Some(&500));
}

#[tokio::test]
async fn sigterm_hands_a_workers_tasks_over_without_waiting_for_the_lease() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(100, Ordering::Relaxed);
    let dir = TempDir::new();
    let api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    // A 60 s lease: a task that is not handed back would wait that long.
    let mut leaving = Server::start(&dir.db(), &worker_args(&db.url, "60s")).await;
    let staying = Server::start(&dir.db(), &worker_args(&db.url, "60s")).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &api,
        &agent_yaml(
            "handover",
            &mock,
            "tools:15",
            "echo",
            "limits: {max_steps: 20}",
        ),
    )
    .await;
    let ids = submit_many(&http, &api, "handover", 20).await;
    wait_tool_calls(&mock, 40, Duration::from_secs(120)).await;

    let drained = terminate(&mut leaving, Duration::from_secs(15)).await;
    assert!(drained < Duration::from_secs(5), "drain took {drained:?}");
    let after_sigterm = Instant::now();
    let mut unfinished_at_sigterm = 0;
    for id in &ids {
        let run = get_json(&http, &api.url(&format!("/v1/runs/{id}"))).await;
        if run["status"] != "COMPLETED" {
            unfinished_at_sigterm += 1;
        }
    }
    assert!(
        unfinished_at_sigterm > 0,
        "every run finished before the drain: nothing was tested"
    );
    for id in &ids {
        let run = wait_terminal(&http, &api, id, Duration::from_secs(50)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    // 20 runs of at most 15 steps of ~100 ms on the remaining worker: seconds,
    // far below the 60 s lease a task left leased would have waited for.
    let took = after_sigterm.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "the remaining runs took {took:?} after the SIGTERM"
    );
    drop(staying);
}

/// A `keel serve` process (API and workers) on `db` with `--workers 5`,
/// so that of two such processes neither takes all the work; `config`: its
/// configuration file.
async fn process(dir: &TempDir, db: &PgDb, config: Option<&str>) -> Server {
    let mut args = vec![
        "--database-url",
        db.url.as_str(),
        "--lease",
        "2s",
        "--workers",
        "5",
    ];
    if let Some(config) = config {
        args.extend(["--config", config]);
    }
    Server::start(&dir.db(), &args).await
}

/// A child agent of provider `lm` (each process's configuration points it
/// at its own mock, so a mock's requests tell which process ran a step):
/// two steps calling `echo`, then an answer.
fn kid_agent(tool_url: &str) -> String {
    format!(
        r#"
name: kid
version: 1
model: {{provider: lm, model: "tools:2", timeout: 10s}}
system: You are a test agent.
tools:
  - name: echo
    description: A test tool.
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    http: {{url: "{tool_url}", method: POST, timeout: 5s}}
    idempotent: true
"#
    )
}

#[tokio::test]
async fn twenty_children_run_on_two_processes_and_survive_a_sigkill() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mocks = [
        Mock::start().await.expect("mock"),
        Mock::start().await.expect("mock"),
    ];
    let dir = TempDir::new();
    let mut configs = Vec::new();
    for (i, mock) in mocks.iter().enumerate() {
        // Each LLM call takes a while, so the kill finds children mid-flight.
        mock.counters.llm_latency_ms.store(400, Ordering::Relaxed);
        let path = dir.0.join(format!("keel-{i}.yaml"));
        let yaml = format!(
            "providers:\n  lm:\n    kind: openai\n    base_url: \"{}\"\n",
            mock.llm_url()
        );
        std::fs::write(&path, yaml).expect("write the configuration");
        configs.push(path.display().to_string());
    }
    let mut a = process(&dir, &db, Some(&configs[0])).await;
    let b = process(&dir, &db, Some(&configs[1])).await;
    let http = reqwest::Client::new();
    register(&http, &a, &kid_agent(&mocks[0].tool_url("echo"))).await;
    let tasks: Vec<Value> = (0..20)
        .map(|i| json!({"agent": "kid", "input": format!("part {i}")}))
        .collect();
    register(
        &http,
        &a,
        &crate::children::boss(&Value::Array(tasks), "kid"),
    )
    .await;
    let id = submit(&http, &a, "boss", "split it").await;

    // Both processes run children: each one's mock hears its LLM calls.
    let deadline = Instant::now() + Duration::from_secs(120);
    while mocks
        .iter()
        .any(|m| m.counters.llm_requests.load(Ordering::Relaxed) < 2)
    {
        let counts: Vec<u64> = mocks
            .iter()
            .map(|m| m.counters.llm_requests.load(Ordering::Relaxed))
            .collect();
        assert!(
            Instant::now() < deadline,
            "the children did not spread over both processes: {counts:?} LLM calls"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    a.kill();
    let listed = get_json(&http, &b.url("/v1/runs?agent=kid&limit=100")).await;
    let done_at_kill = listed["runs"].as_array().map_or(0, |runs| {
        runs.iter().filter(|r| r["status"] == "COMPLETED").count()
    });
    assert!(
        done_at_kill < 20,
        "every child finished before the kill: nothing was tested"
    );

    // The other process finishes everything, A's children after their
    // leases expire.
    let run = wait_terminal(&http, &b, &id, Duration::from_secs(180)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let results = fan_in(&run);
    let results = results.as_array().expect("an array");
    assert_eq!(results.len(), 20, "{results:?}");
    let children = run["children"].as_array().expect("children");
    assert_eq!(children.len(), 20);
    for (i, (result, child)) in results.iter().zip(children).enumerate() {
        assert_eq!(result["status"], "COMPLETED", "{result}");
        assert_eq!(result["run_id"], child["run_id"], "task order");
        assert_eq!(child["index"], i);
        let child_id = child["run_id"].as_str().expect("child id");
        let view = get_json(&http, &b.url(&format!("/v1/runs/{child_id}"))).await;
        assert_eq!(view["input"], format!("part {i}").as_str(), "{view}");
        assert_eq!(view["status"], "COMPLETED", "{view}");
    }
    // Exactly one set of children, one spawn and one fan-in.
    let listed = get_json(&http, &b.url("/v1/runs?agent=kid&limit=100")).await;
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(20));
    let events = sse(&http, &b.url(&format!("/v1/runs/{id}/events")), None).await;
    let count = |kind: &str| events.iter().filter(|e| e.1 == kind).count();
    assert_eq!(count("children_spawned"), 1);
    assert_eq!(count("tool_call_completed"), 1, "one fan-in");
    assert_eq!(count("run_completed"), 1);
}

#[tokio::test]
async fn a_run_parked_on_one_process_is_approved_through_the_other() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let a = process(&dir, &db, None).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &a,
        &agent_yaml(
            "gate",
            &mock,
            "tools:1",
            "echo",
            "    requires_approval: true\n",
        ),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(&http, &a, "gate", &format!("pay {i}")).await);
    }
    for id in &ids {
        wait_for(&http, &a, id, "parking", |r| {
            r["status"] == "AWAITING_APPROVAL"
        })
        .await;
    }

    // B starts once the runs are parked on A; the inbox is the same from
    // both processes, page by page.
    let b = process(&dir, &db, None).await;
    let from_a = inbox_pages(&http, &a, "status=pending&limit=2").await;
    let from_b = inbox_pages(&http, &b, "status=pending&limit=2").await;
    assert_eq!(from_a, from_b);
    let pending: Vec<(String, String)> = from_a.into_iter().flat_map(|(p, _)| p).collect();
    let mut expected: Vec<(String, String)> = ids
        .iter()
        .map(|id| (id.clone(), "1.0.1".to_string()))
        .collect();
    expected.sort_by(|x, y| y.cmp(x));
    assert_eq!(pending, expected);

    // Approved through B's API, the runs go on (on either process) and
    // complete, each call made once; A sees it too.
    for id in &ids {
        let r = http
            .post(b.url(&format!("/v1/runs/{id}/approvals/1.0.1")))
            .json(&json!({"decision": "approve", "by": "bob"}))
            .send()
            .await
            .expect("decide");
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
    for id in &ids {
        let run = wait_terminal(&http, &a, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
        assert_eq!(run["approvals"][0]["decided_by"], "bob");
        let key = format!("{id}:1:0");
        assert_eq!(
            mock.counters.key_counts().get(&key).copied(),
            Some(1),
            "{key}"
        );
    }
    for server in [&a, &b] {
        let inbox = get_json(&http, &server.url("/v1/approvals?status=pending")).await;
        assert_eq!(inbox["approvals"], json!([]), "{inbox}");
        assert_eq!(inbox["next_cursor"], Value::Null);
    }
}
