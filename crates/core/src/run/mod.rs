//! The run state machine: commands in, events and effects out, no I/O.
//!
//! [`State`] is the fold of a run's journal. [`handle`] takes a state, the
//! run's pinned [`Agent`] and a [`Command`] (something that happened or is
//! asked for) and returns the events to journal and the effects those events
//! cause. It reads no clock and makes no ids: the engine passes them in, then
//! commits the events and the tasks for the effects in one transaction.

mod approvals;
mod children;
mod saga;
mod state;
#[cfg(test)]
mod tests;

pub use children::{ChildOutcome, ChildRun, spawn_tasks};
pub use state::{
    Approval, Call, CallState, Child, Compensating, CompensationState, Decision, Parked, Saga,
    State, Status, Succeeded, approval_id,
};

use serde_json::Value;

use crate::approval::OnUncertain;
use crate::event::Event;
use crate::ids::{Millis, RunId};
use crate::message::{Message, Usage};
use crate::priority::Priority;
use crate::spec::{Agent, OnDeadLetter};

/// Something that happened to a run, or that someone asks of it.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// The model answered LLM step `step`.
    LlmResponded {
        /// The step that was asked for.
        step: u32,
        /// The assistant message.
        message: Message,
        /// Tokens used.
        usage: Usage,
        /// The model that answered.
        model: String,
        /// What the call cost in USD, if the server prices the model.
        cost_usd: Option<f64>,
    },
    /// The tool calls of `step` are about to be made (or made again after a crash).
    StartTools {
        /// The step whose calls start.
        step: u32,
    },
    /// A tool call returned (or failed for good; errors are results).
    ToolReturned {
        /// Step of the call.
        step: u32,
        /// Position of the call.
        call_index: u32,
        /// What the model will see.
        output: String,
        /// Whether it is an error.
        is_error: bool,
    },
    /// A caller cancels the run.
    Cancel {
        /// Why.
        reason: String,
    },
    /// The run's wall-clock limit has passed.
    Expire,
    /// Someone decides an approval of the current step.
    Decide {
        /// The approval (`<step>.<call_index>.<attempt>`).
        approval_id: String,
        /// Whether the call may be made.
        approved: bool,
        /// Who decides.
        by: String,
        /// Why (a rejection's reason goes to the model).
        reason: Option<String>,
        /// Edited arguments for the call (approvals only; validated
        /// against the tool's schema).
        arguments: Option<Value>,
    },
    /// The approval timer fired: approvals whose deadline is at or before
    /// `now` get `approvals.on_timeout`.
    ApprovalTimeout {
        /// The time it fired.
        now: Millis,
    },
    /// A started `spawn_agents` call is made: its child runs start, pinned
    /// to these versions of their agents (the current ones, in task order;
    /// `None`: the agent is not registered, and the call fails).
    Spawn {
        /// Step of the call.
        step: u32,
        /// Position of the call.
        call_index: u32,
        /// The version of each task's agent.
        versions: Vec<Option<String>>,
    },
    /// How the child runs of the current step stand (read from the store):
    /// every `spawn_agents` call whose children are all over gets their
    /// outcomes as its result.
    JoinChildren {
        /// The step.
        step: u32,
        /// The outcomes known, in any order (children not listed, or not
        /// over, are waited for).
        outcomes: Vec<ChildOutcome>,
    },
    /// Compensation `index` of a `COMPENSATING` run is about to be made
    /// (or made again after a crash).
    StartCompensation {
        /// Position in the plan of `RunCompensating`.
        index: u32,
    },
    /// The compensating call returned (an error result is its failure).
    CompensationReturned {
        /// Position in the plan of `RunCompensating`.
        index: u32,
        /// What the tool answered, or what went wrong.
        output: String,
        /// Whether it failed.
        is_error: bool,
    },
}

/// Work the events ask for.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Queue an LLM call for `step`.
    CallLlm {
        /// Step to ask the model for.
        step: u32,
    },
    /// Queue the tool calls of `step`.
    CallTools {
        /// Step whose calls to make.
        step: u32,
    },
    /// Make one tool call now; its `ToolCallStarted` is among the events.
    InvokeTool(Invocation),
    /// The run parks for decisions on `step`'s approvals: arm the timer
    /// that applies the timeout policy (the earliest pending deadline, or
    /// the run's own `limits.timeout`).
    AwaitApproval {
        /// The step whose calls wait.
        step: u32,
    },
    /// Tell `approvals.notify` (or `escalate_to`, for escalated approvals)
    /// about `step`'s pending approvals, durably.
    Notify {
        /// The step whose calls wait.
        step: u32,
    },
    /// Create these child runs in the same commit as the events (each with
    /// its `RunSubmitted` and first LLM task).
    SpawnChildren(Vec<ChildRun>),
    /// The run parks until the child runs of `step` are over: check them
    /// now, and arm the timer of the run's own deadline.
    AwaitChildren {
        /// The step whose calls wait.
        step: u32,
    },
    /// Queue compensation `index` of a `COMPENSATING` run.
    Compensate {
        /// Position in the plan of `RunCompensating`.
        index: u32,
    },
    /// Make one compensating call now; its `CompensationStarted` is among
    /// the events (`step` and `call_index` are the undone call's).
    InvokeCompensation(Invocation),
}

/// One tool call to make.
#[derive(Clone, Debug, PartialEq)]
pub struct Invocation {
    /// Step of the call.
    pub step: u32,
    /// Position of the call.
    pub call_index: u32,
    /// Tool name.
    pub tool: String,
    /// Validated arguments.
    pub arguments: Value,
    /// `<run_id>:<step>:<call_index>`.
    pub idempotency_key: String,
    /// 1 for a first call, more when an uncertain call is repeated.
    pub attempt: u32,
}

/// What a command produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transition {
    /// Events to journal, in order.
    pub events: Vec<Event>,
    /// Effects of those events.
    pub effects: Vec<Effect>,
}

/// Why a command does not apply to the run as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The run is over.
    #[error("run is already {}", .0.as_str())]
    Finished(Status),
    /// The command is for a step the run is not at (a stale or duplicate task).
    #[error("run is at step {at} ({}), not step {step}", .status.as_str())]
    WrongStep {
        /// Step the command was for.
        step: u32,
        /// Steps answered so far.
        at: u32,
        /// Current status.
        status: Status,
    },
    /// The call does not exist or already has its result.
    #[error("tool call {call_index} of step {step} is not in flight")]
    NotInFlight {
        /// Step of the call.
        step: u32,
        /// Position of the call.
        call_index: u32,
    },
    /// No approval of the current step has this id.
    #[error("the run has no approval `{0}` waiting (approvals of earlier steps are settled)")]
    UnknownApproval(String),
    /// The approval was decided already.
    #[error("approval `{id}` was already {} by {by}", if *.approved { "approved" } else { "rejected" })]
    AlreadyDecided {
        /// The approval.
        id: String,
        /// Who decided it.
        by: String,
        /// How.
        approved: bool,
    },
    /// The decision itself is invalid (edited arguments that do not match
    /// the tool's schema, or an edit where none is allowed).
    #[error("{0}")]
    InvalidDecision(String),
    /// The run is undoing its compensable calls; it ends on its own.
    #[error("run is COMPENSATING: it ends {} once its compensations ran", .0.as_str())]
    Compensating(Status),
    /// The command is for a compensation that is not the next one (a
    /// stale or duplicate task).
    #[error("compensation {index} is not the next one to make (next: {next:?})")]
    WrongCompensation {
        /// Compensation the command was for.
        index: u32,
        /// The next one, if any.
        next: Option<u32>,
    },
}

/// The idempotency key of a tool call.
pub fn idempotency_key(run_id: RunId, step: u32, call_index: u32) -> String {
    format!("{run_id}:{step}:{call_index}")
}

/// The idempotency key of the compensation of a tool call.
pub fn compensation_key(run_id: RunId, step: u32, call_index: u32) -> String {
    format!("{run_id}:compensate:{step}:{call_index}")
}

/// Starts a run: the first event and the first LLM call.
pub fn submit(
    tenant: &str,
    agent: &str,
    version: &str,
    input: Value,
    priority: Priority,
) -> Transition {
    Transition {
        events: vec![Event::RunSubmitted {
            tenant: tenant.to_string(),
            agent: agent.to_string(),
            version: version.to_string(),
            input,
            priority,
            parent: None,
            callback_url: None,
        }],
        effects: vec![Effect::CallLlm { step: 1 }],
    }
}

/// Whether the run's wall-clock limit has passed at `now`.
pub fn expired(state: &State, agent: &Agent, now: Millis) -> bool {
    let limit = agent.spec.limits.timeout.as_millis() as i64;
    // Compensations run to the end whatever the clock says.
    let running = !state.status.is_terminal() && state.status != Status::Compensating;
    running && now.saturating_sub(state.created_at) >= limit
}

/// What a task that ran out of attempts (`dead_letter`, its
/// `TaskDeadLettered` event) does to a child run whose spawning tool says
/// `on_dead_letter: fail`: the run fails (`dead_lettered`, after its
/// compensations), which wakes its parent with the failure. `None`: the
/// task parks in the dead-letter queue (a submitted run, a child told to
/// `wait`, or a run already compensating).
pub fn give_up(state: &State, agent: &Agent, dead_letter: Event) -> Option<Transition> {
    let parent = state.parent.as_ref()?;
    if parent.on_dead_letter != OnDeadLetter::Fail
        || state.status.is_terminal()
        || state.saga.is_some()
    {
        return None;
    }
    let Event::TaskDeadLettered { error, .. } = &dead_letter else {
        return None;
    };
    let error = format!(
        "a task was dead-lettered ({error}); a child run fails instead of waiting in the dead-letter queue (its parent's spawn_agents tool has on_dead_letter: fail)"
    );
    Some(saga::stop(
        state,
        agent,
        vec![dead_letter],
        Status::Failed,
        error,
        Some(code::DEAD_LETTERED.into()),
    ))
}

/// Decides what a command means for a run.
pub fn handle(state: &State, agent: &Agent, command: Command) -> Result<Transition, Rejected> {
    if state.status.is_terminal() {
        return Err(Rejected::Finished(state.status));
    }
    if let Some(saga) = &state.saga {
        return match command {
            Command::StartCompensation { index } => saga::start(state, agent, index),
            Command::CompensationReturned {
                index,
                output,
                is_error,
            } => saga::returned(state, index, output, is_error),
            _ => Err(Rejected::Compensating(saga.outcome)),
        };
    }
    match command {
        Command::LlmResponded {
            step,
            message,
            usage,
            model,
            cost_usd,
        } => llm_responded(state, agent, step, message, usage, model, cost_usd),
        Command::StartTools { step } => start_tools(state, agent, step),
        Command::ToolReturned {
            step,
            call_index,
            output,
            is_error,
        } => tool_returned(state, agent, step, call_index, output, is_error),
        Command::Cancel { reason } => Ok(saga::stop(
            state,
            agent,
            Vec::new(),
            Status::Cancelled,
            reason,
            None,
        )),
        Command::Expire => Ok(saga::stop(
            state,
            agent,
            Vec::new(),
            Status::Failed,
            format!(
                "run timed out: limits.timeout ({}) passed",
                crate::spec::human_duration::format(agent.spec.limits.timeout)
            ),
            Some(code::TIMEOUT.into()),
        )),
        Command::Decide {
            approval_id,
            approved,
            by,
            reason,
            arguments,
        } => approvals::decide(state, agent, &approval_id, approved, by, reason, arguments),
        Command::ApprovalTimeout { now } => Ok(approvals::timeout(state, agent, now)),
        Command::Spawn {
            step,
            call_index,
            versions,
        } => children::spawn(state, agent, step, call_index, versions),
        Command::JoinChildren { step, outcomes } => children::join(state, agent, step, &outcomes),
        Command::StartCompensation { index } | Command::CompensationReturned { index, .. } => {
            Err(Rejected::WrongCompensation { index, next: None })
        }
    }
}

fn llm_responded(
    state: &State,
    agent: &Agent,
    step: u32,
    message: Message,
    usage: Usage,
    model: String,
    cost_usd: Option<f64>,
) -> Result<Transition, Rejected> {
    let awaiting = matches!(state.status, Status::Pending | Status::AwaitingLlm);
    if !awaiting || step != state.steps + 1 {
        return Err(Rejected::WrongStep {
            step,
            at: state.steps,
            status: state.status,
        });
    }
    let max_steps = agent.spec.limits.max_steps;
    let mut events = Vec::new();
    let calls = message.tool_calls.clone();
    let content = message.content.clone().unwrap_or_default();
    events.push(Event::LlmCompleted {
        step,
        message,
        usage,
        model,
        cost_usd,
    });

    // A final answer (in the form `output_schema` asks for) completes the
    // run even if this call crossed a budget (its cost is spent either
    // way); anything else stops here.
    let output =
        (calls.is_empty() && !content.trim().is_empty()).then(|| agent.check_output(&content));
    let answered = matches!(output, Some(Ok(_)));
    if !answered && let Some(error) = over_budget(state, agent, usage, cost_usd) {
        return Ok(saga::stop(
            state,
            agent,
            events,
            Status::Failed,
            error,
            Some(code::BUDGET_EXCEEDED.into()),
        ));
    }

    if calls.is_empty() {
        if content.trim().is_empty() {
            let error = "the reply was empty: answer the request or call a tool".to_string();
            events.push(Event::LlmRejected {
                step,
                error: error.clone(),
            });
            return Ok(next_llm_or_fail(state, agent, events, step, Some(&error)));
        }
        let output = match output {
            Some(Ok(output)) => output,
            Some(Err(error)) => {
                events.push(Event::LlmRejected {
                    step,
                    error: error.clone(),
                });
                return Ok(next_llm_or_fail(state, agent, events, step, Some(&error)));
            }
            None => content,
        };
        events.push(Event::RunCompleted { output });
        return Ok(Transition {
            events,
            effects: Vec::new(),
        });
    }

    let mut valid = 0;
    let mut last_error = None;
    let mut gated = Vec::new();
    // Children this answer would start, for limits.max_children.
    let mut spawning = 0;
    for (index, call) in calls.iter().enumerate() {
        let checked = agent
            .check_arguments(&call.name, &call.arguments)
            .and_then(|arguments| {
                if agent.spawn_tool(&call.name).is_some() {
                    spawning += children::check_limits(state, agent, &arguments, spawning)?;
                }
                Ok(arguments)
            });
        match checked {
            Ok(arguments) => {
                valid += 1;
                if agent.needs_approval(&call.name, &arguments) {
                    gated.push((index as u32, call, arguments));
                }
            }
            Err(error) => {
                last_error = Some(error.clone());
                events.push(Event::ToolCallRejected {
                    step,
                    call_index: index as u32,
                    call_id: call.id.clone(),
                    tool: call.name.clone(),
                    error,
                });
            }
        }
    }
    if valid == 0 {
        return Ok(next_llm_or_fail(
            state,
            agent,
            events,
            step,
            last_error.as_deref(),
        ));
    }
    if step >= max_steps {
        return Ok(saga::stop(
            state,
            agent,
            events,
            Status::Failed,
            format!(
                "limits.max_steps ({max_steps}) reached: the model still asked for tools at step {step}"
            ),
            Some(code::MAX_STEPS.into()),
        ));
    }
    if !gated.is_empty() {
        // The step waits until every approval is decided; then its calls
        // (approved, and those that needed none) run together.
        for (call_index, call, arguments) in gated {
            events.push(approvals::request(
                agent,
                step,
                call_index,
                &call.id,
                &call.name,
                arguments,
                1,
                approvals::POLICY,
            ));
        }
        return Ok(Transition {
            events,
            effects: approvals::park(agent, step),
        });
    }
    Ok(Transition {
        events,
        effects: vec![Effect::CallTools { step }],
    })
}

/// The `code` of a `RunFailed` event, by kind of failure.
pub mod code {
    /// `limits.max_tokens_total` or `limits.max_cost` was reached.
    pub const BUDGET_EXCEEDED: &str = "budget_exceeded";
    /// `limits.max_steps` LLM calls without a final answer.
    pub const MAX_STEPS: &str = "max_steps";
    /// `limits.timeout` passed.
    pub const TIMEOUT: &str = "timeout";
    /// A tool call may or may not have happened and its tool's
    /// `on_uncertain` is `fail`.
    pub const UNCERTAIN_TOOL_CALL: &str = "uncertain_tool_call";
    /// A child run's task ran out of attempts and its parent's
    /// `spawn_agents` tool says `on_dead_letter: fail`.
    pub const DEAD_LETTERED: &str = "dead_lettered";
}

/// Why the run must stop, if the call just answered (`usage`, `cost_usd`)
/// takes it to a budget of its agent's limits. Reaching a budget exactly
/// stops too: the next call could only go over it.
fn over_budget(
    state: &State,
    agent: &Agent,
    usage: Usage,
    cost_usd: Option<f64>,
) -> Option<String> {
    let limits = &agent.spec.limits;
    let mut total = state.usage;
    total.add(usage);
    let tokens = total.input_tokens + total.output_tokens;
    if let Some(max) = limits.max_tokens_total
        && tokens >= max
    {
        return Some(format!(
            "budget_exceeded: limits.max_tokens_total ({max}) reached: the run has used {tokens} tokens after step {}",
            state.steps + 1
        ));
    }
    let cost = state.cost_usd + cost_usd.unwrap_or(0.0);
    if let Some(max) = limits.max_cost
        && cost >= max
    {
        return Some(format!(
            "budget_exceeded: limits.max_cost (${max}) reached: the run has cost ${cost:.6} after step {}",
            state.steps + 1
        ));
    }
    None
}

/// After a step whose calls all settled without running anything new: ask the
/// model again, unless the step budget is spent. `state` is the run
/// before `events`.
fn next_llm_or_fail(
    state: &State,
    agent: &Agent,
    events: Vec<Event>,
    step: u32,
    last_error: Option<&str>,
) -> Transition {
    let max_steps = agent.spec.limits.max_steps;
    if step >= max_steps {
        let mut error = format!("limits.max_steps ({max_steps}) reached without a final answer");
        if let Some(last) = last_error {
            error.push_str("; last error: ");
            error.push_str(last);
        }
        return saga::stop(
            state,
            agent,
            events,
            Status::Failed,
            error,
            Some(code::MAX_STEPS.into()),
        );
    }
    Transition {
        events,
        effects: vec![Effect::CallLlm { step: step + 1 }],
    }
}

/// Starts the calls of `step` that have no result. A call started before
/// without a result (the worker making it stopped, or the connection to its
/// MCP server was cut mid-call) may or may not have happened: its tool's
/// `on_uncertain` says whether it is made again with the same key, fails
/// the run, or waits for a human. While any call waits, none starts.
fn start_tools(state: &State, agent: &Agent, step: u32) -> Result<Transition, Rejected> {
    if state.status != Status::AwaitingTool || step != state.steps {
        return Err(Rejected::WrongStep {
            step,
            at: state.steps,
            status: state.status,
        });
    }
    let mut go = Vec::new();
    let mut ask = Vec::new();
    let mut failed = Vec::new();
    for (index, call) in state.calls.iter().enumerate() {
        let call_index = index as u32;
        if state.spawned(step, call_index) {
            // Its child runs exist: the call is made, its result is their fan-in.
            continue;
        }
        let (attempt, uncertain) = match call.state {
            // An external worker's call waits in its queue, whose leases
            // and attempts cover a worker that stops: not uncertain.
            CallState::Started { .. } if agent.queue_of(&call.call.name).is_some() => continue,
            CallState::Pending => (1, false),
            CallState::Started { attempts } => (attempts + 1, true),
            CallState::Done | CallState::Rejected => continue,
        };
        let decision = state
            .approval(&approval_id(step, call_index, attempt))
            .and_then(|a| a.decision.as_ref());
        // Edited by an approver, else as made before, else as the model wrote
        // them (validated when the answer arrived).
        let arguments = decision
            .and_then(|d| d.arguments.clone())
            .or_else(|| call.arguments.clone())
            .unwrap_or_else(|| {
                serde_json::from_str::<Value>(&call.call.arguments)
                    .unwrap_or_else(|_| Value::Object(Default::default()))
            });
        if uncertain {
            match agent.on_uncertain(&call.call.name) {
                OnUncertain::Retry => {}
                OnUncertain::Fail => {
                    failed.push(format!(
                        "`{}` (step {step}, call {call_index}, idempotency key {})",
                        call.call.name,
                        idempotency_key(state.run_id, step, call_index)
                    ));
                    continue;
                }
                OnUncertain::Ask => {
                    if !decision.is_some_and(|d| d.approved) {
                        ask.push((call_index, call, arguments, attempt));
                        continue;
                    }
                }
            }
        }
        go.push((call_index, call, arguments, attempt));
    }

    let mut transition = Transition::default();
    if !failed.is_empty() {
        return Ok(saga::stop(
            state,
            agent,
            Vec::new(),
            Status::Failed,
            format!(
                "tool call {} may or may not have happened (no result was saved: the worker making it stopped, or its connection to the tool's server was cut mid-call) and its tool's on_uncertain is `fail`",
                failed.join(", ")
            ),
            Some(code::UNCERTAIN_TOOL_CALL.into()),
        ));
    }
    if !ask.is_empty() {
        for (call_index, call, arguments, attempt) in ask {
            transition.events.push(approvals::request(
                agent,
                step,
                call_index,
                &call.call.id,
                &call.call.name,
                arguments,
                attempt,
                approvals::UNCERTAIN,
            ));
        }
        transition.effects = approvals::park(agent, step);
        return Ok(transition);
    }
    for (call_index, call, arguments, attempt) in go {
        let key = idempotency_key(state.run_id, step, call_index);
        transition.events.push(Event::ToolCallStarted {
            step,
            call_index,
            call_id: call.call.id.clone(),
            tool: call.call.name.clone(),
            arguments: arguments.clone(),
            idempotency_key: key.clone(),
            attempt,
        });
        transition.effects.push(Effect::InvokeTool(Invocation {
            step,
            call_index,
            tool: call.call.name.clone(),
            arguments,
            idempotency_key: key,
            attempt,
        }));
    }
    Ok(transition)
}

fn tool_returned(
    state: &State,
    agent: &Agent,
    step: u32,
    call_index: u32,
    output: String,
    is_error: bool,
) -> Result<Transition, Rejected> {
    if state.status != Status::AwaitingTool || step != state.steps {
        return Err(Rejected::WrongStep {
            step,
            at: state.steps,
            status: state.status,
        });
    }
    let Some(call) = state.calls.get(call_index as usize) else {
        return Err(Rejected::NotInFlight { step, call_index });
    };
    if !matches!(call.state, CallState::Started { .. }) {
        return Err(Rejected::NotInFlight { step, call_index });
    }
    let events = vec![Event::ToolCallCompleted {
        step,
        call_index,
        call_id: call.call.id.clone(),
        output,
        is_error,
    }];
    Ok(after_results(state, agent, step, events))
}

/// After results of `step`'s calls: the model is next once every call has
/// one; the run parks when only calls waiting for child runs are left;
/// otherwise other calls are still being made.
fn after_results(state: &State, agent: &Agent, step: u32, events: Vec<Event>) -> Transition {
    let mut next = state.clone();
    for event in &events {
        next.apply_next(event, 0);
    }
    match next.status {
        Status::AwaitingLlm => next_llm_or_fail(state, agent, events, step, None),
        Status::AwaitingChildren if state.status != Status::AwaitingChildren => Transition {
            events,
            effects: vec![Effect::AwaitChildren { step }],
        },
        _ => Transition {
            events,
            effects: Vec::new(),
        },
    }
}
