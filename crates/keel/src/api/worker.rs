//! The external-worker protocol: lease a `worker:` tool's call from its
//! queue, heartbeat, complete or fail it (`keel_engine::external`).
//!
//! * `POST /v1/worker/tasks/lease` `{"queue", "worker"?, "wait"?: "20s",
//!   "lease"?: "30s"}` waits up to `wait` (at most 60 s) and answers 200
//!   with the call, or 204 when none came.
//! * `POST /v1/worker/tasks/{id}/heartbeat` `{"lease_token", "lease"?}`
//!   extends the lease (200 `{"lease_until"}`).
//! * `POST /v1/worker/tasks/{id}/complete` `{"lease_token", "output"}`
//!   journals the result (a string, or any JSON as its text).
//! * `POST /v1/worker/tasks/{id}/fail` `{"lease_token", "error",
//!   "retryable"?: true}`: retried after the agent's backoff while attempts
//!   are left and retryable, else the error is the call's result.
//!
//! A token that is not the task's live lease (expired, taken over, done,
//! or another tenant's call) gets 409: the worker must drop the call.
//! Queues are the caller's tenant's: a worker leases only the calls of
//! its API token's tenant.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keel_core::TaskId;
use keel_core::spec::{human_duration, is_queue_name};
use keel_engine::external::{self, Failed};
use keel_store::Store;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Api, Error, Tenant, body, parse_json, segment};

/// Longest worker name (it is the lease's owner).
const MAX_WORKER: usize = 200;

/// A lease's length when the worker names none.
const DEFAULT_LEASE: Duration = Duration::from_secs(30);

impl From<external::Error> for Error {
    fn from(e: external::Error) -> Self {
        match e {
            external::Error::Stale(_) => Error::Conflict(e.to_string()),
            external::Error::Store(e) => e.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaseBody {
    queue: String,
    #[serde(default)]
    worker: Option<String>,
    #[serde(default)]
    wait: Option<String>,
    #[serde(default)]
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatBody {
    lease_token: String,
    #[serde(default)]
    lease: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    lease_token: String,
    output: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    lease_token: String,
    error: String,
    #[serde(default = "retryable_by_default")]
    retryable: bool,
}

fn retryable_by_default() -> bool {
    true
}

fn duration(field: &str, text: Option<&str>, default: Duration) -> Result<Duration, Error> {
    match text {
        None => Ok(default),
        Some(text) => human_duration::parse(text)
            .map_err(|e| Error::BadRequest(format!("`{field}`: {e} (e.g. \"20s\")"))),
    }
}

fn task_id(path: Result<Path<String>, PathRejection>) -> Result<TaskId, Error> {
    let text = segment(path)?;
    text.parse()
        .map_err(|_| Error::NotFound(format!("task `{text}` not found")))
}

fn token(text: &str) -> Result<i64, Error> {
    text.parse()
        .map_err(|_| Error::BadRequest(format!("`lease_token` `{text}` is not a lease token")))
}

pub(super) async fn lease<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let req: LeaseBody = parse_json(&body(bytes)?)?;
    if !is_queue_name(&req.queue) {
        return Err(Error::BadRequest(format!(
            "`queue` `{}` must be 1-100 letters, digits, `_`, `-` or `.`",
            req.queue
        )));
    }
    let wait = duration("wait", req.wait.as_deref(), Duration::ZERO)?;
    let lease_for = duration("lease", req.lease.as_deref(), DEFAULT_LEASE)?;
    let worker = match req.worker {
        None => "external".to_string(),
        Some(w) if w.is_empty() => "external".to_string(),
        Some(w) if w.len() <= MAX_WORKER && !w.chars().any(char::is_control) => w,
        Some(_) => {
            return Err(Error::BadRequest(format!(
                "`worker` must be at most {MAX_WORKER} bytes without control characters"
            )));
        }
    };
    let owner = format!("ext:{worker}");
    match svc
        .external
        .lease(tenant.name(), &req.queue, &owner, wait, lease_for)
        .await?
    {
        Some(leased) => Ok(Json(leased).into_response()),
        None => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

pub(super) async fn heartbeat<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Error> {
    let task_id = task_id(id)?;
    let req: HeartbeatBody = parse_json(&body(bytes)?)?;
    let lease_for = duration("lease", req.lease.as_deref(), DEFAULT_LEASE)?;
    let until = svc
        .external
        .heartbeat(tenant.name(), task_id, token(&req.lease_token)?, lease_for)
        .await?;
    Ok(Json(json!({"lease_until": until})))
}

pub(super) async fn complete<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Error> {
    let task_id = task_id(id)?;
    let req: CompleteBody = parse_json(&body(bytes)?)?;
    svc.external
        .complete(
            tenant.name(),
            task_id,
            token(&req.lease_token)?,
            &req.output,
        )
        .await?;
    Ok(Json(json!({"status": "completed"})))
}

pub(super) async fn fail<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Error> {
    let task_id = task_id(id)?;
    let req: FailBody = parse_json(&body(bytes)?)?;
    let outcome = svc
        .external
        .fail(
            tenant.name(),
            task_id,
            token(&req.lease_token)?,
            &req.error,
            req.retryable,
        )
        .await?;
    Ok(Json(match outcome {
        Failed::Retrying { retry_at } => json!({"status": "retrying", "retry_at": retry_at}),
        Failed::Returned => json!({"status": "returned"}),
    }))
}
