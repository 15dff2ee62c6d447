//! What the API and the in-process CLI do to runs and agents, written once:
//! register agents, submit, cancel, re-drive dead letters, and the run view.

use keel_core::event::Recorded;
use keel_core::ids::DEFAULT_TENANT;
use keel_core::message::Usage;
use keel_core::run::{self, Command, State};
use keel_core::spec::Spec;
use keel_core::{Agent, Event, Priority, RunId, TaskId};
use keel_engine::agents::Agents;
use keel_engine::callback;
use keel_engine::external::External;
use keel_engine::{linked_tasks, now, projection};
use keel_store::{
    Append, Delta, DeltaPos, Error as StoreError, NewTask, Registered, RunRecord, Store,
    Submission, Submitted, TaskKind, TaskUpdate,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::api::Error;

/// Runs and agents over one store.
#[derive(Clone)]
pub struct Service<S> {
    /// The store.
    pub store: S,
    /// Compiled agent versions.
    pub agents: Agents<S>,
    /// External workers' access to their queues.
    pub external: External<S>,
    /// Ceilings on pending runs.
    admission: Arc<Admission>,
    /// The LLM providers' configuration and this process's circuit breakers.
    pub providers: Providers,
}

/// The LLM providers as this process knows them, for the API.
#[derive(Clone, Debug, Default)]
pub struct Providers {
    /// The configuration file's providers.
    pub config: Arc<keel_core::config::Config>,
    /// This process's circuit breakers (its workers use them).
    pub breakers: keel_engine::Breakers,
}

/// Ceilings on pending runs (not yet finished: `PENDING`, `AWAITING_LLM`,
/// `AWAITING_TOOL`, `AWAITING_APPROVAL`, `COMPENSATING`), beyond which submits are refused with
/// [`Error::Busy`] instead of letting the queue grow without bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Most pending runs in all (`None`: no ceiling).
    pub max_pending: Option<u64>,
    /// Most pending runs of one agent (`None`: no ceiling).
    pub max_pending_per_agent: Option<u64>,
    /// What a refused caller is told to wait.
    pub retry_after: Duration,
}

impl Limits {
    /// No ceiling.
    pub fn unlimited() -> Limits {
        Limits {
            max_pending: None,
            max_pending_per_agent: None,
            retry_after: Duration::from_secs(1),
        }
    }
}

/// How long a pending count read from the store is trusted. Counting is an
/// index scan, too dear for every submit; between reads, the submits this
/// process admitted are added to the count (as soon as admitted), so a
/// burst cannot overshoot a ceiling by more than what other processes
/// accept in this window.
const COUNT_TTL: Duration = Duration::from_millis(250);

/// What a ceiling counts: a tenant's pending runs, of one agent or (`None`)
/// of all.
type Scope = (String, Option<String>);

/// The ceilings and the cached counts they are checked against.
struct Admission {
    limits: Limits,
    /// Pending runs per scope.
    counts: Mutex<HashMap<Scope, Count>>,
    /// Held shared by each submit from its commit until its run is
    /// counted, exclusively by a read of the counts from the store: a read
    /// then sees every run this process committed, each counted once, and
    /// no commit lands between its snapshot and the count it sets.
    reading: tokio::sync::RwLock<()>,
}

impl Admission {
    /// Whether the stored count of `scope` can be trusted.
    fn is_fresh(&self, scope: &Scope) -> bool {
        self.counts.lock().is_ok_and(|counts| {
            counts
                .get(scope)
                .is_some_and(|c| c.read.elapsed() < COUNT_TTL)
        })
    }

    /// A count of `scope` just read from the store.
    fn remember(&self, scope: Scope, stored: u64) {
        if let Ok(mut counts) = self.counts.lock() {
            let count = counts.entry(scope).or_insert(Count {
                read: Instant::now(),
                stored,
                in_flight: 0,
            });
            count.read = Instant::now();
            count.stored = stored;
        }
    }

    /// Counts one more run in flight in `scope` unless the pending and
    /// in-flight runs reach `ceiling`; returns their number when they would.
    fn reserve(&self, scope: &Scope, ceiling: u64) -> Result<(), u64> {
        let Ok(mut counts) = self.counts.lock() else {
            return Ok(());
        };
        let Some(count) = counts.get_mut(scope) else {
            return Ok(());
        };
        let pending = count.stored + count.in_flight;
        if pending >= ceiling {
            return Err(pending);
        }
        count.in_flight += 1;
        Ok(())
    }

    /// Runs `scope` admits under `ceiling` beyond those pending and in
    /// flight (all of it when no count was read yet).
    fn room(&self, scope: &Scope, ceiling: u64) -> u64 {
        let Ok(counts) = self.counts.lock() else {
            return ceiling;
        };
        counts.get(scope).map_or(ceiling, |count| {
            ceiling.saturating_sub(count.stored + count.in_flight)
        })
    }

    /// Ends the submits reserved in `scopes`: a run `created` is pending
    /// from now on (until the next read of the store counts it).
    fn finish(&self, scopes: &[Scope], created: bool) {
        if let Ok(mut counts) = self.counts.lock() {
            for scope in scopes {
                if let Some(count) = counts.get_mut(scope) {
                    count.in_flight = count.in_flight.saturating_sub(1);
                    if created {
                        count.stored += 1;
                    }
                }
            }
        }
    }
}

/// What admission knows of one scope's pending runs.
struct Count {
    /// When `stored` was read.
    read: Instant,
    /// Pending runs in the store as last read (plus those this process
    /// created since).
    stored: u64,
    /// Submits admitted and not committed yet.
    in_flight: u64,
}

/// A run submission as the API receives it.
#[derive(Clone, Debug)]
pub struct Submit {
    /// The tenant submitting (whose agent runs).
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Agent version; the newest when absent.
    pub version: Option<String>,
    /// Input (a string or any JSON).
    pub input: Value,
    /// Client's idempotency key.
    pub idempotency_key: Option<String>,
    /// Priority under contention for workers ([`Priority::DEFAULT`] when
    /// the client gave none).
    pub priority: Priority,
    /// Where the run's result and parks are POSTed (an http(s) URL,
    /// checked by [`parse_callback_url`]).
    pub callback_url: Option<String>,
}

/// Reads a submission's `callback_url` (absent or null: none), with a
/// message naming the field when it is not an http(s) URL.
pub fn parse_callback_url(value: Option<&Value>) -> Result<Option<String>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(url)) if keel_core::spec::is_http_url(url) && url.len() <= 2048 => {
            Ok(Some(url.clone()))
        }
        Some(other) => Err(format!(
            "`callback_url` must be an http(s) URL of at most 2048 bytes, got {other}"
        )),
    }
}

/// Reads a submission's `priority` field (absent or null: the default),
/// with a message naming the field when it is not an integer in `0..=9`.
pub fn parse_priority(value: Option<&Value>) -> Result<Priority, String> {
    let value = match value {
        None | Some(Value::Null) => return Ok(Priority::DEFAULT),
        Some(value) => value,
    };
    // 8.0 is the integer 8 in JSON (and JSON Schema): what a client's
    // float-typed field sends.
    let integral = value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && (0.0..=9.0).contains(f))
            .map(|f| f as i64)
    });
    integral.and_then(Priority::new).ok_or_else(|| {
        format!("`priority` must be an integer from 0 (lowest) to 9 (highest), got {value}")
    })
}

/// The answer for a run that does not exist, or is another tenant's.
fn not_found(run_id: RunId) -> Error {
    Error::NotFound(format!("run `{run_id}` not found"))
}

/// How many times an API-side append retries after a concurrent worker append.
const APPEND_RETRIES: usize = 20;

impl<S: Store> Service<S> {
    /// A service over `store`, with no ceiling on pending runs.
    pub fn new(store: S) -> Self {
        Self::with_limits(store, Limits::unlimited())
    }

    /// A service over `store` that refuses submits beyond `limits`.
    pub fn with_limits(store: S, limits: Limits) -> Self {
        Self {
            agents: Agents::new(store.clone()),
            external: External::new(store.clone()),
            store,
            admission: Arc::new(Admission {
                limits,
                counts: Mutex::new(HashMap::new()),
                reading: tokio::sync::RwLock::new(()),
            }),
            providers: Providers::default(),
        }
    }

    /// This service with the providers' configuration and breakers shown by the API.
    pub fn with_providers(mut self, providers: Providers) -> Self {
        self.providers = providers;
        self
    }

    /// Reserves a place for one more pending run of `agent`, or refuses with
    /// [`Error::Busy`] when a ceiling is reached. The check and the
    /// reservation are one step, so concurrent submits cannot all slip
    /// under a ceiling; a submit that creates no run gives its place back
    /// ([`Admission::finish`]).
    async fn admit(&self, tenant: &str, agent: &str) -> Result<(), Error> {
        let limits = self.admission.limits;
        let checks = [
            ((tenant.to_string(), None), limits.max_pending),
            (
                (tenant.to_string(), Some(agent.to_string())),
                limits.max_pending_per_agent,
            ),
        ];
        let mut reserved: Vec<Scope> = Vec::new();
        for (scope, ceiling) in checks {
            let Some(ceiling) = ceiling else { continue };
            if let Err(e) = self.refresh(&scope).await {
                self.admission.finish(&reserved, false);
                return Err(e);
            }
            if let Err(pending) = self.admission.reserve(&scope, ceiling) {
                self.admission.finish(&reserved, false);
                let of_tenant = if tenant == DEFAULT_TENANT {
                    String::new()
                } else {
                    format!(" of tenant `{tenant}`")
                };
                let message = match &scope.1 {
                    None => format!(
                        "{pending} runs{of_tenant} are pending, the ceiling is {ceiling} (--max-pending): retry later"
                    ),
                    Some(agent) => format!(
                        "{pending} runs of agent `{agent}` are pending, the ceiling is {ceiling} (--max-pending-per-agent): retry later"
                    ),
                };
                return Err(Error::Busy {
                    message,
                    retry_after: limits.retry_after,
                });
            }
            reserved.push(scope);
        }
        Ok(())
    }

    /// Reads the pending runs of `scope` from the store unless the count
    /// held is fresh.
    async fn refresh(&self, scope: &Scope) -> Result<(), Error> {
        if self.admission.is_fresh(scope) {
            return Ok(());
        }
        let _reading = self.admission.reading.write().await;
        // Another submit may have read it while this one waited.
        if self.admission.is_fresh(scope) {
            return Ok(());
        }
        let n = self
            .store
            .pending_runs(&scope.0, scope.1.as_deref())
            .await?;
        self.admission.remember(scope.clone(), n);
        Ok(())
    }

    /// How many more runs of the `default` tenant (the one ingestion
    /// submits as) the ceiling (`--max-pending`) admits now, or `None`
    /// when there is none. A producer that pulls its work (the
    /// ingest consumer) takes no more than this, so work beyond the ceiling
    /// waits where it came from. The count is as fresh as admission's own
    /// (see [`COUNT_TTL`]); a submit may still be refused when another
    /// caller took the room first.
    pub async fn room(&self) -> Result<Option<u64>, Error> {
        let Some(ceiling) = self.admission.limits.max_pending else {
            return Ok(None);
        };
        let scope = (DEFAULT_TENANT.to_string(), None);
        self.refresh(&scope).await?;
        Ok(Some(self.admission.room(&scope, ceiling)))
    }

    /// What a caller refused for a ceiling is told to wait.
    pub fn retry_after(&self) -> Duration {
        self.admission.limits.retry_after
    }

    /// The scopes `admit` reserved a place in for `tenant`'s `agent`.
    fn scopes(&self, tenant: &str, agent: &str) -> Vec<Scope> {
        let limits = self.admission.limits;
        let mut scopes = Vec::new();
        if limits.max_pending.is_some() {
            scopes.push((tenant.to_string(), None));
        }
        if limits.max_pending_per_agent.is_some() {
            scopes.push((tenant.to_string(), Some(agent.to_string())));
        }
        scopes
    }

    /// Validates and registers an agent version of `tenant`.
    pub async fn register(&self, tenant: &str, agent: &Agent) -> Result<Registered, Error> {
        Ok(self.store.put_agent(tenant, &agent.spec, now()).await?)
    }

    /// Accepts a run; returns once it is durably committed.
    pub async fn submit(&self, submit: Submit) -> Result<Submitted, Error> {
        // An explicit version is immutable, so the compiled cache answers it;
        // "the newest version" has to be asked of the store.
        let names = keel_core::spec::is_name(&submit.agent)
            && submit
                .version
                .as_deref()
                .is_none_or(keel_core::spec::is_name);
        let spec: Option<Spec> = match &submit.version {
            // Not names: nothing is registered under them.
            _ if !names => None,
            Some(version) => match self
                .agents
                .get(&submit.tenant, &submit.agent, version)
                .await
            {
                Ok(agent) => Some(agent.spec.clone()),
                Err(StoreError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            },
            None => self
                .store
                .get_agent(&submit.tenant, &submit.agent, None)
                .await?
                .map(|record| record.spec),
        };
        let Some(spec) = spec else {
            let (field, what) = match &submit.version {
                Some(v) => (
                    "version",
                    format!("agent `{}` version `{v}` is not registered", submit.agent),
                ),
                None => (
                    "agent",
                    format!("agent `{}` is not registered", submit.agent),
                ),
            };
            return Err(Error::Invalid {
                message: what.clone(),
                fields: vec![keel_core::spec::FieldError {
                    field: field.into(),
                    message: what,
                }],
            });
        };
        let transition = run::submit(
            &submit.tenant,
            &spec.name,
            &spec.version,
            submit.input.clone(),
            submit.priority,
        );
        let Some(mut event) = transition.events.into_iter().next() else {
            return Err(Error::Internal("submit produced no event".into()));
        };
        if let Event::RunSubmitted { callback_url, .. } = &mut event {
            callback_url.clone_from(&submit.callback_url);
        }
        self.admit(&submit.tenant, &spec.name).await?;
        let at = now();
        let submission = Submission {
            run_id: RunId::new(),
            tenant: submit.tenant.clone(),
            agent: spec.name.clone(),
            version: spec.version.clone(),
            input: submit.input,
            idempotency_key: submit.idempotency_key,
            priority: submit.priority,
            event,
            task: NewTask {
                kind: TaskKind::Llm,
                step: 1,
                priority: submit.priority,
                max_attempts: spec.retry.max_attempts,
                run_at: at,
                lease_to: None,
                queue: None,
            },
            now: at,
        };
        let counting = self.admission.reading.read().await;
        let submitted = self.store.submit(submission).await;
        self.admission.finish(
            &self.scopes(&submit.tenant, &spec.name),
            submitted.as_ref().is_ok_and(|s| s.created),
        );
        drop(counting);
        if let Ok(Submitted { created: true, .. }) = submitted {
            keel_engine::metrics::run_submitted(&submit.tenant, &spec.name);
        }
        Ok(submitted?)
    }

    /// Folds a run of `tenant`'s journal. Another tenant's run is not
    /// found, as if it did not exist.
    pub async fn state(
        &self,
        tenant: &str,
        run_id: RunId,
    ) -> Result<(State, Vec<Recorded>), Error> {
        let events = self.store.events(run_id, 0, u32::MAX).await?;
        let state = State::replay(run_id, &events);
        if events.is_empty() || state.tenant != tenant {
            return Err(not_found(run_id));
        }
        Ok((state, events))
    }

    /// The row of a run of `tenant` (another tenant's is not found).
    pub async fn record(&self, tenant: &str, run_id: RunId) -> Result<RunRecord, Error> {
        match self.store.get_run(run_id).await? {
            Some(record) if record.tenant == tenant => Ok(record),
            _ => Err(not_found(run_id)),
        }
    }

    /// Cancels a run of `tenant` that is not over.
    pub async fn cancel(
        &self,
        tenant: &str,
        run_id: RunId,
        reason: String,
    ) -> Result<State, Error> {
        for _ in 0..APPEND_RETRIES {
            let (mut state, _) = self.state(tenant, run_id).await?;
            let agent = self
                .agents
                .get(&state.tenant, &state.agent, &state.version)
                .await?;
            let transition = run::handle(
                &state,
                &agent,
                Command::Cancel {
                    reason: reason.clone(),
                },
            )
            .map_err(|e| Error::Conflict(format!("cannot cancel run `{run_id}`: {e}")))?;
            // A run with calls to undo is COMPENSATING first: its first
            // compensation's task is created with the cancel.
            let new_tasks = effect_tasks(&state, &agent, &transition.effects);
            match self
                .append_admin(&mut state, transition.events, true, None, new_tasks)
                .await
            {
                Ok(()) => return Ok(state),
                Err(StoreError::SeqConflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "run `{run_id}` is changing too fast to cancel; try again"
        )))
    }

    /// Puts a dead-lettered task of a run of `tenant` back in the queue
    /// with fresh attempts.
    pub async fn redrive(&self, tenant: &str, id: TaskId) -> Result<RunId, Error> {
        let missing = || Error::NotFound(format!("dead letter `{id}` not found"));
        let Some(letter) = self.store.dead_letter(id).await? else {
            return Err(missing());
        };
        for _ in 0..APPEND_RETRIES {
            let (mut state, _) = self
                .state(tenant, letter.run_id)
                .await
                .map_err(|_| missing())?;
            if state.status.is_terminal() {
                return Err(Error::Conflict(format!(
                    "run `{}` is already {}",
                    letter.run_id,
                    state.status.as_str()
                )));
            }
            let events = vec![Event::TaskRedriven { task_id: id }];
            match self
                .append_admin(&mut state, events, false, Some(id), Vec::new())
                .await
            {
                Ok(()) => return Ok(letter.run_id),
                Err(StoreError::SeqConflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(
            "run is changing too fast; try again".into(),
        ))
    }

    /// Decides approval `approval_id` of a run: approve (optionally with
    /// edited arguments) or reject with a reason. When it was the step's
    /// last pending approval, the step resumes in the same commit (its
    /// tools task, or the next LLM call when every call was rejected).
    pub async fn decide(
        &self,
        tenant: &str,
        run_id: RunId,
        approval_id: &str,
        decision: Decision,
    ) -> Result<State, Error> {
        for _ in 0..APPEND_RETRIES {
            let (mut state, _) = self.state(tenant, run_id).await?;
            let agent = self
                .agents
                .get(&state.tenant, &state.agent, &state.version)
                .await?;
            let command = Command::Decide {
                approval_id: approval_id.to_string(),
                approved: decision.approved,
                by: decision.by.clone(),
                reason: decision.reason.clone(),
                arguments: decision.arguments.clone(),
            };
            let transition = run::handle(&state, &agent, command).map_err(|e| match e {
                run::Rejected::UnknownApproval(_) => Error::NotFound(format!(
                    "run `{run_id}` has no approval `{approval_id}` waiting: {e}"
                )),
                run::Rejected::InvalidDecision(message) => Error::Invalid {
                    message: format!("cannot decide approval `{approval_id}`: {message}"),
                    fields: vec![keel_core::spec::FieldError {
                        field: "arguments".into(),
                        message,
                    }],
                },
                other => Error::Conflict(format!(
                    "cannot decide approval `{approval_id}` of run `{run_id}`: {other}"
                )),
            })?;
            let at = now();
            let mut new_tasks = effect_tasks(&state, &agent, &transition.effects);
            let terminal = transition.events.iter().any(Event::stops_steps);
            new_tasks.extend(callback::tasks(&state, &transition.events, at));
            let expected_seq = state.seq;
            for event in &transition.events {
                state.apply_next(event, at);
            }
            let wake = if terminal {
                linked_tasks(&state, at)
            } else {
                Vec::new()
            };
            let tally =
                keel_engine::metrics::Tally::new(&state.tenant, &state.agent, &transition.events);
            let appended = self
                .store
                .append(Append {
                    run_id,
                    expected_seq,
                    events: transition.events,
                    lease: None,
                    task: TaskUpdate::Keep,
                    new_tasks,
                    clear_tasks: terminal,
                    redrive: None,
                    projection: projection(&state),
                    now: at,
                    spawn: Vec::new(),
                    wake,
                })
                .await;
            match appended {
                Ok(_) => {
                    if tally.ends_run() {
                        keel_engine::trace::run_ended(&state);
                    }
                    tally.record();
                    return Ok(state);
                }
                Err(StoreError::SeqConflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "run `{run_id}` is changing too fast to decide; try again"
        )))
    }

    /// A page of the approvals waiting for a decision, of `agent` only
    /// when given: newest runs first, each run's approvals in request
    /// order, at most `limit`, after `after` (the previous page's
    /// [`Inbox::next_cursor`]). A run leaving or entering
    /// `AWAITING_APPROVAL` between pages shifts no other approval: the
    /// cursor is a position (run id, approval), not an offset.
    pub async fn inbox(
        &self,
        tenant: &str,
        agent: Option<String>,
        after: Option<InboxCursor>,
        limit: u32,
    ) -> Result<Inbox, Error> {
        let limit = limit.max(1) as usize;
        let mut approvals = Vec::new();
        let mut before = None;
        if let Some(cursor) = after {
            // The rest of the cursor's run, if it still waits.
            if let Some(record) = self.store.get_run(cursor.run_id).await?
                && record.tenant == tenant
                && record.projection.status == run::Status::AwaitingApproval
                && agent.as_ref().is_none_or(|a| *a == record.agent)
            {
                let events = self.store.events(record.id, 0, u32::MAX).await?;
                let views = ApprovalView::from_journal(record.id, &record.agent, &events);
                let rest = views
                    .iter()
                    .position(|a| a.id == cursor.approval_id)
                    .map_or(views.len(), |i| i + 1);
                approvals.extend(
                    views
                        .into_iter()
                        .skip(rest)
                        .filter(|a| a.status == "pending"),
                );
            }
            before = Some(cursor.run_id);
        }
        while approvals.len() < limit {
            // A parked run has at least one pending approval: as many runs
            // as approvals are missing, unless decisions raced the read.
            let wanted = (limit - approvals.len()).min(MAX_INBOX_RUNS) as u32;
            let runs = self
                .store
                .list_runs(keel_store::RunFilter {
                    tenant: tenant.into(),
                    status: Some(run::Status::AwaitingApproval),
                    agent: agent.clone(),
                    before,
                    limit: wanted,
                })
                .await?;
            for record in &runs {
                let events = self.store.events(record.id, 0, u32::MAX).await?;
                let views = ApprovalView::from_journal(record.id, &record.agent, &events);
                approvals.extend(views.into_iter().filter(|a| a.status == "pending"));
            }
            if (runs.len() as u32) < wanted {
                break;
            }
            before = runs.last().map(|r| r.id);
        }
        // A full page: the next one starts after its last approval.
        let next_cursor = if approvals.len() >= limit {
            approvals.truncate(limit);
            approvals.last().and_then(|a| {
                let run_id = a.run_id.parse().ok()?;
                Some(InboxCursor {
                    run_id,
                    approval_id: a.id.clone(),
                })
            })
        } else {
            None
        };
        Ok(Inbox {
            approvals,
            next_cursor,
        })
    }

    async fn append_admin(
        &self,
        state: &mut State,
        events: Vec<Event>,
        clear_tasks: bool,
        redrive: Option<TaskId>,
        new_tasks: Vec<NewTask>,
    ) -> Result<(), StoreError> {
        let expected_seq = state.seq;
        let at = now();
        // A run that stops its steps (it ends, or starts compensating).
        let ended = events.iter().any(Event::stops_steps);
        let mut new_tasks = new_tasks;
        new_tasks.extend(callback::tasks(state, &events, at));
        for event in &events {
            state.apply_next(event, at);
        }
        // A run that ends wakes its parent and cancels its children.
        let wake = if ended {
            linked_tasks(state, at)
        } else {
            Vec::new()
        };
        let tally = keel_engine::metrics::Tally::new(&state.tenant, &state.agent, &events);
        self.store
            .append(Append {
                run_id: state.run_id,
                expected_seq,
                events,
                lease: None,
                task: TaskUpdate::Keep,
                new_tasks,
                clear_tasks,
                redrive,
                projection: projection(state),
                now: at,
                spawn: Vec::new(),
                wake,
            })
            .await
            .map(|_| {
                if tally.ends_run() {
                    keel_engine::trace::run_ended(state);
                }
                tally.record();
            })
    }

    /// The status of a run of `tenant` as its row holds it (no fold of
    /// its journal).
    pub async fn status(
        &self,
        tenant: &str,
        run_id: RunId,
    ) -> Result<keel_core::run::Status, Error> {
        Ok(self.record(tenant, run_id).await?.projection.status)
    }

    /// The full view of a run of `tenant`: its row and its steps.
    pub async fn view(&self, tenant: &str, run_id: RunId) -> Result<RunView, Error> {
        let record = self.record(tenant, run_id).await?;
        let events = self.store.events(run_id, 0, u32::MAX).await?;
        let state = State::replay(run_id, &events);
        let mut view = RunView::new(&record, &state, &events);
        for child in &mut view.children {
            let Ok(id) = child.run_id.parse::<RunId>() else {
                continue;
            };
            if let Some(row) = self.store.get_run(id).await? {
                child.status = Some(row.projection.status.as_str().to_string());
            }
        }
        Ok(view)
    }
}

/// A decision on an approval, as a caller makes it.
#[derive(Clone, Debug)]
pub struct Decision {
    /// Approve (true) or reject.
    pub approved: bool,
    /// Who decides (journaled).
    pub by: String,
    /// Why (a rejection's reason goes to the model).
    pub reason: Option<String>,
    /// Edited arguments for an approved call.
    pub arguments: Option<Value>,
}

/// Most runs one inbox read lists at a time.
const MAX_INBOX_RUNS: usize = 500;

/// A page of the approvals inbox.
#[derive(Clone, Debug, Serialize)]
pub struct Inbox {
    /// The pending approvals.
    pub approvals: Vec<ApprovalView>,
    /// Where the next page starts (`?cursor=`); `None` when this page is
    /// the last (a full page always has one: the next may be empty).
    pub next_cursor: Option<InboxCursor>,
}

/// A position in the approvals inbox: after approval `approval_id` of run
/// `run_id`. Written `<run_id>:<approval_id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboxCursor {
    /// The run of the last approval of a page.
    pub run_id: RunId,
    /// That approval's id (`<step>.<call_index>.<attempt>`).
    pub approval_id: String,
}

impl InboxCursor {
    /// Parses a cursor the inbox gave (`None`: not one).
    pub fn parse(text: &str) -> Option<InboxCursor> {
        let (run, approval) = text.split_once(':')?;
        let parts: Vec<&str> = approval.split('.').collect();
        let numeric = parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 10 && p.bytes().all(|b| b.is_ascii_digit()));
        if !numeric {
            return None;
        }
        Some(InboxCursor {
            run_id: run.parse().ok()?,
            approval_id: approval.to_string(),
        })
    }
}

impl std::fmt::Display for InboxCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.run_id, self.approval_id)
    }
}

impl Serialize for InboxCursor {
    fn serialize<Se: serde::Serializer>(&self, serializer: Se) -> Result<Se::Ok, Se::Error> {
        serializer.collect_str(self)
    }
}

/// An approval as the API shows it (the run view, the inbox).
#[derive(Clone, Debug, Serialize)]
pub struct ApprovalView {
    /// Its id within the run: `<step>.<call_index>.<attempt>`.
    pub id: String,
    /// The run.
    pub run_id: String,
    /// The run's agent.
    pub agent: String,
    /// Step of the call.
    pub step: u32,
    /// Position of the call in the step.
    pub call_index: u32,
    /// Tool name.
    pub tool: String,
    /// The arguments the call would be made with.
    pub arguments: Value,
    /// The attempt it gates (more than 1: repeating a call that may have happened).
    pub attempt: u32,
    /// `policy` (an approval rule) or `uncertain` (a repeat after a crash).
    pub reason: String,
    /// `pending`, `approved`, `rejected`, or `void` (the run ended first).
    pub status: String,
    /// When it was requested (epoch ms).
    pub requested_at: i64,
    /// When the timeout policy applies (epoch ms), if there is a timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deadline: Option<i64>,
    /// Whether the timeout escalated it.
    pub escalated: bool,
    /// Who decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    /// When (epoch ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<i64>,
    /// The decision's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
    /// Arguments the approver edited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edited_arguments: Option<Value>,
}

impl ApprovalView {
    /// Every approval of a run, from its journal, in request order.
    pub fn from_journal(run_id: RunId, agent: &str, events: &[Recorded]) -> Vec<ApprovalView> {
        let mut views: Vec<ApprovalView> = Vec::new();
        for recorded in events {
            match &recorded.event {
                Event::ApprovalRequested {
                    approval_id,
                    step,
                    call_index,
                    tool,
                    arguments,
                    attempt,
                    reason,
                    timeout_ms,
                    ..
                } => views.push(ApprovalView {
                    id: approval_id.clone(),
                    run_id: run_id.to_string(),
                    agent: agent.to_string(),
                    step: *step,
                    call_index: *call_index,
                    tool: tool.clone(),
                    arguments: arguments.clone(),
                    attempt: *attempt,
                    reason: reason.clone(),
                    status: "pending".into(),
                    requested_at: recorded.at,
                    deadline: timeout_ms.map(|t| {
                        recorded
                            .at
                            .saturating_add(i64::try_from(t).unwrap_or(i64::MAX))
                    }),
                    escalated: false,
                    decided_by: None,
                    decided_at: None,
                    decision_reason: None,
                    edited_arguments: None,
                }),
                Event::ApprovalDecided {
                    approval_id,
                    approved,
                    by,
                    reason,
                    arguments,
                    ..
                } => {
                    if let Some(view) = views.iter_mut().rev().find(|v| v.id == *approval_id) {
                        view.status = if *approved { "approved" } else { "rejected" }.into();
                        view.decided_by = Some(by.clone());
                        view.decided_at = Some(recorded.at);
                        view.decision_reason = reason.clone();
                        view.edited_arguments = arguments.clone();
                    }
                }
                Event::ApprovalEscalated { approval_ids, .. } => {
                    for view in views.iter_mut().filter(|v| approval_ids.contains(&v.id)) {
                        view.escalated = true;
                    }
                }
                _ => {}
            }
        }
        // A run that ended while waiting leaves its approvals undecided for good.
        if events.last().is_some_and(|r| r.event.is_terminal()) {
            for view in views.iter_mut().filter(|v| v.status == "pending") {
                view.status = "void".into();
            }
        }
        views
    }
}

/// A run as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RunView {
    /// Run id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Pinned agent version.
    pub version: String,
    /// Priority, 0 (lowest) to 9 (highest).
    pub priority: u8,
    /// Status (`AWAITING_LLM`, ...).
    pub status: String,
    /// LLM steps answered.
    pub step_count: u32,
    /// Input.
    pub input: Value,
    /// Answer, once completed.
    pub output: Option<String>,
    /// Failure, cancel reason, or why the run is parked in the dead-letter queue.
    pub error: Option<String>,
    /// Tokens used.
    pub usage: Usage,
    /// What the LLM calls cost in USD (calls the configuration does not
    /// price count 0).
    pub cost_usd: f64,
    /// Why the run failed, for machines (`budget_exceeded`, `max_steps`,
    /// `timeout`), when it says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<String>,
    /// The dead-lettered task holding the run, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
    /// Journal length.
    pub last_seq: i64,
    /// Submit time (epoch ms).
    pub created_at: i64,
    /// Last change (epoch ms).
    pub updated_at: i64,
    /// Each LLM step and its tool calls.
    pub steps: Vec<StepView>,
    /// The run's approvals (pending and decided, with who decided), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<ApprovalView>,
    /// The run that started this one with `spawn_agents`, if it is a child run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentView>,
    /// The child runs it started, in order, with their status.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<ChildView>,
    /// Its compensations, once it failed or was cancelled after calls of
    /// tools with `compensate` (sagas).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compensation: Option<CompensationView>,
}

/// Where a child run comes from.
#[derive(Clone, Debug, Serialize)]
pub struct ParentView {
    /// The parent run.
    pub run_id: String,
    /// The parent's step whose `spawn_agents` call started it.
    pub step: u32,
    /// Its position among that call's tasks.
    pub index: u32,
    /// How deep it nests (the parent's depth + 1).
    pub depth: u32,
}

/// A child run, as its parent's view shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ChildView {
    /// The child run.
    pub run_id: String,
    /// Its agent.
    pub agent: String,
    /// Its pinned version.
    pub version: String,
    /// The parent's step that started it.
    pub step: u32,
    /// Its position among the call's tasks.
    pub index: u32,
    /// Its status, as its run row has it (absent if it could not be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// A run's compensations as the API shows them.
#[derive(Clone, Debug, Serialize)]
pub struct CompensationView {
    /// `running` while the run is COMPENSATING, then `done`.
    pub status: String,
    /// How the run ends (or ended): `FAILED` or `CANCELLED`.
    pub outcome: String,
    /// Compensations that succeeded.
    pub completed: u32,
    /// Compensations that failed.
    pub failed: u32,
    /// Each compensation, in the order they run (the last call first).
    pub compensations: Vec<CompensatingView>,
}

/// One compensation as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CompensatingView {
    /// Step of the call it undoes.
    pub step: u32,
    /// Position of that call in its step.
    pub call_index: u32,
    /// The tool of that call.
    pub call_tool: String,
    /// The compensating tool.
    pub tool: String,
    /// Its arguments (the filled template; null when it could not be filled).
    pub arguments: Value,
    /// `<run_id>:compensate:<step>:<call_index>`.
    pub idempotency_key: String,
    /// `pending`, `started`, `completed` or `failed`.
    pub status: String,
    /// Starts journaled (more than 1: repeated after a crash, same key).
    pub attempts: u32,
    /// The tool's answer, or why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

impl CompensationView {
    fn new(state: &State, events: &[Recorded]) -> Option<CompensationView> {
        let saga = state.saga.as_ref()?;
        let (completed, failed) = saga.counts();
        let compensations = saga
            .compensations
            .iter()
            .enumerate()
            .map(|(i, c)| CompensatingView {
                step: c.plan.step,
                call_index: c.plan.call_index,
                call_tool: c.plan.call_tool.clone(),
                tool: c.plan.tool.clone(),
                arguments: c.plan.arguments.clone(),
                idempotency_key: c.plan.idempotency_key.clone(),
                status: match c.state {
                    run::CompensationState::Pending => "pending",
                    run::CompensationState::Started { .. } => "started",
                    run::CompensationState::Completed => "completed",
                    run::CompensationState::Failed => "failed",
                }
                .into(),
                attempts: events
                    .iter()
                    .filter(|r| {
                        matches!(&r.event, Event::CompensationStarted { index, .. } if *index as usize == i)
                    })
                    .count() as u32,
                result: c.result.clone(),
            })
            .collect();
        let running = state.status == run::Status::Compensating;
        Some(CompensationView {
            status: if running { "running" } else { "done" }.into(),
            outcome: saga.outcome.as_str().into(),
            completed,
            failed,
            compensations,
        })
    }
}

/// One LLM step as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct StepView {
    /// 1-based step.
    pub step: u32,
    /// The model's text, if any.
    pub content: Option<String>,
    /// Tokens of this call.
    pub usage: Usage,
    /// What this call cost in USD, if the configuration prices its model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The model that answered, as the provider named it.
    pub model: String,
    /// Error the model was told about an empty reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correction: Option<String>,
    /// Tool calls of the step.
    pub tool_calls: Vec<CallView>,
}

/// One tool call as the API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct CallView {
    /// Provider call id.
    pub call_id: String,
    /// Tool name.
    pub tool: String,
    /// Arguments as the model wrote them.
    pub arguments: String,
    /// `<run_id>:<step>:<call_index>`.
    pub idempotency_key: String,
    /// Starts journaled (more than 1 after a recovery).
    pub attempts: u32,
    /// What the model saw.
    pub result: Option<String>,
    /// Whether the result is an error (including a rejected call).
    pub is_error: bool,
}

impl RunView {
    /// Builds the view from the run row and its journal.
    pub fn new(record: &RunRecord, state: &State, events: &[Recorded]) -> RunView {
        let mut steps: Vec<StepView> = Vec::new();
        for recorded in events {
            match &recorded.event {
                Event::LlmCompleted {
                    step,
                    message,
                    usage,
                    model,
                    cost_usd,
                } => steps.push(StepView {
                    step: *step,
                    content: message.content.clone(),
                    usage: *usage,
                    cost_usd: *cost_usd,
                    model: model.clone(),
                    correction: None,
                    tool_calls: message
                        .tool_calls
                        .iter()
                        .enumerate()
                        .map(|(i, c)| CallView {
                            call_id: c.id.clone(),
                            tool: c.name.clone(),
                            arguments: c.arguments.clone(),
                            idempotency_key: run::idempotency_key(state.run_id, *step, i as u32),
                            attempts: 0,
                            result: None,
                            is_error: false,
                        })
                        .collect(),
                }),
                Event::LlmRejected { error, .. } => {
                    if let Some(s) = steps.last_mut() {
                        s.correction = Some(error.clone());
                    }
                }
                Event::ToolCallRejected {
                    call_index, error, ..
                } => {
                    if let Some(c) = call_mut(&mut steps, *call_index) {
                        c.result = Some(error.clone());
                        c.is_error = true;
                    }
                }
                Event::ToolCallStarted { call_index, .. } => {
                    if let Some(c) = call_mut(&mut steps, *call_index) {
                        c.attempts += 1;
                    }
                }
                Event::ApprovalDecided {
                    call_index,
                    approved: false,
                    by,
                    reason,
                    ..
                } => {
                    if let Some(c) = call_mut(&mut steps, *call_index) {
                        let why = reason.as_deref().unwrap_or("no reason given");
                        c.result = Some(format!("the call was rejected by {by}: {why}"));
                        c.is_error = true;
                    }
                }
                Event::ToolCallCompleted {
                    call_index,
                    output,
                    is_error,
                    ..
                } => {
                    if let Some(c) = call_mut(&mut steps, *call_index) {
                        c.result = Some(output.clone());
                        c.is_error = *is_error;
                    }
                }
                _ => {}
            }
        }
        RunView {
            id: record.id.to_string(),
            tenant: record.tenant.clone(),
            agent: record.agent.clone(),
            version: record.version.clone(),
            priority: record.priority.get(),
            status: state.status.as_str().to_string(),
            step_count: state.steps,
            // The journal's input is exact; the row's copy may not be
            // (PostgreSQL has U+FFFD for U+0000).
            input: events
                .iter()
                .find_map(|r| match &r.event {
                    Event::RunSubmitted { input, .. } => Some(input.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| record.input.clone()),
            output: state.output.clone(),
            error: projection(state).error,
            usage: state.usage,
            cost_usd: state.cost_usd,
            error_code: events.iter().rev().find_map(|r| match &r.event {
                Event::RunFailed { code, .. } | Event::RunCompensating { code, .. } => code.clone(),
                _ => None,
            }),
            dead_letter: state.parked.as_ref().map(|p| p.task_id.to_string()),
            last_seq: state.seq,
            created_at: record.created_at,
            updated_at: record.updated_at,
            steps,
            approvals: ApprovalView::from_journal(record.id, &record.agent, events),
            parent: state.parent.as_ref().map(|p| ParentView {
                run_id: p.run_id.to_string(),
                step: p.step,
                index: p.index,
                depth: p.depth,
            }),
            children: state
                .children
                .iter()
                .map(|c| ChildView {
                    run_id: c.run_id.to_string(),
                    agent: c.agent.clone(),
                    version: c.version.clone(),
                    step: c.step,
                    index: c.index,
                    status: None,
                })
                .collect(),
            compensation: CompensationView::new(state, events),
        }
    }
}

fn call_mut(steps: &mut [StepView], index: u32) -> Option<&mut CallView> {
    steps.last_mut()?.tool_calls.get_mut(index as usize)
}

/// The queue's tasks for the effects of an API-side transition (a decision
/// or a cancel): the next tools or LLM task, or a compensation, due now
/// and leased to nobody. The timers and notifications of approvals are the
/// workers' business.
fn effect_tasks(state: &State, agent: &keel_core::Agent, effects: &[run::Effect]) -> Vec<NewTask> {
    let at = now();
    let mut tasks = Vec::new();
    for effect in effects {
        let (kind, step) = match effect {
            run::Effect::CallTools { step } => (TaskKind::Tools, *step),
            run::Effect::CallLlm { step } => (TaskKind::Llm, *step),
            run::Effect::Compensate { index } => (TaskKind::Compensate, *index),
            _ => continue,
        };
        tasks.push(NewTask {
            kind,
            step,
            priority: state.priority,
            max_attempts: agent.spec.retry.max_attempts,
            run_at: at,
            lease_to: None,
            queue: None,
        });
    }
    tasks
}

/// A run's journal from `after` on: history first, then live events as they
/// are committed, ending after the terminal event.
pub fn follow<S: Store>(
    store: S,
    run_id: RunId,
    after: keel_core::Seq,
) -> impl futures_util::Stream<Item = Result<Recorded, StoreError>> + Send {
    use futures_util::StreamExt;
    let from = Position {
        seq: after,
        delta: None,
    };
    follow_with(store, run_id, from, false).filter_map(|item| async move {
        match item {
            Ok(Streamed::Event(recorded)) => Some(Ok(recorded)),
            Ok(Streamed::Delta { .. } | Streamed::Retry { .. }) => None,
            Err(e) => Some(Err(e)),
        }
    })
}

/// A run's journal with the text of answers being streamed between its
/// events ([`Streamed`]), from `from` on: history first, then live, ending
/// after the terminal event.
pub fn follow_live<S: Store>(
    store: S,
    run_id: RunId,
    from: Position,
) -> impl futures_util::Stream<Item = Result<Streamed, StoreError>> + Send {
    follow_with(store, run_id, from, true)
}

/// Where a reader of a run's stream is: the last journal event it got, and
/// the last delta it got after that event, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// Last journal seq received.
    pub seq: keel_core::Seq,
    /// Last delta received after it.
    pub delta: Option<DeltaPos>,
}

impl Position {
    /// The SSE id of a delta at `delta` following journal seq `seq`:
    /// `<seq>.<step>.<attempt>.<idx>`.
    pub fn id(self) -> String {
        match self.delta {
            None => self.seq.to_string(),
            Some(d) => format!("{}.{}.{}.{}", self.seq, d.step, d.attempt, d.idx),
        }
    }

    /// Parses an SSE id: `<seq>` (a journal event) or
    /// `<seq>.<step>.<attempt>.<idx>` (a delta); `None` if it is neither.
    pub fn parse(id: &str) -> Option<Position> {
        let mut parts = id.trim().split('.');
        let seq: u64 = parts.next()?.parse().ok()?;
        let seq = keel_core::Seq::try_from(seq).ok()?;
        let rest: Vec<&str> = parts.collect();
        let delta = match rest.as_slice() {
            [] => None,
            [step, attempt, idx] => Some(DeltaPos {
                step: step.parse().ok()?,
                attempt: attempt.parse().ok()?,
                idx: idx.parse().ok()?,
            }),
            _ => return None,
        };
        Some(Position { seq, delta })
    }
}

/// An item of a run's live stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Streamed {
    /// A journal event.
    Event(Recorded),
    /// Text of an answer being streamed, after the journal event `seq`.
    Delta {
        /// The journal seq it follows.
        seq: keel_core::Seq,
        /// The text and its position.
        delta: Delta,
    },
    /// The step's call is being made again: the text of its earlier
    /// attempts sent so far is to be discarded; `attempt`'s deltas follow.
    Retry {
        /// The step.
        step: u32,
        /// The new attempt.
        attempt: u32,
    },
}

fn follow_with<S: Store>(
    store: S,
    run_id: RunId,
    from: Position,
    deltas: bool,
) -> impl futures_util::Stream<Item = Result<Streamed, StoreError>> + Send {
    let rx = store.subscribe();
    let start = Follow {
        store,
        run_id,
        after: from.seq.max(0),
        delta: from.delta,
        shown: from.delta.map(|d| (d.step, d.attempt)),
        deltas,
        rx,
        buffer: std::collections::VecDeque::new(),
        done: false,
    };
    futures_util::stream::unfold(start, |mut f| async move {
        let item = f.next().await?;
        Some((item, f))
    })
}

/// Most journal events or deltas read at once.
const PAGE: u32 = 512;

struct Follow<S> {
    store: S,
    run_id: RunId,
    /// Last journal seq sent.
    after: keel_core::Seq,
    /// The last delta read: the next read starts after it.
    delta: Option<DeltaPos>,
    /// The step and attempt the reader was last sent text of.
    shown: Option<(u32, u32)>,
    /// Whether deltas are sent at all.
    deltas: bool,
    rx: tokio::sync::broadcast::Receiver<keel_store::Committed>,
    buffer: std::collections::VecDeque<Streamed>,
    done: bool,
}

impl<S: Store> Follow<S> {
    async fn next(&mut self) -> Option<Result<Streamed, StoreError>> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            if self.done {
                return None;
            }
            if let Some(item) = self.buffer.pop_front() {
                match &item {
                    Streamed::Event(recorded) => {
                        self.after = recorded.seq;
                        self.done = recorded.event.is_terminal();
                    }
                    Streamed::Delta { .. } | Streamed::Retry { .. } => {}
                }
                return Some(Ok(item));
            }
            match self.read().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            // Caught up: a run that is over has nothing more to send.
            match self.store.get_run(self.run_id).await {
                Ok(Some(run))
                    if run.projection.status.is_terminal() && run.last_seq <= self.after =>
                {
                    return None;
                }
                Ok(None) => return None,
                Ok(Some(_)) => {}
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
            let wait = tokio::time::sleep(std::time::Duration::from_secs(5));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    msg = self.rx.recv() => match msg {
                        Ok(c) if c.run_id == self.run_id => break,
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return None,
                    },
                }
            }
        }
    }

    /// Buffers what there is to send; false if nothing.
    ///
    /// Deltas are read with the journal's last seq in one snapshot, and sent
    /// only once the journal events up to that seq are: so a step's text never
    /// comes after the event that completed the step (its deltas are deleted
    /// in that commit), nor the next step's text before it.
    async fn read(&mut self) -> Result<bool, StoreError> {
        if !self.deltas {
            let events = self.store.events(self.run_id, self.after, PAGE).await?;
            let any = !events.is_empty();
            self.buffer.extend(events.into_iter().map(Streamed::Event));
            return Ok(any);
        }
        let page = match self.store.deltas(self.run_id, self.delta, PAGE).await {
            Ok(page) => page,
            Err(StoreError::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        if page.last_seq > self.after {
            let wanted = u32::try_from(page.last_seq - self.after).unwrap_or(PAGE);
            let events = self
                .store
                .events(self.run_id, self.after, wanted.min(PAGE))
                .await?;
            let any = !events.is_empty();
            self.buffer.extend(events.into_iter().map(Streamed::Event));
            return Ok(any);
        }
        // Even if all were skipped, the read moved on past them.
        let any = !page.deltas.is_empty();
        self.buffer_deltas(page.deltas);
        Ok(any)
    }

    /// Buffers deltas following the journal's current seq. Of a step's
    /// attempts in the page only the newest is sent (the older ones' text
    /// would be discarded); a reader that got text of an older attempt of
    /// the step first gets [`Streamed::Retry`].
    fn buffer_deltas(&mut self, deltas: Vec<Delta>) {
        let mut newest: HashMap<u32, u32> = HashMap::new();
        for delta in &deltas {
            let attempt = newest.entry(delta.pos.step).or_default();
            *attempt = (*attempt).max(delta.pos.attempt);
        }
        for delta in deltas {
            let pos = delta.pos;
            // Skipped or sent, it is read: the next read starts after it.
            self.delta = Some(pos);
            if newest.get(&pos.step).is_some_and(|&n| pos.attempt < n) {
                continue;
            }
            if let Some((step, attempt)) = self.shown
                && step == pos.step
                && attempt < pos.attempt
            {
                self.buffer.push_back(Streamed::Retry {
                    step: pos.step,
                    attempt: pos.attempt,
                });
            }
            self.shown = Some((pos.step, pos.attempt));
            self.buffer.push_back(Streamed::Delta {
                seq: self.after,
                delta,
            });
        }
    }
}

/// Refuses a spec whose model (or a fallback) names a provider that is
/// neither built in nor in `config`, whose tools name an MCP server
/// `config` does not have, or that `tenant` may not run
/// ([`keel_core::config::tenant_violations`]), naming the field.
pub fn check_config(
    config: &keel_core::config::Config,
    tenant: &str,
    agent: &Agent,
) -> Result<(), keel_core::spec::Error> {
    let model = &agent.spec.model;
    let models = std::iter::once(("model.provider".to_string(), model)).chain(
        model
            .fallbacks
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("model.fallbacks[{i}].provider"), m)),
    );
    let mut errors = keel_core::config::tenant_violations(config, tenant, &agent.spec);
    for (field, m) in models {
        if let keel_core::spec::Provider::Named(name) = &m.provider
            && config.provider(name).is_none()
        {
            let known: Vec<&str> = config.providers.keys().map(String::as_str).collect();
            errors.push(keel_core::spec::FieldError {
                field,
                message: format!(
                    "`{name}` is not a provider of the server configuration (configured: {}) nor one of openai, anthropic, scripted",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                ),
            });
        }
    }
    for (i, tool) in agent.spec.tools.iter().enumerate() {
        if let Some(server) = &tool.mcp
            && config.mcp_server(server).is_none()
        {
            let known: Vec<&str> = config.mcp_servers.keys().map(String::as_str).collect();
            errors.push(keel_core::spec::FieldError {
                field: format!("tools[{i}].mcp"),
                message: format!(
                    "`{server}` is not an MCP server of the server configuration (configured: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(keel_core::spec::Error::Invalid(errors))
    }
}
