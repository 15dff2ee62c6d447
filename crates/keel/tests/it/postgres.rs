//! Scale-out on PostgreSQL: one API process and several worker processes
//! on one database, with workers SIGKILLed and SIGTERMed mid-flight.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keel::mock::Mock;
use serde_json::Value;

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

async fn wait_tool_calls(mock: &Mock, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while mock.counters.tool_requests.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "no progress: {} tool calls",
            mock.counters.tool_requests.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn submit_many(
    http: &reqwest::Client,
    api: &Server,
    agent: &str,
    count: usize,
) -> Vec<String> {
    futures_util::stream::iter(0..count)
        .map(|i| {
            let http = http.clone();
            let url = api.url("/v1/runs");
            let agent = agent.to_string();
            async move {
                let r = http
                    .post(url)
                    .json(&serde_json::json!({"agent": agent, "input": format!("job {i}")}))
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(r.status(), 202);
                let body: Value = r.json().await.expect("json");
                body["id"].as_str().expect("id").to_string()
            }
        })
        .buffered(32)
        .collect()
        .await
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
        wait_tool_calls(&mock, threshold).await;
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
        assert_eq!(run["status"], "COMPLETED", "{run}");
        assert_eq!(run["step_count"], 11);
        let steps = run["steps"].as_array().expect("steps");
        for (i, step) in steps.iter().take(10).enumerate() {
            let call = &step["tool_calls"][0];
            let key = format!("{id}:{}:0", i + 1);
            assert_eq!(call["idempotency_key"], key.as_str());
            assert!(
                call["result"].is_string(),
                "step {} of {id} lost its result",
                i + 1
            );
            let starts = call["attempts"].as_u64().expect("attempts") as u32;
            let seen = keys.get(&key).copied().unwrap_or(0);
            // Executed to completion at least once; repeated only when an
            // earlier ToolCallStarted had no result.
            assert!(seen >= 1, "{key} never reached the tool server");
            assert!(
                seen <= starts,
                "{key} called {seen} times with only {starts} journaled starts"
            );
            if seen > 1 {
                repeated_calls += 1;
            }
        }
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
    wait_tool_calls(&mock, 40).await;

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
