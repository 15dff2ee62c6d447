//! Decomposition: `spawn_agents` calls start child runs (fan-out), the run
//! parks in `AWAITING_CHILDREN`, and once every child of a call is over the
//! call's result is their outcomes, in the order requested (fan-in).
//!
//! A `spawn_agents` call is a tool call like the others: it is validated
//! when the answer arrives (schema, then the limits: `max_depth`,
//! `max_fan_out`, `max_children`; an error goes back to the model), and
//! started (`ToolCallStarted`). Making it ([`spawn`]) journals
//! `ChildrenSpawned` and asks for the child runs to be created in the same
//! commit ([`Effect::SpawnChildren`]), with ids derived from this run's id
//! and the call's position ([`RunId::child`]), so a spawn decided twice
//! names the same children. A child's failure is a result, not a failure
//! of this run: the model decides what to do with it.

use serde_json::{Value, json};

use super::{Effect, Rejected, State, Status, Transition, after_results};
use crate::event::{Event, ParentLink, SpawnedChild};
use crate::ids::RunId;
use crate::spec::Agent;

/// A child run to create: what its `RunSubmitted` says.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildRun {
    /// Its id ([`RunId::child`]).
    pub run_id: RunId,
    /// Its agent.
    pub agent: String,
    /// The agent version it is pinned to.
    pub version: String,
    /// Its input.
    pub input: Value,
    /// Where it comes from.
    pub parent: ParentLink,
}

/// How a child run stands, as the store has it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChildOutcome {
    /// The child run.
    pub run_id: RunId,
    /// Its status.
    pub status: Status,
    /// Its answer, if completed.
    pub output: Option<String>,
    /// Its failure or cancel reason.
    pub error: Option<String>,
}

/// The `(agent, input)` tasks of validated `spawn_agents` arguments.
pub fn spawn_tasks(arguments: &Value) -> Vec<(String, Value)> {
    let Some(tasks) = arguments.get("tasks").and_then(Value::as_array) else {
        return Vec::new();
    };
    tasks
        .iter()
        .map(|task| {
            let agent = task
                .get("agent")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let input = task.get("input").cloned().unwrap_or(Value::Null);
            (agent, input)
        })
        .collect()
}

/// Checks a `spawn_agents` call against the run's limits; `earlier`
/// children are asked for by calls before it in the same answer. Returns
/// how many children it starts; the error is written for the model.
pub(super) fn check_limits(
    state: &State,
    agent: &Agent,
    arguments: &Value,
    earlier: u32,
) -> Result<u32, String> {
    let limits = &agent.spec.limits;
    if state.depth >= limits.max_depth {
        return Err(format!(
            "limits.max_depth ({}) reached: this run is at depth {} and may not start child runs; do the work yourself",
            limits.max_depth, state.depth
        ));
    }
    let asked = spawn_tasks(arguments).len() as u32;
    if asked > limits.max_fan_out {
        return Err(format!(
            "limits.max_fan_out ({}): one spawn_agents call may start at most {} child runs, not {asked}; split the work",
            limits.max_fan_out, limits.max_fan_out
        ));
    }
    let total = state.children.len() as u32 + earlier + asked;
    if total > limits.max_children {
        let left = limits
            .max_children
            .saturating_sub(state.children.len() as u32 + earlier);
        return Err(format!(
            "limits.max_children ({}): this run may start {left} more child runs, not {asked}",
            limits.max_children
        ));
    }
    Ok(asked)
}

/// Makes a started `spawn_agents` call: its children start, pinned to
/// `versions`; an agent that is not registered fails the call instead.
pub(super) fn spawn(
    state: &State,
    agent: &Agent,
    step: u32,
    call_index: u32,
    versions: Vec<Option<String>>,
) -> Result<Transition, Rejected> {
    if state.status != Status::AwaitingTool || step != state.steps {
        return Err(Rejected::WrongStep {
            step,
            at: state.steps,
            status: state.status,
        });
    }
    let call = match state.calls.get(call_index as usize) {
        Some(call)
            if matches!(call.state, super::CallState::Started { .. })
                && !state.spawned(step, call_index)
                && agent.spawn_tool(&call.call.name).is_some() =>
        {
            call
        }
        _ => return Err(Rejected::NotInFlight { step, call_index }),
    };
    let arguments = call.arguments.clone().unwrap_or(Value::Null);
    let tasks = spawn_tasks(&arguments);
    if tasks.len() != versions.len() {
        return Err(Rejected::InvalidDecision(format!(
            "spawn_agents call {call_index} of step {step} has {} tasks, {} versions were given",
            tasks.len(),
            versions.len()
        )));
    }
    let missing: Vec<String> = tasks
        .iter()
        .zip(&versions)
        .filter(|(_, version)| version.is_none())
        .map(|((name, _), _)| format!("`{}`", agent.spawned_name(name)))
        .collect();
    if !missing.is_empty() {
        let events = vec![Event::ToolCallCompleted {
            step,
            call_index,
            call_id: call.call.id.clone(),
            output: format!(
                "no child run was started: agent {} is not registered",
                missing.join(", ")
            ),
            is_error: true,
        }];
        return Ok(after_results(state, agent, step, events));
    }

    let on_dead_letter = agent
        .spawn_tool(&call.call.name)
        .and_then(|tool| tool.on_dead_letter)
        .unwrap_or_default();
    let mut spawned = Vec::with_capacity(tasks.len());
    let mut runs = Vec::with_capacity(tasks.len());
    for (index, ((name, input), version)) in tasks.into_iter().zip(versions).enumerate() {
        let index = index as u32;
        let run_id = state.run_id.child(step, call_index, index);
        let name = agent.spawned_name(&name).to_string();
        let version = version.unwrap_or_default();
        spawned.push(SpawnedChild {
            run_id,
            agent: name.clone(),
            version: version.clone(),
        });
        runs.push(ChildRun {
            run_id,
            agent: name,
            version,
            input,
            parent: ParentLink {
                run_id: state.run_id,
                step,
                call_index,
                index,
                depth: state.depth + 1,
                on_dead_letter,
            },
        });
    }
    let events = vec![Event::ChildrenSpawned {
        step,
        call_index,
        children: spawned,
    }];
    let mut transition = after_results(state, agent, step, events);
    transition.effects.insert(0, Effect::SpawnChildren(runs));
    Ok(transition)
}

/// The fan-in: each waiting `spawn_agents` call of `step` whose children
/// are all over in `outcomes` gets their outcomes as its result, as a JSON
/// array in task order of `{agent, run_id, status, output}` (or `error`).
pub(super) fn join(
    state: &State,
    agent: &Agent,
    step: u32,
    outcomes: &[ChildOutcome],
) -> Result<Transition, Rejected> {
    if state.status != Status::AwaitingChildren || step != state.steps {
        return Err(Rejected::WrongStep {
            step,
            at: state.steps,
            status: state.status,
        });
    }
    let mut events = Vec::new();
    for (index, call) in state.calls.iter().enumerate() {
        let call_index = index as u32;
        if matches!(
            call.state,
            super::CallState::Done | super::CallState::Rejected
        ) || !state.spawned(step, call_index)
        {
            continue;
        }
        let mut results = Vec::new();
        for child in state
            .children
            .iter()
            .filter(|c| c.step == step && c.call_index == call_index)
        {
            let over = outcomes
                .iter()
                .find(|o| o.run_id == child.run_id && o.status.is_terminal());
            let Some(outcome) = over else {
                break;
            };
            let mut result = json!({
                "agent": child.agent,
                "run_id": child.run_id.to_string(),
                "status": outcome.status.as_str(),
            });
            if outcome.status == Status::Completed {
                result["output"] = Value::String(outcome.output.clone().unwrap_or_default());
            } else {
                result["error"] = Value::String(
                    outcome
                        .error
                        .clone()
                        .unwrap_or_else(|| outcome.status.as_str().to_lowercase()),
                );
            }
            results.push(result);
        }
        let expected = state
            .children
            .iter()
            .filter(|c| c.step == step && c.call_index == call_index)
            .count();
        if results.len() < expected {
            continue;
        }
        events.push(Event::ToolCallCompleted {
            step,
            call_index,
            call_id: call.call.id.clone(),
            output: Value::Array(results).to_string(),
            is_error: false,
        });
    }
    if events.is_empty() {
        return Ok(Transition::default());
    }
    Ok(after_results(state, agent, step, events))
}
