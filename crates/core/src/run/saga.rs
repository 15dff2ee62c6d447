//! Sagas: a run that fails or is cancelled after successful calls of tools
//! declaring `compensate` undoes them before it ends.
//!
//! [`stop`] is how every failure and cancel ends a run: with nothing to
//! undo it journals `RunFailed`/`RunCancelled` at once; otherwise
//! `RunCompensating` with the plan (the calls' compensations in reverse
//! journal order, their templates filled) and the effect `Compensate{0}`.
//! Each compensation is then started (`CompensationStarted`, journaled
//! before the call, with the key `<run_id>:compensate:<step>:<call_index>`)
//! and settled (`CompensationCompleted`/`CompensationFailed`), one at a
//! time; a failed one does not stop the others. After the last,
//! `RunCompensated{completed, failed}` and the run's own end.

use super::{
    CompensationState, Effect, Invocation, Rejected, State, Status, Transition, compensation_key,
};
use crate::event::{Compensation, Event};
use crate::spec::Agent;

/// Ends the run as `outcome` (`FAILED` or `CANCELLED`) after `events`:
/// at once, or by compensating first.
pub(super) fn stop(
    state: &State,
    agent: &Agent,
    mut events: Vec<Event>,
    outcome: Status,
    error: String,
    code: Option<String>,
) -> Transition {
    debug_assert!(matches!(outcome, Status::Failed | Status::Cancelled));
    let compensations = if agent.has_compensations() {
        let mut next = state.clone();
        for event in &events {
            next.apply_next(event, 0);
        }
        plan(&next, agent)
    } else {
        Vec::new()
    };
    if compensations.is_empty() {
        events.push(end(outcome, error, code));
        return Transition {
            events,
            effects: Vec::new(),
        };
    }
    events.push(Event::RunCompensating {
        outcome,
        error,
        code,
        compensations,
    });
    Transition {
        events,
        effects: vec![Effect::Compensate { index: 0 }],
    }
}

/// The run's last event.
fn end(outcome: Status, error: String, code: Option<String>) -> Event {
    match outcome {
        Status::Cancelled => Event::RunCancelled { reason: error },
        _ => Event::RunFailed { error, code },
    }
}

/// The compensations of the calls that succeeded, last call first.
fn plan(state: &State, agent: &Agent) -> Vec<Compensation> {
    let mut plan = Vec::new();
    for call in state.succeeded.iter().rev() {
        let Some(compensate) = agent.compensation(&call.tool) else {
            continue;
        };
        let rendered = crate::saga::render(&compensate.arguments, &call.arguments, &call.output);
        let (arguments, error) = match rendered {
            Ok(arguments) => (arguments, None),
            Err(e) => (
                serde_json::Value::Null,
                Some(format!(
                    "the compensate.arguments template of `{}` cannot be filled: {e}",
                    call.tool
                )),
            ),
        };
        plan.push(Compensation {
            step: call.step,
            call_index: call.call_index,
            call_tool: call.tool.clone(),
            tool: compensate.tool.clone(),
            arguments,
            idempotency_key: compensation_key(state.run_id, call.step, call.call_index),
            error,
        });
    }
    plan
}

/// Starts compensation `index` (again, after a crash: the same key), or
/// fails it at once when its arguments are unusable.
pub(super) fn start(state: &State, agent: &Agent, index: u32) -> Result<Transition, Rejected> {
    let saga = next_is(state, index)?;
    let Some(c) = saga.compensations.get(index as usize) else {
        return Err(Rejected::WrongCompensation { index, next: None });
    };
    let plan = &c.plan;
    let problem = match &plan.error {
        Some(error) => Some(error.clone()),
        None => agent
            .check_arguments(&plan.tool, &plan.arguments.to_string())
            .err(),
    };
    if let Some(error) = problem {
        let events = vec![Event::CompensationFailed {
            index,
            step: plan.step,
            call_index: plan.call_index,
            error,
        }];
        return Ok(next(state, events));
    }
    let attempt = match c.state {
        CompensationState::Started { attempts } => attempts + 1,
        _ => 1,
    };
    Ok(Transition {
        events: vec![Event::CompensationStarted {
            index,
            step: plan.step,
            call_index: plan.call_index,
            tool: plan.tool.clone(),
            arguments: plan.arguments.clone(),
            idempotency_key: plan.idempotency_key.clone(),
            attempt,
        }],
        effects: vec![Effect::InvokeCompensation(Invocation {
            step: plan.step,
            call_index: plan.call_index,
            tool: plan.tool.clone(),
            arguments: plan.arguments.clone(),
            idempotency_key: plan.idempotency_key.clone(),
            attempt,
        })],
    })
}

/// Compensation `index` returned (an error result is its failure).
pub(super) fn returned(
    state: &State,
    index: u32,
    output: String,
    is_error: bool,
) -> Result<Transition, Rejected> {
    let saga = next_is(state, index)?;
    let Some(c) = saga.compensations.get(index as usize) else {
        return Err(Rejected::WrongCompensation { index, next: None });
    };
    if !matches!(c.state, CompensationState::Started { .. }) {
        return Err(Rejected::WrongCompensation {
            index,
            next: Some(index),
        });
    }
    let (step, call_index) = (c.plan.step, c.plan.call_index);
    let event = if is_error {
        Event::CompensationFailed {
            index,
            step,
            call_index,
            error: output,
        }
    } else {
        Event::CompensationCompleted {
            index,
            step,
            call_index,
            output,
        }
    };
    Ok(next(state, vec![event]))
}

/// The saga, if compensation `index` is the one to make now.
fn next_is(state: &State, index: u32) -> Result<&super::Saga, Rejected> {
    let saga = match (&state.saga, state.status) {
        (Some(saga), Status::Compensating) => saga,
        _ => return Err(Rejected::WrongCompensation { index, next: None }),
    };
    let next = saga.next();
    if next != Some(index) {
        return Err(Rejected::WrongCompensation { index, next });
    }
    Ok(saga)
}

/// After a compensation's outcome: the next one, or the run's end.
fn next(state: &State, mut events: Vec<Event>) -> Transition {
    let mut after = state.clone();
    for event in &events {
        after.apply_next(event, 0);
    }
    let Some(saga) = &after.saga else {
        return Transition {
            events,
            effects: Vec::new(),
        };
    };
    if let Some(index) = saga.next() {
        return Transition {
            events,
            effects: vec![Effect::Compensate { index }],
        };
    }
    let (completed, failed) = saga.counts();
    events.push(Event::RunCompensated { completed, failed });
    events.push(end(saga.outcome, saga.error.clone(), saga.code.clone()));
    Transition {
        events,
        effects: Vec::new(),
    }
}
