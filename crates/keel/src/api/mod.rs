//! The HTTP API (JSON): runs, their event streams (SSE), agents, usage
//! and cost, the dead-letter queue, health, Prometheus metrics (`metrics`),
//! and the web console (`console`) calling them.
//! Handlers parse and answer; what they do to runs lives in
//! [`crate::service`].

mod auth;
mod console;
mod error;
mod metrics;
mod openapi;
#[cfg(test)]
mod tests;
mod worker;

pub use auth::{Tenant, Tokens, require as require_token};
pub use error::Error;

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use keel_core::ids::DEFAULT_TENANT;
use keel_core::run::Status;
use keel_core::{Agent, RunId, TaskId};
use keel_store::{Registered, RunFilter, RunRecord, Store, UsageTotals};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::service::{self, Service, Submit};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1024 * 1024;

/// Builds the router over a service.
pub fn router<S: Store>(service: Service<S>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::metrics::<S>))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route("/v1/runs", post(submit::<S>).get(list_runs::<S>))
        .route("/v1/runs/{id}", get(get_run::<S>).delete(delete_run::<S>))
        .route("/v1/runs/{id}/events", get(events::<S>))
        .route("/v1/runs/{id}/cancel", post(cancel::<S>))
        .route("/v1/runs/{id}/approvals/{approval_id}", post(decide::<S>))
        .route("/v1/approvals", get(inbox::<S>))
        .route("/v1/agents", post(put_agent::<S>).get(list_agents::<S>))
        .route("/v1/agents/{name}", get(get_agent::<S>))
        .route("/v1/agents/{name}/usage", get(agent_usage::<S>))
        .route("/v1/usage", get(usage::<S>))
        .route("/v1/providers", get(providers::<S>))
        .route("/v1/dlq", get(list_dlq::<S>))
        .route("/v1/dlq/{id}/retry", post(retry_dlq::<S>))
        .route("/v1/worker/tasks/lease", post(worker::lease::<S>))
        .route(
            "/v1/worker/tasks/{id}/heartbeat",
            post(worker::heartbeat::<S>),
        )
        .route(
            "/v1/worker/tasks/{id}/complete",
            post(worker::complete::<S>),
        )
        .route("/v1/worker/tasks/{id}/fail", post(worker::fail::<S>))
        .fallback(|| async { Error::NotFound("no such route".into()) })
        .method_not_allowed_fallback(not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(service)
}

/// What a worker-only process serves: `/healthz`, `/readyz`, `/metrics`
/// and `/v1/providers` (its circuit breakers and the store's shared view).
pub fn health_router<S: Store>(service: Service<S>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .route("/metrics", get(metrics::metrics::<S>))
        .route("/v1/providers", get(providers::<S>))
        .fallback(|| async {
            Error::NotFound("this process runs workers only (--role worker)".into())
        })
        .method_not_allowed_fallback(not_allowed)
        .with_state(service)
}

type Api<S> = State<Service<S>>;

/// A known route asked with another method (the `Allow` header lists those
/// it takes).
async fn not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Error {
    Error::MethodNotAllowed(format!(
        "method {method} is not allowed on `{}` (see the Allow header)",
        uri.path()
    ))
}

fn body(bytes: Result<Bytes, BytesRejection>) -> Result<Bytes, Error> {
    bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge(MAX_BODY)
        } else {
            Error::BadRequest(format!("could not read the body: {e}"))
        }
    })
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    if bytes.is_empty() {
        return Err(Error::BadRequest(
            "the body is empty; send a JSON object".into(),
        ));
    }
    // A struct also reads from an array (its fields by position): refused.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(Error::BadRequest(
            "invalid JSON body: expected a JSON object".into(),
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Error::BadRequest(format!("invalid JSON body: {}", e.inner()))
        } else {
            Error::BadRequest(format!("invalid JSON body at `{path}`: {}", e.inner()))
        }
    })?;
    de.end()
        .map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// A path parameter, or a JSON 400 (e.g. for bad percent-encoding).
fn segment(path: Result<Path<String>, PathRejection>) -> Result<String, Error> {
    path.map(|Path(p)| p)
        .map_err(|e| Error::BadRequest(format!("bad path: {}", e.body_text())))
}

/// An `agent` filter of a listing: absent or empty for all agents.
fn agent_filter(agent: Option<String>) -> Result<Option<String>, Error> {
    match agent {
        None => Ok(None),
        Some(a) if a.is_empty() => Ok(None),
        Some(a) if keel_core::spec::is_name(&a) => Ok(Some(a)),
        Some(a) => Err(Error::BadRequest(format!(
            "`agent` `{a}` is not an agent name (1-64 letters, digits, `_`, `-` or `.`)"
        ))),
    }
}

/// An agent named in a path: a name that cannot be registered is not found.
fn agent_name(name: &str) -> Result<&str, Error> {
    if keel_core::spec::is_name(name) {
        Ok(name)
    } else {
        Err(Error::NotFound(format!("agent `{name}` not found")))
    }
}

fn run_id(text: &str) -> Result<RunId, Error> {
    text.parse()
        .map_err(|_| Error::NotFound(format!("run `{text}` not found")))
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz<S: Store>(State(svc): Api<S>) -> Response {
    match svc
        .store
        .list_runs(RunFilter {
            tenant: DEFAULT_TENANT.into(),
            limit: 1,
            ..Default::default()
        })
        .await
    {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable"})),
            )
                .into_response()
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitBody {
    agent: String,
    input: Value,
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    priority: Option<Value>,
    #[serde(default)]
    callback_url: Option<Value>,
}

/// The span of a submit that created run `run_id`, in the run's trace
/// (a child of its root span), linked to the caller's `traceparent`.
fn submit_span(run_id: RunId, headers: &HeaderMap, started_ns: u64) -> keel_engine::trace::Span {
    use keel_engine::trace::{Kind, Link, Span};
    let mut span = Span::child(
        run_id,
        keel_engine::trace::span_id(),
        "POST /v1/runs".into(),
        Kind::Server,
        started_ns,
    );
    span.end_ns = keel_engine::trace::now_ns();
    span.set("http.request.method", "POST");
    span.set("http.route", "/v1/runs");
    span.set("http.response.status_code", 202u32);
    span.set("keel.run_id", run_id.to_string());
    let caller = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(Link::from_traceparent);
    span.links.extend(caller);
    span
}

async fn submit<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let started_ns = keel_engine::trace::now_ns();
    let bytes = body(bytes)?;
    let req: SubmitBody = parse_json(&bytes)?;
    if req.agent.trim().is_empty() {
        return Err(Error::BadRequest("`agent` must not be empty".into()));
    }
    if req.input.is_null() {
        return Err(Error::BadRequest(
            "`input` must be a string or JSON value, not null".into(),
        ));
    }
    let version = match req.version {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "`version` must be a string, got {other}"
            )));
        }
    };
    let priority = service::parse_priority(req.priority.as_ref()).map_err(Error::BadRequest)?;
    let callback_url =
        service::parse_callback_url(req.callback_url.as_ref()).map_err(Error::BadRequest)?;
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v.to_str().ok().filter(|k| !k.is_empty() && k.len() <= 255);
            match key {
                Some(k) => Some(k.to_string()),
                None => {
                    return Err(Error::BadRequest(
                        "Idempotency-Key must be 1-255 visible ASCII characters".into(),
                    ));
                }
            }
        }
    };
    let submitted = svc
        .submit(Submit {
            tenant: tenant.name().to_string(),
            agent: req.agent,
            version,
            input: req.input,
            idempotency_key,
            priority,
            callback_url,
        })
        .await?;
    if submitted.created && keel_engine::trace::enabled() {
        keel_engine::trace::record(submit_span(submitted.run_id, &headers, started_ns));
    }
    let location = format!("/v1/runs/{}", submitted.run_id);
    // A retried submit answers with the run as it is now.
    let status = if submitted.created {
        keel_core::run::Status::Pending
    } else {
        svc.status(tenant.name(), submitted.run_id).await?
    };
    let body = json!({
        "id": submitted.run_id.to_string(),
        "status": status.as_str(),
        "created": submitted.created,
        "location": location,
    });
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(body),
    )
        .into_response())
}

async fn get_run<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<service::RunView>, Error> {
    let id = segment(id)?;
    Ok(Json(svc.view(tenant.name(), run_id(&id)?).await?))
}

/// Deletes an ended run with everything stored about it (its journal,
/// streamed output, dead letters, idempotency key): 204; 409 saying why
/// if it has not ended or something still needs it.
async fn delete_run<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, Error> {
    let id = run_id(&segment(id)?)?;
    svc.record(tenant.name(), id).await?;
    svc.store.delete_run(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    agent: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

fn summary(run: &RunRecord) -> Value {
    json!({
        "id": run.id.to_string(),
        "agent": run.agent,
        "version": run.version,
        "status": run.projection.status.as_str(),
        "step_count": run.projection.steps,
        "output": run.projection.output,
        "error": run.projection.error,
        "usage": run.projection.usage,
        "cost_usd": run.projection.cost_usd,
        "created_at": run.created_at,
        "updated_at": run.updated_at,
    })
}

async fn list_runs<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Error> {
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("bad query string: {e}")))?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            let all: Vec<&str> = Status::ALL.iter().map(|s| s.as_str()).collect();
            Error::BadRequest(format!(
                "unknown status `{s}`; use one of {}",
                all.join(", ")
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(Error::BadRequest(
            "`limit` must be between 1 and 500".into(),
        ));
    }
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<RunId>()
                .map_err(|_| Error::BadRequest(format!("bad cursor `{c}`")))?,
        ),
    };
    let runs = svc
        .store
        .list_runs(RunFilter {
            tenant: tenant.name().into(),
            status,
            agent: agent_filter(q.agent)?,
            before,
            limit,
        })
        .await?;
    let next_cursor = if runs.len() as u32 == limit {
        runs.last().map(|r| r.id.to_string())
    } else {
        None
    };
    let runs: Vec<Value> = runs.iter().map(summary).collect();
    Ok(Json(json!({"runs": runs, "next_cursor": next_cursor})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    after: Option<i64>,
}

async fn events<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Error> {
    let run_id = run_id(&segment(id)?)?;
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("bad query string: {e}")))?;
    svc.record(tenant.name(), run_id).await?;
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(service::Position::parse)
                .ok_or_else(|| {
                    Error::BadRequest(
                        "Last-Event-ID must be an event id: `<seq>` (a journal event) or \
                         `<seq>.<step>.<attempt>.<idx>` (an llm_delta), all non-negative integers"
                            .into(),
                    )
                })?,
        ),
    };
    let from = last_event_id.unwrap_or(service::Position {
        seq: q.after.unwrap_or(0).max(0),
        delta: None,
    });
    let stream = service::follow_live(svc.store.clone(), run_id, from).map(|item| {
        let event = match item {
            Ok(service::Streamed::Event(recorded)) => match serde_json::to_string(&recorded) {
                Ok(data) => SseEvent::default()
                    .id(recorded.seq.to_string())
                    .event(recorded.event.kind())
                    .data(data),
                Err(e) => SseEvent::default()
                    .event("error")
                    .data(format!("could not encode event: {e}")),
            },
            Ok(service::Streamed::Delta { seq, delta }) => {
                let position = service::Position {
                    seq,
                    delta: Some(delta.pos),
                };
                let mut data = json!({
                    "step": delta.pos.step,
                    "attempt": delta.pos.attempt,
                    "idx": delta.pos.idx,
                    "text": delta.text,
                });
                // Only batches with tool calls have the field: text-only
                // events stay as they were.
                if !delta.tool_calls.is_empty() {
                    data["tool_calls"] = json!(delta.tool_calls);
                }
                SseEvent::default()
                    .id(position.id())
                    .event("llm_delta")
                    .data(data.to_string())
            }
            Ok(service::Streamed::Retry { step, attempt }) => SseEvent::default()
                .event("llm_retry")
                .data(json!({"step": step, "attempt": attempt}).to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "event stream failed");
                SseEvent::default()
                    .event("error")
                    .data("the event stream failed; reconnect with Last-Event-ID")
            }
        };
        Ok(event)
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn cancel<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Error> {
    let run_id = run_id(&segment(id)?)?;
    let bytes = body(bytes)?;
    let req: CancelBody = if bytes.is_empty() {
        CancelBody::default()
    } else {
        parse_json(&bytes)?
    };
    let reason = req
        .reason
        .unwrap_or_else(|| "cancelled by API request".into());
    let state = svc.cancel(tenant.name(), run_id, reason).await?;
    Ok(Json(
        json!({"id": run_id.to_string(), "status": state.status.as_str(), "error": state.error}),
    ))
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    Approve,
    Reject,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    decision: Verdict,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
    #[serde(default)]
    by: Option<String>,
}

/// Longest `by` and `reason` accepted.
const MAX_DECIDER: usize = 200;
const MAX_REASON: usize = 4096;

/// Decides an approval: `{"decision": "approve" | "reject", "reason",
/// "arguments" (edited, approve only), "by"}`; the decider is `by`, else the
/// `Keel-Actor` header, else `anonymous`.
async fn decide<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, Error> {
    let Path((id, approval_id)) =
        path.map_err(|e| Error::BadRequest(format!("bad path: {}", e.body_text())))?;
    let run_id = run_id(&id)?;
    let bytes = body(bytes)?;
    let req: DecideBody = parse_json(&bytes)?;
    let invalid = |field: &str, message: String| Error::Invalid {
        message: format!("{field}: {message}"),
        fields: vec![keel_core::spec::FieldError {
            field: field.into(),
            message,
        }],
    };
    let reason = req.reason.filter(|r| !r.trim().is_empty());
    if req.decision == Verdict::Reject && reason.is_none() {
        return Err(invalid(
            "reason",
            "a rejection needs a reason: it is the call's result the model sees".into(),
        ));
    }
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(invalid(
            "reason",
            format!("must be at most {MAX_REASON} bytes"),
        ));
    }
    if req.decision == Verdict::Reject && req.arguments.is_some() {
        return Err(invalid(
            "arguments",
            "arguments can only be edited when approving".into(),
        ));
    }
    if let Some(arguments) = &req.arguments
        && !arguments.is_object()
    {
        return Err(invalid(
            "arguments",
            format!("must be a JSON object, got {arguments}"),
        ));
    }
    let by = match req.by {
        Some(by) => by,
        None => match headers.get("keel-actor") {
            Some(v) => v
                .to_str()
                .map_err(|_| Error::BadRequest("Keel-Actor must be visible ASCII".into()))?
                .to_string(),
            None => "anonymous".to_string(),
        },
    };
    if by.trim().is_empty() || by.len() > MAX_DECIDER {
        return Err(invalid(
            "by",
            format!("must be 1-{MAX_DECIDER} bytes naming who decides"),
        ));
    }
    let approved = req.decision == Verdict::Approve;
    let state = svc
        .decide(
            tenant.name(),
            run_id,
            &approval_id,
            service::Decision {
                approved,
                by: by.clone(),
                reason,
                arguments: req.arguments,
            },
        )
        .await?;
    let pending: Vec<&str> = state.pending_approvals().map(|a| a.id.as_str()).collect();
    Ok(Json(json!({
        "run_id": run_id.to_string(),
        "approval_id": approval_id,
        "decision": if approved { "approved" } else { "rejected" },
        "by": by,
        "status": state.status.as_str(),
        "pending": pending,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InboxQuery {
    status: Option<String>,
    agent: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The approvals waiting for a decision: `?status=pending` (the only
/// status listed), `agent`, `limit` (approvals, 1..=500, default 100) and
/// `cursor` (a page's `next_cursor`, `null` on the last page), newest runs
/// first, like `GET /v1/runs`.
async fn inbox<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    query: Result<Query<InboxQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<service::Inbox>, Error> {
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("bad query string: {e}")))?;
    match q.status.as_deref() {
        None | Some("") | Some("pending") => {}
        Some(other) => {
            return Err(Error::BadRequest(format!(
                "unknown status `{other}`: the inbox lists `pending` approvals (decided ones are in each run's view)"
            )));
        }
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(Error::BadRequest(
            "`limit` must be between 1 and 500".into(),
        ));
    }
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(service::InboxCursor::parse(c).ok_or_else(|| {
            Error::BadRequest(format!(
                "bad cursor `{c}`: pass a page's `next_cursor` (`<run_id>:<approval_id>`)"
            ))
        })?),
    };
    let page = svc
        .inbox(tenant.name(), agent_filter(q.agent)?, after, limit)
        .await?;
    Ok(Json(page))
}

async fn put_agent<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, Error> {
    let bytes = body(bytes)?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Error::BadRequest("the spec is not UTF-8".into()))?;
    if text.trim().is_empty() {
        return Err(Error::BadRequest(
            "the body is empty; send an agent spec as YAML or JSON".into(),
        ));
    }
    let agent = Agent::parse(text)?;
    service::check_config(&svc.providers.config, tenant.name(), &agent)?;
    let registered = svc.register(tenant.name(), &agent).await?;
    let status = match registered {
        Registered::Created => StatusCode::CREATED,
        Registered::Unchanged => StatusCode::OK,
    };
    let body = json!({
        "name": agent.spec.name,
        "version": agent.spec.version,
        "created": registered == Registered::Created,
    });
    Ok((status, Json(body)).into_response())
}

fn agent_summary(record: &keel_store::AgentRecord) -> Value {
    let tools: Vec<String> = record
        .spec
        .tools
        .iter()
        .map(|t| match &t.mcp {
            Some(server) => format!("mcp:{server}"),
            None => t.name.clone(),
        })
        .collect();
    json!({
        "name": record.spec.name,
        "version": record.spec.version,
        "description": record.spec.description,
        "model": {"provider": record.spec.model.provider, "model": record.spec.model.model},
        "tools": tools,
        "created_at": record.created_at,
    })
}

async fn list_agents<S: Store>(State(svc): Api<S>, tenant: Tenant) -> Result<Json<Value>, Error> {
    let agents = svc.store.list_agents(tenant.name()).await?;
    let agents: Vec<Value> = agents.iter().map(agent_summary).collect();
    Ok(Json(json!({"agents": agents})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentQuery {
    version: Option<String>,
}

async fn get_agent<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<AgentQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Error> {
    let name = segment(name)?;
    let Query(q) = query.map_err(|e| Error::BadRequest(format!("bad query string: {e}")))?;
    let version = q.version.as_deref();
    if version.is_some_and(|v| !keel_core::spec::is_name(v)) {
        return Err(Error::NotFound(format!("agent `{name}` not found")));
    }
    let Some(record) = svc
        .store
        .get_agent(tenant.name(), agent_name(&name)?, version)
        .await?
    else {
        return Err(Error::NotFound(format!("agent `{name}` not found")));
    };
    let mut body = agent_summary(&record);
    body["spec"] = json!(record.spec);
    Ok(Json(body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    /// Only runs created at or after this time (epoch milliseconds).
    since: Option<i64>,
}

fn usage_query(
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<UsageQuery, Error> {
    let Query(q) = query.map_err(|e| {
        Error::BadRequest(format!(
            "bad query string: {e} (`since` is a time in epoch milliseconds)"
        ))
    })?;
    Ok(q)
}

/// Usage totals as JSON fields.
fn totals_json(totals: &UsageTotals) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("runs".into(), json!(totals.runs));
    fields.insert("input_tokens".into(), json!(totals.input_tokens));
    fields.insert("output_tokens".into(), json!(totals.output_tokens));
    fields.insert("cost_usd".into(), json!(totals.cost_usd));
    fields
}

/// Tokens and cost of an agent's runs (every version), each as of its last
/// step: `{"agent", "runs", "input_tokens", "output_tokens", "cost_usd"}`.
async fn agent_usage<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    name: Result<Path<String>, PathRejection>,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Error> {
    let name = segment(name)?;
    let q = usage_query(query)?;
    if svc
        .store
        .get_agent(tenant.name(), agent_name(&name)?, None)
        .await?
        .is_none()
    {
        return Err(Error::NotFound(format!("agent `{name}` not found")));
    }
    let totals = svc.store.usage(tenant.name(), Some(&name), q.since).await?;
    let mut body = serde_json::Map::new();
    body.insert("agent".into(), json!(name));
    body.extend(totals_json(&totals));
    Ok(Json(Value::Object(body)))
}

/// Tokens and cost of every run, in all and per agent (one grouped read of
/// the run rows): `{"runs", "input_tokens", "output_tokens", "cost_usd",
/// "agents": [{"agent", ...}]}`.
async fn usage<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, Error> {
    let q = usage_query(query)?;
    let agents = svc.store.usage_by_agent(tenant.name(), q.since).await?;
    let mut all = UsageTotals::default();
    let mut per_agent = Vec::with_capacity(agents.len());
    for usage in &agents {
        let t = &usage.totals;
        all.runs += t.runs;
        all.input_tokens = all.input_tokens.saturating_add(t.input_tokens);
        all.output_tokens = all.output_tokens.saturating_add(t.output_tokens);
        all.cost_usd += t.cost_usd;
        let mut entry = serde_json::Map::new();
        entry.insert("agent".into(), json!(usage.agent));
        entry.extend(totals_json(t));
        per_agent.push(Value::Object(entry));
    }
    let mut body = totals_json(&all);
    body.insert("agents".into(), Value::Array(per_agent));
    Ok(Json(Value::Object(body)))
}

/// The configured LLM providers (endpoints, key sources, limits, prices,
/// breaker thresholds; never a key) and the circuit breakers: those this
/// process's workers used, merged with the store's latest transition of
/// every endpoint (`shared`, written by any process on the store), so an
/// `api`-only process shows them too.
async fn providers<S: Store>(State(svc): Api<S>, tenant: Tenant) -> Result<Json<Value>, Error> {
    tenant.operator("/v1/providers")?;
    let providers = &svc.providers;
    let configured: Vec<Value> = providers
        .config
        .providers
        .iter()
        .map(|(name, provider)| {
            let mut value = serde_json::to_value(provider).unwrap_or(Value::Null);
            if let Some(object) = value.as_object_mut() {
                object.insert("name".into(), json!(name));
                object.insert(
                    "base_url".into(),
                    json!(keel_core::spec::redact_url(provider.base_url())),
                );
            }
            value
        })
        .collect();
    let shared = match svc.store.breakers().await {
        Ok(shared) => shared,
        Err(e) => {
            // This process's own breakers are still worth showing.
            tracing::warn!(error = %e, "could not read the shared circuit breakers");
            Vec::new()
        }
    };
    Ok(Json(json!({
        "providers": configured,
        "process": providers.breakers.process(),
        "breakers": providers.breakers.views(&shared, keel_engine::now()),
    })))
}

async fn list_dlq<S: Store>(State(svc): Api<S>, tenant: Tenant) -> Result<Json<Value>, Error> {
    let letters = svc.store.dead_letters(tenant.name(), 500).await?;
    let letters: Vec<Value> = letters
        .iter()
        .map(|d| {
            json!({
                "id": d.id.to_string(),
                "run_id": d.run_id.to_string(),
                "kind": d.kind.as_str(),
                "step": d.step,
                "attempts": d.attempts,
                "error": d.error,
                "created_at": d.created_at,
            })
        })
        .collect();
    Ok(Json(json!({"dead_letters": letters})))
}

async fn retry_dlq<S: Store>(
    State(svc): Api<S>,
    tenant: Tenant,
    id: Result<Path<String>, PathRejection>,
) -> Result<Response, Error> {
    let id = segment(id)?;
    let task_id: TaskId = id
        .parse()
        .map_err(|_| Error::NotFound(format!("dead letter `{id}` not found")))?;
    let run_id = svc.redrive(tenant.name(), task_id).await?;
    let body =
        json!({"id": task_id.to_string(), "run_id": run_id.to_string(), "status": "requeued"});
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Listen backlog: bursts of thousands of clients connecting at once (a fleet
/// of agents, a benchmark) must queue, not be dropped; a dropped SYN costs the
/// client a one-second retransmit.
const BACKLOG: u32 = 4096;

/// Binds a listener on `addr` (`host:port`) with a deep accept queue.
pub async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for candidate in tokio::net::lookup_host(addr).await? {
        let socket = if candidate.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(candidate).and_then(|()| socket.listen(BACKLOG)) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            format!("`{addr}` resolves to no address"),
        )
    }))
}
