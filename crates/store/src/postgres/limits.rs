//! Rate limits shared by every process: one row per key in `rate_limits`
//! (migration 0004), holding the GCRA state of `crate::limit` in
//! nanoseconds. Each operation is one statement.
//!
//! They run on the pool, each committing on its own, not through the
//! writer: a take sits in front of an LLM call and must not wait behind a
//! backlog of appends, and nothing orders it with the writer's batches.
//! Nor are they fenced by a lease: a limit's state belongs to no task, the
//! statements keep it consistent by themselves, and the worst a worker
//! that lost its lease can do is take capacity it will not use, which
//! makes the limit stricter, never looser. (The same holds for a take
//! whose commit failed half-way: it may have taken capacity.)
//!
//! Concurrent takes of a key are serialised by its row lock: the upsert
//! locks the row (or waits for the transaction holding it), then decides
//! on the row's latest version, so no two takes are granted from the same
//! capacity, whichever processes make them
//! (`postgres::tests::rate_limits_hold_across_stores`). A refused take
//! writes no row version, only its row lock.
//!
//! Times are the callers' (`now`), as everywhere in the store, so the
//! processes' clocks must agree: one whose clock runs ahead by `d` sees
//! the buckets `d` fuller than the others do.

use sqlx::PgConnection;

use super::backend;
use crate::limit::{Adjust, Bucket, Take};
use crate::{Error, Grant, Result};

/// Grants a take (`$2` now, `$3` increment, `$4` latest TAT and `$5`
/// latest hold it allows: `limit::Take`) by moving the key's TAT, creating
/// the row if there is none; or, refused, reads the row as it was decided
/// on.
///
/// The take's commit does not wait for its WAL to reach the disk
/// (`synchronous_commit = off` for that transaction alone, set by the
/// statement itself, so no extra round trip and nothing for a pooler to
/// keep): the row lock that serialises the takes of a key is held for the
/// statement, not for an fsync. A database crash may then lose the last
/// few milliseconds of takes: the buckets restart a little fuller, as the
/// embedded store's do after a restart (at most one extra burst).
///
/// A refused upsert leaves the row locked and unchanged, and returns
/// nothing; `refused` then reads it `FOR UPDATE`, which in READ COMMITTED
/// reads the row's latest version, the one the upsert saw, rather than the
/// statement's snapshot. The one row it cannot see is one another
/// transaction created after the snapshot (two first takes of a key
/// racing): then the statement returns no row, and is run again.
const TAKE: &str = "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), \
     granted AS ( \
         INSERT INTO rate_limits AS r (key, tat_ns, held_until_ns) VALUES ($1, $2 + $3, 0) \
         ON CONFLICT (key) DO UPDATE \
             SET tat_ns = GREATEST(r.tat_ns, $2, r.held_until_ns) + $3 \
             WHERE r.tat_ns <= $4 AND r.held_until_ns <= $5 \
         RETURNING tat_ns, held_until_ns \
     ), refused AS ( \
         SELECT tat_ns, held_until_ns FROM rate_limits \
         WHERE key = $1 AND NOT EXISTS (SELECT FROM granted) \
         FOR UPDATE \
     ) \
     SELECT true, tat_ns, held_until_ns FROM granted, relaxed \
     UNION ALL \
     SELECT false, tat_ns, held_until_ns FROM refused, relaxed";

/// How many times a take is run when it finds no row (a race to create
/// the key's row, lost once at most: the winner has committed by then).
const TAKE_RUNS: usize = 3;

/// `limit::Adjust::Charge` (`$2` now, `$3` increment, `$4` cap).
const CHARGE: &str = "INSERT INTO rate_limits AS r (key, tat_ns, held_until_ns) \
     VALUES ($1, LEAST($2 + $3, $4), 0) \
     ON CONFLICT (key) DO UPDATE \
         SET tat_ns = GREATEST(r.tat_ns, LEAST(GREATEST(r.tat_ns, $2) + $3, $4))";

/// `limit::Adjust::GiveBack` (`$2` now, `$3` amount); a full bucket (or no
/// row) is left as it is.
const GIVE_BACK: &str =
    "UPDATE rate_limits SET tat_ns = GREATEST(tat_ns - $3, $2) WHERE key = $1 AND tat_ns > $2";

/// Holds a key until `$2`, unless it is held longer already.
const HOLD: &str = "INSERT INTO rate_limits AS r (key, tat_ns, held_until_ns) VALUES ($1, 0, $2) \
     ON CONFLICT (key) DO UPDATE SET held_until_ns = excluded.held_until_ns \
         WHERE r.held_until_ns < excluded.held_until_ns";

/// [`crate::Store::take_capacity`].
pub(super) async fn take(conn: &mut PgConnection, key: &str, take: &Take) -> Result<Grant> {
    for _ in 0..TAKE_RUNS {
        let row: Option<(bool, i64, i64)> = sqlx::query_as(TAKE)
            .bind(key)
            .bind(take.now)
            .bind(take.increment)
            .bind(take.tat_limit())
            .bind(take.held_limit())
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
        let Some((granted, tat, held_until)) = row else {
            continue;
        };
        let bucket = Bucket { tat, held_until };
        return Ok(if granted {
            take.granted(bucket)
        } else {
            take.refused(bucket)
        });
    }
    Err(Error::Backend(format!(
        "rate limit `{key}`: its row was not found after {TAKE_RUNS} takes"
    )))
}

/// [`crate::Store::adjust_capacity`].
pub(super) async fn adjust(conn: &mut PgConnection, key: &str, adjust: &Adjust) -> Result<()> {
    let query = match *adjust {
        Adjust::Charge {
            now,
            increment,
            cap,
        } => sqlx::query(CHARGE)
            .bind(key)
            .bind(now)
            .bind(increment)
            .bind(cap),
        Adjust::GiveBack { now, amount } => sqlx::query(GIVE_BACK).bind(key).bind(now).bind(amount),
        Adjust::Nothing => return Ok(()),
    };
    query.execute(&mut *conn).await.map_err(backend)?;
    Ok(())
}

/// [`crate::Store::hold_capacity`].
pub(super) async fn hold(conn: &mut PgConnection, key: &str, until: i64) -> Result<()> {
    sqlx::query(HOLD)
        .bind(key)
        .bind(until)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// The keys under a prefix (`$1`), but one (`$2`), taken from after `$3`.
/// A scan of the table, which holds a row per limit key: the gateway runs
/// it at most once a second per agent share and process (its fair share),
/// and the table is small.
const ACTIVE: &str = "SELECT count(*) FROM rate_limits \
     WHERE starts_with(key, $1) AND key <> $2 AND tat_ns > $3";

/// [`crate::Store::active_limits`].
pub(super) async fn active(
    conn: &mut PgConnection,
    prefix: &str,
    except: &str,
    since: i64,
) -> Result<u64> {
    let (count,): (i64,) = sqlx::query_as(ACTIVE)
        .bind(prefix)
        .bind(except)
        .bind(since)
        .fetch_one(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(u64::try_from(count).unwrap_or(0))
}
