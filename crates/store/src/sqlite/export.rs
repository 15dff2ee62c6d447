//! Event export: the switch, reading and acknowledging the outbox, the
//! relay lease, and the status of all three. The outbox rows themselves are
//! written with the journal (`journal`), in the same statements'
//! transaction.
//!
//! The writes here are writer ops like any other (the writer owns the only
//! write connection); the outbox is read on the read pool.

use std::sync::LazyLock;

use keel_core::Millis;
use sqlx::{SqliteConnection, SqlitePool};

use super::backend;
use super::bulk::{self, Binding, Bulk, BulkRow};
use crate::{ExportStatus, OutboxEntry, Result, outbox};

/// [`super::writer::Op::RelayLease`].
pub(super) struct RelayLease {
    pub(super) name: String,
    pub(super) owner: String,
    pub(super) until: Millis,
    pub(super) now: Millis,
}

const ENABLE: &str = "INSERT INTO settings (name, value) VALUES ('export', 'on') \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value \
     WHERE settings.value <> excluded.value";

/// Switches export on: from this batch's journal writes on (they run after
/// the other ops of a batch), commits fill the outbox.
pub(super) async fn enable(conn: &mut SqliteConnection) -> Result<()> {
    sqlx::query(ENABLE)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

const DISABLE: &str = "UPDATE settings SET value = 'off' WHERE name = 'export' AND value <> 'off'";

/// Every entry; without a `WHERE`, SQLite drops the table's pages at once
/// instead of deleting row by row (and still counts the rows).
const CLEAR_OUTBOX: &str = "DELETE FROM outbox";

/// Switches export off and drops every outbox entry; how many. Earlier
/// batches are committed, so their entries are dropped, and this batch's
/// journal writes (they run after the other ops of a batch) read the switch
/// as off and write none: nothing is left behind.
pub(super) async fn disable(conn: &mut SqliteConnection) -> Result<u64> {
    sqlx::query(DISABLE)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let dropped = sqlx::query(CLEAR_OUTBOX)
        .execute(&mut *conn)
        .await
        .map_err(backend)?
        .rows_affected();
    Ok(dropped)
}

/// An outbox entry to delete.
struct IdRow(i64);

impl BulkRow for IdRow {
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q> {
        query.bind(self.0)
    }
}

static DELETE_OUTBOX: LazyLock<Bulk> = LazyLock::new(|| {
    Bulk::new(
        1,
        "WITH v (id) AS (VALUES {values}) DELETE FROM outbox WHERE id IN (SELECT id FROM v)",
    )
});

/// Deletes acknowledged outbox entries.
pub(super) async fn ack(conn: &mut SqliteConnection, ids: &[i64]) -> Result<()> {
    let rows: Vec<IdRow> = ids.iter().copied().map(IdRow).collect();
    bulk::execute(conn, &DELETE_OUTBOX, &rows).await?;
    Ok(())
}

/// Takes the lease when it is free, expired or the owner's own.
const TAKE_LEASE: &str = "INSERT INTO relay_leases (name, owner, until) VALUES (?1, ?2, ?3) \
     ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until \
     WHERE relay_leases.owner = excluded.owner OR relay_leases.until <= ?4";

/// Takes or extends a relay lease; whether the owner holds it.
pub(super) async fn lease(conn: &mut SqliteConnection, r: &RelayLease) -> Result<bool> {
    let written = sqlx::query(TAKE_LEASE)
        .bind(&r.name)
        .bind(&r.owner)
        .bind(r.until)
        .bind(r.now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?
        .rows_affected();
    Ok(written == 1)
}

/// The oldest entries (at most `?1`: each has an event at least), with the
/// events gathered before each (`before`); those that start below `?1`
/// events, joined with their run and events (by the events' primary key).
/// The joins are outer so that a dangling entry shows (as corrupt data).
const OUTBOX: &str = "WITH head AS ( \
         SELECT id, run_id, first_seq, last_seq, \
             SUM(last_seq - first_seq + 1) OVER (ORDER BY id) - (last_seq - first_seq + 1) \
                 AS before \
         FROM (SELECT id, run_id, first_seq, last_seq FROM outbox ORDER BY id LIMIT ?1)) \
     SELECT head.id, head.first_seq, head.last_seq, head.run_id, runs.tenant, runs.agent, \
         runs.version, events.seq, events.at, events.data \
     FROM head \
     LEFT JOIN runs ON runs.id = head.run_id \
     LEFT JOIN events ON events.run_id = head.run_id \
         AND events.seq BETWEEN head.first_seq AND head.last_seq \
     WHERE head.before < ?1 \
     ORDER BY head.id, events.seq";

/// The oldest outbox entries with their events, in commit order (which is
/// each run's seq order: see `journal`).
pub(super) async fn outbox(pool: &SqlitePool, max_events: u32) -> Result<Vec<OutboxEntry>> {
    let rows = sqlx::query_as::<_, outbox::Row>(OUTBOX)
        .bind(max_events.max(1))
        .fetch_all(pool)
        .await
        .map_err(backend)?;
    outbox::entries(rows)
}

/// The switch, the backlog (the oldest entry is the lowest id: the writer
/// gives ids in commit order) and the lease named `?1`, in one statement.
const STATUS: &str = "SELECT \
         EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on') AS enabled, \
         backlog.entries, backlog.events, \
         (SELECT events.at FROM outbox \
             JOIN events ON events.run_id = outbox.run_id AND events.seq = outbox.first_seq \
             ORDER BY outbox.id LIMIT 1) AS oldest, \
         relay_leases.owner, relay_leases.until \
     FROM (SELECT count(*) AS entries, coalesce(sum(last_seq - first_seq + 1), 0) AS events \
         FROM outbox) AS backlog \
     LEFT JOIN relay_leases ON relay_leases.name = ?1";

/// The export status, with the lease `relay` live if it runs past `now`.
pub(super) async fn status(pool: &SqlitePool, relay: &str, now: Millis) -> Result<ExportStatus> {
    let row = sqlx::query_as::<_, outbox::StatusRow>(STATUS)
        .bind(relay)
        .fetch_one(pool)
        .await
        .map_err(backend)?;
    row.status(now)
}
