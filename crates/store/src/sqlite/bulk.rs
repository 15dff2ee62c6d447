//! Statements over many rows at once.
//!
//! Every statement costs a round trip to SQLite's worker thread, tens of
//! microseconds, far more than the SQL work for one row. So the writer
//! writes the rows of a whole batch with one statement each: `WITH v (…) AS
//! (VALUES (…), (…), …) <statement over v>`. SQL text must be static, so a
//! [`Bulk`] statement is prepared for 1, 2, 4, … [`MAX_ROWS`] rows, and a list
//! is padded up to the next size with rows of NULLs, which every bulk
//! statement skips (its first column is never NULL in a real row).

use std::iter;

use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{FromRow, Sqlite};

use super::backend;
use crate::Result;

/// Most rows bound in one statement (`MAX_ROWS` × columns stays far below
/// SQLite's 32766 parameters).
pub(super) const MAX_ROWS: usize = 256;

/// A query being bound.
pub(super) type Binding<'q> = Query<'q, Sqlite, SqliteArguments>;

/// A statement over a list of rows, prepared for each padded size.
pub(super) struct Bulk {
    /// Columns of a row.
    columns: usize,
    /// The statement for 1, 2, 4, … `MAX_ROWS` rows.
    by_size: Vec<String>,
}

impl Bulk {
    /// A statement whose `{values}` is replaced by the rows' placeholders.
    pub(super) fn new(columns: usize, sql: &str) -> Bulk {
        let row = format!("({})", vec!["?"; columns].join(", "));
        let by_size = iter::successors(Some(1), |&n| (n < MAX_ROWS).then_some(n * 2))
            .map(|rows| sql.replace("{values}", &vec![row.as_str(); rows].join(", ")))
            .collect();
        Bulk { columns, by_size }
    }

    /// One bound query per `MAX_ROWS` rows.
    fn queries<'s, T: BulkRow>(
        &'static self,
        rows: &'s [T],
    ) -> impl Iterator<Item = Binding<'static>> + 's {
        rows.chunks(MAX_ROWS).map(move |chunk| {
            let size = chunk.len().next_power_of_two();
            let sql: &'static str = self.by_size[size.trailing_zeros() as usize].as_str();
            let mut query = sqlx::query(sql);
            for row in chunk {
                query = row.bind(query);
            }
            for _ in 0..(size - chunk.len()) * self.columns {
                query = query.bind(None::<i64>);
            }
            query
        })
    }
}

/// A row of a bulk statement: binds its columns in order.
pub(super) trait BulkRow {
    /// Binds this row's values.
    fn bind<'q>(&self, query: Binding<'q>) -> Binding<'q>;
}

/// Runs a bulk statement over `rows` (nothing if there are none); returns
/// the rows it changed.
pub(super) async fn execute<T: BulkRow>(
    conn: &mut SqliteConnection,
    bulk: &'static Bulk,
    rows: &[T],
) -> Result<u64> {
    let mut changed = 0;
    for query in bulk.queries(rows) {
        changed += query
            .execute(&mut *conn)
            .await
            .map_err(backend)?
            .rows_affected();
    }
    Ok(changed)
}

/// Runs a bulk statement that returns rows (a query, or `RETURNING`).
pub(super) async fn fetch<T: BulkRow, O: for<'r> FromRow<'r, SqliteRow>>(
    conn: &mut SqliteConnection,
    bulk: &'static Bulk,
    rows: &[T],
) -> Result<Vec<O>> {
    let mut fetched = Vec::new();
    for query in bulk.queries(rows) {
        for row in query.fetch_all(&mut *conn).await.map_err(backend)? {
            fetched.push(O::from_row(&row).map_err(backend)?);
        }
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::{Bulk, MAX_ROWS};

    #[test]
    fn sizes_are_powers_of_two() {
        let bulk = Bulk::new(2, "VALUES {values}");
        assert_eq!(bulk.by_size.len(), MAX_ROWS.trailing_zeros() as usize + 1);
        assert_eq!(bulk.by_size[0], "VALUES (?, ?)");
        assert_eq!(bulk.by_size[2], "VALUES (?, ?), (?, ?), (?, ?), (?, ?)");
    }
}
