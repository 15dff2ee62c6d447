//! The worker pool: claims tasks, drives runs, keeps leases alive.
//!
//! A task names a run, a kind (`llm`, `tools`, `approval`, `notify`,
//! `children`, `cancel`, `callback`, `compensate` or `deadline`) and a step
//! (a compensation's position, for `compensate`). Driving it means: fold the
//! run's journal, turn what the outside world answered into a [`Command`],
//! let the pure state machine decide, and commit the events and the tasks
//! they cause in one fenced, conditional append. The task the append creates
//! is leased to this worker on creation, so a run goes from step to step
//! without a round trip through the queue; another worker only takes a
//! task over when this one died (its lease expired) or gave it back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use keel_core::config::{Config, tenant_violations};
use keel_core::ids::DEFAULT_TENANT;

use crate::net::{Clients, Egress};
use keel_core::message::Usage;
use keel_core::run::{self, ChildOutcome, ChildRun, Command, Effect, Invocation, State, Status};
use keel_core::spec::{ModelSpec, redact_url};
use keel_core::{Agent, Event, Millis, RunId};
use keel_store::{
    Append, Error as StoreError, Lease, LeaseTo, NewTask, Projection, RunTask, Store, Submission,
    Task, TaskKind, TaskUpdate,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agents::Agents;
use crate::callback;
use crate::gateway::{Admission, Breakers, Gateway};
use crate::llm;
use crate::mcp::Mcp;
use crate::metrics;
use crate::now;
use crate::tools::Tools;
use crate::webhook::{self, Webhooks};

/// Most events a run's journal may be folded from (far above any real run).
const MAX_EVENTS: u32 = 1_000_000;

/// How the worker pool behaves.
#[derive(Clone)]
pub struct Options {
    /// Tasks executed at once (LLM calls are I/O waits, so this can be large).
    pub workers: usize,
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
    /// How often this process extends its leases.
    pub heartbeat: Duration,
    /// Longest an idle dispatcher sleeps before looking for due tasks anyway.
    pub poll: Duration,
    /// Most tasks claimed in one store round trip.
    pub claim_batch: u32,
    /// How long shutdown waits for in-flight tasks before giving them back.
    pub drain: Duration,
    /// The server's configuration: prices, rate limits and circuit breakers
    /// of the LLM providers.
    pub config: Arc<Config>,
    /// The circuit breakers of this process (shared with the API, which
    /// shows them).
    pub breakers: Breakers,
    /// Secret signing webhook notifications (`Keel-Signature`); unsigned when `None`.
    pub webhook_secret: Option<String>,
    /// Each tenant's own webhook secret, by tenant name.
    pub tenant_webhook_secrets: std::collections::HashMap<String, String>,
}

/// Shows whether there is a webhook secret, never the secret.
impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("workers", &self.workers)
            .field("lease", &self.lease)
            .field("heartbeat", &self.heartbeat)
            .field("poll", &self.poll)
            .field("claim_batch", &self.claim_batch)
            .field("drain", &self.drain)
            .field("webhook_secret", &self.webhook_secret.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 256,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            poll: Duration::from_secs(1),
            claim_batch: 256,
            drain: Duration::from_secs(10),
            config: Arc::default(),
            breakers: Breakers::default(),
            webhook_secret: None,
            tenant_webhook_secrets: std::collections::HashMap::new(),
        }
    }
}

/// The worker pool of one process.
pub struct Engine<S> {
    inner: Arc<Inner<S>>,
}

impl<S> Clone for Engine<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S> {
    store: S,
    agents: Agents<S>,
    llm: llm::Client,
    /// The same over the client that reaches public addresses only, for
    /// models at an endpoint a tenant's spec chose (net.rs).
    llm_public: llm::Client,
    gateway: Gateway<S>,
    tools: Tools,
    webhooks: Webhooks,
    /// The MCP servers of the configuration, supervised while the pool runs.
    mcp: Mcp,
    http: reqwest::Client,
    options: Options,
    /// This process's worker id: the owner of its leases.
    owner: String,
    /// The leases of the tasks being driven: the ones the heartbeat extends.
    driving: Mutex<HashSet<Lease>>,
    /// Leases of tasks nobody drives that could not be given back while the
    /// store was unavailable; the heartbeat task gives them back.
    stranded: Mutex<Vec<Stranded>>,
}

/// Locks a mutex that no holder can leave inconsistent (its holders only
/// insert, remove or take).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lease of the task a driver works on, extended by the heartbeat while
/// this lives.
struct Driving<'a, S> {
    inner: &'a Inner<S>,
    lease: Lease,
}

impl<'a, S> Driving<'a, S> {
    fn new(inner: &'a Inner<S>, lease: Lease) -> Self {
        lock(&inner.driving).insert(lease);
        Driving { inner, lease }
    }

    /// Goes on with the next task's lease.
    fn switch(&mut self, lease: Lease) {
        let mut driving = lock(&self.inner.driving);
        driving.remove(&self.lease);
        driving.insert(lease);
        self.lease = lease;
    }
}

impl<S> Drop for Driving<'_, S> {
    fn drop(&mut self) {
        lock(&self.inner.driving).remove(&self.lease);
    }
}

/// A lease of a task this process does not drive, to give back as soon as
/// the store answers rather than leave the task waiting for the lease to
/// expire.
struct Stranded {
    run_id: RunId,
    lease: Lease,
    /// Recorded as the task's last error.
    reason: String,
}

/// What a driven task leads to.
enum Next {
    /// The task is settled (completed, dead-lettered or given back to retry later).
    Done,
    /// The task could not be settled: give it back so it is driven again from
    /// the journal (this process's heartbeat would otherwise keep it leased).
    Abandon(String),
    /// Go on with a task leased on creation; for a `tools` task, the
    /// invocations whose `ToolCallStarted` were committed with it.
    Continue(Task, Vec<Invocation>),
}

impl<S: Store> Engine<S> {
    /// An engine over `store`.
    pub fn new(store: S, options: Options) -> Self {
        let clients = Clients::build(|| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(options.workers.max(16))
                // Secrets ride in headers and URLs: no Referer, and no redirect
                // to another origin (tools follow those themselves, without them).
                .referer(false)
                .redirect(crate::tools::redirect_policy())
        });
        let http = clients.any.clone();
        let mcp = Mcp::new(&options.config);
        Self {
            inner: Arc::new(Inner {
                agents: Agents::new(store.clone()),
                gateway: Gateway::new(
                    store.clone(),
                    options.config.clone(),
                    options.breakers.clone(),
                ),
                store,
                llm: llm::Client::new(http.clone()),
                llm_public: llm::Client::new(clients.public.clone()),
                tools: Tools::new(clients.clone()).with_mcp(mcp.clone()),
                mcp,
                webhooks: Webhooks::new(
                    clients,
                    options.webhook_secret.as_deref(),
                    &options.tenant_webhook_secrets,
                ),
                http,
                owner: format!("worker-{}", uuid::Uuid::now_v7()),
                options,
                driving: Mutex::default(),
                stranded: Mutex::default(),
            }),
        }
    }

    /// This process's worker id.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Runs the pool until `cancel`, then stops claiming, lets in-flight tasks
    /// finish within `Options::drain` and gives back what is left.
    pub async fn run(self, cancel: CancellationToken) {
        let inner = self.inner;
        let tracker = TaskTracker::new();
        let heartbeat = tokio::spawn(heartbeat(inner.clone(), cancel.clone()));
        let slots = Arc::new(Semaphore::new(inner.options.workers));
        let mut commits = inner.store.subscribe();
        // MCP servers outlive the drain: in-flight tool calls may finish.
        let mcp_stop = CancellationToken::new();
        let mcp = tokio::spawn(inner.mcp.clone().run(inner.http.clone(), mcp_stop.clone()));
        info!(owner = %inner.owner, workers = inner.options.workers, "engine started");

        loop {
            // Wait for a free slot, then take as many as are free (up to a batch).
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => permit,
                _ = cancel.cancelled() => break,
            };
            let Ok(first) = first else { break };
            let mut permits = vec![first];
            while permits.len() < inner.options.claim_batch as usize {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            let asked = permits.len() as u32;
            // What was committed before this claim, the claim sees: only
            // commits announced from now on may wake the idle wait below
            // (the receiver fell behind while every slot was busy).
            commits = commits.resubscribe();
            let claimed = match inner
                .store
                .claim(&inner.owner, asked, inner.options.lease, now())
                .await
            {
                Ok(tasks) => tasks,
                Err(e) => {
                    warn!(error = %e, "claim failed");
                    Vec::new()
                }
            };
            let got = claimed.len() as u32;
            for (task, permit) in claimed.into_iter().zip(permits.drain(..)) {
                metrics::task_claimed(task.kind, task.attempts);
                let inner = inner.clone();
                let draining = cancel.clone();
                tracker.spawn(async move {
                    drive(&inner, task, Vec::new(), &draining).await;
                    drop(permit);
                });
            }
            drop(permits);
            if got == asked {
                continue;
            }
            // Idle: sleep until new work is committed, a task becomes due, or the poll.
            let wait = match inner.store.next_due(now()).await {
                Ok(Some(at)) => Duration::from_millis((at - now()).max(1) as u64),
                _ => inner.options.poll,
            }
            .min(inner.options.poll);
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    _ = cancel.cancelled() => break,
                    msg = commits.recv() => match msg {
                        Ok(c) if c.new_work => break,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                    },
                }
            }
        }

        tracker.close();
        if tokio::time::timeout(inner.options.drain, tracker.wait())
            .await
            .is_err()
        {
            warn!("drain deadline passed, giving in-flight tasks back");
        }
        match inner.store.release_all(&inner.owner, now()).await {
            Ok(n) if n > 0 => info!(released = n, "gave leases back"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not give leases back"),
        }
        heartbeat.abort();
        mcp_stop.cancel();
        let _ = mcp.await;
        info!(owner = %inner.owner, "engine stopped");
    }
}

/// Extends the leases of the tasks being driven until cancelled, and gives
/// back the stranded ones (see [`abandon`]) as soon as the store answers
/// again. A lease this process holds without knowing (a claim or an append
/// whose answer was lost) is not extended: it expires and the task is
/// taken over.
async fn heartbeat<S: Store>(inner: Arc<Inner<S>>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(inner.options.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = tokio::time::interval(ABANDON_DELAY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => extend_leases(&inner).await,
            _ = retry.tick() => give_back_stranded(&inner).await,
            _ = cancel.cancelled() => return,
        }
    }
}

/// Extends the leases of the tasks being driven.
async fn extend_leases<S: Store>(inner: &Inner<S>) {
    let leases: Vec<Lease> = lock(&inner.driving).iter().copied().collect();
    if leases.is_empty() {
        return;
    }
    let at = now();
    let until = at + inner.options.lease.as_millis() as i64;
    if let Err(e) = inner.store.heartbeat(&leases, until, at).await {
        warn!(error = %e, "heartbeat failed");
    }
}

/// Gives back the stranded leases, until the store is found unavailable
/// again: the rest wait for the next try.
async fn give_back_stranded<S: Store>(inner: &Inner<S>) {
    let mut left = std::mem::take(&mut *lock(&inner.stranded));
    while let Some(stranded) = left.pop() {
        if let Some(stranded) = give_back(inner, stranded).await {
            left.push(stranded);
            break;
        }
    }
    if !left.is_empty() {
        debug!(
            leases = left.len(),
            "store unavailable, giving leases back later"
        );
        lock(&inner.stranded).append(&mut left);
    }
}

/// Keeps a lease for the heartbeat task to give back.
fn strand<S>(inner: &Inner<S>, stranded: Stranded) {
    debug!(run_id = %stranded.run_id, task_id = %stranded.lease.task_id, "lease stranded");
    lock(&inner.stranded).push(stranded);
}

/// Drives a task and whatever tasks it leads to, until the run parks, ends or
/// the lease is lost.
///
/// Once `draining` is cancelled (shutdown), the driver stops at the next task
/// boundary: the task it would go on with stays leased to this process and is
/// given back by `Store::release_all` when the pool stops, so another worker
/// takes it at once instead of after the lease expires.
async fn drive<S: Store>(
    inner: &Inner<S>,
    mut task: Task,
    mut invocations: Vec<Invocation>,
    draining: &CancellationToken,
) {
    let mut state: Option<State> = None;
    let mut conflicts = 0;
    let mut driving = Driving::new(inner, task.lease);
    loop {
        let run_id = task.run_id;
        let outcome = step(inner, &mut state, &task, std::mem::take(&mut invocations)).await;
        match outcome {
            Ok(Next::Done) => return,
            Ok(Next::Abandon(reason)) => return abandon(inner, &task, &reason).await,
            Ok(Next::Continue(_, _)) if draining.is_cancelled() => {
                debug!(%run_id, "draining: leaving the next task to another worker");
                return;
            }
            Ok(Next::Continue(next, next_invocations)) => {
                task = next;
                driving.switch(task.lease);
                invocations = next_invocations;
                conflicts = 0;
            }
            Err(StoreError::SeqConflict { .. }) if conflicts < 5 => {
                // Someone else appended (a cancel): fold again and decide again.
                debug!(%run_id, "journal moved on, reloading");
                conflicts += 1;
                state = None;
            }
            Err(StoreError::LeaseLost(task_id)) => {
                debug!(%run_id, %task_id, "lease lost, stopping");
                return;
            }
            Err(StoreError::Corrupt(why)) if task.attempts >= task.max_attempts => {
                return park_undecodable(inner, &task, &why).await;
            }
            Err(e) => {
                warn!(%run_id, error = %e, "task failed on the store");
                return abandon(inner, &task, &e.to_string()).await;
            }
        }
    }
}

/// How long an abandoned task waits before it is driven again.
const ABANDON_DELAY: Duration = Duration::from_secs(1);

/// Gives a task back to the queue (fenced). While the store is unavailable
/// its lease is stranded: the heartbeat task gives it back as soon as the
/// store answers again, so the task does not wait for the lease to expire.
async fn abandon<S: Store>(inner: &Inner<S>, task: &Task, reason: &str) {
    let stranded = Stranded {
        run_id: task.run_id,
        lease: task.lease,
        reason: reason.to_string(),
    };
    if let Some(stranded) = give_back(inner, stranded).await {
        strand(inner, stranded);
    }
}

/// Gives a lease back to the queue, due after [`ABANDON_DELAY`]; returns
/// it when the store is unavailable.
async fn give_back<S: Store>(inner: &Inner<S>, stranded: Stranded) -> Option<Stranded> {
    let at = now();
    let retry_at = at + ABANDON_DELAY.as_millis() as i64;
    let given = inner
        .store
        .retry_later(stranded.lease, &stranded.reason, retry_at, at)
        .await;
    match given {
        Ok(()) => None,
        Err(StoreError::Unavailable(_)) => Some(stranded),
        // Settled or taken over meanwhile, or never created (a commit that
        // did not go through): nothing to give back.
        Err(StoreError::LeaseLost(_)) => None,
        Err(e) => {
            warn!(run_id = %stranded.run_id, error = %e, "could not give an abandoned task back");
            None
        }
    }
}

/// Dead-letters a task that failed on stored data that does not decode (its
/// run's journal, its agent version) on its last attempt: it would fail
/// the same way until the data is repaired, then it is re-driven. The run
/// cannot be folded, so its row's projection is kept, with the reason.
async fn park_undecodable<S: Store>(inner: &Inner<S>, task: &Task, why: &str) {
    let error = format!("stored data does not decode: {why}");
    warn!(run_id = %task.run_id, kind = task.kind.as_str(), step = task.step, attempts = task.attempts, error = %error, "task dead-lettered");
    let run = match inner.store.get_run(task.run_id).await {
        Ok(Some(run)) => run,
        Ok(None) => return abandon(inner, task, &error).await,
        Err(e) => return abandon(inner, task, &e.to_string()).await,
    };
    let mut projection = run.projection;
    projection.error = Some(format!("task dead-lettered: {error}"));
    let append = Append {
        run_id: task.run_id,
        expected_seq: run.last_seq,
        events: vec![dead_letter_event(task, &error)],
        lease: Some(task.lease),
        task: TaskUpdate::DeadLetter {
            error: error.clone(),
        },
        new_tasks: Vec::new(),
        clear_tasks: false,
        redrive: None,
        projection,
        now: now(),
        spawn: Vec::new(),
        wake: Vec::new(),
    };
    let tally = metrics::Tally::of(&run.tenant, &run.agent, &append);
    match inner.store.append(append).await {
        Ok(_) => tally.record(),
        Err(e) => {
            warn!(run_id = %task.run_id, error = %e, "could not dead-letter the task");
            abandon(inner, task, &error).await;
        }
    }
}

/// The span of one LLM request, ended now.
fn llm_span(
    span_id: u64,
    provider: &str,
    model: &str,
    state: &State,
    task: &Task,
    result: &Result<llm::Response, llm::Error>,
    started_ns: u64,
) -> crate::trace::Span {
    use crate::trace::{Kind, Span};
    let mut span = Span::child(
        state.run_id,
        span_id,
        format!("llm {provider}/{model}"),
        Kind::Client,
        started_ns,
    );
    span.end_ns = crate::trace::now_ns();
    span.set("gen_ai.operation.name", "chat");
    span.set("gen_ai.system", provider);
    span.set("gen_ai.request.model", model);
    match result {
        Ok(response) => {
            span.set("gen_ai.response.model", response.model.as_str());
            span.set("gen_ai.usage.input_tokens", response.usage.input_tokens);
            span.set("gen_ai.usage.output_tokens", response.usage.output_tokens);
        }
        Err(e) => span.error = Some(e.to_string()),
    }
    span.set("keel.run_id", state.run_id.to_string());
    span.set("keel.agent", state.agent.as_str());
    span.set("keel.step", task.step);
    span.set("keel.attempt", task.attempts);
    span.set("keel.outcome", metrics::llm_outcome(result));
    span
}

/// What a call of `model` cost, if the configuration prices it
/// (by the provider and model the spec names, not the snapshot name a
/// provider answers with).
fn cost(config: &Config, provider: &str, model: &ModelSpec, usage: Usage) -> Option<f64> {
    let price = config.model(provider, &model.model)?.price?;
    Some(price.cost(usage.input_tokens, usage.output_tokens))
}

/// The run row's summary of a state, written with every append.
pub fn projection(state: &State) -> Projection {
    let error = match (&state.error, &state.parked) {
        (Some(e), _) => Some(e.clone()),
        (None, Some(p)) => Some(format!("task dead-lettered: {}", p.error)),
        (None, None) => None,
    };
    Projection {
        status: state.status,
        steps: state.steps,
        output: state.output.clone(),
        error,
        usage: state.usage,
        cost_usd: state.cost_usd,
    }
}

/// Folds a run's journal.
async fn load<S: Store>(store: &S, run_id: RunId) -> Result<State, StoreError> {
    let events = store.events(run_id, 0, MAX_EVENTS).await?;
    if events.is_empty() {
        return Err(StoreError::NotFound(format!("run {run_id}")));
    }
    Ok(State::replay(run_id, &events))
}

/// Where a call of `tenant`'s run to `model` may go: a configured
/// provider's endpoint is the operator's and reached as such; an endpoint
/// the spec chose follows the tenant's egress, an address written in it
/// checked now (a name is checked as it resolves).
fn model_egress(config: &Config, tenant: &str, model: &ModelSpec) -> Result<Egress, String> {
    let egress = Egress::of(config, tenant);
    let Some(url) = &model.base_url else {
        // The protocol's public default endpoint.
        return Ok(egress);
    };
    if egress == Egress::Any || config.providers.values().any(|p| p.base_url() == url) {
        return Ok(Egress::Any);
    }
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("`{}` is not a URL: {e}", redact_url(url)))?;
    crate::net::check_url(&parsed).map_err(|e| format!("the model at {}: {e}", redact_url(url)))?;
    Ok(Egress::Public)
}

/// One task, one decision, one commit.
async fn step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    invocations: Vec<Invocation>,
) -> Result<Next, StoreError> {
    let state = match slot {
        Some(state) if state.run_id == task.run_id => state,
        _ => slot.insert(load(&inner.store, task.run_id).await?),
    };
    let agent = inner
        .agents
        .get(&state.tenant, &state.agent, &state.version)
        .await?;
    // With the MCP tools its allow lists let through, as last listed.
    let (agent, unlisted) = inner.mcp.resolve(agent).await;
    let at = now();

    if task.kind == TaskKind::Callback {
        // Reports the run's end too: it runs after the run is over.
        return callback_step(inner, slot, task).await;
    }
    if state.status.is_terminal() {
        return finish_stale(inner, slot, task).await;
    }
    // Registration refused a spec its tenant may not run; the policy may
    // have tightened since (a restart with a new configuration).
    let violations = tenant_violations(&inner.options.config, &state.tenant, &agent.spec);
    if let Some(first) = violations.first() {
        let error = format!(
            "agent `{}` version {} breaks its tenant's policy: {first}",
            agent.spec.name, agent.spec.version
        );
        return give_up(inner, slot, task, &agent, error).await;
    }
    // A compensation whose workers kept dying is failed, not parked: the
    // others must still run (compensate_step).
    if task.attempts > task.max_attempts && task.kind != TaskKind::Compensate {
        let error = format!(
            "{} task gave up after {} attempts (the worker running it kept dying)",
            task.kind.as_str(),
            task.max_attempts
        );
        return give_up(inner, slot, task, &agent, error).await;
    }
    if run::expired(state, &agent, at) {
        let transition = handle(state, &agent, Command::Expire);
        // The run may compensate before it ends.
        let new_tasks = follow_up_tasks(inner, &agent, state, &transition);
        return commit(
            inner,
            slot,
            task,
            transition,
            TaskUpdate::Complete,
            new_tasks,
            true,
        )
        .await;
    }

    match task.kind {
        TaskKind::Llm => llm_step(inner, slot, task, &agent, unlisted).await,
        TaskKind::Tools => tools_step(inner, slot, task, &agent, invocations).await,
        TaskKind::Approval => approval_step(inner, slot, task, &agent).await,
        TaskKind::Notify => notify_step(inner, slot, task, &agent).await,
        TaskKind::Children => children_step(inner, slot, task, &agent).await,
        TaskKind::Cancel => cancel_step(inner, slot, task, &agent).await,
        // Leased by external workers over the API, never claimed here; a
        // callback is not created yet.
        TaskKind::External => finish_stale(inner, slot, task).await,
        TaskKind::Callback => callback_step(inner, slot, task).await,
        TaskKind::Compensate => compensate_step(inner, slot, task, &agent).await,
        TaskKind::Deadline => deadline_step(inner, slot, task, &agent).await,
    }
}

/// Applies a command the driver built from the current state. A rejection here
/// is a bug in the driver, not bad data: it is logged and nothing is written.
fn handle(state: &State, agent: &Agent, command: Command) -> run::Transition {
    match run::handle(state, agent, command) {
        Ok(t) => t,
        Err(e) => {
            warn!(run_id = %state.run_id, error = %e, "state machine refused a command");
            run::Transition::default()
        }
    }
}

async fn llm_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    unlisted: Option<String>,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let awaiting = matches!(state.status, Status::Pending | Status::AwaitingLlm);
    if !awaiting || state.steps + 1 != task.step {
        return finish_stale(inner, slot, task).await;
    }
    if let Some(message) = unlisted {
        // The model must not be asked without tools it may use: wait for
        // the server like for a failing provider.
        return retry_later(inner, slot, task, agent, "tools unavailable", message, None).await;
    }
    let ticket = match inner.gateway.admit(agent, state, now()).await? {
        Admission::Go(ticket) => ticket,
        Admission::Later {
            until,
            reason,
            breakers_open,
        } => {
            // No capacity or no working endpoint yet: the run waits in the
            // queue, holding no worker, and the wait counts no attempt.
            debug!(run_id = %task.run_id, step = task.step, until, %reason, "llm call deferred");
            let spec = &agent.spec.model;
            metrics::llm_deferred(spec.provider.name(), &spec.model, breakers_open);
            if breakers_open && state.breaker_parked != Some(task.step) {
                // Stuck, not just throttled: journaled once per wait, so
                // callbacks and event streams say so.
                let parked = run::Transition {
                    events: vec![Event::LlmParked {
                        step: task.step,
                        reason: reason.clone(),
                        until,
                    }],
                    effects: Vec::new(),
                };
                // (`commit` adds the callback.)
                commit(
                    inner,
                    slot,
                    task,
                    parked,
                    TaskUpdate::Keep,
                    Vec::new(),
                    false,
                )
                .await?;
            }
            inner.store.defer(task.lease, until, &reason, now()).await?;
            return Ok(Next::Done);
        }
    };
    if let Some(at) = ticket.wait_until {
        let wait = at.saturating_sub(now()).max(0);
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let model = ticket.model.as_ref();
    let started = std::time::Instant::now();
    let started_ns = crate::trace::now_ns();
    // The request's traceparent names the call's span.
    let span_id = crate::trace::span_id();
    let result = crate::trace::within(span_id, async {
        let llm = match model_egress(&inner.options.config, &state.tenant, model) {
            Err(message) => return Err(llm::Error::Permanent { message }),
            Ok(Egress::Any) => &inner.llm,
            Ok(Egress::Public) => &inner.llm_public,
        };
        if agent.spec.model.stream {
            crate::deltas::stream(llm, &inner.store, model, agent, state, task).await
        } else {
            llm.complete_with(model, agent, state, task.step).await
        }
    })
    .await;
    let cost_usd = result.as_ref().ok().and_then(|response| {
        cost(
            &inner.options.config,
            &ticket.provider,
            model,
            response.usage,
        )
    });
    metrics::llm_request(&metrics::LlmCall {
        provider: &ticket.provider,
        model: &model.model,
        result: &result,
        elapsed: started.elapsed(),
        cost_usd,
    });
    if crate::trace::enabled() {
        crate::trace::record(llm_span(
            span_id,
            &ticket.provider,
            &model.model,
            state,
            task,
            &result,
            started_ns,
        ));
    }
    inner.gateway.settle(&ticket, &result, now()).await;
    let response = match result {
        Ok(r) => r,
        Err(e) if e.is_throttled() => {
            // The provider's own rate limit: the gateway holds the model's
            // buckets until then; the call did not fail, no attempt counts.
            let at = now();
            // Within the retry policy's longest wait (a provider may ask for
            // hours; the run's own timeout still applies).
            let cap = agent.spec.retry.backoff.max.max(Duration::from_secs(1));
            let wait = e.retry_after().unwrap_or(Duration::from_secs(1)).min(cap);
            let until = at.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            warn!(run_id = %task.run_id, step = task.step, error = %e, "llm provider throttled the call, deferring");
            inner
                .store
                .defer(task.lease, until, &e.to_string(), at)
                .await?;
            return Ok(Next::Done);
        }
        Err(llm::Error::Transient {
            message,
            retry_after,
            ..
        }) => {
            return retry_later(
                inner,
                slot,
                task,
                agent,
                "llm call failed",
                message,
                retry_after,
            )
            .await;
        }
        Err(llm::Error::Permanent { message }) => {
            let error = format!("llm call failed: {message}");
            return give_up(inner, slot, task, agent, error).await;
        }
    };

    let mut transition = handle(
        state,
        agent,
        Command::LlmResponded {
            step: task.step,
            cost_usd,
            message: response.message,
            usage: response.usage,
            model: response.model,
        },
    );
    if transition.events.is_empty() {
        return finish_stale(inner, slot, task).await;
    }
    // When the answer asks for tools, journal their starts in the same commit.
    if let Some(Effect::CallTools { step }) = transition.effects.first().cloned() {
        let mut next = state.clone();
        for event in &transition.events {
            next.apply_next(event, now());
        }
        let start = handle(&next, agent, Command::StartTools { step });
        transition.events.extend(start.events);
        transition.effects.extend(start.effects);
    }
    settle(inner, slot, task, agent, transition).await
}

async fn tools_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    mut invocations: Vec<Invocation>,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    if state.status != Status::AwaitingTool || state.steps != task.step {
        return finish_stale(inner, slot, task).await;
    }
    // External workers' calls wait in their queues (created with the
    // starts): this task makes the others.
    let external = |inv: &Invocation| agent.queue_of(&inv.tool).is_some();
    if !invocations.is_empty() {
        invocations.retain(|inv| !external(inv));
        if invocations.is_empty() {
            return finish_stale(inner, slot, task).await;
        }
    } else {
        // Taken over or retried: journal a (new) start for every call without a
        // result. A call started before without a result may have happened: it
        // is repeated with the same idempotency key.
        let start = handle(state, agent, Command::StartTools { step: task.step });
        invocations = start
            .effects
            .iter()
            .filter_map(|e| match e {
                Effect::InvokeTool(inv) if !external(inv) => Some(inv.clone()),
                _ => None,
            })
            .collect();
        if invocations.is_empty() {
            if start.events.is_empty() {
                return finish_stale(inner, slot, task).await;
            }
            // An uncertain call's policy: the run parks for a human
            // (`ask`) or fails (`fail`), or every call is an external
            // worker's (queued with its start); this task is done.
            return settle(inner, slot, task, agent, start).await;
        }
        let queued = follow_up_tasks(inner, agent, state, &start);
        commit(inner, slot, task, start, TaskUpdate::Keep, queued, false).await?;
    }

    let run_id = task.run_id;
    let tenant = slot.as_ref().map(|s| s.tenant.clone()).unwrap_or_default();
    let tenant = tenant.as_str();
    let egress = Egress::of(&inner.options.config, tenant);
    let mut calls: FuturesUnordered<_> = invocations
        .into_iter()
        .map(|inv| async move {
            if agent.spawn_tool(&inv.tool).is_some() {
                // Made here: the child runs start in the commit.
                let versions = spawn_versions(inner, tenant, agent, &inv.arguments).await?;
                return Ok(Ok(Command::Spawn {
                    step: inv.step,
                    call_index: inv.call_index,
                    versions,
                }));
            }
            let outcome = inner.tools.invoke(agent, egress, run_id, &inv).await;
            if outcome.uncertain {
                // Cut off after it was sent: no result to journal.
                return Ok(Err(format!("call {}: {}", inv.call_index, outcome.output)));
            }
            Ok::<_, StoreError>(Ok(Command::ToolReturned {
                step: inv.step,
                call_index: inv.call_index,
                output: outcome.output,
                is_error: outcome.is_error,
            }))
        })
        .collect();
    let mut result = None;
    let mut uncertain = Vec::new();
    while let Some(command) = calls.next().await {
        match command? {
            Ok(command) => {
                if let Some(next) = journal_result(inner, slot, task, agent, command).await? {
                    result = Some(next);
                }
            }
            Err(why) => uncertain.push(why),
        }
    }
    if result.is_none() && !uncertain.is_empty() {
        // A call cut off mid-way keeps its start without a result, as if
        // this worker had died making it: the attempt fails, and the next
        // one applies the tool's on_uncertain (start_tools).
        let message = uncertain.join("; ");
        return retry_later(inner, slot, task, agent, "tool call cut off", message, None).await;
    }
    if result.is_none() && slot.as_ref().is_some_and(|s| waits_for_workers(s, agent)) {
        // The step waits for external workers' results: they settle it.
        return finish_stale(inner, slot, task).await;
    }
    // Every call returned but none settled the step: the fold and the calls
    // disagree (it cannot happen unless the journal changed under us). Drive
    // the task again from the journal.
    Ok(result.unwrap_or_else(|| Next::Abandon("tool results did not settle the step".into())))
}

/// The current version of each agent a `spawn_agents` call names, in task
/// order (`None`: not registered).
async fn spawn_versions<S: Store>(
    inner: &Inner<S>,
    tenant: &str,
    agent: &Agent,
    arguments: &serde_json::Value,
) -> Result<Vec<Option<String>>, StoreError> {
    let mut versions = Vec::new();
    for (name, _) in run::spawn_tasks(arguments) {
        let name = agent.spawned_name(&name);
        let record = inner.store.get_agent(tenant, name, None).await?;
        versions.push(record.map(|r| r.spec.version));
    }
    Ok(versions)
}

/// Whether a call of the current step waits in an external worker's queue.
fn waits_for_workers(state: &State, agent: &Agent) -> bool {
    state.status == Status::AwaitingTool
        && state.calls.iter().any(|c| {
            matches!(c.state, run::CallState::Started { .. })
                && agent.queue_of(&c.call.name).is_some()
        })
}

/// Journals one tool result; `Some` when it settled the step. When an
/// external worker's result was journaled meanwhile, folds again and
/// retries, so this result is not lost to the race.
async fn journal_result<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    command: Command,
) -> Result<Option<Next>, StoreError> {
    let mut conflicts = 0;
    loop {
        let state = match slot {
            Some(state) => state,
            None => slot.insert(load(&inner.store, task.run_id).await?),
        };
        let transition = handle(state, agent, command.clone());
        // Creating child runs goes on with the step; asking the model,
        // parking for the children or ending the run settles it.
        let terminal = transition.events.iter().any(Event::stops_steps);
        let settles = terminal
            || transition
                .effects
                .iter()
                .any(|e| !matches!(e, Effect::SpawnChildren(_)));
        let (update, new_tasks) = if settles {
            let new_tasks = follow_up_tasks(inner, agent, state, &transition);
            (TaskUpdate::Complete, new_tasks)
        } else {
            (TaskUpdate::Keep, Vec::new())
        };
        match commit(inner, slot, task, transition, update, new_tasks, terminal).await {
            Ok(next) => return Ok(settles.then_some(next)),
            Err(StoreError::SeqConflict { .. }) if conflicts < 5 => {
                // `commit` forgot the fold: the next turn reloads it.
                conflicts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Gives an `llm`, `tools` or `compensate` task back to be retried after
/// the agent's backoff (or the provider's `retry_after`, within the
/// policy's cap), or gives it up after its last attempt ([`give_up`]).
/// `what` names the failure.
async fn retry_later<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    what: &str,
    message: String,
    retry_after: Option<Duration>,
) -> Result<Next, StoreError> {
    if task.attempts >= task.max_attempts {
        let error = format!("{what} after {} attempts: {message}", task.attempts);
        return give_up(inner, slot, task, agent, error).await;
    }
    let backoff = agent
        .spec
        .retry
        .backoff
        .delay(task.attempts, fastrand::f64());
    // The provider's Retry-After wins over our backoff, within the policy's cap.
    let cap = agent.spec.retry.backoff.max;
    let delay = retry_after.map_or(backoff, |r| r.min(cap).max(backoff));
    warn!(run_id = %task.run_id, step = task.step, attempt = task.attempts, error = %message, "{what}, retrying");
    let at = now();
    inner
        .store
        .retry_later(task.lease, &message, at + delay.as_millis() as i64, at)
        .await?;
    metrics::task_retried(task.kind);
    Ok(Next::Done)
}

/// Tasks for the effects of a transition: the next LLM or tools task,
/// leased to this worker on creation; an approval timer and a notification,
/// left in the queue (due at the deadline, and now). All carry the run's
/// priority (they rank by it in the queue).
fn follow_up_tasks<S>(
    inner: &Inner<S>,
    agent: &Agent,
    state: &State,
    transition: &run::Transition,
) -> Vec<NewTask> {
    let at = now();
    let lease_to = Some(LeaseTo::new(
        inner.owner.clone(),
        at + inner.options.lease.as_millis() as i64,
    ));
    new_tasks(agent, state, transition, lease_to, at)
}

/// Tasks for the effects of a transition, the next LLM or tools task
/// leased to `lease_to`'s owner (`None`: left in the queue), each with a
/// lease of its own; an external worker's call goes to its queue.
pub(crate) fn new_tasks(
    agent: &Agent,
    state: &State,
    transition: &run::Transition,
    lease_to: Option<LeaseTo>,
    at: Millis,
) -> Vec<NewTask> {
    let lease = || {
        lease_to
            .as_ref()
            .map(|to| LeaseTo::new(to.owner.clone(), to.until))
    };
    let mut tasks = Vec::new();
    for effect in &transition.effects {
        let (kind, step, max_attempts, run_at, lease_to) = match effect {
            Effect::CallLlm { step } => (
                TaskKind::Llm,
                *step,
                agent.spec.retry.max_attempts,
                at,
                lease(),
            ),
            // Tool retries happen inside the call; the task's attempts only
            // count workers that died while making it.
            Effect::CallTools { step } => (
                TaskKind::Tools,
                *step,
                agent.spec.retry.max_attempts,
                at,
                lease(),
            ),
            Effect::AwaitApproval { step } => {
                let mut next = state.clone();
                for event in &transition.events {
                    next.apply_next(event, at);
                }
                let due = approval_due(&next, agent);
                (TaskKind::Approval, *step, TIMER_ATTEMPTS, due, None)
            }
            Effect::Notify { step } => (TaskKind::Notify, *step, webhook::MAX_ATTEMPTS, at, None),
            // Checks the children at once (leased to this worker), then
            // waits in the queue until the run's deadline as its timer.
            Effect::AwaitChildren { step } => {
                (TaskKind::Children, *step, TIMER_ATTEMPTS, at, lease())
            }
            Effect::InvokeTool(inv) => {
                if let Some(queue) = agent.queue_of(&inv.tool) {
                    tasks.push(crate::external::task(agent, state, inv, queue, at));
                    // Nobody may ever lease it: the run's timeout still applies.
                    if !tasks.iter().any(|t| t.kind == TaskKind::Deadline) {
                        tasks.push(deadline_timer(agent, state, inv.step));
                    }
                }
                continue;
            }
            // Retries of a compensating call happen inside it (its tool's
            // policy); the task's attempts only count workers that died.
            Effect::Compensate { index } => (
                TaskKind::Compensate,
                *index,
                agent.spec.retry.max_attempts,
                at,
                lease(),
            ),
            Effect::SpawnChildren(_) | Effect::InvokeCompensation(_) => continue,
        };
        tasks.push(NewTask {
            kind,
            step,
            priority: state.priority,
            max_attempts,
            run_at,
            lease_to,
            queue: None,
        });
    }
    tasks
}

/// Attempts of an approval timer (only a worker dying while it fires counts one).
const TIMER_ATTEMPTS: u32 = 10;

/// When a parked run's timer is due: the earliest deadline of its pending
/// approvals not escalated yet, or the run's own deadline (`limits.timeout`).
fn approval_due(state: &State, agent: &Agent) -> Millis {
    let run_deadline = run_deadline(state, agent);
    state
        .pending_approvals()
        .filter(|a| !a.escalated)
        .filter_map(|a| a.deadline)
        .min()
        .map_or(run_deadline, |d| d.min(run_deadline))
}

/// The timer of a run parked for approvals: applies the timeout policy to
/// the approvals past their deadline, or waits (deferred) until the next one.
async fn approval_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    if state.status != Status::AwaitingApproval || state.steps != task.step {
        // Decided before the deadline: nothing to time out.
        return finish_stale(inner, slot, task).await;
    }
    let at = now();
    let transition = handle(state, agent, Command::ApprovalTimeout { now: at });
    // Early (a clock skew between processes, or a deadline that moved):
    // it waits until it is due.
    let due = approval_due(state, agent);
    if !transition.events.is_empty() {
        info!(run_id = %task.run_id, step = task.step, "approval timed out, applying approvals.on_timeout");
    }
    settle_or_wait(
        inner,
        slot,
        task,
        agent,
        transition,
        due,
        "waiting for an approval decision",
    )
    .await
}

/// When a run's `limits.timeout` passes.
fn run_deadline(state: &State, agent: &Agent) -> Millis {
    let limit = i64::try_from(agent.spec.limits.timeout.as_millis()).unwrap_or(i64::MAX);
    state.created_at.saturating_add(limit)
}

/// The timer of a step whose calls wait in external workers' queues, due
/// at the run's deadline (no engine task of the run may run before then).
fn deadline_timer(agent: &Agent, state: &State, step: u32) -> NewTask {
    NewTask {
        kind: TaskKind::Deadline,
        step,
        priority: state.priority,
        max_attempts: TIMER_ATTEMPTS,
        run_at: run_deadline(state, agent),
        lease_to: None,
        queue: None,
    }
}

/// The deadline timer of a step waiting for external workers. Due, it
/// never gets here: like any task of an expired run it applies
/// `Command::Expire` (`step`), whose commit clears the run's tasks, the
/// queued calls included, so no worker leases them any more. Early (the
/// clocks of two processes differ), it waits until the deadline; once the
/// step has its results it has nothing left to do.
async fn deadline_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    if state.steps != task.step || !waits_for_workers(state, agent) {
        return finish_stale(inner, slot, task).await;
    }
    let deadline = run_deadline(state, agent);
    settle_or_wait(
        inner,
        slot,
        task,
        agent,
        run::Transition::default(),
        deadline,
        "waiting for external workers",
    )
    .await
}

/// Delivers the webhook notification of a step's pending approvals (none
/// left pending: nothing to say). A failed delivery is retried with
/// backoff, then dead-lettered.
async fn notify_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let at = now();
    let message = if state.status == Status::AwaitingApproval && state.steps == task.step {
        webhook::approvals(state, agent, at)
    } else {
        None
    };
    let Some((url, body)) = message else {
        return finish_stale(inner, slot, task).await;
    };
    deliver(inner, slot, task, &url, &body, at, "approval notification").await
}

/// POSTs the run's `callback_url` about the event at seq `task.step`; a
/// failed delivery is retried with backoff, then dead-lettered.
async fn callback_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let Some(url) = state.callback_url.clone() else {
        return finish_stale(inner, slot, task).await;
    };
    let seq = i64::from(task.step);
    let events = inner.store.events(task.run_id, seq - 1, 1).await?;
    let Some(event) = events.into_iter().find(|e| e.seq == seq) else {
        warn!(run_id = %task.run_id, seq, "callback names no journal event");
        return finish_stale(inner, slot, task).await;
    };
    let at = now();
    let body = callback::body(state, &event, at);
    deliver(inner, slot, task, &url, &body, at, "callback").await
}

/// POSTs a webhook (`what`: an approval notification, a callback) for its
/// task: done when delivered; a failure is retried with backoff, then
/// dead-lettered after the task's last attempt.
async fn deliver<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    url: &str,
    body: &serde_json::Value,
    at: Millis,
    what: &str,
) -> Result<Next, StoreError> {
    let delivery = task.lease.task_id.to_string();
    let tenant = slot.as_ref().map_or(DEFAULT_TENANT, |s| s.tenant.as_str());
    let egress = Egress::of(&inner.options.config, tenant);
    match inner
        .webhooks
        .deliver(tenant, egress, url, body, &delivery, at)
        .await
    {
        Ok(()) => {
            debug!(run_id = %task.run_id, step = task.step, url = %redact_url(url), "{what} delivered");
            finish_stale(inner, slot, task).await
        }
        Err(error) if task.attempts >= task.max_attempts => {
            let error = format!(
                "{what} not delivered after {} attempts: {error}",
                task.attempts
            );
            dead_letter(inner, slot, task, error).await
        }
        Err(error) => {
            warn!(run_id = %task.run_id, attempt = task.attempts, %error, "{what} failed, retrying");
            let at = now();
            let retry_at = at + webhook::backoff(task.attempts).as_millis() as i64;
            inner
                .store
                .retry_later(task.lease, &error, retry_at, at)
                .await?;
            Ok(Next::Done)
        }
    }
}

/// Makes compensation `task.step` of a `COMPENSATING` run: journals its
/// start (before the call: from then on it may have happened), calls the
/// tool with the compensation's idempotency key, then journals the outcome
/// with the next compensation's task, or the run's end, in one commit. A
/// start without an outcome (the worker died) is made again with the same
/// key; after the task's last attempt it is journaled as failed.
async fn compensate_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let index = task.step;
    let next = state.saga.as_ref().and_then(run::Saga::next);
    if state.status != Status::Compensating || next != Some(index) {
        return finish_stale(inner, slot, task).await;
    }
    let started = state
        .saga
        .as_ref()
        .and_then(|s| s.compensations.get(index as usize))
        .is_some_and(|c| matches!(c.state, run::CompensationState::Started { .. }));
    if started && task.attempts > task.max_attempts {
        let output = format!(
            "compensation gave up after {} attempts (the worker making it kept dying)",
            task.max_attempts
        );
        let transition = handle(
            state,
            agent,
            Command::CompensationReturned {
                index,
                output,
                is_error: true,
            },
        );
        return settle_compensation(inner, slot, task, agent, transition).await;
    }

    let start = handle(state, agent, Command::StartCompensation { index });
    let invocation = start.effects.iter().find_map(|e| match e {
        Effect::InvokeCompensation(inv) => Some(inv.clone()),
        _ => None,
    });
    let Some(invocation) = invocation else {
        // Failed without a call (its arguments could not be made).
        return settle_compensation(inner, slot, task, agent, start).await;
    };
    commit(
        inner,
        slot,
        task,
        start,
        TaskUpdate::Keep,
        Vec::new(),
        false,
    )
    .await?;
    info!(run_id = %task.run_id, index, tool = %invocation.tool, attempt = invocation.attempt, "compensating");
    let tenant = slot.as_ref().map_or(DEFAULT_TENANT, |s| s.tenant.as_str());
    let egress = Egress::of(&inner.options.config, tenant);
    let outcome = inner
        .tools
        .invoke(agent, egress, task.run_id, &invocation)
        .await;
    if outcome.uncertain && task.attempts < task.max_attempts {
        // Cut off mid-call: it may have happened. Made again later with the
        // same key, like after a crash (the last attempt's cut is a failure,
        // below: a compensation is never dead-lettered).
        let what = format!("compensation {index} cut off");
        return retry_later(inner, slot, task, agent, &what, outcome.output, None).await;
    }
    if outcome.is_error {
        warn!(run_id = %task.run_id, index, tool = %invocation.tool, error = %outcome.output, "compensation failed");
    }
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let transition = handle(
        state,
        agent,
        Command::CompensationReturned {
            index,
            output: outcome.output,
            is_error: outcome.is_error,
        },
    );
    let next = settle_compensation(inner, slot, task, agent, transition).await?;
    crate::failpoint::hit(crate::failpoint::COMPENSATION_DONE);
    Ok(next)
}

/// A timer task's turn: [`settle`] a transition that has events; with
/// none, the task waits in the queue until `until` (at least a second
/// from now), holding no worker.
async fn settle_or_wait<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    transition: run::Transition,
    until: Millis,
    reason: &str,
) -> Result<Next, StoreError> {
    if !transition.events.is_empty() {
        return settle(inner, slot, task, agent, transition).await;
    }
    let at = now();
    inner
        .store
        .defer(task.lease, until.max(at + 1_000), reason, at)
        .await?;
    Ok(Next::Done)
}

/// Commits a transition that settles `task`: completes it, with the tasks
/// its effects cause (the next one leased to this worker); one that stops
/// the run's steps (its end, or compensating) clears the run's other tasks.
async fn settle<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    transition: run::Transition,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let terminal = transition.events.iter().any(Event::stops_steps);
    let new_tasks = follow_up_tasks(inner, agent, state, &transition);
    commit(
        inner,
        slot,
        task,
        transition,
        TaskUpdate::Complete,
        new_tasks,
        terminal,
    )
    .await
}

/// Commits a compensation's outcome, completing its task, with the next
/// compensation's task (leased to this worker) or the run's end.
async fn settle_compensation<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    transition: run::Transition,
) -> Result<Next, StoreError> {
    if transition.events.is_empty() {
        return finish_stale(inner, slot, task).await;
    }
    settle(inner, slot, task, agent, transition).await
}

/// Commits a transition under the task's lease and says what comes next.
async fn commit<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    transition: run::Transition,
    update: TaskUpdate,
    new_tasks: Vec<NewTask>,
    clear_tasks: bool,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_mut() else {
        return Ok(Next::Done);
    };
    let expected_seq = state.seq;
    let at = now();
    let mut new_tasks = new_tasks;
    new_tasks.extend(callback::tasks(state, &transition.events, at));
    for event in &transition.events {
        state.apply_next(event, at);
    }
    let ended = transition.events.iter().any(Event::stops_steps);
    let mut spawn = Vec::new();
    for effect in &transition.effects {
        if let Effect::SpawnChildren(children) = effect {
            for child in children {
                spawn.push(child_submission(inner, state, child, at).await);
            }
        }
    }
    let wake = if ended {
        linked_tasks(state, at)
    } else {
        Vec::new()
    };
    let leased: Vec<Lease> = new_tasks
        .iter()
        .filter_map(|t| t.lease_to.as_ref().map(|to| to.lease))
        .collect();
    let append = Append {
        run_id: task.run_id,
        expected_seq,
        events: transition.events,
        lease: Some(task.lease),
        task: update,
        new_tasks,
        clear_tasks,
        redrive: None,
        projection: projection(state),
        now: at,
        spawn,
        wake,
    };
    let tally = metrics::Tally::of(&state.tenant, &state.agent, &append);
    let appended = match inner.store.append(append).await {
        Ok(a) => {
            if tally.ends_run() {
                crate::trace::run_ended(state);
            }
            tally.record();
            a
        }
        Err(e) => {
            // The in-memory fold ran ahead of the journal: forget it.
            *slot = None;
            // Cut off while committing, the append may have gone through:
            // the tasks it leased to this worker would then exist, driven
            // by nobody.
            if matches!(e, StoreError::Unavailable(_)) {
                let run_id = task.run_id;
                for lease in leased {
                    let reason = "the commit creating it was cut off".to_string();
                    strand(
                        inner,
                        Stranded {
                            run_id,
                            lease,
                            reason,
                        },
                    );
                }
            }
            return Err(e);
        }
    };
    let invocations: Vec<Invocation> = transition
        .effects
        .into_iter()
        .filter_map(|e| match e {
            Effect::InvokeTool(inv) => Some(inv),
            _ => None,
        })
        .collect();
    match appended.leased.into_iter().next() {
        Some(next) => Ok(Next::Continue(next, invocations)),
        None => Ok(Next::Done),
    }
}

/// A child run as a submission made by its parent's commit: same tenant
/// and priority, pinned to the version the spawn resolved.
async fn child_submission<S: Store>(
    inner: &Inner<S>,
    parent: &State,
    child: &ChildRun,
    at: Millis,
) -> Submission {
    // The child's own retry policy; its version was just read, so this
    // only fails when the store does: then the default applies.
    let max_attempts = match inner
        .agents
        .get(&parent.tenant, &child.agent, &child.version)
        .await
    {
        Ok(agent) => agent.spec.retry.max_attempts,
        Err(e) => {
            warn!(run_id = %parent.run_id, child = %child.run_id, error = %e, "child agent not readable, default retry policy");
            keel_core::spec::RetryPolicy::default().max_attempts
        }
    };
    Submission {
        run_id: child.run_id,
        tenant: parent.tenant.clone(),
        agent: child.agent.clone(),
        version: child.version.clone(),
        input: child.input.clone(),
        priority: parent.priority,
        idempotency_key: None,
        event: Event::RunSubmitted {
            tenant: parent.tenant.clone(),
            agent: child.agent.clone(),
            version: child.version.clone(),
            input: child.input.clone(),
            priority: parent.priority,
            parent: Some(child.parent.clone()),
            callback_url: None,
        },
        task: NewTask {
            kind: TaskKind::Llm,
            step: 1,
            priority: parent.priority,
            max_attempts,
            run_at: at,
            lease_to: None,
            queue: None,
        },
        now: at,
    }
}

/// The tasks for other runs that a run's end causes (`state`: after its
/// terminal event): its parent, if it is a child run, checks its children
/// again; its children still running are cancelled (each cancels its own).
pub fn linked_tasks(state: &State, at: Millis) -> Vec<RunTask> {
    let mut tasks = Vec::new();
    if let Some(parent) = &state.parent {
        tasks.push(RunTask {
            run_id: parent.run_id,
            task: NewTask {
                kind: TaskKind::Children,
                step: parent.step,
                priority: state.priority,
                max_attempts: TIMER_ATTEMPTS,
                run_at: at,
                lease_to: None,
                queue: None,
            },
        });
    }
    for child in state.live_children() {
        tasks.push(RunTask {
            run_id: child.run_id,
            task: NewTask {
                kind: TaskKind::Cancel,
                step: 0,
                priority: state.priority,
                max_attempts: TIMER_ATTEMPTS,
                run_at: at,
                lease_to: None,
                queue: None,
            },
        });
    }
    tasks
}

/// A run parked for its children checks them: every `spawn_agents` call
/// whose children are all over gets its fan-in; if none is ready the task
/// waits in the queue until the run's deadline (its timer), holding no
/// worker; the last child to finish queues another check.
async fn children_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    if state.status != Status::AwaitingChildren || state.steps != task.step {
        return finish_stale(inner, slot, task).await;
    }
    let mut outcomes = Vec::new();
    for child in state.live_children() {
        let Some(row) = inner.store.get_run(child.run_id).await? else {
            warn!(run_id = %task.run_id, child = %child.run_id, "child run not found");
            continue;
        };
        outcomes.push(ChildOutcome {
            run_id: child.run_id,
            status: row.projection.status,
            output: row.projection.output,
            error: row.projection.error,
        });
    }
    let transition = handle(
        state,
        agent,
        Command::JoinChildren {
            step: task.step,
            outcomes,
        },
    );
    // None over yet: the task waits as the run's deadline timer.
    let deadline = run_deadline(state, agent);
    if !transition.events.is_empty() {
        info!(run_id = %task.run_id, step = task.step, "child runs over, fan-in");
    }
    settle_or_wait(
        inner,
        slot,
        task,
        agent,
        transition,
        deadline,
        "waiting for child runs",
    )
    .await
}

/// A child run whose parent ended while it ran is cancelled.
async fn cancel_step<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let parent = state.parent.as_ref().map_or_else(
        || "its parent run".to_string(),
        |p| format!("parent run {}", p.run_id),
    );
    let transition = handle(
        state,
        agent,
        Command::Cancel {
            reason: format!("{parent} ended"),
        },
    );
    info!(run_id = %task.run_id, "parent ended, cancelling child run");
    commit(
        inner,
        slot,
        task,
        transition,
        TaskUpdate::Complete,
        Vec::new(),
        true,
    )
    .await
}

/// Completes a task that has nothing left to do (its step already happened,
/// or the run is over).
async fn finish_stale<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
) -> Result<Next, StoreError> {
    debug!(run_id = %task.run_id, kind = task.kind.as_str(), step = task.step, "stale task");
    commit(
        inner,
        slot,
        task,
        run::Transition::default(),
        TaskUpdate::Complete,
        Vec::new(),
        false,
    )
    .await?;
    Ok(Next::Done)
}

/// A run's step task (LLM or tools) ran out of attempts: a child run its
/// parent told to fail (`on_dead_letter: fail`, the default) fails, which
/// wakes the parent with the failure; any other run parks the task in the
/// dead-letter queue.
async fn give_up<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    agent: &Agent,
    error: String,
) -> Result<Next, StoreError> {
    let Some(state) = slot.as_ref() else {
        return Ok(Next::Done);
    };
    let Some(transition) = run::give_up(state, agent, dead_letter_event(task, &error)) else {
        return dead_letter(inner, slot, task, error).await;
    };
    warn!(run_id = %task.run_id, kind = task.kind.as_str(), step = task.step, attempts = task.attempts, error = %error, "task out of attempts: the child run fails");
    settle(inner, slot, task, agent, transition).await
}

/// The `TaskDeadLettered` event of `task`.
pub(crate) fn dead_letter_event(task: &Task, error: &str) -> Event {
    Event::TaskDeadLettered {
        task_id: task.lease.task_id,
        kind: task.kind.as_str().to_string(),
        step: task.step,
        attempts: task.attempts,
        error: error.to_string(),
    }
}

/// Moves the task to the dead-letter queue and journals why.
async fn dead_letter<S: Store>(
    inner: &Inner<S>,
    slot: &mut Option<State>,
    task: &Task,
    error: String,
) -> Result<Next, StoreError> {
    warn!(run_id = %task.run_id, kind = task.kind.as_str(), step = task.step, attempts = task.attempts, error = %error, "task dead-lettered");
    let transition = run::Transition {
        events: vec![dead_letter_event(task, &error)],
        effects: Vec::new(),
    };
    commit(
        inner,
        slot,
        task,
        transition,
        TaskUpdate::DeadLetter { error },
        Vec::new(),
        false,
    )
    .await?;
    Ok(Next::Done)
}
