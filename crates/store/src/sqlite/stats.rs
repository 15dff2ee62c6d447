//! [`Store::stats`](crate::Store::stats) on SQLite: one statement on the
//! read pool (one snapshot).

use sqlx::SqlitePool;

use super::backend;
use crate::stats::{self, Row};
use crate::{Result, Stats};
use keel_core::Millis;

/// The live tasks by queue, kind and state at `?1` (0 ready: due, an
/// expired lease included; 1 scheduled; 2 leased) with their earliest
/// `visible_at`, the unfinished runs by
/// status, the dead letters. The runs are read from `runs_pending` only:
/// `INDEXED BY` makes a plan through any other index an error, and the
/// WHERE clause repeats the partial index's word for word, as SQLite needs
/// to use it.
pub(super) const STATS: &str = "\
    SELECT 'task', queue, kind, \
           CASE WHEN visible_at <= ?1 THEN 0 WHEN lease_owner IS NULL THEN 1 ELSE 2 END AS state, \
           COUNT(*), MIN(visible_at) \
      FROM tasks GROUP BY queue, kind, state \
    UNION ALL \
    SELECT 'run', NULL, status, 0, COUNT(*), 0 FROM runs INDEXED BY runs_pending \
     WHERE status IN ('PENDING', 'AWAITING_LLM', 'AWAITING_TOOL', 'AWAITING_APPROVAL', \
     'AWAITING_CHILDREN', 'COMPENSATING') \
     GROUP BY status \
    UNION ALL \
    SELECT 'dead', NULL, NULL, 0, COUNT(*), 0 FROM dead_letters";

/// Counts what the store holds at `now`.
pub(super) async fn stats(reads: &SqlitePool, now: Millis) -> Result<Stats> {
    let rows: Vec<Row> = sqlx::query_as(STATS)
        .bind(now)
        .fetch_all(reads)
        .await
        .map_err(backend)?;
    stats::from_rows(rows)
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{AssertSqlSafe, ConnectOptions};

    use super::STATS;
    use crate::sqlite::SqliteStore;

    /// The statement reads the runs through `runs_pending` only (a covering
    /// scan of the unfinished runs), never the table or another index.
    #[tokio::test]
    async fn stats_count_runs_from_the_pending_index() {
        let dir = std::env::temp_dir().join(format!("keel-stats-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("keel.db");
        drop(SqliteStore::open(&path).await.expect("open"));
        let mut conn = SqliteConnectOptions::new()
            .filename(&path)
            .connect()
            .await
            .expect("connect");
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(AssertSqlSafe(format!("EXPLAIN QUERY PLAN {STATS}")))
                .bind(0_i64)
                .fetch_all(&mut conn)
                .await
                .expect("plan");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
        let steps: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
        let runs: Vec<&&str> = steps.iter().filter(|s| s.contains(" runs ")).collect();
        assert!(
            !runs.is_empty()
                && runs
                    .iter()
                    .all(|s| s.contains("USING COVERING INDEX runs_pending")),
            "{steps:#?}"
        );
    }
}
