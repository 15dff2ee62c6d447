//! Priorities under contention, of the workers (one worker and a slow
//! model) or of a rate limit: runs of high priority submitted after a
//! backlog of low ones finish first, and the low ones all finish too.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel::mock::Mock;
use serde_json::json;

use crate::support::*;

/// Submits a run of `queue` with `input` at `priority`; its id.
async fn submit_at(http: &reqwest::Client, server: &Server, input: &str, priority: u8) -> String {
    let body = json!({"agent": "queue", "input": input, "priority": priority});
    submit_with(http, server.url("/v1/runs"), &body, &[]).await
}

/// Registers the agent `queue` (one model answer, no tool call) and
/// submits `count` runs of priority 0: the backlog.
async fn backlog(
    http: &reqwest::Client,
    server: &Server,
    mock: &Mock,
    count: usize,
) -> Vec<String> {
    register(
        http,
        server,
        &agent_yaml("queue", mock, "tools:0", "echo", ""),
    )
    .await;
    let mut low = Vec::with_capacity(count);
    for i in 0..count {
        low.push(submit_at(http, server, &format!("low {i}"), 0).await);
    }
    low
}

#[tokio::test]
async fn high_priority_runs_overtake_a_backlog_and_the_backlog_still_finishes() {
    let mock = Mock::start().await.expect("mock");
    // Each run is one model answer of 300 ms; one worker takes one at a time.
    mock.counters.llm_latency_ms.store(300, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--workers", "1"]).await;
    let http = reqwest::Client::new();
    let low = backlog(&http, &server, &mock, 8).await;
    let mut high = Vec::new();
    for i in 0..3 {
        high.push(submit_at(&http, &server, &format!("high {i}"), 9).await);
    }
    let body = json!({"agent": "queue", "input": "x"});
    let default = submit_with(&http, server.url("/v1/runs"), &body, &[]).await;

    let mut high_done = Vec::new();
    for id in &high {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(60)).await;
        assert_eq!(
            (run["status"].as_str(), run["priority"].as_u64()),
            (Some("COMPLETED"), Some(9)),
            "{run}"
        );
        high_done.push(run["updated_at"].as_i64().expect("updated_at"));
    }
    let mut low_done = Vec::new();
    for id in &low {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(60)).await;
        assert_eq!(
            (run["status"].as_str(), run["priority"].as_u64()),
            (Some("COMPLETED"), Some(0)),
            "{run}"
        );
        low_done.push(run["updated_at"].as_i64().expect("updated_at"));
    }
    let run = wait_terminal(&http, &server, &default, Duration::from_secs(60)).await;
    assert_eq!(
        (run["status"].as_str(), run["priority"].as_u64()),
        (Some("COMPLETED"), Some(5)),
        "{run}"
    );

    // In submission order the high runs would finish last (8 low runs
    // before the last high one). The worker may have taken a few low runs
    // before the high ones were submitted (on a loaded machine the 11
    // durable submits take as long as three runs); every other low run
    // finishes after every high one.
    let last_high = high_done.iter().max().copied().unwrap_or_default();
    let low_before = low_done.iter().filter(|at| **at < last_high).count();
    assert!(
        low_before <= 3,
        "{low_before} low-priority runs finished before the last high one: \
         high {high_done:?}, low {low_done:?}"
    );
}

/// Priorities when the contention is a rate limit, not the workers: 64
/// workers, 10 calls a second (9.1 with the margin), a backlog of 60
/// low-priority runs, then 5 high ones. The high runs' calls reach the
/// provider right after the few low calls already reserved when they came,
/// and before all the other low ones.
///
/// Measured before priorities set how far ahead a call may reserve: 46 and
/// 49 low calls between the high runs' submission and the last high call
/// (the high calls competed with the backlog's for each freed slot); after:
/// 4 and 3.
#[tokio::test]
async fn high_priority_runs_overtake_a_backlog_held_back_by_a_rate_limit() {
    use futures_util::future::join_all;

    let mock = Mock::start().await.expect("mock");
    mock.counters.track_bodies();
    let dir = TempDir::new();
    let config = dir.config(
        "providers:\n  openai:\n    kind: openai\n    models:\n      \"tools:0\": {rpm: 10, window: 1s}\n",
    );
    let server = Server::start(&dir.db(), &["--workers", "64", "--config", &config]).await;
    let http = reqwest::Client::new();
    let low = backlog(&http, &server, &mock, 60).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = mock.counters.llm_bodies().len();
    let inputs: Vec<String> = (0..5).map(|i| format!("high {i}")).collect();
    let high = join_all(
        inputs
            .iter()
            .map(|input| submit_at(&http, &server, input, 9)),
    )
    .await;
    for id in high.iter().chain(&low) {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    // The calls in the order the provider received them.
    let order: String = mock
        .counters
        .llm_bodies()
        .iter()
        .map(|b| if b.contains("high ") { 'H' } else { 'L' })
        .collect();
    assert_eq!(order.len(), 65, "{order}");
    let last_high = order.rfind('H').expect("high calls");
    let low_between = order[before..last_high].matches('L').count();
    eprintln!(
        "{low_between} low calls went between the high runs' submission and the last high call: {order}"
    );
    // A call of priority 0 reserves at most 0.42 s ahead: 4 calls at 9.1 a
    // second, and one more whose take was being made.
    assert!(
        low_between <= 5,
        "{low_between} low calls went before the last high one: {order}"
    );
}
