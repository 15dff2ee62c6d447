//! Deleting ended runs, in one transaction on the pool (`purge`, in the
//! crate, decides which runs may go).
//!
//! The runs' rows are locked first (`FOR UPDATE OF r`), as every write to a
//! run does, so an append, a redrive or a claim's write for one of them
//! waits and then finds it gone. Sweeps of several processes skip each
//! other's rows (`SKIP LOCKED`) rather than wait.

use std::collections::HashMap;

use keel_core::RunId;
use keel_core::run::Status;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::{backend, begin};
use crate::purge::{self, Row, Runs, Scope};
use crate::{Purged, Result};

/// Ended runs (a set `outcome`), oldest first, from `$2` on and up to the
/// id of a run created at the cutoff (`$1`), that ended before `$3` and
/// that nothing needs: no task of their own, no outbox entry. The outbox
/// is read once (hashed `NOT IN`), as it may be long while the relay is
/// behind.
const ENDED: &str = "SELECT r.id::text AS id, r.status, e.data::text AS first, \
         false AS tasks, false AS unexported \
     FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.seq = 1 \
     WHERE r.id < $1 AND r.id > $2 AND r.outcome IS NOT NULL AND r.updated_at < $3 \
       AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.id) \
       AND r.id NOT IN (SELECT run_id FROM outbox) \
     ORDER BY r.id LIMIT $4 \
     FOR UPDATE OF r SKIP LOCKED";

/// One run, whatever its state.
const ONE: &str = "SELECT r.id::text AS id, r.status, e.data::text AS first, \
         EXISTS (SELECT 1 FROM tasks t WHERE t.run_id = r.id) AS tasks, \
         EXISTS (SELECT 1 FROM outbox o WHERE o.run_id = r.id) AS unexported \
     FROM runs r LEFT JOIN events e ON e.run_id = r.id AND e.seq = 1 \
     WHERE r.id = $1 \
     FOR UPDATE OF r";

/// The status of each of the runs.
const STATUSES: &str = "SELECT id::text, status FROM runs WHERE id = ANY($1::uuid[])";

/// Everything stored about the runs, their rows last.
const DELETE: [&str; 5] = [
    "DELETE FROM events WHERE run_id = ANY($1::uuid[])",
    "DELETE FROM deltas WHERE run_id = ANY($1::uuid[])",
    "DELETE FROM dead_letters WHERE run_id = ANY($1::uuid[])",
    "DELETE FROM tasks WHERE run_id = ANY($1::uuid[])",
    "DELETE FROM runs WHERE id = ANY($1::uuid[])",
];

/// Deletes the runs in `scope` that may go, in one transaction on `conn`
/// (which the server ends if its client goes silent for `timeout`).
pub(super) async fn purge(
    conn: &mut PgConnection,
    scope: &Scope,
    timeout: Duration,
) -> Result<Purged> {
    let mut tx = conn.begin_with(begin(timeout)).await.map_err(backend)?;
    let purged = run(&mut tx, scope).await?;
    tx.commit().await.map_err(backend)?;
    Ok(purged)
}

async fn run(conn: &mut PgConnection, scope: &Scope) -> Result<Purged> {
    let rows: Vec<Row> = match scope {
        Scope::Ended(p) => {
            sqlx::query_as(ENDED)
                .bind(purge::id_cutoff(p.ended_before))
                .bind(p.after.map_or(Uuid::nil(), |id| id.0))
                .bind(p.ended_before)
                .bind(i64::from(p.limit))
                .fetch_all(&mut *conn)
                .await
        }
        Scope::One(id) => sqlx::query_as(ONE).bind(id.0).fetch_all(&mut *conn).await,
    }
    .map_err(backend)?;
    let runs = Runs::new(rows, scope)?;
    let parents = statuses(conn, &runs.parents()).await?;
    let (delete, next) = runs.decide(scope, &parents)?;
    if !delete.is_empty() {
        let ids: Vec<Uuid> = delete.iter().map(|id| id.0).collect();
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
async fn statuses(conn: &mut PgConnection, ids: &[RunId]) -> Result<HashMap<RunId, Status>> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = ids.iter().map(|id| id.0).collect();
    let rows: Vec<(String, String)> = sqlx::query_as(STATUSES)
        .bind(ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    purge::statuses(rows)
}
