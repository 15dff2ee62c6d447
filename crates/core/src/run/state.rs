//! The fold: a run's state is its events applied in order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Compensation, Event, ParentLink, Recorded};
use crate::ids::{Millis, RunId, Seq, TaskId};
use crate::message::{Message, ToolCall, Usage};
use crate::priority::Priority;

/// Where a run is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Accepted, first LLM call not answered yet.
    Pending,
    /// Waiting for the model.
    AwaitingLlm,
    /// Waiting for tool calls.
    AwaitingTool,
    /// Parked until a human decides on tool calls (no worker is held).
    AwaitingApproval,
    /// Parked until the child runs of its `spawn_agents` calls are over
    /// (no worker is held; the last child to finish wakes it).
    AwaitingChildren,
    /// Failed or cancelled, undoing its compensable calls (sagas) before
    /// it ends `FAILED` or `CANCELLED`.
    Compensating,
    /// Finished with an answer.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::AwaitingLlm,
        Status::AwaitingTool,
        Status::AwaitingApproval,
        Status::AwaitingChildren,
        Status::Compensating,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// The wire name (`AWAITING_LLM`).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::AwaitingLlm => "AWAITING_LLM",
            Status::AwaitingTool => "AWAITING_TOOL",
            Status::AwaitingApproval => "AWAITING_APPROVAL",
            Status::AwaitingChildren => "AWAITING_CHILDREN",
            Status::Compensating => "COMPENSATING",
            Status::Completed => "COMPLETED",
            Status::Failed => "FAILED",
            Status::Cancelled => "CANCELLED",
        }
    }

    /// Parses a wire name, case-insensitively.
    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }

    /// Whether the run is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// Progress of one tool call of the current step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallState {
    /// Valid, not started yet.
    Pending,
    /// Started `attempts` times without a result journaled.
    Started {
        /// Starts journaled so far.
        attempts: u32,
    },
    /// Result journaled.
    Done,
    /// Refused before any call (the error went to the model).
    Rejected,
}

/// One tool call of the current step.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The call as the model wrote it.
    pub call: ToolCall,
    /// Where it is.
    pub state: CallState,
    /// Validated arguments, once started.
    pub arguments: Option<Value>,
}

/// A human decision a tool call of the current step waits for (or got).
#[derive(Clone, Debug, PartialEq)]
pub struct Approval {
    /// `<step>.<call_index>.<attempt>`, unique within the run.
    pub id: String,
    /// Step of the call.
    pub step: u32,
    /// Position of the call.
    pub call_index: u32,
    /// Tool name.
    pub tool: String,
    /// The arguments the call would be made with.
    pub arguments: Value,
    /// The attempt it gates (more than 1: repeating an uncertain call).
    pub attempt: u32,
    /// `policy` or `uncertain`.
    pub reason: String,
    /// When it was requested.
    pub requested_at: Millis,
    /// When the timeout policy applies, if there is a timeout.
    pub deadline: Option<Millis>,
    /// Whether the timeout escalated it.
    pub escalated: bool,
    /// The decision, once made.
    pub decision: Option<Decision>,
}

impl Approval {
    /// Whether it still waits for a decision.
    pub fn is_pending(&self) -> bool {
        self.decision.is_none()
    }
}

/// How an approval was decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Whether the call may be made.
    pub approved: bool,
    /// Who decided.
    pub by: String,
    /// Why.
    pub reason: Option<String>,
    /// Edited arguments, if the approver changed them.
    pub arguments: Option<Value>,
    /// When.
    pub at: Millis,
}

/// The id of the approval gating attempt `attempt` of a call.
pub fn approval_id(step: u32, call_index: u32, attempt: u32) -> String {
    format!("{step}.{call_index}.{attempt}")
}

/// A child run this run started with `spawn_agents`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Child {
    /// The child run.
    pub run_id: RunId,
    /// Its agent.
    pub agent: String,
    /// Its pinned agent version.
    pub version: String,
    /// The step of the call that started it.
    pub step: u32,
    /// Position of that call.
    pub call_index: u32,
    /// Its position among the call's tasks.
    pub index: u32,
    /// Whether the call's result (the fan-in) was journaled: then the
    /// child was over.
    pub joined: bool,
}

/// A tool call that succeeded: what its compensation is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct Succeeded {
    /// Step of the call.
    pub step: u32,
    /// Position of the call.
    pub call_index: u32,
    /// Tool name.
    pub tool: String,
    /// The arguments it was made with.
    pub arguments: Value,
    /// Its result.
    pub output: String,
}

/// A run's compensations, once it is `COMPENSATING` (and after).
#[derive(Clone, Debug, PartialEq)]
pub struct Saga {
    /// How the run ends: `FAILED` or `CANCELLED`.
    pub outcome: Status,
    /// Why (the cancel's reason for `CANCELLED`).
    pub error: String,
    /// The failure's code.
    pub code: Option<String>,
    /// The compensations, in the order they run.
    pub compensations: Vec<Compensating>,
}

impl Saga {
    /// The compensation to make next: the first without an outcome.
    pub fn next(&self) -> Option<u32> {
        self.compensations
            .iter()
            .position(|c| !c.is_settled())
            .map(|i| i as u32)
    }

    /// (completed, failed) so far.
    pub fn counts(&self) -> (u32, u32) {
        let count = |state: CompensationState| {
            self.compensations
                .iter()
                .filter(|c| c.state == state)
                .count() as u32
        };
        (
            count(CompensationState::Completed),
            count(CompensationState::Failed),
        )
    }
}

/// One compensation and where it is.
#[derive(Clone, Debug, PartialEq)]
pub struct Compensating {
    /// What to call.
    pub plan: Compensation,
    /// Where it is.
    pub state: CompensationState,
    /// The compensating tool's answer, or why it failed.
    pub result: Option<String>,
}

impl Compensating {
    /// Whether it has its outcome.
    pub fn is_settled(&self) -> bool {
        matches!(
            self.state,
            CompensationState::Completed | CompensationState::Failed
        )
    }
}

/// Progress of one compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompensationState {
    /// Not started yet.
    Pending,
    /// Started `attempts` times without an outcome journaled.
    Started {
        /// Starts journaled so far.
        attempts: u32,
    },
    /// It succeeded.
    Completed,
    /// It failed for good.
    Failed,
}

/// A task parked in the dead-letter queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parked {
    /// The task.
    pub task_id: TaskId,
    /// Why it was dead-lettered.
    pub error: String,
}

/// Everything known about a run: the fold of its journal.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The run.
    pub run_id: RunId,
    /// Last applied sequence number (0 before any event).
    pub seq: Seq,
    /// When the run was submitted.
    pub created_at: Millis,
    /// Owning tenant.
    pub tenant: String,
    /// Agent name.
    pub agent: String,
    /// Pinned agent version.
    pub version: String,
    /// The input.
    pub input: Value,
    /// Where the run is.
    pub status: Status,
    /// The conversation after the system prompt.
    pub messages: Vec<Message>,
    /// LLM steps answered so far.
    pub steps: u32,
    /// Tool calls of the current step.
    pub calls: Vec<Call>,
    /// Approvals of the current step's calls, in request order.
    pub approvals: Vec<Approval>,
    /// Tokens used so far.
    pub usage: Usage,
    /// What the LLM calls cost so far, in USD (calls with no price count 0).
    pub cost_usd: f64,
    /// The answer, once completed.
    pub output: Option<String>,
    /// The failure or cancel reason.
    pub error: Option<String>,
    /// The last error the model was told about (for the max-steps message).
    pub last_correction: Option<String>,
    /// A dead-lettered task holding the run, if any.
    pub parked: Option<Parked>,
    /// The LLM step waiting behind open circuit breakers (`LlmParked`),
    /// until its answer.
    pub breaker_parked: Option<u32>,
    /// The run's priority: every task it creates carries it.
    pub priority: Priority,
    /// The run that spawned this one, if it is a child run.
    pub parent: Option<ParentLink>,
    /// How deep it nests (0: submitted by a client).
    pub depth: u32,
    /// The child runs it started, in order.
    pub children: Vec<Child>,
    /// Where the run's outcome and parks are POSTed, if anywhere.
    pub callback_url: Option<String>,
    /// The tool calls that succeeded, in journal order.
    pub succeeded: Vec<Succeeded>,
    /// Its compensations, once it fails or is cancelled after compensable calls.
    pub saga: Option<Saga>,
}

impl State {
    /// An empty state, before `RunSubmitted`.
    pub fn new(run_id: RunId) -> State {
        State {
            run_id,
            seq: 0,
            created_at: 0,
            tenant: String::new(),
            agent: String::new(),
            version: String::new(),
            input: Value::Null,
            status: Status::Pending,
            messages: Vec::new(),
            steps: 0,
            calls: Vec::new(),
            approvals: Vec::new(),
            usage: Usage::default(),
            cost_usd: 0.0,
            output: None,
            error: None,
            last_correction: None,
            parked: None,
            breaker_parked: None,
            priority: Priority::DEFAULT,
            parent: None,
            depth: 0,
            children: Vec::new(),
            callback_url: None,
            succeeded: Vec::new(),
            saga: None,
        }
    }

    /// Folds a whole journal.
    pub fn replay<'a>(run_id: RunId, events: impl IntoIterator<Item = &'a Recorded>) -> State {
        let mut state = State::new(run_id);
        for recorded in events {
            state.apply(recorded);
        }
        state
    }

    /// Applies one journaled event. Events are facts: applying never fails.
    pub fn apply(&mut self, recorded: &Recorded) {
        debug_assert_eq!(recorded.seq, self.seq + 1, "journal must be contiguous");
        self.seq = recorded.seq;
        self.apply_event(&recorded.event, recorded.at);
    }

    /// Applies an event that is about to be journaled at `seq + 1`.
    pub fn apply_next(&mut self, event: &Event, at: Millis) {
        self.seq += 1;
        self.apply_event(event, at);
    }

    fn apply_event(&mut self, event: &Event, at: Millis) {
        match event {
            Event::RunSubmitted {
                tenant,
                agent,
                version,
                input,
                priority,
                parent,
                callback_url,
            } => {
                self.depth = parent.as_ref().map_or(0, |p| p.depth);
                self.parent = parent.clone();
                self.callback_url = callback_url.clone();
                self.created_at = at;
                self.priority = *priority;
                self.tenant = tenant.clone();
                self.agent = agent.clone();
                self.version = version.clone();
                self.input = input.clone();
                self.status = Status::Pending;
                let text = match input {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                self.messages.push(Message::user(text));
            }
            Event::LlmCompleted {
                step,
                message,
                usage,
                cost_usd,
                ..
            } => {
                self.breaker_parked = None;
                self.steps = *step;
                self.usage.add(*usage);
                self.cost_usd += cost_usd.unwrap_or(0.0);
                self.messages.push(message.clone());
                self.approvals.clear();
                self.calls = message
                    .tool_calls
                    .iter()
                    .map(|call| Call {
                        call: call.clone(),
                        state: CallState::Pending,
                        arguments: None,
                    })
                    .collect();
                self.status = if self.calls.is_empty() {
                    Status::AwaitingLlm
                } else {
                    Status::AwaitingTool
                };
            }
            Event::LlmRejected { error, .. } => {
                self.messages.push(Message::user(format!("error: {error}")));
                self.last_correction = Some(error.clone());
                self.status = Status::AwaitingLlm;
            }
            Event::ToolCallRejected {
                call_index,
                call_id,
                error,
                ..
            } => {
                if let Some(call) = self.calls.get_mut(*call_index as usize) {
                    call.state = CallState::Rejected;
                }
                self.messages
                    .push(Message::tool(call_id.clone(), format!("error: {error}")));
                self.last_correction = Some(error.clone());
                self.settle_step();
            }
            Event::ToolCallStarted {
                call_index,
                arguments,
                ..
            } => {
                if let Some(call) = self.calls.get_mut(*call_index as usize) {
                    let attempts = match call.state {
                        CallState::Started { attempts } => attempts + 1,
                        _ => 1,
                    };
                    call.state = CallState::Started { attempts };
                    call.arguments = Some(arguments.clone());
                }
            }
            Event::ToolCallCompleted {
                step,
                call_index,
                call_id,
                output,
                is_error,
            } => {
                if let Some(call) = self.calls.get_mut(*call_index as usize) {
                    call.state = CallState::Done;
                    if !is_error {
                        self.succeeded.push(Succeeded {
                            step: *step,
                            call_index: *call_index,
                            tool: call.call.name.clone(),
                            arguments: call.arguments.clone().unwrap_or(Value::Null),
                            output: output.clone(),
                        });
                    }
                }
                for child in &mut self.children {
                    if child.step == *step && child.call_index == *call_index {
                        child.joined = true;
                    }
                }
                let content = if *is_error {
                    format!("error: {output}")
                } else {
                    output.clone()
                };
                self.messages.push(Message::tool(call_id.clone(), content));
                self.settle_step();
            }
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
            } => {
                self.approvals.push(Approval {
                    id: approval_id.clone(),
                    step: *step,
                    call_index: *call_index,
                    tool: tool.clone(),
                    arguments: arguments.clone(),
                    attempt: *attempt,
                    reason: reason.clone(),
                    requested_at: at,
                    deadline: timeout_ms
                        .map(|t| at.saturating_add(i64::try_from(t).unwrap_or(i64::MAX))),
                    escalated: false,
                    decision: None,
                });
                self.status = Status::AwaitingApproval;
            }
            Event::ApprovalDecided {
                approval_id,
                call_index,
                approved,
                by,
                reason,
                arguments,
                ..
            } => {
                if let Some(approval) = self.approvals.iter_mut().find(|a| a.id == *approval_id) {
                    approval.decision = Some(Decision {
                        approved: *approved,
                        by: by.clone(),
                        reason: reason.clone(),
                        arguments: arguments.clone(),
                        at,
                    });
                }
                if !approved && let Some(call) = self.calls.get_mut(*call_index as usize) {
                    call.state = CallState::Rejected;
                    let why = reason.as_deref().unwrap_or("no reason given");
                    self.messages.push(Message::tool(
                        call.call.id.clone(),
                        format!("error: the call was rejected by {by}: {why}"),
                    ));
                }
                if self.status == Status::AwaitingApproval
                    && !self.approvals.iter().any(Approval::is_pending)
                {
                    self.status = if self.step_settled() {
                        Status::AwaitingLlm
                    } else {
                        Status::AwaitingTool
                    };
                }
            }
            Event::ApprovalEscalated { approval_ids, .. } => {
                for approval in &mut self.approvals {
                    if approval_ids.contains(&approval.id) {
                        approval.escalated = true;
                    }
                }
            }
            Event::ChildrenSpawned {
                step,
                call_index,
                children,
            } => {
                for (index, child) in children.iter().enumerate() {
                    self.children.push(Child {
                        run_id: child.run_id,
                        agent: child.agent.clone(),
                        version: child.version.clone(),
                        step: *step,
                        call_index: *call_index,
                        index: index as u32,
                        joined: false,
                    });
                }
                self.settle_step();
            }
            Event::RunCompensating {
                outcome,
                error,
                code,
                compensations,
            } => {
                self.status = Status::Compensating;
                self.error = Some(match outcome {
                    Status::Cancelled => format!("cancelled: {error}"),
                    _ => error.clone(),
                });
                // Nothing waits for a decision any more.
                self.approvals.clear();
                self.parked = None;
                self.saga = Some(Saga {
                    outcome: *outcome,
                    error: error.clone(),
                    code: code.clone(),
                    compensations: compensations
                        .iter()
                        .map(|plan| Compensating {
                            plan: plan.clone(),
                            state: CompensationState::Pending,
                            result: None,
                        })
                        .collect(),
                });
            }
            Event::CompensationStarted { index, .. } => {
                if let Some(c) = self.compensation_mut(*index) {
                    let attempts = match c.state {
                        CompensationState::Started { attempts } => attempts + 1,
                        _ => 1,
                    };
                    c.state = CompensationState::Started { attempts };
                }
            }
            Event::CompensationCompleted { index, output, .. } => {
                if let Some(c) = self.compensation_mut(*index) {
                    c.state = CompensationState::Completed;
                    c.result = Some(output.clone());
                }
            }
            Event::CompensationFailed { index, error, .. } => {
                if let Some(c) = self.compensation_mut(*index) {
                    c.state = CompensationState::Failed;
                    c.result = Some(error.clone());
                }
            }
            Event::RunCompensated { .. } => {}
            Event::TaskDeadLettered { task_id, error, .. } => {
                self.parked = Some(Parked {
                    task_id: *task_id,
                    error: error.clone(),
                });
            }
            Event::LlmParked { step, .. } => {
                self.breaker_parked = Some(*step);
            }
            Event::TaskRedriven { .. } => {
                self.parked = None;
            }
            Event::RunCompleted { output } => {
                self.output = Some(output.clone());
                self.status = Status::Completed;
                self.parked = None;
            }
            Event::RunFailed { error, .. } => {
                self.error = Some(error.clone());
                self.status = Status::Failed;
                self.parked = None;
            }
            Event::RunCancelled { reason } => {
                self.error = Some(format!("cancelled: {reason}"));
                self.status = Status::Cancelled;
                self.parked = None;
            }
        }
    }

    fn compensation_mut(&mut self, index: u32) -> Option<&mut Compensating> {
        self.saga.as_mut()?.compensations.get_mut(index as usize)
    }

    /// After a call result: when every call of the step has one, the model
    /// is next; when only calls waiting for child runs are left, the run
    /// parks until they are over.
    fn settle_step(&mut self) {
        if !matches!(self.status, Status::AwaitingTool | Status::AwaitingChildren) {
            return;
        }
        if self.step_settled() {
            self.status = Status::AwaitingLlm;
        } else if self.only_children_left() {
            self.status = Status::AwaitingChildren;
        }
    }

    /// Whether every call of the current step without a result is a
    /// `spawn_agents` call whose children run (and at least one is).
    pub fn only_children_left(&self) -> bool {
        let mut waiting = false;
        for (index, call) in self.calls.iter().enumerate() {
            if matches!(call.state, CallState::Done | CallState::Rejected) {
                continue;
            }
            if !self.spawned(self.steps, index as u32) {
                return false;
            }
            waiting = true;
        }
        waiting
    }

    /// Whether call `call_index` of `step` started child runs.
    pub fn spawned(&self, step: u32, call_index: u32) -> bool {
        self.children
            .iter()
            .any(|c| c.step == step && c.call_index == call_index)
    }

    /// The child runs whose call has no result yet: those a cancel of this
    /// run cancels, and those the fan-in waits for.
    pub fn live_children(&self) -> impl Iterator<Item = &Child> {
        self.children.iter().filter(|c| !c.joined)
    }

    /// Whether every call of the current step has a result (or was rejected).
    pub fn step_settled(&self) -> bool {
        self.calls
            .iter()
            .all(|c| matches!(c.state, CallState::Done | CallState::Rejected))
    }

    /// The approvals still waiting for a decision.
    pub fn pending_approvals(&self) -> impl Iterator<Item = &Approval> {
        self.approvals.iter().filter(|a| a.is_pending())
    }

    /// The approval with this id, if the current step has it.
    pub fn approval(&self, id: &str) -> Option<&Approval> {
        self.approvals.iter().find(|a| a.id == id)
    }

    /// The latest tool result text, if any (used by the scripted provider).
    pub fn last_tool_output(&self) -> Option<&str> {
        self.messages
            .iter()
            .rev()
            .find(|m| m.role == crate::message::Role::Tool)
            .and_then(|m| m.content.as_deref())
    }
}
