//! Failures: a failing tool, a failing LLM endpoint (DLQ and re-drive), a
//! model that answers garbage, intermittent faults of both.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn failing_tool_error_goes_to_the_model_and_the_run_goes_on() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("flaky", &mock, "tools:2", "fail", ""),
    )
    .await;
    let id = submit(&http, &server, "flaky", "try it").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let keys = mock.counters.key_counts();
    for step in 1..=2 {
        let call = &run["steps"][step - 1]["tool_calls"][0];
        assert_eq!(call["is_error"], true);
        let result = call["result"].as_str().unwrap_or("");
        assert!(
            result.contains("500") && result.contains("3 attempts"),
            "{result}"
        );
        // Retried per the spec (3 attempts), always with the same key.
        assert_eq!(keys.get(&format!("{id}:{step}:0")), Some(&3));
    }
    // The model saw the error and answered anyway.
    assert!(
        run["output"].as_str().unwrap_or("").contains("500"),
        "{run}"
    );
}

#[tokio::test]
async fn dead_llm_goes_to_the_dlq_other_runs_flow_and_retry_resumes() {
    let down = Mock::start().await.expect("mock");
    let healthy = Mock::start().await.expect("mock");
    down.counters.llm_down.store(true, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    let retry = "retry: {max_attempts: 3, backoff: {initial: 50ms, max: 200ms}}";
    register(
        &http,
        &server,
        &agent_yaml("down", &down, "tools:2", "echo", retry),
    )
    .await;
    register(
        &http,
        &server,
        &agent_yaml("up", &healthy, "tools:2", "echo", ""),
    )
    .await;

    let stuck = submit(&http, &server, "down", "will wait").await;
    // Wait for the dead letter.
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        let dlq = get_json(&http, &server.url("/v1/dlq")).await;
        if let Some(l) = dlq["dead_letters"]
            .as_array()
            .and_then(|a| a.first())
            .cloned()
        {
            break l;
        }
        assert!(Instant::now() < deadline, "nothing reached the DLQ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(letter["run_id"], stuck.as_str());
    assert_eq!(letter["kind"], "llm");
    assert_eq!(letter["attempts"], 3);
    assert_eq!(down.counters.llm_requests.load(Ordering::Relaxed), 3);
    let run = get_json(&http, &server.url(&format!("/v1/runs/{stuck}"))).await;
    let error = run["error"].as_str().unwrap_or("");
    assert!(
        error.contains("dead-lettered") && error.contains("503"),
        "{run}"
    );
    assert_eq!(run["dead_letter"], letter["id"]);

    // Other runs keep flowing.
    let fine = submit(&http, &server, "up", "hello").await;
    let done = wait_terminal(&http, &server, &fine, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "COMPLETED");

    // The endpoint comes back; re-driving the dead letter resumes the run.
    down.counters.llm_down.store(false, Ordering::Relaxed);
    let letter_id = letter["id"].as_str().expect("id");
    let r = http
        .post(server.url(&format!("/v1/dlq/{letter_id}/retry")))
        .send()
        .await
        .expect("retry");
    assert_eq!(r.status(), 202);
    let resumed = wait_terminal(&http, &server, &stuck, Duration::from_secs(30)).await;
    assert_eq!(resumed["status"], "COMPLETED", "{resumed}");
    assert!(resumed["error"].is_null());
    let dlq = get_json(&http, &server.url("/v1/dlq")).await;
    assert_eq!(dlq["dead_letters"].as_array().map(Vec::len), Some(0));
    // A second retry of the same letter is a 404: it is gone.
    let r = http
        .post(server.url(&format!("/v1/dlq/{letter_id}/retry")))
        .send()
        .await
        .expect("retry");
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn garbage_from_the_model_fails_the_run_after_max_steps() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("junk", &mock, "garbage", "echo", "limits: {max_steps: 4}"),
    )
    .await;
    let id = submit(&http, &server, "junk", "hi").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED");
    let error = run["error"].as_str().unwrap_or("");
    assert!(error.contains("max_steps (4)"), "{error}");
    assert_eq!(run["step_count"], 4);
    // Each bad call was answered with an error the model could read.
    let steps: &Vec<Value> = run["steps"].as_array().expect("steps");
    for step in steps {
        assert_eq!(step["tool_calls"][0]["is_error"], true, "{step}");
    }
    assert_eq!(
        mock.counters.tool_requests.load(Ordering::Relaxed),
        0,
        "no invalid call reached a tool"
    );

    // Cancel works on a live run: a slow model keeps this one alive.
    mock.counters.llm_latency_ms.store(2_000, Ordering::Relaxed);
    let id = submit(&http, &server, "junk", "slow").await;
    let r = http
        .post(server.url(&format!("/v1/runs/{id}/cancel")))
        .json(&serde_json::json!({"reason": "user changed their mind"}))
        .send()
        .await
        .expect("cancel");
    assert_eq!(r.status(), 200);
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "CANCELLED");
    assert!(
        run["error"]
            .as_str()
            .unwrap_or("")
            .contains("changed their mind")
    );
}

#[tokio::test]
async fn intermittent_provider_and_tool_faults_are_retried_and_every_run_completes() {
    let mock = Mock::start().await.expect("mock");
    // One LLM call in five fails (500, 429 + Retry-After, a body cut short,
    // a connection dropped mid-body); one tool call in five answers 500/503.
    mock.counters.llm_faults.store(20, Ordering::Relaxed);
    mock.counters.tool_faults.store(20, Ordering::Relaxed);
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--workers", "16"]).await;
    let http = reqwest::Client::new();
    let yaml = agent_yaml(
        "shaky",
        &mock,
        "tools:5",
        "echo",
        "retry: {max_attempts: 12, backoff: {initial: 10ms, max: 50ms}}",
    )
    .replace("retry: {max_attempts: 3,", "retry: {max_attempts: 12,");
    assert!(yaml.contains("http:\n      url"), "{yaml}");
    register(&http, &server, &yaml).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(submit(&http, &server, "shaky", &format!("job {i}")).await);
    }

    let keys = || mock.counters.key_counts();
    let mut retried = 0;
    for id in &ids {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(90)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
        assert_eq!(run["step_count"], 6, "{run}");
        let counts = keys();
        for step in 1..=5 {
            let call = &run["steps"][step - 1]["tool_calls"][0];
            assert_eq!(call["is_error"], false, "{call}");
            assert_eq!(call["attempts"], 1, "one start: retries reuse it");
            let key = format!("{id}:{step}:0");
            let seen = counts.get(&key).copied().unwrap_or(0);
            assert!(seen >= 1, "{key} never reached the tool");
            if seen > 1 {
                retried += 1;
            }
        }
    }
    // Nothing was left in the dead-letter queue, and faults did happen.
    let dlq = get_json(&http, &server.url("/v1/dlq")).await;
    assert_eq!(
        dlq["dead_letters"].as_array().map(Vec::len),
        Some(0),
        "{dlq}"
    );
    let llm_faults = mock.counters.llm_faulted.load(Ordering::Relaxed);
    let tool_faults = mock.counters.tool_faulted.load(Ordering::Relaxed);
    assert!(llm_faults >= 20, "only {llm_faults} LLM faults");
    assert!(tool_faults >= 20, "only {tool_faults} tool faults");
    assert!(retried >= 20, "only {retried} tool calls were retried");
}
