//! Keel's durable store: each run's journal, the task queue that drives runs,
//! agent versions, the dead-letter queue and the outbox of events to export.
//!
//! # Layout
//!
//! * this file: the [`Store`] trait (one method per operation), the records it
//!   reads and writes, and [`Error`].
//! * [`sqlite`]: the embedded backend (one file, WAL, one writer task that
//!   group-commits the writes of many workers in one transaction).
//! * [`postgres`]: the shared backend (many processes on one database; a
//!   writer task per process group-commits the same way, leases are taken
//!   with `FOR UPDATE SKIP LOCKED`, commits are announced with `NOTIFY`).
//! * `outbox`: grouping the rows both backends read from the outbox.
//! * `limit`: the rate limiter's arithmetic (GCRA), shared by both backends.
//! * `purge`: which ended runs [`Store::purge`] and [`Store::delete_run`]
//!   may delete (retention), shared by both backends.
//! * `stats`: what [`Store::stats`] counts (tasks, unfinished runs, dead
//!   letters), decoded from the rows both backends' statement returns.
//! * `conformance`: the behaviour every backend must have, as generic tests.
//!
//! # Event export
//!
//! Once [`Store::enable_export`] has switched it on (a setting in the
//! database, shared by every process), each commit that journals events
//! also writes one outbox row naming the run and the seqs it wrote, in the
//! same transaction, so nothing committed is lost to a crash. A relay reads
//! the oldest entries with their events ([`Store::outbox`]), publishes them
//! and deletes them ([`Store::ack_outbox`]); [`Store::relay_lease`] lets one
//! relay process at a time do it. [`Store::disable_export`] switches it off
//! again and drops the backlog; [`Store::export_status`] shows the switch,
//! the backlog and the relay lease. [`Store::pending_runs`] counts a
//! tenant's unfinished runs for backpressure, from an index of those runs
//! only.
//!
//! # Usage and cost
//!
//! Each append writes the run row's [`Projection`], with the run's tokens
//! and `cost_usd` so far. [`Store::usage`] and [`Store::usage_by_agent`]
//! sum them over a tenant's or an agent's runs in one statement, when
//! asked: reads for reports, nothing kept up to date on the write path.
//!
//! # Rate limits
//!
//! [`Store::take_capacity`], [`Store::adjust_capacity`] and
//! [`Store::hold_capacity`] keep rate limits (requests or tokens per
//! minute of a provider's model, say) shared by every worker using the
//! store: one number per key, the GCRA's theoretical arrival time (module
//! `limit` has the algorithm). A throttled task is given back with
//! [`Store::defer`], which does not count an attempt.
//!
//! # Streamed LLM output
//!
//! While a worker streams a model's answer it persists the text and the
//! tool calls being written ([`ToolCallDelta`]: a call's start, then its
//! argument fragments) in small batches ([`Store::append_deltas`], one
//! write per batch, fenced by the task's lease like an append), so a reader
//! that reconnects gets exactly what it missed ([`Store::deltas`]). Each
//! batch is a [`DeltaPos`]: the LLM
//! step, the attempt at it (a retried call streams under a newer attempt)
//! and its index within the attempt. They are ephemeral: the append that
//! journals a step's `LlmCompleted` deletes the step's deltas in the same
//! transaction (the final message holds the whole text), and an append that
//! ends the run deletes all of them. Writes are announced to subscribers
//! like commits.
//!
//! # Circuit breakers
//!
//! Each process keeps its own circuit breakers (engine); the store keeps the
//! latest transition of each endpoint's breaker, whichever process made it
//! ([`Store::put_breaker`], [`Store::breakers`]), so every process sharing
//! the store can show it and refuse calls to an endpoint another process
//! found broken. An older transition never replaces a newer one. PostgreSQL
//! keeps them in a table; SQLite (one process) in memory.
//!
//! Every write made under a task lease is fenced: it names the lease, and the
//! store refuses it (with [`Error::LeaseLost`]) once the lease expired or was
//! taken over. Journal appends are conditional on the expected last sequence
//! number ([`Error::SeqConflict`]).

#[cfg(test)]
mod conformance;
mod limit;
mod outbox;
pub mod postgres;
mod purge;
pub mod sqlite;
mod stats;

pub use stats::{RunCount, Stats, TaskCount, TaskState};

use std::future::Future;
use std::time::Duration;

use keel_core::breaker::Phase;
use keel_core::message::Usage;
use keel_core::run::Status;
use keel_core::spec::Spec;
use keel_core::{Event, Millis, Priority, Recorded, RunId, Seq, TaskId};
use serde_json::Value;

/// How much earlier a task counts as due per level of priority when the
/// queue picks which due tasks a claim takes: tasks are claimed in order
/// of their rank, `visible_at - priority x PRIORITY_CREDIT` (lowest
/// first), among the due ones (`visible_at <= now`).
///
/// So a task of priority 9 overtakes tasks of priority 0 that became due
/// less than 90 s before it, and never older ones: a task waits behind
/// higher priorities for at most `9 x PRIORITY_CREDIT`, then only behind
/// tasks that became due before it. Nothing starves. The credit is in the
/// SQL of both backends (their `tasks_by_rank` index), so changing it
/// takes a migration.
pub const PRIORITY_CREDIT: Duration = Duration::from_secs(10);

/// Result of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The run's journal moved on since the caller read it.
    #[error("run {run_id}: expected last seq {expected}, journal is at {actual}")]
    SeqConflict {
        /// The run.
        run_id: RunId,
        /// What the caller expected.
        expected: Seq,
        /// Where the journal is.
        actual: Seq,
    },
    /// The caller's lease on the task expired or was taken over: it must stop.
    #[error("lease on task {0} was lost")]
    LeaseLost(TaskId),
    /// The thing named does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request conflicts with what is stored (e.g. an idempotency key reused
    /// for a different request, an agent version registered with other content).
    #[error("{0}")]
    Conflict(String),
    /// Stored data could not be decoded.
    #[error("corrupt data in store: {0}")]
    Corrupt(String),
    /// The database failed.
    #[error("database error: {0}")]
    Backend(String),
    /// The database cannot be reached for now: a connection was lost (a
    /// server restart, a failover, a pooler's restart, the network) or
    /// refused. The operation did not take effect, but for a write cut off
    /// while committing, whose outcome is unknown; trying again later may
    /// succeed.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The store is shutting down.
    #[error("store is closed")]
    Closed,
    /// A rate-limit take costs more than the limit's burst: it could never
    /// be granted, however long the caller waits.
    #[error(
        "rate limit `{key}`: a cost of {cost} is over the burst of {burst}, so it can never be granted"
    )]
    OverBurst {
        /// The limit's key.
        key: String,
        /// What the take asked for.
        cost: u64,
        /// The most the limit grants at once.
        burst: u64,
    },
    /// A rate that grants nothing: no units per window, an empty window or
    /// a burst of zero.
    #[error("rate limit `{key}`: {reason}")]
    InvalidRate {
        /// The limit's key.
        key: String,
        /// What is wrong with the rate.
        reason: &'static str,
    },
}

/// What a task does when it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// Call the model for a step.
    Llm,
    /// Make the tool calls of a step.
    Tools,
    /// The timer of a run parked for approvals: when it is due, the
    /// timeout policy applies (or the run's own timeout).
    Approval,
    /// Deliver a webhook notification about a step's pending approvals.
    Notify,
    /// A run parked for its child runs checks them (a child that finished
    /// wakes it; it also waits at the run's deadline, as its timer).
    Children,
    /// Cancel the run because its parent run ended (cancelled, failed or
    /// timed out) while it ran.
    Cancel,
    /// A tool call made by an external worker: leased over HTTP from its
    /// queue ([`NewTask::queue`]), never claimed by the engine.
    External,
    /// POST a run's `callback_url` about one of its journal events (its
    /// `step` is that event's seq).
    Callback,
    /// Make one compensation of a `COMPENSATING` run (its `step` is the
    /// compensation's position in the plan).
    Compensate,
    /// The run's deadline timer, armed by a step that queues calls for
    /// external workers (due at `limits.timeout`): due, it fails the run
    /// with `timeout` if the run is still going, like any task of an
    /// expired run.
    Deadline,
}

impl TaskKind {
    /// Name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Llm => "llm",
            TaskKind::Tools => "tools",
            TaskKind::Approval => "approval",
            TaskKind::Notify => "notify",
            TaskKind::Children => "children",
            TaskKind::Cancel => "cancel",
            TaskKind::External => "external",
            TaskKind::Callback => "callback",
            TaskKind::Compensate => "compensate",
            TaskKind::Deadline => "deadline",
        }
    }

    /// Parses a stored name.
    pub fn parse(text: &str) -> Option<TaskKind> {
        match text {
            "llm" => Some(TaskKind::Llm),
            "tools" => Some(TaskKind::Tools),
            "approval" => Some(TaskKind::Approval),
            "notify" => Some(TaskKind::Notify),
            "children" => Some(TaskKind::Children),
            "cancel" => Some(TaskKind::Cancel),
            "external" => Some(TaskKind::External),
            "callback" => Some(TaskKind::Callback),
            "compensate" => Some(TaskKind::Compensate),
            "deadline" => Some(TaskKind::Deadline),
            _ => None,
        }
    }
}

/// The right to work on a task until the lease expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The task.
    pub task_id: TaskId,
    /// Random token of this lease; a takeover gets a new one.
    pub token: i64,
}

/// A task leased to a worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The lease (and task id).
    pub lease: Lease,
    /// Run the task advances.
    pub run_id: RunId,
    /// What to do.
    pub kind: TaskKind,
    /// For which step.
    pub step: u32,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// Attempts allowed before the dead-letter queue.
    pub max_attempts: u32,
    /// When the lease expires unless extended.
    pub lease_until: Millis,
}

/// A task to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTask {
    /// What to do.
    pub kind: TaskKind,
    /// For which step.
    pub step: u32,
    /// Its run's priority: while it waits in the queue, it ranks as if it
    /// had become due `priority` x [`PRIORITY_CREDIT`] earlier.
    pub priority: Priority,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Not before this time.
    pub run_at: Millis,
    /// Lease it at once to this worker (the worker that caused it goes on with it
    /// without a round trip through the queue).
    pub lease_to: Option<LeaseTo>,
    /// For an [`TaskKind::External`] task: the queue external workers lease
    /// it from and the call it makes. Tasks with a queue are never claimed
    /// by [`Store::claim`], only by [`Store::claim_queued`].
    pub queue: Option<QueuedCall>,
}

/// Where an external worker's tool call waits: its queue, and which call
/// of the task's step it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedCall {
    /// The queue's name (the tool's `worker:`).
    pub queue: String,
    /// Position of the call in the step's assistant message.
    pub call_index: u32,
}

/// A task of an external worker's queue, as stored ([`Store::queued`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    /// The task id.
    pub task_id: TaskId,
    /// Run the call belongs to.
    pub run_id: RunId,
    /// The queue and the call.
    pub call: QueuedCall,
    /// Step of the call.
    pub step: u32,
    /// Attempts so far (leases taken), the current one included.
    pub attempts: u32,
    /// Attempts allowed before the dead-letter queue.
    pub max_attempts: u32,
    /// The token of the live lease, if the task is leased and the lease
    /// has not expired.
    pub lease_token: Option<i64>,
    /// The live lease's expiry (when leased), else when the task is due.
    pub visible_at: Millis,
}

/// Who a new task is leased to on creation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTo {
    /// Worker id.
    pub owner: String,
    /// Lease expiry.
    pub until: Millis,
    /// The new task's id and lease token, chosen by the caller: one that
    /// lost the append's answer (the connection dropped while it
    /// committed) can still give the task back.
    pub lease: Lease,
}

impl LeaseTo {
    /// A lease to `owner` until `until` for a new task: a fresh task id and
    /// token.
    pub fn new(owner: impl Into<String>, until: Millis) -> LeaseTo {
        LeaseTo {
            owner: owner.into(),
            until,
            lease: Lease {
                task_id: TaskId::new(),
                token: fastrand::i64(0..),
            },
        }
    }
}

/// What happens to the task under whose lease an append is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskUpdate {
    /// It goes on (the append is fenced and extends nothing).
    Keep,
    /// It is done: delete it.
    Complete,
    /// It used its attempts: move it to the dead-letter queue with this error.
    DeadLetter {
        /// Last error.
        error: String,
    },
}

/// The run row's summary, written with every append.
#[derive(Clone, Debug, PartialEq)]
pub struct Projection {
    /// Status after the append.
    pub status: Status,
    /// LLM steps answered.
    pub steps: u32,
    /// Answer, if completed.
    pub output: Option<String>,
    /// Failure, cancel reason, or why a task is dead-lettered.
    pub error: Option<String>,
    /// Tokens so far.
    pub usage: Usage,
    /// What the LLM calls cost so far in USD (the sum of the `LlmCompleted`
    /// events' `cost_usd`; unpriced calls count 0).
    pub cost_usd: f64,
}

/// A conditional, fenced journal append and the task changes it causes, all
/// committed in one transaction.
#[derive(Clone, Debug)]
pub struct Append {
    /// The run.
    pub run_id: RunId,
    /// The last seq the caller folded; the events get `expected_seq + 1..`.
    pub expected_seq: Seq,
    /// Events to journal.
    pub events: Vec<Event>,
    /// The lease this write is made under (`None` for API-side appends such as cancel).
    pub lease: Option<Lease>,
    /// What happens to the leased task.
    pub task: TaskUpdate,
    /// Tasks the events cause.
    pub new_tasks: Vec<NewTask>,
    /// Delete every other task of the run (terminal events).
    pub clear_tasks: bool,
    /// Put this dead letter back in the queue with fresh attempts.
    pub redrive: Option<TaskId>,
    /// The run row after the append.
    pub projection: Projection,
    /// Commit time.
    pub now: Millis,
    /// Child runs the events start, each created with its first event and
    /// task like a submission (their `idempotency_key` and tasks'
    /// `lease_to` are ignored). An id that exists already fails the append.
    pub spawn: Vec<Submission>,
    /// Tasks for other runs the events cause (a child that ends wakes its
    /// parent; a parent that ends cancels its children), queued, never
    /// leased on creation.
    pub wake: Vec<RunTask>,
}

/// A task for another run than the one appended to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunTask {
    /// The run.
    pub run_id: RunId,
    /// The task.
    pub task: NewTask,
}

/// What an append committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// Seq of the last event written.
    pub last_seq: Seq,
    /// New tasks that were leased on creation (`NewTask::lease_to`), in order.
    pub leased: Vec<Task>,
}

/// A run submission.
#[derive(Clone, Debug)]
pub struct Submission {
    /// Id for the run if it is new.
    pub run_id: RunId,
    /// Tenant.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Agent version the run is pinned to.
    pub version: String,
    /// Input.
    pub input: Value,
    /// The run's priority (its tasks carry it: `task` should have the same).
    pub priority: Priority,
    /// Client's idempotency key: a second submit with it returns the first run.
    pub idempotency_key: Option<String>,
    /// The `RunSubmitted` event.
    pub event: Event,
    /// The first task.
    pub task: NewTask,
    /// Commit time.
    pub now: Millis,
}

/// Outcome of a submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The run (the earlier one when the key was seen before).
    pub run_id: RunId,
    /// Whether this call created it.
    pub created: bool,
}

/// A run row.
#[derive(Clone, Debug, PartialEq)]
pub struct RunRecord {
    /// Id.
    pub id: RunId,
    /// Tenant.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Pinned version.
    pub version: String,
    /// Input.
    pub input: Value,
    /// Priority.
    pub priority: Priority,
    /// Summary as of `last_seq`.
    pub projection: Projection,
    /// Seq of the last event.
    pub last_seq: Seq,
    /// Submit time.
    pub created_at: Millis,
    /// Last append time.
    pub updated_at: Millis,
}

/// Filter and page of a run listing (newest first).
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Tenant.
    pub tenant: String,
    /// Only runs in this status.
    pub status: Option<Status>,
    /// Only runs of this agent.
    pub agent: Option<String>,
    /// Only runs older than this one (the page cursor).
    pub before: Option<RunId>,
    /// Page size.
    pub limit: u32,
}

/// Which ended runs [`Store::purge`] deletes: those that ended (their
/// last append) before `ended_before`, oldest first, looking at most at
/// `limit` of them after `after`.
///
/// A run is kept, whatever its age, while anything may still need it: a
/// task of its own (a callback still being delivered, a timer), events not
/// exported yet (outbox entries), or a parent run that has not ended (its
/// fan-in reads the child's row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Purge {
    /// Runs whose last append is older than this.
    pub ended_before: Millis,
    /// Most runs looked at (and so deleted) in one call.
    pub limit: u32,
    /// Only runs with a greater id: [`Purged::next`] of the call before.
    pub after: Option<RunId>,
}

/// What [`Store::purge`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Purged {
    /// The runs deleted.
    pub deleted: Vec<RunId>,
    /// Where the next call goes on ([`Purge::after`]) when this one looked
    /// at `limit` runs: more may follow. `None` when it saw them all.
    pub next: Option<RunId>,
}

/// Tokens and cost summed over runs ([`Store::usage`]), each run as of
/// its last append.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UsageTotals {
    /// Runs counted.
    pub runs: u64,
    /// Input (prompt) tokens of their LLM calls.
    pub input_tokens: u64,
    /// Output (completion) tokens of their LLM calls.
    pub output_tokens: u64,
    /// What their LLM calls cost in USD.
    pub cost_usd: f64,
}

impl UsageTotals {
    /// The totals from a sum query's row (`count`, input, output, cost), as
    /// both backends return it.
    pub(crate) fn from_sums(
        (runs, input, output, cost_usd): (i64, i64, i64, f64),
    ) -> Result<UsageTotals> {
        let count = |value: i64, what: &str| {
            u64::try_from(value).map_err(|_| Error::Corrupt(format!("{what} sum to {value}")))
        };
        Ok(UsageTotals {
            runs: count(runs, "runs")?,
            input_tokens: count(input, "input tokens")?,
            output_tokens: count(output, "output tokens")?,
            cost_usd,
        })
    }
}

/// One agent's usage totals ([`Store::usage_by_agent`]).
#[derive(Clone, Debug, PartialEq)]
pub struct AgentUsage {
    /// Agent name.
    pub agent: String,
    /// Its runs' totals.
    pub totals: UsageTotals,
}

/// A registered agent version.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentRecord {
    /// Tenant.
    pub tenant: String,
    /// The spec (its name and version are the key).
    pub spec: Spec,
    /// Registration time.
    pub created_at: Millis,
}

/// Outcome of registering an agent version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registered {
    /// A new version was stored.
    Created,
    /// The same content was already stored under this version.
    Unchanged,
}

/// A task that used all its attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The task's id.
    pub id: TaskId,
    /// Its run.
    pub run_id: RunId,
    /// What it did.
    pub kind: TaskKind,
    /// For which step.
    pub step: u32,
    /// Attempts made.
    pub attempts: u32,
    /// Last error.
    pub error: String,
    /// When it was dead-lettered.
    pub created_at: Millis,
}

/// A commit that touched a run: sent to subscribers after the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The run.
    pub run_id: RunId,
    /// Its last seq after the commit.
    pub last_seq: Seq,
    /// Whether the commit created runnable tasks (workers may wake up).
    pub new_work: bool,
}

/// Where a batch of streamed text stands among its run's deltas: ordered by
/// step, then attempt, then index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeltaPos {
    /// The LLM step (1-based) whose answer is streamed.
    pub step: u32,
    /// The attempt at the step (from 1): a retried call streams under a
    /// newer one, and its text replaces the older attempts'.
    pub attempt: u32,
    /// The batch's index within the attempt, from 0.
    pub idx: u32,
}

/// Which attempt a batch of deltas belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaAttempt {
    /// The first batch of an LLM call: the store opens a new attempt at the
    /// step, numbered at least this (the task's attempt count) and above
    /// every attempt with deltas stored, and writes the batch at index 0.
    /// (A task given back without counting its attempt, as on shutdown,
    /// claims the same attempt count again: its deltas still get a new
    /// attempt.)
    Open(u32),
    /// A later batch of the attempt the first batch opened, at `idx`.
    Continue {
        /// The attempt the first batch's write returned.
        attempt: u32,
        /// The batch's index (the previous batch's + 1).
        idx: u32,
    },
}

/// A batch of streamed LLM output to persist ([`Store::append_deltas`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeltaBatch {
    /// The run.
    pub run_id: RunId,
    /// The lease of the task making the call (the write is fenced by it).
    pub lease: Lease,
    /// The LLM step.
    pub step: u32,
    /// Which attempt, and where in it.
    pub attempt: DeltaAttempt,
    /// The text streamed since the previous batch (may be empty).
    pub text: String,
    /// The tool-call pieces streamed since the previous batch, one per
    /// call they belong to, in the order the calls first appeared.
    pub tool_calls: Vec<ToolCallDelta>,
    /// Write time.
    pub now: Millis,
}

/// What a batch of streamed output adds to one tool call of the answer:
/// its start (id and tool name, in the batch where the call first
/// appears) and the next fragments of its arguments, concatenated.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ToolCallDelta {
    /// Position of the call among the answer's tool calls, from 0.
    pub index: u32,
    /// The provider's id for the call, in the batch where it starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The tool's name, in the batch where the call starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next piece of the call's arguments (raw text, JSON once all
    /// pieces are joined); may be empty.
    #[serde(default)]
    pub arguments: String,
}

/// A stored batch of streamed output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// Its position.
    pub pos: DeltaPos,
    /// The text (may be empty when the batch holds only tool calls).
    pub text: String,
    /// The tool-call pieces ([`DeltaBatch::tool_calls`]).
    pub tool_calls: Vec<ToolCallDelta>,
    /// When it was written.
    pub at: Millis,
}

/// A run's deltas after a position, read in one snapshot with the journal's
/// last seq ([`Store::deltas`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deltas {
    /// The run's last seq in the same snapshot: the deltas belong to steps
    /// not completed by then, so a reader shows them after the journal's
    /// events up to this seq, never before.
    pub last_seq: Seq,
    /// The deltas, in position order.
    pub deltas: Vec<Delta>,
}

/// A stored delta, checking its position fits (step, attempt, index) and
/// its tool calls (a JSON array, NULL when none) read.
fn delta(
    run_id: RunId,
    pos: [i64; 3],
    text: String,
    tool_calls: Option<&str>,
    at: Millis,
) -> Result<Delta> {
    let mut numbers = [0_u32; 3];
    for (number, value) in numbers.iter_mut().zip(pos) {
        *number = u32::try_from(value)
            .map_err(|_| Error::Corrupt(format!("a delta of run {run_id} has position {pos:?}")))?;
    }
    let [step, attempt, idx] = numbers;
    let tool_calls = match tool_calls {
        None => Vec::new(),
        Some(json) => serde_json::from_str(json).map_err(|e| {
            Error::Corrupt(format!(
                "the tool calls of delta {step}.{attempt}.{idx} of run {run_id} are unreadable: {e}"
            ))
        })?,
    };
    Ok(Delta {
        pos: DeltaPos { step, attempt, idx },
        text,
        tool_calls,
        at,
    })
}

/// A batch's tool calls as stored: a JSON array, NULL when there are none.
fn tool_calls_column(tool_calls: &[ToolCallDelta]) -> Option<String> {
    if tool_calls.is_empty() {
        return None;
    }
    // Strings and numbers only: serializing cannot fail.
    serde_json::to_string(tool_calls).ok()
}

/// Which deltas an append of `events` deletes in its transaction: those of
/// each step it journals an `LlmCompleted` for (`Some(step)`), or, when it
/// ends the run, all of the run's (`None`).
fn compaction(events: &[Event]) -> Vec<Option<u32>> {
    if events.iter().any(Event::is_terminal) {
        return vec![None];
    }
    let mut steps = Vec::new();
    for event in events {
        if let Event::LlmCompleted { step, .. } = event {
            steps.push(Some(*step));
        }
    }
    steps
}

/// The latest transition of one LLM endpoint's circuit breaker, as the
/// process that made it wrote it ([`Store::put_breaker`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerRecord {
    /// The endpoint (`provider@base_url`).
    pub endpoint: String,
    /// The phase it moved to.
    pub phase: Phase,
    /// Open: the end of the open period. Half-open: until when other
    /// processes leave the trial calls to the writer. Closed: none.
    pub until: Option<Millis>,
    /// When the opening that led here happened (open, half-open).
    pub opened_at: Option<Millis>,
    /// The consecutive failures behind the transition (0 when it closed
    /// or half-opened).
    pub failures: u32,
    /// The process that made the transition.
    pub process: String,
    /// When (epoch ms): a record never replaces a newer one.
    pub updated_at: Millis,
}

/// A run as the outbox names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRef {
    /// Id.
    pub id: RunId,
    /// Tenant.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Pinned version.
    pub version: String,
}

/// Journal events committed since export was switched on and not yet acknowledged.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    /// Outbox position (commit order; acknowledge with it).
    pub id: i64,
    /// The run.
    pub run: RunRef,
    /// Its events, in seq order.
    pub events: Vec<Recorded>,
}

/// Where event export stands ([`Store::export_status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatus {
    /// Whether commits write outbox entries (the switch of
    /// [`Store::enable_export`] and [`Store::disable_export`]).
    pub enabled: bool,
    /// Outbox entries not published yet: one per commit that journaled events.
    pub backlog_entries: u64,
    /// The events those entries name.
    pub backlog_events: u64,
    /// Commit time of the oldest entry's events, if there is an entry.
    pub oldest: Option<Millis>,
    /// The relay lease asked about, if it was ever taken.
    pub relay: Option<RelayHolder>,
}

/// Who holds, or last held, a relay lease ([`Store::relay_lease`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayHolder {
    /// The relay's id.
    pub owner: String,
    /// When the lease expires (or expired) unless renewed.
    pub until: Millis,
    /// Whether the lease was held at the time asked about (`until > now`):
    /// a relay that renews it may be publishing. A relay that stops hands
    /// its lease back, so it is not live after a clean stop.
    pub live: bool,
}

/// A rate limit: `per_window` units (requests, tokens) per `window`, at
/// most `burst` of them at once. Over any span of `window`, at most
/// `per_window + burst - 1` units are granted (module `limit`), so a
/// `burst` of 1 never lets more than `per_window` through in any window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Units granted per window over time (e.g. 600).
    pub per_window: u64,
    /// The window (e.g. 60 s).
    pub window: Duration,
    /// Units that may be granted at once after a quiet spell: at least 1,
    /// and at least the largest single cost ([`Error::OverBurst`]).
    pub burst: u64,
}

/// The answer to [`Store::take_capacity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The capacity is taken: go now.
    Granted,
    /// The capacity is taken for this later time (within the take's
    /// `max_wait`): go then, not before. Until then nobody else is granted
    /// it; a caller that does not go gives it back with
    /// [`Store::adjust_capacity`].
    Reserved(Millis),
    /// Refused: nothing was taken. The same take (same cost and
    /// `max_wait`) made at this time is granted, unless others take the
    /// capacity first.
    RetryAt(Millis),
}

/// The operations the engine and the API need from a durable store. Each
/// backend writes its own SQL; `conformance` holds the behaviour they share.
pub trait Store: Clone + Send + Sync + 'static {
    /// Registers an agent version. Registering the same name and version again
    /// is idempotent with the same content and a [`Error::Conflict`] otherwise.
    fn put_agent(
        &self,
        tenant: &str,
        spec: &Spec,
        now: Millis,
    ) -> impl Future<Output = Result<Registered>> + Send;

    /// An agent version, or its newest version when `version` is `None`.
    fn get_agent(
        &self,
        tenant: &str,
        name: &str,
        version: Option<&str>,
    ) -> impl Future<Output = Result<Option<AgentRecord>>> + Send;

    /// Every registered agent version, by name then registration order.
    fn list_agents(&self, tenant: &str) -> impl Future<Output = Result<Vec<AgentRecord>>> + Send;

    /// Creates a run with its first event and task, or returns the run an
    /// earlier submission with the same idempotency key created.
    fn submit(&self, submission: Submission) -> impl Future<Output = Result<Submitted>> + Send;

    /// A run row.
    fn get_run(&self, id: RunId) -> impl Future<Output = Result<Option<RunRecord>>> + Send;

    /// Runs matching a filter, newest first.
    fn list_runs(&self, filter: RunFilter) -> impl Future<Output = Result<Vec<RunRecord>>> + Send;

    /// Journal events with seq greater than `after`, in order, at most `limit`.
    fn events(
        &self,
        run_id: RunId,
        after: Seq,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Recorded>>> + Send;

    /// Deletes runs that ended before `purge.ended_before` (see [`Purge`]
    /// for what keeps one), with everything stored about them: journal,
    /// streamed deltas, dead letters and idempotency key. Agent versions
    /// stay.
    fn purge(&self, purge: Purge) -> impl Future<Output = Result<Purged>> + Send;

    /// Deletes one ended run with everything stored about it, as
    /// [`Store::purge`] does; [`Error::NotFound`] if there is no such run,
    /// [`Error::Conflict`] naming the reason if it has not ended or anything
    /// still needs it.
    fn delete_run(&self, id: RunId) -> impl Future<Output = Result<()>> + Send;

    /// Leases up to `limit` runnable tasks (due, and not leased or with an
    /// expired lease), counting an attempt on each: those of lowest rank,
    /// `visible_at - priority x` [`PRIORITY_CREDIT`] (a task's due time,
    /// or its expired lease's expiry), so higher priorities go first
    /// without starving lower ones, and equal priorities go in the order
    /// they became due.
    fn claim(
        &self,
        owner: &str,
        limit: u32,
        lease_for: Duration,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Task>>> + Send;

    /// Leases the due task of lowest rank of the external queue `queue` to
    /// `owner` (as [`Store::claim`] does for the engine's tasks, which never
    /// include a queue's), counting an attempt; `None` when none is due.
    fn claim_queued(
        &self,
        queue: &str,
        owner: &str,
        lease_for: Duration,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Task>>> + Send;

    /// A task of an external queue, with its live lease if any; `None`
    /// when it does not exist (done, cleared) or has no queue.
    fn queued(
        &self,
        task_id: TaskId,
        now: Millis,
    ) -> impl Future<Output = Result<Option<Queued>>> + Send;

    /// Extends one live lease to `until` (fenced: [`Error::LeaseLost`] once
    /// it expired or was taken over).
    fn extend_lease(
        &self,
        lease: Lease,
        until: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Appends events and applies the task changes they cause, in one
    /// transaction, fenced by the lease and conditional on the last seq.
    fn append(&self, append: Append) -> impl Future<Output = Result<Appended>> + Send;

    /// Extends the unexpired ones of `leases` to `until`, each fenced by its
    /// token; returns how many. A worker names the leases of the tasks it
    /// drives, so one it holds without knowing (a claim or an append whose
    /// answer was lost) expires and its task is taken over.
    fn heartbeat(
        &self,
        leases: &[Lease],
        until: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Gives a leased task back to the queue to retry at `retry_at`, recording
    /// the error (fenced).
    fn retry_later(
        &self,
        lease: Lease,
        error: &str,
        retry_at: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Gives a leased task back to the queue, due at `until`, and takes
    /// back the attempt its lease counted (fenced, like
    /// [`Store::retry_later`]): for a task that could not start (it was
    /// throttled by a rate limit), not one that failed, so deferring it
    /// any number of times never moves it towards the dead-letter queue.
    /// `reason` is recorded as the task's last note.
    fn defer(
        &self,
        lease: Lease,
        until: Millis,
        reason: &str,
        now: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Gives back every lease held by `owner` so other workers take the tasks
    /// at once (graceful shutdown); returns how many.
    fn release_all(&self, owner: &str, now: Millis) -> impl Future<Output = Result<u64>> + Send;

    /// Dead letters of `tenant`'s runs, newest first.
    fn dead_letters(
        &self,
        tenant: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// One dead letter.
    fn dead_letter(&self, id: TaskId) -> impl Future<Output = Result<Option<DeadLetter>>> + Send;

    /// Counts what the store holds at `now`, in one snapshot, for
    /// monitoring: the tasks by queue, kind and state (ready, scheduled,
    /// leased), the unfinished runs by status, the dead letters. Cheap
    /// enough for every scrape: it reads the live tasks, the index of
    /// unfinished runs only (never the finished runs, however many) and the
    /// dead letters.
    fn stats(&self, now: Millis) -> impl Future<Output = Result<Stats>> + Send;

    /// The time the earliest not-yet-due task becomes runnable, if any (so an
    /// idle worker sleeps exactly until then).
    fn next_due(&self, now: Millis) -> impl Future<Output = Result<Option<Millis>>> + Send;

    /// Persists a batch of text and tool-call pieces streamed from the
    /// model (one write), fenced
    /// by the task's lease ([`Error::LeaseLost`] once it expired or was taken
    /// over), and announces it to subscribers like a commit (with no new
    /// work). Returns where the batch was written; the attempt of
    /// [`DeltaAttempt::Open`] is chosen by the store. A position already
    /// written is a [`Error::Conflict`].
    fn append_deltas(&self, batch: DeltaBatch) -> impl Future<Output = Result<DeltaPos>> + Send;

    /// Up to `limit` of a run's deltas after `after` (all when `None`), in
    /// position order, with the journal's last seq read in the same
    /// snapshot. Deltas are deleted once their step is journaled, so these
    /// are the answers still being streamed (or whose call failed and will
    /// be retried). [`Error::NotFound`] if the run does not exist.
    fn deltas(
        &self,
        run_id: RunId,
        after: Option<DeltaPos>,
        limit: u32,
    ) -> impl Future<Output = Result<Deltas>> + Send;

    /// Notifications of commits, for SSE followers and idle workers.
    ///
    /// They are hints, never the only way to learn of a commit: a slow
    /// subscriber misses some (`Lagged`), and a shared backend may miss
    /// some too, then sends a wake-up that names no run (e.g.
    /// [`postgres::RECONNECTED`]).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Committed>;

    /// Switches event export on for this store (idempotent, persistent,
    /// shared by all processes on the database): every commit from then on
    /// also records its events in the outbox, in the same transaction.
    /// Commits before it are not exported.
    ///
    /// A commit racing the switch may or may not be exported, but once one
    /// commit of a run is, every later one is until export is switched off
    /// again: a run's exported events have no gaps after its first exported
    /// entry, but for the events [`Store::disable_export`] drops.
    fn enable_export(&self) -> impl Future<Output = Result<()>> + Send;

    /// Switches event export off (idempotent, persistent, shared by all
    /// processes on the database) and deletes every outbox entry, in one
    /// transaction; returns how many entries were dropped. Their events
    /// stay in the journal but are never exported.
    ///
    /// No entry outlives it: a commit racing it either commits first (its
    /// entry is dropped) or reads the switch after it (and writes none). So
    /// once it returns, the outbox stays empty until [`Store::enable_export`]
    /// is called again, which exports only the commits after it. A relay
    /// still running finds nothing to publish.
    fn disable_export(&self) -> impl Future<Output = Result<u64>> + Send;

    /// The export switch, the outbox backlog and the relay lease named
    /// `relay` (its holder is `live` when its lease runs past `now`). Reads
    /// one consistent snapshot; counting the backlog reads every entry.
    fn export_status(
        &self,
        relay: &str,
        now: Millis,
    ) -> impl Future<Output = Result<ExportStatus>> + Send;

    /// The oldest outbox entries in commit order, with their events: whole
    /// entries, stopping once `max_events` events are gathered (at least one
    /// entry if any). For each run, entries come in seq order.
    ///
    /// An entry is included while fewer than `max_events` events were
    /// gathered before it, so the last one may go past `max_events`.
    fn outbox(&self, max_events: u32) -> impl Future<Output = Result<Vec<OutboxEntry>>> + Send;

    /// Deletes acknowledged (published) outbox entries; unknown ids are ignored.
    fn ack_outbox(&self, ids: &[i64]) -> impl Future<Output = Result<()>> + Send;

    /// Takes or extends the relay lease named `name` for `owner` until
    /// `until` when it is free, expired or already `owner`'s; returns
    /// whether `owner` holds it. (Lets only one relay process publish at a
    /// time; works through PgBouncer transaction pooling, so no session
    /// advisory locks.)
    fn relay_lease(
        &self,
        name: &str,
        owner: &str,
        until: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Runs of `tenant` not in a terminal status (PENDING, AWAITING_LLM,
    /// AWAITING_TOOL, AWAITING_APPROVAL, AWAITING_CHILDREN, COMPENSATING), of `agent` only when given. Used for backpressure,
    /// so it must stay cheap with millions of finished runs (an index that
    /// only holds non-terminal runs).
    fn pending_runs(
        &self,
        tenant: &str,
        agent: Option<&str>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Tokens and cost of the runs of `tenant` (of `agent` only, when
    /// given) created at or after `since` (all, when `None`), summed in one
    /// statement from the run rows. It reads every run counted: with an
    /// agent through the `(tenant, agent, id)` index, without one all the
    /// tenant's runs. Meant for reports and dashboards, not a hot path.
    fn usage(
        &self,
        tenant: &str,
        agent: Option<&str>,
        since: Option<Millis>,
    ) -> impl Future<Output = Result<UsageTotals>> + Send;

    /// [`Store::usage`] of each agent of `tenant` with runs created at or
    /// after `since`, by agent name, in one statement (a `GROUP BY` over
    /// all the tenant's runs: as dear as the tenant-wide [`Store::usage`]).
    fn usage_by_agent(
        &self,
        tenant: &str,
        since: Option<Millis>,
    ) -> impl Future<Output = Result<Vec<AgentUsage>>> + Send;

    /// Takes `cost` units of the rate limit `key` at `now`, if the limit
    /// allows it now, or at a time within `max_wait` (then the capacity is
    /// reserved for that time: [`Grant::Reserved`]). Otherwise nothing is
    /// taken and [`Grant::RetryAt`] says when the same take would be
    /// granted. Shared by every process on the store; each take is atomic.
    ///
    /// The caller composes `key` (e.g. `openai/gpt-4o:rpm`) and passes the
    /// same `rate` for it every time (a changed rate applies from then on).
    /// A `cost` over `rate.burst` is [`Error::OverBurst`]; a rate that
    /// grants nothing is [`Error::InvalidRate`]. A cost of 0 asks whether
    /// the key is open (not held, not in debt beyond its burst).
    fn take_capacity(
        &self,
        key: &str,
        rate: Rate,
        cost: u64,
        max_wait: Duration,
        now: Millis,
    ) -> impl Future<Output = Result<Grant>> + Send;

    /// Corrects what was taken from `key`, once the real cost is known (the
    /// tokens a call used against its estimate): a positive `delta` charges
    /// more, granted or not, a negative one gives back as if never taken.
    /// A charge leaves the key owing at most one window beyond an empty
    /// bucket; a give-back fills the bucket at most to its burst.
    fn adjust_capacity(
        &self,
        key: &str,
        rate: Rate,
        delta: i64,
        now: Millis,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Closes `key` until `until` (a provider's `429` with `Retry-After`):
    /// no take is granted for a time before it, whatever the rate or
    /// give-backs say. From `until` the limit goes on as before (refused
    /// takes consumed nothing). A shorter hold does not shorten a longer
    /// one; reservations granted before the hold stand.
    fn hold_capacity(&self, key: &str, until: Millis) -> impl Future<Output = Result<()>> + Send;

    /// How many keys that start with `prefix`, other than `except`, have
    /// been taken from lately: their theoretical arrival time is later than
    /// `since` (a key whose capacity was taken at or after `since`, or that
    /// still owes some, counts). The gateway counts the agents sharing a
    /// contended limit with it ([`Store::take_capacity`] on per-agent keys)
    /// to give each its share.
    fn active_limits(
        &self,
        prefix: &str,
        except: &str,
        since: Millis,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Writes a transition of an endpoint's circuit breaker as the shared
    /// state of that endpoint, unless the stored one is newer (a later
    /// `updated_at`). One small write per transition, not per call.
    fn put_breaker(&self, record: BreakerRecord) -> impl Future<Output = Result<()>> + Send;

    /// The shared state of every endpoint's breaker ([`Store::put_breaker`]),
    /// by endpoint. Callers on a hot path cache it.
    fn breakers(&self) -> impl Future<Output = Result<Vec<BreakerRecord>>> + Send;
}
