//! Crash recovery: SIGKILL a real `keel serve` mid-flight and start it again.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::Mock;

use crate::support::*;

#[tokio::test]
async fn fifty_runs_survive_sigkill_without_losing_a_step() {
    let mock = Mock::start().await.expect("mock");
    // A little LLM latency keeps many runs mid-flight when the kill lands.
    mock.counters.llm_latency_ms.store(5, Ordering::Relaxed);
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &["--workers", "32"]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("crashy", &mock, "tools:10", "echo", ""),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(submit(&http, &server, "crashy", &format!("job {i}")).await);
    }

    // Kill it once a good part of the work is done, but not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mock.counters.tool_requests.load(Ordering::Relaxed) < 150 {
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill();
    let at_kill = mock.counters.tool_requests.load(Ordering::Relaxed);
    assert!(
        at_kill < 500,
        "the kill came too late to test anything ({at_kill} tool calls)"
    );

    let server = Server::start(&dir.db(), &["--workers", "32"]).await;
    let mut repeated_calls = 0;
    let keys = {
        let mut views = Vec::new();
        for id in &ids {
            views.push(wait_terminal(&http, &server, id, Duration::from_secs(120)).await);
        }
        let keys = mock.counters.key_counts();
        for (id, run) in ids.iter().zip(&views) {
            // Executed to completion at least once; repeated only when an
            // earlier ToolCallStarted had no result (attempts > 1).
            repeated_calls += check_tool_steps(id, run, 10, &keys);
            // The journal is contiguous and ordered.
            let events = sse(&http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
            let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
            assert_eq!(seqs, (1..=events.len() as i64).collect::<Vec<_>>());
            assert_eq!(events.last().map(|e| e.1.as_str()), Some("run_completed"));
        }
        keys
    };
    assert_eq!(
        keys.len(),
        500,
        "every call of every run reached the tool server"
    );
    // At most one call per run can have been in flight when the process died.
    assert!(repeated_calls <= 50, "{repeated_calls} repeated calls");
}

#[tokio::test]
async fn sigterm_drains_and_hands_back_every_task() {
    use keel_store::Store;

    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(200, Ordering::Relaxed);
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml(
            "drain",
            &mock,
            "tools:20",
            "echo",
            "limits: {max_steps: 30}",
        ),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(submit(&http, &server, "drain", &format!("job {i}")).await);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.counters.tool_requests.load(Ordering::Relaxed) < 20 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let pid = server.child.id().to_string();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "keel serve did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    // Each run was mid-flight with ~200 ms model calls: the drain lets the
    // step in flight finish and stops there, it does not run 20 more steps.
    assert!(
        stopped.elapsed() < Duration::from_secs(5),
        "drain took {:?}",
        stopped.elapsed()
    );

    // Nothing is left leased: another worker can claim every unfinished run's task at once.
    let store = keel_store::sqlite::SqliteStore::open(&dir.db())
        .await
        .expect("open");
    let now = keel_engine::now();
    let mut unfinished = 0;
    for id in &ids {
        let run = store
            .get_run(id.parse().expect("id"))
            .await
            .expect("read")
            .expect("run");
        if !run.projection.status.is_terminal() {
            unfinished += 1;
        }
    }
    assert!(
        unfinished > 0,
        "the runs finished before the drain: nothing was tested"
    );
    let claimed = store
        .claim("another-worker", 100, Duration::from_secs(30), now)
        .await
        .expect("claim");
    assert_eq!(
        claimed.len(),
        unfinished,
        "every unfinished run's task was handed back"
    );
    drop(claimed);
    drop(store);

    // And a new server finishes them all.
    mock.counters.llm_latency_ms.store(0, Ordering::Relaxed);
    let server = Server::start(&dir.db(), &[]).await;
    for id in &ids {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
}
