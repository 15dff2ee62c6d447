//! Journal events: the facts a run is folded from. Serialized as JSON with a
//! `type` tag; each event carries only what is new (an LLM step journals the
//! one new assistant message, never the conversation again).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{Millis, RunId, Seq, TaskId};
use crate::message::{Message, Usage};
use crate::priority::Priority;
use crate::run::Status;
use crate::spec::OnDeadLetter;

/// Version of the event schema, bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

/// One fact in a run's journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The run was accepted, pinned to an agent version.
    RunSubmitted {
        /// Tenant that owns the run.
        tenant: String,
        /// Agent name.
        agent: String,
        /// Agent version the run is pinned to.
        version: String,
        /// The request's input (a string or any JSON).
        input: Value,
        /// Its priority under contention for workers (journals written
        /// before priorities existed read as the default).
        #[serde(default)]
        priority: Priority,
        /// The run that spawned this one, if it is a child run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<ParentLink>,
        /// Where the run's terminal result and its parks (awaiting
        /// approval, dead-lettered) are POSTed, if the submitter asked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        callback_url: Option<String>,
    },
    /// The model answered step `step`.
    LlmCompleted {
        /// 1-based LLM step.
        step: u32,
        /// The assistant message, verbatim.
        message: Message,
        /// Tokens used by this call.
        usage: Usage,
        /// Model that answered.
        model: String,
        /// What the call cost in USD, from the server's price table when it
        /// has the model (absent otherwise: counted as 0).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost_usd: Option<f64>,
    },
    /// A reply the model must correct (it was empty); the text goes back to it.
    LlmRejected {
        /// Step of the rejected reply.
        step: u32,
        /// Error shown to the model.
        error: String,
    },
    /// A tool call the model wrote is invalid (unknown tool, bad JSON, schema
    /// violation); the error is its result, so the model can correct itself.
    ToolCallRejected {
        /// Step of the call.
        step: u32,
        /// Position of the call in the assistant message.
        call_index: u32,
        /// Provider's call id.
        call_id: String,
        /// Tool the model named.
        tool: String,
        /// Error shown to the model.
        error: String,
    },
    /// A tool call is about to be made: from here on it may have happened.
    ToolCallStarted {
        /// Step of the call.
        step: u32,
        /// Position of the call in the assistant message.
        call_index: u32,
        /// Provider's call id.
        call_id: String,
        /// Tool name.
        tool: String,
        /// Validated arguments.
        arguments: Value,
        /// `<run_id>:<step>:<call_index>`, sent with every attempt.
        idempotency_key: String,
        /// 1 for the first start; more when recovery repeats an uncertain call.
        attempt: u32,
    },
    /// A tool call finished (an error result is a result: it goes to the model).
    ToolCallCompleted {
        /// Step of the call.
        step: u32,
        /// Position of the call in the assistant message.
        call_index: u32,
        /// Provider's call id.
        call_id: String,
        /// What the model sees.
        output: String,
        /// Whether the tool failed.
        is_error: bool,
    },
    /// A tool call waits for a human decision before it is made: the
    /// approval policy asks for it, or recovery found the call uncertain
    /// and the tool's `on_uncertain` is `ask`. The run is
    /// `AWAITING_APPROVAL` until every approval of the step is decided.
    ApprovalRequested {
        /// The approval's id within the run: `<step>.<call_index>.<attempt>`.
        approval_id: String,
        /// Step of the call.
        step: u32,
        /// Position of the call in the assistant message.
        call_index: u32,
        /// Provider's call id.
        call_id: String,
        /// Tool name.
        tool: String,
        /// The arguments the call would be made with.
        arguments: Value,
        /// The attempt it would be (more than 1: a repeat of an uncertain call).
        attempt: u32,
        /// `policy` (an approval rule matched) or `uncertain` (a repeat).
        reason: String,
        /// How long a decision may take (`approvals.timeout`), if limited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Someone (or the timeout policy) decided an approval.
    ApprovalDecided {
        /// The approval.
        approval_id: String,
        /// Step of the call.
        step: u32,
        /// Position of the call.
        call_index: u32,
        /// Whether the call may be made.
        approved: bool,
        /// Who decided (`keel:timeout` for the timeout policy).
        by: String,
        /// Why (a rejection's reason is the call's result for the model).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// Arguments the approver edited (validated): the call is made with these.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arguments: Option<Value>,
    },
    /// Nobody decided in time and `approvals.on_timeout` is `escalate`: the
    /// escalation webhook is told, the run keeps waiting.
    ApprovalEscalated {
        /// Step of the calls.
        step: u32,
        /// The approvals escalated.
        approval_ids: Vec<String>,
    },
    /// A `spawn_agents` call started its child runs: they were created in
    /// the same commit. The call's result comes once all of them are over.
    ChildrenSpawned {
        /// Step of the call.
        step: u32,
        /// Position of the call in the assistant message.
        call_index: u32,
        /// The child runs, in the order the model listed the tasks.
        children: Vec<SpawnedChild>,
    },
    /// The run fails or is cancelled after successful calls of tools that
    /// declare `compensate`: it is `COMPENSATING` while their compensations
    /// run, one at a time, in reverse order of the calls. Then
    /// `RunCompensated` and the run's own end (`RunFailed` with this
    /// `error` and `code`, or `RunCancelled` with this `error` as reason).
    RunCompensating {
        /// How the run ends once compensated: `FAILED` or `CANCELLED`.
        outcome: Status,
        /// Why it fails (or the cancel's reason).
        error: String,
        /// The failure's code, as `RunFailed` will carry it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// The compensations to make, in order (index 0 first).
        compensations: Vec<Compensation>,
    },
    /// Compensation `index` is about to be called: from here on it may
    /// have happened (a repeat after a crash carries the same key).
    CompensationStarted {
        /// Position in `RunCompensating.compensations`.
        index: u32,
        /// Step of the call it undoes.
        step: u32,
        /// Position of that call in its step.
        call_index: u32,
        /// The compensating tool.
        tool: String,
        /// Its arguments (the rendered template).
        arguments: Value,
        /// `<run_id>:compensate:<step>:<call_index>`, sent with every attempt.
        idempotency_key: String,
        /// 1 for the first start; more when recovery repeats it.
        attempt: u32,
    },
    /// Compensation `index` succeeded.
    CompensationCompleted {
        /// Position in `RunCompensating.compensations`.
        index: u32,
        /// Step of the call it undid.
        step: u32,
        /// Position of that call in its step.
        call_index: u32,
        /// What the compensating tool answered.
        output: String,
    },
    /// Compensation `index` failed for good (its tool's retries are spent,
    /// its template has no value, or the worker making it kept dying); the
    /// others still run.
    CompensationFailed {
        /// Position in `RunCompensating.compensations`.
        index: u32,
        /// Step of the call it should have undone.
        step: u32,
        /// Position of that call in its step.
        call_index: u32,
        /// Why.
        error: String,
    },
    /// Every compensation has its outcome; the run's end follows in the
    /// same commit.
    RunCompensated {
        /// Compensations that succeeded.
        completed: u32,
        /// Compensations that failed.
        failed: u32,
    },
    /// A task used all its attempts and went to the dead-letter queue.
    TaskDeadLettered {
        /// The dead-lettered task (its id is the dead letter's id).
        task_id: TaskId,
        /// `llm`, `tools`, `approval` (a timer) or `notify` (a webhook).
        kind: String,
        /// Step the task was for.
        step: u32,
        /// Attempts made.
        attempts: u32,
        /// Last error.
        error: String,
    },
    /// The run's LLM step waits, holding no worker, because the circuit
    /// breaker of its model and of every fallback is open: it goes on by
    /// itself when one half-opens (`until`). Journaled once per wait, so
    /// a callback (and an SSE client) learns the run is stuck.
    LlmParked {
        /// The LLM step that waits.
        step: u32,
        /// Why, naming the endpoint.
        reason: String,
        /// When the first breaker half-opens (epoch ms).
        until: Millis,
    },
    /// A dead-lettered task was put back in the queue.
    TaskRedriven {
        /// The task.
        task_id: TaskId,
    },
    /// The run finished with an answer.
    RunCompleted {
        /// The final answer.
        output: String,
    },
    /// The run failed for good.
    RunFailed {
        /// Why.
        error: String,
        /// The kind of failure, for machines: `budget_exceeded`, `max_steps`,
        /// `timeout`, `uncertain_tool_call` (absent for other failures).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<String>,
    },
    /// The run was cancelled.
    RunCancelled {
        /// Why (given by the caller).
        reason: String,
    },
}

impl Event {
    /// The tag of the event, as stored and as sent on the SSE stream.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::RunSubmitted { .. } => "run_submitted",
            Event::LlmCompleted { .. } => "llm_completed",
            Event::LlmRejected { .. } => "llm_rejected",
            Event::ToolCallRejected { .. } => "tool_call_rejected",
            Event::ToolCallStarted { .. } => "tool_call_started",
            Event::ToolCallCompleted { .. } => "tool_call_completed",
            Event::ApprovalRequested { .. } => "approval_requested",
            Event::ApprovalDecided { .. } => "approval_decided",
            Event::ApprovalEscalated { .. } => "approval_escalated",
            Event::ChildrenSpawned { .. } => "children_spawned",
            Event::RunCompensating { .. } => "run_compensating",
            Event::CompensationStarted { .. } => "compensation_started",
            Event::CompensationCompleted { .. } => "compensation_completed",
            Event::CompensationFailed { .. } => "compensation_failed",
            Event::RunCompensated { .. } => "run_compensated",
            Event::TaskDeadLettered { .. } => "task_dead_lettered",
            Event::LlmParked { .. } => "llm_parked",
            Event::TaskRedriven { .. } => "task_redriven",
            Event::RunCompleted { .. } => "run_completed",
            Event::RunFailed { .. } => "run_failed",
            Event::RunCancelled { .. } => "run_cancelled",
        }
    }

    /// Whether this event ends the run.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::RunCompleted { .. } | Event::RunFailed { .. } | Event::RunCancelled { .. }
        )
    }

    /// Whether this event stops the run's steps: it ends the run, or
    /// starts its compensations (the run's other tasks are dropped).
    pub fn stops_steps(&self) -> bool {
        self.is_terminal() || matches!(self, Event::RunCompensating { .. })
    }
}

/// One compensation a failing run makes: which call it undoes and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Compensation {
    /// Step of the call it undoes.
    pub step: u32,
    /// Position of that call in its step.
    pub call_index: u32,
    /// The tool of that call.
    pub call_tool: String,
    /// The compensating tool (`compensate.tool`).
    pub tool: String,
    /// Its arguments: the template filled from the call and its result
    /// (`null` when that failed: see `error`).
    pub arguments: Value,
    /// `<run_id>:compensate:<step>:<call_index>`.
    pub idempotency_key: String,
    /// Why the template could not be filled (the compensation fails
    /// without a call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a child run comes from: journaled in its `RunSubmitted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentLink {
    /// The parent run.
    pub run_id: RunId,
    /// The parent's step whose `spawn_agents` call started it.
    pub step: u32,
    /// Position of that call in the parent's assistant message.
    pub call_index: u32,
    /// Position of this child among the call's tasks.
    pub index: u32,
    /// How deep it nests: the parent's depth + 1 (a submitted run is at 0).
    pub depth: u32,
    /// What it does when one of its tasks is dead-lettered (the spawning
    /// tool's `on_dead_letter`).
    #[serde(default, skip_serializing_if = "OnDeadLetter::is_fail")]
    pub on_dead_letter: OnDeadLetter,
}

/// A child run a `spawn_agents` call started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnedChild {
    /// The child run (derived from the parent's id, step, call and index).
    pub run_id: RunId,
    /// Its agent.
    pub agent: String,
    /// The agent version it is pinned to.
    pub version: String,
}

/// An event as journaled: its position and time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    /// Sequence number in the run's journal (1-based, contiguous).
    pub seq: Seq,
    /// When it was committed.
    pub at: Millis,
    /// The event.
    pub event: Event,
}
