//! The schema's versions and the small migrator that applies them.
//!
//! `keel_migrations` records each applied version. Every version above the
//! highest recorded one is applied in order, all in one transaction, so a
//! crash mid-way leaves the previous schema. The transaction first takes a
//! transaction-scoped advisory lock, so processes starting at once apply
//! each migration once: the others wait, then find nothing left to do. To
//! change the schema, append a migration to [`MIGRATIONS`]; never edit an
//! applied one.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection};
use tracing::info;

use super::backend;
use crate::{Error, Result};

/// One schema change.
pub(super) struct Migration {
    /// Position in the history, from 1, without gaps.
    version: i32,
    /// Short description, as recorded.
    name: &'static str,
    /// The statements.
    sql: &'static str,
}

/// Every schema version, oldest first.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "export",
        sql: include_str!("migrations/0002_export.sql"),
    },
    Migration {
        version: 3,
        name: "outcome",
        sql: include_str!("migrations/0003_outcome.sql"),
    },
    Migration {
        version: 4,
        name: "rate_limits",
        sql: include_str!("migrations/0004_rate_limits.sql"),
    },
    Migration {
        version: 5,
        name: "deltas",
        sql: include_str!("migrations/0005_deltas.sql"),
    },
    Migration {
        version: 6,
        name: "priority",
        sql: include_str!("migrations/0006_priority.sql"),
    },
    Migration {
        version: 7,
        name: "cost",
        sql: include_str!("migrations/0007_cost.sql"),
    },
    Migration {
        version: 8,
        name: "gateway",
        sql: include_str!("migrations/0008_gateway.sql"),
    },
    Migration {
        version: 9,
        name: "external_workers",
        sql: include_str!("migrations/0009_external_workers.sql"),
    },
];

/// The advisory lock migrators take ("keelmigr" in ASCII).
const LOCK: i64 = 0x6B65_656C_6D69_6772;

const TAKE_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";
const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS keel_migrations (
    version    integer PRIMARY KEY,
    name       text    NOT NULL,
    applied_at bigint  NOT NULL
)";
const CURRENT_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM keel_migrations";
const RECORD: &str = "INSERT INTO keel_migrations (version, name, applied_at) VALUES ($1, $2, $3)";

/// Brings the schema up to the newest version; returns that version.
pub(super) async fn run(conn: &mut PgConnection) -> Result<u32> {
    apply(conn, MIGRATIONS).await
}

/// Brings the schema up to the last of `migrations`, a prefix of
/// [`MIGRATIONS`] (shorter only in tests, to make an older database);
/// returns that version.
pub(super) async fn apply(conn: &mut PgConnection, migrations: &[Migration]) -> Result<u32> {
    let mut tx = conn.begin().await.map_err(backend)?;
    sqlx::query(TAKE_LOCK)
        .bind(LOCK)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    sqlx::query(CREATE_HISTORY)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let current: i32 = sqlx::query_scalar(CURRENT_VERSION)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
    let newest = migrations.last().map_or(0, |m| m.version);
    if current > newest {
        return Err(Error::Backend(format!(
            "database schema is at version {current}, newer than this build knows ({newest})"
        )));
    }
    let applied_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    for migration in migrations.iter().filter(|m| m.version > current) {
        sqlx::raw_sql(migration.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| {
                Error::Backend(format!(
                    "migration {} ({}) failed: {e}",
                    migration.version, migration.name
                ))
            })?;
        sqlx::query(RECORD)
            .bind(migration.version)
            .bind(migration.name)
            .bind(applied_at)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        info!(
            version = migration.version,
            name = migration.name,
            "applied schema migration"
        );
    }
    tx.commit().await.map_err(backend)?;
    // Versions count up from 1.
    Ok(newest.unsigned_abs())
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn versions_count_up_from_one() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i32 + 1, "{}", migration.name);
        }
    }
}
