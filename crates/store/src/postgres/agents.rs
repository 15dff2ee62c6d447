//! Registering agent versions.

use keel_core::Millis;
use serde_json::Value;
use sqlx::PgConnection;

use super::{backend, parse_json};
use crate::{Error, Registered, Result};

/// [`super::writer::Op::PutAgent`].
pub(super) struct PutAgent {
    pub(super) tenant: String,
    pub(super) name: String,
    pub(super) version: String,
    /// The spec, to compare with a stored one.
    pub(super) spec: Value,
    /// The spec as stored.
    pub(super) spec_json: String,
    pub(super) now: Millis,
}

const SPEC: &str = "SELECT spec::text FROM agents WHERE tenant = $1 AND name = $2 AND version = $3";
/// Skipped if another process registered the version since it was looked up.
const INSERT: &str = "INSERT INTO agents (tenant, name, version, spec, created_at) \
     VALUES ($1, $2, $3, $4::jsonb, $5) \
     ON CONFLICT (tenant, name, version) DO NOTHING RETURNING id";

/// Stores a new version; the same version again must have the same spec.
pub(super) async fn put(conn: &mut PgConnection, r: &PutAgent) -> Result<Registered> {
    if let Some(stored) = stored(conn, r).await? {
        return compare(&stored, r);
    }
    let inserted: Option<i64> = sqlx::query_scalar(INSERT)
        .bind(&r.tenant)
        .bind(&r.name)
        .bind(&r.version)
        .bind(&r.spec_json)
        .bind(r.now)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    if inserted.is_some() {
        return Ok(Registered::Created);
    }
    match stored(conn, r).await? {
        Some(stored) => compare(&stored, r),
        None => Err(Error::Backend(format!(
            "agent `{}` version `{}` was neither stored nor found",
            r.name, r.version
        ))),
    }
}

/// The spec stored under the version, if any.
async fn stored(conn: &mut PgConnection, r: &PutAgent) -> Result<Option<String>> {
    sqlx::query_scalar(SPEC)
        .bind(&r.tenant)
        .bind(&r.name)
        .bind(&r.version)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)
}

/// Unchanged if the stored spec is the same, a conflict otherwise.
fn compare(stored: &str, r: &PutAgent) -> Result<Registered> {
    let what = format!("spec of agent `{}` version `{}`", r.name, r.version);
    let stored: Value = parse_json(stored, &what)?;
    if stored == r.spec {
        return Ok(Registered::Unchanged);
    }
    Err(Error::Conflict(format!(
        "agent `{}` version `{}` is already registered with a different spec",
        r.name, r.version
    )))
}
