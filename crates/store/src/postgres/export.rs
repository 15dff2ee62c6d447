//! Event export: the switch, reading and acknowledging the outbox, and the
//! relay lease. The outbox rows themselves are written with the journal
//! (`journal`), by the statement that inserts the events.
//!
//! Everything here runs on the pool, not through the writer: each write is
//! one statement that needs no order with the writer's batches (acks delete
//! committed entries, the switch is read by each batch's own statement, and
//! a lease row is touched by nothing else), and a relay renewing its lease
//! should not wait behind a backlog of appends.

use keel_core::Millis;
use sqlx::PgPool;

use super::backend;
use crate::{OutboxEntry, Result, outbox};

const ENABLE: &str = "INSERT INTO settings (name, value) VALUES ('export', 'on') \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value \
     WHERE settings.value <> excluded.value";

/// Switches export on: the events inserted after this commits are exported.
pub(super) async fn enable(pool: &PgPool) -> Result<()> {
    sqlx::query(ENABLE).execute(pool).await.map_err(backend)?;
    Ok(())
}

const DELETE_OUTBOX: &str = "DELETE FROM outbox WHERE id = ANY($1::bigint[])";

/// Deletes acknowledged outbox entries.
pub(super) async fn ack(pool: &PgPool, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(DELETE_OUTBOX)
        .bind(ids)
        .execute(pool)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Takes the lease when it is free, expired or the owner's own. Two relays
/// racing for a free lease: one inserts, the other waits for its commit,
/// then finds the row held and updates nothing.
const TAKE_LEASE: &str = "INSERT INTO relay_leases (name, owner, until) VALUES ($1, $2, $3) \
     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until \
     WHERE relay_leases.owner = excluded.owner OR relay_leases.until <= $4";

/// Takes or extends a relay lease; whether the owner holds it.
pub(super) async fn lease(
    pool: &PgPool,
    name: &str,
    owner: &str,
    until: Millis,
    now: Millis,
) -> Result<bool> {
    let written = sqlx::query(TAKE_LEASE)
        .bind(name)
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(pool)
        .await
        .map_err(backend)?
        .rows_affected();
    Ok(written == 1)
}

/// The oldest entries (at most `$1`: each has an event at least), with the
/// events gathered before each (`before`); those that start below `$1`
/// events, joined with their run and events (by the events' primary key).
/// The joins are outer so that a dangling entry shows (as corrupt data).
///
/// Ids are not in commit order across transactions: an entry committed
/// after this read with a lower id than one returned is returned by a later
/// call, since entries are deleted once acknowledged, not read past. A
/// run's entries are in its seq order (see `journal`).
const OUTBOX: &str = "WITH head AS ( \
         SELECT id, run_id, first_seq, last_seq, \
             sum(last_seq - first_seq + 1) OVER (ORDER BY id) - (last_seq - first_seq + 1) \
                 AS before \
         FROM (SELECT id, run_id, first_seq, last_seq FROM outbox ORDER BY id LIMIT $1) AS o) \
     SELECT head.id, head.first_seq, head.last_seq, head.run_id::text AS run_id, runs.tenant, \
         runs.agent, runs.version, events.seq, events.at, events.data::text AS data \
     FROM head \
     LEFT JOIN runs ON runs.id = head.run_id \
     LEFT JOIN events ON events.run_id = head.run_id \
         AND events.seq BETWEEN head.first_seq AND head.last_seq \
     WHERE head.before < $1 \
     ORDER BY head.id, events.seq";

/// The oldest outbox entries with their events.
pub(super) async fn outbox(pool: &PgPool, max_events: u32) -> Result<Vec<OutboxEntry>> {
    let rows = sqlx::query_as::<_, outbox::Row>(OUTBOX)
        .bind(i64::from(max_events.max(1)))
        .fetch_all(pool)
        .await
        .map_err(backend)?;
    outbox::entries(rows)
}
