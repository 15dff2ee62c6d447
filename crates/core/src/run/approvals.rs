//! Approvals: requesting them, deciding them, and the timeout policy.
//!
//! A step whose calls need approval parks (`AWAITING_APPROVAL`) with one
//! `ApprovalRequested` per gated call and no tools task; the effects arm a
//! timer and a notification. Each decision is an `ApprovalDecided`; the one
//! that decides the step's last pending approval resumes it: the calls left
//! are scheduled (`CallTools`), or, when every call was rejected, the model
//! is asked again with the rejections as the calls' results.

use serde_json::Value;

use super::{Effect, Rejected, State, Status, Transition, approval_id, next_llm_or_fail};
use crate::approval::OnTimeout;
use crate::event::Event;
use crate::ids::Millis;
use crate::spec::{Agent, human_duration};

/// `reason` of an approval an approval rule asked for.
pub const POLICY: &str = "policy";
/// `reason` of an approval to repeat an uncertain call.
pub const UNCERTAIN: &str = "uncertain";
/// Who decides when the timeout policy rejects.
pub const TIMEOUT_DECIDER: &str = "keel:timeout";

/// The event asking for a decision on attempt `attempt` of a call.
#[allow(clippy::too_many_arguments)]
pub(super) fn request(
    agent: &Agent,
    step: u32,
    call_index: u32,
    call_id: &str,
    tool: &str,
    arguments: Value,
    attempt: u32,
    reason: &str,
) -> Event {
    Event::ApprovalRequested {
        approval_id: approval_id(step, call_index, attempt),
        step,
        call_index,
        call_id: call_id.to_string(),
        tool: tool.to_string(),
        arguments,
        attempt,
        reason: reason.to_string(),
        timeout_ms: agent
            .spec
            .approvals
            .timeout
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
    }
}

/// The effects of parking `step`: its timer, and its notification when a
/// webhook is configured.
pub(super) fn park(agent: &Agent, step: u32) -> Vec<Effect> {
    let mut effects = vec![Effect::AwaitApproval { step }];
    if agent.spec.approvals.notify.is_some() {
        effects.push(Effect::Notify { step });
    }
    effects
}

/// Someone decides approval `id`.
pub(super) fn decide(
    state: &State,
    agent: &Agent,
    id: &str,
    approved: bool,
    by: String,
    reason: Option<String>,
    arguments: Option<Value>,
) -> Result<Transition, Rejected> {
    let Some(approval) = state.approval(id) else {
        return Err(Rejected::UnknownApproval(id.to_string()));
    };
    if let Some(decision) = &approval.decision {
        return Err(Rejected::AlreadyDecided {
            id: id.to_string(),
            by: decision.by.clone(),
            approved: decision.approved,
        });
    }
    let arguments = match arguments {
        Some(_) if !approved => {
            return Err(Rejected::InvalidDecision(
                "arguments can only be edited when approving".into(),
            ));
        }
        Some(_) if approval.attempt > 1 => {
            return Err(Rejected::InvalidDecision(format!(
                "approval `{id}` repeats a call that may have happened: it is made again with the same arguments and idempotency key, so they cannot be edited"
            )));
        }
        Some(edited) => {
            agent
                .check_arguments(&approval.tool, &edited.to_string())
                .map_err(Rejected::InvalidDecision)?;
            Some(edited)
        }
        None => None,
    };
    let events = vec![Event::ApprovalDecided {
        approval_id: id.to_string(),
        step: approval.step,
        call_index: approval.call_index,
        approved,
        by,
        reason,
        arguments,
    }];
    Ok(resume(state, agent, approval.step, events))
}

/// Applies `approvals.on_timeout` to the approvals past their deadline at
/// `now` (none: nothing happens).
pub(super) fn timeout(state: &State, agent: &Agent, now: Millis) -> Transition {
    if state.status != Status::AwaitingApproval {
        return Transition::default();
    }
    let due: Vec<_> = state
        .pending_approvals()
        .filter(|a| !a.escalated && a.deadline.is_some_and(|d| d <= now))
        .collect();
    let Some(first) = due.first() else {
        return Transition::default();
    };
    let step = first.step;
    let policy = &agent.spec.approvals;
    match policy.on_timeout {
        OnTimeout::Reject => {
            let waited = policy
                .timeout
                .map(human_duration::format)
                .unwrap_or_else(|| "its timeout".into());
            let events = due
                .iter()
                .map(|a| Event::ApprovalDecided {
                    approval_id: a.id.clone(),
                    step: a.step,
                    call_index: a.call_index,
                    approved: false,
                    by: TIMEOUT_DECIDER.into(),
                    reason: Some(format!(
                        "nobody decided within approvals.timeout ({waited})"
                    )),
                    arguments: None,
                })
                .collect();
            resume(state, agent, step, events)
        }
        OnTimeout::Escalate => {
            let mut effects = vec![Effect::AwaitApproval { step }];
            if policy.escalate_to.is_some() || policy.notify.is_some() {
                effects.push(Effect::Notify { step });
            }
            Transition {
                events: vec![Event::ApprovalEscalated {
                    step,
                    approval_ids: due.iter().map(|a| a.id.clone()).collect(),
                }],
                effects,
            }
        }
    }
}

/// After decisions: once none is pending, the step goes on.
fn resume(state: &State, agent: &Agent, step: u32, events: Vec<Event>) -> Transition {
    let mut next = state.clone();
    for event in &events {
        next.apply_next(event, 0);
    }
    match next.status {
        Status::AwaitingTool => Transition {
            events,
            effects: vec![Effect::CallTools { step }],
        },
        Status::AwaitingLlm => next_llm_or_fail(state, agent, events, step, None),
        _ => Transition {
            events,
            effects: Vec::new(),
        },
    }
}
