//! The task queue's own writes: claiming, heartbeats, giving tasks back
//! (to retry after a failure, deferred without counting an attempt, or all
//! of an owner's at shutdown).
//!
//! A task's `visible_at` is when it can be claimed: its run time while
//! unleased, its lease expiry while leased. A lease is live while
//! `visible_at > now`, and an expired one needs no reaper.

use keel_core::{Millis, RunId, Seq, TaskId};
use sqlx::PgConnection;
use uuid::Uuid;

use super::{backend, count};
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
    pub(super) owner: String,
    pub(super) now: Millis,
}

/// Leases the due tasks of lowest rank (`visible_at - priority * 10000`:
/// [`crate::PRIORITY_CREDIT`]), skipping those another transaction holds
/// (being claimed, or written under a lease, elsewhere). It scans the
/// `tasks_by_rank` index from its start up to `now` (a due task's rank is
/// at most `now`) and checks dueness on the index entries (its second
/// column). Each lease gets its own random token (non-negative, like the
/// tokens of tasks leased on creation).
pub(super) const CLAIM: &str = "UPDATE tasks SET lease_owner = $1, \
         lease_token = (random() * 9.2e18)::bigint, visible_at = $2, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM tasks \
         WHERE (visible_at - priority * 10000) <= $3 AND visible_at <= $3 AND queue IS NULL \
         ORDER BY (visible_at - priority * 10000) LIMIT $4 \
         FOR UPDATE SKIP LOCKED) \
     RETURNING id, run_id, kind, step, attempts, max_attempts, lease_token, visible_at";

/// As [`CLAIM`], from one external worker's queue (`tasks_by_queue`).
const CLAIM_QUEUED: &str = "UPDATE tasks SET lease_owner = $1, \
         lease_token = (random() * 9.2e18)::bigint, visible_at = $2, attempts = attempts + 1 \
     WHERE id IN (SELECT id FROM tasks \
         WHERE queue = $5 AND (visible_at - priority * 10000) <= $3 AND visible_at <= $3 \
         ORDER BY (visible_at - priority * 10000) LIMIT $4 \
         FOR UPDATE SKIP LOCKED) \
     RETURNING id, run_id, kind, step, attempts, max_attempts, lease_token, visible_at";

/// A task row as claimed.
#[derive(sqlx::FromRow)]
struct Claimed {
    id: Uuid,
    run_id: Uuid,
    kind: String,
    step: i64,
    attempts: i64,
    max_attempts: i64,
    lease_token: i64,
    visible_at: Millis,
}

impl Claimed {
    fn into_task(self) -> Result<Task> {
        let task_id = TaskId(self.id);
        let kind = TaskKind::parse(&self.kind).ok_or_else(|| {
            Error::Corrupt(format!("task {task_id}: unknown kind `{}`", self.kind))
        })?;
        Ok(Task {
            lease: Lease {
                task_id,
                token: self.lease_token,
            },
            run_id: RunId(self.run_id),
            kind,
            step: count(self.step, "step", format_args!("task {task_id}"))?,
            attempts: count(self.attempts, "attempts", format_args!("task {task_id}"))?,
            max_attempts: count(
                self.max_attempts,
                "max attempts",
                format_args!("task {task_id}"),
            )?,
            lease_until: self.visible_at,
        })
    }
}

pub(super) async fn claim(conn: &mut PgConnection, r: &Claim) -> Result<Vec<Task>> {
    let sql = if r.queue.is_some() {
        CLAIM_QUEUED
    } else {
        CLAIM
    };
    let mut query = sqlx::query_as::<_, Claimed>(sql)
        .bind(&r.owner)
        .bind(r.lease_until)
        .bind(r.now)
        .bind(i64::from(r.limit));
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

/// Extends leases, each fenced by its token.
const HEARTBEAT: &str = "UPDATE tasks SET visible_at = $1 \
     FROM unnest($2::uuid[], $3::bigint[]) AS l (id, token) \
     WHERE tasks.id = l.id AND tasks.lease_token = l.token AND tasks.visible_at > $4";

pub(super) async fn heartbeat(conn: &mut PgConnection, r: &Heartbeat) -> Result<u64> {
    let ids: Vec<Uuid> = r.leases.iter().map(|l| l.task_id.0).collect();
    let tokens: Vec<i64> = r.leases.iter().map(|l| l.token).collect();
    let extended = sqlx::query(HEARTBEAT)
        .bind(r.until)
        .bind(ids)
        .bind(tokens)
        .bind(r.now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?
        .rows_affected();
    Ok(extended)
}

const RETRY_LATER: &str = "UPDATE tasks \
     SET lease_owner = NULL, lease_token = NULL, visible_at = $1, last_error = $2 \
     WHERE id = $3 AND lease_token = $4 AND visible_at > $5 RETURNING run_id";

/// As [`RETRY_LATER`], and takes back the attempt the lease counted (every
/// lease counts one: claimed, or leased on creation).
const DEFER: &str = "UPDATE tasks \
     SET lease_owner = NULL, lease_token = NULL, visible_at = $1, last_error = $2, \
         attempts = GREATEST(attempts - 1, 0) \
     WHERE id = $3 AND lease_token = $4 AND visible_at > $5 RETURNING run_id";

pub(super) async fn retry_later(
    conn: &mut PgConnection,
    r: &RetryLater,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    let run: Option<Uuid> = sqlx::query_scalar(if r.counted { RETRY_LATER } else { DEFER })
        .bind(r.retry_at)
        .bind(&r.error)
        .bind(r.lease.task_id.0)
        .bind(r.lease.token)
        .bind(r.now)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    let Some(run) = run else {
        return Err(Error::LeaseLost(r.lease.task_id));
    };
    requeued(conn, vec![run], commits).await
}

/// Unleases, visible now, and takes back the attempt: a graceful release
/// is not a failed attempt.
const RELEASE_ALL: &str = "UPDATE tasks SET lease_owner = NULL, lease_token = NULL, \
         visible_at = $1, attempts = GREATEST(attempts - 1, 0) \
     WHERE lease_owner = $2 AND visible_at > $1 RETURNING run_id";

pub(super) async fn release_all(
    conn: &mut PgConnection,
    r: &ReleaseAll,
    commits: &mut Vec<Committed>,
) -> Result<u64> {
    let mut runs: Vec<Uuid> = sqlx::query_scalar(RELEASE_ALL)
        .bind(r.now)
        .bind(&r.owner)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    let released = runs.len() as u64;
    runs.sort_unstable();
    runs.dedup();
    requeued(conn, runs, commits).await?;
    Ok(released)
}

const LAST_SEQS: &str = "SELECT id, last_seq FROM runs WHERE id = ANY($1::uuid[])";

/// The notifications for runs whose tasks went back to the queue.
async fn requeued(
    conn: &mut PgConnection,
    runs: Vec<Uuid>,
    commits: &mut Vec<Committed>,
) -> Result<()> {
    if runs.is_empty() {
        return Ok(());
    }
    let rows: Vec<(Uuid, Seq)> = sqlx::query_as(LAST_SEQS)
        .bind(runs)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    for (run_id, last_seq) in rows {
        commits.push(Committed {
            run_id: RunId(run_id),
            last_seq,
            new_work: true,
        });
    }
    Ok(())
}
