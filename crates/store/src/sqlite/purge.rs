//! Deleting ended runs: a writer op, so the runs are read and deleted in
//! the batch's transaction, and no append can come in between (`purge`,
//! in the crate, decides which runs may go).

use std::collections::HashMap;

use keel_core::RunId;
use keel_core::run::Status;
use sqlx::SqliteConnection;

use super::backend;
use crate::purge::{self, Row, Runs, Scope};
use crate::{Purged, Result};

/// Ended runs, oldest first, from `?2` on and up to the id of a run created
/// at the cutoff (`?1`), that ended before `?3` and that nothing needs:
/// no task of their own, no outbox entry. The outbox is read once (`NOT
/// IN` a list), as it may be long while the relay is behind.
const ENDED: &str = "SELECT r.id, r.status, e.data AS first, 0 AS tasks, 0 AS unexported \
     FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.seq = 1 \
     WHERE r.id < ?1 AND r.id > ?2 \
       AND r.status IN ('COMPLETED', 'FAILED', 'CANCELLED') AND r.updated_at < ?3 \
       AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.id) \
       AND r.id NOT IN (SELECT run_id FROM outbox) \
     ORDER BY r.id LIMIT ?4";

/// One run, whatever its state.
const ONE: &str = "SELECT r.id, r.status, e.data AS first, \
         EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.id) AS tasks, \
         EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = r.id) AS unexported \
     FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.seq = 1 \
     WHERE r.id = ?1";

/// The status of each run in a JSON array of ids.
const STATUSES: &str = "SELECT id, status FROM runs WHERE id IN (SELECT value FROM json_each(?1))";

/// Everything stored about the runs in a JSON array of ids, their rows last.
const DELETE: [&str; 5] = [
    "DELETE FROM events WHERE run_id IN (SELECT value FROM json_each(?1))",
    "DELETE FROM deltas WHERE run_id IN (SELECT value FROM json_each(?1))",
    "DELETE FROM dead_letters WHERE run_id IN (SELECT value FROM json_each(?1))",
    "DELETE FROM tasks WHERE run_id IN (SELECT value FROM json_each(?1))",
    "DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?1))",
];

/// Deletes the runs in `scope` that may go.
pub(super) async fn purge(conn: &mut SqliteConnection, scope: &Scope) -> Result<Purged> {
    let rows: Vec<Row> = match scope {
        Scope::Ended(p) => {
            let after = p.after.map_or_else(String::new, |id| id.to_string());
            sqlx::query_as(ENDED)
                .bind(purge::id_cutoff(p.ended_before).to_string())
                .bind(after)
                .bind(p.ended_before)
                .bind(i64::from(p.limit))
                .fetch_all(&mut *conn)
                .await
        }
        Scope::One(id) => {
            sqlx::query_as(ONE)
                .bind(id.to_string())
                .fetch_all(&mut *conn)
                .await
        }
    }
    .map_err(backend)?;
    let runs = Runs::new(rows, scope)?;
    let parents = statuses(conn, &runs.parents()).await?;
    let (delete, next) = runs.decide(scope, &parents)?;
    if !delete.is_empty() {
        let ids = ids_json(&delete)?;
        for sql in DELETE {
            sqlx::query(sql)
                .bind(&ids)
                .execute(&mut *conn)
                .await
                .map_err(backend)?;
        }
    }
    Ok(Purged {
        deleted: delete,
        next,
    })
}

/// The status of each of `ids` still stored.
async fn statuses(conn: &mut SqliteConnection, ids: &[RunId]) -> Result<HashMap<RunId, Status>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, String)> = sqlx::query_as(STATUSES)
        .bind(ids_json(ids)?)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    purge::statuses(rows)
}

/// Ids as a JSON array of their text, for `json_each`.
fn ids_json(ids: &[RunId]) -> Result<String> {
    let texts: Vec<String> = ids.iter().map(ToString::to_string).collect();
    super::to_json(&texts, "run ids")
}
