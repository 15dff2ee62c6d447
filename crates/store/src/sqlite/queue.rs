//! The task queue's own writes: claiming, heartbeats, giving tasks back
//! (to retry after a failure, deferred without counting an attempt, or all
//! of an owner's at shutdown).
//!
//! A task's `visible_at` is when it can be claimed: its run time while
//! unleased, its lease expiry while leased. A lease is live while
//! `visible_at > now`, and an expired one needs no reaper.

use keel_core::{Millis, Seq, TaskId};
use sqlx::SqliteConnection;

use super::{backend, parse_id};
use crate::{Committed, Error, Lease, Result, Task, TaskKind};

/// [`super::writer::Op::Claim`].
pub(super) struct Claim {
    /// An external worker's queue, or `None` for the engine's tasks.
    pub(super) queue: Option<String>,
    pub(super) owner: String,
    pub(super) limit: u32,
    pub(super) lease_until: Millis,
    pub(super) now: Millis,
}

/// [`super::writer::Op::Heartbeat`].
pub(super) struct Heartbeat {
    /// The leases to extend, each fenced by its token.
    pub(super) leases: Vec<Lease>,
    pub(super) until: Millis,
    pub(super) now: Millis,
}

/// [`super::writer::Op::RetryLater`]: a retry after a failure, or a
/// deferral.
pub(super) struct RetryLater {
    pub(super) lease: Lease,
    pub(super) error: String,
    pub(super) retry_at: Millis,
    pub(super) now: Millis,
    /// Whether the attempt the lease counted stays counted (a failure) or
    /// is taken back (a deferral: [`crate::Store::defer`]).
    pub(super) counted: bool,
}

/// [`super::writer::Op::ReleaseAll`].
pub(super) struct ReleaseAll {
    /// The owner giving its leases back, or `None` to recover every lease
    /// after a crash.
    pub(super) owner: Option<String>,
    pub(super) now: Millis,
}

/// Leases the due tasks of lowest rank (`visible_at - priority * 10000`:
/// [`crate::PRIORITY_CREDIT`]), scanning the `tasks_by_rank` index from
/// its start: a due task's rank is at most `now`, and the index's second
/// column tells which of the entries up to `now` are due. The expression
/// is the index's, word for word (SQLite matches it as text). Each lease
/// gets its own random token (non-negative, like the tokens of tasks
/// leased on creation).
pub(super) const CLAIM: &str = "UPDATE tasks SET lease_owner = ?1, \
         lease_token = random() & 0x7FFFFFFFFFFFFFFF, visible_at = ?2, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM tasks \
         WHERE visible_at - priority * 10000 <= ?3 AND visible_at <= ?3 AND queue IS NULL \
         ORDER BY visible_at - priority * 10000 LIMIT ?4) \
     RETURNING id, run_id, kind, step, attempts, max_attempts, lease_token, visible_at";

/// As [`CLAIM`], from one external worker's queue (`tasks_by_queue`).
const CLAIM_QUEUED: &str = "UPDATE tasks SET lease_owner = ?1, \
         lease_token = random() & 0x7FFFFFFFFFFFFFFF, visible_at = ?2, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM tasks \
         WHERE queue = ?5 AND visible_at - priority * 10000 <= ?3 AND visible_at <= ?3 \
             AND queue IS NOT NULL \
         ORDER BY visible_at - priority * 10000 LIMIT ?4) \
     RETURNING id, run_id, kind, step, attempts, max_attempts, lease_token, visible_at";

/// A task row as claimed.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: String,
    run_id: String,
    kind: String,
    step: u32,
    attempts: u32,
    max_attempts: u32,
    lease_token: i64,
    visible_at: Millis,
}

impl Claimed {
    fn into_task(self) -> Result<Task> {
        let task_id: TaskId = parse_id(&self.id, "task id")?;
        let kind = TaskKind::parse(&self.kind).ok_or_else(|| {
            Error::Corrupt(format!("task {task_id}: unknown kind `{}`", self.kind))
        })?;
        Ok(Task {
            lease: Lease {
                task_id,
                token: self.lease_token,
            },
            run_id: parse_id(&self.run_id, "run id of a task")?,
            kind,
            step: self.step,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            lease_until: self.visible_at,
        })
    }
}

pub(super) async fn claim(conn: &mut SqliteConnection, r: &Claim) -> Result<Vec<Task>> {
    let sql = if r.queue.is_some() {
        CLAIM_QUEUED
    } else {
        CLAIM
    };
    let mut query = sqlx::query_as::<_, Claimed>(sql)
        .bind(&r.owner)
        .bind(r.lease_until)
        .bind(r.now)
        .bind(r.limit);
    if let Some(queue) = &r.queue {
        query = query.bind(queue);
    }
    let rows = query.fetch_all(&mut *conn).await.map_err(backend)?;
    let mut tasks = Vec::with_capacity(rows.len());
    for row in rows {
        tasks.push(row.into_task()?);
    }
    // RETURNING has no order; v7 ids put the oldest tasks first.
    tasks.sort_by_key(|t| t.lease.task_id);
    Ok(tasks)
}

/// Extends one lease, fenced by its token.
const EXTEND: &str =
    "UPDATE tasks SET visible_at = ?1 WHERE id = ?2 AND lease_token = ?3 AND visible_at > ?4";

/// One statement per lease: the writer's transaction makes them one write.
pub(super) async fn heartbeat(conn: &mut SqliteConnection, r: &Heartbeat) -> Result<u64> {
    let mut extended = 0;
    for lease in &r.leases {
        extended += sqlx::query(EXTEND)
            .bind(r.until)
            .bind(lease.task_id.to_string())
            .bind(lease.token)
            .bind(r.now)
            .execute(&mut *conn)
            .await
            .map_err(backend)?
            .rows_affected();
    }
    Ok(extended)
}

const RETRY_LATER: &str = "UPDATE tasks \
     SET lease_owner = NULL, lease_token = NULL, visible_at = ?1, last_error = ?2 \
     WHERE id = ?3 AND lease_token = ?4 AND visible_at > ?5 RETURNING run_id";

/// As [`RETRY_LATER`], and takes back the attempt the lease counted (every
/// lease counts one: claimed, or leased on creation).
const DEFER: &str = "UPDATE tasks \
     SET lease_owner = NULL, lease_token = NULL, visible_at = ?1, last_error = ?2, \
         attempts = MAX(attempts - 1, 0) \
     WHERE id = ?3 AND lease_token = ?4 AND visible_at > ?5 RETURNING run_id";

pub(super) async fn retry_later(
    conn: &mut SqliteConnection,
    r: &RetryLater,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let run: Option<String> = sqlx::query_scalar(if r.counted { RETRY_LATER } else { DEFER })
        .bind(r.retry_at)
        .bind(&r.error)
        .bind(r.lease.task_id.to_string())
        .bind(r.lease.token)
        .bind(r.now)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    let Some(run) = run else {
        return Err(Error::LeaseLost(r.lease.task_id));
    };
    commits.push(requeued(conn, &run).await?);
    Ok(())
}

/// Unleases, visible now, and takes back the attempt: a graceful release
/// is not a failed attempt.
const RELEASE_ALL: &str = "UPDATE tasks SET lease_owner = NULL, lease_token = NULL, \
         visible_at = ?1, attempts = MAX(attempts - 1, 0) \
     WHERE lease_owner = ?2 AND visible_at > ?1 RETURNING run_id";

/// Unleases every live lease of this process's engine, visible now. The
/// attempt stays counted: the task may be what brought its worker down.
/// External workers' leases are theirs: they outlive a restart.
const RECOVER: &str = "UPDATE tasks SET lease_owner = NULL, lease_token = NULL, visible_at = ?1 \
     WHERE lease_owner IS NOT NULL AND visible_at > ?1 AND queue IS NULL RETURNING run_id";

pub(super) async fn release_all(
    conn: &mut SqliteConnection,
    r: &ReleaseAll,
    commits: &mut Vec<Committed>,
) -> Result<u64> {
    let query = match &r.owner {
        Some(owner) => sqlx::query_scalar(RELEASE_ALL).bind(r.now).bind(owner),
        None => sqlx::query_scalar(RECOVER).bind(r.now),
    };
    let mut runs: Vec<String> = query.fetch_all(&mut *conn).await.map_err(backend)?;
    let released = runs.len() as u64;
    runs.sort_unstable();
    runs.dedup();
    for run in &runs {
        commits.push(requeued(conn, run).await?);
    }
    Ok(released)
}

const LAST_SEQ: &str = "SELECT last_seq FROM runs WHERE id = ?1";

/// The notification for a run whose task went back to the queue.
async fn requeued(conn: &mut SqliteConnection, run: &str) -> Result<Committed> {
    let last_seq: Seq = sqlx::query_scalar(LAST_SEQ)
        .bind(run)
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(Committed {
        run_id: parse_id(run, "run id of a task")?,
        last_seq,
        new_work: true,
    })
}
