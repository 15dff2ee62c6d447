//! What only the PostgreSQL backend has: several processes (here, several
//! stores) sharing one database, its migrations, its notifications, and the
//! writer's handling of a broken op and of connections gone silent. The shared behaviour is in
//! `conformance`, which runs against PostgreSQL through [`open`].
//!
//! Each test makes a database of its own on the server named by
//! `KEEL_TEST_DATABASE_URL` (default: `postgres://postgres@127.0.0.1:5432/postgres`)
//! and drops it at the end. With no server there, the tests are skipped,
//! unless `CI=true`, where they fail.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keel_core::{Event, Millis, Priority, RunId, Seq};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

use super::{Options, PgStore, RECONNECTED, listen, migrate};
use crate::{
    Append, Committed, Error, LeaseTo, NewTask, Projection, Result, Store, Submission, TaskKind,
    TaskUpdate,
};

/// Where the test server is unless `KEEL_TEST_DATABASE_URL` says otherwise.
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A database of one test's own, dropped (best effort) with this.
pub(crate) struct TestDb {
    /// The database's URL.
    pub(crate) url: String,
    name: String,
    server: String,
}

impl TestDb {
    /// Creates a fresh database, or returns `None` (with a note on stderr)
    /// if the server is unreachable. With `CI=true`, an unreachable server
    /// fails the test instead.
    pub(crate) async fn create() -> Option<TestDb> {
        let server =
            std::env::var("KEEL_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_string());
        let connected =
            tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&server));
        match connected.await {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            Ok(Err(e)) => return unreachable(&server, &e.to_string()),
            Err(_) => return unreachable(&server, "timed out"),
        };
        let scratch = super::create_database(&server, "keel_test")
            .await
            .expect("create the test database");
        Some(TestDb {
            url: scratch.url,
            name: scratch.name,
            server,
        })
    }
}

/// Skips the test, or fails it on CI.
fn unreachable(server: &str, why: &str) -> Option<TestDb> {
    if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        panic!("PostgreSQL at {server} is unreachable ({why}); CI=true requires it");
    }
    eprintln!("note: skipping a PostgreSQL test: {server} is unreachable ({why})");
    None
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot block on a
        // future: use a runtime of its own on another thread.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(super::drop_database(&server, &name)).ok()
        });
        if dropped.join().ok().flatten().is_none() {
            eprintln!("note: could not drop test database {}", self.name);
        }
    }
}

/// A store on a fresh database, for the conformance suite.
pub(crate) async fn open() -> Result<Option<(PgStore, TestDb)>> {
    let Some(db) = TestDb::create().await else {
        return Ok(None);
    };
    let store = PgStore::connect(&db.url).await?;
    Ok(Some((store, db)))
}

/// Two stores on one fresh database: two processes sharing it.
async fn two() -> Result<Option<(PgStore, PgStore, TestDb)>> {
    let Some(db) = TestDb::create().await else {
        return Ok(None);
    };
    let a = PgStore::connect(&db.url).await?;
    let b = PgStore::connect(&db.url).await?;
    Ok(Some((a, b, db)))
}

/// A connection of its own, to look at or damage what the stores wrote.
async fn raw(db: &TestDb) -> PgConnection {
    PgConnection::connect(&db.url)
        .await
        .expect("raw connection")
}

const T0: Millis = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(60);

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
            run_at: T0,
            lease_to: None,
            queue: None,
        },
        now: T0,
    }
}

/// An append of one event that changes nothing else.
fn append(run_id: RunId, expected_seq: Seq, event: Event) -> Append {
    Append {
        run_id,
        expected_seq,
        events: vec![event],
        lease: None,
        task: TaskUpdate::Keep,
        new_tasks: Vec::new(),
        clear_tasks: false,
        redrive: None,
        projection: Projection {
            status: keel_core::run::Status::AwaitingLlm,
            steps: 0,
            output: None,
            error: None,
            usage: Default::default(),
            cost_usd: 0.0,
        },
        now: T0 + 1,
        spawn: Vec::new(),
        wake: Vec::new(),
    }
}

fn rejected(error: &str) -> Event {
    Event::LlmRejected {
        step: 1,
        error: error.to_string(),
    }
}

async fn next(commits: &mut broadcast::Receiver<Committed>) -> Committed {
    tokio::time::timeout(Duration::from_secs(5), commits.recv())
        .await
        .expect("a notification in time")
        .expect("the channel is open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_never_overlap_across_stores() -> Result<()> {
    const RUNS: usize = 300;
    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    for _ in 0..RUNS {
        a.submit(submission(None)).await?;
    }
    let mut claimers = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        claimers.push(tokio::spawn(async move {
            let owner = format!("w{i}");
            let mut ids = Vec::new();
            loop {
                let tasks = store.claim(&owner, 5, LEASE, T0).await?;
                if tasks.is_empty() {
                    return Ok::<_, Error>(ids);
                }
                ids.extend(tasks.iter().map(|t| t.lease.task_id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for claimer in claimers {
        for id in claimer.await.expect("claimer panicked")? {
            assert!(seen.insert(id), "task {id} claimed twice");
        }
    }
    assert_eq!(seen.len(), RUNS);
    assert!(a.claim("x", 10, LEASE, T0).await?.is_empty());
    assert!(b.claim("x", 10, LEASE, T0).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_appends_across_stores_have_one_winner() -> Result<()> {
    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    let mut runs = Vec::new();
    for _ in 0..8 {
        let sub = submission(None);
        runs.push(sub.run_id);
        a.submit(sub).await?;
    }
    let mut racers = Vec::new();
    for &run_id in &runs {
        for i in 0..16 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            racers.push(tokio::spawn(async move {
                let event = rejected(&format!("racer {i}"));
                store.append(append(run_id, 1, event)).await
            }));
        }
    }
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("racer panicked") {
            Ok(appended) => {
                assert_eq!(appended.last_seq, 2);
                won += 1;
            }
            Err(Error::SeqConflict { actual: 2, .. }) => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(won, runs.len(), "exactly one winner per run");
    for run_id in runs {
        assert_eq!(b.events(run_id, 0, 100).await?.len(), 2);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_heard_across_stores() -> Result<()> {
    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    let mut heard_a = a.subscribe();
    let mut heard_b = b.subscribe();

    // A commit through A: B hears it through NOTIFY.
    let first = submission(None);
    a.submit(first.clone()).await?;
    let submitted = Committed {
        run_id: first.run_id,
        last_seq: 1,
        new_work: true,
    };
    assert_eq!(next(&mut heard_b).await, submitted);

    // A lease taken through B fences a write made through A, which B hears.
    let task = b.claim("w", 1, LEASE, T0).await?.remove(0);
    let mut step = append(first.run_id, 1, rejected("x"));
    step.lease = Some(task.lease);
    a.append(step).await?;
    let appended = Committed {
        run_id: first.run_id,
        last_seq: 2,
        new_work: false,
    };
    assert_eq!(next(&mut heard_b).await, appended);

    // A hears its own commits once (at commit, not again through NOTIFY),
    // and B's through NOTIFY, in commit order.
    let second = submission(None);
    b.submit(second.clone()).await?;
    assert_eq!(next(&mut heard_a).await, submitted);
    assert_eq!(next(&mut heard_a).await, appended);
    let from_b = Committed {
        run_id: second.run_id,
        last_seq: 1,
        new_work: true,
    };
    assert_eq!(next(&mut heard_a).await, from_b);
    assert_eq!(next(&mut heard_b).await, from_b);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(heard_a.try_recv().is_err(), "no duplicates");
    assert!(heard_b.try_recv().is_err(), "no duplicates");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listen_connection_is_replaced() -> Result<()> {
    let Some((a, b, db)) = two().await? else {
        return Ok(());
    };
    let mut heard = b.subscribe();
    let mut conn = raw(&db).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = $1",
    )
    .bind(listen::APPLICATION_NAME)
    .fetch_all(&mut conn)
    .await
    .expect("terminate the listeners");
    assert_eq!(killed, vec![true, true], "one listener per store");

    // B wakes its subscribers once it listens again, and then hears A's
    // commits (A notifies through its write connection, which was spared).
    assert_eq!(next(&mut heard).await, RECONNECTED);
    let sub = submission(None);
    a.submit(sub.clone()).await?;
    loop {
        let commit = next(&mut heard).await;
        if commit != RECONNECTED {
            assert_eq!((commit.run_id, commit.last_seq), (sub.run_id, 1));
            break;
        }
    }
    Ok(())
}

/// A TCP proxy in front of the test server that makes connections go
/// silent: no byte passes either way and nothing closes, as when the
/// network drops packets or a node vanishes without a word. Connections
/// opened later pass.
struct Silencer {
    port: u16,
    /// Connections opened before the latest of this many silences are silent.
    silences: Arc<AtomicU32>,
    /// Connections still to silence right after they pass on a `COMMIT`.
    after_commit: Arc<AtomicU32>,
    accept: tokio::task::JoinHandle<()>,
}

impl Silencer {
    async fn start(db: &TestDb) -> Silencer {
        let direct = PgConnectOptions::from_str(&db.url).expect("the URL parses");
        let upstream = format!("{}:{}", direct.get_host(), direct.get_port());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let silences = Arc::new(AtomicU32::new(0));
        let after_commit = Arc::new(AtomicU32::new(0));
        let (s, c) = (silences.clone(), after_commit.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if let Ok(server) = TcpStream::connect(&upstream).await {
                    let opened = s.load(Ordering::SeqCst);
                    tokio::spawn(relay(client, server, opened, s.clone(), c.clone()));
                }
            }
        });
        Silencer {
            port,
            silences,
            after_commit,
            accept,
        }
    }

    /// The URL of `db` through the proxy.
    fn url(&self, db: &TestDb) -> String {
        PgConnectOptions::from_str(&db.url)
            .expect("the URL parses")
            .host("127.0.0.1")
            .port(self.port)
            .ssl_mode(sqlx::postgres::PgSslMode::Disable)
            .to_url_lossy()
            .to_string()
    }

    /// Every connection open now goes silent for good.
    fn silence(&self) {
        self.silences.fetch_add(1, Ordering::SeqCst);
    }

    /// The next connection to send a `COMMIT` goes silent once it passed
    /// it on: the server commits, the client never hears of it.
    fn silence_after_commit(&self) {
        self.after_commit.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Silencer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Passes bytes both ways until either side closes or the connection goes
/// silent; then holds both sockets open, passing nothing, for good.
async fn relay(
    client: TcpStream,
    server: TcpStream,
    opened: u32,
    silences: Arc<AtomicU32>,
    after_commit: Arc<AtomicU32>,
) {
    /// The bytes of a simple-protocol `COMMIT`.
    const COMMIT: &[u8] = b"Q\x00\x00\x00\x0bCOMMIT\x00";
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    loop {
        let silent = tokio::select! {
            read = from_client.read(&mut up) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if silences.load(Ordering::SeqCst) != opened {
                    true
                } else {
                    if to_server.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                    let commits = up[..n].windows(COMMIT.len()).any(|w| w == COMMIT);
                    let take = |left: u32| left.checked_sub(1);
                    let (order, fail) = (Ordering::SeqCst, Ordering::SeqCst);
                    commits && after_commit.fetch_update(order, fail, take).is_ok()
                }
            }
            read = from_server.read(&mut down) => {
                let n = match read {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                silences.load(Ordering::SeqCst) != opened
                    || to_client.write_all(&down[..n]).await.is_err()
            }
        };
        if silent {
            break;
        }
    }
    // Both sockets stay open (they live to the end of this function).
    std::future::pending::<()>().await;
}

/// The network goes silent under a store: a read gives up after the
/// timeout with `Unavailable`, the next goes through a new connection; a
/// write batch whose connection went silent before its `COMMIT` runs again
/// on a new one and succeeds; the listener notices by its ping and listens
/// again; a batch whose `COMMIT` got no answer fails as unavailable, and
/// did commit: the same append again is refused, never applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_given_up_after_the_timeout() -> Result<()> {
    const TIMEOUT: Duration = Duration::from_millis(800);
    let Some(db) = TestDb::create().await else {
        return Ok(());
    };
    let silencer = Silencer::start(&db).await;
    // One read connection, so the read below takes the one gone silent.
    let store = PgStore::connect_with(Options {
        timeout: TIMEOUT,
        read_connections: 1,
        ..Options::new(silencer.url(&db))
    })
    .await?;
    let mut heard = store.subscribe();
    let sub = submission(None);
    store.submit(sub.clone()).await?;
    assert!(store.get_run(sub.run_id).await?.is_some());
    // The pool pings a connection given back before it takes it again.
    tokio::time::sleep(Duration::from_millis(100)).await;

    silencer.silence();
    let started = Instant::now();
    match store.get_run(sub.run_id).await {
        Err(Error::Unavailable(message)) => assert!(message.contains("no answer"), "{message}"),
        other => panic!("expected the read to give up, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= TIMEOUT && took < 2 * TIMEOUT,
        "the read gave up after {took:?}"
    );
    assert!(store.get_run(sub.run_id).await?.is_some());

    let started = Instant::now();
    let appended = store
        .append(append(sub.run_id, 1, rejected("after the silence")))
        .await?;
    assert_eq!(appended.last_seq, 2);
    let took = started.elapsed();
    assert!(
        took >= TIMEOUT && took < 2 * TIMEOUT,
        "the batch took {took:?}"
    );

    let deadline = Instant::now() + 4 * TIMEOUT + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, heard.recv()).await {
            Ok(Ok(commit)) if commit == RECONNECTED => break,
            Ok(Ok(_)) => {}
            other => panic!("the listener did not listen again: {other:?}"),
        }
    }

    silencer.silence_after_commit();
    let lost = append(sub.run_id, 2, rejected("its answer is lost"));
    match store.append(lost.clone()).await {
        Err(Error::Unavailable(message)) => assert!(message.contains("no answer"), "{message}"),
        other => panic!("expected an unknown outcome, got {other:?}"),
    }
    match store.append(lost).await {
        Err(Error::SeqConflict { .. }) => {}
        other => panic!("expected the committed append to refuse its repeat, got {other:?}"),
    }
    let events = store.events(sub.run_id, 0, 10).await?;
    assert_eq!(events.len(), 3, "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_are_safe() -> Result<()> {
    let Some(db) = TestDb::create().await else {
        return Ok(());
    };
    let newest = migrate::MIGRATIONS.len() as u32;
    let mut migrations = Vec::new();
    for _ in 0..4 {
        let url = db.url.clone();
        migrations.push(tokio::spawn(async move { PgStore::migrate(&url).await }));
    }
    let mut connects = Vec::new();
    for _ in 0..2 {
        let url = db.url.clone();
        connects.push(tokio::spawn(async move { PgStore::connect(&url).await }));
    }
    for migration in migrations {
        assert_eq!(migration.await.expect("no panic")?, newest);
    }
    for connect in connects {
        let store = connect.await.expect("no panic")?;
        assert!(store.get_run(RunId::new()).await?.is_none());
    }
    assert_eq!(PgStore::migrate(&db.url).await?, newest);

    let mut conn = raw(&db).await;
    let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM keel_migrations")
        .fetch_all(&mut conn)
        .await
        .expect("history");
    assert_eq!(versions, (1..=newest as i32).collect::<Vec<_>>());

    // A schema newer than this build is refused.
    sqlx::query("INSERT INTO keel_migrations (version, name, applied_at) VALUES (99, 'x', 0)")
        .execute(&mut conn)
        .await
        .expect("fake a newer version");
    match PgStore::connect(&db.url).await {
        Err(Error::Backend(message)) => assert!(message.contains("99"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_brought_up_to_date() -> Result<()> {
    let Some(db) = TestDb::create().await else {
        return Ok(());
    };
    let mut conn = raw(&db).await;
    assert_eq!(
        migrate::apply(&mut conn, &migrate::MIGRATIONS[..1]).await?,
        1
    );
    let run_id = RunId::new();
    sqlx::query(
        "INSERT INTO runs (id, tenant, agent, version, status, steps, input, input_tokens, \
             output_tokens, last_seq, created_at, updated_at) \
         VALUES ($1, 't', 'a', '1', 'AWAITING_LLM', 0, '\"hi\"', 0, 0, 0, 0, 0)",
    )
    .bind(run_id.0)
    .execute(&mut conn)
    .await
    .expect("a run of version 1");
    let done = RunId::new();
    sqlx::query(
        "INSERT INTO runs (id, tenant, agent, version, status, steps, input, input_tokens, \
             output_tokens, last_seq, created_at, updated_at) \
         VALUES ($1, 't', 'a', '1', 'COMPLETED', 1, '\"hi\"', 0, 0, 0, 0, 0)",
    )
    .bind(done.0)
    .execute(&mut conn)
    .await
    .expect("a finished run of version 1");

    let store = PgStore::connect(&db.url).await?;
    let versions: Vec<i32> = sqlx::query_scalar("SELECT version FROM keel_migrations")
        .fetch_all(&mut conn)
        .await
        .expect("history");
    assert_eq!(
        versions,
        (1..=migrate::MIGRATIONS.len() as i32).collect::<Vec<_>>()
    );
    // The new indexes hold the runs that were there: the unfinished one is
    // pending, the finished one is listed by its status (its outcome).
    assert_eq!(store.pending_runs("t", Some("a")).await?, 1);
    assert!(store.get_run(run_id).await?.is_some());
    let listed = |status| crate::RunFilter {
        tenant: "t".into(),
        status: Some(status),
        agent: None,
        before: None,
        limit: 10,
    };
    let completed = store
        .list_runs(listed(keel_core::run::Status::Completed))
        .await?;
    assert_eq!(completed.iter().map(|r| r.id).collect::<Vec<_>>(), [done]);
    let awaiting = store
        .list_runs(listed(keel_core::run::Status::AwaitingLlm))
        .await?;
    assert_eq!(awaiting.iter().map(|r| r.id).collect::<Vec<_>>(), [run_id]);
    store.enable_export().await?;
    store.submit(submission(None)).await?;
    assert_eq!(store.outbox(10).await?.len(), 1);
    Ok(())
}

/// A run's status flips between AWAITING_LLM and AWAITING_TOOL at almost
/// every append. Its row must still be updated in place (HOT: no index of
/// `runs` holds the status), or every append writes into every index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_update_run_rows_in_place() -> Result<()> {
    use keel_core::run::Status;
    let Some((store, db)) = open().await? else {
        return Ok(());
    };
    let sub = submission(None);
    store.submit(sub.clone()).await?;
    let appends = 20;
    for seq in 1..=appends {
        let mut next = append(sub.run_id, seq, rejected("x"));
        next.projection.status = if seq % 2 == 0 {
            Status::AwaitingLlm
        } else {
            Status::AwaitingTool
        };
        // The tokens and cost grow with every step; no index holds them.
        next.projection.usage.input_tokens = 10 * seq as u64;
        next.projection.cost_usd = 0.001 * seq as f64;
        store.append(next).await?;
    }
    // The writer's session reports its statistics when it ends.
    drop(store);
    let mut conn = raw(&db).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (updates, hot): (i64, i64) = sqlx::query_as(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'runs'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("table statistics");
        if updates >= appends {
            assert_eq!(hot, updates, "{updates} updates of runs, only {hot} HOT");
            return Ok(());
        }
        assert!(
            Instant::now() < deadline,
            "the statistics show {updates} of {appends} updates"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `pending_runs` must stay cheap with many finished runs: the planner can
/// use the partial index (it proves the query's statuses imply its WHERE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_runs_are_counted_from_their_index() -> Result<()> {
    let Some((_store, db)) = open().await? else {
        return Ok(());
    };
    let mut conn = raw(&db).await;
    // The table is empty: keep the planner from a sequential scan.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut conn)
        .await
        .expect("set");
    for (sql, params) in [
        (super::PENDING_RUNS, &["t"][..]),
        (super::PENDING_RUNS_OF_AGENT, &["t", "a"][..]),
    ] {
        let mut query = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {sql}")));
        for param in params {
            query = query.bind(*param);
        }
        let plan: Vec<String> = query.fetch_all(&mut conn).await.expect("plan");
        assert!(
            plan.iter()
                .any(|line| line.contains("Index Only Scan using runs_pending")),
            "{sql}: {plan:#?}"
        );
    }
    Ok(())
}

/// An agent's usage reads its runs through `runs_by_agent`, not every run
/// of the tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_usage_reads_the_agent_index() -> Result<()> {
    let Some((_store, db)) = open().await? else {
        return Ok(());
    };
    let mut conn = raw(&db).await;
    // Mostly finished runs of many agents, as a busy tenant has, and their
    // statistics (on an empty table any index looks as good).
    for sql in [
        "INSERT INTO runs (id, tenant, agent, version, status, outcome, steps, input, \
             input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at) \
         SELECT md5(i::text)::uuid, 't', 'agent-' || (i % 50), '1', 'COMPLETED', 'COMPLETED', \
             1, '\"hi\"', 10, 20, 0.01, 3, i, i \
         FROM generate_series(1, 5000) AS i",
        "ANALYZE runs",
        "SET enable_seqscan = off",
    ] {
        sqlx::query(sql).execute(&mut conn).await.expect(sql);
    }
    let plan: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", super::USAGE_OF_AGENT)))
            .bind("t")
            .bind(0_i64)
            .bind("agent-7")
            .fetch_all(&mut conn)
            .await
            .expect("plan");
    assert!(
        plan.iter().any(|line| line.contains("runs_by_agent")),
        "{plan:#?}"
    );
    Ok(())
}

/// A claim reads the rank index from its start up to `now`, in its order,
/// checking dueness on the index entries: no sort, no scan of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_scan_the_rank_index() -> Result<()> {
    let Some((_store, db)) = open().await? else {
        return Ok(());
    };
    let mut conn = raw(&db).await;
    // The table is empty: keep the planner from a sequential scan.
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut conn)
        .await
        .expect("set");
    let plan: Vec<String> =
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {}", super::queue::CLAIM)))
            .bind("w")
            .bind(T0 + 60_000)
            .bind(T0)
            .bind(10_i64)
            .fetch_all(&mut conn)
            .await
            .expect("plan");
    let scan = plan
        .iter()
        .position(|line| line.contains("Index Scan using tasks_by_rank"));
    let Some(scan) = scan else {
        panic!("the claim does not scan tasks_by_rank: {plan:#?}");
    };
    assert!(
        plan[scan + 1].contains("Index Cond") && plan[scan + 1].contains("visible_at <= "),
        "dueness is not checked on the index: {plan:#?}"
    );
    assert!(!plan.iter().any(|line| line.contains("Sort")), "{plan:#?}");
    Ok(())
}

/// `keel serve` warns when the server does not vacuum (the queue's tables
/// then bloat and their plans go stale): the setting read is the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autovacuum_is_the_servers_setting() -> Result<()> {
    let Some((store, db)) = open().await? else {
        return Ok(());
    };
    let mut conn = raw(&db).await;
    let shown: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(&mut conn)
        .await
        .expect("show");
    assert_eq!(store.autovacuum().await?, shown == "on", "{shown}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_switch_is_shared_by_every_store() -> Result<()> {
    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    b.submit(submission(None)).await?;
    a.enable_export().await?;
    // b's writer reads the switch in each batch: its next commit is exported.
    let sub = submission(None);
    b.submit(sub.clone()).await?;
    b.append(append(sub.run_id, 1, rejected("x"))).await?;
    let entries = a.outbox(100).await?;
    let seqs: Vec<(RunId, Seq, usize)> = entries
        .iter()
        .map(|e| (e.run.id, e.events[0].seq, e.events.len()))
        .collect();
    assert_eq!(seqs, vec![(sub.run_id, 1, 1), (sub.run_id, 2, 1)]);
    assert_eq!(b.outbox(100).await?, entries);

    // One relay at a time, across processes.
    assert!(a.relay_lease("relay", "a", T0 + 100, T0).await?);
    assert!(!b.relay_lease("relay", "b", T0 + 100, T0 + 1).await?);
    b.ack_outbox(&[entries[0].id]).await?;
    assert_eq!(a.outbox(100).await?, entries[1..]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_export_off_waits_for_batches_in_flight() -> Result<()> {
    let Some((a, b, db)) = two().await? else {
        return Ok(());
    };
    a.enable_export().await?;
    let sub = submission(None);
    b.submit(sub.clone()).await?;

    // A batch of another process that read the switch as on, not committed yet.
    let mut conn = raw(&db).await;
    let mut batch = conn.begin().await.expect("begin");
    let inserted = sqlx::query(
        "INSERT INTO outbox (run_id, first_seq, last_seq) SELECT $1, 1, 1 \
         WHERE EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on')",
    )
    .bind(sub.run_id.0)
    .execute(&mut *batch)
    .await
    .expect("insert an entry")
    .rows_affected();
    assert_eq!(inserted, 1);

    let disable = tokio::spawn({
        let a = a.clone();
        async move { a.disable_export().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!disable.is_finished(), "it waits for the batch");
    // A batch that inserts its events now waits for the switch, then reads it as off.
    let late = tokio::spawn({
        let b = b.clone();
        async move { b.append(append(sub.run_id, 1, rejected("late"))).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!late.is_finished(), "it waits for the switch");

    batch.commit().await.expect("commit");
    let dropped = disable.await.expect("no panic")?;
    assert_eq!(dropped, 2, "the submit's entry and the batch's");
    assert_eq!(late.await.expect("no panic")?.last_seq, 2);
    assert!(a.outbox(100).await?.is_empty(), "no entry outlives it");
    assert!(!b.export_status("relay", T0).await?.enabled);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_op_fails_alone() -> Result<()> {
    let Some((store, db)) = open().await? else {
        return Ok(());
    };
    let mut early = submission(None);
    early.task.run_at = T0 - 1000;
    store.submit(early.clone()).await?;
    sqlx::query("UPDATE tasks SET kind = 'bogus' WHERE run_id = $1")
        .bind(early.run_id.0)
        .execute(&mut raw(&db).await)
        .await
        .expect("damage the task");

    // The claim of the damaged task fails; the writes around it, likely in
    // the same batch, commit.
    let mut others = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        others.push(tokio::spawn(async move {
            let sub = submission(None);
            store.submit(sub.clone()).await?;
            store.append(append(sub.run_id, 1, rejected("fine"))).await
        }));
    }
    match store.claim("w", 1, LEASE, T0 - 500).await {
        Err(Error::Corrupt(message)) => assert!(message.contains("bogus"), "{message}"),
        other => panic!("expected corrupt data, got {other:?}"),
    }
    for other in others {
        let appended = other.await.expect("no panic")?;
        assert_eq!(appended.last_seq, 2);
    }
    // The failed claim took nothing.
    let mut conn = raw(&db).await;
    let leased: i64 =
        sqlx::query_scalar("SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL")
            .fetch_one(&mut conn)
            .await
            .expect("count leases");
    assert_eq!(leased, 0);
    Ok(())
}

/// Takers on two stores (two worker processes) hammer one key, each with a
/// clock of its own: it goes on a little after a grant, to its reserved
/// time after a reservation (half of them wait up to 300 ms), to the
/// `RetryAt` (and a few ms) after a refusal. Whatever the interleaving,
/// the units granted in any window stay within `per_window + burst - 1`,
/// and the limit is used: the takers ask for more than it allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_stores() -> Result<()> {
    use crate::{Grant, Rate};

    /// Simulated span of the run: ten windows.
    const WINDOWS: i64 = 10;
    const WINDOW_MS: i64 = 1_000;
    const TAKERS: usize = 16;

    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    // Requests per window, one at a time; tokens per window, costs up to the burst.
    let limits = [("model:rpm", 40, 1, 1), ("model:tpm", 400, 40, 40)];
    for (key, per_window, burst, max_cost) in limits {
        let rate = Rate {
            per_window,
            window: Duration::from_millis(WINDOW_MS as u64),
            burst,
        };
        let end = T0 + WINDOWS * WINDOW_MS;
        let mut takers = Vec::new();
        for i in 0..TAKERS {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            let max_wait = Duration::from_millis(if i % 4 < 2 { 0 } else { 300 });
            takers.push(tokio::spawn(async move {
                let mut rng = fastrand::Rng::with_seed(i as u64);
                let mut grants = Vec::new();
                let mut now = T0;
                while now < end {
                    let cost = rng.u64(1..=max_cost);
                    match store.take_capacity(key, rate, cost, max_wait, now).await? {
                        Grant::Granted => {
                            grants.push((now, cost));
                            now += rng.i64(0..=20);
                        }
                        Grant::Reserved(at) => {
                            assert!(at > now && at <= now + 300, "{at} for {now}");
                            grants.push((at, cost));
                            now = at;
                        }
                        Grant::RetryAt(at) => {
                            assert!(at > now, "{at} for {now}");
                            now = at + rng.i64(0..=3);
                        }
                    }
                }
                Ok::<_, Error>(grants)
            }));
        }
        let mut grants = Vec::new();
        for taker in takers {
            grants.extend(taker.await.expect("taker panicked")?);
        }
        grants.sort_unstable();

        let (mut start, mut units, mut most) = (0, 0, 0);
        for end in 0..grants.len() {
            units += grants[end].1;
            while grants[start].0 + WINDOW_MS <= grants[end].0 {
                units -= grants[start].1;
                start += 1;
            }
            most = most.max(units);
        }
        assert!(
            most < per_window + burst,
            "{key}: {most} units in a window, at most {} allowed",
            per_window + burst - 1
        );
        let used: u64 = grants.iter().filter(|g| g.0 < end).map(|g| g.1).sum();
        let allowed = per_window * WINDOWS as u64;
        assert!(
            used * 10 >= allowed * 9,
            "{key}: {used} units granted in {WINDOWS} windows of {per_window}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn an_empty_statement_cache_is_refused() {
    let options = Options {
        statement_cache_capacity: 0,
        ..Options::new(DEFAULT_SERVER)
    };
    match PgStore::connect_with(options).await {
        Err(Error::Backend(message)) => assert!(message.contains("statement_cache_capacity")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let shown = format!("{:?}", Options::new("postgres://u:secret@h/db"));
    assert!(!shown.contains("secret"), "{shown}");
}

/// Two stores (two worker processes) each appending from 100 concurrent
/// tasks, the way the engine makes a step. Not an assertion: run it with
/// `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput check: cargo test -p keel-store -- --ignored --nocapture"]
async fn two_store_write_throughput() -> Result<()> {
    const WORKERS: usize = 100;
    const STEPS: Seq = 100;
    let Some((a, b, _db)) = two().await? else {
        return Ok(());
    };
    let mut tasks = Vec::new();
    for store in [&a, &b] {
        for _ in 0..WORKERS {
            store.submit(submission(None)).await?;
        }
        let claimed = store
            .claim("bench", WORKERS as u32, Duration::from_secs(3600), T0)
            .await?;
        assert_eq!(claimed.len(), WORKERS);
        tasks.push((store.clone(), claimed));
    }

    let started = Instant::now();
    let mut workers = Vec::new();
    for (store, claimed) in tasks {
        for task in claimed {
            let store = store.clone();
            workers.push(tokio::spawn(async move {
                let mut lease = task.lease;
                for seq in 1..=STEPS {
                    let mut step = append(task.run_id, seq, output(200));
                    step.lease = Some(lease);
                    step.task = TaskUpdate::Complete;
                    step.new_tasks = vec![NewTask {
                        kind: TaskKind::Tools,
                        step: 1,
                        priority: Priority::DEFAULT,
                        max_attempts: 3,
                        run_at: T0,
                        lease_to: Some(LeaseTo::new("bench", T0 + 3_600_000)),
                        queue: None,
                    }];
                    lease = store.append(step).await?.leased[0].lease;
                }
                Ok::<_, Error>(())
            }));
        }
    }
    for worker in workers {
        worker.await.expect("worker panicked")?;
    }
    let elapsed = started.elapsed();
    let count = 2 * WORKERS * STEPS as usize;
    let rate = count as f64 / elapsed.as_secs_f64();
    println!("{count} step appends from 2 stores x {WORKERS} tasks in {elapsed:.2?}: {rate:.0}/s");
    Ok(())
}

fn output(size: usize) -> Event {
    Event::ToolCallCompleted {
        step: 1,
        call_index: 0,
        call_id: "call_1".to_string(),
        output: "x".repeat(size),
        is_error: false,
    }
}

/// Why [`Options::statement_cache_capacity`] must not be 0: sqlx 0.9 then
/// still prepares each statement under a new name and never deallocates it.
/// (If this fails, sqlx changed, and the restriction can go.)
#[tokio::test]
async fn sqlx_leaks_statements_without_a_cache() {
    let Some(db) = TestDb::create().await else {
        return;
    };
    let mut conn = PgConnectOptions::from_str(&db.url)
        .expect("url")
        .statement_cache_capacity(0)
        .connect()
        .await
        .expect("connect");
    for _ in 0..3 {
        let _: i32 = sqlx::query_scalar("SELECT $1::int")
            .bind(1)
            .fetch_one(&mut conn)
            .await
            .expect("query");
    }
    let prepared: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_statements")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert!(prepared >= 3, "{prepared} prepared statements");
}
