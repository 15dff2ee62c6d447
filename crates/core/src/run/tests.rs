//! State-machine tests: commands in, events and effects out, no I/O.

use proptest::prelude::*;
use serde_json::json;

use super::*;
use crate::event::Recorded;
use crate::message::ToolCall;

fn agent(max_steps: u32) -> Agent {
    agent_with_limits(&format!("max_steps: {max_steps}"))
}

fn agent_with_limits(limits: &str) -> Agent {
    agent_with(limits, "{}")
}

/// The test agent: `echo` (idempotent), `pay` (needs approval above 100,
/// asks when uncertain: the default of a tool not declared idempotent),
/// `nuke` (fails the run when uncertain) and `book`, undone by `unbook`
/// with the booking id of its result, with `limits` and `approvals`.
fn agent_with(limits: &str, approvals: &str) -> Agent {
    parse(&spec_yaml(limits, approvals))
}

fn parse(yaml: &str) -> Agent {
    match Agent::parse(yaml) {
        Ok(agent) => agent,
        Err(e) => panic!("test spec is invalid: {e}"),
    }
}

/// The YAML of [`agent_with`].
fn spec_yaml(limits: &str, approvals: &str) -> String {
    format!(
        r#"
name: t
version: 1
model: {{provider: openai, model: m, base_url: "http://127.0.0.1:1"}}
tools:
  - name: echo
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    http: {{url: "http://127.0.0.1:2/echo"}}
    idempotent: true
  - name: pay
    parameters: {{type: object, properties: {{amount: {{type: number}}}}, required: [amount]}}
    http: {{url: "http://127.0.0.1:2/pay"}}
    requires_approval: {{when: {{path: /amount, gt: 100}}}}
  - name: nuke
    parameters: {{type: object}}
    http: {{url: "http://127.0.0.1:2/nuke"}}
    on_uncertain: fail
  - name: spawn
    builtin: spawn_agents
    agents: [worker, self]
  - name: book
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    http: {{url: "http://127.0.0.1:2/book"}}
    idempotent: true
    compensate:
      tool: unbook
      arguments: {{n: "{{{{call.arguments.n}}}}", id: "{{{{result.id}}}}", note: "undo {{{{call.arguments.n}}}}"}}
  - name: unbook
    parameters: {{type: object, properties: {{n: {{type: integer}}, id: {{type: integer}}}}, required: [n, id]}}
    http: {{url: "http://127.0.0.1:2/unbook"}}
limits: {{{limits}}}
approvals: {approvals}
"#
    )
}

/// A run, folded incrementally, with its journal kept for replay checks.
struct Run {
    state: State,
    journal: Vec<Recorded>,
    effects: Vec<Effect>,
    now: i64,
}

impl Run {
    fn new() -> Run {
        let mut run = Run {
            state: State::new(RunId::new()),
            journal: Vec::new(),
            effects: Vec::new(),
            now: 1_000,
        };
        run.commit(submit(
            "default",
            "t",
            "1",
            json!("hello"),
            Priority::new(7).unwrap(),
        ));
        run
    }

    fn commit(&mut self, transition: Transition) {
        for event in transition.events {
            self.now += 1;
            let recorded = Recorded {
                seq: self.state.seq + 1,
                at: self.now,
                event,
            };
            self.state.apply(&recorded);
            self.journal.push(recorded);
        }
        self.effects.extend(transition.effects);
    }

    fn send(&mut self, agent: &Agent, command: Command) -> Result<(), Rejected> {
        let transition = handle(&self.state, agent, command)?;
        self.commit(transition);
        Ok(())
    }
}

fn answer(calls: &[(&str, &str)], content: Option<&str>) -> Message {
    let calls = calls
        .iter()
        .enumerate()
        .map(|(i, (name, args))| ToolCall {
            id: format!("c{i}"),
            name: name.to_string(),
            arguments: args.to_string(),
        })
        .collect();
    Message::assistant(content.map(str::to_string), calls)
}

fn responded(step: u32, message: Message) -> Command {
    Command::LlmResponded {
        step,
        message,
        usage: Usage {
            input_tokens: 10,
            output_tokens: 5,
        },
        model: "m".into(),
        cost_usd: Some(0.25),
    }
}

#[test]
fn a_tool_step_then_an_answer_completes_the_run() {
    let agent = agent(5);
    let mut run = Run::new();
    assert_eq!(run.effects, vec![Effect::CallLlm { step: 1 }]);

    run.send(
        &agent,
        responded(1, answer(&[("echo", r#"{"n":1}"#)], None)),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingTool);
    assert_eq!(run.effects.last(), Some(&Effect::CallTools { step: 1 }));

    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    let Some(Effect::InvokeTool(inv)) = run.effects.last().cloned() else {
        panic!("expected an invocation, got {:?}", run.effects)
    };
    assert_eq!(inv.idempotency_key, format!("{}:1:0", run.state.run_id));
    assert_eq!(inv.arguments, json!({"n": 1}));
    assert_eq!(inv.attempt, 1);

    run.send(
        &agent,
        Command::ToolReturned {
            step: 1,
            call_index: 0,
            output: "one".into(),
            is_error: false,
        },
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));

    // A duplicate answer for step 1 is refused: the step is never scheduled twice.
    let dup = run.send(&agent, responded(1, answer(&[], Some("late"))));
    assert!(matches!(dup, Err(Rejected::WrongStep { step: 1, .. })));

    run.send(&agent, responded(2, answer(&[], Some("done"))))
        .unwrap();
    assert_eq!(run.state.status, Status::Completed);
    assert_eq!(run.state.output.as_deref(), Some("done"));
    assert_eq!(run.state.usage.input_tokens, 20);
    // user, assistant(call), tool, assistant(answer)
    assert_eq!(run.state.messages.len(), 4);
    assert_eq!(
        handle(&run.state, &agent, Command::Cancel { reason: "x".into() }),
        Err(Rejected::Finished(Status::Completed))
    );
}

/// One tool step of the echo tool: the model asks, the tool answers.
fn tool_step(run: &mut Run, agent: &Agent, step: u32) -> Result<(), Rejected> {
    run.send(
        agent,
        responded(step, answer(&[("echo", r#"{"n":1}"#)], None)),
    )?;
    if run.state.status.is_terminal() {
        return Ok(());
    }
    run.send(agent, Command::StartTools { step })?;
    run.send(
        agent,
        Command::ToolReturned {
            step,
            call_index: 0,
            output: "one".into(),
            is_error: false,
        },
    )
}

fn failure_code(run: &Run) -> Option<&str> {
    run.journal.iter().rev().find_map(|r| match &r.event {
        Event::RunFailed { code, .. } => code.as_deref(),
        _ => None,
    })
}

#[test]
fn the_call_that_reaches_max_cost_stops_the_run_and_its_steps_stay() {
    // Each call costs $0.25: the third reaches $0.75.
    let agent = agent_with_limits("max_cost: 0.7");
    let mut run = Run::new();
    tool_step(&mut run, &agent, 1).unwrap();
    tool_step(&mut run, &agent, 2).unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    tool_step(&mut run, &agent, 3).unwrap();
    assert_eq!(run.state.status, Status::Failed);
    assert_eq!(failure_code(&run), Some("budget_exceeded"));
    let error = run.state.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("budget_exceeded: limits.max_cost ($0.7)"),
        "{error}"
    );
    assert!((run.state.cost_usd - 0.75).abs() < 1e-9);
    // The three answers are journaled; the third one's tool call never started.
    let answered = run
        .journal
        .iter()
        .filter(|r| matches!(r.event, Event::LlmCompleted { .. }))
        .count();
    let started = run
        .journal
        .iter()
        .filter(|r| matches!(r.event, Event::ToolCallStarted { .. }))
        .count();
    assert_eq!((answered, started), (3, 2));
    assert!(!run.effects.contains(&Effect::CallTools { step: 3 }));
}

#[test]
fn max_tokens_total_counts_input_and_output_of_every_call() {
    // 15 tokens per call: the second call reaches 30.
    let agent = agent_with_limits("max_tokens_total: 30");
    let mut run = Run::new();
    tool_step(&mut run, &agent, 1).unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    tool_step(&mut run, &agent, 2).unwrap();
    assert_eq!(run.state.status, Status::Failed);
    assert_eq!(failure_code(&run), Some("budget_exceeded"));
    let error = run.state.error.clone().unwrap_or_default();
    assert!(error.contains("limits.max_tokens_total (30)"), "{error}");
}

#[test]
fn a_final_answer_completes_the_run_even_on_the_budget() {
    let agent = agent_with_limits("max_cost: 0.5");
    let mut run = Run::new();
    tool_step(&mut run, &agent, 1).unwrap();
    run.send(&agent, responded(2, answer(&[], Some("done"))))
        .unwrap();
    assert_eq!(run.state.status, Status::Completed);
    assert!((run.state.cost_usd - 0.5).abs() < 1e-9);
}

#[test]
fn calls_without_a_price_cost_nothing() {
    let agent = agent_with_limits("max_cost: 0.1");
    let mut run = Run::new();
    let unpriced = Command::LlmResponded {
        step: 1,
        message: answer(&[("echo", r#"{"n":1}"#)], None),
        usage: Usage::default(),
        model: "m".into(),
        cost_usd: None,
    };
    run.send(&agent, unpriced).unwrap();
    assert_eq!(run.state.status, Status::AwaitingTool);
    assert_eq!(run.state.cost_usd, 0.0);
}

#[test]
fn max_steps_and_timeout_failures_carry_their_code() {
    let agent = agent(1);
    let mut run = Run::new();
    tool_step(&mut run, &agent, 1).unwrap();
    assert_eq!(failure_code(&run), Some("max_steps"));
    let mut run = Run::new();
    run.send(&agent, Command::Expire).unwrap();
    assert_eq!(failure_code(&run), Some("timeout"));
}

#[test]
fn malformed_calls_go_back_to_the_model_and_count_against_max_steps() {
    let agent = agent(3);
    let mut run = Run::new();
    let bad = [
        answer(&[("nope", "{}")], None),
        answer(&[("echo", "{not json")], None),
        answer(&[("echo", r#"{"n":"x"}"#)], None),
    ];
    for (i, message) in bad.into_iter().enumerate() {
        run.send(&agent, responded(i as u32 + 1, message)).unwrap();
    }
    let rejected: Vec<&str> = run
        .journal
        .iter()
        .filter_map(|r| match &r.event {
            Event::ToolCallRejected { error, .. } => Some(error.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(rejected.len(), 3);
    assert!(
        rejected[0].contains("unknown tool `nope`"),
        "{}",
        rejected[0]
    );
    assert!(rejected[1].contains("not valid JSON"), "{}", rejected[1]);
    assert!(rejected[2].contains("schema"), "{}", rejected[2]);
    // Each rejection is a tool message the model sees next time.
    assert!(run.state.messages.iter().any(|m| {
        m.content
            .as_deref()
            .is_some_and(|c| c.starts_with("error: unknown tool"))
    }));
    assert_eq!(run.state.status, Status::Failed);
    let error = run.state.error.clone().unwrap_or_default();
    assert!(error.contains("max_steps (3)"), "{error}");
    assert!(error.contains("schema"), "{error}");
}

#[test]
fn an_uncertain_call_is_restarted_with_the_same_key() {
    let agent = agent(5);
    let mut run = Run::new();
    run.send(
        &agent,
        responded(
            1,
            answer(&[("echo", r#"{"n":1}"#), ("echo", r#"{"n":2}"#)], None),
        ),
    )
    .unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    run.send(
        &agent,
        Command::ToolReturned {
            step: 1,
            call_index: 0,
            output: "a".into(),
            is_error: false,
        },
    )
    .unwrap();
    // The worker died before call 1 returned: starting again repeats only call 1.
    run.effects.clear();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    let invocations: Vec<&Invocation> = run
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::InvokeTool(inv) => Some(inv),
            _ => None,
        })
        .collect();
    assert_eq!(invocations.len(), 1);
    assert_eq!(invocations[0].call_index, 1);
    assert_eq!(invocations[0].attempt, 2);
    assert_eq!(
        invocations[0].idempotency_key,
        format!("{}:1:1", run.state.run_id)
    );
}

#[test]
fn empty_reply_is_corrected_and_expiry_fails_the_run() {
    let agent = agent(5);
    let mut run = Run::new();
    run.send(&agent, responded(1, answer(&[], Some("  "))))
        .unwrap();
    assert!(matches!(
        run.journal.last().map(|r| &r.event),
        Some(Event::LlmRejected { .. })
    ));
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));
    let limit = agent.spec.limits.timeout.as_millis() as i64;
    assert!(!expired(
        &run.state,
        &agent,
        run.state.created_at + limit - 1
    ));
    assert!(expired(&run.state, &agent, run.state.created_at + limit));
    run.send(&agent, Command::Expire).unwrap();
    assert_eq!(run.state.status, Status::Failed);
}

/// The test agent with an `output_schema`: `{"severity": "low" | "high"}`.
fn structured(max_steps: u32) -> Agent {
    let yaml = format!(
        "{}output_schema: {{type: object, required: [severity], properties: {{severity: {{enum: [low, high]}}}}, additionalProperties: false}}\n",
        spec_yaml(&format!("max_steps: {max_steps}"), "{}")
    );
    parse(&yaml)
}

#[test]
fn an_answer_off_the_output_schema_is_corrected_as_a_step() {
    let agent = structured(3);
    assert!(agent.system_prompt().contains("\"severity\""));
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[], Some("It looks high to me."))),
    )
    .unwrap();
    let Some(Event::LlmRejected { error, .. }) = run.journal.last().map(|r| &r.event) else {
        panic!("prose is not JSON: {:?}", run.journal.last())
    };
    assert!(error.contains("not JSON"), "{error}");
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));
    // The model sees its answer, then the error.
    let last = run.state.messages.last().expect("the correction");
    assert!(format!("{last:?}").contains("output schema"), "{last:?}");

    run.send(
        &agent,
        responded(2, answer(&[], Some(r#"{"severity": "urgent"}"#))),
    )
    .unwrap();
    let Some(Event::LlmRejected { error, .. }) = run.journal.last().map(|r| &r.event) else {
        panic!("off the schema: {:?}", run.journal.last())
    };
    assert!(error.contains("/severity"), "{error}");

    run.send(
        &agent,
        responded(
            3,
            answer(&[], Some("```json\n{\"severity\": \"high\"}\n```")),
        ),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::Completed);
    assert_eq!(run.state.output.as_deref(), Some(r#"{"severity": "high"}"#));
    assert_eq!(State::replay(run.state.run_id, &run.journal), run.state);
}

#[test]
fn an_answer_still_off_the_output_schema_at_max_steps_fails_the_run() {
    let agent = structured(1);
    let mut run = Run::new();
    run.send(&agent, responded(1, answer(&[], Some("[]"))))
        .unwrap();
    assert_eq!(run.state.status, Status::Failed);
    assert_eq!(failure_code(&run), Some(code::MAX_STEPS));
    let error = run.state.error.clone().unwrap_or_default();
    assert!(
        error.contains("does not match the output schema"),
        "{error}"
    );
}

fn decide(
    id: &str,
    approved: bool,
    by: &str,
    reason: Option<&str>,
    arguments: Option<Value>,
) -> Command {
    Command::Decide {
        approval_id: id.into(),
        approved,
        by: by.into(),
        reason: reason.map(str::to_string),
        arguments,
    }
}

fn invocations(effects: &[Effect]) -> Vec<&Invocation> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::InvokeTool(inv) => Some(inv),
            _ => None,
        })
        .collect()
}

const NOTIFY: &str = r#"{timeout: 10m, notify: "http://127.0.0.1:3/hook"}"#;

#[test]
fn a_gated_call_parks_the_step_until_its_approval_is_decided() {
    let agent = agent_with("max_steps: 5", NOTIFY);
    let mut run = Run::new();
    let calls = [
        ("echo", r#"{"n":1}"#),
        ("pay", r#"{"amount":500}"#),
        ("pay", r#"{"amount":50}"#),
    ];
    run.send(&agent, responded(1, answer(&calls, None)))
        .unwrap();
    // Only the payment over 100 waits; the step parks with a timer and a
    // notification, and no tools task.
    assert_eq!(run.state.status, Status::AwaitingApproval);
    let requested: Vec<&Event> = run
        .journal
        .iter()
        .filter(|r| matches!(r.event, Event::ApprovalRequested { .. }))
        .map(|r| &r.event)
        .collect();
    assert_eq!(requested.len(), 1);
    let Event::ApprovalRequested {
        approval_id,
        tool,
        arguments,
        attempt,
        reason,
        timeout_ms,
        ..
    } = requested[0]
    else {
        unreachable!()
    };
    assert_eq!(
        (
            approval_id.as_str(),
            tool.as_str(),
            attempt,
            reason.as_str()
        ),
        ("1.1.1", "pay", &1, "policy")
    );
    assert_eq!(arguments, &json!({"amount": 500}));
    assert_eq!(*timeout_ms, Some(600_000));
    let deadline = run.state.approvals[0].deadline;
    assert_eq!(
        deadline,
        Some(run.state.approvals[0].requested_at + 600_000)
    );
    assert_eq!(
        run.effects[1..],
        [
            Effect::AwaitApproval { step: 1 },
            Effect::Notify { step: 1 }
        ]
    );
    assert!(matches!(
        run.send(&agent, Command::StartTools { step: 1 }),
        Err(Rejected::WrongStep { .. })
    ));

    // Bad decisions are refused and change nothing.
    assert_eq!(
        run.send(&agent, decide("1.0.1", true, "alice", None, None)),
        Err(Rejected::UnknownApproval("1.0.1".into()))
    );
    let bad = run.send(
        &agent,
        decide("1.1.1", true, "alice", None, Some(json!({"amount": "x"}))),
    );
    assert!(
        matches!(&bad, Err(Rejected::InvalidDecision(m)) if m.contains("schema")),
        "{bad:?}"
    );
    let bad = run.send(
        &agent,
        decide("1.1.1", false, "alice", None, Some(json!({"amount": 1}))),
    );
    assert!(matches!(bad, Err(Rejected::InvalidDecision(_))), "{bad:?}");

    // Approved with edited arguments: the step resumes with them.
    run.send(
        &agent,
        decide("1.1.1", true, "alice", None, Some(json!({"amount": 200}))),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingTool);
    assert_eq!(run.effects.last(), Some(&Effect::CallTools { step: 1 }));
    assert_eq!(
        run.send(&agent, decide("1.1.1", false, "bob", None, None)),
        Err(Rejected::AlreadyDecided {
            id: "1.1.1".into(),
            by: "alice".into(),
            approved: true
        })
    );
    run.effects.clear();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    let started = invocations(&run.effects);
    assert_eq!(started.len(), 3);
    assert_eq!(started[1].arguments, json!({"amount": 200}));
    assert_eq!(started[2].arguments, json!({"amount": 50}));
}

#[test]
fn a_rejection_is_the_calls_result_for_the_model() {
    let agent = agent_with("max_steps: 5", "{}");
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("pay", r#"{"amount":500}"#)], None)),
    )
    .unwrap();
    // No webhook configured: only the timer.
    assert_eq!(run.effects.last(), Some(&Effect::AwaitApproval { step: 1 }));
    assert_eq!(run.state.approvals[0].deadline, None);
    run.send(
        &agent,
        decide("1.0.1", false, "bob", Some("too much"), None),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));
    assert_eq!(
        run.state.last_tool_output(),
        Some("error: the call was rejected by bob: too much")
    );
    let decision = run.state.approvals[0].decision.clone().unwrap();
    assert_eq!((decision.approved, decision.by.as_str()), (false, "bob"));
}

#[test]
fn the_timeout_rejects_or_escalates() {
    let agent = agent_with("max_steps: 5", "{timeout: 10m}");
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("pay", r#"{"amount":500}"#)], None)),
    )
    .unwrap();
    let deadline = run.state.approvals[0].deadline.unwrap();
    // Early: nothing happens.
    let early = handle(
        &run.state,
        &agent,
        Command::ApprovalTimeout { now: deadline - 1 },
    )
    .unwrap();
    assert_eq!(early, Transition::default());
    run.send(&agent, Command::ApprovalTimeout { now: deadline })
        .unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));
    let decision = run.state.approvals[0].decision.clone().unwrap();
    assert_eq!(decision.by, "keel:timeout");
    assert!(
        run.state
            .last_tool_output()
            .unwrap()
            .contains("approvals.timeout (600s)")
    );

    let agent = agent_with(
        "max_steps: 5",
        r#"{timeout: 10m, on_timeout: escalate, notify: "http://127.0.0.1:3/a", escalate_to: "http://127.0.0.1:3/b"}"#,
    );
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("pay", r#"{"amount":500}"#)], None)),
    )
    .unwrap();
    run.effects.clear();
    run.send(&agent, Command::ApprovalTimeout { now: i64::MAX })
        .unwrap();
    assert_eq!(run.state.status, Status::AwaitingApproval);
    assert!(run.state.approvals[0].escalated);
    assert_eq!(
        run.effects,
        [
            Effect::AwaitApproval { step: 1 },
            Effect::Notify { step: 1 }
        ]
    );
    // Escalated once; then only a human decides.
    let again = handle(
        &run.state,
        &agent,
        Command::ApprovalTimeout { now: i64::MAX },
    )
    .unwrap();
    assert_eq!(again, Transition::default());
    run.send(&agent, decide("1.0.1", true, "carol", None, None))
        .unwrap();
    assert_eq!(run.effects.last(), Some(&Effect::CallTools { step: 1 }));
}

#[test]
fn uncertain_calls_follow_their_tools_policy() {
    let agent = agent_with("max_steps: 5", "{}");
    // `pay` is not declared idempotent: a human is asked.
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("pay", r#"{"amount":5}"#)], None)),
    )
    .unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    // The worker died before the result: starting again asks.
    run.effects.clear();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    assert!(invocations(&run.effects).is_empty());
    assert_eq!(run.state.status, Status::AwaitingApproval);
    let approval = &run.state.approvals[0];
    assert_eq!(
        (
            approval.id.as_str(),
            approval.attempt,
            approval.reason.as_str()
        ),
        ("1.0.2", 2, "uncertain")
    );
    let edit = run.send(
        &agent,
        decide("1.0.2", true, "ops", None, Some(json!({"amount": 1}))),
    );
    assert!(
        matches!(edit, Err(Rejected::InvalidDecision(_))),
        "{edit:?}"
    );
    run.send(&agent, decide("1.0.2", true, "ops", None, None))
        .unwrap();
    assert_eq!(run.effects.last(), Some(&Effect::CallTools { step: 1 }));
    run.effects.clear();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    let again = invocations(&run.effects);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 2);
    assert_eq!(
        again[0].idempotency_key,
        format!("{}:1:0", run.state.run_id)
    );
    assert_eq!(again[0].arguments, json!({"amount": 5}));
    // It died again: a new approval for attempt 3, rejected this time.
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    run.send(
        &agent,
        decide("1.0.3", false, "ops", Some("it went through"), None),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert_eq!(
        run.state.last_tool_output(),
        Some("error: the call was rejected by ops: it went through")
    );

    // `nuke` says fail: the run fails, naming the call and its key.
    let mut run = Run::new();
    run.send(&agent, responded(1, answer(&[("nuke", "{}")], None)))
        .unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    assert_eq!(run.state.status, Status::Failed);
    assert_eq!(failure_code(&run), Some("uncertain_tool_call"));
    let error = run.state.error.clone().unwrap_or_default();
    assert!(
        error.contains(&format!("{}:1:0", run.state.run_id)),
        "{error}"
    );
}

/// Commands a fuzzer may throw at a run, including stale and duplicate ones.
fn command() -> impl Strategy<Value = Command> {
    let step = 1u32..6;
    let tool = prop_oneof![
        3 => Just(("echo", r#"{"n":1}"#)),
        1 => Just(("pay", r#"{"amount":500}"#)),
        1 => Just(("pay", r#"{"amount":5}"#)),
        1 => Just(("nuke", "{}")),
        1 => Just(("spawn", SPAWN_TWO)),
        2 => Just(("book", r#"{"n":3}"#)),
    ];
    // Weighted so runs get far enough to fail after bookings and compensate.
    prop_oneof![
        4 => (
            step.clone(),
            prop::collection::vec(tool, 0..4),
            any::<bool>(),
            prop::bool::weighted(0.2)
        )
            .prop_map(|(step, tools, bad, final_answer)| {
                let calls: Vec<(&str, &str)> = tools
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        if bad && i == 0 {
                            ("echo", "{oops")
                        } else {
                            *call
                        }
                    })
                    .collect();
                let content = if final_answer || calls.is_empty() {
                    Some("answer")
                } else {
                    None
                };
                responded(step, answer(&calls, content))
            }),
        3 => step.clone().prop_map(|step| Command::StartTools { step }),
        4 => (step.clone(), 0u32..4, any::<bool>(), any::<bool>()).prop_map(
            |(step, call_index, is_error, booked)| Command::ToolReturned {
                step,
                call_index,
                // A booking's id, or a result the template finds none in.
                output: if booked { r#"{"id": 7}"#.into() } else { "out".into() },
                is_error,
            }
        ),
        1 => Just(Command::Cancel {
            reason: "test".into()
        }),
        1 => Just(Command::Expire),
        3 => (0u32..3).prop_map(|index| Command::StartCompensation { index }),
        3 => (0u32..3, any::<bool>()).prop_map(|(index, is_error)| Command::CompensationReturned {
            index,
            output: "undone".into(),
            is_error,
        }),
        2 => (
            step.clone(),
            0u32..4,
            1u32..3,
            any::<bool>(),
            prop::option::of(0u32..300)
        )
            .prop_map(
                |(step, call_index, attempt, approved, amount)| Command::Decide {
                    approval_id: approval_id(step, call_index, attempt),
                    approved,
                    by: "fuzzer".into(),
                    reason: Some("because".into()),
                    arguments: amount.map(|a| json!({"amount": a})),
                }
            ),
        1 => prop_oneof![Just(0i64), Just(i64::MAX)].prop_map(|now| Command::ApprovalTimeout { now }),
        2 => (step.clone(), 0u32..4, any::<bool>()).prop_map(|(step, call_index, known)| {
            Command::Spawn {
                step,
                call_index,
                versions: vec![Some("1".into()), known.then(|| "2".into())],
            }
        }),
        2 => (
            step,
            prop_oneof![
                Just(Status::Completed),
                Just(Status::Failed),
                Just(Status::AwaitingLlm)
            ]
        )
            .prop_map(|(step, status)| Command::JoinChildren {
                step,
                // Filled in with the run's children (see `fill`).
                outcomes: vec![ChildOutcome {
                    run_id: RunId(uuid::Uuid::nil()),
                    status,
                    output: Some("done".into()),
                    error: None,
                }],
            }),
    ]
}

/// A `spawn` call starting two children.
const SPAWN_TWO: &str =
    r#"{"tasks":[{"agent":"worker","input":"a"},{"agent":"self","input":{"part":2}}]}"#;

/// A fuzzed `JoinChildren` names no real child: give its outcome to every
/// child of the run.
fn fill(state: &State, command: Command) -> Command {
    match command {
        Command::JoinChildren { step, outcomes } => {
            let template = outcomes.into_iter().next();
            let outcomes = template
                .map(|t| {
                    state
                        .children
                        .iter()
                        .map(|c| ChildOutcome {
                            run_id: c.run_id,
                            ..t.clone()
                        })
                        .collect()
                })
                .unwrap_or_default();
            Command::JoinChildren { step, outcomes }
        }
        other => other,
    }
}

proptest! {
    #[test]
    fn replay_rebuilds_the_state_and_no_step_is_scheduled_twice(
        commands in prop::collection::vec(command(), 1..60),
        escalate in any::<bool>(),
    ) {
        let policy = if escalate { "escalate" } else { "reject" };
        let agent = agent_with(
            "max_steps: 4",
            &format!("{{timeout: 1h, on_timeout: {policy}, notify: \"http://127.0.0.1:3/hook\"}}"),
        );
        let mut run = Run::new();
        for command in commands {
            let command = fill(&run.state, command);
            let _ = run.send(&agent, command);
        }
        check(&run, &agent)?;
    }

    #[test]
    fn sagas_undo_each_booking_once_in_reverse_order(
        bookings in prop::collection::vec((any::<bool>(), any::<bool>()), 1..4),
        commands in prop::collection::vec(command(), 1..40),
    ) {
        // A run that booked (or failed to) for a few steps, then anything.
        let agent = agent_with("max_steps: 4", "{}");
        let mut run = Run::new();
        for (i, (is_error, with_id)) in bookings.into_iter().enumerate() {
            let step = i as u32 + 1;
            run.send(&agent, responded(step, answer(&[("book", r#"{"n":3}"#)], None))).unwrap();
            run.send(&agent, Command::StartTools { step }).unwrap();
            let output = if with_id { r#"{"id": 7}"# } else { "booked" };
            run.send(&agent, Command::ToolReturned { step, call_index: 0, output: output.into(), is_error }).unwrap();
        }
        for command in commands {
            let _ = run.send(&agent, command);
        }
        check(&run, &agent)?;
    }
}

/// What holds after any sequence of commands.
fn check(run: &Run, agent: &Agent) -> Result<(), TestCaseError> {
    {
        // Replaying the journal (through its stored JSON form) rebuilds the same state.
        let stored: Vec<Recorded> = run
            .journal
            .iter()
            .map(|r| serde_json::from_str(&serde_json::to_string(r).unwrap()).unwrap())
            .collect();
        let replayed = State::replay(run.state.run_id, &stored);
        prop_assert_eq!(&replayed, &run.state);

        // Sequence numbers are contiguous.
        for (i, r) in run.journal.iter().enumerate() {
            prop_assert_eq!(r.seq, i as i64 + 1);
        }

        // Each LLM step is scheduled at most once; a tool step once, and
        // once more after each round of approvals to repeat uncertain calls.
        let mut llm_steps = Vec::new();
        let mut tool_steps = std::collections::HashMap::new();
        let mut compensations = std::collections::HashSet::new();
        for effect in &run.effects {
            match effect {
                Effect::CallLlm { step } => llm_steps.push(*step),
                Effect::CallTools { step } => *tool_steps.entry(*step).or_insert(0u32) += 1,
                Effect::Compensate { index } => {
                    prop_assert!(
                        compensations.insert(*index),
                        "compensation {} scheduled twice",
                        index
                    );
                }
                Effect::InvokeTool(_)
                | Effect::AwaitApproval { .. }
                | Effect::Notify { .. }
                | Effect::InvokeCompensation(_)
                | Effect::SpawnChildren(_)
                | Effect::AwaitChildren { .. } => {}
            }
        }
        // Each spawn starts its call's children once, with distinct ids
        // derived from the call; the events name the runs the effects create.
        let mut child_ids = std::collections::HashSet::new();
        let mut spawned_calls = std::collections::HashSet::new();
        for r in &run.journal {
            if let Event::ChildrenSpawned {
                step,
                call_index,
                children,
            } = &r.event
            {
                prop_assert!(
                    spawned_calls.insert((*step, *call_index)),
                    "call spawned twice"
                );
                for (i, child) in children.iter().enumerate() {
                    prop_assert_eq!(
                        child.run_id,
                        run.state.run_id.child(*step, *call_index, i as u32)
                    );
                    prop_assert!(child_ids.insert(child.run_id));
                }
            }
        }
        let created: Vec<RunId> = run
            .effects
            .iter()
            .flat_map(|e| match e {
                Effect::SpawnChildren(runs) => runs.iter().map(|r| r.run_id).collect(),
                _ => Vec::new(),
            })
            .collect();
        prop_assert_eq!(created.len(), child_ids.len());
        prop_assert!(created.iter().all(|id| child_ids.contains(id)));
        // Parked for children exactly while only spawned calls wait.
        if !run.state.status.is_terminal() && run.state.status != Status::AwaitingApproval {
            prop_assert_eq!(
                run.state.status == Status::AwaitingChildren,
                run.state.only_children_left()
            );
        }
        // Sorted first: `dedup` only drops neighbours, and a step scheduled
        // again later ([1, 2, 1]) must be caught too.
        let mut unique = llm_steps.clone();
        unique.sort_unstable();
        unique.dedup();
        prop_assert_eq!(
            &unique,
            &llm_steps,
            "llm steps scheduled twice or out of order: {:?}",
            llm_steps
        );
        for (step, scheduled) in &tool_steps {
            let repeats = run
                .journal
                .iter()
                .filter(|r| {
                    matches!(&r.event,
                Event::ApprovalRequested { step: s, attempt, .. } if s == step && *attempt > 1)
                })
                .count();
            prop_assert!(
                *scheduled as usize <= 1 + repeats,
                "tool step {} scheduled {} times",
                step,
                scheduled
            );
        }

        // A call is only started again when its previous start has no
        // result; a call that needed approval only once approved; each
        // approval is decided at most once, after it was requested.
        let mut started = std::collections::HashMap::new();
        let mut requested = std::collections::HashSet::new();
        let mut decided = std::collections::HashMap::new();
        let mut asked_for = Vec::new();
        for r in &run.journal {
            match &r.event {
                Event::LlmCompleted { step, message, .. } => {
                    for (i, call) in message.tool_calls.iter().enumerate() {
                        if let Ok(args) = agent.check_arguments(&call.name, &call.arguments)
                            && agent.needs_approval(&call.name, &args)
                        {
                            asked_for.push(approval_id(*step, i as u32, 1));
                        }
                    }
                }
                Event::ToolCallStarted {
                    step,
                    call_index,
                    attempt,
                    ..
                } => {
                    let n = started.entry((*step, *call_index)).or_insert(0u32);
                    *n += 1;
                    prop_assert_eq!(*attempt, *n);
                    let id = approval_id(*step, *call_index, *attempt);
                    if requested.contains(&id) || asked_for.contains(&id) {
                        prop_assert_eq!(
                            decided.get(&id),
                            Some(&true),
                            "{} started without approval",
                            id
                        );
                    }
                }
                Event::ToolCallCompleted {
                    step, call_index, ..
                } => {
                    prop_assert!(started.contains_key(&(*step, *call_index)));
                }
                Event::ApprovalRequested { approval_id, .. } => {
                    prop_assert!(
                        requested.insert(approval_id.clone()),
                        "{} requested twice",
                        approval_id
                    );
                }
                Event::ApprovalDecided {
                    approval_id,
                    approved,
                    ..
                } => {
                    prop_assert!(requested.contains(approval_id));
                    prop_assert!(
                        decided.insert(approval_id.clone(), *approved).is_none(),
                        "{} decided twice",
                        approval_id
                    );
                }
                _ => {}
            }
        }
        // Parked exactly while an approval is pending.
        let pending = run.state.pending_approvals().count();
        if !run.state.status.is_terminal() {
            prop_assert_eq!(pending > 0, run.state.status == Status::AwaitingApproval);
        }

        // Nothing follows a terminal event, and the step budget holds.
        if let Some(pos) = run.journal.iter().position(|r| r.event.is_terminal()) {
            prop_assert_eq!(pos, run.journal.len() - 1);
        }
        prop_assert!(run.state.steps <= 4);

        // Sagas: the plan undoes the successful `book` calls, last first;
        // each compensation starts only when it is the next one, settles
        // once, and the run ends only after all of them, with their count.
        let booked: Vec<(u32, u32)> = run
            .journal
            .iter()
            .filter_map(|r| match &r.event {
                Event::ToolCallCompleted {
                    step,
                    call_index,
                    is_error: false,
                    ..
                } => Some((*step, *call_index)),
                _ => None,
            })
            .filter(|(step, call_index)| {
                run.journal.iter().any(|r| {
                    matches!(&r.event,
            Event::ToolCallStarted { step: s, call_index: c, tool, .. }
                if s == step && c == call_index && tool == "book")
                })
            })
            .collect();
        let mut plan = None;
        let mut settled = Vec::new();
        let mut starts = std::collections::HashMap::new();
        for r in &run.journal {
            match &r.event {
                Event::RunCompensating { compensations, .. } => {
                    prop_assert!(plan.is_none(), "compensating twice");
                    let order: Vec<(u32, u32)> = compensations
                        .iter()
                        .map(|c| (c.step, c.call_index))
                        .collect();
                    let mut expected = booked.clone();
                    expected.reverse();
                    prop_assert_eq!(&order, &expected);
                    for c in compensations {
                        prop_assert_eq!(
                            &c.idempotency_key,
                            &compensation_key(run.state.run_id, c.step, c.call_index)
                        );
                    }
                    plan = Some(compensations.len());
                }
                Event::CompensationStarted { index, attempt, .. } => {
                    prop_assert_eq!(*index as usize, settled.len(), "started out of order");
                    let n = starts.entry(*index).or_insert(0u32);
                    *n += 1;
                    prop_assert_eq!(*attempt, *n);
                }
                Event::CompensationCompleted { index, .. } => {
                    prop_assert!(starts.contains_key(index));
                    prop_assert_eq!(*index as usize, settled.len());
                    settled.push(true);
                }
                Event::CompensationFailed { index, .. } => {
                    prop_assert_eq!(*index as usize, settled.len());
                    settled.push(false);
                }
                Event::RunCompensated { completed, failed } => {
                    prop_assert_eq!(Some(settled.len()), plan);
                    prop_assert_eq!(
                        *completed as usize,
                        settled.iter().filter(|ok| **ok).count()
                    );
                    prop_assert_eq!(*failed as usize, settled.iter().filter(|ok| !**ok).count());
                }
                _ => {}
            }
        }
        match plan {
            Some(planned) if run.state.status.is_terminal() => {
                prop_assert_eq!(settled.len(), planned);
                prop_assert!(matches!(
                    run.state.status,
                    Status::Failed | Status::Cancelled
                ));
            }
            Some(_) => prop_assert_eq!(run.state.status, Status::Compensating),
            None => prop_assert!(run.state.status != Status::Compensating),
        }
        if matches!(run.state.status, Status::Failed | Status::Cancelled) && plan.is_none() {
            prop_assert!(
                booked.is_empty(),
                "a run with bookings ended without undoing them"
            );
        }
    }
    Ok(())
}

/// A 3-step booking whose third step fails (its tool errs, then the step
/// budget is spent) undoes the first two, last first, once each.
#[test]
fn a_failed_saga_compensates_in_reverse_order_once_each() {
    let agent = agent(4);
    let mut run = Run::new();
    for (step, output) in [(1, r#"{"id": 11}"#), (2, r#"{"id": 22}"#)] {
        run.send(
            &agent,
            responded(
                step,
                answer(&[("book", &format!(r#"{{"n":{step}}}"#))], None),
            ),
        )
        .unwrap();
        run.send(&agent, Command::StartTools { step }).unwrap();
        run.send(
            &agent,
            Command::ToolReturned {
                step,
                call_index: 0,
                output: output.into(),
                is_error: false,
            },
        )
        .unwrap();
    }
    run.send(
        &agent,
        responded(3, answer(&[("book", r#"{"n":3}"#)], None)),
    )
    .unwrap();
    run.send(&agent, Command::StartTools { step: 3 }).unwrap();
    run.send(
        &agent,
        Command::ToolReturned {
            step: 3,
            call_index: 0,
            output: "sold out".into(),
            is_error: true,
        },
    )
    .unwrap();
    // The model tries again; the step budget is spent.
    assert_eq!(run.state.status, Status::AwaitingLlm);
    run.send(
        &agent,
        responded(4, answer(&[("book", r#"{"n":3}"#)], None)),
    )
    .unwrap();
    assert_eq!(run.state.status, Status::Compensating);
    assert_eq!(run.effects.last(), Some(&Effect::Compensate { index: 0 }));
    let Some(Event::RunCompensating {
        outcome,
        code,
        compensations,
        ..
    }) = run.journal.last().map(|r| &r.event)
    else {
        panic!("expected run_compensating, got {:?}", run.journal.last())
    };
    assert_eq!(*outcome, Status::Failed);
    assert_eq!(code.as_deref(), Some("max_steps"));
    let id = run.state.run_id;
    assert_eq!(
        compensations.len(),
        2,
        "the failed call has nothing to undo"
    );
    assert_eq!(compensations[0].step, 2);
    assert_eq!(
        compensations[0].arguments,
        json!({"n": 2, "id": 22, "note": "undo 2"})
    );
    assert_eq!(
        compensations[0].idempotency_key,
        format!("{id}:compensate:2:0")
    );
    assert_eq!(compensations[1].step, 1);
    assert_eq!(compensations[1].arguments["id"], 11);

    // While compensating, the run takes no other command.
    assert_eq!(
        handle(&run.state, &agent, Command::Cancel { reason: "x".into() }),
        Err(Rejected::Compensating(Status::Failed))
    );
    assert!(!expired(&run.state, &agent, i64::MAX));
    assert!(matches!(
        handle(&run.state, &agent, Command::StartCompensation { index: 1 }),
        Err(Rejected::WrongCompensation {
            index: 1,
            next: Some(0)
        })
    ));

    // The first is started, the worker dies, it is started again with the same key.
    run.send(&agent, Command::StartCompensation { index: 0 })
        .unwrap();
    run.send(&agent, Command::StartCompensation { index: 0 })
        .unwrap();
    let invoked: Vec<&Invocation> = run
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::InvokeCompensation(inv) => Some(inv),
            _ => None,
        })
        .collect();
    assert_eq!(invoked.len(), 2);
    assert_eq!(invoked[0].idempotency_key, invoked[1].idempotency_key);
    assert_eq!((invoked[0].attempt, invoked[1].attempt), (1, 2));
    assert_eq!(invoked[0].tool, "unbook");
    run.send(
        &agent,
        Command::CompensationReturned {
            index: 0,
            output: "cancelled 22".into(),
            is_error: false,
        },
    )
    .unwrap();
    assert_eq!(run.effects.last(), Some(&Effect::Compensate { index: 1 }));
    // A stale return of the first one is refused.
    assert!(
        handle(
            &run.state,
            &agent,
            Command::CompensationReturned {
                index: 0,
                output: "again".into(),
                is_error: false
            }
        )
        .is_err()
    );
    run.send(&agent, Command::StartCompensation { index: 1 })
        .unwrap();
    run.send(
        &agent,
        Command::CompensationReturned {
            index: 1,
            output: "HTTP 500".into(),
            is_error: true,
        },
    )
    .unwrap();
    let kinds: Vec<&str> = run
        .journal
        .iter()
        .rev()
        .take(3)
        .map(|r| r.event.kind())
        .collect();
    assert_eq!(
        kinds,
        ["run_failed", "run_compensated", "compensation_failed"]
    );
    assert!(matches!(
        run.journal[run.journal.len() - 2].event,
        Event::RunCompensated {
            completed: 1,
            failed: 1
        }
    ));
    assert_eq!(run.state.status, Status::Failed);
    assert_eq!(failure_code(&run), Some("max_steps"));
}

/// A cancel undoes what was booked and ends CANCELLED; a template with no
/// value fails its compensation without a call; runs with nothing to undo
/// end at once.
#[test]
fn a_cancel_compensates_and_unfillable_templates_fail_without_a_call() {
    let agent = agent(5);
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("book", r#"{"n":1}"#)], None)),
    )
    .unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    run.send(
        &agent,
        Command::ToolReturned {
            step: 1,
            call_index: 0,
            output: "booked, no id".into(),
            is_error: false,
        },
    )
    .unwrap();
    run.send(
        &agent,
        Command::Cancel {
            reason: "user".into(),
        },
    )
    .unwrap();
    assert_eq!(run.state.status, Status::Compensating);
    assert_eq!(run.state.error.as_deref(), Some("cancelled: user"));
    run.send(&agent, Command::StartCompensation { index: 0 })
        .unwrap();
    assert!(
        !run.effects
            .iter()
            .any(|e| matches!(e, Effect::InvokeCompensation(_))),
        "no call without arguments"
    );
    let kinds: Vec<&str> = run
        .journal
        .iter()
        .rev()
        .take(3)
        .map(|r| r.event.kind())
        .collect();
    assert_eq!(
        kinds,
        ["run_cancelled", "run_compensated", "compensation_failed"]
    );
    let Some(Event::CompensationFailed { error, .. }) =
        run.journal.iter().rev().nth(2).map(|r| &r.event)
    else {
        panic!("expected compensation_failed")
    };
    assert!(error.contains("`result` has no `id`"), "{error}");
    assert_eq!(run.state.status, Status::Cancelled);

    // echo declares no compensate: the cancel ends the run at once.
    let mut run = Run::new();
    tool_step(&mut run, &agent, 1).unwrap();
    run.send(
        &agent,
        Command::Cancel {
            reason: "user".into(),
        },
    )
    .unwrap();
    assert_eq!(run.state.status, Status::Cancelled);
}

#[test]
fn the_state_knows_the_priority_and_old_journals_read_the_default() {
    let run = Run::new();
    assert_eq!(run.state.priority, Priority::new(7).unwrap());
    let old = json!({"type": "run_submitted", "tenant": "default", "agent": "t",
        "version": "1", "input": "hello"});
    let event: Event = serde_json::from_value(old).unwrap();
    let Event::RunSubmitted { priority, .. } = &event else {
        panic!("not a submission: {event:?}");
    };
    assert_eq!(*priority, Priority::DEFAULT);
    let out_of_range = json!({"type": "run_submitted", "tenant": "default", "agent": "t",
        "version": "1", "input": "hello", "priority": 10});
    assert!(serde_json::from_value::<Event>(out_of_range).is_err());
}

#[test]
fn spawn_agents_fans_out_parks_and_fans_in_in_task_order() {
    let agent = agent(5);
    let mut run = Run::new();
    let spawn = answer(&[("spawn", SPAWN_TWO), ("echo", r#"{"n":1}"#)], None);
    run.send(&agent, responded(1, spawn)).unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    assert_eq!(invocations(&run.effects).len(), 2);

    // An unknown agent fails the call, for the model to see.
    let mut failed = Run::new();
    failed
        .send(&agent, responded(1, answer(&[("spawn", SPAWN_TWO)], None)))
        .unwrap();
    failed
        .send(&agent, Command::StartTools { step: 1 })
        .unwrap();
    failed
        .send(
            &agent,
            Command::Spawn {
                step: 1,
                call_index: 0,
                versions: vec![Some("1".into()), None],
            },
        )
        .unwrap();
    assert_eq!(failed.state.status, Status::AwaitingLlm);
    assert!(
        failed
            .state
            .last_tool_output()
            .unwrap()
            .contains("`t` is not registered"),
        "{:?}",
        failed.state.messages
    );

    // The spawn starts two children (`self` is the agent itself) while
    // `echo` still runs: not parked yet.
    run.send(
        &agent,
        Command::Spawn {
            step: 1,
            call_index: 0,
            versions: vec![Some("3".into()), Some("1".into())],
        },
    )
    .unwrap();
    let Some(Effect::SpawnChildren(children)) = run.effects.last().cloned() else {
        panic!("no children: {:?}", run.effects);
    };
    assert_eq!(children.len(), 2);
    assert_eq!(children[0].agent, "worker");
    assert_eq!(children[0].version, "3");
    assert_eq!(children[1].agent, "t");
    assert_eq!(children[1].input, json!({"part": 2}));
    assert_eq!(children[1].parent.depth, 1);
    assert_eq!(children[1].parent.index, 1);
    assert_eq!(run.state.status, Status::AwaitingTool);
    // A second spawn of the same call, or a restart, starts nothing again.
    assert!(
        handle(
            &run.state,
            &agent,
            Command::Spawn {
                step: 1,
                call_index: 0,
                versions: vec![Some("3".into()), Some("1".into())],
            },
        )
        .is_err()
    );
    let restart = handle(&run.state, &agent, Command::StartTools { step: 1 }).unwrap();
    assert_eq!(invocations(&restart.effects).len(), 1);

    // The echo result leaves only the children: the run parks.
    run.send(
        &agent,
        Command::ToolReturned {
            step: 1,
            call_index: 1,
            output: "echoed".into(),
            is_error: false,
        },
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingChildren);
    assert_eq!(run.effects.last(), Some(&Effect::AwaitChildren { step: 1 }));

    // One child over: still waiting; both: the fan-in, in task order.
    let outcome = |i: usize, status, output: Option<&str>, error: Option<&str>| ChildOutcome {
        run_id: children[i].run_id,
        status,
        output: output.map(str::to_string),
        error: error.map(str::to_string),
    };
    let partial = handle(
        &run.state,
        &agent,
        Command::JoinChildren {
            step: 1,
            outcomes: vec![
                outcome(1, Status::Completed, Some("two"), None),
                outcome(0, Status::AwaitingLlm, None, None),
            ],
        },
    )
    .unwrap();
    assert!(partial.events.is_empty());
    run.send(
        &agent,
        Command::JoinChildren {
            step: 1,
            outcomes: vec![
                outcome(1, Status::Completed, Some("two"), None),
                outcome(0, Status::Cancelled, None, Some("cancelled: stop")),
            ],
        },
    )
    .unwrap();
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert_eq!(run.effects.last(), Some(&Effect::CallLlm { step: 2 }));
    let result: serde_json::Value =
        serde_json::from_str(run.state.last_tool_output().unwrap()).unwrap();
    assert_eq!(
        result,
        json!([
            {"agent": "worker", "run_id": children[0].run_id.to_string(), "status": "CANCELLED", "error": "cancelled: stop"},
            {"agent": "t", "run_id": children[1].run_id.to_string(), "status": "COMPLETED", "output": "two"},
        ])
    );
    assert!(run.state.live_children().next().is_none());

    // Replay agrees.
    assert_eq!(State::replay(run.state.run_id, &run.journal), run.state);
}

#[test]
fn spawn_limits_go_back_to_the_model() {
    let tasks = |n: usize| {
        let tasks: Vec<_> = (0..n)
            .map(|i| json!({"agent": "worker", "input": i}))
            .collect();
        json!({ "tasks": tasks }).to_string()
    };
    // Fan-out per call.
    let agent = agent_with_limits("max_fan_out: 3, max_children: 4");
    let mut run = Run::new();
    let four = tasks(4);
    run.send(&agent, responded(1, answer(&[("spawn", &four)], None)))
        .unwrap();
    assert!(matches!(run.journal.last().map(|r| &r.event),
        Some(Event::ToolCallRejected { error, .. }) if error.contains("limits.max_fan_out (3)")));
    // Total per run, across the calls of one answer.
    let three = tasks(3);
    let two = tasks(2);
    run.send(
        &agent,
        responded(2, answer(&[("spawn", &three), ("spawn", &two)], None)),
    )
    .unwrap();
    assert!(matches!(run.journal.last().map(|r| &r.event),
        Some(Event::ToolCallRejected { call_index: 1, error, .. }) if error.contains("limits.max_children (4)")));
    // Depth: a child at max_depth may not spawn.
    let agent = agent_with_limits("max_depth: 1");
    let mut child = Run::new();
    child.state.depth = 1;
    child
        .send(&agent, responded(1, answer(&[("spawn", &two)], None)))
        .unwrap();
    assert!(matches!(child.journal.last().map(|r| &r.event),
        Some(Event::ToolCallRejected { error, .. }) if error.contains("limits.max_depth (1)")));
    // A schema violation names the agents allowed.
    let mut run = Run::new();
    let bad = json!({"tasks": [{"agent": "stranger", "input": 1}]}).to_string();
    run.send(&agent, responded(1, answer(&[("spawn", &bad)], None)))
        .unwrap();
    assert!(matches!(run.journal.last().map(|r| &r.event),
        Some(Event::ToolCallRejected { error, .. }) if error.contains("worker")));
}

#[test]
fn child_ids_are_derived_and_distinct() {
    let parent = RunId::new();
    let a = parent.child(1, 0, 0);
    assert_eq!(a, parent.child(1, 0, 0));
    let mut seen = std::collections::HashSet::new();
    for step in 1..5 {
        for call in 0..3 {
            for index in 0..50 {
                assert!(seen.insert(parent.child(step, call, index)));
            }
        }
    }
    assert_ne!(a, RunId::new().child(1, 0, 0));
    assert_eq!(a.0.as_bytes()[..6], parent.0.as_bytes()[..6]);
}

#[test]
fn a_worker_call_in_its_queue_is_not_uncertain() {
    let yaml = r#"
name: t
version: 1
model: {provider: openai, model: m, base_url: "http://127.0.0.1:1"}
tools:
  - name: echo
    parameters: {type: object}
    http: {url: "http://127.0.0.1:2/echo"}
    idempotent: true
  - name: resize
    parameters: {type: object}
    worker: images
"#;
    let agent = Agent::parse(yaml).unwrap();
    let mut run = Run::new();
    run.send(
        &agent,
        responded(1, answer(&[("resize", "{}"), ("echo", "{}")], None)),
    )
    .unwrap();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    assert_eq!(invocations(&run.effects).len(), 2);
    // The engine's tools task is taken over: only the HTTP call is
    // repeated; the worker's call stays with its queue (no new start).
    run.effects.clear();
    run.send(&agent, Command::StartTools { step: 1 }).unwrap();
    let again = invocations(&run.effects);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].tool.as_str(), again[0].attempt), ("echo", 2));
    // The worker's result settles the step like any tool's.
    for call_index in [1, 0] {
        run.send(
            &agent,
            Command::ToolReturned {
                step: 1,
                call_index,
                output: "ok".into(),
                is_error: false,
            },
        )
        .unwrap();
    }
    assert_eq!(run.state.status, Status::AwaitingLlm);
    assert!(run.effects.contains(&Effect::CallLlm { step: 2 }));
}

#[test]
fn the_callback_url_is_part_of_the_submission() {
    let mut transition = submit("default", "t", "1", json!("hi"), Priority::DEFAULT);
    if let Some(Event::RunSubmitted { callback_url, .. }) = transition.events.first_mut() {
        *callback_url = Some("http://h/cb".into());
    }
    let recorded: Vec<Recorded> = transition
        .events
        .into_iter()
        .enumerate()
        .map(|(i, event)| Recorded {
            seq: i as i64 + 1,
            at: 1,
            event,
        })
        .collect();
    let state = State::replay(RunId::new(), &recorded);
    assert_eq!(state.callback_url.as_deref(), Some("http://h/cb"));
}

#[test]
fn a_dead_letter_fails_a_child_whose_parent_says_fail_and_parks_the_others() {
    let dead_letter = || Event::TaskDeadLettered {
        task_id: crate::ids::TaskId::new(),
        kind: "llm".into(),
        step: 1,
        attempts: 3,
        error: "llm unreachable".into(),
    };
    // A submitted run parks in the dead-letter queue.
    let agent = agent(5);
    let run = Run::new();
    assert!(give_up(&run.state, &agent, dead_letter()).is_none());

    // A child carries its spawning tool's policy (default: fail).
    let waiting = parse(&spec_yaml("max_steps: 5", "{}").replace(
        "agents: [worker, self]",
        "agents: [worker, self]\n    on_dead_letter: wait",
    ));
    let mut children = Vec::new();
    for parent_agent in [&agent, &waiting] {
        let mut parent = Run::new();
        parent
            .send(
                parent_agent,
                responded(1, answer(&[("spawn", SPAWN_TWO)], None)),
            )
            .unwrap();
        parent
            .send(parent_agent, Command::StartTools { step: 1 })
            .unwrap();
        parent
            .send(
                parent_agent,
                Command::Spawn {
                    step: 1,
                    call_index: 0,
                    versions: vec![Some("1".into()), Some("1".into())],
                },
            )
            .unwrap();
        let spawned = parent.effects.iter().find_map(|e| match e {
            Effect::SpawnChildren(spawned) => spawned.first().map(|c| c.parent.clone()),
            _ => None,
        });
        children.push(spawned.expect("a child"));
    }
    assert_eq!(children[0].on_dead_letter, OnDeadLetter::Fail);
    assert_eq!(children[1].on_dead_letter, OnDeadLetter::Wait);

    let child = |link: &crate::event::ParentLink| {
        let mut run = Run::new();
        run.state.parent = Some(link.clone());
        run
    };
    // Told to fail: the child fails with the dead letter's error, which
    // ends its steps (and so wakes the parent).
    let mut failing = child(&children[0]);
    let transition = give_up(&failing.state, &agent, dead_letter()).expect("the child fails");
    assert!(matches!(
        transition.events[0],
        Event::TaskDeadLettered { .. }
    ));
    failing.commit(transition);
    assert_eq!(failing.state.status, Status::Failed);
    assert_eq!(failure_code(&failing), Some("dead_lettered"));
    assert!(
        failing
            .state
            .error
            .as_deref()
            .unwrap_or("")
            .contains("llm unreachable"),
        "{:?}",
        failing.state.error
    );
    assert!(failing.state.parked.is_none());
    // Told to wait: it parks like a submitted run.
    let waiting_child = child(&children[1]);
    assert!(give_up(&waiting_child.state, &agent, dead_letter()).is_none());
    // The policy round-trips through the journal (and is left out when default).
    let json = serde_json::to_value(&children[0]).unwrap();
    assert!(json.get("on_dead_letter").is_none(), "{json}");
    let json = serde_json::to_value(&children[1]).unwrap();
    assert_eq!(json["on_dead_letter"], "wait");
}
