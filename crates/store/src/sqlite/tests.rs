//! What only the SQLite backend has: its file, its schema versions, its
//! query plans, and the writer's handling of a broken op in a batch. The shared behaviour is in
//! `conformance`.

use std::path::{Path, PathBuf};

use keel_core::{Event, Priority, RunId};
use serde_json::json;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, SqliteConnection};

use super::{SqliteStore, Wal, migrate};
use crate::{Error, NewTask, Store, Submission, TaskKind};

/// A database path in the temp dir, deleted (with its WAL) when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new() -> TempPath {
        let name = format!("keel-sqlite-test-{}.db", uuid::Uuid::now_v7());
        TempPath(std::env::temp_dir().join(name))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connection of its own, to look at or damage what the store wrote.
async fn raw(path: &Path) -> SqliteConnection {
    SqliteConnectOptions::new()
        .filename(path)
        .connect()
        .await
        .expect("raw connection")
}

fn submission(key: Option<&str>) -> Submission {
    Submission {
        run_id: RunId::new(),
        tenant: "t".to_string(),
        agent: "a".to_string(),
        version: "1".to_string(),
        input: json!("hi"),
        idempotency_key: key.map(str::to_string),
        priority: Priority::DEFAULT,
        event: Event::RunSubmitted {
            tenant: "t".to_string(),
            agent: "a".to_string(),
            version: "1".to_string(),
            input: json!("hi"),
            priority: Priority::DEFAULT,
            parent: None,
            callback_url: None,
        },
        task: NewTask {
            kind: TaskKind::Llm,
            step: 1,
            priority: Priority::DEFAULT,
            max_attempts: 3,
            run_at: 0,
            lease_to: None,
            queue: None,
        },
        now: 0,
    }
}

#[tokio::test]
async fn reopening_keeps_data_and_applies_migrations_once() {
    let path = TempPath::new();
    let store = SqliteStore::open(&path.0).await.expect("open");
    let sub = submission(None);
    store.submit(sub.clone()).await.expect("submit");
    drop(store);

    let store = SqliteStore::open(&path.0).await.expect("reopen");
    let run = store.get_run(sub.run_id).await.expect("read");
    assert!(run.is_some(), "the run survived");
    let mut conn = raw(&path.0).await;
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM keel_migrations")
        .fetch_all(&mut conn)
        .await
        .expect("history");
    assert_eq!(
        versions,
        (1..=migrate::MIGRATIONS.len() as i64).collect::<Vec<_>>()
    );
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn an_older_schema_is_brought_up_to_date() {
    let path = TempPath::new();
    let mut conn = SqliteConnectOptions::new()
        .filename(&path.0)
        .create_if_missing(true)
        .connect()
        .await
        .expect("create");
    migrate::apply(&mut conn, &migrate::MIGRATIONS[..1])
        .await
        .expect("version 1");
    let run_id = RunId::new();
    sqlx::query(
        "INSERT INTO runs (id, tenant, agent, version, status, steps, input, input_tokens, \
             output_tokens, last_seq, created_at, updated_at) \
         VALUES (?1, 't', 'a', '1', 'AWAITING_LLM', 0, '\"hi\"', 0, 0, 0, 0, 0)",
    )
    .bind(run_id.to_string())
    .execute(&mut conn)
    .await
    .expect("a run of version 1");
    drop(conn);

    let store = SqliteStore::open(&path.0).await.expect("open");
    let mut conn = raw(&path.0).await;
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM keel_migrations")
        .fetch_all(&mut conn)
        .await
        .expect("history");
    assert_eq!(
        versions,
        (1..=migrate::MIGRATIONS.len() as i64).collect::<Vec<_>>()
    );
    // The new index holds the runs that were there.
    assert_eq!(store.pending_runs("t", Some("a")).await.expect("count"), 1);
    let run = store.get_run(run_id).await.expect("read").expect("the run");
    assert_eq!(run.priority, Priority::DEFAULT);
    store.enable_export().await.expect("export");
    store.submit(submission(None)).await.expect("submit");
    assert_eq!(store.outbox(10).await.expect("outbox").len(), 1);
}

/// `pending_runs` must stay cheap with many finished runs.
#[tokio::test]
async fn pending_runs_are_counted_from_an_index() {
    let path = TempPath::new();
    drop(SqliteStore::open(&path.0).await.expect("open"));
    let mut conn = raw(&path.0).await;
    for (sql, params) in [
        (super::PENDING_RUNS, &["t"][..]),
        (super::PENDING_RUNS_OF_AGENT, &["t", "a"][..]),
    ] {
        let mut query = sqlx::query_as(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
        for param in params {
            query = query.bind(*param);
        }
        let plan: Vec<(i64, i64, i64, String)> = query.fetch_all(&mut conn).await.expect("plan");
        // Either index visits unfinished runs only: `runs_pending`, or
        // `runs_by_status` searched for each unfinished status.
        let plan: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
        let only_pending = |step: &&str| {
            step.starts_with("SEARCH runs USING COVERING INDEX runs_pending")
                || step.contains("runs_by_status (tenant=? AND status=?)")
        };
        assert!(
            plan.len() == 1 && plan.iter().all(only_pending),
            "{sql}: {plan:?}"
        );
    }
}

/// A claim reads the rank index from its start, in its order: no sort,
/// no scan of the table.
#[tokio::test]
async fn claims_scan_the_rank_index() {
    let path = TempPath::new();
    drop(SqliteStore::open(&path.0).await.expect("open"));
    let mut conn = raw(&path.0).await;
    let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "EXPLAIN QUERY PLAN {}",
        super::queue::CLAIM
    )))
    .bind("w")
    .bind(2_i64)
    .bind(1_i64)
    .bind(10_i64)
    .fetch_all(&mut conn)
    .await
    .expect("plan");
    let plan: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
    assert!(
        plan.iter().any(
            |step| step.contains("USING COVERING INDEX tasks_by_rank (<expr><?)")
                || step.contains("USING INDEX tasks_by_rank (<expr><?)")
        ),
        "{plan:?}"
    );
    assert!(
        !plan.iter().any(|step| step.contains("TEMP B-TREE")),
        "{plan:?}"
    );
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let path = TempPath::new();
    drop(SqliteStore::open(&path.0).await.expect("open"));
    let mut conn = raw(&path.0).await;
    sqlx::query("INSERT INTO keel_migrations (version, name, applied_at) VALUES (99, 'x', 0)")
        .execute(&mut conn)
        .await
        .expect("fake a newer version");
    match SqliteStore::open(&path.0).await {
        Err(Error::Backend(message)) => assert!(message.contains("99"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_op_fails_alone() {
    let path = TempPath::new();
    let store = SqliteStore::open(&path.0).await.expect("open");
    let first = submission(Some("k"));
    store.submit(first.clone()).await.expect("submit");
    let mut conn = raw(&path.0).await;
    sqlx::query("UPDATE runs SET input = 'not json' WHERE id = ?1")
        .bind(first.run_id.to_string())
        .execute(&mut conn)
        .await
        .expect("damage the run");

    // The repeat of the damaged run's key fails; everything around it,
    // likely in the same batch, commits.
    let mut others = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        others.push(tokio::spawn(
            async move { store.submit(submission(None)).await },
        ));
    }
    let repeat = submission(Some("k"));
    match store.submit(repeat).await {
        Err(Error::Corrupt(message)) => assert!(message.contains("input"), "{message}"),
        other => panic!("expected corrupt data, got {other:?}"),
    }
    for other in others {
        let submitted = other.await.expect("no panic").expect("submitted");
        assert!(submitted.created);
        let run = store.get_run(submitted.run_id).await.expect("read");
        assert!(run.is_some());
    }
}

#[tokio::test]
async fn recovering_gives_back_every_live_lease() {
    let path = TempPath::new();
    let store = SqliteStore::open(&path.0).await.expect("open");
    for _ in 0..3 {
        store.submit(submission(None)).await.expect("submit");
    }
    let lease = std::time::Duration::from_secs(60);
    assert_eq!(store.claim("a", 2, lease, 0).await.expect("claim").len(), 2);
    assert_eq!(store.claim("b", 2, lease, 0).await.expect("claim").len(), 1);

    assert_eq!(store.recover_leases(10).await.expect("recover"), 3);
    let again = store.claim("c", 10, lease, 10).await.expect("claim");
    assert_eq!(again.len(), 3);
    assert!(
        again.iter().all(|t| t.attempts == 2),
        "attempts stay counted"
    );
    assert_eq!(store.recover_leases(10).await.expect("recover"), 3);
    assert_eq!(store.recover_leases(70_000).await.expect("nothing live"), 0);
}

/// While a long reader (a backup, a big report) holds a snapshot, the
/// checkpoints cannot reach the frames after it and the WAL grows past the
/// checkpoint size; once the reader is gone, the file is cut back to the
/// limit instead of staying at its largest.
#[tokio::test]
async fn the_wal_is_cut_back_after_a_long_reader() {
    let path = TempPath::new();
    let limit = 64 * 4096;
    let wal = Wal {
        checkpoint_pages: 16,
        size_limit: limit,
    };
    let store = SqliteStore::open_with(&path.0, wal).await.expect("open");
    store.submit(submission(None)).await.expect("submit");
    let mut wal_path = path.0.clone().into_os_string();
    wal_path.push("-wal");
    let wal_size = || std::fs::metadata(&wal_path).map_or(0, |m| m.len());

    let mut reader = raw(&path.0).await;
    sqlx::raw_sql("BEGIN; SELECT count(*) FROM runs;")
        .execute(&mut reader)
        .await
        .expect("read");
    let big = json!("x".repeat(16 * 1024));
    for _ in 0..1000 {
        if wal_size() > 4 * limit {
            break;
        }
        let mut sub = submission(None);
        sub.input = big.clone();
        store.submit(sub).await.expect("submit");
    }
    let grown = wal_size();
    assert!(
        grown > 4 * limit,
        "the reader did not hold the WAL: {grown}"
    );

    sqlx::raw_sql("COMMIT")
        .execute(&mut reader)
        .await
        .expect("end the read");
    // The first commit checkpoints it all, the next starts the WAL over.
    for _ in 0..3 {
        store.submit(submission(None)).await.expect("submit");
    }
    let cut = wal_size();
    assert!(
        cut <= limit,
        "the WAL stayed at {cut} bytes (it grew to {grown})"
    );
}
