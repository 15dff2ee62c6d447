//! Streamed LLM output (text and tool-call pieces): writing a batch (fenced, through the writer) and
//! reading a run's deltas (on the read pool). Deleting them is part of an
//! append (`journal`).

use keel_core::{Millis, RunId, Seq};
use sqlx::SqliteConnection;

use super::backend;
use crate::{Committed, Delta, DeltaAttempt, DeltaBatch, DeltaPos, Error, Result};

/// The fence of a delta write, and the run's last seq to announce: the
/// lease is live on a task of the run.
const FENCE: &str = "SELECT runs.last_seq FROM tasks JOIN runs ON runs.id = tasks.run_id \
     WHERE tasks.id = ?1 AND tasks.run_id = ?2 AND tasks.lease_token = ?3 \
       AND tasks.visible_at > ?4";

/// The attempt a new one must be above: the newest with deltas stored.
const NEWEST_ATTEMPT: &str =
    "SELECT COALESCE(MAX(attempt), 0) FROM deltas WHERE run_id = ?1 AND step = ?2";

const INSERT: &str = "INSERT INTO deltas (run_id, step, attempt, idx, text, tool_calls, at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING";

/// Writes a batch in the writer's transaction; a refusal (lost lease,
/// position taken) writes nothing.
pub(super) async fn append(
    conn: &mut SqliteConnection,
    batch: &DeltaBatch,
    commits: &mut Vec<Committed>,
) -> Result<DeltaPos> {
    let run = batch.run_id.to_string();
    let last_seq: Option<Seq> = sqlx::query_scalar(FENCE)
        .bind(batch.lease.task_id.to_string())
        .bind(&run)
        .bind(batch.lease.token)
        .bind(batch.now)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    let Some(last_seq) = last_seq else {
        return Err(Error::LeaseLost(batch.lease.task_id));
    };
    let pos = match batch.attempt {
        DeltaAttempt::Open(floor) => {
            let newest: i64 = sqlx::query_scalar(NEWEST_ATTEMPT)
                .bind(&run)
                .bind(batch.step)
                .fetch_one(&mut *conn)
                .await
                .map_err(backend)?;
            let above = u32::try_from(newest.saturating_add(1)).map_err(|_| {
                Error::Corrupt(format!(
                    "delta attempt {newest} of run {run} is out of range"
                ))
            })?;
            DeltaPos {
                step: batch.step,
                attempt: floor.max(above),
                idx: 0,
            }
        }
        DeltaAttempt::Continue { attempt, idx } => DeltaPos {
            step: batch.step,
            attempt,
            idx,
        },
    };
    let written = sqlx::query(INSERT)
        .bind(&run)
        .bind(pos.step)
        .bind(pos.attempt)
        .bind(pos.idx)
        .bind(batch.text.as_str())
        .bind(crate::tool_calls_column(&batch.tool_calls))
        .bind(batch.now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?
        .rows_affected();
    if written == 0 {
        return Err(Error::Conflict(format!(
            "run {run}: delta {}.{}.{} is already written",
            pos.step, pos.attempt, pos.idx
        )));
    }
    commits.push(Committed {
        run_id: batch.run_id,
        last_seq,
        new_work: false,
    });
    Ok(pos)
}

/// A run's deltas after a position, with its last seq, in one statement (so
/// one snapshot). The run row is always returned (the left join gives one
/// row of NULLs when there are no deltas).
pub(super) const READ: &str = "SELECT runs.last_seq, d.step, d.attempt, d.idx, d.text, \
         d.tool_calls, d.at \
     FROM runs LEFT JOIN deltas AS d ON d.run_id = runs.id \
         AND (d.step, d.attempt, d.idx) > (?2, ?3, ?4) \
     WHERE runs.id = ?1 \
     ORDER BY d.step, d.attempt, d.idx \
     LIMIT ?5";

/// A row of [`READ`].
#[derive(sqlx::FromRow)]
pub(super) struct Row {
    last_seq: Seq,
    step: Option<i64>,
    attempt: Option<i64>,
    idx: Option<i64>,
    text: Option<String>,
    tool_calls: Option<String>,
    at: Option<Millis>,
}

impl Row {
    /// The run's last seq, and the delta if the row has one.
    pub(super) fn into_delta(self, run_id: RunId) -> Result<(Seq, Option<Delta>)> {
        let (Some(step), Some(attempt), Some(idx), Some(text), Some(at)) =
            (self.step, self.attempt, self.idx, self.text, self.at)
        else {
            return Ok((self.last_seq, None));
        };
        let tools = self.tool_calls.as_deref();
        let delta = crate::delta(run_id, [step, attempt, idx], text, tools, at)?;
        Ok((self.last_seq, Some(delta)))
    }
}
