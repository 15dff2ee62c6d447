//! Callbacks: a run submitted with `callback_url` is POSTed its terminal
//! result and every park that needs someone (awaiting approval, a task
//! dead-lettered, every circuit breaker of its model open), signed like
//! the webhooks (`webhook.rs`).
//!
//! Each POST is a `callback` task created in the same commit as the event
//! it reports (its `step` is that event's seq), so it is durable: retried
//! with backoff by the queue, taken over when a worker dies, dead-lettered
//! after its last attempt. A callback task still runs after the run ended
//! (the terminal commit clears every other task, not the ones it creates).

use keel_core::run::State;
use keel_core::{Event, Millis, Recorded};
use keel_store::{NewTask, TaskKind};
use serde_json::{Value, json};

use crate::webhook;

/// The `callback` tasks a commit of `events` after `state` (the fold
/// before them) causes: one per terminal or dead-letter event, and one for
/// the first approval requested. None without a `callback_url`.
pub fn tasks(state: &State, events: &[Event], now: Millis) -> Vec<NewTask> {
    if state.callback_url.is_none() {
        return Vec::new();
    }
    let mut tasks = Vec::new();
    let mut approval = false;
    for (i, event) in events.iter().enumerate() {
        let reported = match event {
            Event::ApprovalRequested { .. } => !std::mem::replace(&mut approval, true),
            // A callback that could not be delivered is not reported by
            // another callback (it would fail the same way, forever).
            Event::TaskDeadLettered { kind, .. } => kind != TaskKind::Callback.as_str(),
            Event::LlmParked { .. } => true,
            event => event.is_terminal(),
        };
        if !reported {
            continue;
        }
        let seq = state.seq + 1 + i as i64;
        let Ok(step) = u32::try_from(seq) else {
            continue;
        };
        tasks.push(NewTask {
            kind: TaskKind::Callback,
            step,
            priority: state.priority,
            max_attempts: webhook::MAX_ATTEMPTS,
            run_at: now,
            lease_to: None,
            queue: None,
        });
    }
    tasks
}

/// The body of the callback about `event` (journaled at `event.seq`) of
/// the run folded into `state` (as it is now).
pub fn body(state: &State, event: &Recorded, now: Millis) -> Value {
    let kind = match &event.event {
        Event::RunCompleted { .. } => "run.completed",
        Event::RunFailed { .. } => "run.failed",
        Event::RunCancelled { .. } => "run.cancelled",
        Event::ApprovalRequested { .. } => "run.awaiting_approval",
        Event::TaskDeadLettered { .. } => "run.dead_lettered",
        Event::LlmParked { .. } => "run.breaker_open",
        _ => "run.event",
    };
    let code = match &event.event {
        Event::RunFailed { code, .. } => code.clone(),
        _ => None,
    };
    let approvals: Vec<Value> = state
        .pending_approvals()
        .map(|a| {
            json!({
                "id": a.id,
                "tool": a.tool,
                "arguments": a.arguments,
                "reason": a.reason,
                "decide": format!("/v1/runs/{}/approvals/{}", state.run_id, a.id),
            })
        })
        .collect();
    json!({
        "type": kind,
        "run_id": state.run_id.to_string(),
        "tenant": state.tenant,
        "agent": state.agent,
        "version": state.version,
        "status": state.status.as_str(),
        "seq": event.seq,
        "event": event.event,
        "output": state.output,
        "error": state.error,
        "code": code,
        "approvals": approvals,
        "usage": state.usage,
        "cost_usd": state.cost_usd,
        "sent_at": now,
    })
}
