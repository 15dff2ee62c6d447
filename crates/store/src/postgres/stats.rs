//! [`Store::stats`](crate::Store::stats) on PostgreSQL: one statement on
//! the read pool (one snapshot).

use keel_core::Millis;
use sqlx::PgConnection;

use super::backend;
use crate::stats::{self, Row};
use crate::{Result, Stats};

/// The live tasks by queue, kind and state at `$1` (0 ready: due, an
/// expired lease included; 1 scheduled; 2 leased) with their earliest
/// `visible_at`, the unfinished runs by
/// status, the dead letters. The runs are those of the partial index
/// `runs_pending` (`outcome IS NULL`): with many finished runs the planner
/// reads that index, never the finished rows (tested).
pub(super) const STATS: &str = "\
    SELECT 'task'::text, queue, kind, \
           (CASE WHEN visible_at <= $1 THEN 0 WHEN lease_owner IS NULL THEN 1 ELSE 2 END)::bigint, \
           count(*), min(visible_at) \
      FROM tasks GROUP BY 2, 3, 4 \
    UNION ALL \
    SELECT 'run', NULL, status, 0, count(*), 0 FROM runs WHERE outcome IS NULL GROUP BY status \
    UNION ALL \
    SELECT 'dead', NULL, NULL, 0, count(*), 0 FROM dead_letters";

/// Counts what the store holds at `now`.
pub(super) async fn stats(conn: &mut PgConnection, now: Millis) -> Result<Stats> {
    let rows: Vec<Row> = sqlx::query_as(STATS)
        .bind(now)
        .fetch_all(conn)
        .await
        .map_err(backend)?;
    stats::from_rows(rows)
}

#[cfg(test)]
mod tests {
    use sqlx::{AssertSqlSafe, Connection, PgConnection};

    use super::STATS;
    use crate::Result;
    use crate::postgres::tests::open;

    /// With many finished runs, as a busy database has, the runs are
    /// counted from `runs_pending`, not by reading the table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stats_count_runs_from_the_pending_index() -> Result<()> {
        let Some((_store, db)) = open().await? else {
            return Ok(());
        };
        let mut conn = PgConnection::connect(&db.url).await.expect("connect");
        for sql in [
            "INSERT INTO runs (id, tenant, agent, version, status, outcome, steps, input, \
                 input_tokens, output_tokens, cost_usd, last_seq, created_at, updated_at) \
             SELECT md5(i::text)::uuid, 't', 'agent-' || (i % 50), '1', \
                 CASE WHEN i % 500 = 0 THEN 'AWAITING_LLM' ELSE 'COMPLETED' END, \
                 CASE WHEN i % 500 = 0 THEN NULL ELSE 'COMPLETED' END, \
                 1, '\"hi\"', 10, 20, 0.01, 3, i, i \
             FROM generate_series(1, 20000) AS i",
            "ANALYZE runs",
        ] {
            sqlx::raw_sql(AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .expect("setup");
        }
        let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {STATS}")))
            .bind(0_i64)
            .fetch_all(&mut conn)
            .await
            .expect("plan");
        let _ = conn.close().await;
        assert!(
            plan.iter().any(|line| line.contains("using runs_pending")),
            "{plan:#?}"
        );
        assert!(
            !plan.iter().any(|line| line.contains("Seq Scan on runs")),
            "{plan:#?}"
        );
        Ok(())
    }
}
