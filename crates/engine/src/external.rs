//! External workers: tools implemented by processes in any language that
//! lease calls over HTTP.
//!
//! A `worker: <queue>` tool's call is journaled (`ToolCallStarted`) like
//! any other, in the same commit as a task of that queue
//! ([`keel_store::TaskKind::External`]); the engine never claims such a
//! task. An external worker leases it ([`External::lease`], a long poll
//! woken by commits), keeps its lease with heartbeats, then completes or
//! fails it, every write fenced by the lease token. A worker that stops
//! heart-beating loses the lease when it expires; the next lease counts
//! another attempt, and a task leased more than its `max_attempts` times
//! goes to the dead-letter queue (like an engine task whose worker kept
//! dying). Completing journals `ToolCallCompleted` exactly as an internal
//! tool's result, and the result that settles the step queues the next
//! LLM call. A failure with attempts left and `retryable` is retried after
//! the agent's backoff; otherwise its error is the call's result for the
//! model, as for an HTTP tool whose retries are spent.
//!
//! A call nobody leases does not hold its run past `limits.timeout`: the
//! commit that queues it also arms the run's deadline timer (an engine
//! task, `deadline`); due, it fails the run with `timeout` and the run's
//! end removes the queued task, so it is leased no more, and a worker
//! still holding it is told its token is stale (409).

use std::sync::Arc;
use std::time::Duration;

use keel_core::ids::DEFAULT_TENANT;
use keel_core::run::{self, CallState, Command, Invocation, State};
use keel_core::spec::clip;
use keel_core::{Agent, Event, Millis, Recorded, RunId, TaskId};
use keel_store::{
    Append, Error as StoreError, Lease, NewTask, QueuedCall, Store, Task, TaskKind, TaskUpdate,
};
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::agents::Agents;
use crate::tools::MAX_OUTPUT_BYTES;
use crate::worker::{new_tasks, projection};
use crate::{callback, now};

/// Longest a lease request may wait for a task.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// Shortest and longest lease a worker may ask for.
pub const MIN_LEASE: Duration = Duration::from_secs(1);
/// See [`MIN_LEASE`].
pub const MAX_LEASE: Duration = Duration::from_secs(3600);
/// How often a waiting lease request looks again without being woken (an
/// expired lease or a retry falling due announces nothing).
const RECHECK: Duration = Duration::from_millis(500);
/// Appends retried when the journal moved on meanwhile (another call's result).
const CONFLICTS: u32 = 8;

/// Why an external worker's request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The token is not the task's live lease: it expired and was (or may
    /// be) taken over, or the task is done or gone: its result is in, or
    /// its run ended (cancelled, failed, timed out), which removes it (409).
    #[error(
        "task {0} is not leased with this token: the lease expired or was taken over, or the call is over (its result is in, or its run ended: cancelled, failed or timed out); drop the call"
    )]
    Stale(TaskId),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A leased call, as an external worker receives it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Leased {
    /// The task: name it in heartbeat, complete and fail.
    pub task_id: TaskId,
    /// The lease's token (a string: it does not fit every JSON number type).
    pub lease_token: String,
    /// The run.
    pub run_id: RunId,
    /// Step of the call.
    pub step: u32,
    /// Position of the call.
    pub call_index: u32,
    /// Tool name.
    pub tool: String,
    /// Validated arguments.
    pub arguments: Value,
    /// `<run_id>:<step>:<call_index>`: the same for every attempt.
    pub idempotency_key: String,
    /// W3C trace context: the run's trace, the call's span as parent (the
    /// same for every lease of the call).
    pub traceparent: String,
    /// Leases of this task so far, this one included.
    pub attempt: u32,
    /// Leases allowed before the dead-letter queue.
    pub max_attempts: u32,
    /// When the lease expires unless extended (epoch ms).
    pub lease_until: Millis,
}

/// What became of a failure report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failed {
    /// The call goes back to the queue, due at `retry_at`.
    Retrying {
        /// When it is due again (epoch ms).
        retry_at: Millis,
    },
    /// The error is the call's result for the model.
    Returned,
}

/// The external-worker side of the queue. Cheap to clone.
#[derive(Clone)]
pub struct External<S> {
    store: S,
    agents: Agents<S>,
}

/// Where `tenant`'s queue `queue` is stored: the name itself for the
/// `default` tenant, `<tenant>/<queue>` for another (neither name holds a
/// `/`), so one tenant's workers never lease another's calls.
pub fn queue_key(tenant: &str, queue: &str) -> String {
    if tenant == DEFAULT_TENANT {
        queue.to_string()
    } else {
        format!("{tenant}/{queue}")
    }
}

/// The tenant a stored queue name ([`queue_key`]) belongs to.
fn queue_tenant(key: &str) -> &str {
    key.split_once('/')
        .map_or(DEFAULT_TENANT, |(tenant, _)| tenant)
}

/// The task of an external worker's call `inv` of `queue`.
pub(crate) fn task(
    agent: &Agent,
    state: &State,
    inv: &Invocation,
    queue: &str,
    at: Millis,
) -> NewTask {
    NewTask {
        kind: TaskKind::External,
        step: inv.step,
        priority: state.priority,
        max_attempts: agent.spec.retry.max_attempts,
        run_at: at,
        lease_to: None,
        queue: Some(QueuedCall {
            queue: queue_key(&state.tenant, queue),
            call_index: inv.call_index,
        }),
    }
}

impl<S: Store> External<S> {
    /// External workers' access to `store`.
    pub fn new(store: S) -> External<S> {
        External {
            agents: Agents::new(store.clone()),
            store,
        }
    }

    /// Leases the next call of `tenant`'s `queue` to `worker` for
    /// `lease_for`, waiting up to `wait` for one (woken by commits that
    /// create work).
    pub async fn lease(
        &self,
        tenant: &str,
        queue: &str,
        worker: &str,
        wait: Duration,
        lease_for: Duration,
    ) -> Result<Option<Leased>, Error> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let lease_for = lease_for.clamp(MIN_LEASE, MAX_LEASE);
        let mut commits = self.store.subscribe();
        let key = queue_key(tenant, queue);
        loop {
            while let Some(task) = self
                .store
                .claim_queued(&key, worker, lease_for, now())
                .await?
            {
                if let Some(leased) = self.hand_out(task).await? {
                    info!(run_id = %leased.run_id, task_id = %leased.task_id, queue, worker, attempt = leased.attempt, "external call leased");
                    return Ok(Some(leased));
                }
            }
            let recheck = tokio::time::sleep(RECHECK);
            tokio::pin!(recheck);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return Ok(None),
                    _ = &mut recheck => break,
                    msg = commits.recv() => match msg {
                        Ok(c) if c.new_work => break,
                        Ok(_) => continue,
                        Err(_) => break,
                    },
                }
            }
        }
    }

    /// What a claimed task is for, or `None` when it has nothing left to
    /// do (then it is settled here: done, or dead-lettered after too many
    /// leases).
    async fn hand_out(&self, task: Task) -> Result<Option<Leased>, Error> {
        let Some(queued) = self.store.queued(task.lease.task_id, now()).await? else {
            return Ok(None);
        };
        let (state, agent, _) = self.load(task.run_id).await?;
        let index = queued.call.call_index;
        let call = state.calls.get(index as usize);
        let in_flight = state.steps == task.step
            && call.is_some_and(|c| matches!(c.state, CallState::Started { .. }));
        if state.status.is_terminal() || !in_flight {
            self.settle(
                &task.lease,
                &state,
                &agent,
                run::Transition::default(),
                TaskUpdate::Complete,
            )
            .await?;
            return Ok(None);
        }
        if task.attempts > task.max_attempts {
            let error = format!(
                "external call gave up after {} leases (the workers leasing it kept stopping before they finished)",
                task.max_attempts
            );
            warn!(run_id = %task.run_id, task_id = %task.lease.task_id, "{error}");
            let dead_letter = crate::worker::dead_letter_event(&task, &error);
            // A child run its parent told to fail fails instead of parking.
            let (transition, update) = match run::give_up(&state, &agent, dead_letter.clone()) {
                Some(transition) => (transition, TaskUpdate::Complete),
                None => (
                    run::Transition {
                        events: vec![dead_letter],
                        effects: Vec::new(),
                    },
                    TaskUpdate::DeadLetter { error },
                ),
            };
            self.settle(&task.lease, &state, &agent, transition, update)
                .await?;
            return Ok(None);
        }
        let Some(call) = call else {
            return Ok(None);
        };
        let arguments = call
            .arguments
            .clone()
            .unwrap_or_else(|| serde_json::from_str(&call.call.arguments).unwrap_or(Value::Null));
        Ok(Some(Leased {
            task_id: task.lease.task_id,
            lease_token: task.lease.token.to_string(),
            run_id: task.run_id,
            step: task.step,
            call_index: index,
            tool: call.call.name.clone(),
            arguments,
            idempotency_key: run::idempotency_key(task.run_id, task.step, index),
            traceparent: crate::trace::traceparent(
                task.run_id,
                crate::trace::call_span_id(task.run_id, task.step, index),
            ),
            attempt: task.attempts,
            max_attempts: task.max_attempts,
            lease_until: task.lease_until,
        }))
    }

    /// Extends a lease of a call of `tenant` by `lease_for` from now;
    /// returns the new expiry.
    pub async fn heartbeat(
        &self,
        tenant: &str,
        task_id: TaskId,
        token: i64,
        lease_for: Duration,
    ) -> Result<Millis, Error> {
        // The token alone proves the lease; the read proves the tenant.
        self.live(tenant, task_id, token).await?;
        let at = now();
        let until = at.saturating_add(lease_for.clamp(MIN_LEASE, MAX_LEASE).as_millis() as i64);
        let lease = Lease { task_id, token };
        match self.store.extend_lease(lease, until, at).await {
            Ok(()) => Ok(until),
            Err(StoreError::LeaseLost(id)) => Err(Error::Stale(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// Journals the result of a call of `tenant` (`output`: a string as
    /// is, other JSON as its text) and completes the task.
    pub async fn complete(
        &self,
        tenant: &str,
        task_id: TaskId,
        token: i64,
        output: &Value,
    ) -> Result<(), Error> {
        let text = match output {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        self.returned(tenant, task_id, token, clip(&text, MAX_OUTPUT_BYTES), false)
            .await
    }

    /// Reports a failed attempt: retried after the agent's backoff when
    /// `retryable` and attempts are left, else the error is the result.
    pub async fn fail(
        &self,
        tenant: &str,
        task_id: TaskId,
        token: i64,
        error: &str,
        retryable: bool,
    ) -> Result<Failed, Error> {
        let queued = self.live(tenant, task_id, token).await?;
        if retryable && queued.attempts < queued.max_attempts {
            let (state, agent, _) = self.load(queued.run_id).await?;
            let delay = agent
                .spec
                .retry
                .backoff
                .delay(queued.attempts, fastrand::f64());
            let at = now();
            let retry_at = at + delay.as_millis() as i64;
            debug!(run_id = %state.run_id, %task_id, attempt = queued.attempts, "external call failed, retrying");
            return match self
                .store
                .retry_later(Lease { task_id, token }, error, retry_at, at)
                .await
            {
                Ok(()) => {
                    crate::metrics::task_retried(TaskKind::External);
                    Ok(Failed::Retrying { retry_at })
                }
                Err(StoreError::LeaseLost(id)) => Err(Error::Stale(id)),
                Err(e) => Err(e.into()),
            };
        }
        let error = clip(&format!("error: {error}"), MAX_OUTPUT_BYTES);
        self.returned(tenant, task_id, token, error, true).await?;
        Ok(Failed::Returned)
    }

    /// The task's stored state, if `token` is its live lease and the call
    /// is `tenant`'s (another tenant's is as stale as an unknown lease).
    async fn live(
        &self,
        tenant: &str,
        task_id: TaskId,
        token: i64,
    ) -> Result<keel_store::Queued, Error> {
        match self.store.queued(task_id, now()).await? {
            Some(q) if q.lease_token == Some(token) && queue_tenant(&q.call.queue) == tenant => {
                Ok(q)
            }
            _ => Err(Error::Stale(task_id)),
        }
    }

    /// The run's state and agent, and its journal.
    async fn load(&self, run_id: RunId) -> Result<(State, Arc<Agent>, Vec<Recorded>), Error> {
        let events = self.store.events(run_id, 0, 1_000_000).await?;
        if events.is_empty() {
            return Err(StoreError::NotFound(format!("run {run_id}")).into());
        }
        let state = State::replay(run_id, &events);
        let agent = self
            .agents
            .get(&state.tenant, &state.agent, &state.version)
            .await?;
        Ok((state, agent, events))
    }

    /// Journals a result for the task's call and completes the task, again
    /// from a fresh fold when another result was journaled meanwhile.
    async fn returned(
        &self,
        tenant: &str,
        task_id: TaskId,
        token: i64,
        output: String,
        is_error: bool,
    ) -> Result<(), Error> {
        let lease = Lease { task_id, token };
        let mut conflicts = 0;
        loop {
            let queued = self.live(tenant, task_id, token).await?;
            let (state, agent, events) = self.load(queued.run_id).await?;
            let span = crate::trace::enabled()
                .then(|| {
                    let error = is_error.then_some(output.as_str());
                    worker_span(&events, &queued, &state.agent, error)
                })
                .flatten();
            let command = Command::ToolReturned {
                step: queued.step,
                call_index: queued.call.call_index,
                output: output.clone(),
                is_error,
            };
            // Refused: the run moved past the call (ended, or the call has
            // its result): nothing to journal, the task is done.
            let transition = run::handle(&state, &agent, command).unwrap_or_default();
            let journaled = !transition.events.is_empty();
            match self
                .settle(&lease, &state, &agent, transition, TaskUpdate::Complete)
                .await
            {
                Err(Error::Store(StoreError::SeqConflict { .. })) if conflicts < CONFLICTS => {
                    conflicts += 1;
                }
                Ok(()) => {
                    if journaled && let Some(span) = span {
                        crate::trace::record(span);
                    }
                    return Ok(());
                }
                other => return other,
            }
        }
    }

    /// Commits `transition` under the lease, with the tasks it causes
    /// (left in the queue for any worker) and its callbacks.
    async fn settle(
        &self,
        lease: &Lease,
        state: &State,
        agent: &Agent,
        transition: run::Transition,
        update: TaskUpdate,
    ) -> Result<(), Error> {
        let at = now();
        let terminal = transition.events.iter().any(Event::stops_steps);
        let mut tasks = new_tasks(agent, state, &transition, None, at);
        tasks.extend(callback::tasks(state, &transition.events, at));
        let mut next = state.clone();
        for event in &transition.events {
            next.apply_next(event, at);
        }
        let append = Append {
            run_id: state.run_id,
            expected_seq: state.seq,
            events: transition.events,
            lease: Some(*lease),
            task: update,
            new_tasks: tasks,
            clear_tasks: terminal,
            redrive: None,
            projection: projection(&next),
            now: at,
            spawn: Vec::new(),
            // A run that stops wakes its parent and cancels its children.
            wake: if terminal {
                crate::linked_tasks(&next, at)
            } else {
                Vec::new()
            },
        };
        let tally = crate::metrics::Tally::of(&state.tenant, &state.agent, &append);
        match self.store.append(append).await {
            Ok(_) => {
                if tally.ends_run() {
                    crate::trace::run_ended(&next);
                }
                tally.record();
                Ok(())
            }
            Err(StoreError::LeaseLost(id)) => Err(Error::Stale(id)),
            Err(e) => Err(e.into()),
        }
    }
}

/// The span of an external worker's call, ended now by its result
/// (`error`: when the result is an error): from the call's
/// `ToolCallStarted` (queued for the workers), its attempts included. Its
/// id is derived from the call, so the `traceparent` every lease of it
/// handed out names it.
fn worker_span(
    events: &[Recorded],
    queued: &keel_store::Queued,
    agent: &str,
    error: Option<&str>,
) -> Option<crate::trace::Span> {
    use crate::trace::{Kind, Span};
    let step = queued.step;
    let call_index = queued.call.call_index;
    let (at, tool, key) = events.iter().rev().find_map(|r| match &r.event {
        Event::ToolCallStarted {
            step: s,
            call_index: c,
            tool,
            idempotency_key,
            ..
        } if *s == step && *c == call_index => Some((r.at, tool, idempotency_key)),
        _ => None,
    })?;
    let run_id = queued.run_id;
    let mut span = Span::child(
        run_id,
        crate::trace::call_span_id(run_id, step, call_index),
        format!("tool {tool}"),
        Kind::Client,
        crate::trace::ms_to_ns(at),
    );
    span.end_ns = crate::trace::now_ns();
    span.error = error.map(|e| clip(e, 256));
    span.set("keel.run_id", run_id.to_string());
    span.set("keel.agent", agent);
    span.set("keel.step", step);
    span.set("keel.call_index", call_index);
    span.set("keel.attempt", queued.attempts);
    span.set("keel.tool.kind", "worker");
    span.set("keel.idempotency_key", key.as_str());
    Some(span)
}
