//! Circuit breakers shared by every process: the latest transition of each
//! endpoint's breaker in `breakers` (migration 0008), one statement per
//! write or read, on the pool (not through the writer: nothing orders them
//! with the journal, and a transition must not wait behind a backlog of
//! appends). Not fenced: a breaker belongs to no task.
//!
//! Rows are written only on transitions and read whole by each process at
//! most once a second (the engine's cache), so the table stays a handful of
//! rows read far more often than written.

use keel_core::Millis;
use keel_core::breaker::Phase;
use sqlx::PgConnection;

use super::backend;
use crate::{BreakerRecord, Error, Result};

/// Writes a transition unless the endpoint's row is newer.
const PUT: &str = "INSERT INTO breakers AS b \
         (endpoint, state, open_until, opened_at, failures, process, updated_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (endpoint) DO UPDATE SET state = EXCLUDED.state, \
         open_until = EXCLUDED.open_until, opened_at = EXCLUDED.opened_at, \
         failures = EXCLUDED.failures, process = EXCLUDED.process, \
         updated_at = EXCLUDED.updated_at \
     WHERE b.updated_at <= EXCLUDED.updated_at";

const READ: &str = "SELECT endpoint, state, open_until, opened_at, failures, process, updated_at \
     FROM breakers ORDER BY endpoint";

/// Writes a transition ([`crate::Store::put_breaker`]).
pub(super) async fn put(conn: &mut PgConnection, record: &BreakerRecord) -> Result<()> {
    sqlx::query(PUT)
        .bind(record.endpoint.as_str())
        .bind(record.phase.as_str())
        .bind(record.until)
        .bind(record.opened_at)
        .bind(i64::from(record.failures))
        .bind(record.process.as_str())
        .bind(record.updated_at)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

type Row = (
    String,
    String,
    Option<Millis>,
    Option<Millis>,
    i64,
    String,
    Millis,
);

/// Reads every endpoint's transition ([`crate::Store::breakers`]).
pub(super) async fn read(conn: &mut PgConnection) -> Result<Vec<BreakerRecord>> {
    let rows: Vec<Row> = sqlx::query_as(READ)
        .fetch_all(&mut *conn)
        .await
        .map_err(backend)?;
    let mut records = Vec::with_capacity(rows.len());
    for (endpoint, state, until, opened_at, failures, process, updated_at) in rows {
        let Some(phase) = Phase::parse(&state) else {
            return Err(Error::Corrupt(format!(
                "the breaker of {endpoint} has the unknown state `{state}`"
            )));
        };
        let failures = u32::try_from(failures).map_err(|_| {
            Error::Corrupt(format!("the breaker of {endpoint} has {failures} failures"))
        })?;
        records.push(BreakerRecord {
            endpoint,
            phase,
            until,
            opened_at,
            failures,
            process,
            updated_at,
        });
    }
    Ok(records)
}
