//! The embedded backend: one SQLite file in WAL mode.
//!
//! Writes go through one writer task that owns the only write connection and
//! group-commits the ops of every caller; reads (this file) use a small pool
//! of their own connections, so they never wait behind the writer.
//!
//! # Layout
//!
//! * this file: [`SqliteStore`], opening the file, the reads.
//! * `writer`: the writer task, its batches and transactions.
//! * `journal`: submissions and appends, written in bulk per batch.
//! * `queue`: claims, heartbeats, retries, deferrals and releases of tasks.
//! * `stats`: the counts of tasks, unfinished runs and dead letters for
//!   monitoring, in one statement (runs through `runs_pending` only).
//! * `agents`: registering agent versions.
//! * `deltas`: streamed LLM output, written fenced and read back.
//! * `limits`: rate limits, kept in memory (why: see there).
//! * `breakers`: the latest circuit-breaker transition of each endpoint,
//!   in memory (one process: its own breakers are the whole truth).
//! * `export`: the export switch, reading and acknowledging the outbox, the
//!   relay lease, the export status (outbox rows are written by `journal`).
//! * `bulk`: statements over many rows (`VALUES` lists).
//! * `migrate` and `migrations/`: the schema and its versions.
//!
//! Ids are stored as hyphenated UUID text, times as epoch milliseconds, JSON
//! as text.

mod agents;
mod breakers;
mod bulk;
mod deltas;
mod export;
mod journal;
mod limits;
mod migrate;
mod purge;
mod queue;
mod stats;
#[cfg(test)]
mod tests;
mod writer;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use keel_core::message::Usage;
use keel_core::run::Status;
use keel_core::spec::Spec;
use keel_core::{Event, Millis, Priority, Recorded, RunId, Seq, TaskId};
use serde::de::DeserializeOwned;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, FromRow};
use tokio::sync::{broadcast, mpsc, oneshot};

use self::agents::PutAgent;
use self::export::RelayLease;
use self::journal::{AppendEvents, Encoded, Insert, Submit};
use self::limits::Limits;
use self::queue::{Claim, Heartbeat, ReleaseAll, RetryLater};
use self::writer::{Call, Op, Reply, Writer};
use crate::limit::{self, Adjust, Take};
use crate::purge::Scope;
use crate::{
    AgentRecord, AgentUsage, Append, Appended, BreakerRecord, Committed, DeadLetter, DeltaBatch,
    DeltaPos, Deltas, Error, ExportStatus, Grant, Lease, OutboxEntry, Projection, Purge, Purged,
    Queued, QueuedCall, Rate, Registered, Result, RunFilter, RunRecord, Store, Submission,
    Submitted, Task, TaskKind, TaskUpdate, UsageTotals,
};

/// Read connections (WAL readers run alongside the writer).
const READ_CONNECTIONS: u32 = 4;
/// Ops that may wait for the writer before callers wait to send.
const QUEUE: usize = 4 * writer::MAX_BATCH;
/// Commit notifications a slow subscriber may fall behind by.
const NOTIFICATIONS: usize = 16 * 1024;
/// How long a statement waits for a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The writer's page cache, in KiB (as `PRAGMA cache_size` takes it: negative).
const WRITE_CACHE_KIB: &str = "-32768";
/// How the write-ahead log is kept in bounds.
#[derive(Clone, Copy, Debug)]
struct Wal {
    /// WAL pages after which a commit checkpoints (SQLite's default is
    /// 1000). A batch dirties a page per run it touches, so checkpointing
    /// less often copies each hot page back to the database once instead of
    /// many times.
    checkpoint_pages: u32,
    /// Bytes the WAL file is cut back to when it starts over. While a long
    /// reader (a backup, a big report) holds a snapshot, checkpoints cannot
    /// reach the frames after it and the file grows past the checkpoint
    /// size; SQLite would keep it at its largest for good. Above what the
    /// checkpoint size lets the file reach (~40 MB), so steady writing
    /// never cuts it.
    size_limit: u64,
}

impl Wal {
    const DEFAULT: Wal = Wal {
        checkpoint_pages: 10_000,
        size_limit: 64 << 20,
    };
}
/// Prepared statements the writer keeps: each bulk statement is prepared
/// for several sizes.
const STATEMENTS: usize = 256;

/// The SQLite store: a cheap handle to the writer task and the read pool.
/// The writer stops when the last handle is dropped.
///
/// A write is committed (or refused) once handed to the writer, even if
/// the caller stops waiting for the answer.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    ops: mpsc::Sender<Op>,
    reads: SqlitePool,
    commits: broadcast::Sender<Committed>,
    limits: Limits,
    breakers: breakers::Breakers,
}

impl SqliteStore {
    /// Opens (or creates) the database file in WAL mode with
    /// `synchronous=FULL` (a commit is on disk when it returns), brings its
    /// schema up to date and starts the writer task. Must be called inside a
    /// Tokio runtime.
    pub async fn open(path: &Path) -> Result<SqliteStore> {
        SqliteStore::open_with(path, Wal::DEFAULT).await
    }

    /// [`SqliteStore::open`] with the WAL kept in the bounds of `wal`.
    async fn open_with(path: &Path, wal: Wal) -> Result<SqliteStore> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Statement journals (multi-row statements in a transaction) and
            // sorts stay in memory instead of temporary files.
            .pragma("temp_store", "MEMORY");

        let mut conn = options
            .clone()
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .pragma("cache_size", WRITE_CACHE_KIB)
            .pragma("wal_autocheckpoint", wal.checkpoint_pages.to_string())
            .pragma("journal_size_limit", wal.size_limit.to_string())
            .statement_cache_capacity(STATEMENTS)
            .connect()
            .await
            .map_err(backend)?;
        migrate::run(&mut conn).await?;

        let reads = SqlitePoolOptions::new()
            .max_connections(READ_CONNECTIONS)
            .connect_with(options.pragma("query_only", "ON"))
            .await
            .map_err(backend)?;

        let (ops, queue) = mpsc::channel(QUEUE);
        let (commits, _) = broadcast::channel(NOTIFICATIONS);
        let writer = Writer {
            conn,
            ops: queue,
            commits: commits.clone(),
        };
        tokio::spawn(writer.run());
        Ok(SqliteStore {
            ops,
            reads,
            commits,
            limits: Limits::default(),
            breakers: breakers::Breakers::default(),
        })
    }

    /// Gives back every live lease, whoever holds it, so the tasks run again
    /// at once; returns how many. Only for a process that just opened the
    /// file and knows it is its only user: the leases are then those of a
    /// process that died, and need not be waited out. Each attempt stays
    /// counted (the task may be what brought that process down), unlike
    /// [`Store::release_all`].
    pub async fn recover_leases(&self, now: Millis) -> Result<u64> {
        let request = ReleaseAll { owner: None, now };
        self.write(|reply| Op::ReleaseAll(Call::new(request, reply)))
            .await
    }

    /// Hands an op to the writer and waits for its committed result.
    async fn write<T>(&self, op: impl FnOnce(Reply<T>) -> Op) -> Result<T> {
        let (reply, result) = oneshot::channel();
        self.ops.send(op(reply)).await.map_err(|_| Error::Closed)?;
        result.await.map_err(|_| Error::Closed)?
    }
}

/// Maps a database error: a value that does not decode is corrupt data,
/// anything else is the database failing.
fn backend(error: sqlx::Error) -> Error {
    match error {
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
            Error::Corrupt(error.to_string())
        }
        other => Error::Backend(other.to_string()),
    }
}

/// Parses a stored id.
fn parse_id<T: FromStr>(text: &str, what: &str) -> Result<T> {
    text.parse()
        .map_err(|_| Error::Corrupt(format!("{what} `{text}` is not a UUID")))
}

/// Parses stored JSON.
fn parse_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Corrupt(format!("{what} is not valid: {e}")))
}

/// Token counts as stored (SQLite integers are signed).
fn tokens(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
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

/// Serializes a value to store.
fn to_json<T: serde::Serialize>(value: &T, what: &str) -> Result<String> {
    serde_json::to_string(value)
        .map_err(|e| Error::Backend(format!("{what} does not serialize: {e}")))
}

/// Gives a new task its id and the token of the lease it may be created
/// with (non-negative, like the tokens `claim` draws).
/// A submission as the writer takes it; its first task is always queued.
fn submit_request(submission: Submission) -> Result<Submit> {
    let mut task = submission.task;
    task.lease_to = None;
    Ok(Submit {
        run_id: submission.run_id,
        tenant: submission.tenant,
        agent: submission.agent,
        version: submission.version,
        input_json: to_json(&submission.input, "run input")?,
        input: submission.input,
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
    id: String,
    tenant: String,
    agent: String,
    version: String,
    status: String,
    steps: u32,
    input: String,
    output: Option<String>,
    error: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
    last_seq: Seq,
    created_at: Millis,
    updated_at: Millis,
    priority: i64,
}

impl RunRow {
    fn into_record(self) -> Result<RunRecord> {
        let id: RunId = parse_id(&self.id, "run id")?;
        let status = Status::parse(&self.status)
            .ok_or_else(|| Error::Corrupt(format!("run {id}: unknown status `{}`", self.status)))?;
        Ok(RunRecord {
            id,
            input: parse_json(&self.input, &format!("input of run {id}"))?,
            tenant: self.tenant,
            agent: self.agent,
            version: self.version,
            priority: Priority::new(self.priority).ok_or_else(|| {
                Error::Corrupt(format!(
                    "run {id}: priority {} is not in 0..=9",
                    self.priority
                ))
            })?,
            projection: Projection {
                status,
                steps: self.steps,
                output: self.output,
                error: self.error,
                usage: Usage {
                    input_tokens: self.input_tokens,
                    output_tokens: self.output_tokens,
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
    id: String,
    run_id: String,
    kind: String,
    step: u32,
    attempts: u32,
    error: String,
    created_at: Millis,
}

impl DeadLetterRow {
    fn into_record(self) -> Result<DeadLetter> {
        let id: TaskId = parse_id(&self.id, "dead letter id")?;
        let kind = TaskKind::parse(&self.kind).ok_or_else(|| {
            Error::Corrupt(format!("dead letter {id}: unknown kind `{}`", self.kind))
        })?;
        Ok(DeadLetter {
            id,
            run_id: parse_id(&self.run_id, "run id of a dead letter")?,
            kind,
            step: self.step,
            attempts: self.attempts,
            error: self.error,
            created_at: self.created_at,
        })
    }
}

const GET_AGENT: &str = "SELECT tenant, spec, created_at FROM agents \
     WHERE tenant = ?1 AND name = ?2 AND version = ?3";
const GET_LATEST_AGENT: &str = "SELECT tenant, spec, created_at FROM agents \
     WHERE tenant = ?1 AND name = ?2 ORDER BY id DESC LIMIT 1";
const LIST_AGENTS: &str =
    "SELECT tenant, spec, created_at FROM agents WHERE tenant = ?1 ORDER BY name, id";

const GET_RUN: &str = "SELECT id, tenant, agent, version, status, steps, input, output, error, \
     input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority FROM runs WHERE id = ?1";
/// Sorts after every hyphenated UUID: the `before` cursor of a first page.
const AFTER_EVERY_ID: &str = "~";
const LIST_RUNS: &str = "SELECT id, tenant, agent, version, status, steps, input, output, error, \
     input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority FROM runs \
     WHERE tenant = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3";
const LIST_RUNS_BY_STATUS: &str = "SELECT id, tenant, agent, version, status, steps, input, \
     output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority FROM runs \
     WHERE tenant = ?1 AND id < ?2 AND status = ?4 ORDER BY id DESC LIMIT ?3";
const LIST_RUNS_BY_AGENT: &str = "SELECT id, tenant, agent, version, status, steps, input, \
     output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority FROM runs \
     WHERE tenant = ?1 AND id < ?2 AND agent = ?4 ORDER BY id DESC LIMIT ?3";
const LIST_RUNS_BY_STATUS_AND_AGENT: &str = "SELECT id, tenant, agent, version, status, steps, \
     input, output, error, input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at, priority \
     FROM runs WHERE tenant = ?1 AND id < ?2 AND status = ?4 AND agent = ?5 \
     ORDER BY id DESC LIMIT ?3";

const EVENTS: &str = "SELECT seq, at, data FROM events \
     WHERE run_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3";

const DEAD_LETTERS: &str = "SELECT d.id, d.run_id, d.kind, d.step, d.attempts, d.error, d.created_at \
     FROM dead_letters d JOIN runs r ON r.id = d.run_id WHERE r.tenant = ?2 \
     ORDER BY d.created_at DESC, d.id DESC LIMIT ?1";
const DEAD_LETTER: &str = "SELECT id, run_id, kind, step, attempts, error, created_at \
     FROM dead_letters WHERE id = ?1";

const NEXT_DUE: &str = "SELECT MIN(visible_at) FROM tasks WHERE visible_at > ?1 AND queue IS NULL";

/// A task of an external queue ([`Store::queued`]).
const QUEUED: &str = "SELECT id, run_id, queue, call_index, step, attempts, max_attempts, \
         lease_token, visible_at \
     FROM tasks WHERE id = ?1 AND queue IS NOT NULL";

/// A row of [`QUEUED`].
#[derive(sqlx::FromRow)]
struct QueuedRow {
    id: String,
    run_id: String,
    queue: String,
    call_index: u32,
    step: u32,
    attempts: u32,
    max_attempts: u32,
    lease_token: Option<i64>,
    visible_at: Millis,
}

impl QueuedRow {
    fn into_queued(self, now: Millis) -> Result<Queued> {
        Ok(Queued {
            task_id: parse_id(&self.id, "task id")?,
            run_id: parse_id(&self.run_id, "run id of a task")?,
            call: QueuedCall {
                queue: self.queue,
                call_index: self.call_index,
            },
            step: self.step,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            lease_token: self.lease_token.filter(|_| self.visible_at > now),
            visible_at: self.visible_at,
        })
    }
}

/// Counts from the `runs_pending` partial index, whose WHERE clause they
/// repeat word for word (SQLite uses a partial index only then).
const PENDING_RUNS: &str = "SELECT COUNT(*) FROM runs WHERE tenant = ?1 \
     AND status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL', \
     'AWAITING_CHILDREN', 'COMPENSATING')";
const PENDING_RUNS_OF_AGENT: &str = "SELECT COUNT(*) FROM runs WHERE tenant = ?1 AND agent = ?2 \
     AND status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL', \
     'AWAITING_CHILDREN', 'COMPENSATING')";

/// Sums of run rows ([`Store::usage`]). `TOTAL` is a float even over no
/// rows; `SUM` of integers is an integer (an error on overflow), NULL over
/// no rows.
const USAGE: &str = "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), \
     COALESCE(SUM(output_tokens), 0), TOTAL(cost_usd) \
     FROM runs WHERE tenant = ?1 AND created_at >= ?2";
/// As [`USAGE`], of one agent (through `runs_by_agent`).
const USAGE_OF_AGENT: &str = "SELECT COUNT(*), COALESCE(SUM(input_tokens), 0), \
     COALESCE(SUM(output_tokens), 0), TOTAL(cost_usd) \
     FROM runs WHERE tenant = ?1 AND agent = ?3 AND created_at >= ?2";
/// As [`USAGE`], per agent.
const USAGE_BY_AGENT: &str = "SELECT agent, COUNT(*), COALESCE(SUM(input_tokens), 0), \
     COALESCE(SUM(output_tokens), 0), TOTAL(cost_usd) \
     FROM runs WHERE tenant = ?1 AND created_at >= ?2 GROUP BY agent ORDER BY agent";

/// A row of sums: runs, input tokens, output tokens, cost.
impl Store for SqliteStore {
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
        let row = query.fetch_optional(&self.reads).await.map_err(backend)?;
        row.map(AgentRow::into_record).transpose()
    }

    async fn list_agents(&self, tenant: &str) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query_as::<_, AgentRow>(LIST_AGENTS)
            .bind(tenant)
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
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
        let row = sqlx::query_as::<_, RunRow>(GET_RUN)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(backend)?;
        row.map(RunRow::into_record).transpose()
    }

    async fn purge(&self, purge: Purge) -> Result<Purged> {
        let scope = Scope::Ended(purge);
        self.write(|reply| Op::Purge(Call::new(scope, reply))).await
    }

    async fn delete_run(&self, id: RunId) -> Result<()> {
        let scope = Scope::One(id);
        self.write(|reply| Op::Purge(Call::new(scope, reply)))
            .await
            .map(drop)
    }

    async fn list_runs(&self, filter: RunFilter) -> Result<Vec<RunRecord>> {
        let before = filter.before.map(|id| id.to_string());
        let before = before.as_deref().unwrap_or(AFTER_EVERY_ID);
        let sql = match (&filter.status, &filter.agent) {
            (None, None) => LIST_RUNS,
            (Some(_), None) => LIST_RUNS_BY_STATUS,
            (None, Some(_)) => LIST_RUNS_BY_AGENT,
            (Some(_), Some(_)) => LIST_RUNS_BY_STATUS_AND_AGENT,
        };
        let mut query = sqlx::query_as::<_, RunRow>(sql)
            .bind(&filter.tenant)
            .bind(before)
            .bind(filter.limit);
        if let Some(status) = filter.status {
            query = query.bind(status.as_str());
        }
        if let Some(agent) = &filter.agent {
            query = query.bind(agent);
        }
        let rows = query.fetch_all(&self.reads).await.map_err(backend)?;
        let mut runs = Vec::with_capacity(rows.len());
        for row in rows {
            runs.push(row.into_record()?);
        }
        Ok(runs)
    }

    async fn events(&self, run_id: RunId, after: Seq, limit: u32) -> Result<Vec<Recorded>> {
        let rows = sqlx::query_as::<_, EventRow>(EVENTS)
            .bind(run_id.to_string())
            .bind(after)
            .bind(limit)
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
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
        let row = sqlx::query_as::<_, QueuedRow>(QUEUED)
            .bind(task_id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(backend)?;
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
            error: error.to_string(),
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
            error: reason.to_string(),
            retry_at: until,
            now,
            counted: false,
        };
        self.write(|reply| Op::RetryLater(Call::new(request, reply)))
            .await
    }

    async fn release_all(&self, owner: &str, now: Millis) -> Result<u64> {
        let request = ReleaseAll {
            owner: Some(owner.to_string()),
            now,
        };
        self.write(|reply| Op::ReleaseAll(Call::new(request, reply)))
            .await
    }

    async fn dead_letters(&self, tenant: &str, limit: u32) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query_as::<_, DeadLetterRow>(DEAD_LETTERS)
            .bind(limit)
            .bind(tenant)
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
        let mut letters = Vec::with_capacity(rows.len());
        for row in rows {
            letters.push(row.into_record()?);
        }
        Ok(letters)
    }

    async fn dead_letter(&self, id: TaskId) -> Result<Option<DeadLetter>> {
        let row = sqlx::query_as::<_, DeadLetterRow>(DEAD_LETTER)
            .bind(id.to_string())
            .fetch_optional(&self.reads)
            .await
            .map_err(backend)?;
        row.map(DeadLetterRow::into_record).transpose()
    }

    async fn stats(&self, now: Millis) -> Result<crate::Stats> {
        stats::stats(&self.reads, now).await
    }

    async fn next_due(&self, now: Millis) -> Result<Option<Millis>> {
        sqlx::query_scalar(NEXT_DUE)
            .bind(now)
            .fetch_one(&self.reads)
            .await
            .map_err(backend)
    }

    async fn append_deltas(&self, batch: DeltaBatch) -> Result<DeltaPos> {
        self.write(|reply| Op::Deltas(Call::new(batch, reply)))
            .await
    }

    async fn deltas(&self, run_id: RunId, after: Option<DeltaPos>, limit: u32) -> Result<Deltas> {
        // Steps start at 1, so (0, 0, 0) is before every delta.
        let after = after.unwrap_or(DeltaPos {
            step: 0,
            attempt: 0,
            idx: 0,
        });
        let rows = sqlx::query_as::<_, deltas::Row>(deltas::READ)
            .bind(run_id.to_string())
            .bind(after.step)
            .bind(after.attempt)
            .bind(after.idx)
            .bind(limit.max(1))
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
        let mut page = Deltas {
            last_seq: 0,
            deltas: Vec::with_capacity(rows.len()),
        };
        if rows.is_empty() {
            return Err(Error::NotFound(format!("run {run_id}")));
        }
        for row in rows {
            let (last_seq, delta) = row.into_delta(run_id)?;
            page.last_seq = last_seq;
            page.deltas.extend(delta);
        }
        Ok(page)
    }

    fn subscribe(&self) -> broadcast::Receiver<Committed> {
        self.commits.subscribe()
    }

    async fn enable_export(&self) -> Result<()> {
        self.write(|reply| Op::EnableExport(Call::new((), reply)))
            .await
    }

    async fn disable_export(&self) -> Result<u64> {
        self.write(|reply| Op::DisableExport(Call::new((), reply)))
            .await
    }

    async fn export_status(&self, relay: &str, now: Millis) -> Result<ExportStatus> {
        export::status(&self.reads, relay, now).await
    }

    async fn outbox(&self, max_events: u32) -> Result<Vec<OutboxEntry>> {
        export::outbox(&self.reads, max_events).await
    }

    async fn ack_outbox(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        self.write(|reply| Op::AckOutbox(Call::new(ids, reply)))
            .await
    }

    async fn relay_lease(
        &self,
        name: &str,
        owner: &str,
        until: Millis,
        now: Millis,
    ) -> Result<bool> {
        let request = RelayLease {
            name: name.to_string(),
            owner: owner.to_string(),
            until,
            now,
        };
        self.write(|reply| Op::RelayLease(Call::new(request, reply)))
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
        let row = query.fetch_one(&self.reads).await.map_err(backend)?;
        UsageTotals::from_sums(row)
    }

    async fn usage_by_agent(&self, tenant: &str, since: Option<Millis>) -> Result<Vec<AgentUsage>> {
        let rows: Vec<(String, i64, i64, i64, f64)> = sqlx::query_as(USAGE_BY_AGENT)
            .bind(tenant)
            .bind(since.unwrap_or(Millis::MIN))
            .fetch_all(&self.reads)
            .await
            .map_err(backend)?;
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
        let count: i64 = query.fetch_one(&self.reads).await.map_err(backend)?;
        u64::try_from(count).map_err(|_| Error::Corrupt(format!("run count {count} is negative")))
    }

    async fn take_capacity(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        max_wait: Duration,
        now: Millis,
    ) -> Result<Grant> {
        let take = Take::new(key, rate, cost, max_wait, now)?;
        Ok(self.limits.take(key, &take))
    }

    async fn adjust_capacity(&self, key: &str, rate: Rate, delta: i64, now: Millis) -> Result<()> {
        let adjust = Adjust::new(key, rate, delta, now)?;
        self.limits.adjust(key, &adjust, limit::ns(now));
        Ok(())
    }

    async fn hold_capacity(&self, key: &str, until: Millis) -> Result<()> {
        self.limits.hold(key, limit::ns(until));
        Ok(())
    }

    async fn active_limits(&self, prefix: &str, except: &str, since: Millis) -> Result<u64> {
        Ok(self.limits.active(prefix, except, limit::ns(since)))
    }

    /// In memory (see `breakers`).
    async fn put_breaker(&self, record: BreakerRecord) -> Result<()> {
        self.breakers.put(record);
        Ok(())
    }

    async fn breakers(&self) -> Result<Vec<BreakerRecord>> {
        Ok(self.breakers.all())
    }
}
