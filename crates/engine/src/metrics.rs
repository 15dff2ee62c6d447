//! Prometheus metrics: the name and meaning of every metric Keel exports,
//! this process's counters and histograms, and the text exposition format
//! (version 0.0.4) they are written in.
//!
//! The engine counts what this process does (runs submitted and finished,
//! steps, LLM requests with their tokens, cost and latency, tool calls,
//! dead letters, retries, claims) in one registry per process, updated
//! where it happens: a commit's events are tallied ([`Tally`]) and recorded
//! once the commit went through, so a refused append counts nothing. The
//! API's `GET /metrics` writes them with the gauges it reads at scrape
//! time: from the store (the `STORE_*` families below: queue depth,
//! unfinished runs, dead letters, outbox) and from the gateway's circuit
//! breakers (`BREAKER_*`).
//!
//! Counters are per process: with several processes on one database, sum
//! them over the processes (`sum without (instance)`); the store gauges are
//! the same in every process, so take one process's (`max without
//! (instance)`), never their sum.
//!
//! Labels stay bounded: tenants, agents, providers, models, task kinds and tool
//! kinds only (never a run id); each value is cut to [`MAX_LABEL_BYTES`],
//! and a family keeps at most [`MAX_SERIES`] label sets, recording the rest
//! under the value [`OVERFLOW`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_core::Event;
use keel_store::{Append, TaskKind, TaskUpdate};
use tracing::warn;

use crate::llm;

/// The longest label value kept, in bytes (longer ones are cut at a
/// character boundary).
pub const MAX_LABEL_BYTES: usize = 128;
/// The most label sets one family keeps.
pub const MAX_SERIES: usize = 1_000;
/// The label value a family's label sets beyond [`MAX_SERIES`] are recorded under.
pub const OVERFLOW: &str = "_overflow";

/// What a metric family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (from 0 when the process starts).
    Counter,
    /// A value as of the scrape.
    Gauge,
    /// Observations in buckets, with their sum and count.
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A metric family: its name, meaning, kind, label names and, for a
/// histogram, its bucket bounds.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// The metric's name.
    pub name: &'static str,
    /// What it means (the `# HELP` line).
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Its label names, in order.
    pub labels: &'static [&'static str],
    /// A histogram's bucket upper bounds, ascending (`+Inf` is added).
    pub buckets: &'static [f64],
}

const fn counter(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Desc {
    Desc {
        name,
        help,
        kind: Kind::Counter,
        labels,
        buckets: &[],
    }
}

const fn gauge(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Desc {
    Desc {
        name,
        help,
        kind: Kind::Gauge,
        labels,
        buckets: &[],
    }
}

/// Bounds of the LLM latency histogram, in seconds.
const LLM_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
];
/// Bounds of the tool latency histogram, in seconds.
const TOOL_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

// What this process did (counters and histograms of the engine and API).

/// Runs this process created: `origin` is `request` (API, CLI or NATS
/// ingest) or `child` (spawned by a parent run's `spawn_agents`).
pub const RUNS_SUBMITTED: Desc = counter(
    "keel_runs_submitted_total",
    "Runs created by this process, by tenant, agent and origin (request: API, CLI or NATS ingest; child: spawned by a parent run).",
    &["tenant", "agent", "origin"],
);
/// Runs this process ended (committed their terminal event).
pub const RUNS_FINISHED: Desc = counter(
    "keel_runs_finished_total",
    "Runs that ended in a commit of this process, by tenant, agent and terminal status (completed, failed, cancelled).",
    &["tenant", "agent", "status"],
);
/// Steps journaled by this process: `llm` an answered LLM call
/// (`LlmCompleted`), `tool` a tool call's result (`ToolCallCompleted`, an
/// external worker's included).
pub const STEPS: Desc = counter(
    "keel_steps_total",
    "Steps journaled by this process, by tenant, agent and kind (llm: an answered LLM call; tool: a tool call's result, external workers' included).",
    &["tenant", "agent", "kind"],
);
/// LLM requests sent by this process, by how they ended.
pub const LLM_REQUESTS: Desc = counter(
    "keel_llm_requests_total",
    "LLM requests sent by this process, by provider, model and outcome (ok, rate_limited: the provider's 429, timeout, transient_error: network or 5xx or unreadable answer, permanent_error: 4xx or configuration).",
    &["provider", "model", "outcome"],
);
/// LLM calls the gateway held back before sending them.
pub const LLM_DEFERRED: Desc = counter(
    "keel_llm_deferred_total",
    "LLM calls the gateway deferred without sending them (the task went back to the queue, no attempt counted), by the spec's provider and model and reason (rate_limit: no rpm/tpm capacity within 10 s; breaker_open: the circuit breaker of the model and of every fallback is open).",
    &["provider", "model", "reason"],
);
/// Tokens the providers reported for this process's answered requests.
pub const LLM_TOKENS: Desc = counter(
    "keel_llm_tokens_total",
    "Tokens of the LLM requests this process had answered, by provider, model and direction (input, output).",
    &["provider", "model", "direction"],
);
/// What this process's answered LLM requests cost.
pub const LLM_COST: Desc = counter(
    "keel_llm_cost_usd_total",
    "Cost in USD of the LLM requests this process had answered, from the configuration's prices (unpriced models count 0), by provider and model.",
    &["provider", "model"],
);
/// How long LLM requests took.
pub const LLM_DURATION: Desc = Desc {
    name: "keel_llm_request_duration_seconds",
    help: "Time from sending an LLM request to its answer or error (streamed: to the end of the stream), by provider and model.",
    kind: Kind::Histogram,
    labels: &["provider", "model"],
    buckets: LLM_BUCKETS,
};
/// Tool calls this process made, by how they ended.
pub const TOOL_CALLS: Desc = counter(
    "keel_tool_calls_total",
    "Tool calls made by this process's workers (compensations included), by tool kind (http, mcp, builtin, unknown) and outcome (ok, error, uncertain: cut off after it was sent).",
    &["kind", "outcome"],
);
/// How long tool calls took.
pub const TOOL_DURATION: Desc = Desc {
    name: "keel_tool_call_duration_seconds",
    help: "Time a tool call took, its retries within the call included, by tool kind (http, mcp, builtin, unknown).",
    kind: Kind::Histogram,
    labels: &["kind"],
    buckets: TOOL_BUCKETS,
};
/// Tasks this process moved to the dead-letter queue.
pub const TASKS_DEAD_LETTERED: Desc = counter(
    "keel_tasks_dead_lettered_total",
    "Tasks this process moved to the dead-letter queue, by task kind.",
    &["kind"],
);
/// Failed attempts given back to be retried later.
pub const TASK_RETRIES: Desc = counter(
    "keel_task_retries_total",
    "Task attempts that failed and were given back to be retried after a backoff (LLM errors, MCP tools not listed yet, external workers' retryable failures), by task kind.",
    &["kind"],
);
/// Tasks this process's dispatcher claimed.
pub const TASKS_CLAIMED: Desc = counter(
    "keel_tasks_claimed_total",
    "Tasks claimed from the queue by this process's dispatcher, by task kind and attempt (first; later: a retry, or a takeover after a worker died or gave the task back).",
    &["kind", "attempt"],
);
/// Spans sent to the OTLP collector.
pub const TRACE_SPANS_EXPORTED: Desc = counter(
    "keel_trace_spans_exported_total",
    "Trace spans this process sent to the OTLP collector (--otlp-endpoint), accepted with a 2xx.",
    &[],
);
/// Spans that never reached the collector.
pub const TRACE_SPANS_DROPPED: Desc = counter(
    "keel_trace_spans_dropped_total",
    "Trace spans this process dropped, by reason (queue_full: the export queue held 8,192 spans; export_failed: the collector refused the batch, did not answer in time, or was still busy at shutdown).",
    &["reason"],
);

// Read at scrape time by the API's /metrics: the store's gauges, the breakers.

/// The queue: live tasks by queue, kind and state.
pub const STORE_TASKS: Desc = gauge(
    "keel_tasks",
    "Tasks in the queue, by queue (internal: the engine's; else an external workers' queue), kind and state (ready: claimable now; scheduled: due later, e.g. retries and timers; leased: being worked on). Read from the store at scrape time.",
    &["queue", "kind", "state"],
);
/// How long the longest-waiting ready task of each queue and kind waited.
pub const STORE_READY_AGE: Desc = gauge(
    "keel_tasks_ready_oldest_seconds",
    "How long the ready task that has waited longest has been claimable (due, or its lease expired), by queue and kind; absent when none is ready. Read from the store at scrape time.",
    &["queue", "kind"],
);
/// Unfinished runs by status.
pub const STORE_RUNS: Desc = gauge(
    "keel_runs_unfinished",
    "Runs not finished yet, by status (PENDING, AWAITING_LLM, AWAITING_TOOL, AWAITING_APPROVAL, AWAITING_CHILDREN, COMPENSATING). Read from the store at scrape time.",
    &["status"],
);
/// The dead-letter queue's size.
pub const STORE_DEAD_LETTERS: Desc = gauge(
    "keel_dead_letters",
    "Tasks in the dead-letter queue. Read from the store at scrape time.",
    &[],
);
/// Whether event export is switched on.
pub const STORE_EXPORT_ENABLED: Desc = gauge(
    "keel_export_enabled",
    "1 when event export (the outbox) is switched on, else 0.",
    &[],
);
/// Outbox entries not yet published.
pub const STORE_OUTBOX_ENTRIES: Desc = gauge(
    "keel_outbox_backlog_entries",
    "Outbox entries (one per commit) not yet published by the relay.",
    &[],
);
/// Events of the outbox entries not yet published.
pub const STORE_OUTBOX_EVENTS: Desc = gauge(
    "keel_outbox_backlog_events",
    "Journal events in the outbox entries not yet published.",
    &[],
);
/// Age of the oldest unpublished entry.
pub const STORE_OUTBOX_AGE: Desc = gauge(
    "keel_outbox_oldest_age_seconds",
    "Age of the oldest unpublished outbox entry (0 when the outbox is empty).",
    &[],
);
/// Circuit breakers.
pub const BREAKER_STATE: Desc = gauge(
    "keel_breaker_state",
    "1 for the state this process treats an LLM endpoint's circuit breaker as in (closed, open, half_open: its own breaker, or another process's open or half-open one from the store), 0 for the others.",
    &["endpoint", "state"],
);
/// Breaker openings.
pub const BREAKER_OPENED: Desc = counter(
    "keel_breaker_opened_total",
    "Times this process's circuit breaker of an LLM endpoint opened.",
    &["endpoint"],
);
/// Whether the store answered the scrape.
pub const STORE_UP: Desc = gauge(
    "keel_store_up",
    "1 when the store answered this scrape's reads, else 0 (the store gauges are then left out).",
    &[],
);
/// How long the store's reads took.
pub const STORE_SCRAPE_DURATION: Desc = gauge(
    "keel_store_scrape_duration_seconds",
    "Time this scrape's reads of the store took.",
    &[],
);
/// The build.
pub const BUILD_INFO: Desc = gauge(
    "keel_build_info",
    "Always 1; the version of the keel binary is in its label.",
    &["version"],
);

/// Where a run came from ([`RUNS_SUBMITTED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A submission: API, CLI or NATS ingest.
    Request,
    /// Spawned by a parent run.
    Child,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Request => "request",
            Origin::Child => "child",
        }
    }
}

/// What a tool call's implementation is ([`TOOL_CALLS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    /// An HTTP tool.
    Http,
    /// A tool of an MCP server.
    Mcp,
    /// A built-in tool (files).
    Builtin,
    /// A tool the agent does not have (the call fails at once).
    Unknown,
}

impl ToolKind {
    /// Its label value (http, mcp, builtin, unknown).
    pub fn as_str(self) -> &'static str {
        match self {
            ToolKind::Http => "http",
            ToolKind::Mcp => "mcp",
            ToolKind::Builtin => "builtin",
            ToolKind::Unknown => "unknown",
        }
    }
}

/// One histogram's observations: a count per bucket (not cumulative; the
/// last is above every bound) and their sum.
#[derive(Clone, Debug, Default)]
struct Observed {
    counts: Vec<u64>,
    sum: f64,
}

/// The label sets of one family and their values.
struct Family<V> {
    desc: &'static Desc,
    series: Mutex<BTreeMap<Vec<String>, V>>,
}

impl<V: Default> Family<V> {
    const fn new(desc: &'static Desc) -> Family<V> {
        Family {
            desc,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<String>, V>> {
        // Each update is one small step: a panic cannot leave it half done.
        self.series.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Updates the value of a label set (created at its default).
    fn update(&self, labels: &[&str], f: impl FnOnce(&mut V)) {
        debug_assert_eq!(labels.len(), self.desc.labels.len(), "{}", self.desc.name);
        let key: Vec<String> = labels.iter().map(|value| bounded(value)).collect();
        let mut series = self.lock();
        if series.len() >= MAX_SERIES && !series.contains_key(&key) {
            let overflow = vec![OVERFLOW.to_string(); key.len()];
            if !series.contains_key(&overflow) {
                warn!(
                    metric = self.desc.name,
                    limit = MAX_SERIES,
                    "too many label sets, recording the others under `{OVERFLOW}`"
                );
            }
            f(series.entry(overflow).or_default());
            return;
        }
        f(series.entry(key).or_default());
    }
}

impl Family<f64> {
    fn add(&self, labels: &[&str], amount: f64) {
        if amount.is_finite() && amount >= 0.0 {
            self.update(labels, |value| *value += amount);
        }
    }

    fn write(&self, out: &mut Exposition) {
        out.family(self.desc);
        for (labels, value) in self.lock().iter() {
            out.sample(self.desc, &as_strs(labels), *value);
        }
    }
}

impl Family<Observed> {
    fn observe(&self, labels: &[&str], seconds: f64) {
        let buckets = self.desc.buckets;
        let index = buckets
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(buckets.len());
        self.update(labels, |observed| {
            if observed.counts.len() != buckets.len() + 1 {
                observed.counts = vec![0; buckets.len() + 1];
            }
            observed.counts[index] += 1;
            observed.sum += seconds;
        });
    }

    fn write(&self, out: &mut Exposition) {
        out.family(self.desc);
        for (labels, observed) in self.lock().iter() {
            out.histogram(self.desc, &as_strs(labels), &observed.counts, observed.sum);
        }
    }
}

fn as_strs(labels: &[String]) -> Vec<&str> {
    labels.iter().map(String::as_str).collect()
}

/// A label value cut to [`MAX_LABEL_BYTES`] at a character boundary.
fn bounded(value: &str) -> String {
    if value.len() <= MAX_LABEL_BYTES {
        return value.to_string();
    }
    let mut end = MAX_LABEL_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_string()
}

/// The counters and histograms of one process.
pub struct Registry {
    runs_submitted: Family<f64>,
    runs_finished: Family<f64>,
    steps: Family<f64>,
    llm_requests: Family<f64>,
    llm_deferred: Family<f64>,
    llm_tokens: Family<f64>,
    llm_cost: Family<f64>,
    llm_duration: Family<Observed>,
    tool_calls: Family<f64>,
    tool_duration: Family<Observed>,
    dead_lettered: Family<f64>,
    retries: Family<f64>,
    claimed: Family<f64>,
    spans_exported: Family<f64>,
    spans_dropped: Family<f64>,
}

impl Registry {
    /// Every family, with no series yet.
    const fn new() -> Registry {
        Registry {
            runs_submitted: Family::new(&RUNS_SUBMITTED),
            runs_finished: Family::new(&RUNS_FINISHED),
            steps: Family::new(&STEPS),
            llm_requests: Family::new(&LLM_REQUESTS),
            llm_deferred: Family::new(&LLM_DEFERRED),
            llm_tokens: Family::new(&LLM_TOKENS),
            llm_cost: Family::new(&LLM_COST),
            llm_duration: Family::new(&LLM_DURATION),
            tool_calls: Family::new(&TOOL_CALLS),
            tool_duration: Family::new(&TOOL_DURATION),
            dead_lettered: Family::new(&TASKS_DEAD_LETTERED),
            retries: Family::new(&TASK_RETRIES),
            claimed: Family::new(&TASKS_CLAIMED),
            spans_exported: Family::new(&TRACE_SPANS_EXPORTED),
            spans_dropped: Family::new(&TRACE_SPANS_DROPPED),
        }
    }

    /// Writes every family (those without a series as their `# HELP` and
    /// `# TYPE` lines only).
    pub fn write(&self, out: &mut Exposition) {
        self.runs_submitted.write(out);
        self.runs_finished.write(out);
        self.steps.write(out);
        self.llm_requests.write(out);
        self.llm_deferred.write(out);
        self.llm_tokens.write(out);
        self.llm_cost.write(out);
        self.llm_duration.write(out);
        self.tool_calls.write(out);
        self.tool_duration.write(out);
        self.dead_lettered.write(out);
        self.retries.write(out);
        self.claimed.write(out);
        self.spans_exported.write(out);
        self.spans_dropped.write(out);
    }

    fn llm_request(&self, call: &LlmCall<'_>) {
        let labels = [call.provider, call.model];
        let outcome = llm_outcome(call.result);
        self.llm_requests
            .add(&[call.provider, call.model, outcome], 1.0);
        self.llm_duration
            .observe(&labels, call.elapsed.as_secs_f64());
        if let Ok(response) = call.result {
            let usage = response.usage;
            self.llm_tokens.add(
                &[call.provider, call.model, "input"],
                usage.input_tokens as f64,
            );
            self.llm_tokens.add(
                &[call.provider, call.model, "output"],
                usage.output_tokens as f64,
            );
            self.llm_cost.add(&labels, call.cost_usd.unwrap_or(0.0));
        }
    }
}

/// How an LLM request ended, as `keel_llm_requests_total`'s `outcome`
/// label says it (ok, rate_limited, timeout, transient_error, permanent_error).
pub fn llm_outcome(result: &Result<llm::Response, llm::Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(e) if e.is_throttled() => "rate_limited",
        Err(e) if e.is_timeout() => "timeout",
        Err(llm::Error::Transient { .. }) => "transient_error",
        Err(llm::Error::Permanent { .. }) => "permanent_error",
    }
}

/// This process's registry.
static REGISTRY: Registry = Registry::new();

/// This process's counters and histograms.
pub fn registry() -> &'static Registry {
    &REGISTRY
}

/// Counts a run of `tenant`'s `agent` created by a submission.
pub fn run_submitted(tenant: &str, agent: &str) {
    REGISTRY
        .runs_submitted
        .add(&[tenant, agent, Origin::Request.as_str()], 1.0);
}

/// An LLM request that was sent, and how it ended.
pub struct LlmCall<'a> {
    /// The provider's name in the spec and configuration.
    pub provider: &'a str,
    /// The model the spec names.
    pub model: &'a str,
    /// Its answer or error.
    pub result: &'a Result<llm::Response, llm::Error>,
    /// How long it took.
    pub elapsed: Duration,
    /// What it cost, when the configuration prices the model.
    pub cost_usd: Option<f64>,
}

/// Counts an LLM request: its outcome, latency, tokens and cost.
pub fn llm_request(call: &LlmCall<'_>) {
    REGISTRY.llm_request(call);
}

/// Counts an LLM call the gateway deferred without sending it.
pub fn llm_deferred(provider: &str, model: &str, breakers_open: bool) {
    let reason = if breakers_open {
        "breaker_open"
    } else {
        "rate_limit"
    };
    REGISTRY.llm_deferred.add(&[provider, model, reason], 1.0);
}

/// Counts a tool call and its latency.
pub fn tool_call(kind: ToolKind, outcome: &crate::tools::Outcome, elapsed: Duration) {
    let result = if outcome.uncertain {
        "uncertain"
    } else if outcome.is_error {
        "error"
    } else {
        "ok"
    };
    REGISTRY.tool_calls.add(&[kind.as_str(), result], 1.0);
    REGISTRY
        .tool_duration
        .observe(&[kind.as_str()], elapsed.as_secs_f64());
}

/// Counts a failed attempt given back to be retried.
pub fn task_retried(kind: TaskKind) {
    REGISTRY.retries.add(&[kind.as_str()], 1.0);
}

/// Counts a task claimed by the dispatcher (`attempts`: this one included).
pub fn task_claimed(kind: TaskKind, attempts: u32) {
    let attempt = if attempts > 1 { "later" } else { "first" };
    REGISTRY.claimed.add(&[kind.as_str(), attempt], 1.0);
}

/// Counts spans the collector accepted.
pub fn trace_spans_exported(count: u64) {
    REGISTRY.spans_exported.add(&[], count as f64);
}

/// Counts spans dropped (`reason`: `queue_full` or `export_failed`).
pub fn trace_spans_dropped(reason: &str, count: u64) {
    REGISTRY.spans_dropped.add(&[reason], count as f64);
}

/// What one commit does that is counted: tallied from the append before
/// it is sent, recorded once it went through.
#[derive(Clone, Debug, Default)]
#[must_use = "a tally counts nothing until it is recorded"]
pub struct Tally {
    tenant: String,
    agent: String,
    finished: Option<&'static str>,
    llm_steps: u32,
    tool_steps: u32,
    dead_lettered: Option<String>,
    children: Vec<String>,
}

impl Tally {
    /// The run's end and steps among `events` of a run of `tenant`'s
    /// `agent`.
    pub fn new(tenant: &str, agent: &str, events: &[Event]) -> Tally {
        let mut tally = Tally {
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            ..Tally::default()
        };
        for event in events {
            match event {
                Event::LlmCompleted { .. } => tally.llm_steps += 1,
                Event::ToolCallCompleted { .. } => tally.tool_steps += 1,
                Event::RunCompleted { .. } => tally.finished = Some("completed"),
                Event::RunFailed { .. } => tally.finished = Some("failed"),
                Event::RunCancelled { .. } => tally.finished = Some("cancelled"),
                _ => {}
            }
        }
        tally
    }

    /// [`Tally::new`] of an append's events, with the task it moves to the
    /// dead-letter queue and the child runs it creates.
    pub fn of(tenant: &str, agent: &str, append: &Append) -> Tally {
        let mut tally = Tally::new(tenant, agent, &append.events);
        if let TaskUpdate::DeadLetter { .. } = append.task {
            tally.dead_lettered = append
                .events
                .iter()
                .find_map(|event| match event {
                    Event::TaskDeadLettered { kind, .. } => Some(kind.clone()),
                    _ => None,
                })
                .or_else(|| Some("unknown".to_string()));
        }
        tally.children = append.spawn.iter().map(|s| s.agent.clone()).collect();
        tally
    }

    /// Whether the commit ends the run (its terminal event).
    pub fn ends_run(&self) -> bool {
        self.finished.is_some()
    }

    /// Counts what the commit did (call it once the commit went through).
    pub fn record(self) {
        let registry = &REGISTRY;
        let (tenant, agent) = (self.tenant.as_str(), self.agent.as_str());
        if self.llm_steps > 0 {
            registry
                .steps
                .add(&[tenant, agent, "llm"], f64::from(self.llm_steps));
        }
        if self.tool_steps > 0 {
            registry
                .steps
                .add(&[tenant, agent, "tool"], f64::from(self.tool_steps));
        }
        if let Some(status) = self.finished {
            registry.runs_finished.add(&[tenant, agent, status], 1.0);
        }
        if let Some(kind) = &self.dead_lettered {
            registry.dead_lettered.add(&[kind], 1.0);
        }
        // A child is of its parent's tenant.
        for child in &self.children {
            registry
                .runs_submitted
                .add(&[tenant, child, Origin::Child.as_str()], 1.0);
        }
    }
}

/// Metrics in the Prometheus text exposition format, version 0.0.4: each
/// family's `# HELP` and `# TYPE` lines, then its samples, one per line.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Its samples must
    /// follow before the next family starts.
    pub fn family(&mut self, desc: &Desc) {
        let _ = writeln!(self.text, "# HELP {} {}", desc.name, escape_help(desc.help));
        let _ = writeln!(self.text, "# TYPE {} {}", desc.name, desc.kind.as_str());
    }

    /// A counter's or gauge's sample, its label values in the order of
    /// `desc.labels`.
    pub fn sample(&mut self, desc: &Desc, labels: &[&str], value: f64) {
        self.line(desc.name, "", desc.labels, labels, None, value);
    }

    /// A histogram's samples for one label set: the cumulative buckets
    /// (`le`, `+Inf` last), the sum and the count. `counts` are per bucket,
    /// not cumulative, the last one above every bound; missing ones count 0.
    pub fn histogram(&mut self, desc: &Desc, labels: &[&str], counts: &[u64], sum: f64) {
        let mut cumulative = 0;
        for (i, bound) in desc.buckets.iter().enumerate() {
            cumulative += counts.get(i).copied().unwrap_or(0);
            let le = number(*bound);
            self.line(
                desc.name,
                "_bucket",
                desc.labels,
                labels,
                Some(&le),
                cumulative as f64,
            );
        }
        cumulative += counts.get(desc.buckets.len()).copied().unwrap_or(0);
        self.line(
            desc.name,
            "_bucket",
            desc.labels,
            labels,
            Some("+Inf"),
            cumulative as f64,
        );
        self.line(desc.name, "_sum", desc.labels, labels, None, sum);
        self.line(
            desc.name,
            "_count",
            desc.labels,
            labels,
            None,
            cumulative as f64,
        );
    }

    fn line(
        &mut self,
        name: &str,
        suffix: &str,
        names: &[&str],
        values: &[&str],
        le: Option<&str>,
        value: f64,
    ) {
        debug_assert_eq!(names.len(), values.len(), "{name}");
        self.text.push_str(name);
        self.text.push_str(suffix);
        let mut pairs = names.iter().zip(values).map(|(n, v)| (*n, *v)).peekable();
        if pairs.peek().is_some() || le.is_some() {
            self.text.push('{');
            let mut first = true;
            for (label, value) in pairs.chain(le.map(|le| ("le", le))) {
                if !first {
                    self.text.push(',');
                }
                first = false;
                self.text.push_str(label);
                self.text.push_str("=\"");
                escape_label_value(&mut self.text, value);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        self.text.push_str(&number(value));
        self.text.push('\n');
    }

    /// The text.
    pub fn into_text(self) -> String {
        self.text
    }
}

/// A label value as the format quotes it: `\`, `"` and line feeds escaped.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// A `# HELP` text: `\` and line feeds escaped.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value or bucket bound as the format writes it (Go's float
/// syntax: `+Inf`, `-Inf`, `NaN`, else a decimal number).
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_COUNTER: Desc = counter(
        "test_things_total",
        "Things.\nWith a \\ and a second line.",
        &["agent", "kind"],
    );
    const TEST_HISTOGRAM: Desc = Desc {
        name: "test_seconds",
        help: "Durations.",
        kind: Kind::Histogram,
        labels: &["model"],
        buckets: &[0.1, 1.0, 10.0],
    };
    const TEST_GAUGE: Desc = gauge("test_up", "Up.", &[]);

    #[test]
    fn exposition_escapes_and_writes_each_kind() {
        let mut out = Exposition::new();
        out.family(&TEST_COUNTER);
        out.sample(&TEST_COUNTER, &["say \"hi\"\nback\\slash", "llm"], 3.0);
        out.sample(&TEST_COUNTER, &["émile", "tool"], 0.25);
        out.family(&TEST_GAUGE);
        out.sample(&TEST_GAUGE, &[], 1.0);
        out.family(&TEST_HISTOGRAM);
        out.histogram(&TEST_HISTOGRAM, &["m"], &[1, 0, 2, 1], 25.5);
        out.sample(&TEST_GAUGE, &[], f64::INFINITY);
        out.sample(&TEST_GAUGE, &[], f64::NAN);
        let text = out.into_text();
        let expected = "\
# HELP test_things_total Things.\\nWith a \\\\ and a second line.
# TYPE test_things_total counter
test_things_total{agent=\"say \\\"hi\\\"\\nback\\\\slash\",kind=\"llm\"} 3
test_things_total{agent=\"émile\",kind=\"tool\"} 0.25
# HELP test_up Up.
# TYPE test_up gauge
test_up 1
# HELP test_seconds Durations.
# TYPE test_seconds histogram
test_seconds_bucket{model=\"m\",le=\"0.1\"} 1
test_seconds_bucket{model=\"m\",le=\"1\"} 1
test_seconds_bucket{model=\"m\",le=\"10\"} 3
test_seconds_bucket{model=\"m\",le=\"+Inf\"} 4
test_seconds_sum{model=\"m\"} 25.5
test_seconds_count{model=\"m\"} 4
test_up +Inf
test_up NaN
";
        assert_eq!(text, expected);
    }

    #[test]
    fn registry_buckets_bounds_and_caps_label_sets() {
        let registry = Registry::new();
        // Observations on a bound fall in its bucket; above all, in +Inf.
        for seconds in [0.05, 0.1, 0.2, 500.0] {
            registry.llm_duration.observe(&["p", "m"], seconds);
        }
        // Counters refuse what would make them go down or break.
        registry.steps.add(&["t", "a", "llm"], 2.0);
        registry.steps.add(&["t", "a", "llm"], -1.0);
        registry.steps.add(&["t", "a", "llm"], f64::NAN);
        // Long values are cut at a character boundary.
        let long = "é".repeat(MAX_LABEL_BYTES);
        registry.steps.add(&["t", &long, "tool"], 1.0);
        for i in 0..MAX_SERIES + 5 {
            registry
                .runs_finished
                .add(&["t", &format!("agent-{i}"), "completed"], 1.0);
        }
        let mut out = Exposition::new();
        registry.write(&mut out);
        let text = out.into_text();

        let line = |prefix: &str| -> Vec<&str> {
            text.lines().filter(|l| l.starts_with(prefix)).collect()
        };
        assert_eq!(
            line(
                "keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"0.05\"}"
            ),
            ["keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"0.05\"} 1"]
        );
        assert_eq!(
            line("keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"0.1\"}"),
            ["keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"0.1\"} 2"]
        );
        assert_eq!(
            line("keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"120\"}"),
            ["keel_llm_request_duration_seconds_bucket{provider=\"p\",model=\"m\",le=\"120\"} 3"]
        );
        assert_eq!(
            line("keel_llm_request_duration_seconds_count"),
            ["keel_llm_request_duration_seconds_count{provider=\"p\",model=\"m\"} 4"]
        );
        let sum = line("keel_llm_request_duration_seconds_sum{provider=\"p\",model=\"m\"} ");
        let sum: f64 = sum[0]
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a sum");
        assert!((sum - 500.35).abs() < 1e-9, "{sum}");
        assert_eq!(
            line("keel_steps_total{tenant=\"t\",agent=\"a\""),
            ["keel_steps_total{tenant=\"t\",agent=\"a\",kind=\"llm\"} 2"]
        );
        let cut = format!(
            "keel_steps_total{{tenant=\"t\",agent=\"{}\",kind=\"tool\"}} 1",
            "é".repeat(MAX_LABEL_BYTES / 2)
        );
        assert_eq!(
            line("keel_steps_total{tenant=\"t\",agent=\"é"),
            [cut.as_str()]
        );
        // At most MAX_SERIES label sets; the rest under the overflow value.
        let finished = line("keel_runs_finished_total{");
        assert_eq!(finished.len(), MAX_SERIES + 1);
        assert!(
            finished
                .contains(&"keel_runs_finished_total{tenant=\"_overflow\",agent=\"_overflow\",status=\"_overflow\"} 5")
        );
        // Every family has its HELP and TYPE lines, once, even without samples.
        for desc in [RUNS_SUBMITTED, TOOL_DURATION, TASKS_CLAIMED] {
            assert_eq!(line(&format!("# HELP {} ", desc.name)).len(), 1);
            assert_eq!(line(&format!("# TYPE {} ", desc.name)).len(), 1);
        }
    }
}
