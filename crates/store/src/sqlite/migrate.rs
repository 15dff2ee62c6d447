//! The schema's versions and the small migrator that applies them on open.
//!
//! `keel_migrations` records each applied version. On open, every version
//! above the highest recorded one is applied in order, all in one
//! transaction, so a crash mid-way leaves the previous schema. To change the
//! schema, append a migration to [`MIGRATIONS`]; never edit an applied one.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, SqliteConnection};
use tracing::info;

use super::backend;
use crate::{Error, Result};

/// One schema change.
pub(super) struct Migration {
    /// Position in the history, from 1, without gaps.
    version: i64,
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
        name: "deltas",
        sql: include_str!("migrations/0003_deltas.sql"),
    },
    Migration {
        version: 4,
        name: "priority",
        sql: include_str!("migrations/0004_priority.sql"),
    },
    Migration {
        version: 5,
        name: "cost",
        sql: include_str!("migrations/0005_cost.sql"),
    },
    Migration {
        version: 6,
        name: "tool_call_deltas",
        sql: include_str!("migrations/0006_tool_call_deltas.sql"),
    },
    Migration {
        version: 7,
        name: "awaiting_approval",
        sql: include_str!("migrations/0007_awaiting_approval.sql"),
    },
    Migration {
        version: 8,
        name: "external_workers",
        sql: include_str!("migrations/0008_external_workers.sql"),
    },
    Migration {
        version: 9,
        name: "compensating",
        sql: include_str!("migrations/0009_compensating.sql"),
    },
];

const CREATE_HISTORY: &str = "CREATE TABLE IF NOT EXISTS keel_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT    NOT NULL,
    applied_at INTEGER NOT NULL
)";
const CURRENT_VERSION: &str = "SELECT COALESCE(MAX(version), 0) FROM keel_migrations";
const RECORD: &str = "INSERT INTO keel_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)";

/// Brings the schema up to the newest version.
pub(super) async fn run(conn: &mut SqliteConnection) -> Result<()> {
    apply(conn, MIGRATIONS).await
}

/// Brings the schema up to the last of `migrations`, a prefix of
/// [`MIGRATIONS`] (shorter only in tests, to make an older database).
pub(super) async fn apply(conn: &mut SqliteConnection, migrations: &[Migration]) -> Result<()> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(backend)?;
    sqlx::query(CREATE_HISTORY)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let current: i64 = sqlx::query_scalar(CURRENT_VERSION)
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
    tx.commit().await.map_err(backend)
}

#[cfg(test)]
mod tests {
    use super::MIGRATIONS;

    #[test]
    fn versions_count_up_from_one() {
        for (i, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, i as i64 + 1, "{}", migration.name);
        }
    }
}
