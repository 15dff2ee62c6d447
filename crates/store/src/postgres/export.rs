//! Event export: the switch, reading and acknowledging the outbox, the
//! relay lease, and the status of all three. The outbox rows themselves are
//! written with the journal (`journal`), by the statement that inserts the
//! events.
//!
//! Everything here runs on the pool, not through the writer: each write
//! needs no order with the writer's batches (acks delete committed entries,
//! the switch is read by each batch's own statement, and a lease row is
//! touched by nothing else), and a relay renewing its lease should not wait
//! behind a backlog of appends. Switching export off is the one write that
//! must wait for the batches of every process: see [`disable`].

use std::time::Duration;

use keel_core::Millis;
use sqlx::{Connection, PgConnection};

use super::{backend, begin};
use crate::{Error, ExportStatus, OutboxEntry, Result, outbox};

const ENABLE: &str = "INSERT INTO settings (name, value) VALUES ('export', 'on') \
     ON CONFLICT (name) DO UPDATE SET value = excluded.value \
     WHERE settings.value <> excluded.value";

/// Switches export on: the events inserted after this commits are exported.
pub(super) async fn enable(conn: &mut PgConnection) -> Result<()> {
    sqlx::query(ENABLE)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Waits for every transaction that inserted into the outbox table (each
/// writer batch that journaled events, whatever the switch said: it holds a
/// lock on the table until it ends), and makes every later one wait until
/// this one ends.
const LOCK_OUTBOX: &str = "LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE";

const COUNT_OUTBOX: &str = "SELECT count(*) FROM outbox";

const DISABLE: &str = "UPDATE settings SET value = 'off' WHERE name = 'export' AND value <> 'off'";

/// Keeps the id sequence going (no `RESTART IDENTITY`), so a late ack of a
/// dropped entry cannot delete a later one.
const CLEAR_OUTBOX: &str = "TRUNCATE outbox";

/// Switches export off and drops every outbox entry, in one transaction;
/// how many.
///
/// A writer batch reads the switch in the statement that inserts its
/// events and their outbox rows (`journal`), then commits later: a plain
/// `UPDATE` of the switch followed by a `DELETE` would miss the rows of a
/// batch that read the switch as on and commits after the delete. So this
/// first locks the outbox table ([`LOCK_OUTBOX`]): the batches that read
/// the switch before are committed by the time it has the lock, so their
/// rows are counted and dropped; a batch whose insert comes later waits for
/// this commit, then reads the switch as off, since PostgreSQL takes a
/// statement's snapshot after the locks of the tables it names
/// (`postgres::tests::switching_export_off_waits_for_batches_in_flight`).
///
/// The writers pay nothing for this at other times (no lock of the switch's
/// row in every batch). While it waits for the lock and holds it, commits
/// that journal events wait, and so do outbox reads: batches are short, and
/// the lock is held for as long as counting the backlog takes. `TRUNCATE`
/// rather than `DELETE` so that a backlog of millions of entries is
/// dropped at once instead of row by row.
///
/// `timeout` is the store's ([`super::Options::timeout`]): the server ends
/// the transaction if its client leaves it waiting longer, so a lock held by
/// a connection the network lost is not held for good.
pub(super) async fn disable(conn: &mut PgConnection, timeout: Duration) -> Result<u64> {
    let mut tx = conn.begin_with(begin(timeout)).await.map_err(backend)?;
    sqlx::query(LOCK_OUTBOX)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let dropped: i64 = sqlx::query_scalar(COUNT_OUTBOX)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
    sqlx::query(DISABLE)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    sqlx::query(CLEAR_OUTBOX)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    tx.commit().await.map_err(backend)?;
    u64::try_from(dropped)
        .map_err(|_| Error::Corrupt(format!("outbox entry count {dropped} is negative")))
}

const DELETE_OUTBOX: &str = "DELETE FROM outbox WHERE id = ANY($1::bigint[])";

/// Deletes acknowledged outbox entries.
pub(super) async fn ack(conn: &mut PgConnection, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(DELETE_OUTBOX)
        .bind(ids)
        .execute(&mut *conn)
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
    conn: &mut PgConnection,
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
        .execute(&mut *conn)
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
pub(super) async fn outbox(conn: &mut PgConnection, max_events: u32) -> Result<Vec<OutboxEntry>> {
    let rows = sqlx::query_as::<_, outbox::Row>(OUTBOX)
        .bind(i64::from(max_events.max(1)))
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    outbox::entries(rows)
}

/// The switch, the backlog (the oldest entry taken as the lowest id: ids
/// follow insert order, which is commit order but for batches committing
/// at the same time) and the lease named `$1`, in one statement.
const STATUS: &str = "SELECT \
         EXISTS (SELECT 1 FROM settings WHERE name = 'export' AND value = 'on') AS enabled, \
         backlog.entries, backlog.events, \
         (SELECT events.at FROM outbox \
             JOIN events ON events.run_id = outbox.run_id AND events.seq = outbox.first_seq \
             ORDER BY outbox.id LIMIT 1) AS oldest, \
         relay_leases.owner, relay_leases.until \
     FROM (SELECT count(*) AS entries, \
             coalesce(sum(last_seq - first_seq + 1), 0)::bigint AS events \
         FROM outbox) AS backlog \
     LEFT JOIN relay_leases ON relay_leases.name = $1";

/// The export status, with the lease `relay` live if it runs past `now`.
pub(super) async fn status(
    conn: &mut PgConnection,
    relay: &str,
    now: Millis,
) -> Result<ExportStatus> {
    let row = sqlx::query_as::<_, outbox::StatusRow>(STATUS)
        .bind(relay)
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
    row.status(now)
}
