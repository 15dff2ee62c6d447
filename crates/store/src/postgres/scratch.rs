//! Databases of their own on a PostgreSQL server, for `keel bench`: one
//! created empty under a fresh name, dropped when done.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions, Connection, PgConnection};
use uuid::Uuid;

use super::backend;
use crate::{Error, Result};

/// A database created by [`create_database`].
#[derive(Clone)]
pub struct Scratch {
    /// Its name: the prefix given and a fresh UUID.
    pub name: String,
    /// The server's URL with this database in it.
    pub url: String,
}

/// Whether `name` is a plain lowercase identifier (ASCII letters, digits
/// and `_`, not starting with a digit), which SQL takes unquoted.
fn is_identifier(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Connects to the server of `url` (its own database).
async fn connect(url: &str) -> Result<(PgConnectOptions, PgConnection)> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| Error::Backend(format!("invalid database URL: {e}")))?;
    let conn = options.connect().await.map_err(backend)?;
    Ok((options, conn))
}

/// Creates an empty database named `<prefix>_<uuid>` on the server of
/// `server` (a `postgres://` URL whose user may create databases).
pub async fn create_database(server: &str, prefix: &str) -> Result<Scratch> {
    if !is_identifier(prefix) {
        return Err(Error::Backend(format!(
            "invalid database name prefix `{prefix}`: lowercase ASCII letters, digits and _ only"
        )));
    }
    let name = format!("{prefix}_{}", Uuid::now_v7().simple());
    let (options, mut conn) = connect(server).await?;
    let created = sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .map_err(backend);
    let _ = conn.close().await;
    created?;
    let url = options.database(&name).to_url_lossy().to_string();
    Ok(Scratch { name, url })
}

/// Drops the database `name` from the server of `server`, ending its
/// sessions (`WITH (FORCE)`); a database that is not there is no error.
pub async fn drop_database(server: &str, name: &str) -> Result<()> {
    if !is_identifier(name) {
        return Err(Error::Backend(format!(
            "invalid database name `{name}`: lowercase ASCII letters, digits and _ only"
        )));
    }
    let (_, mut conn) = connect(server).await?;
    let dropped = sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .map_err(backend);
    let _ = conn.close().await;
    dropped.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::is_identifier;

    #[test]
    fn only_plain_identifiers_name_a_database() {
        assert!(is_identifier("keel_bench_0190abc"));
        assert!(is_identifier("_x1"));
        for bad in ["", "1x", "Keel", "a-b", "a;DROP", "a b", "é"] {
            assert!(!is_identifier(bad), "{bad}");
        }
    }
}
