//! Backpressure at the edge: ceilings on pending runs answer 429 with
//! Retry-After, per agent and in all, and lift once runs finish.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

async fn try_submit(http: &reqwest::Client, server: &Server, agent: &str) -> reqwest::Response {
    http.post(server.url("/v1/runs"))
        .json(&json!({"agent": agent, "input": "work"}))
        .send()
        .await
        .expect("submit")
}

async fn accepted(http: &reqwest::Client, server: &Server, agent: &str) -> String {
    let r = try_submit(http, server, agent).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

async fn refused(http: &reqwest::Client, server: &Server, agent: &str) -> String {
    let r = try_submit(http, server, agent).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        r.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "busy");
    body["error"]["message"]
        .as_str()
        .expect("message")
        .to_string()
}

#[tokio::test]
async fn pending_ceilings_answer_429_and_lift_when_runs_finish() {
    let mock = Mock::start().await.expect("mock");
    // Runs stay pending for a while: each model answer takes 700 ms.
    mock.counters.llm_latency_ms.store(700, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(
        &dir.db(),
        &[
            "--max-pending",
            "5",
            "--max-pending-per-agent",
            "3",
            "--retry-after",
            "1500ms",
        ],
    )
    .await;
    let http = reqwest::Client::new();
    for name in ["alpha", "beta"] {
        register(
            &http,
            &server,
            &agent_yaml(name, &mock, "tools:1", "echo", ""),
        )
        .await;
    }

    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(accepted(&http, &server, "alpha").await);
    }
    let message = refused(&http, &server, "alpha").await;
    assert!(message.contains("agent `alpha`"), "{message}");
    assert!(message.contains("--max-pending-per-agent"), "{message}");

    // Another agent still gets in, up to the global ceiling.
    for _ in 0..2 {
        ids.push(accepted(&http, &server, "beta").await);
    }
    let message = refused(&http, &server, "beta").await;
    assert!(message.contains("5 runs are pending"), "{message}");

    // Nothing refused was created, and the ceiling lifts as runs finish.
    let listed = get_json(&http, &server.url("/v1/runs?limit=100")).await;
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(5));
    for id in &ids {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    accepted(&http, &server, "alpha").await;
}

#[tokio::test]
async fn concurrent_submits_cannot_slip_under_the_ceiling_together() {
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(2_000, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--max-pending", "3"]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("burst", &mock, "tools:1", "echo", ""),
    )
    .await;
    let statuses = futures_util::future::join_all(
        (0..12).map(|_| async { try_submit(&http, &server, "burst").await.status().as_u16() }),
    )
    .await;
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        9,
        "{statuses:?}"
    );
}
