//! Human-readable progress lines for a run's events, shared by `keel run`
//! and `keel watch`.

use std::io::Write;

use keel_core::Event;
use keel_core::event::Recorded;
use keel_core::spec::clip;

/// Prints one line per event to stdout, with times relative to the first.
pub struct Printer {
    started: Option<i64>,
}

impl Default for Printer {
    fn default() -> Self {
        Self::new()
    }
}

impl Printer {
    /// A printer that has seen nothing yet.
    pub fn new() -> Self {
        Self { started: None }
    }

    /// Prints the line of one event.
    pub fn print(&mut self, recorded: &Recorded) {
        let line = self.line(recorded);
        let mut out = std::io::stdout().lock();
        // A closed stdout (a pipe into `head`) is not an error worth failing on.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// The line of one event.
    pub fn line(&mut self, recorded: &Recorded) -> String {
        let start = *self.started.get_or_insert(recorded.at);
        let t = format!("{:>7.3}s", (recorded.at - start) as f64 / 1000.0);
        let seq = format!("#{:<3}", recorded.seq);
        let what = match &recorded.event {
            Event::RunSubmitted {
                agent,
                version,
                input,
                ..
            } => {
                format!(
                    "submitted      agent {agent} v{version}, input {}",
                    clip(&input.to_string(), 80)
                )
            }
            Event::LlmCompleted {
                step,
                message,
                usage,
                cost_usd,
                ..
            } => {
                let mut parts = Vec::new();
                for call in &message.tool_calls {
                    parts.push(format!("{}({})", call.name, clip(&call.arguments, 60)));
                }
                let said = match (&message.content, parts.is_empty()) {
                    (Some(c), true) => format!("answered: {}", clip(&one_line(c), 70)),
                    (_, false) => format!("calls {}", parts.join(", ")),
                    (None, true) => "answered nothing".into(),
                };
                let cost = cost_usd.map_or(String::new(), |c| format!(", ${c:.4}"));
                format!(
                    "step {step:<3} llm  {said}  [{} in / {} out tokens{cost}]",
                    usage.input_tokens, usage.output_tokens
                )
            }
            Event::LlmRejected { step, error } => {
                format!("step {step:<3} llm  reply rejected: {error}")
            }
            Event::ToolCallRejected {
                step, tool, error, ..
            } => {
                format!("step {step:<3} tool {tool} rejected: {}", clip(error, 100))
            }
            Event::ToolCallStarted {
                step,
                tool,
                idempotency_key,
                attempt,
                ..
            } => {
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt}, uncertain retry)")
                } else {
                    String::new()
                };
                format!("step {step:<3} tool {tool} started, key {idempotency_key}{again}")
            }
            Event::ToolCallCompleted {
                step,
                output,
                is_error,
                ..
            } => {
                let tag = if *is_error { "error" } else { "ok" };
                format!("step {step:<3} tool {tag}: {}", clip(&one_line(output), 90))
            }
            Event::ChildrenSpawned { step, children, .. } => {
                let mut agents: Vec<&str> = children.iter().map(|c| c.agent.as_str()).collect();
                agents.dedup();
                format!(
                    "step {step:<3} spawned {} child runs ({}), waiting for them",
                    children.len(),
                    agents.join(", ")
                )
            }
            Event::ApprovalRequested {
                approval_id,
                step,
                tool,
                arguments,
                reason,
                ..
            } => {
                let why = if reason == "uncertain" {
                    " (repeat of a call that may have happened)"
                } else {
                    ""
                };
                format!(
                    "step {step:<3} approval {approval_id} needed: {tool}({}){why}",
                    clip(&arguments.to_string(), 60)
                )
            }
            Event::ApprovalDecided {
                approval_id,
                step,
                approved,
                by,
                reason,
                ..
            } => {
                let how = if *approved { "approved" } else { "rejected" };
                let why = reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(": {}", clip(r, 80)));
                format!("step {step:<3} approval {approval_id} {how} by {by}{why}")
            }
            Event::ApprovalEscalated {
                step, approval_ids, ..
            } => {
                format!(
                    "step {step:<3} approval {} escalated (nobody decided in time)",
                    approval_ids.join(", ")
                )
            }
            Event::TaskDeadLettered {
                kind,
                step,
                attempts,
                error,
                ..
            } => {
                format!(
                    "step {step:<3} {kind} task dead-lettered after {attempts} attempts: {}",
                    clip(error, 100)
                )
            }
            Event::RunCompensating {
                outcome,
                error,
                compensations,
                ..
            } => {
                format!(
                    "compensating   {} compensation(s), then {}: {}",
                    compensations.len(),
                    outcome.as_str(),
                    clip(error, 80)
                )
            }
            Event::CompensationStarted {
                step,
                tool,
                idempotency_key,
                attempt,
                ..
            } => {
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                format!("step {step:<3} undo {tool} started, key {idempotency_key}{again}")
            }
            Event::CompensationCompleted { step, output, .. } => {
                format!("step {step:<3} undo ok: {}", clip(&one_line(output), 90))
            }
            Event::CompensationFailed { step, error, .. } => {
                format!("step {step:<3} undo failed: {}", clip(&one_line(error), 90))
            }
            Event::RunCompensated { completed, failed } => {
                format!("compensated    {completed} completed, {failed} failed")
            }
            Event::LlmParked { step, reason, .. } => {
                format!("step {step:<3} waiting: {}", clip(&one_line(reason), 90))
            }
            Event::TaskRedriven { task_id } => format!("redriven       task {task_id}"),
            Event::RunCompleted { .. } => "completed".into(),
            Event::RunFailed { error, .. } => format!("failed: {error}"),
            Event::RunCancelled { reason } => format!("cancelled: {reason}"),
        };
        format!("{t} {seq} {what}")
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
