//! Registering agent versions.

use keel_core::Millis;
use serde_json::Value;
use sqlx::SqliteConnection;

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

const SPEC: &str = "SELECT spec FROM agents WHERE tenant = ?1 AND name = ?2 AND version = ?3";
const INSERT: &str = "INSERT INTO agents (tenant, name, version, spec, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// Stores a new version; the same version again must have the same spec.
pub(super) async fn put(conn: &mut SqliteConnection, r: &PutAgent) -> Result<Registered> {
    let stored: Option<String> = sqlx::query_scalar(SPEC)
        .bind(&r.tenant)
        .bind(&r.name)
        .bind(&r.version)
        .fetch_optional(&mut *conn)
        .await
        .map_err(backend)?;
    if let Some(stored) = stored {
        let what = format!("spec of agent `{}` version `{}`", r.name, r.version);
        let stored: Value = parse_json(&stored, &what)?;
        if stored == r.spec {
            return Ok(Registered::Unchanged);
        }
        return Err(Error::Conflict(format!(
            "agent `{}` version `{}` is already registered with a different spec",
            r.name, r.version
        )));
    }
    sqlx::query(INSERT)
        .bind(&r.tenant)
        .bind(&r.name)
        .bind(&r.version)
        .bind(&r.spec_json)
        .bind(r.now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(Registered::Created)
}
