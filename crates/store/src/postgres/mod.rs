//! The shared backend: PostgreSQL, for many processes on one database.
//!
//! Each process writes through one writer task that owns a write connection
//! and group-commits the ops of every caller in one transaction, as the
//! SQLite backend does, so many workers share a commit; every statement of a
//! batch covers all of its rows (`UNNEST` of arrays). Reads use a pool of
//! their own, as do the event export's writes (`export`) and the rate
//! limits (`limits`).
//!
//! Unlike SQLite, other processes write at the same time, so every check is
//! made against locked rows in the transaction that writes:
//!
//! * claims take due tasks with `FOR UPDATE SKIP LOCKED`, so concurrent
//!   claimers never wait for, nor get, the same task;
//! * a write under a lease first locks its run row, then the task row,
//!   checking the token and the expiry (`SELECT … FOR UPDATE`), so a
//!   takeover waits for the write or the write sees the takeover;
//! * an append's seq check is `UPDATE runs … WHERE last_seq = expected`: the
//!   row lock serialises appenders, and a loser sees the winner's seq.
//!
//! Leases are only ever taken over once expired: there is no
//! `recover_leases` as in SQLite, since a live lease may belong to another
//! running process.
//!
//! # Notifications across processes
//!
//! Every committing transaction sends, per run it touched, `pg_notify(`
//! [`CHANNEL`]`, '<origin> <run_id> <last_seq> <new_work 0|1>')`, where
//! `origin` is a random id of the sending store. Each store runs a listener
//! task on its own connection that `LISTEN`s and forwards what other stores
//! committed to [`Store::subscribe`]; commits made through this store are
//! delivered directly after the commit (and their notifications skipped).
//! If the listener's connection drops, it reconnects with backoff and then
//! sends [`RECONNECTED`], so sleepers look again for what they missed.
//! Notifications are hints, never the only way to learn of a commit: one
//! may be lost (a slow subscriber lags, a connection drops).
//!
//! # Losing connections
//!
//! A connection lost or refused (a server restart, a failover, a pooler's
//! restart, the network) is [`Error::Unavailable`]. The writer runs a batch
//! again on a new connection when its kept one turns out broken at `BEGIN`
//! or breaks mid-batch (nothing was committed); a batch whose `COMMIT` is
//! cut off fails its ops, the outcome unknown. The read pool drops its idle
//! connections opened before a loss the listener or the writer saw
//! ([`Losses`]), rather than fail a read on each.
//!
//! A network can also lose a connection without a word: a failed-over
//! primary whose node vanished sends no reset, a NAT forgets the flow, and
//! TCP waits ~15 minutes before it gives up. So every exchange with the
//! database has a deadline ([`Options::timeout`]): a writer batch from
//! `BEGIN` to `COMMIT`, a statement on the pool, a connect, the listener's
//! ping. A connection that misses it is deemed lost and dropped, never
//! given back to its pool (the pool would ping it first, for as long again):
//! the batch is run again on a new connection if it had not sent its
//! `COMMIT`, else fails as a cut-off commit; a statement on the pool fails
//! with [`Error::Unavailable`]. The store's transactions also set the
//! server's `idle_in_transaction_session_timeout` to it, so the server ends
//! a transaction its client abandoned, and the locks it held, as soon.
//! sqlx 0.9 cannot set TCP keepalives or `TCP_USER_TIMEOUT` on its sockets.
//!
//! # PgBouncer
//!
//! Through PgBouncer in transaction-pooling mode:
//!
//! * `LISTEN` needs a session of its own: give the listener a direct URL to
//!   the server ([`Options::listen_url`]).
//! * sqlx prepares named statements and caches them per connection, which
//!   needs PgBouncer 1.21 or newer with `max_prepared_statements` above 0.
//!   Turning the cache off does not help: sqlx 0.9 still prepares every
//!   statement under a new name (and never deallocates it), so
//!   [`Options::statement_cache_capacity`] must be at least 1.
//! * The store sends no startup parameter PgBouncer refuses by default
//!   (sqlx's `extra_float_digits` is turned off), and takes only
//!   transaction-scoped advisory locks (migrations).
//!
//! # Layout
//!
//! * this file: [`PgStore`], [`Options`], connecting, the reads.
//! * `writer`: the writer task, its batches and transactions.
//! * `journal`: submissions and appends, written in bulk per batch.
//! * `queue`: claims, heartbeats, retries, deferrals and releases of tasks.
//! * `stats`: the counts of tasks, unfinished runs and dead letters for
//!   monitoring, in one statement (runs through `runs_pending` only).
//! * `agents`: registering agent versions.
//! * `deltas`: streamed LLM output, written fenced (one statement on the
//!   pool, announced by it) and read back.
//! * `limits`: rate limits shared by every process (`rate_limits`), one
//!   statement per operation, on the pool.
//! * `breakers`: the latest circuit-breaker transition of each endpoint
//!   (`breakers`), shared by every process, one statement each.
//! * `export`: the export switch, reading and acknowledging the outbox, the
//!   relay lease, the export status (outbox rows are written by `journal`).
//! * `listen`: the listener task and the notification format.
//! * `migrate` and `migrations/`: the schema and its versions.
//!
//! Ids are `uuid`, times epoch milliseconds (`bigint`), JSON `jsonb`, but
//! for the journal's events: `json`, which keeps any text serde writes
//! (jsonb and text refuse U+0000, which a client, a model or a tool may
//! send). So the copies of such text in other tables (a run's input, output
//! and error, a task's last error, a dead letter's error, streamed text)
//! hold U+FFFD in its place ([`storable`]), unlike in SQLite; the journal
//! keeps the exact text. Agent specs holding U+0000 are refused when parsed.

mod agents;
mod breakers;
mod deltas;
mod export;
mod journal;
mod limits;
mod listen;
mod migrate;
mod purge;
mod queue;
mod scratch;
mod stats;
#[cfg(test)]
pub(crate) mod tests;
mod writer;

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_core::message::Usage;
use keel_core::run::Status;
use keel_core::spec::Spec;
use keel_core::{Event, Millis, Priority, Recorded, RunId, Seq, TaskId};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, FromRow, PgConnection};
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use self::agents::PutAgent;
use self::journal::{AppendEvents, Encoded, Insert, Submit};
pub use self::listen::{CHANNEL, RECONNECTED};
use self::queue::{Claim, Heartbeat, ReleaseAll, RetryLater};
pub use self::scratch::{Scratch, create_database, drop_database};
use self::writer::{Call, Op, Reply, Writer};
use crate::limit::{self, Adjust, Take};
use crate::purge::Scope;
use crate::{
    AgentRecord, AgentUsage, Append, Appended, BreakerRecord, Committed, DeadLetter, DeltaBatch,
    DeltaPos, Deltas, Error, ExportStatus, Grant, Lease, OutboxEntry, Projection, Purge, Purged,
    Queued, QueuedCall, Rate, Registered, Result, RunFilter, RunRecord, Store, Submission,
    Submitted, Task, TaskKind, TaskUpdate, UsageTotals,
};

/// Ops that may wait for the writer before callers wait to send.
const QUEUE: usize = 4 * writer::MAX_BATCH;
/// Commit notifications a slow subscriber may fall behind by.
const NOTIFICATIONS: usize = 16 * 1024;
/// How the store's sessions show in `pg_stat_activity`.
const APPLICATION_NAME: &str = "keel";

/// How to reach the database.
#[derive(Clone, Deserialize)]
pub struct Options {
    /// The database, as `postgres://user:password@host:port/database?…`.
    pub url: String,
    /// A direct (session) connection for `LISTEN`, when `url` goes through
    /// a pooler in transaction mode; `url` is used when absent.
    #[serde(default)]
    pub listen_url: Option<String>,
    /// Most connections the reads use.
    #[serde(default = "Options::default_read_connections")]
    pub read_connections: u32,
    /// Prepared statements each connection caches (sqlx's default is 100).
    /// Must be at least 1 (see the module docs on PgBouncer).
    #[serde(default = "Options::default_statement_cache_capacity")]
    pub statement_cache_capacity: usize,
    /// Longest the database may take to answer before the connection is
    /// deemed lost (see the module docs on losing connections): a writer
    /// batch from `BEGIN` to `COMMIT`, a read or another statement on the
    /// pool, getting a connection, the listener's ping. It must exceed the
    /// slowest healthy statement: a usage report over every run, or
    /// switching export off, which waits for every batch in flight.
    #[serde(default = "Options::default_timeout")]
    pub timeout: Duration,
}

impl Options {
    /// The defaults for a database URL.
    pub fn new(url: impl Into<String>) -> Options {
        Options {
            url: url.into(),
            listen_url: None,
            read_connections: Options::default_read_connections(),
            statement_cache_capacity: Options::default_statement_cache_capacity(),
            timeout: Options::default_timeout(),
        }
    }

    fn default_read_connections() -> u32 {
        8
    }

    fn default_statement_cache_capacity() -> usize {
        100
    }

    /// A healthy batch commits in milliseconds, and waits for other
    /// processes' batches, each as short; 20 s is far above that, and
    /// below the engine's default lease (30 s), so a worker hears that its
    /// write failed before its lease runs out.
    fn default_timeout() -> Duration {
        Duration::from_secs(20)
    }

    /// The connect options for `url`, with ours applied.
    fn connect_options(&self, url: &str) -> Result<PgConnectOptions> {
        if self.timeout.is_zero() {
            return Err(Error::Backend(
                "the database timeout must be positive".to_string(),
            ));
        }
        if self.statement_cache_capacity == 0 {
            return Err(Error::Backend(
                "statement_cache_capacity must be at least 1: sqlx 0.9 prepares uncached \
                 statements under new names and never deallocates them"
                    .to_string(),
            ));
        }
        // sqlx reads other schemes too, then fails on a host lookup.
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(Error::Backend(
                "invalid database URL: a PostgreSQL URL starts with postgres:// or postgresql://"
                    .to_string(),
            ));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Backend(format!("invalid database URL: {e}")))?;
        Ok(options
            .application_name(APPLICATION_NAME)
            .statement_cache_capacity(self.statement_cache_capacity)
            // No float is read as text; PgBouncer refuses this parameter
            // unless told to ignore it.
            .extra_float_digits(None))
    }
}

/// Shows no URL: they may hold a password.
impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("listen_url", &self.listen_url.is_some())
            .field("read_connections", &self.read_connections)
            .field("statement_cache_capacity", &self.statement_cache_capacity)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The PostgreSQL store: a cheap handle to this process's writer task, its
/// listener task and the read pool. Both tasks stop when the last handle is
/// dropped.
///
/// A write is committed (or refused) once handed to the writer, even if the
/// caller stops waiting for the answer. An [`Error::Unavailable`] from a
/// write whose commit was cut off (the connection dropped) leaves its
/// outcome unknown, as with any database: a retry meets the first attempt's
/// effect (a seq conflict, an existing run).
#[derive(Clone, Debug)]
pub struct PgStore {
    ops: mpsc::Sender<Op>,
    reads: PgPool,
    commits: broadcast::Sender<Committed>,
    /// This store's id in notifications.
    origin: u64,
    /// Longest a statement on `reads` may take ([`Options::timeout`]).
    timeout: Duration,
    /// Told when a statement on `reads` misses its deadline.
    losses: Losses,
    /// Held by every handle: the listener stops when all are gone.
    _alive: mpsc::Sender<()>,
}

impl PgStore {
    /// Connects with the default [`Options`] (see [`PgStore::connect_with`]).
    pub async fn connect(url: &str) -> Result<PgStore> {
        PgStore::connect_with(Options::new(url)).await
    }

    /// Connects, brings the schema up to date, starts listening for other
    /// processes' commits and starts the writer task. Must be called inside
    /// a Tokio runtime.
    pub async fn connect_with(options: Options) -> Result<PgStore> {
        let connect = options.connect_options(&options.url)?;
        let listen = match &options.listen_url {
            Some(url) => options.connect_options(url)?,
            None => connect.clone(),
        };

        // The writer keeps one connection out of its own pool of one, which
        // replaces it if it breaks; pings on acquire and release would cost
        // a round trip per batch.
        let timeout = options.timeout;
        let writes = open_pool(
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                .test_before_acquire(false),
            &connect,
        )
        .await?;
        let mut conn = writes.acquire().await.map_err(backend)?;
        // Not bounded: a migration may rewrite a large table, or wait for
        // another process's.
        migrate::run(&mut conn).await?;

        // No ping before each read either: the idle connections opened
        // before a connection loss this store saw are dropped instead.
        let losses = Losses::new();
        let stale = losses.clone();
        let reads = open_pool(
            PgPoolOptions::new()
                .max_connections(options.read_connections.max(1))
                .acquire_timeout(timeout)
                .test_before_acquire(false)
                .before_acquire(move |_, meta| {
                    let keep = !stale.predates(meta.age);
                    Box::pin(async move { Ok(keep) })
                }),
            // sqlx pings a connection given back, with no deadline; one whose
            // statement missed the deadline is never given back (`pooled`
            // drops it), and a connection given back has just answered, so
            // the ping follows a live exchange by microseconds. A second ping
            // with a deadline (`after_release`) doubled every read's round
            // trips for that window (the PostgreSQL benchmark ran 5-10 %
            // slower).
            &connect,
        )
        .await?;

        let origin = fastrand::u64(..);
        let (commits, _) = broadcast::channel(NOTIFICATIONS);
        let (alive, closed) = mpsc::channel(1);
        let listener = listen::Listener::connect(
            listen,
            timeout,
            origin,
            commits.clone(),
            closed,
            losses.clone(),
        )
        .await?;
        tokio::spawn(listener.run());

        let (ops, queue) = mpsc::channel(QUEUE);
        let writer = Writer::new(
            writes,
            conn,
            timeout,
            queue,
            commits.clone(),
            origin,
            losses.clone(),
        );
        tokio::spawn(writer.run());
        Ok(PgStore {
            ops,
            reads,
            commits,
            origin,
            timeout,
            losses,
            _alive: alive,
        })
    }

    /// Applies pending schema migrations (concurrent callers wait for each
    /// other); returns the schema version.
    pub async fn migrate(url: &str) -> Result<u32> {
        let options = Options::new(url);
        let mut conn = options
            .connect_options(url)?
            .connect()
            .await
            .map_err(backend)?;
        let version = migrate::run(&mut conn).await?;
        if let Err(e) = Connection::close(conn).await {
            tracing::debug!(error = %e, "closing the migration connection failed");
        }
        Ok(version)
    }

    /// Whether the server runs autovacuum. The queue's tables (`tasks`,
    /// `outbox`, `deltas`) get rows inserted and deleted at every step:
    /// without vacuum they bloat, and without its `ANALYZE` the plans a
    /// connection made while the tables were nearly empty (sequential
    /// scans) are kept for good, so every step gets slower as the journal
    /// grows.
    pub async fn autovacuum(&self) -> Result<bool> {
        self.pooled(async |conn| {
            sqlx::query_scalar("SELECT current_setting('autovacuum')::boolean")
                .fetch_one(conn)
                .await
                .map_err(backend)
        })
        .await
    }

    /// Runs `statements` on a connection of the read pool within the
    /// store's timeout (after the wait for the connection, itself bounded
    /// by it). A connection that does not answer in time is deemed lost and
    /// closed: given back, the pool would ping it, and wait as long again.
    async fn pooled<T>(
        &self,
        statements: impl AsyncFnOnce(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let mut conn = self.reads.acquire().await.map_err(backend)?;
        match tokio::time::timeout(self.timeout, statements(&mut conn)).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    timeout = ?self.timeout,
                    "no answer from the database, closing the read connection"
                );
                self.losses.record();
                drop(conn.detach());
                Err(silent(self.timeout))
            }
        }
    }

    /// Hands an op to the writer and waits for its committed result.
    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (reply, result) = oneshot::channel();
        self.ops.send(op(reply)).await.map_err(|_| Error::Closed)?;
        result.await.map_err(|_| Error::Closed)?
    }
}

/// When this store last saw one of its connections die. A server restart, a
/// failover or a pooler's restart closes every connection at once, and each
/// idle one in the read pool would fail a read before the pool replaced it:
/// the pool drops those opened before the last loss instead. Losses are seen
/// by the listener (its session dropped: it is always reading, so it hears
/// of it at once) and the writer (its connection broken).
#[derive(Clone, Debug)]
struct Losses {
    /// Times are kept as nanoseconds since then.
    start: Instant,
    /// The last loss; 0: none yet.
    last: Arc<AtomicU64>,
}

impl Losses {
    fn new() -> Losses {
        Losses {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records that a connection was found dead just now.
    fn record(&self) {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(now.max(1), Ordering::Relaxed);
    }

    /// Whether a connection opened `age` ago was opened before the last loss.
    fn predates(&self, age: Duration) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        let opened = self.start.elapsed().saturating_sub(age).as_nanos();
        last > 0 && opened < u128::from(last)
    }
}

/// Opens a pool. One that timed out connecting (it retries until its acquire
/// timeout) does not say why, so one more direct connection names the cause:
/// refused, unknown host, bad password (within the same timeout: no answer
/// at all is a cause too).
async fn open_pool(pool: PgPoolOptions, connect: &PgConnectOptions) -> Result<PgPool> {
    let timeout = pool.get_acquire_timeout();
    match pool.connect_with(connect.clone()).await {
        Ok(pool) => Ok(pool),
        Err(sqlx::Error::PoolTimedOut) => {
            match tokio::time::timeout(timeout, connect.connect()).await {
                Ok(Ok(conn)) => {
                    if let Err(e) = Connection::close(conn).await {
                        tracing::debug!(error = %e, "closing the probe connection failed");
                    }
                    Err(backend(sqlx::Error::PoolTimedOut))
                }
                Ok(Err(cause)) => Err(backend(cause)),
                Err(_) => Err(silent(timeout)),
            }
        }
        Err(e) => Err(backend(e)),
    }
}

/// What a call gets when the database did not answer within `timeout`:
/// the connection is deemed lost, as when the network drops its packets.
fn silent(timeout: Duration) -> Error {
    Error::Unavailable(format!(
        "no answer from the database within {timeout:?}: the connection is deemed lost"
    ))
}

/// The statement opening a transaction of the store: the server ends the
/// session if the transaction waits for its client longer than `timeout`
/// (the client gave up on it by then), which frees the locks it holds.
/// Scoped to the transaction (`SET LOCAL`), so safe through a pooler.
fn begin(timeout: Duration) -> AssertSqlSafe<String> {
    AssertSqlSafe(format!(
        "BEGIN; SET LOCAL idle_in_transaction_session_timeout = {}",
        timeout.as_millis().max(1)
    ))
}

/// Maps a database error: a value that does not decode is corrupt data, a
/// connection lost or refused makes the database unavailable, anything else
/// is the database failing.
fn backend(error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            Error::Corrupt(error.to_string())
        }
        e if unreachable(&e) => Error::Unavailable(e.to_string()),
        other => Error::Backend(other.to_string()),
    }
}

/// Whether an error says the database cannot be reached for now, rather
/// than that it refused the statement.
fn unreachable(error: &sqlx::Error) -> bool {
    match error {
        // The connection broke, or none could be had in time.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // Class 08: connection exceptions (what a pooler sends when it has
        // no server); 57P01..57P03, 57P05: the server ended the session
        // (terminated, crashed, starting up, idle too long); 53300: too
        // many connections; 55000: the database takes no connections now
        // (ALLOW_CONNECTIONS false).
        sqlx::Error::Database(e) => e.code().is_some_and(|code| {
            code.starts_with("08")
                || matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "57P05" | "53300" | "55000"
                )
        }),
        _ => false,
    }
}

/// Parses stored JSON.
fn parse_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("{what} is not valid: {e}")))
}

/// A stored count that is a `u32` in Rust: `what` of `whose`.
fn count(value: i64, what: &str, whose: impl fmt::Display) -> Result<u32> {
    u32::try_from(value)
        .map_err(|_| Error::Corrupt(format!("{what} of {whose} `{value}` is out of range")))
}

/// Token counts as stored (`bigint` is signed).
fn tokens(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A stored token count.
fn stored_tokens(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| Error::Corrupt(format!("{what} `{value}` is negative")))
}

/// A duration in milliseconds, saturating.
fn millis(duration: Duration) -> Millis {
    Millis::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

/// Serializes an event for the journal.
fn encode(event: &Event) -> Result<Encoded> {
    Ok(Encoded {
        kind: event.kind(),
        data: to_json(event, "event")?,
    })
}

/// Text as a `text` or `jsonb` column takes it: U+0000 becomes U+FFFD.
fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// Makes every string and key of a JSON value [`storable`] (for `jsonb`).
fn storable_json(value: &mut Value) {
    match value {
        Value::String(text) => {
            if let Cow::Owned(fixed) = storable(text) {
                *text = fixed;
            }
        }
        Value::Array(items) => {
            for item in items {
                storable_json(item);
            }
        }
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(k, v)| (storable(&k).into_owned(), v))
                    .collect();
            }
            for item in map.values_mut() {
                storable_json(item);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Serializes a value to store.
fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Backend(format!("{what} does not serialize: {e}")))
}

/// Gives a new task its id and the token of the lease it may be created
/// with (non-negative, like the tokens `claim` draws).
/// A submission as the writer takes it; its first task is always queued.
fn submit_request(submission: Submission) -> Result<Submit> {
    let mut input = submission.input;
    storable_json(&mut input);
    let mut task = submission.task;
    task.lease_to = None;
    Ok(Submit {
        run_id: submission.run_id,
        tenant: submission.tenant,
        agent: submission.agent,
        version: submission.version,
        input_json: to_json(&input, "run input")?,
        input,
        idempotency_key: submission.idempotency_key,
        priority: submission.priority,
        event: encode(&submission.event)?,
        task: insert(task),
        now: submission.now,
    })
}

/// A task to create: a task leased on creation has the id and token its
/// caller chose, any other a new id.
fn insert(task: crate::NewTask) -> Insert {
    let lease = match &task.lease_to {
        Some(to) => to.lease,
        None => Lease {
            task_id: TaskId::new(),
            token: fastrand::i64(0..),
        },
    };
    Insert {
        id: lease.task_id,
        token: lease.token,
        task,
    }
}

#[derive(FromRow)]
struct AgentRow {
    tenant: String,
    spec: String,
    created_at: Millis,
}

impl AgentRow {
    fn into_record(self) -> Result<AgentRecord> {
        Ok(AgentRecord {
            spec: parse_json::<Spec>(&self.spec, "agent spec")?,
            tenant: self.tenant,
            created_at: self.created_at,
        })
    }
}

#[derive(FromRow)]
struct RunRow {
    id: Uuid,
    tenant: String,
    agent: String,
    version: String,
    status: String,
    steps: i64,
    input: String,
    output: Option<String>,
    error: Option<String>,
    input_tokens: i64,
    output_tokens: i64,
    cost_usd: f64,
    last_seq: Seq,
    created_at: Millis,
    updated_at: Millis,
    priority: i16,
}

impl RunRow {
    fn into_record(self) -> Result<RunRecord> {
        let id = RunId(self.id);
        let status = Status::parse(&self.status)
            .ok_or_else(|| Error::Corrupt(format!("run {id}: unknown status `{}`", self.status)))?;
        Ok(RunRecord {
            id,
            input: parse_json(&self.input, &format!("input of run {id}"))?,
            tenant: self.tenant,
            agent: self.agent,
            version: self.version,
            priority: Priority::new(i64::from(self.priority)).ok_or_else(|| {
                Error::Corrupt(format!(
                    "run {id}: priority {} is not in 0..=9",
                    self.priority
                ))
            })?,
            projection: Projection {
                status,
                steps: count(self.steps, "steps", format_args!("run {id}"))?,
                output: self.output,
                error: self.error,
                usage: Usage {
                    input_tokens: stored_tokens(self.input_tokens, "input tokens")?,
                    output_tokens: stored_tokens(self.output_tokens, "output tokens")?,
                },
                cost_usd: self.cost_usd,
            },
            last_seq: self.last_seq,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(FromRow)]
struct EventRow {
    seq: Seq,
    at: Millis,
    data: String,
}

#[derive(FromRow)]
struct DeadLetterRow {
    id: Uuid,
    run_id: Uuid,
    kind: String,
    step: i64,
    attempts: i64,
    error: String,
    created_at: Millis,
}

impl DeadLetterRow {
    fn into_record(self) -> Result<DeadLetter> {
        let id = TaskId(self.id);
        let kind = TaskKind::parse(&self.kind).ok_or_else(|| {
            Error::Corrupt(format!("dead letter {id}: unknown kind `{}`", self.kind))
        })?;
        Ok(DeadLetter {
            id,
            run_id: RunId(self.run_id),
            kind,
            step: count(self.step, "step", format_args!("dead letter {id}"))?,
            attempts: count(self.attempts, "attempts", format_args!("dead letter {id}"))?,
            error: self.error,
            created_at: self.created_at,
        })
    }
}

const GET_AGENT: &str = "SELECT tenant, spec::text AS spec, created_at FROM agents \
     WHERE tenant = $1 AND name = $2 AND version = $3";
const GET_LATEST_AGENT: &str = "SELECT tenant, spec::text AS spec, created_at FROM agents \
     WHERE tenant = $1 AND name = $2 ORDER BY id DESC LIMIT 1";
const LIST_AGENTS: &str = "SELECT tenant, spec::text AS spec, created_at FROM agents \
     WHERE tenant = $1 ORDER BY name COLLATE \"C\", id";

const GET_RUN: &str = "SELECT id, tenant, agent, version, status, steps, input::text AS input, \
     output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority \
     FROM runs WHERE id = $1";
const LIST_RUNS: &str = "SELECT id, tenant, agent, version, status, steps, input::text AS input, \
     output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority \
     FROM runs \
     WHERE tenant = $1 AND id < $2 ORDER BY id DESC LIMIT $3";
const LIST_RUNS_BY_OUTCOME: &str = "SELECT id, tenant, agent, version, status, steps, \
     input::text AS input, output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, \
     updated_at, priority FROM runs \
     WHERE tenant = $1 AND id < $2 AND outcome = $4 ORDER BY id DESC LIMIT $3";
const LIST_UNFINISHED_RUNS_BY_STATUS: &str = "SELECT id, tenant, agent, version, status, steps, \
     input::text AS input, output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, \
     updated_at, priority FROM runs \
     WHERE tenant = $1 AND id < $2 AND outcome IS NULL AND status = $4 ORDER BY id DESC LIMIT $3";
const LIST_RUNS_BY_AGENT: &str = "SELECT id, tenant, agent, version, status, steps, \
     input::text AS input, output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, \
     updated_at, priority FROM runs \
     WHERE tenant = $1 AND id < $2 AND agent = $4 ORDER BY id DESC LIMIT $3";
const LIST_RUNS_BY_OUTCOME_AND_AGENT: &str = "SELECT id, tenant, agent, version, status, \
     steps, input::text AS input, output, error, input_tokens, output_tokens, cost_usd, last_seq, \
     created_at, updated_at, priority FROM runs \
     WHERE tenant = $1 AND id < $2 AND outcome = $4 AND agent = $5 ORDER BY id DESC LIMIT $3";
const LIST_UNFINISHED_RUNS_BY_STATUS_AND_AGENT: &str = "SELECT id, tenant, agent, version, \
     status, steps, input::text AS input, output, error, input_tokens, output_tokens, cost_usd, last_seq, \
     created_at, updated_at, priority FROM runs \
     WHERE tenant = $1 AND id < $2 AND outcome IS NULL AND status = $4 AND agent = $5 \
     ORDER BY id DESC LIMIT $3";

const EVENTS: &str = "SELECT seq, at, data::text AS data FROM events \
     WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";

const DEAD_LETTERS: &str = "SELECT d.id, d.run_id, d.kind, d.step, d.attempts, d.error, d.created_at \
     FROM dead_letters d JOIN runs r ON r.id = d.run_id WHERE r.tenant = $2 \
     ORDER BY d.created_at DESC, d.id DESC LIMIT $1";
const DEAD_LETTER: &str = "SELECT id, run_id, kind, step, attempts, error, created_at \
     FROM dead_letters WHERE id = $1";

const NEXT_DUE: &str = "SELECT MIN(visible_at) FROM tasks WHERE visible_at > $1 AND queue IS NULL";

/// A task of an external queue ([`Store::queued`]).
const QUEUED: &str = "SELECT id, run_id, queue, call_index, step, attempts, max_attempts, \
         lease_token, visible_at \
     FROM tasks WHERE id = $1 AND queue IS NOT NULL";

/// A row of [`QUEUED`].
#[derive(sqlx::FromRow)]
struct QueuedRow {
    id: Uuid,
    run_id: Uuid,
    queue: String,
    call_index: i64,
    step: i64,
    attempts: i64,
    max_attempts: i64,
    lease_token: Option<i64>,
    visible_at: Millis,
}

impl QueuedRow {
    fn into_queued(self, now: Millis) -> Result<Queued> {
        let task_id = TaskId(self.id);
        let of = format!("task {task_id}");
        Ok(Queued {
            task_id,
            run_id: RunId(self.run_id),
            call: QueuedCall {
                queue: self.queue,
                call_index: count(self.call_index, "call index", &of)?,
            },
            step: count(self.step, "step", &of)?,
            attempts: count(self.attempts, "attempts", &of)?,
            max_attempts: count(self.max_attempts, "max attempts", &of)?,
            lease_token: self.lease_token.filter(|_| self.visible_at > now),
            visible_at: self.visible_at,
        })
    }
}

/// Counts from the `runs_pending` partial index (unfinished runs have no
/// outcome).
const PENDING_RUNS: &str = "SELECT count(*) FROM runs WHERE tenant = $1 AND outcome IS NULL";
const PENDING_RUNS_OF_AGENT: &str =
    "SELECT count(*) FROM runs WHERE tenant = $1 AND agent = $2 AND outcome IS NULL";

/// Sums of run rows ([`Store::usage`]). `sum` of `bigint` is `numeric`,
/// cast back (an error past 2^63 tokens); all are NULL over no rows.
const USAGE: &str = "SELECT count(*), COALESCE(sum(input_tokens), 0)::bigint, \
     COALESCE(sum(output_tokens), 0)::bigint, COALESCE(sum(cost_usd), 0)::float8 \
     FROM runs WHERE tenant = $1 AND created_at >= $2";
/// As [`USAGE`], of one agent (through `runs_by_agent`).
const USAGE_OF_AGENT: &str = "SELECT count(*), COALESCE(sum(input_tokens), 0)::bigint, \
     COALESCE(sum(output_tokens), 0)::bigint, COALESCE(sum(cost_usd), 0)::float8 \
     FROM runs WHERE tenant = $1 AND agent = $3 AND created_at >= $2";
/// As [`USAGE`], per agent.
const USAGE_BY_AGENT: &str = "SELECT agent, count(*), COALESCE(sum(input_tokens), 0)::bigint, \
     COALESCE(sum(output_tokens), 0)::bigint, COALESCE(sum(cost_usd), 0)::float8 \
     FROM runs WHERE tenant = $1 AND created_at >= $2 \
     GROUP BY agent ORDER BY agent COLLATE \"C\"";

/// A row of sums: runs, input tokens, output tokens, cost.
impl Store for PgStore {
    async fn put_agent(&self, tenant: &str, spec: &Spec, now: Millis) -> Result<Registered> {
        let value = serde_json::to_value(spec)
            .map_err(|e| Error::Backend(format!("agent spec does not serialize: {e}")))?;
        let request = PutAgent {
            tenant: tenant.to_string(),
            name: spec.name.clone(),
            version: spec.version.clone(),
            spec_json: to_json(&value, "agent spec")?,
            spec: value,
            now,
        };
        self.write(|reply| Op::PutAgent(Call::new(request, reply)))
            .await
    }

    async fn get_agent(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> Result<Option<AgentRecord>> {
        let query = match version {
            Some(version) => sqlx::query_as::<_, AgentRow>(GET_AGENT)
                .bind(tenant)
                .bind(name)
                .bind(version),
            None => sqlx::query_as::<_, AgentRow>(GET_LATEST_AGENT)
                .bind(tenant)
                .bind(name),
        };
        let row = self
            .pooled(async |conn| query.fetch_optional(conn).await.map_err(backend))
            .await?;
        row.map(AgentRow::into_record).transpose()
    }

    async fn list_agents(&self, tenant: &str) -> Result<Vec<AgentRecord>> {
        let rows = self
            .pooled(async |conn| {
                sqlx::query_as::<_, AgentRow>(LIST_AGENTS)
                    .bind(tenant)
                    .fetch_all(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        let mut agents = Vec::with_capacity(rows.len());
        for row in rows {
            agents.push(row.into_record()?);
        }
        Ok(agents)
    }

    /// `submission.task.lease_to` is ignored: the first task is always
    /// queued, since [`Submitted`] has no room for a lease.
    async fn submit(&self, submission: Submission) -> Result<Submitted> {
        let request = submit_request(submission)?;
        self.write(|reply| Op::Submit(Call::new(request, reply)))
            .await
    }

    async fn get_run(&self, id: RunId) -> Result<Option<RunRecord>> {
        let row = self
            .pooled(async |conn| {
                sqlx::query_as::<_, RunRow>(GET_RUN)
                    .bind(id.0)
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        row.map(RunRow::into_record).transpose()
    }

    async fn purge(&self, purge: Purge) -> Result<Purged> {
        let scope = Scope::Ended(purge);
        self.pooled(async |conn| purge::purge(conn, &scope, self.timeout).await)
            .await
    }

    async fn delete_run(&self, id: RunId) -> Result<()> {
        let scope = Scope::One(id);
        self.pooled(async |conn| purge::purge(conn, &scope, self.timeout).await)
            .await
            .map(drop)
    }

    async fn list_runs(&self, filter: RunFilter) -> Result<Vec<RunRecord>> {
        // The largest UUID sorts after every id: the cursor of a first page.
        let before = filter.before.map_or(Uuid::max(), |id| id.0);
        // A finished run's status is its outcome, which is indexed; an
        // unfinished one's is found among the unfinished runs.
        let finished = filter.status.map(Status::is_terminal);
        let sql = match (finished, &filter.agent) {
            (None, None) => LIST_RUNS,
            (Some(true), None) => LIST_RUNS_BY_OUTCOME,
            (Some(false), None) => LIST_UNFINISHED_RUNS_BY_STATUS,
            (None, Some(_)) => LIST_RUNS_BY_AGENT,
            (Some(true), Some(_)) => LIST_RUNS_BY_OUTCOME_AND_AGENT,
            (Some(false), Some(_)) => LIST_UNFINISHED_RUNS_BY_STATUS_AND_AGENT,
        };
        let mut query = sqlx::query_as::<_, RunRow>(sql)
            .bind(&filter.tenant)
            .bind(before)
            .bind(i64::from(filter.limit));
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(agent) = &filter.agent {
            query = query.bind(agent);
        }
        let rows = self
            .pooled(async |conn| query.fetch_all(conn).await.map_err(backend))
            .await?;
        let mut runs = Vec::with_capacity(rows.len());
        for row in rows {
            runs.push(row.into_record()?);
        }
        Ok(runs)
    }

    async fn events(&self, run_id: RunId, after: Seq, limit: u32) -> Result<Vec<Recorded>> {
        let rows = self
            .pooled(async |conn| {
                sqlx::query_as::<_, EventRow>(EVENTS)
                    .bind(run_id.0)
                    .bind(after)
                    .bind(i64::from(limit))
                    .fetch_all(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            // The error label is only built on failure: this is the journal's hot read path.
            let event = serde_json::from_str(&row.data).map_err(|e| {
                Error::Corrupt(format!(
                    "event {} of run {run_id} is not valid: {e}",
                    row.seq
                ))
            })?;
            events.push(Recorded {
                seq: row.seq,
                at: row.at,
                event,
            });
        }
        Ok(events)
    }

    async fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_for: Duration,
        now: Millis,
    ) -> Result<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let request = Claim {
            queue: None,
            owner: owner.to_string(),
            limit,
            lease_until: now.saturating_add(millis(lease_for)),
            now,
        };
        self.write(|reply| Op::Claim(Call::new(request, reply)))
            .await
    }

    async fn append(&self, append: Append) -> Result<Appended> {
        if append.lease.is_none() && append.task != TaskUpdate::Keep {
            return Err(Error::Conflict(format!(
                "append to run {}: a task update needs the task's lease",
                append.run_id
            )));
        }
        let mut events = Vec::with_capacity(append.events.len());
        for event in &append.events {
            events.push(encode(event)?);
        }
        let request = AppendEvents {
            run_id: append.run_id,
            expected_seq: append.expected_seq,
            events,
            lease: append.lease,
            task: append.task,
            new_tasks: append.new_tasks.into_iter().map(insert).collect(),
            clear_tasks: append.clear_tasks,
            purge: crate::compaction(&append.events),
            redrive: append.redrive,
            projection: append.projection,
            now: append.now,
            spawn: append
                .spawn
                .into_iter()
                .map(submit_request)
                .collect::<Result<_>>()?,
            wake: append
                .wake
                .into_iter()
                .map(|w| {
                    let mut task = w.task;
                    task.lease_to = None;
                    (w.run_id, insert(task))
                })
                .collect(),
        };
        self.write(|reply| Op::Append(Call::new(request, reply)))
            .await
    }

    async fn heartbeat(&self, leases: &[Lease], until: Millis, now: Millis) -> Result<u64> {
        let request = Heartbeat {
            leases: leases.to_vec(),
            until,
            now,
        };
        self.write(|reply| Op::Heartbeat(Call::new(request, reply)))
            .await
    }

    async fn claim_queued(
        &self,
        queue: &str,
        owner: &str,
        lease_for: Duration,
        now: Millis,
    ) -> Result<Option<Task>> {
        let request = Claim {
            queue: Some(queue.to_string()),
            owner: owner.to_string(),
            limit: 1,
            lease_until: now.saturating_add(millis(lease_for)),
            now,
        };
        let tasks = self
            .write(|reply| Op::Claim(Call::new(request, reply)))
            .await?;
        Ok(tasks.into_iter().next())
    }

    async fn queued(&self, task_id: TaskId, now: Millis) -> Result<Option<Queued>> {
        let row = self
            .pooled(async |conn| {
                sqlx::query_as::<_, QueuedRow>(QUEUED)
                    .bind(task_id.0)
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        row.map(|r| r.into_queued(now)).transpose()
    }

    async fn extend_lease(&self, lease: Lease, until: Millis, now: Millis) -> Result<()> {
        let request = Heartbeat {
            leases: vec![lease],
            until,
            now,
        };
        let extended = self
            .write(|reply| Op::Heartbeat(Call::new(request, reply)))
            .await?;
        if extended == 0 {
            return Err(Error::LeaseLost(lease.task_id));
        }
        Ok(())
    }

    async fn retry_later(
        &self,
        lease: Lease,
        error: &str,
        retry_at: Millis,
        now: Millis,
    ) -> Result<()> {
        let request = RetryLater {
            lease,
            error: storable(error).into_owned(),
            retry_at,
            now,
            counted: true,
        };
        self.write(|reply| Op::RetryLater(Call::new(request, reply)))
            .await
    }

    async fn defer(&self, lease: Lease, until: Millis, reason: &str, now: Millis) -> Result<()> {
        let request = RetryLater {
            lease,
            error: storable(reason).into_owned(),
            retry_at: until,
            now,
            counted: false,
        };
        self.write(|reply| Op::RetryLater(Call::new(request, reply)))
            .await
    }

    async fn release_all(&self, owner: &str, now: Millis) -> Result<u64> {
        let request = ReleaseAll {
            owner: owner.to_string(),
            now,
        };
        self.write(|reply| Op::ReleaseAll(Call::new(request, reply)))
            .await
    }

    async fn dead_letters(&self, tenant: &str, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = self
            .pooled(async |conn| {
                sqlx::query_as::<_, DeadLetterRow>(DEAD_LETTERS)
                    .bind(i64::from(limit))
                    .bind(tenant)
                    .fetch_all(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        let mut letters = Vec::with_capacity(rows.len());
        for row in rows {
            letters.push(row.into_record()?);
        }
        Ok(letters)
    }

    async fn dead_letter(&self, id: TaskId) -> Result<Option<DeadLetter>> {
        let row = self
            .pooled(async |conn| {
                sqlx::query_as::<_, DeadLetterRow>(DEAD_LETTER)
                    .bind(id.0)
                    .fetch_optional(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        row.map(DeadLetterRow::into_record).transpose()
    }

    async fn stats(&self, now: Millis) -> Result<crate::Stats> {
        self.pooled(async |conn| stats::stats(conn, now).await)
            .await
    }

    async fn next_due(&self, now: Millis) -> Result<Option<Millis>> {
        self.pooled(async |conn| {
            sqlx::query_scalar(NEXT_DUE)
                .bind(now)
                .fetch_one(conn)
                .await
                .map_err(backend)
        })
        .await
    }

    async fn append_deltas(&self, batch: DeltaBatch) -> Result<DeltaPos> {
        self.pooled(async |conn| deltas::append(conn, self.origin, &self.commits, &batch).await)
            .await
    }

    async fn deltas(&self, run_id: RunId, after: Option<DeltaPos>, limit: u32) -> Result<Deltas> {
        // Steps start at 1, so (0, 0, 0) is before every delta.
        let after = after.unwrap_or(DeltaPos {
            step: 0,
            attempt: 0,
            idx: 0,
        });
        self.pooled(async |conn| deltas::read(conn, run_id, after, limit).await)
            .await
    }

    fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.commits.subscribe()
    }

    /// On the pool, not through the writer (see `export`): batches whose
    /// events are inserted after this returns are exported.
    async fn enable_export(&self) -> Result<()> {
        self.pooled(async |conn| export::enable(conn).await).await
    }

    /// On the pool too: it waits for the batches of every process (see
    /// `export`).
    async fn disable_export(&self) -> Result<u64> {
        self.pooled(async |conn| export::disable(conn, self.timeout).await)
            .await
    }

    async fn export_status(&self, relay: &str, now: Millis) -> Result<ExportStatus> {
        self.pooled(async |conn| export::status(conn, relay, now).await)
            .await
    }

    async fn outbox(&self, max_events: u32) -> Result<Vec<OutboxEntry>> {
        self.pooled(async |conn| export::outbox(conn, max_events).await)
            .await
    }

    async fn ack_outbox(&self, ids: &[i64]) -> Result<()> {
        self.pooled(async |conn| export::ack(conn, ids).await).await
    }

    async fn relay_lease(
        &self,
        name: &str,
        owner: &str,
        until: Millis,
        now: Millis,
    ) -> Result<bool> {
        self.pooled(async |conn| export::lease(conn, name, owner, until, now).await)
            .await
    }

    async fn usage(
        &self,
        tenant: &str,
        agent: Option<&str>,
        since: Option<Millis>,
    ) -> Result<UsageTotals> {
        let query = sqlx::query_as(match agent {
            Some(_) => USAGE_OF_AGENT,
            None => USAGE,
        })
        .bind(tenant)
        .bind(since.unwrap_or(Millis::MIN));
        let query = match agent {
            Some(agent) => query.bind(agent),
            None => query,
        };
        let row = self
            .pooled(async |conn| query.fetch_one(conn).await.map_err(backend))
            .await?;
        UsageTotals::from_sums(row)
    }

    async fn usage_by_agent(&self, tenant: &str, since: Option<Millis>) -> Result<Vec<AgentUsage>> {
        let rows: Vec<(String, i64, i64, i64, f64)> = self
            .pooled(async |conn| {
                sqlx::query_as(USAGE_BY_AGENT)
                    .bind(tenant)
                    .bind(since.unwrap_or(Millis::MIN))
                    .fetch_all(conn)
                    .await
                    .map_err(backend)
            })
            .await?;
        let mut agents = Vec::with_capacity(rows.len());
        for (agent, runs, input, output, cost_usd) in rows {
            let totals = UsageTotals::from_sums((runs, input, output, cost_usd))?;
            agents.push(AgentUsage { agent, totals });
        }
        Ok(agents)
    }

    async fn pending_runs(&self, tenant: &str, agent: Option<&str>) -> Result<u64> {
        let query = match agent {
            Some(agent) => sqlx::query_scalar(PENDING_RUNS_OF_AGENT)
                .bind(tenant)
                .bind(agent),
            None => sqlx::query_scalar(PENDING_RUNS).bind(tenant),
        };
        let count: i64 = self
            .pooled(async |conn| query.fetch_one(conn).await.map_err(backend))
            .await?;
        u64::try_from(count).map_err(|_| Error::Corrupt(format!("run count {count} is negative")))
    }

    /// On the pool, not through the writer (see `limits`).
    async fn take_capacity(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        max_wait: Duration,
        now: Millis,
    ) -> Result<Grant> {
        let take = Take::new(key, rate, cost, max_wait, now)?;
        self.pooled(async |conn| limits::take(conn, key, &take).await)
            .await
    }

    async fn adjust_capacity(&self, key: &str, rate: Rate, delta: i64, now: Millis) -> Result<()> {
        let adjust = Adjust::new(key, rate, delta, now)?;
        self.pooled(async |conn| limits::adjust(conn, key, &adjust).await)
            .await
    }

    async fn hold_capacity(&self, key: &str, until: Millis) -> Result<()> {
        self.pooled(async |conn| limits::hold(conn, key, limit::ns(until)).await)
            .await
    }

    async fn active_limits(&self, prefix: &str, except: &str, since: Millis) -> Result<u64> {
        self.pooled(async |conn| limits::active(conn, prefix, except, limit::ns(since)).await)
            .await
    }

    /// On the pool, not through the writer (see `breakers`).
    async fn put_breaker(&self, record: BreakerRecord) -> Result<()> {
        self.pooled(async |conn| breakers::put(conn, &record).await)
            .await
    }

    async fn breakers(&self) -> Result<Vec<BreakerRecord>> {
        self.pooled(async |conn| breakers::read(conn).await).await
    }
}
