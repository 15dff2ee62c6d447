//! The `scripted` provider: replays `model.script`, one turn per step, with no
//! network. A stand-in for offline demos and tests, never a real model.

use keel_core::message::{Message, ToolCall, Usage};
use keel_core::run::State;
use keel_core::spec::Agent;

use super::{Error, Finish, Response};

/// Replays turn `step` of the script.
pub(super) fn answer(agent: &Agent, state: &State, step: u32) -> Result<Response, Error> {
    let model = &agent.spec.model;
    let turn = step
        .checked_sub(1)
        .and_then(|i| model.script.get(i as usize))
        .ok_or_else(|| {
            Error::permanent(format!(
                "scripted model has no turn for step {step} (script has {} turns)",
                model.script.len()
            ))
        })?;
    let last_result = state.last_tool_output().unwrap_or("");
    let content = turn
        .content
        .as_ref()
        .map(|text| text.replace("{{tool_result}}", last_result));
    let tool_calls: Vec<ToolCall> = turn
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, call)| ToolCall {
            id: format!("call_{step}_{i}"),
            name: call.name.clone(),
            arguments: call.arguments.to_string(),
        })
        .collect();

    // A rough estimate, about four characters a token.
    let mut input_chars = agent.system_prompt().chars().count();
    for message in &state.messages {
        input_chars += message.content.as_deref().map_or(0, |c| c.chars().count());
        input_chars += message
            .tool_calls
            .iter()
            .map(|c| c.arguments.chars().count())
            .sum::<usize>();
    }
    let output_chars = content.as_deref().map_or(0, |c| c.chars().count())
        + tool_calls
            .iter()
            .map(|c| c.arguments.chars().count())
            .sum::<usize>();
    let usage = Usage {
        input_tokens: input_chars.div_ceil(4) as u64,
        output_tokens: output_chars.div_ceil(4) as u64,
    };
    let finish = if tool_calls.is_empty() {
        Finish::Stop
    } else {
        Finish::ToolCalls
    };
    Ok(Response {
        message: Message::assistant(content, tool_calls),
        usage,
        model: model.model.clone(),
        finish,
    })
}
