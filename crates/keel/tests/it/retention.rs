//! Retention: `keel serve --retention` deletes runs that ended longer ago
//! than that, with everything stored about them, and nothing else (a run
//! still waiting stays, however old); `DELETE /v1/runs/{id}` deletes one
//! ended run at once and refuses, saying why, one that has not ended. On
//! SQLite, and on PostgreSQL with two processes sweeping one database.

use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::json;
use sqlx::Connection;

use crate::support::*;

/// The echo agent (`tools:1`) and one whose tool needs approval, so its
/// runs park in AWAITING_APPROVAL and never end by themselves.
async fn agents(http: &reqwest::Client, server: &Server, mock: &Mock) {
    register(
        http,
        server,
        &agent_yaml("echo", mock, "tools:1", "echo", ""),
    )
    .await;
    let gated = agent_yaml(
        "gate",
        mock,
        "tools:1",
        "echo",
        "    requires_approval: true\napprovals: {}",
    );
    register(http, server, &gated).await;
}

/// Submits with an idempotency key; the run's id.
async fn submit_keyed(http: &reqwest::Client, server: &Server, key: &str) -> String {
    let body = json!({"agent": "echo", "input": key});
    submit_with(
        http,
        server.url("/v1/runs"),
        &body,
        &[("idempotency-key", key)],
    )
    .await
}

/// The HTTP status of `GET /v1/runs/{id}`.
async fn run_status(http: &reqwest::Client, server: &Server, id: &str) -> u16 {
    http.get(server.url(&format!("/v1/runs/{id}")))
        .send()
        .await
        .expect("get run")
        .status()
        .as_u16()
}

/// Waits until every run in `ids` is gone (404), `within`.
async fn wait_gone(http: &reqwest::Client, server: &Server, ids: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    for id in ids {
        while run_status(http, server, id).await != 404 {
            assert!(
                Instant::now() < deadline,
                "run {id} was not deleted; log: {}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test]
async fn runs_that_ended_past_the_retention_are_deleted_and_waiting_ones_kept() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(
        &dir.db(),
        &["--retention", "5s", "--retention-interval", "250ms"],
    )
    .await;
    let http = reqwest::Client::new();
    agents(&http, &server, &mock).await;

    // Every run below ends after this.
    let started = Instant::now();
    let parked = submit(&http, &server, "gate", "pay the bill").await;
    let mut ended = submit_many(&http, &server, "echo", 30).await;
    ended.push(submit_keyed(&http, &server, "order-1").await);
    for id in &ended {
        wait_terminal(&http, &server, id, Duration::from_secs(30)).await;
    }
    wait_for(&http, &server, &parked, "parking", |r| {
        r["status"] == "AWAITING_APPROVAL"
    })
    .await;
    // Ended less than the retention ago: all still there.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "too slow to check"
    );
    for id in &ended {
        assert_eq!(run_status(&http, &server, id).await, 200, "run {id}");
    }

    wait_gone(&http, &server, &ended, Duration::from_secs(20)).await;
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "deleted before the retention passed"
    );
    let events = http
        .get(server.url(&format!("/v1/runs/{}/events", ended[0])))
        .send()
        .await
        .expect("events");
    assert_eq!(events.status(), 404);

    // The waiting run stays, whatever its age, with its journal.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = get_json(&http, &server.url(&format!("/v1/runs/{parked}"))).await;
    assert_eq!(run["status"], "AWAITING_APPROVAL", "{run}");
    let listed = get_json(&http, &server.url("/v1/runs?limit=100")).await;
    let ids: Vec<&str> = listed["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, vec![parked.as_str()], "{listed}");

    // Nothing of the deleted runs is left in the file.
    let url = format!("sqlite://{}?mode=ro", dir.db().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.expect("open");
    for (table, column) in [
        ("runs", "id"),
        ("events", "run_id"),
        ("tasks", "run_id"),
        ("dead_letters", "run_id"),
        ("deltas", "run_id"),
    ] {
        let others: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {column} <> ?"
        )))
        .bind(&parked)
        .fetch_one(&mut db)
        .await
        .expect("count");
        assert_eq!(others, 0, "rows of deleted runs left in {table}");
    }
    let _ = db.close().await;

    // The idempotency key went with its run: the same key is a new run.
    let again = submit_keyed(&http, &server, "order-1").await;
    assert_ne!(&again, ended.last().expect("keyed run"));
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(log.contains("retention: deleted runs"), "{log}");
    assert!(!log.contains("sweep failed"), "{log}");
}

#[tokio::test]
async fn delete_removes_an_ended_run_and_refuses_one_that_has_not_ended() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    let http = reqwest::Client::new();
    agents(&http, &server, &mock).await;
    let done = submit(&http, &server, "echo", "hello").await;
    wait_terminal(&http, &server, &done, Duration::from_secs(30)).await;
    let parked = submit(&http, &server, "gate", "pay").await;
    wait_for(&http, &server, &parked, "parking", |r| {
        r["status"] == "AWAITING_APPROVAL"
    })
    .await;

    let delete = |id: String| {
        let http = http.clone();
        let url = server.url(&format!("/v1/runs/{id}"));
        async move {
            let r = http.delete(url).send().await.expect("delete");
            let status = r.status().as_u16();
            let body = r.text().await.unwrap_or_default();
            (status, body)
        }
    };
    let (status, body) = delete(done.clone()).await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(run_status(&http, &server, &done).await, 404);
    let (status, body) = delete(done.clone()).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains(&done), "{body}");

    let (status, body) = delete(parked.clone()).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("AWAITING_APPROVAL"), "{body}");
    assert!(body.contains("cancel it first"), "{body}");
    assert_eq!(run_status(&http, &server, &parked).await, 200);

    // As for GET: an id that is no run id names no run.
    let (status, body) = delete("not-a-run".to_string()).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("not-a-run"), "{body}");
}

#[tokio::test]
async fn two_processes_sweep_one_postgres_database() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let args = [
        "--database-url",
        db.url.as_str(),
        "--retention",
        "2s",
        "--retention-interval",
        "200ms",
    ];
    let first = Server::start(&dir.db(), &args).await;
    let second = Server::start(&dir.db(), &args).await;
    let http = reqwest::Client::new();
    agents(&http, &first, &mock).await;
    let parked = submit(&http, &first, "gate", "pay").await;
    let mut ended = submit_many(&http, &first, "echo", 60).await;
    ended.extend(submit_many(&http, &second, "echo", 60).await);
    // Only ended runs are deleted, so gone means ended (a run may be gone
    // before a poll would have seen it end).
    wait_gone(&http, &second, &ended, Duration::from_secs(60)).await;
    let calls = mock
        .counters
        .tool_requests
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(calls >= 120, "each run made its tool call: {calls}");
    let run = get_json(&http, &first.url(&format!("/v1/runs/{parked}"))).await;
    assert_eq!(run["status"], "AWAITING_APPROVAL", "{run}");

    let mut conn = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    for table in ["runs", "events", "tasks", "dead_letters", "deltas"] {
        let column = if table == "runs" { "id" } else { "run_id" };
        let others: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} WHERE {column} <> $1::uuid"
        )))
        .bind(&parked)
        .fetch_one(&mut conn)
        .await
        .expect("count");
        assert_eq!(others, 0, "rows of deleted runs left in {table}");
    }
    let _ = conn.close().await;
    for server in [&first, &second] {
        let log = std::fs::read_to_string(&server.log).unwrap_or_default();
        assert!(!log.contains("sweep failed"), "{log}");
    }
}
