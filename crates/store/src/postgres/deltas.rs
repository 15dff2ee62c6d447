//! Streamed LLM output (text and tool-call pieces): writing a batch and reading a run's deltas, each one
//! statement on the pool (not through the writer: a batch waits for no
//! other write, and holds no lock but its task row's while it waits for
//! it, so it can be in no deadlock). Deleting them is part of an append
//! (`journal`, in the statement that inserts the events).

use keel_core::{Millis, RunId, Seq};
use sqlx::PgConnection;

use super::{backend, listen, storable};
use crate::{Committed, DeltaAttempt, DeltaBatch, DeltaPos, Error, Result};

/// Writes a batch if the lease is live on a task of the run (the share lock
/// makes a takeover wait for the write, or the write see the takeover), and
/// announces it at commit (`listen` payload, no new work). Returns the run's
/// last seq (none: the lease is lost) and the attempt written (none: the
/// position was taken). An opened attempt is above every stored one.
const APPEND: &str = "WITH fence AS ( \
         SELECT runs.last_seq FROM tasks JOIN runs ON runs.id = tasks.run_id \
         WHERE tasks.id = $1 AND tasks.run_id = $2 AND tasks.lease_token = $3 \
           AND tasks.visible_at > $4 \
         FOR SHARE OF tasks), \
     written AS ( \
         INSERT INTO deltas (run_id, step, attempt, idx, text, tool_calls, at) \
         SELECT $2, $5, CASE WHEN $6 THEN GREATEST($7, (SELECT COALESCE(MAX(attempt), 0) + 1 \
                 FROM deltas WHERE run_id = $2 AND step = $5)) ELSE $7 END, \
             $8, $9, $12, $4 \
         FROM fence \
         ON CONFLICT DO NOTHING \
         RETURNING attempt), \
     notified AS ( \
         SELECT pg_notify($10, format('%s %s %s 0', $11::text, $2::text, fence.last_seq)) \
         FROM fence, written) \
     SELECT (SELECT last_seq FROM fence), (SELECT attempt FROM written), \
         (SELECT count(*) FROM notified)";

/// Writes a batch; the commit is announced to this process's subscribers
/// through `commits`, to other processes by the statement.
pub(super) async fn append(
    conn: &mut PgConnection,
    origin: u64,
    commits: &tokio::sync::broadcast::Sender<Committed>,
    batch: &DeltaBatch,
) -> Result<DeltaPos> {
    let (open, attempt, idx) = match batch.attempt {
        DeltaAttempt::Open(floor) => (true, floor, 0),
        DeltaAttempt::Continue { attempt, idx } => (false, attempt, idx),
    };
    let (last_seq, written, _): (Option<Seq>, Option<i64>, i64) = sqlx::query_as(APPEND)
        .bind(batch.lease.task_id.0)
        .bind(batch.run_id.0)
        .bind(batch.lease.token)
        .bind(batch.now)
        .bind(i64::from(batch.step))
        .bind(open)
        .bind(i64::from(attempt))
        .bind(i64::from(idx))
        .bind(storable(&batch.text))
        .bind(listen::CHANNEL)
        .bind(format!("{origin:016x}"))
        .bind(crate::tool_calls_column(&batch.tool_calls))
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
    let Some(last_seq) = last_seq else {
        return Err(Error::LeaseLost(batch.lease.task_id));
    };
    let Some(attempt) = written else {
        return Err(Error::Conflict(format!(
            "run {}: delta {}.{attempt}.{idx} is already written",
            batch.run_id, batch.step
        )));
    };
    let attempt = u32::try_from(attempt).map_err(|_| {
        Error::Corrupt(format!(
            "delta attempt {attempt} of run {} is out of range",
            batch.run_id
        ))
    })?;
    // No subscriber is fine.
    let _ = commits.send(Committed {
        run_id: batch.run_id,
        last_seq,
        new_work: false,
    });
    Ok(DeltaPos {
        step: batch.step,
        attempt,
        idx,
    })
}

/// A run's deltas after a position, with its last seq, in one statement (so
/// one snapshot). The run row is always returned (the left join gives one
/// row of NULLs when there are no deltas).
const READ: &str = "SELECT runs.last_seq, d.step, d.attempt, d.idx, d.text, d.tool_calls, d.at \
     FROM runs LEFT JOIN deltas AS d ON d.run_id = runs.id \
         AND (d.step, d.attempt, d.idx) > ($2, $3, $4) \
     WHERE runs.id = $1 \
     ORDER BY d.step, d.attempt, d.idx \
     LIMIT $5";

type Row = (
    Seq,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<Millis>,
);

/// Reads a run's deltas after `after` ([`crate::Store::deltas`]).
pub(super) async fn read(
    conn: &mut PgConnection,
    run_id: RunId,
    after: DeltaPos,
    limit: u32,
) -> Result<crate::Deltas> {
    let rows: Vec<Row> = sqlx::query_as(READ)
        .bind(run_id.0)
        .bind(i64::from(after.step))
        .bind(i64::from(after.attempt))
        .bind(i64::from(after.idx))
        .bind(i64::from(limit.max(1)))
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    if rows.is_empty() {
        return Err(Error::NotFound(format!("run {run_id}")));
    }
    let mut page = crate::Deltas {
        last_seq: 0,
        deltas: Vec::with_capacity(rows.len()),
    };
    for (last_seq, step, attempt, idx, text, tools, at) in rows {
        page.last_seq = last_seq;
        if let (Some(step), Some(attempt), Some(idx), Some(text), Some(at)) =
            (step, attempt, idx, text, at)
        {
            let delta = crate::delta(run_id, [step, attempt, idx], text, tools.as_deref(), at)?;
            page.deltas.push(delta);
        }
    }
    Ok(page)
}
